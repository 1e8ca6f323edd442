"""Every parser either parses or raises its one error type with a reason, whatever the bytes.

Property-based: hypothesis feeds arbitrary bytes and, more usefully, near-valid inputs (a valid
file with bytes changed, inserted or cut, pathological lines) to each parser. 1,000 examples per
parser here; ``edgemeta bench chaos`` runs more.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgemeta.config import ConfigError, StreamSettings, load_config
from edgemeta.daemon.triggers import REASONS as TRIGGER_REASONS
from edgemeta.daemon.triggers import TriggerRejected, parse_trigger_bytes
from edgemeta.stream.parsing import (
    REASONS,
    ROW_REASONS,
    IngestError,
    Limits,
    parse_labels_bytes,
    parse_rows_bytes,
)

EXAMPLES = settings(max_examples=1000, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
STREAM = StreamSettings("s", ["x", "z"], label="y", id="id")
LIMITS = Limits(max_file_bytes=1 << 16, max_line_bytes=4096, max_depth=16, max_npz_members=8)

VALID_CSV = b"id,x,z,y\n1,0.5,1.5,2\n2,-1e3,3,0.25\n"
VALID_JSONL = b'{"id": 1, "x": 0.5, "z": 1, "y": 2}\n{"id": "b", "x": 1e-3, "z": -2, "y": 0}\n'
VALID_LABELS = b"id,label\n1,0.5\n2,1\n"
PATHOLOGICAL = [b"[" * 5000, b"9" * 5000, b'"' + b"a" * 9000 + b'"', b"\xef\xbb\xbf", b"\x00",
                b"\r", b"\n" * 50, b"NaN", b"-Infinity", b"1e999", b"\xff\xfe", b",,,,", b'{"x":{}}']


def mutated(valid: bytes) -> st.SearchStrategy[bytes]:
    """A valid file with a random slice replaced by random or pathological bytes."""
    return st.tuples(st.integers(0, len(valid)), st.integers(0, 20),
                     st.one_of(st.binary(max_size=40), st.sampled_from(PATHOLOGICAL))).map(
        lambda t: valid[:t[0]] + t[2] + valid[t[0] + t[1]:])


def inputs(valid: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=300), mutated(valid), mutated(valid).flatmap(mutated))


def check_rows(data: bytes, name: str, classes: int | None = None) -> None:
    try:
        rows = parse_rows_bytes(data, name, STREAM, LIMITS, classes)
    except IngestError as exc:
        assert exc.reason in REASONS and str(exc)
        return
    # What parses is usable as it stands: finite float32 features, one id per row in file order.
    assert rows.x.dtype == np.float32 and np.isfinite(rows.x).all()
    assert rows.x.shape == (len(rows.ids), 2)
    assert len(rows.all_ids) == len(rows.ids) + len(rows.refused)
    assert all(r.reason in ROW_REASONS and r.message for r in rows.refused.values())
    if rows.y is not None:
        assert len(rows.y) == len(rows.ids) and np.isfinite(rows.y).all()


@EXAMPLES
@given(inputs(VALID_CSV))
def test_any_bytes_as_csv_parse_or_raise_an_ingest_error(data):
    check_rows(data, "f.csv")


@EXAMPLES
@given(inputs(VALID_JSONL))
def test_any_bytes_as_jsonl_parse_or_raise_an_ingest_error(data):
    check_rows(data, "f.jsonl", classes=3)


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


VALID_NPZ = _npz({"id": np.arange(3), "x": np.ones(3), "z": np.zeros(3, np.float32),
                  "y": np.array([1.0, 2.0, 3.0])})
npz_arrays = st.dictionaries(
    st.sampled_from(["id", "x", "z", "y", "w"]),
    st.one_of(
        st.builds(lambda n, d: np.zeros(n, d), st.integers(0, 5),
                  st.sampled_from([np.float32, np.float64, np.int8, np.uint64, np.bool_,
                                   np.complex64, "U3", "S2", "M8[s]"])),
        st.builds(np.float64, st.floats(allow_nan=True)),  # 0-d
        st.builds(lambda n: np.zeros((n, 2)), st.integers(0, 3)),
        st.just(np.array([np.inf, np.nan, 1e300]))),
    min_size=0, max_size=5)


@EXAMPLES
@given(st.one_of(npz_arrays.map(_npz), mutated(VALID_NPZ), st.binary(max_size=200)))
def test_any_bytes_as_npz_parse_or_raise_an_ingest_error(data):
    check_rows(data, "f.npz", classes=4)


def test_an_npz_header_claiming_a_huge_shape_is_refused_before_reading():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for key in ("id", "x", "z"):
            header = {"descr": "<f8", "fortran_order": False, "shape": (10**15,)}
            body = io.BytesIO()
            np.lib.format.write_array_header_1_0(body, header)
            zf.writestr(f"{key}.npy", body.getvalue() + b"\0" * 64)
    with pytest.raises(IngestError) as err:
        parse_rows_bytes(buf.getvalue(), "huge.npz", STREAM, LIMITS)
    assert err.value.reason == "too_large"


def test_an_npz_with_too_many_members_is_refused():
    data = _npz({f"a{i}": np.zeros(1) for i in range(LIMITS.max_npz_members + 1)})
    with pytest.raises(IngestError) as err:
        parse_rows_bytes(data, "many.npz", STREAM, LIMITS)
    assert err.value.reason == "too_large"


@EXAMPLES
@given(inputs(VALID_LABELS))
def test_any_bytes_as_a_label_file_parse_or_raise_an_ingest_error(data):
    name = "f.labels.csv" if data[:2] != b"{" else "f.labels.jsonl"
    try:
        labels, refused = parse_labels_bytes(data, name, LIMITS, classes=2)
    except IngestError as exc:
        assert exc.reason in REASONS
        return
    assert all(np.isfinite(v) and v in (0, 1) for _, v in labels)
    assert all(isinstance(k, str) and r.reason in ROW_REASONS for k, r in refused.items())


VALID_TRIGGER = b'{"stream": "s", "support": "s/f.csv"}'


@EXAMPLES
@given(inputs(VALID_TRIGGER), st.sampled_from(["adapt", "rollback", "reload", "x"]))
def test_any_bytes_as_a_trigger_are_accepted_or_rejected_with_a_reason(tmp_path_factory, data, cmd):
    state = tmp_path_factory.getbasetemp() / "trigger-state"
    (state / "inbox" / "s").mkdir(parents=True, exist_ok=True)
    try:
        trigger = parse_trigger_bytes(data, Path(f"{cmd}.json"), state, ["s"])
    except TriggerRejected as exc:
        assert exc.reason in TRIGGER_REASONS
        return
    assert trigger.command == cmd


VALID_CONFIG = b"""[bundle]
path = "/b"
[state]
dir = "/s"
[drift]
delta = 0.002
[adaptation]
refine = [40]
[[streams]]
name = "s"
features = ["x"]
label = "y"
"""


@EXAMPLES
@given(inputs(VALID_CONFIG))
def test_any_bytes_as_a_config_file_load_or_raise_a_config_error(tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / "fuzz.toml"
    path.write_bytes(data)
    try:
        load_config(path)
    except ConfigError as exc:
        assert str(exc).startswith(str(path))
