"""The adapter worker: a child process that owns torch, loads the bundle once, answers adapt requests.

Started by module name (``python -m edgemeta.meta.worker``) from ``edgemeta.daemon.adapter`` so the
serving process never imports torch. It speaks :mod:`edgemeta.wire` frames on stdin/stdout; anything
printed goes to stderr (the journal), never into the protocol.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
import traceback

FIT_OPTIONS = ("max_steps", "lr", "steps", "max_seconds", "batch", "seed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgemeta-worker")
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cpu-threads", type=int, default=1)
    args = parser.parse_args(argv)
    # Ctrl-C in a terminal reaches the whole process group: the daemon stops the worker itself
    # (a stop frame, or closing the pipe), so the worker ignores SIGINT instead of dying mid-write
    # with a KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return serve(args)
    except BrokenPipeError:  # the daemon went away while we answered: nothing left to tell
        return 0


def serve(args: argparse.Namespace) -> int:
    proto_out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints land in the journal
    proto_in = sys.stdin.buffer

    import torch

    from edgemeta.meta.adapt import AdaptationFailed, Adapter
    from edgemeta.meta.bundle import read_bundle
    from edgemeta.wire import WireError, read_frame, write_frame

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(max(1, args.cpu_threads))
    # A test hook: a worker as slow to start as a CUDA build on a small device (8 s and more),
    # so the tests can show the daemon serving and watching while it waits.
    time.sleep(float(os.environ.get("EDGEMETA_TEST_WORKER_START_DELAY_S", "0") or 0))
    adapter = Adapter(read_bundle(args.bundle), device=device)
    # Warm the kernels once so the first real request is as fast as the rest.
    features = int(adapter.bundle.meta["input"]["features"])
    warm_y = [0.0, 0.0] if adapter.kind_ == "regression" else [0, 0]
    with contextlib.suppress(AdaptationFailed):
        adapter.adapt([[0.0] * features, [1.0] * features], warm_y)
    with contextlib.suppress(AdaptationFailed):  # and the continued fit (Adam's first step)
        adapter.fit([[float(i % 2)] * features for i in range(12)], warm_y * 6, max_steps=2,
                    max_seconds=1.0)
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    write_frame(proto_out, {"type": "ready", "device": device, "device_name": name,
                            "pid": os.getpid(), "cpu_threads": torch.get_num_threads()})
    while True:
        try:
            header, arrays = read_frame(proto_in)
        except WireError:
            return 0
        if header.get("type") == "stop":
            return 0
        started = time.perf_counter()
        # The daemon times a job from here, not from when it was queued behind others.
        write_frame(proto_out, {"type": "started", "id": header.get("id")})
        reply = {"type": "result", "id": header.get("id")}
        out = {}
        try:
            init = {k[len("init/"):]: v for k, v in arrays.items() if k.startswith("init/")} or None
            if header.get("type") == "fit":
                options = header.get("options") or {}
                result = adapter.fit(arrays["support_x"], arrays["support_y"], init=init,
                                     **{k: options[k] for k in FIT_OPTIONS if k in options})
            else:
                result = adapter.adapt(arrays["support_x"], arrays["support_y"],
                                       steps=header.get("steps"), init=init)
            reply.update(ok=True, losses=result.support_losses, steps=result.steps,
                         start=result.start, validation_loss=result.validation_loss,
                         budget_steps=result.budget_steps,
                         budget_exhausted=result.budget_exhausted)
            out = result.weights
        except AdaptationFailed as exc:
            reply.update(ok=False, error=str(exc), reason="diverged")
        except Exception as exc:  # noqa: BLE001 - report, never die on one bad request
            traceback.print_exc()
            reply.update(ok=False, error=f"{type(exc).__name__}: {exc}", reason="error")
        reply["seconds"] = time.perf_counter() - started
        write_frame(proto_out, reply, out)


if __name__ == "__main__":
    raise SystemExit(main())
