"""compare: records matched by key; verdicts from verdict.py (faster/slower only when the test
rejects and the ratio's CI is beyond the threshold, unsure for noisy or unconverged records); exit 1
only on a real slowdown or a broken case, 2 when nothing matched or a named backend matches no
record; differing provenance is a warning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvmicro import InvalidCase
from kvmicro.cli import main
from kvmicro.compare import compare_backends, compare_files, compare_records, noise_pct, verdict
from kvmicro.harness.measure import Measurement
from kvmicro.harness.stats import Stats
from kvmicro.results import ResultsWriter, case_record
from kvmicro.workload import Case


def rec(median: float, rel_sd: float = 0.002, op: str = "gather", ctx: int = 1024,
        status: str = "ok", seed: int = 0, backend: str = "torch:cpu",
        converged: bool = True, options: tuple[tuple[str, str], ...] = ()) -> dict[str, Any]:
    """A record of 201 samples around ``median`` with relative spread ``rel_sd``."""
    case = Case(op=op, backend=backend, ctx=ctx, q_heads=8, kv_heads=2, head_dim=64,
                dtype="float32", placement="reverse", options=options)
    if status != "ok":
        return case_record(case, status=status, reason="boom",
                           extra={"timer": "batched", "cache": "hot"})
    x = median * (1 + rel_sd * np.random.default_rng(seed).standard_normal(201))
    samples = [float(v) for v in x - np.median(x) + median]
    m = Measurement(samples_us=samples, stats=Stats.from_samples(samples), timer="batched",
                    cache={"name": "hot", "bytes": 0, "pools": 1},
                    criterion={"name": "ci-median", "params": {}, "converged": converged,
                               "why_not": "" if converged else "stopped at max_time"},
                    k=4, dropped=0, elapsed_s=0.1)
    return case_record(case, status="ok", measurement=m)


def test_identical_distributions_are_the_same() -> None:
    c = verdict(rec(100.0, seed=1), rec(100.0, seed=2))
    assert c.verdict == "same" and c.ratio == pytest.approx(1.0)


def test_a_clear_slowdown_and_speedup_are_called() -> None:
    slow = verdict(rec(100.0), rec(150.0))
    assert slow.verdict == "slower" and slow.ratio == pytest.approx(1.5)
    assert slow.change_pct == pytest.approx(50.0)
    fast = verdict(rec(100.0), rec(60.0))
    assert fast.verdict == "faster" and fast.change_pct == pytest.approx(-40.0)


def test_a_small_change_is_the_same_under_the_threshold_and_called_above_it() -> None:
    base, new = rec(100.0, rel_sd=0.001), rec(103.0, rel_sd=0.001)
    assert noise_pct(base) < 1 and noise_pct(new) < 1       # tight: the CIs do not overlap
    assert verdict(base, new, threshold_pct=5.0).verdict == "same"
    assert verdict(base, new, threshold_pct=1.0).verdict == "slower"


def test_noisy_or_unconverged_records_are_unsure_whatever_their_medians() -> None:
    noisy_base, noisy_new = rec(100.0, rel_sd=0.3, seed=3), rec(160.0, rel_sd=0.3, seed=4)
    assert "noisy" in noisy_new["flags"]
    c = verdict(noisy_base, noisy_new, threshold_pct=0.0)
    assert c.verdict == "unsure" and "flagged noisy" in c.reason
    c = verdict(rec(100.0), rec(300.0, converged=False))
    assert c.verdict == "unsure" and "not-converged" in c.reason
    assert c.ratio == pytest.approx(3.0)


def test_a_verdict_carries_the_ratio_ci_and_the_test() -> None:
    c = verdict(rec(100.0), rec(150.0))
    lo, hi = c.ratio_ci
    assert lo < 1.5 < hi and hi - lo < 0.01
    assert c.detail is not None and c.detail.p_value < 1e-10


def test_ok_to_error_is_broken_and_the_reverse_fixed() -> None:
    assert verdict(rec(100.0), rec(0, status="error")).verdict == "broken"
    assert verdict(rec(0, status="skipped"), rec(100.0)).verdict == "fixed"


def test_exit_code_and_unmatched_cases() -> None:
    base = [rec(100.0, ctx=1024), rec(100.0, ctx=2048), rec(100.0, ctx=4096)]
    same = compare_records([], base, [], [rec(100.5, ctx=1024, seed=5), rec(99.0, ctx=2048)])
    assert same.exit_code == 0 and same.counts["same"] == 2 and len(same.only_base) == 1
    worse = compare_records([], base, [], [rec(100.0, ctx=1024), rec(180.0, ctx=4096),
                                           rec(100.0, ctx=8192)])
    assert worse.exit_code == 1 and worse.counts["slower"] == 1 and len(worse.only_new) == 1
    nothing = compare_records([], base, [], [rec(100.0, ctx=8192)])
    assert nothing.exit_code == 2 and not nothing.comparisons


def _write(path: Path, records: list[dict[str, Any]], hostname: str) -> Path:
    with ResultsWriter(path, {"host": {"hostname": hostname}, "argv": ["t"]}) as w:
        for r in records:
            w.write(r)
    return path


def test_compare_command_prints_verdicts_warns_on_provenance_and_sets_the_exit_code(
        tmp_path: Path, capsys: Any) -> None:
    base = _write(tmp_path / "base.jsonl", [rec(100.0, ctx=1024), rec(50.0, ctx=2048)], "a")
    same = _write(tmp_path / "same.jsonl", [rec(100.2, ctx=1024, seed=3),
                                            rec(50.1, ctx=2048, seed=4)], "a")
    slower = _write(tmp_path / "slow.jsonl", [rec(100.0, ctx=1024), rec(80.0, ctx=2048)], "b")
    assert main(["compare", str(base), str(same)]) == 0
    captured = capsys.readouterr()
    assert "2 matched cases: same 2" in captured.out and captured.err == ""
    assert main(["compare", str(base), str(slower), "--threshold", "10"]) == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert "SLOWER" in lines[2] and "+60.0%" in lines[2] and "1.600" in lines[2]
    assert "slower 1, same 1" in captured.out
    assert "warning: host.hostname: 'a' vs 'b'" in captured.err
    result = compare_files(base, slower, threshold_pct=70.0)
    assert result.exit_code == 0


def test_a_verdict_between_two_runs_warns_that_it_includes_the_machines_drift(
        tmp_path: Path) -> None:
    base = _write(tmp_path / "base.jsonl", [rec(100.0, ctx=1024), rec(50.0, ctx=2048)], "a")
    slower = _write(tmp_path / "slow.jsonl", [rec(100.0, ctx=1024), rec(80.0, ctx=2048)], "a")
    same = _write(tmp_path / "same.jsonl", [rec(100.2, ctx=1024, seed=3),
                                            rec(50.1, ctx=2048, seed=4)], "a")
    drift = [w for w in compare_files(base, slower).warnings if "between the runs" in w]
    assert len(drift) == 1 and drift[0].startswith("1 faster/slower verdict(s)")
    assert "scripts/ab_builds.py" in drift[0]
    assert not [w for w in compare_files(base, same).warnings if "between the runs" in w]


def test_compare_command_rejects_bad_input_in_one_line(tmp_path: Path, capsys: Any) -> None:
    base = _write(tmp_path / "base.jsonl", [rec(100.0)], "a")
    assert main(["compare", str(base), str(base), "--threshold", "-1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["kvmicro: error: --threshold -1.0 must be >= 0 and < 100 (percent)"]
    assert main(["compare", str(base)]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_a_backend_is_compared_with_the_fastest_of_its_peers_on_each_case() -> None:
    records = [
        rec(100.0, ctx=1024, backend="native:cpu"), rec(120.0, ctx=1024, backend="torch:cpu"),
        rec(101.0, ctx=1024, backend="mlx:cpu", seed=1),                # the best peer here
        rec(90.0, ctx=2048, backend="native:cpu"), rec(60.0, ctx=2048, backend="mlx:cpu"),
        rec(70.0, ctx=4096, backend="torch:cpu"),                       # no native record
        rec(10.0, ctx=8192, backend="native:cpu"),                      # no peer record
    ]
    result = compare_backends(records, ["torch:cpu", "mlx:cpu"], "native:cpu")
    by_ctx = {c.new["ctx"]: c for c in result.comparisons}
    assert by_ctx[1024].base["backend"] == "mlx:cpu" and by_ctx[1024].verdict == "same"
    assert by_ctx[2048].verdict == "slower" and by_ctx[2048].ratio == pytest.approx(1.5)
    assert [r["ctx"] for r in result.only_base] == [4096]
    assert [r["ctx"] for r in result.only_new] == [8192]
    assert result.exit_code == 1
    with pytest.raises(InvalidCase, match="native:cpu is on both sides"):
        compare_backends(records, ["native:cpu"], "native:cpu")


def test_empty_brackets_name_a_backend_at_its_default_options_only() -> None:
    # A plain name matches every variant, so "the default against a variant" needs the default
    # named on its own: native:cpu[] is the option-less records only.
    simd_off = (("simd", "false"),)
    records = [rec(100.0, ctx=1024, backend="native:cpu"),
               rec(150.0, ctx=1024, backend="native:cpu", options=simd_off, seed=1),
               rec(90.0, ctx=2048, backend="native:cpu"),
               rec(60.0, ctx=2048, backend="native:cpu", options=simd_off, seed=2)]
    result = compare_backends(records, ["native:cpu[simd=false]"], "native:cpu[]")
    by_ctx = {c.new["ctx"]: c for c in result.comparisons}
    assert by_ctx[1024].verdict == "faster" and by_ctx[2048].verdict == "slower"
    assert all(c.new["options"] == {} for c in result.comparisons)
    # the plain name takes each case's fastest variant, and leaves no base of that backend
    plain = compare_backends(records, ["native:cpu[simd=false]"], "native:cpu")
    assert plain.comparisons == [] and len(plain.only_new) == 2
    with pytest.raises(InvalidCase, match=r"--new-backend torch:cpu\[\] matches no record"):
        compare_backends(records, ["native:cpu"], "torch:cpu[]")


def test_compare_command_across_backends_pools_files_and_names_the_base(
        tmp_path: Path, capsys: Any) -> None:
    a = _write(tmp_path / "a.jsonl", [rec(50.0, backend="native:cpu"),
                                      rec(80.0, backend="torch:cpu")], "h")
    b = _write(tmp_path / "b.jsonl", [rec(60.0, backend="mlx:cpu")], "h")
    assert main(["compare", str(a), str(b), "--new-backend", "native:cpu",
                 "--base-backend", "torch:cpu,mlx:cpu"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["case", "base"]
    assert "mlx:cpu" in lines[2] and "faster" in lines[2] and "1 matched cases: faster 1" in out
    assert main(["compare", str(a), "--new-backend", "native:cpu"]) == 2
    assert "go together" in capsys.readouterr().err


def test_a_backend_name_that_matches_no_record_exits_2_naming_what_is_there(
        tmp_path: Path, capsys: Any) -> None:
    a = _write(tmp_path / "a.jsonl", [rec(50.0, backend="native:cpu"),
                                      rec(80.0, backend="torch:cpu")], "h")
    assert main(["compare", str(a), "--new-backend", "native:cpux",
                 "--base-backend", "torch:cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["kvmicro: error: [compare] --new-backend native:cpux matches no record; the "
                   "files hold native:cpu, torch:cpu"]
    assert main(["compare", str(a), "--new-backend", "native:cpu",
                 "--base-backend", "mlx:gpu"]) == 2
    assert "--base-backend mlx:gpu matches no record" in capsys.readouterr().err


def test_two_files_that_share_no_case_exit_2(tmp_path: Path, capsys: Any) -> None:
    a = _write(tmp_path / "a.jsonl", [rec(50.0, ctx=1024)], "h")
    b = _write(tmp_path / "b.jsonl", [rec(50.0, ctx=2048)], "h")
    assert main(["compare", str(a), str(b)]) == 2
    captured = capsys.readouterr()
    assert "0 matched cases: none" in captured.out and "nothing to compare" in captured.out
    assert "no case matched" in captured.err


def test_unsure_cases_are_explained_once_with_what_to_do(tmp_path: Path, capsys: Any) -> None:
    a = _write(tmp_path / "a.jsonl", [rec(100.0, rel_sd=0.3, seed=1)], "h")
    b = _write(tmp_path / "b.jsonl", [rec(200.0, rel_sd=0.3, seed=2)], "h")
    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "matched cases: unsure 1" in out
    assert "unsure: 1 flagged noisy" in out and "--timer batched" in out
