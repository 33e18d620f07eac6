"""scripts/ab_builds.py: two builds compared through alternating sweep processes, pair by pair."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvmicro.harness.measure import Measurement
from kvmicro.harness.stats import Stats
from kvmicro.results import ResultsWriter, case_record
from kvmicro.workload import Case

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ab_builds.py"
_spec = importlib.util.spec_from_file_location("ab_builds", SCRIPT)
assert _spec and _spec.loader
ab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ab)


def rec(median: float, ctx: int, seed: int) -> dict[str, Any]:
    case = Case(op="paged_sdpa", backend="native:cpu", ctx=ctx, q_heads=8, kv_heads=2,
                head_dim=64, dtype="float32", placement="reverse")
    x = median * (1 + 0.002 * np.random.default_rng(seed).standard_normal(51))
    samples = [float(v) for v in x - np.median(x) + median]
    m = Measurement(samples_us=samples, stats=Stats.from_samples(samples), timer="host",
                    cache={"name": "hot", "bytes": 0, "pools": 1},
                    criterion={"name": "ci-median", "params": {}, "converged": True,
                               "why_not": ""}, k=1, dropped=0, elapsed_s=0.1)
    return case_record(case, status="ok", measurement=m)


def write_pairs(out: Path, a_medians: list[float], b_medians: list[float], ctx: int = 256) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for i, (a, b) in enumerate(zip(a_medians, b_medians, strict=True)):
        for side, median in (("a", a), ("b", b)):
            with ResultsWriter(out / f"{side}-{i}.jsonl", {"argv": ["t"]}) as w:
                w.write(rec(median, ctx, seed=2 * i + (side == "b")))


def test_the_order_flips_every_pair_so_neither_build_always_runs_second() -> None:
    assert ab.order(4) == [(0, "a"), (0, "b"), (1, "b"), (1, "a"),
                           (2, "a"), (2, "b"), (3, "b"), (3, "a")]


def test_drift_shared_by_a_pair_cancels_and_a_steady_difference_is_called(tmp_path: Path) -> None:
    # the host drifts by 40% from pair to pair; within a pair B is 10% slower
    drift = [1.0, 1.4, 0.9, 1.3, 1.1, 0.8]
    write_pairs(tmp_path, [100 * d for d in drift], [110 * d for d in drift])
    (row,) = ab.analyse(tmp_path, len(drift), threshold=0.05)
    assert row["verdict"].verdict == "slower"
    assert row["verdict"].ratio == pytest.approx(1.10, rel=1e-3)


def test_a_over_a_with_drift_is_never_faster_or_slower(tmp_path: Path) -> None:
    drift = [1.0, 1.4, 0.9, 1.3, 1.1, 0.8]
    noise = [1.004, 0.997, 1.002, 0.999, 1.003, 0.996]
    b = [100 * d * e for d, e in zip(drift, noise, strict=True)]
    write_pairs(tmp_path, [100 * d for d in drift], b)
    (row,) = ab.analyse(tmp_path, len(drift), threshold=0.02)
    assert row["verdict"].verdict == "same"


def test_a_planted_factor_multiplies_b_before_the_verdict(tmp_path: Path) -> None:
    write_pairs(tmp_path, [100, 101, 99, 100], [100, 101, 99, 100])
    (row,) = ab.analyse(tmp_path, 4, threshold=0.05, plant=1.3)
    assert row["verdict"].verdict == "slower"
    assert row["verdict"].ratio == pytest.approx(1.3, rel=1e-3)


def test_bad_arguments_are_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        ab.main(["--a", str(tmp_path), "--b", str(tmp_path), "--pairs", "2"])
    with pytest.raises(SystemExit):
        ab.main(["--a", str(tmp_path / "nowhere"), "--b", str(tmp_path), "--pairs", "3"])
