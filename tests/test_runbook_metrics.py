"""Every metric the operator's guide and the alert rules name is one a real scrape shows."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from edgemeta.config import load_config
from edgemeta.daemon.metrics import Metrics
from edgemeta.daemon.runtime import Daemon
from tests.conftest import counter, feed, run_until, write_config

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "docs" / "operations.md", *sorted((ROOT / "deploy" / "prometheus").glob("*.yml"))]


def named_metrics() -> dict[str, set[str]]:
    """Metric name -> the documents naming it (histogram/counter sample suffixes folded in)."""
    names: dict[str, set[str]] = {}
    for path in DOCUMENTS:
        for name in re.findall(r"\bedgemeta_[a-z_]+[a-z]", path.read_text()):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            names.setdefault(base, set()).add(path.name)
    return names


def scrape(port: int) -> dict[str, list]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(family.name, []).append(sample)
            samples.setdefault(sample.name, []).append(sample)
    return samples


def test_the_runbook_names_only_metrics_that_a_scrape_shows_and_inline_labels_count(
        tmp_path, sinusoid_bundle):
    cfg = write_config(tmp_path, sinusoid_bundle.path)
    daemon = Daemon(load_config(cfg), metrics=Metrics())
    daemon.setup()
    try:
        assert daemon.adapter.wait_ready(120)
        feed(daemon, "a", 1.0, 0.0, 4)  # labels inline in the data files
        assert run_until(daemon, lambda: counter(daemon, "edgemeta_files_total", stream="sine",
                                                 result="processed") >= 4, timeout=30)
        samples = scrape(daemon.settings.metrics.port)
    finally:
        daemon.shutdown(drain_s=0.5)
    missing = {name: docs for name, docs in named_metrics().items()
               if name not in samples and name.removesuffix("_total") not in samples}
    assert not missing, f"named in the docs but absent from a real scrape: {missing}"
    inline = [s for s in samples["edgemeta_labels_total"]
              if s.labels == {"stream": "sine", "result": "inline"}]
    assert inline and inline[0].value == 200  # "edgemeta_labels_total must rise" holds for inline labels
