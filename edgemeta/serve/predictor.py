"""The live ONNX session and its atomic swap.

A prediction takes one reference to the live (session, version) pair and uses only that, so a call
already running finishes on the old session while calls after the swap see the new one; a
half-installed model is never visible because the pair is replaced by a single reference store
after the new session has been created and warmed up. The old session is freed by reference
counting as soon as the last call using it returns.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from edgemeta.serve.providers import create_session, select_providers

log = logging.getLogger("edgemeta.predictor")


class PredictorError(RuntimeError):
    """No model is being served, or a model was refused at swap time."""


@dataclass(frozen=True)
class Live:
    session: ort.InferenceSession
    version: int
    input_name: str
    output_name: str
    provider: str


class Predictor:
    """Thread-safe ``predict``; ``swap`` installs a new model without dropping a call."""

    def __init__(self, providers: Sequence[str] | None = None, intra_op_threads: int = 0):
        self.providers = select_providers(providers)
        self.intra_op_threads = intra_op_threads
        self._live: Live | None = None
        self._swap_lock = threading.Lock()

    def _options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        if self.intra_op_threads:
            options.intra_op_num_threads = self.intra_op_threads
        options.log_severity_level = 3
        return options

    def load(self, model: bytes, version: int) -> Live:
        """Create and warm up a session for ``model`` without installing it."""
        session = create_session(model, self.providers, self._options())
        got = session.get_providers()[0]
        if got != self.providers[0] and got in self.providers:
            # A GPU provider that failed once will fail again: pin what works so later swaps do
            # not pay (and log) the failed initialisation every time.
            self.providers = self.providers[self.providers.index(got):]
        inp, out = session.get_inputs()[0], session.get_outputs()[0]
        width = inp.shape[-1] if isinstance(inp.shape[-1], int) else 1
        session.run([out.name], {inp.name: np.zeros((1, width), dtype=np.float32)})
        return Live(session, version, inp.name, out.name, session.get_providers()[0])

    def swap(self, model: bytes, version: int) -> Live:
        """Install ``model`` as ``version``; a model that fails to load leaves the old one serving."""
        try:
            live = self.load(model, version)
        except Exception as exc:
            raise PredictorError(f"version {version} refused: {exc}") from exc
        return self.install(live)

    def install(self, live: Live) -> Live:
        """Make an already loaded and warmed session live (the gate loads it once, then installs)."""
        version = live.version
        with self._swap_lock:
            previous, self._live = self._live, live
        if previous is None or previous.provider != live.provider:
            log.info("serving version %d on %s", version, live.provider)
        return live

    @property
    def version(self) -> int | None:
        live = self._live
        return live.version if live else None

    @property
    def provider(self) -> str | None:
        live = self._live
        return live.provider if live else None

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, int]:
        """Outputs for ``batch`` [N, features] and the version that produced them."""
        live = self._live
        if live is None:
            raise PredictorError("no model is being served yet")
        return run(live, batch), live.version

    @property
    def live(self) -> Live | None:
        """The serving (session, version) pair, e.g. to keep the replaced one for a rollback."""
        return self._live


def run(live: Live, batch: np.ndarray) -> np.ndarray:
    """Outputs of one loaded model (served or not) for ``batch`` [N, features]."""
    x = np.asarray(batch, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    return live.session.run([live.output_name], {live.input_name: x})[0]
