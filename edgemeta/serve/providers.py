"""Execution-provider choice: TensorRT, CUDA, then CPU, whichever really works here.

A GPU build of onnxruntime lists CUDA even on a machine without a GPU; whether a provider works is
only known once a session is created with it, so :func:`create_session` checks what the session
actually got and falls back to CPU with a warning.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence

import onnxruntime as ort

log = logging.getLogger("edgemeta.providers")

PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
CPU = "CPUExecutionProvider"

# onnxruntime does not support creating sessions concurrently: one at a time, process-wide.
_CREATE_LOCK = threading.Lock()


class ProviderError(ValueError):
    """An explicitly configured provider this onnxruntime build does not know."""


def gpu_present() -> bool:
    return any(os.path.exists(p) for p in ("/dev/nvidia0", "/dev/nvhost-ctrl-gpu", "/dev/nvgpu"))


def select_providers(requested: Sequence[str] | None = None) -> list[str]:
    available = ort.get_available_providers()
    if requested:
        unknown = [p for p in requested if p not in available]
        if unknown:
            raise ProviderError(f"serving.providers: {unknown} not offered by this onnxruntime "
                                f"build (available: {available})")
        chosen = list(requested)
    else:
        # A GPU build lists its GPU providers even where no GPU exists; only try them where the
        # device nodes of a discrete NVIDIA GPU or a Jetson are present.
        gpu = gpu_present()
        chosen = [p for p in PREFERENCE if p in available and (gpu or p == CPU)]
    if CPU not in chosen:
        chosen.append(CPU)
    return chosen


def create_session(model: bytes, providers: Sequence[str],
                   options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    """A session on the first provider that initialises; CPU (with a warning) when none does."""
    with _CREATE_LOCK:
        try:
            session = ort.InferenceSession(model, sess_options=options, providers=list(providers))
        except Exception as exc:  # onnxruntime raises several types for a broken GPU stack
            if list(providers) == [CPU]:
                raise
            log.warning("providers %s failed to initialise (%s); falling back to CPU",
                        list(providers), exc)
            return ort.InferenceSession(model, sess_options=options, providers=[CPU])
    got = session.get_providers()[0]
    if got != providers[0]:
        log.warning("provider %s did not initialise; serving on %s", providers[0], got)
    return session
