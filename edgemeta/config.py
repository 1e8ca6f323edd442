"""TOML config -> typed, validated settings; every error names the key.

A daemon that starts with a typo in its config fails later, at the worst time; so every key is
checked here, unknown keys are refused (they are almost always typos), and ``edgemeta config check``
prints the effective settings with the defaults filled in.

>>> s = parse_config({"bundle": {"path": "/b"}, "state": {"dir": "/s"},
...                   "streams": [{"name": "s1", "features": ["x"], "label": "y"}]})
>>> s.streams[0].format, s.drift.detector, s.metrics.port
('csv', 'auto', 9781)
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from edgemeta.portfolio.experts import DEFAULT_EXPERTS, EXPERTS

FORMATS = ("csv", "jsonl", "npz")
# "auto": a Bernoulli CUSUM on the 0/1 errors of a classifier, ADWIN on a regressor's squared
# errors (the fastest of each kind at <= 0.1 false alarms per 10k stable rows: `bench drift`).
ERROR_DETECTORS = ("auto", "adwin", "cusum", "ddm", "hddm_a", "hddm_w", "page_hinkley", "kswin")
BINARY_DETECTORS = ("cusum", "ddm", "hddm_a", "hddm_w")
FEATURE_DETECTORS = ("none", "adwin", "kswin")
# The detectors with a confidence parameter, and its tuned default (river's KSWIN and HDDM
# defaults alarm often on stable streams at the daemon's rates; these do not).
# "cusum": the alarm threshold is log(1 / delta), 10 nats.
CONFIDENCE_DEFAULTS = {"adwin": 0.002, "cusum": 4.54e-5, "hddm_a": 0.001, "hddm_w": 0.001,
                       "kswin": 1e-5}
# Keys an earlier release read, with what replaced them (a config that still sets one is refused
# with this advice rather than as a typo).
REMOVED = {"continual.budget_ms_per_row": "a continued fit's effort is counted in steps so that "
           "it does not depend on the machine's load: set continual.steps_per_row (and "
           "continual.max_seconds, the guard)"}
DEFAULT_PORT = 9781  # not in the Prometheus default-port allocations
_STREAM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ConfigError(ValueError):
    """A config the daemon refuses to start with; the message names the file and key."""


@dataclass
class StreamSettings:
    name: str
    features: list[str]
    label: str | None = None
    id: str | None = None
    format: str = "csv"
    # The model lineage serving this stream (default: its own). Streams that name the same
    # model share one: a drift on either adapts, swaps and rolls back the model of both.
    model: str | None = None


@dataclass
class DriftSettings:
    detector: str = "auto"  # error detector: auto (CUSUM for classifiers, ADWIN else), adwin, ...
    delta: float | None = None  # the detector's confidence; None: its tuned default
    feature_detector: str = "none"  # on unlabelled rows' features: none, adwin, kswin
    cooldown_samples: int = 50  # rows after an alarm or a swap before the next alarm
    min_samples: int = 30  # rows a fresh detector sees before it may alarm
    # The serving model against the trivial predictor (the recent labels' mean or class
    # frequencies): a paired t above this is an alarm of its own (stream/trivial.py); 0: off.
    trivial_threshold: float = 4.0


@dataclass
class AdaptationSettings:
    support_size: int = 10  # K: labelled rows the inner loop adapts on
    holdout_size: int = 20  # rows the gate judges on (never seen by the inner loop)
    steps: int | None = None  # inner steps per adaptation; None: the bundle's
    device: str = "auto"  # the worker's torch device: auto (cuda if present), cpu, cuda:N
    # The worker's torch threads on the CPU. 1: on a busy 2-core device, two threads that wait
    # on each other's barriers ran a continued fit 3-4x slower than one (idle: 20% faster).
    cpu_threads: int = 1
    timeout_s: float = 30.0  # a worker request running longer is killed (timed from its start)
    start_from: str = "meta-init"  # adapt from the meta-initialization or the current model
    selection: str = "recent"  # support rows: recent, or diverse (farthest points of a window)
    window: int = 100  # rows the diverse selection picks from
    adapt_on_start: bool = True  # adapt a bare meta-initialization on the first labels
    backfill: bool = True  # seed a drift collection with the rows since the change point
    retries: int = 2  # new collections after a drift episode is not accepted
    refine: list[int] = field(default_factory=lambda: [40, 100])  # larger supports after a swap


@dataclass
class ContinualSettings:
    """Learning on from every labelled row of the current regime (``stream/regime.py``)."""

    enabled: bool = True          # refit on the current regime's rows as they grow
    window: int = 2000            # rows of the current regime kept (the memory budget)
    every: int = 50               # at least this many new labelled rows between fits
    growth: float = 0.5           # ... and at least this share of the rows at the last fit
    max_every: int = 250          # ... but no more rows than this between fits
    max_steps: int = 300          # Adam steps per start, at most
    lr: float = 0.003  # Adam's learning rate in continued fits
    # Optimizer steps a fit may take per new row, over its starts (2: what the old 2 ms per row
    # bought on an idle 2-core machine, about 1 ms per Adam step of a 40x40 MLP).
    steps_per_row: float = 2.0
    # Guard: a fit still running this long stops with its best so far, and is counted (at most
    # 3/4 of adaptation.timeout_s, which kills the worker).
    max_seconds: float = 15.0


@dataclass
class MemorySettings:
    """Concept memory (``daemon/memory.py``): models of earlier regimes, recalled on recurrence."""

    capacity: int = 8   # remembered models per lineage (each keeps a loaded session); 0: off
    min_rows: int = 10  # labelled rows since the change point before a recall is judged


@dataclass
class GateSettings:
    alpha: float = 0.05     # false-accept rate of the paired test (a candidate no better passes)
    min_gain: float = 0.0   # optional effect-size floor: candidate <= current * (1 - min_gain)
    early_rows: int = 6  # holdout rows of the early look right after a drift; 0: none


@dataclass
class ServingSettings:
    providers: list[str] = field(default_factory=list)  # ONNX Runtime providers; []: the best
    intra_op_threads: int = 1  # ONNX Runtime threads per inference


@dataclass
class MetricsSettings:
    address: str = "127.0.0.1"  # where /metrics listens (loopback unless told)
    port: int = DEFAULT_PORT  # its TCP port
    enabled: bool = True  # serve /metrics at all


@dataclass
class IngestSettings:
    max_file_bytes: int = 64 * 1024 * 1024  # larger inputs are quarantined too_large
    max_line_bytes: int = 1024 * 1024  # longer CSV/JSONL lines are quarantined too_long
    max_json_depth: int = 32  # deeper JSON is quarantined too_deep
    max_npz_members: int = 64  # more arrays in an .npz are refused
    settle_s: float = 0.2  # an input is read once its size and mtime held still this long
    max_file_seconds: float = 5.0  # wall-clock guard per input: over it, quarantined too_slow
    rescan_interval_s: float = 5.0  # the inboxes are listed this often besides inotify
    label_cache: int = 100_000  # unlabelled rows kept for labels that come later
    label_cache_bytes: int = 64 * 1024 * 1024  # ... and at most this much memory


@dataclass
class RetentionSettings:
    keep_models: int = 10  # versions kept per lineage (>= 2: a rollback needs its target)
    keep_episodes: int = 1000  # episode records kept in episodes/
    # Labelled rows kept with an accepted episode after its swap, so `tasks harvest` can make a
    # task of it: None means the bundle's K (support + holdout + K rows). 0 keeps none.
    episode_after_rows: int | None = None  # rows kept after a swap; None: the bundle's K


@dataclass
class PortfolioSettings:
    """Online experts served beside the ONNX model, mixed by their live losses
    (``edgemeta/portfolio/``). The drift detector, the gate and probation keep judging the ONNX
    model's own error."""

    enabled: bool = True  # serve the mixture; false: the ONNX model alone, as before 2026-12
    experts: list[str] = field(  # linear, knn, knn_recent, knn_short; opt-in: arf, hat
        default_factory=lambda: list(DEFAULT_EXPERTS))
    sharing: float = 0.01  # Fixed-Share rate: the weight spread evenly after each row (switches)
    # how hard a loss moves the weights; unset: 1.0 per error (classifiers), 2.0 per
    # normalized squared error (regression)
    eta: float | None = None
    onnx_prior: float = 0.5  # least weight a freshly adapted ONNX model starts with
    linear_forgetting: float = 0.995  # linear expert: weight a row keeps per newer row
    knn_k: int = 5  # nearest-neighbour expert: neighbours averaged
    knn_window: int = 500  # nearest-neighbour expert: most recent labelled rows searched
    knn_recent_window: int = 100  # the second, short-memory nearest-neighbour expert's window
    knn_short_window: int = 20  # the third: the rows right after a switch


@dataclass
class Settings:
    bundle: Path
    state_dir: Path
    streams: list[StreamSettings]
    drift: DriftSettings = field(default_factory=DriftSettings)
    adaptation: AdaptationSettings = field(default_factory=AdaptationSettings)
    continual: ContinualSettings = field(default_factory=ContinualSettings)
    memory: MemorySettings = field(default_factory=MemorySettings)
    gate: GateSettings = field(default_factory=GateSettings)
    serving: ServingSettings = field(default_factory=ServingSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    ingest: IngestSettings = field(default_factory=IngestSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    portfolio: PortfolioSettings = field(default_factory=PortfolioSettings)
    source: Path | None = None
    # The "section.key"s the file set; the others are defaults, and some defaults follow the
    # bundle (:func:`fit_to_bundle`).
    given: frozenset[str] = frozenset()

    def stream(self, name: str) -> StreamSettings:
        for s in self.streams:
            if s.name == name:
                return s
        raise KeyError(name)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("given")
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in data.items()}


SECTIONS: dict[str, type] = {
    "drift": DriftSettings, "adaptation": AdaptationSettings, "continual": ContinualSettings,
    "memory": MemorySettings, "gate": GateSettings, "serving": ServingSettings,
    "metrics": MetricsSettings, "ingest": IngestSettings, "retention": RetentionSettings,
    "portfolio": PortfolioSettings}

#: Keys a reload (SIGHUP, ``trigger reload``) cannot apply: they shape the processes, sockets,
#: sessions or memory the daemon built at start-up. Every other key applies at once. A changed
#: key of these is logged as needing a restart and keeps its running value.
RESTART_KEYS = ("bundle.path", "state.dir", "streams", "adaptation.device", "adaptation.cpu_threads",
                "memory.capacity", "serving.*", "metrics.*", "ingest.label_cache", "ingest.label_cache_bytes",
                "portfolio.*")


def reloadable(key: str) -> bool:
    """Whether a reload applies ``key`` (``section.name``).

    >>> reloadable("gate.alpha"), reloadable("metrics.port"), reloadable("memory.capacity")
    (True, False, False)
    """
    section = key.split(".", 1)[0]
    return key not in RESTART_KEYS and f"{section}.*" not in RESTART_KEYS


@dataclass(frozen=True)
class SettingRecord:
    """One setting: its key, default, whether a reload applies it, and what it is for."""

    key: str
    default: Any
    reloadable: bool
    doc: str


def _field_comments(cls: type) -> dict[str, str]:
    """The ``# ...`` comment of each field in ``cls``'s source, trailing it or (for a longer one)
    in the lines right above it: the docs live beside the default they describe."""
    import inspect

    found, above = {}, []
    for line in inspect.getsource(cls).splitlines():
        comment = re.match(r"\s+#\s*(.*)$", line)
        if comment:
            above.append(comment.group(1).strip())
            continue
        m = re.match(r"\s+(\w+):[^#=]*=[^#]*(?:#\s*(.*))?$", line)
        if m and (m.group(2) or above):
            found[m.group(1)] = (m.group(2) or " ".join(above)).strip()
        above = []
    return found


def setting_records() -> list[SettingRecord]:
    """Every key of the config, in file order (what ``edgemeta config docs`` prints)."""
    records = [SettingRecord("bundle.path", None, False, "the bundle directory (required)"),
               SettingRecord("state.dir", None, False, "the state directory (required)"),
               SettingRecord("streams", None, False, "[[streams]] tables: name, features, "
                             "label, id, format, model")]
    for section, cls in SECTIONS.items():
        comments = _field_comments(cls)
        for f in fields(cls):
            default = f.default if f.default is not MISSING else f.default_factory()
            key = f"{section}.{f.name}"
            records.append(SettingRecord(key, default, reloadable(key), comments.get(f.name, "")))
    return records


def changed_keys(old: Settings, new: Settings) -> list[str]:
    """The keys whose values differ between two settings (``streams`` as one key)."""
    out = [key for key, a, b in (("bundle.path", old.bundle, new.bundle),
                                 ("state.dir", old.state_dir, new.state_dir),
                                 ("streams", old.streams, new.streams)) if a != b]
    for section in SECTIONS:
        a, b = getattr(old, section), getattr(new, section)
        out += [f"{section}.{f.name}" for f in fields(a)
                if getattr(a, f.name) != getattr(b, f.name)]
    return out


def _typed(section: str, cls, raw: Any):
    """Build dataclass ``cls`` from ``raw``, checking types and refusing unknown keys."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{section}: must be a table, got {type(raw).__name__}")
    known = {f.name: f for f in fields(cls)}
    for name in raw:
        if f"{section}.{name}" in REMOVED:
            raise ConfigError(f"{section}.{name}: no longer a setting; {REMOVED[f'{section}.{name}']}")
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"{section}.{unknown[0]}: unknown key (known: {', '.join(known)})")
    values = {}
    for name, value in raw.items():
        kind = known[name].type
        key = f"{section}.{name}"
        if "float" in kind and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        expected = {"int": int, "float": float, "str": str, "bool": bool}
        base = kind.split("|")[0].strip()
        if base.startswith("list"):
            item, noun = (int, "integers") if base == "list[int]" else (str, "strings")
            if not isinstance(value, list) or not all(
                    isinstance(v, item) and not isinstance(v, bool) for v in value):
                raise ConfigError(f"{key}: must be a list of {noun}, got {value!r}")
        elif base in expected and not (
                isinstance(value, expected[base]) and not (base != "bool" and isinstance(value, bool))):
            raise ConfigError(f"{key}: must be {base}, got {value!r}")
        values[name] = value
    try:
        return cls(**values)
    except TypeError as exc:
        missing = str(exc).split("argument")[-1].strip(": '")
        raise ConfigError(f"{section}.{missing}: required key is missing") from exc


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(options)}")


def parse_config(raw: dict[str, Any], source: Path | None = None) -> Settings:
    known = {"bundle", "state", "streams", *SECTIONS}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section (known: {', '.join(sorted(known))})")
    for key, sub in (("bundle", "path"), ("state", "dir")):
        if not isinstance(raw.get(key), dict) or not isinstance(raw[key].get(sub), str):
            raise ConfigError(f"{key}.{sub}: required (a path)")
        extra = sorted(set(raw[key]) - {sub})
        if extra:
            raise ConfigError(f"{key}.{extra[0]}: unknown key")
    base = source.parent if source else Path.cwd()
    streams_raw = raw.get("streams")
    if not isinstance(streams_raw, list) or not streams_raw:
        raise ConfigError("streams: at least one [[streams]] table is required")
    streams = [_typed(f"streams[{i}]", StreamSettings, s) for i, s in enumerate(streams_raw)]
    seen = set()
    for i, s in enumerate(streams):
        if not _STREAM_NAME.match(s.name):
            raise ConfigError(f"streams[{i}].name: {s.name!r} must be 1-64 of A-Z a-z 0-9 _ . -")
        if s.name in seen:
            raise ConfigError(f"streams[{i}].name: duplicate stream {s.name!r}")
        seen.add(s.name)
        _choice(f"streams[{i}].format", s.format, FORMATS)
        if s.model is not None and not _STREAM_NAME.match(s.model):
            raise ConfigError(f"streams[{i}].model: {s.model!r} must be 1-64 of A-Z a-z 0-9 _ . -")
        if not s.features:
            raise ConfigError(f"streams[{i}].features: list at least one feature column")
        clash = {s.label, s.id} & set(s.features) - {None}
        if clash:
            raise ConfigError(f"streams[{i}]: column {sorted(clash)[0]!r} is both a feature and "
                              "the label or id")
    settings = Settings(
        bundle=(base / raw["bundle"]["path"]).resolve(),
        state_dir=(base / raw["state"]["dir"]).resolve(),
        streams=streams,
        drift=_typed("drift", DriftSettings, raw.get("drift", {})),
        adaptation=_typed("adaptation", AdaptationSettings, raw.get("adaptation", {})),
        continual=_typed("continual", ContinualSettings, raw.get("continual", {})),
        memory=_typed("memory", MemorySettings, raw.get("memory", {})),
        gate=_typed("gate", GateSettings, raw.get("gate", {})),
        serving=_typed("serving", ServingSettings, raw.get("serving", {})),
        metrics=_typed("metrics", MetricsSettings, raw.get("metrics", {})),
        ingest=_typed("ingest", IngestSettings, raw.get("ingest", {})),
        retention=_typed("retention", RetentionSettings, raw.get("retention", {})),
        portfolio=_typed("portfolio", PortfolioSettings, raw.get("portfolio", {})),
        source=source,
        given=frozenset(f"{section}.{key}" for section in SECTIONS
                        for key in raw.get(section, {})))
    return validate(settings)


def validate(settings: Settings) -> Settings:
    """Every cross-key check; run again after :func:`fit_to_bundle` fills the bundle's shape."""
    _validate_drift(settings.drift)
    _validate_adaptation(settings.adaptation)
    _validate_continual(settings)
    _validate_evidence(settings)
    _validate_io(settings)
    _validate_portfolio(settings.portfolio)
    return settings


def _validate_drift(d: DriftSettings) -> None:
    _choice("drift.detector", d.detector, ERROR_DETECTORS)
    _choice("drift.feature_detector", d.feature_detector, FEATURE_DETECTORS)
    if d.delta is not None:
        if d.detector == "auto":
            raise ConfigError("drift.delta: name the detector too (drift.detector = \"adwin\" or "
                              "\"cusum\"): delta means a different thing for each")
        if d.detector not in CONFIDENCE_DEFAULTS:
            raise ConfigError(f"drift.delta: detector {d.detector!r} has no confidence parameter "
                              f"(delta applies to {', '.join(CONFIDENCE_DEFAULTS)}); remove the key")
        if not 0 < d.delta < 1:
            raise ConfigError(f"drift.delta: must be in (0, 1), got {d.delta!r}")
    _positive("drift.cooldown_samples", d.cooldown_samples, allow_zero=True)
    _positive("drift.min_samples", d.min_samples, allow_zero=True)
    _positive("drift.trivial_threshold", d.trivial_threshold, allow_zero=True)


def _validate_adaptation(a: AdaptationSettings) -> None:
    _positive("adaptation.support_size", a.support_size)
    _positive("adaptation.holdout_size", a.holdout_size)
    if a.steps is not None:
        _positive("adaptation.steps", a.steps)
    if any(k <= a.support_size for k in a.refine):  # _typed checked it is a list of integers
        raise ConfigError(f"adaptation.refine: a list of support sizes larger than support_size "
                          f"({a.support_size}), got {a.refine!r}")
    _positive("adaptation.retries", a.retries, allow_zero=True)
    _positive("adaptation.timeout_s", a.timeout_s)
    _positive("adaptation.cpu_threads", a.cpu_threads)
    _choice("adaptation.start_from", a.start_from, ("meta-init", "current"))
    _choice("adaptation.selection", a.selection, ("recent", "diverse"))
    if a.selection == "diverse" and a.window < a.support_size:
        raise ConfigError(f"adaptation.window: {a.window} is smaller than support_size {a.support_size}")
    if a.device not in ("auto", "cpu") and not a.device.startswith("cuda"):
        raise ConfigError(f"adaptation.device: use auto, cpu or cuda[:N], got {a.device!r}")


def _validate_continual(settings: Settings) -> None:
    a = settings.adaptation
    c = settings.continual
    for key in ("window", "every", "growth", "max_every", "max_steps", "lr", "steps_per_row",
                "max_seconds"):
        _positive(f"continual.{key}", getattr(c, key))
    if c.window < a.holdout_size + 10:
        raise ConfigError(f"continual.window: {c.window} rows cannot hold adaptation.holdout_size "
                          f"({a.holdout_size}) plus 10 rows to learn from")


def _validate_evidence(settings: Settings) -> None:
    """Concept memory and the gate: the tests a candidate or a recall must pass."""
    _positive("memory.capacity", settings.memory.capacity, allow_zero=True)
    # A recall is evidence like any candidate's: its paired test at gate.alpha / 2 (each of its
    # two looks gets half) must be able to pass with one row that got worse; on fewer rows only
    # a clean sweep passes, which a few lucky rows give as easily as a recurring regime.
    level, n = settings.gate.alpha / 2, settings.memory.min_rows
    if 2 * 0.5 ** n > level:
        least = math.ceil(math.log2(2 / level))
        raise ConfigError(f"memory.min_rows: on {n} rows a recall's paired test at gate.alpha / 2 "
                          f"= {level:g} passes only when every row improves; use at least {least}")
    _positive("gate.early_rows", settings.gate.early_rows, allow_zero=True)
    if settings.gate.early_rows >= settings.adaptation.holdout_size:
        raise ConfigError(f"gate.early_rows: {settings.gate.early_rows} must be smaller than "
                          f"adaptation.holdout_size ({settings.adaptation.holdout_size}), or 0")
    if not 0 < settings.gate.alpha <= 0.5:
        raise ConfigError(f"gate.alpha: must be in (0, 0.5], got {settings.gate.alpha}")
    if settings.gate.early_rows and 0.5 ** settings.gate.early_rows >= settings.gate.alpha:
        raise ConfigError(f"gate.early_rows: {settings.gate.early_rows} rows can never pass the "
                          f"paired test at gate.alpha = {settings.gate.alpha} and leave part of it "
                          f"for the full holdout (even winning every row gives p = "
                          f"0.5^{settings.gate.early_rows}); use more rows or 0")
    if not 0 <= settings.gate.min_gain < 1:
        raise ConfigError(f"gate.min_gain: must be in [0, 1), got {settings.gate.min_gain}")


def _validate_io(settings: Settings) -> None:
    """Metrics, ingest limits, retention and serving."""
    if not 0 < settings.metrics.port < 65536:
        raise ConfigError(f"metrics.port: {settings.metrics.port} is not a TCP port")
    _positive("ingest.max_file_bytes", settings.ingest.max_file_bytes)
    _positive("ingest.max_line_bytes", settings.ingest.max_line_bytes)
    _positive("ingest.max_json_depth", settings.ingest.max_json_depth)
    _positive("ingest.max_npz_members", settings.ingest.max_npz_members)
    _positive("ingest.label_cache_bytes", settings.ingest.label_cache_bytes)
    _positive("ingest.settle_s", settings.ingest.settle_s, allow_zero=True)
    _positive("ingest.max_file_seconds", settings.ingest.max_file_seconds)
    _positive("ingest.rescan_interval_s", settings.ingest.rescan_interval_s)
    _positive("ingest.label_cache", settings.ingest.label_cache)
    _positive("retention.keep_models", settings.retention.keep_models)
    if settings.retention.keep_models < 2:
        raise ConfigError(f"retention.keep_models: must be >= 2 (a rollback needs the version it "
                          f"returns to), got {settings.retention.keep_models}")
    if settings.retention.episode_after_rows is not None:
        _positive("retention.episode_after_rows", settings.retention.episode_after_rows,
                  allow_zero=True)
    _positive("serving.intra_op_threads", settings.serving.intra_op_threads, allow_zero=True)

def _validate_portfolio(p: PortfolioSettings) -> None:
    known = tuple(EXPERTS)
    for name in p.experts:
        if name not in known:
            raise ConfigError(f"portfolio.experts: unknown expert {name!r} (known: "
                              f"{', '.join(known)})")
    if len(set(p.experts)) != len(p.experts):
        raise ConfigError(f"portfolio.experts: each expert once, got {p.experts!r}")
    for key in ("sharing", "onnx_prior"):
        if not 0 < getattr(p, key) < 1:
            raise ConfigError(f"portfolio.{key}: must be in (0, 1), got {getattr(p, key)!r}")
    if not 0 < p.linear_forgetting <= 1:
        raise ConfigError(f"portfolio.linear_forgetting: must be in (0, 1], got "
                          f"{p.linear_forgetting!r}")
    if p.eta is not None:
        _positive("portfolio.eta", p.eta)
    _positive("portfolio.knn_k", p.knn_k)
    for key in ("knn_window", "knn_recent_window", "knn_short_window"):
        if getattr(p, key) < p.knn_k:
            raise ConfigError(f"portfolio.{key}: {getattr(p, key)} is smaller than knn_k "
                              f"{p.knn_k}")


def fit_to_bundle(settings: Settings, support_rows: int | None, query_rows: int | None
                  ) -> tuple[Settings, list[str]]:
    """The settings with the bundle's shape as the default, and warnings about a config that
    asks for less than the bundle was meta-trained on.

    An initialization meta-trained on K rows per task (K per class times the classes, for
    classification) expects about K rows to adapt on: ``adaptation.support_size`` defaults to
    that, and the gate's holdout to at least the bundle's query rows (never fewer than the usual
    20: the paired test needs them). Defaults that would then conflict (refinements no larger
    than the support, a diverse-selection window smaller than it) follow; a value the file set
    is kept and warned about instead.

    >>> s = parse_config({"bundle": {"path": "/b"}, "state": {"dir": "/s"},
    ...                   "streams": [{"name": "s", "features": ["x"], "label": "y"}]})
    >>> fitted, notes = fit_to_bundle(s, support_rows=50, query_rows=100)
    >>> fitted.adaptation.support_size, fitted.adaptation.holdout_size, fitted.adaptation.refine
    (50, 100, [100])
    """
    a = settings.adaptation
    given = settings.given
    notes: list[str] = []
    changes: dict[str, Any] = {}
    if support_rows:
        if "adaptation.support_size" not in given:
            changes["support_size"] = support_rows
        elif a.support_size < support_rows:
            notes.append(f"adaptation.support_size: {a.support_size} rows is fewer than the "
                         f"bundle was meta-trained to adapt on ({support_rows}); the adaptation "
                         f"may miss classes or fit noise (remove the key to use the bundle's)")
    if query_rows and "adaptation.holdout_size" not in given:
        changes["holdout_size"] = max(a.holdout_size, query_rows)
    k = changes.get("support_size", a.support_size)
    refine = [r for r in a.refine if r > k]
    if refine != a.refine:
        changes["refine"] = refine
        if "adaptation.refine" in given:
            notes.append(f"adaptation.refine: {[r for r in a.refine if r <= k]} not larger than "
                         f"the bundle's support of {k} rows; refining on {refine} only")
    if a.window < k:
        changes["window"] = 2 * k
        if "adaptation.window" in given and a.selection == "diverse":
            notes.append(f"adaptation.window: {a.window} rows cannot hold the bundle's support of "
                         f"{k}; using {2 * k}")
    if not changes:
        return settings, notes
    fitted = replace(settings, adaptation=replace(a, **changes))
    h = fitted.adaptation.holdout_size
    if "continual.window" not in given and fitted.continual.window < h + 10:
        fitted = replace(fitted, continual=replace(fitted.continual, window=10 * h))
    try:
        return validate(fitted), notes
    except ConfigError as exc:
        raise ConfigError(f"{exc} (with the bundle's support of {support_rows} rows and "
                          f"holdout of {h}; set adaptation.support_size to choose)") from exc


def load_config(path: str | Path) -> Settings:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such config file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{path}: not valid TOML: nested too deeply") from exc
    except (UnicodeDecodeError, OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    try:
        return parse_config(raw, path.resolve())
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
