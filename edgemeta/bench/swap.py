"""``edgemeta bench swap`` and ``edgemeta bench serve``: hot-swap and serving-cost figures.

Each figure is compared with its alternative in the same run (weight patch vs full re-export,
steady-state vs during-swap latency, onnxruntime vs torch eager) because the machines are noisy.
"""

from __future__ import annotations

import io
import json
import logging
import platform
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgemeta.meta.models import MLP
from edgemeta.serve.onnx_weights import OnnxTemplate
from edgemeta.serve.predictor import Predictor

MODELS = {"reference": (1, [40, 40], 1), "large": (64, [1024, 896], 1)}


def _export(model: torch.nn.Module, features: int, exporter: str = "torchscript") -> bytes:
    """Re-export: ``dynamo`` is torch's default exporter, ``torchscript`` the legacy one."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            program = torch.onnx.export(model.eval(), (torch.zeros(2, features),), dynamo=True,
                                        input_names=["x"], output_names=["y"], verbose=False,
                                        dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
            return program.model_proto.SerializeToString()
        torch.onnx.export(model.eval(), (torch.zeros(2, features),), buf, dynamo=False,
                          do_constant_folding=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17)
    return buf.getvalue()


def _build(name: str) -> tuple[torch.nn.Module, OnnxTemplate, int]:
    torch.manual_seed(0)
    features, hidden, out = MODELS[name]
    model = MLP(features, out, hidden)
    names = [n for n, _ in model.named_parameters()]
    return model, OnnxTemplate(_export(model, features), names), features


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _pct(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples) * 1e3, q))


def _variants(template: OnnxTemplate, count: int) -> list[dict[str, np.ndarray]]:
    base = template.weights()
    rng = np.random.default_rng(0)
    return [{n: (w + rng.normal(0, 1e-3, w.shape)).astype(w.dtype) for n, w in base.items()}
            for _ in range(count)]


def swap_latency(name: str, swaps: int, exports: int, default_exports: int) -> dict[str, Any]:
    model, template, features = _build(name)
    predictor = Predictor(["CPUExecutionProvider"], intra_op_threads=1)
    weights = _variants(template, 8)
    patch_t = []
    for i in range(swaps):
        t0 = time.perf_counter()
        predictor.swap(template.patch(weights[i % 8]), i + 1)
        patch_t.append(time.perf_counter() - t0)
    row: dict[str, Any] = {"model": name, "parameters": int(sum(w.size for w in weights[0].values())),
                           "swaps": swaps,
                           "patch_swap_ms": {"p50": _pct(patch_t, 50), "p99": _pct(patch_t, 99)}}
    _export(model, features, "dynamo")  # first call pays one-off import and tracing set-up
    for exporter, count in (("dynamo", default_exports), ("torchscript", exports)):
        export_t = []
        for i in range(count):
            model.load_state_dict({n: torch.from_numpy(w) for n, w in weights[i % 8].items()})
            t0 = time.perf_counter()
            predictor.swap(_export(model, features, exporter), swaps + i + 1)
            export_t.append(time.perf_counter() - t0)
        row[f"reexport_{exporter}_swap_ms"] = {"runs": count, "p50": _pct(export_t, 50),
                                               "p99": _pct(export_t, 99)}
        row[f"speedup_vs_{exporter}_p50"] = _pct(export_t, 50) / _pct(patch_t, 50)
    return row


def swap_under_load(swaps: int, threads: int = 3, steady_seconds: float = 3.0) -> dict[str, Any]:
    _, template, features = _build("reference")
    x = np.linspace(-4, 4, 8, dtype=np.float32).reshape(-1, features)
    base = template.weights()
    versions = {}
    predictor = Predictor(["CPUExecutionProvider"], intra_op_threads=1)
    reference = None
    n_models = 50
    for v in range(n_models):
        w = dict(base)
        w["head.bias"] = base["head.bias"] + np.float32(v)
        versions[v] = template.patch(w)
    predictor.swap(versions[0], 0)
    reference = predictor.predict(x)[0]
    stop = threading.Event()
    phase = ["steady"]
    lat: dict[str, list[float]] = {"steady": [], "swapping": []}
    errors: list[str] = []
    mismatches = [0]

    def client() -> None:
        while not stop.is_set():
            current = phase[0]
            t0 = time.perf_counter()
            try:
                y, v = predictor.predict(x)
            except Exception as exc:  # noqa: BLE001 - every failure counts
                errors.append(repr(exc))
                continue
            lat[current].append(time.perf_counter() - t0)
            if not np.allclose(y - reference, v % n_models, atol=1e-4):
                mismatches[0] += 1

    pool = [threading.Thread(target=client) for _ in range(threads)]
    for t in pool:
        t.start()
    time.sleep(steady_seconds)
    phase[0] = "swapping"
    t0 = time.perf_counter()
    for i in range(1, swaps + 1):
        predictor.swap(versions[i % n_models], i)
    swap_seconds = time.perf_counter() - t0
    stop.set()
    for t in pool:
        t.join()
    return {"threads": threads, "swaps": swaps, "swap_seconds": swap_seconds,
            "errors": len(errors), "mismatched_answers": mismatches[0],
            "answers": len(lat["steady"]) + len(lat["swapping"]),
            "steady_p99_ms": _pct(lat["steady"], 99), "swapping_p99_ms": _pct(lat["swapping"], 99),
            "p99_ratio": _pct(lat["swapping"], 99) / _pct(lat["steady"], 99)}


def swap_memory(swaps: int) -> dict[str, Any]:
    _, template, _ = _build("reference")
    predictor = Predictor(["CPUExecutionProvider"], intra_op_threads=1)
    weights = _variants(template, 8)
    rss = {}
    for i in range(1, swaps + 1):
        predictor.swap(template.patch(weights[i % 8]), i)
        if i in (100, swaps):
            rss[i] = _rss_mb()
    return {"swaps": swaps, "rss_mb_after_100": rss[100], f"rss_mb_after_{swaps}": rss[swaps],
            "growth": rss[swaps] / rss[100] - 1}


def serve_cost(repeats: int = 2000) -> dict[str, Any]:
    rows = {}
    torch.set_num_threads(1)
    for name in MODELS:
        model, template, features = _build(name)
        predictor = Predictor(["CPUExecutionProvider"], intra_op_threads=1)
        predictor.swap(template.patch(template.weights()), 1)
        for batch in (1, 256):
            x = np.random.default_rng(0).normal(size=(batch, features)).astype(np.float32)
            xt = torch.from_numpy(x)
            n = repeats if batch == 1 else max(repeats // 20, 20)
            timings = {}
            for label, fn in (("onnxruntime", lambda x=x, p=predictor: p.predict(x)),
                              ("torch_eager", lambda xt=xt, m=model: m(xt))):
                with torch.no_grad():
                    for _ in range(20):
                        fn()
                    t0 = time.perf_counter()
                    for _ in range(n):
                        fn()
                timings[label] = (time.perf_counter() - t0) / n * 1e6
            rows[f"{name}_batch{batch}"] = {
                "onnxruntime_us": timings["onnxruntime"], "torch_eager_us": timings["torch_eager"],
                "speedup": timings["torch_eager"] / timings["onnxruntime"]}
    return rows


def _header() -> dict[str, Any]:
    return {"machine": f"{platform.node()} {platform.machine()}", "date": time.strftime("%Y-%m-%d"),
            "python": platform.python_version(), "torch": torch.__version__}


def run_swap(out: Path, quick: bool = False) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    scale = 10 if quick else 1
    report = _header()
    # Memory first, before the large model's allocations come and go and blur the RSS figures.
    report["memory"] = swap_memory(10_000 // scale)
    print(f"RSS after 100 swaps {report['memory']['rss_mb_after_100']:.1f} MB, growth to "
          f"{report['memory']['swaps']} swaps {report['memory']['growth'] * 100:+.2f}%")
    report["latency"] = [swap_latency("reference", 1000 // scale, 20 // scale or 2, 10 // scale or 2),
                         swap_latency("large", 200 // scale, 10 // scale or 2, 5 // scale or 2)]
    for row in report["latency"]:
        print(f"{row['model']} ({row['parameters']} params): patch+swap p50 "
              f"{row['patch_swap_ms']['p50']:.2f} ms; re-export+swap p50 with torch's default "
              f"exporter {row['reexport_dynamo_swap_ms']['p50']:.0f} ms "
              f"({row['speedup_vs_dynamo_p50']:.0f}x), with the legacy TorchScript exporter "
              f"{row['reexport_torchscript_swap_ms']['p50']:.1f} ms "
              f"({row['speedup_vs_torchscript_p50']:.1f}x)")
    report["under_load"] = swap_under_load(1000 // scale)
    u = report["under_load"]
    print(f"under load: {u['swaps']} swaps, {u['answers']} answers, {u['errors']} errors, "
          f"{u['mismatched_answers']} mismatched, p99 steady {u['steady_p99_ms']:.3f} ms, "
          f"during swaps {u['swapping_p99_ms']:.3f} ms ({u['p99_ratio']:.2f}x)")
    (out / "swap.json").write_text(json.dumps(report, indent=2))
    return report


def run_serve(out: Path, quick: bool = False) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    report = {**_header(), "cost": serve_cost(200 if quick else 2000)}
    for key, row in report["cost"].items():
        print(f"{key}: onnxruntime {row['onnxruntime_us']:.1f} us, torch eager "
              f"{row['torch_eager_us']:.1f} us, {row['speedup']:.2f}x")
    (out / "serve.json").write_text(json.dumps(report, indent=2))
    return report
