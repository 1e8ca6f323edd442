"""A stream's parts built from the settings in force, and what a reload rebuilds of them.

Why a module of its own: a reload diffs the settings (as gunicorn's does) and rebuilds only
what a changed key shapes, so a detector keeps its baseline, a collection its rows and a regime
its count unless their own settings changed. Which keys shape which part is written once, here.
"""

from __future__ import annotations

from edgemeta.bundle_format import BundleInfo
from edgemeta.config import Settings
from edgemeta.daemon import lifecycle as lc
from edgemeta.daemon.models import ServedModels
from edgemeta.daemon.stream_state import StreamState
from edgemeta.stream.buffers import SupportCollector
from edgemeta.stream.drift import DriftMonitor
from edgemeta.stream.regime import RegimeBuffer
from edgemeta.stream.trivial import TrivialCheck

# The settings a support collector is built from (a change rebuilds and reopens collections).
COLLECTOR_KEYS = ("adaptation.support_size", "adaptation.holdout_size", "adaptation.selection",
                  "adaptation.window")


def policy(settings: Settings) -> lc.Policy:
    a, g = settings.adaptation, settings.gate
    return lc.Policy(early_rows=g.early_rows or None, refine=tuple(a.refine), retries=a.retries,
                     adapt_on_start=a.adapt_on_start)


class StreamParts:
    """Builds each stream's detector, collector, regime and trivial check; ``settings`` is
    replaced on a reload."""

    def __init__(self, settings: Settings, bundle: BundleInfo, models: ServedModels):
        self.settings = settings
        self.bundle = bundle
        self.models = models

    def fresh(self, name: str) -> StreamState:
        return StreamState(name, self.models.lineage_of[name], self.monitor(name),
                           self.collector(), lc.Lifecycle(policy(self.settings)), self.regime(),
                           self.trivial())

    def monitor(self, name: str) -> DriftMonitor:
        d = self.settings.drift
        return DriftMonitor(d.detector, self.bundle.kind, d.delta, d.feature_detector,
                            d.cooldown_samples, d.min_samples,
                            n_features=len(self.settings.stream(name).features))

    def collector(self) -> SupportCollector:
        a = self.settings.adaptation
        return SupportCollector(a.support_size, a.holdout_size, a.selection, a.window,
                                self.bundle.classes or 0)

    def regime(self) -> RegimeBuffer:
        c = self.settings.continual
        return RegimeBuffer(c.window, c.every, c.growth,
                            min_holdout=self.settings.adaptation.holdout_size,
                            max_every=c.max_every)

    def trivial(self) -> TrivialCheck:
        return TrivialCheck(self.bundle.kind, self.bundle.outputs,
                            threshold=self.settings.drift.trivial_threshold)

    def rebuild(self, state: StreamState, changed: list[str]) -> bool:
        """Rebuild what the ``changed`` keys shape of ``state``; True when its collector was
        rebuilt (an open collection must then be reopened)."""
        if any(k.startswith("drift.") for k in changed):
            state.monitor = self.monitor(state.name)
            state.trivial = self.trivial()
        if any(k.startswith("continual.") or k == "adaptation.holdout_size" for k in changed):
            old, state.regime = state.regime, self.regime()
            state.regime.restart(old.rows())
        state.machine.policy = policy(self.settings)
        if any(k in COLLECTOR_KEYS for k in changed):
            state.collector = self.collector()
            return True
        return False
