"""deploy/ and systemd/ checked by the real tools they are written for."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import MISSING_TOOL, drop_drifting_stream, free_port, sine_file, write_config

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "deploy" / "prometheus"
UNITS = ROOT / "systemd"


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{MISSING_TOOL}{tool} is not installed (.ci/run installs it: "
                    "apt-get install prometheus)")
    return path


# -- systemd ----------------------------------------------------------------------------------

def _unit_for_test(tmp_path: Path, *dropins: str) -> Path:
    """The shipped unit with ExecStart pointing at this interpreter, drop-ins appended."""
    text = (UNITS / "edgemeta@.service").read_text()
    text = text.replace("/opt/edgemeta/bin/edgemeta", f"{sys.executable} -m edgemeta")
    for name in dropins:
        text += "\n" + (UNITS / name).read_text()
    path = tmp_path / "edgemeta@.service"
    path.write_text(text)
    return path


def _exposure(unit: Path) -> float:
    out = subprocess.run([need("systemd-analyze"), "security", "--offline=true", str(unit)],
                         capture_output=True, text=True)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout + out.stderr)
    assert match, out.stdout + out.stderr
    return float(match.group(1))


def test_units_verify_cleanly(tmp_path):
    unit = _unit_for_test(tmp_path)
    out = subprocess.run([need("systemd-analyze"), "verify", str(unit)], capture_output=True,
                         text=True)
    assert out.returncode == 0 and "edgemeta@" not in out.stderr, out.stderr


def test_base_unit_exposure_is_at_most_1_5(tmp_path):
    assert _exposure(_unit_for_test(tmp_path)) <= 1.5


@pytest.mark.parametrize("dropin", ["gpu-nvidia.conf", "gpu-jetson.conf"])
def test_gpu_dropin_exposure_is_at_most_2_5(tmp_path, dropin):
    assert _exposure(_unit_for_test(tmp_path, dropin)) <= 2.5


def test_unit_keeps_the_contract():
    text = (UNITS / "edgemeta@.service").read_text()
    settings = dict(line.split("=", 1) for line in text.splitlines()
                    if "=" in line and not line.startswith("#"))
    assert settings["Type"] == "notify" and settings["NotifyAccess"] == "main"
    assert settings["KillMode"] == "mixed" and settings["Restart"] == "on-failure"
    assert "/etc/edgemeta/%i.toml" in settings["ExecStart"]
    assert "MemoryDenyWriteExecute" not in settings  # breaks PyTorch kernels and libffi


# -- Prometheus rules -------------------------------------------------------------------------

def test_rules_pass_promtool_check_and_unit_tests():
    promtool = need("promtool")
    check = subprocess.run([promtool, "check", "rules", "edgemeta.rules.yml"], cwd=PROM,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run([promtool, "test", "rules", "edgemeta.rules.test.yml"], cwd=PROM,
                          capture_output=True, text=True)
    assert test.returncode == 0, test.stdout + test.stderr


def test_every_alert_has_summary_description_runbook_and_is_unit_tested():
    rules = yaml.safe_load((PROM / "edgemeta.rules.yml").read_text())["groups"][0]["rules"]
    tests = (PROM / "edgemeta.rules.test.yml").read_text()
    operations = (ROOT / "docs" / "operations.md").read_text().lower()
    for rule in rules:
        ann = rule["annotations"]
        assert ann["summary"] and ann["description"], rule["alert"]
        anchor = ann["runbook_url"].split("#")[1]
        assert f"### {rule['alert'].lower()}" in operations, f"runbook entry for {anchor}"
        assert f"alertname: {rule['alert']}\n        exp_alerts: []" in tests, rule["alert"]
        assert re.search(rf"alertname: {rule['alert']}\n        exp_alerts:\n", tests), rule["alert"]



def test_the_unit_and_every_alert_link_to_the_runbook_the_install_puts_in_place():
    """Documentation= and runbook_url are absolute links to one file, and the operator's guide
    installs that file there; the documented rewrite for a docs host matches the shipped base."""
    unit = (UNITS / "edgemeta@.service").read_text()
    doc = re.search(r"^Documentation=file://(\S+)$", unit, re.M).group(1)
    operations = (ROOT / "docs" / "operations.md").read_text()
    installs = re.findall(r"^sudo install .*docs/operations\.md (\S+)$", operations, re.M)
    assert installs == [doc]
    rules = yaml.safe_load((PROM / "edgemeta.rules.yml").read_text())["groups"][0]["rules"]
    for rule in rules:
        assert rule["annotations"]["runbook_url"] == f"file://{doc}#{rule['alert'].lower()}"
    assert re.search(rf"^sed 's#file://{re.escape(doc)}#https://", operations, re.M)

# -- against a real scrape ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def scrape(tmp_path_factory, sinusoid_bundle):
    from edgemeta.config import load_config
    from edgemeta.daemon.metrics import Metrics
    from edgemeta.daemon.runtime import Daemon

    tmp = tmp_path_factory.mktemp("scrape")
    port = free_port()
    daemon = Daemon(load_config(write_config(tmp, sinusoid_bundle.path, metrics={"port": port})),
                    metrics=Metrics())
    daemon.setup()
    try:
        daemon.adapter.wait_ready(120)
        inbox = daemon.layout.dir("inbox", "sine")
        for i in range(3):
            sine_file(inbox, f"m{i}", 1.0, 0.0, seed=i)
        (inbox / "bad.csv").write_text("id,x,y\n1,oops,2\n")
        deadline = time.monotonic() + 10
        while any(inbox.iterdir()) and time.monotonic() < deadline:
            daemon.step()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            return resp.read().decode()
    finally:
        daemon.shutdown(drain_s=0.5)


def test_promtool_check_metrics_on_a_real_scrape_is_clean(scrape):
    out = subprocess.run([need("promtool"), "check", "metrics"], input=scrape, capture_output=True,
                         text=True)
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), \
        out.stdout + out.stderr


def _exported(scrape: str) -> set[str]:
    names = {line.split()[2] for line in scrape.splitlines() if line.startswith("# TYPE")}
    histograms = {line.split()[2] for line in scrape.splitlines()
                  if line.startswith("# TYPE") and line.split()[3] == "histogram"}
    return names | {f"{h}_{s}" for h in histograms for s in ("bucket", "sum", "count")}


def _referenced(expr: str) -> set[str]:
    return set(re.findall(r"\bedgemeta_[a-z_]+\b", expr))


def test_dashboard_and_alerts_only_name_metrics_the_daemon_exports(scrape):
    exported = _exported(scrape)
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/edgemeta.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"]]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    rules = yaml.safe_load((PROM / "edgemeta.rules.yml").read_text())["groups"][0]["rules"]
    exprs += [r["expr"] for r in rules]
    used = set().union(*(_referenced(e) for e in exprs))
    assert used, "no metric names found"
    assert used <= exported, sorted(used - exported)
    panels = {p["title"] for p in dashboard["panels"]}
    for needed in ("Stream error", "Adaptations by outcome", "Adaptation stage duration",
                   "Serving model version", "Inference latency", "Quarantined files",
                   "Portfolio: weight"):
        assert any(t.startswith(needed) for t in panels), needed


# -- a real Prometheus ------------------------------------------------------------------------

@pytest.mark.slow
def test_real_prometheus_sees_the_drift_alert_and_the_adaptation(tmp_path, sinusoid_bundle):
    prometheus = need("prometheus")
    port = free_port()
    cfg = write_config(tmp_path, sinusoid_bundle.path, metrics={"port": port})
    daemon = subprocess.Popen([sys.executable, "-m", "edgemeta", "run", "--config", str(cfg)],
                              cwd=ROOT, stderr=subprocess.DEVNULL)
    prom_port = free_port()
    prom_cfg = tmp_path / "prometheus.yml"
    prom_cfg.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(PROM / "edgemeta.rules.yml")],
        "scrape_configs": [{"job_name": "edgemeta",
                            "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}]}))
    prom = subprocess.Popen([prometheus, f"--config.file={prom_cfg}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def api(path: str, **params) -> dict:
        url = f"http://127.0.0.1:{prom_port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read())["data"]

    def wait(predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return
            except (OSError, IndexError, KeyError):  # not up yet, or no sample yet
                pass
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}")

    try:
        wait(lambda: api("query", query='up{job="edgemeta"}')["result"][0]["value"][1] == "1",
             90, "Prometheus to scrape the daemon")
        wait(lambda: api("query", query="edgemeta_adaptations_total")["result"], 30,
             "the zero-initialised counters")
        time.sleep(2)  # at least two scrapes of the zero values before anything happens
        inbox = tmp_path / "state" / "inbox" / "sine"
        drop_drifting_stream(inbox)
        wait(lambda: any(a["labels"]["alertname"] == "EdgemetaDriftDetected"
                         and a["state"] in ("pending", "firing") for a in api("alerts")["alerts"]),
             90, "the EdgemetaDriftDetected alert")
        wait(lambda: float(api("query", query='sum(edgemeta_adaptations_total{result="accepted"})')
                           ["result"][0]["value"][1]) >= 1, 60, "the adaptation counter to rise")
    finally:
        prom.terminate()
        daemon.terminate()
        prom.wait(timeout=20)
        daemon.wait(timeout=20)
