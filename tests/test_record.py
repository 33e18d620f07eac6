"""The typed Record: one reading of a case line, built by case_record, read back from JSON of either
schema version with nothing lost, with one identity key, one shape key and its derived figures
from derived.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvmicro import InvalidCase
from kvmicro.derived import bytes_moved, derive, figures, overhead_pct
from kvmicro.harness.measure import Measurement
from kvmicro.harness.stats import Stats
from kvmicro.record import (
    SCHEMA_VERSION,
    SHAPE_FIELDS,
    Record,
    backend_label,
    case_key,
    peer_key,
    record_key,
    shape_key,
)
from kvmicro.results import case_record, read_results
from kvmicro.workload import Case

V1_FILE = Path(__file__).parent / "data" / "results-v1.jsonl"
CASE = Case(op="paged_sdpa", backend="native:cuda[priority=high]", batch=2, q_heads=8,
            kv_heads=2, head_dim=64, ctx=(37, 300), block_size=16, layout="HNSD",
            placement="random", dtype="float16", seed=3, scale=0.3)


def measurement(samples=(10.0, 10.5, 9.8, 10.1, 10.2, 9.9, 10.0, 10.3, 10.1, 10.0),
                cache=None) -> Measurement:
    return Measurement(samples_us=list(samples), stats=Stats.from_samples(list(samples)),
                       timer="graph", cache=cache or {"name": "hot", "bytes": 0, "pools": 1,
                                                      "cache_bytes": 1 << 20},
                       criterion={"name": "ci-median", "params": {}, "converged": True,
                                  "why_not": ""}, k=8, dropped=0, elapsed_s=0.5)


def ok_line(case: Case = CASE, **kw) -> dict:
    return case_record(case, status="ok", measurement=measurement(), device="GPU",
                       derived=derive(case, 10.0, 100.0), extra={"kernel": "split-kv x4"}, **kw)


def test_case_record_builds_a_record_and_returns_its_json():
    line = ok_line()
    rec = Record.from_json(line)
    assert rec.case == CASE and rec.ok and rec.timer == "graph" and rec.cache == "hot"
    assert rec.kernel == "split-kv x4" and rec.extra == {"kernel": "split-kv x4"}
    assert rec.to_json() == line
    assert line["schema_version"] == SCHEMA_VERSION == 2
    assert line["backend"] == "native:cuda" and line["options"] == {"priority": "high"}
    assert rec.label == backend_label(line) == "native:cuda[priority=high]"


def test_a_record_round_trips_through_a_json_line_unchanged():
    line = ok_line()
    again = json.loads(json.dumps(line))
    assert Record.from_json(again).to_json() == line
    skipped = case_record(CASE, status="skipped", reason="no GPU", timer="host", cache="hot")
    assert Record.from_json(json.loads(json.dumps(skipped))).to_json() == skipped


def test_every_version_1_line_reads_as_a_record_and_keeps_its_fields():
    runs, lines = read_results(V1_FILE)
    assert runs[0]["schema_version"] == 1 and len(lines) == 24
    for line in lines:
        rec = Record.from_json(line)
        assert rec.schema_version == 1 and rec.case.options == ()
        out = rec.to_json()
        assert out["schema_version"] == 2 and out["options"] == {}
        # additive: every version-1 field is still there with its value
        assert {k: v for k, v in out.items() if k in line and k != "schema_version"} == \
            {k: v for k, v in line.items() if k != "schema_version"}
        assert record_key(out) == record_key(line) == rec.key
    assert {r["status"] for r in lines} == {"ok", "skipped"}
    assert any(isinstance(r["ctx"], list) for r in lines)


def test_one_identity_key_for_dicts_records_and_cases():
    line = ok_line()
    rec = Record.from_json(line)
    assert rec.key == record_key(line) == record_key(rec) == case_key(CASE, "graph", "hot")
    other = ok_line(CASE.with_(options=()))
    assert record_key(other) != rec.key


def test_shape_key_pairs_an_op_with_its_contiguous_twin_measured_alike():
    line = ok_line()
    twin = ok_line(CASE.with_(op="sdpa_contiguous", layout="NSHD", placement="contiguous"))
    assert shape_key(line) == shape_key(twin) == Record.from_json(line).shape_key
    assert shape_key(line) == shape_key(CASE, "graph", "hot")
    assert shape_key(CASE, "graph", "hot") != shape_key(CASE, "graph", "cold:rotate")
    assert shape_key(line) != shape_key(ok_line(CASE.with_(options=())))
    assert shape_key(line) != shape_key(ok_line(CASE.with_(block_size=32)))
    assert "op" not in SHAPE_FIELDS and "layout" not in SHAPE_FIELDS


def test_peer_key_drops_only_the_backend():
    a = ok_line()
    b = ok_line(CASE.with_(backend="torch:cuda", options=()))
    assert peer_key(a) == peer_key(b) and record_key(a) != record_key(b)
    assert peer_key(a) != peer_key(ok_line(CASE.with_(layout="NSHD")))


def test_derived_figures_come_from_one_function():
    nbytes = bytes_moved(CASE)
    d = figures("paged_sdpa", nbytes, 10.0, 100.0, 8.0, read_gbps=200.0)
    assert d == derive(CASE, 10.0, 100.0, 8.0, read_gbps=200.0)
    assert d["gbps"] == pytest.approx(nbytes / 10.0 / 1e3)
    assert d["pct_of_peak"] == pytest.approx(d["gbps"])  # 100 GB/s ceiling
    assert d["pct_of_read"] == pytest.approx(d["gbps"] / 2)
    assert d["overhead_pct"] == pytest.approx(25.0) == overhead_pct("paged_sdpa", 10.0, 8.0)
    assert overhead_pct("sdpa_contiguous", 10.0, None) == 0.0
    assert overhead_pct("gather", 10.0, 8.0) is None


def test_record_overhead_is_as_recorded_else_from_the_baseline():
    rec = Record.from_json(ok_line())
    assert rec.overhead_pct() is None and rec.overhead_pct(8.0) == pytest.approx(
        (rec.median_us / 8.0 - 1) * 100)
    recorded = Record.from_json(case_record(CASE, status="ok", measurement=measurement(),
                                            derived=derive(CASE, 10.0, None, 5.0)))
    assert recorded.overhead_pct(1.0) == pytest.approx(100.0)


@pytest.mark.parametrize("line,message", [
    ({"type": "run", "schema_version": 2}, r"a 'run' line is not a case record"),
    ({"type": "case", "op": "gather"}, r"record lacks backend, batch, ctx"),
    ({**{"type": "case"}, "backend": "x:y", "op": "gather", "batch": 1, "ctx": 4},
     r"case fields lack q_heads"),
])
def test_lines_that_are_not_case_records_are_refused(line, message):
    with pytest.raises(InvalidCase, match=message):
        Record.from_json(line)


def test_extra_fields_cannot_shadow_record_fields():
    with pytest.raises(InvalidCase, match="extra fields stats would replace"):
        Record(case=CASE, extra={"stats": {}})
