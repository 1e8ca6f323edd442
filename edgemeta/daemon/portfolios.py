"""The daemon's portfolios: one per stream when ``[portfolio] enabled``, built from the config."""

from __future__ import annotations

from edgemeta.bundle_format import BundleInfo
from edgemeta.config import Settings
from edgemeta.portfolio.portfolio import Portfolio


def build_portfolios(settings: Settings, bundle: BundleInfo) -> dict[str, Portfolio]:
    p = settings.portfolio
    if not p.enabled:
        return {}
    params = {"linear": {"forgetting": p.linear_forgetting},
              "knn": {"k": p.knn_k, "window": p.knn_window},
              "knn_recent": {"k": p.knn_k, "window": p.knn_recent_window},
              "knn_short": {"k": p.knn_k, "window": p.knn_short_window}}
    outputs = 1 if bundle.kind == "regression" else bundle.outputs
    # The members' predictions of rows waiting for a delayed label are held like the label
    # cache's rows: at most as many, and within its byte budget (about 8 bytes per member and
    # output, plus a key and a dict slot).
    entry = 8 * (len(p.experts) + 1) * outputs + 200
    pending = max(1, min(settings.ingest.label_cache, settings.ingest.label_cache_bytes // entry))
    return {s.name: Portfolio(bundle.kind, outputs, tuple(p.experts), eta=p.eta,
                              sharing=p.sharing, onnx_prior=p.onnx_prior, pending=pending,
                              expert_params=params)
            for s in settings.streams}
