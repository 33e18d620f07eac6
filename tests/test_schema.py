"""The results-file format has a JSON Schema, shipped in the package, and what kvmicro writes (and
wrote, in schema version 1) validates against it; lines that break the format do not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvmicro.derived import derive
from kvmicro.harness.measure import Measurement
from kvmicro.harness.stats import Stats
from kvmicro.record import results_schema
from kvmicro.results import FLAGS, ResultsWriter, case_record, iter_results
from kvmicro.workload import Case

jsonschema = pytest.importorskip("jsonschema")

V1_FILE = Path(__file__).parent / "data" / "results-v1.jsonl"


@pytest.fixture(scope="module")
def validator():
    schema = results_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


CASE = Case(backend="native:cuda[priority=high]", batch=2, ctx=(37, 300), scale=0.3)


def measurement() -> Measurement:
    samples = [10.0, 10.5, 9.8, 10.1, 10.2, 9.9, 10.0, 10.3, 10.1, 10.0]
    return Measurement(samples_us=samples, stats=Stats.from_samples(samples), timer="graph",
                       cache={"name": "hot", "bytes": 0, "pools": 1, "cache_bytes": 1 << 20},
                       criterion={"name": "ci-median", "params": {}, "converged": True,
                                  "why_not": ""}, k=8, dropped=0, elapsed_s=0.5)


def _ok_line() -> dict:
    return case_record(CASE, status="ok", measurement=measurement(), device="GPU",
                       derived=derive(CASE, 10.0, 100.0), extra={"kernel": "split-kv x4"})


def errors(validator, line) -> list[str]:
    return [e.message for e in validator.iter_errors(json.loads(json.dumps(line)))]


def test_every_line_of_a_version_1_file_validates(validator):
    lines = list(iter_results(V1_FILE))
    assert len(lines) == 25
    for line in lines:
        assert errors(validator, line) == [], line


def test_what_the_writer_writes_now_validates(validator, tmp_path):
    case = CASE
    path = tmp_path / "r.jsonl"
    with ResultsWriter(path, {"argv": ["kvmicro"], "backends": ["native:cuda"]}) as w:
        w.write(case_record(case, status="ok", measurement=measurement(),
                            derived=derive(case, 10.0, 100.0)))
        w.write(case_record(case, status="skipped", reason="no GPU", timer="graph",
                            cache="hot"))
        w.write(case_record(case, status="error", reason="oracle mismatch", timer="host",
                            cache="cold:flush"))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["type"] for line in lines] == ["run", "case", "case", "case"]
    for line in lines:
        assert errors(validator, line) == [], line


@pytest.mark.parametrize("change,why", [
    ({"layout": "NSHH"}, "does not match"),
    ({"layout": "NSH"}, "does not match"),
    ({"ctx": "37"}, "is not valid under any of the given schemas"),
    ({"ctx": [0, 4]}, "is not valid under any of the given schemas"),
    ({"batch": 0}, "less than the minimum"),
    ({"status": "fine"}, "is not one of"),
    ({"op": "paged"}, "is not one of"),
    ({"options": {"priority": 1}}, "is not of type 'string'"),
    ({"options": {"Bad": "x"}}, "does not match"),
    ({"backend": "native:cuda[priority=high]"}, "does not match"),
    ({"schema_version": 3}, "is not valid under any of the given schemas"),
    ({"stats": None}, "is not of type 'object'"),
    ({"flags": ["Noisy!"]}, "does not match"),
])
def test_lines_that_break_the_format_do_not_validate(validator, change, why):
    line = {**_ok_line(), **change}
    found = errors(validator, line)
    assert found and any(why in e for e in found), found


def test_a_version_2_case_line_must_carry_its_options(validator):
    line = _ok_line()
    del line["options"]
    assert any("'options' is a required property" in e for e in errors(validator, line))
    assert errors(validator, {**line, "schema_version": 1}) == []


def test_a_skipped_line_needs_its_reason(validator):
    line = case_record(Case(), status="skipped", reason="x", timer="host", cache="hot")
    assert errors(validator, line) == []
    assert errors(validator, {**line, "reason": ""})


def test_every_flag_kvmicro_writes_fits_the_schema(validator):
    line = _ok_line()
    assert errors(validator, {**line, "flags": list(FLAGS)}) == []


def test_a_record_measured_through_the_harness_validates(validator):
    from kvmicro.backends.base import Prepared
    from kvmicro.harness import ColdRotate, measure
    from kvmicro.harness.measure import MeasureConfig

    class Quick(Prepared):
        copies = 3

        def run(self) -> None:
            sum(range(50))

        def sync(self) -> None:
            pass

        def output(self):
            return None

    case = Case(backend="torch:cpu", batch=2, ctx=(37, 300), kv_heads=2, q_heads=8, head_dim=64)
    m = measure(Quick(case), MeasureConfig(timer="batched", cache="cold:rotate", max_time_s=0.3,
                                           criterion="sample-count",
                                           criterion_params={"count": 6}),
                ColdRotate(cache_bytes=1 << 16))
    line = case_record(case, status="ok", measurement=m, derived=derive(case, m.stats, 10.0))
    assert line["cache_policy"]["copies_prepared"] == 3
    assert errors(validator, line) == []
