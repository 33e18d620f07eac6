"""The ADR evidence rules on synthetic records: clear wins, ties, overlapping CIs, unconverged
records and missing shapes. Each rule must decide only what the verdicts decide."""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import pytest

from kvmicro.adr_rules import (
    RULES,
    Evidence,
    MissingEvidence,
    Tally,
    check_params,
    geomean,
    get_rule,
    select,
)
from kvmicro.harness.stats import Stats
from kvmicro.verdict import Verdict

CTXS = (256, 1024, 4096)
BATCHES = (1, 4)


def rec(backend: str = "native:cpu", op: str = "gather_sdpa", layout: str = "NSHD",
        block: int = 16, batch: int = 1, ctx: int = 256, median: float = 100.0,
        spread: float = 0.01, n: int = 40, flags: tuple[str, ...] = (), converged: bool = True,
        status: str = "ok", timer: str = "host", cache: str = "hot",
        device: str = "Test CPU", seed: int = 0) -> dict[str, Any]:
    """A case record whose samples sit around ``median`` with a relative jitter ``spread``."""
    out: dict[str, Any] = {
        "type": "case", "schema_version": 1, "backend": backend, "op": op, "batch": batch,
        "q_heads": 32, "kv_heads": 8, "head_dim": 128, "ctx": ctx, "q_len": 1,
        "block_size": block, "layout": layout, "placement": "reverse", "slack": 2.0,
        "dtype": "float16", "seed": seed, "device": device, "timer": timer, "cache": cache,
        "status": status, "reason": "" if status == "ok" else f"{backend} cannot {op}",
        "flags": list(flags), "samples_us": [], "stats": None,
    }
    if status == "ok":
        rng = np.random.default_rng(zlib.crc32(repr((backend, op, layout, block, batch,
                                                      ctx)).encode()))
        samples = median * (1.0 + spread * rng.standard_normal(n))
        out["samples_us"] = [float(s) for s in samples]
        out["stats"] = {**Stats.from_samples(samples).to_dict(), "converged": converged}
    return out


def grid(op: str = "gather_sdpa", layouts: tuple[str, ...] = ("NSHD", "HNSD"),
         blocks: tuple[int, ...] = (16,), backend: str = "native:cpu", **medians: Any) -> list:
    """One record per layout x block x batch x ctx; ``medians[layout]`` is a number or a
    function of (block, batch, ctx)."""
    out = []
    for layout in layouts:
        m = medians.get(layout, 100.0)
        for block in blocks:
            for batch in BATCHES:
                for ctx in CTXS:
                    value = m(block, batch, ctx) if callable(m) else m
                    out.append(rec(backend, op, layout, block, batch, ctx, value))
    return out


def contiguous(backend: str = "native:cpu", median: Any = 100.0) -> list:
    return [rec(backend, "sdpa_contiguous", "NSHD", 16, b, c,
                median(b, c) if callable(median) else median)
            for b in BATCHES for c in CTXS]


RUN = {"type": "run", "schema_version": 1, "git_sha": "abc123", "started_at":
       "2026-01-02T03:04:05+00:00", "argv": ["kvmicro", "sweep", "--preset", "quick"],
       "host": {"hostname": "box", "os_release": "Debian 12", "kernel": "6.1",
                "cpu": {"model": "Test CPU", "cores": 2}},
       "frameworks": {"numpy": "2.0"},
       "devices": {"native:cpu": {"name": "Test CPU", "versions": {"kvmicro._native": "0.1"}}},
       "bandwidth": {"native:cpu": {"read_gbps": 20.0}}}


def run_rule(key: str, records: list, **params: str) -> str:
    rule = get_rule(key)
    check_params(rule, params)
    return rule.func(Evidence(records, (RUN,)), params).text


# ------------------------------------------------------------------------------- registry

def test_every_rule_of_the_issue_is_registered_by_key():
    assert set(RULES) == {"hardware", "results-table", "layout-choice", "crossover",
                          "fused-vs-gather", "block-size", "append-cost", "native-vs-peer"}
    for key, rule in RULES.items():
        assert rule.key == key and rule.func.__doc__, key


def test_an_unknown_rule_or_parameter_is_refused_by_name():
    with pytest.raises(MissingEvidence, match=r"no evidence rule 'layouts'.*layout-choice"):
        get_rule("layouts")
    with pytest.raises(MissingEvidence, match=r"no parameter treshold.*threshold"):
        check_params(get_rule("crossover"), {"treshold": "10"})


def test_filters_select_by_field_with_comma_alternatives():
    records = [rec(layout="NSHD"), rec(layout="HNSD"), rec(layout="NHSD", backend="mlx:cpu")]
    assert [r["layout"] for r in select(records, {"layout": "NSHD,NHSD"})] == ["NSHD", "NHSD"]
    assert [r["backend"] for r in select(records, {"backend": "mlx:cpu"})] == ["mlx:cpu"]
    assert len(select(records, {"heads": "32:8", "block": "16"})) == 3
    assert select(records, {"heads": "8:2"}) == []


# ------------------------------------------------------------------------------- the tally

def _v(word: str, ratio: float = 1.0) -> Verdict:
    return Verdict(word, ratio, (ratio * 0.9, ratio * 1.1), None, "")


@pytest.mark.parametrize(("words", "overall"), [
    (["faster"] * 3, "faster"),
    (["faster", "faster", "unsure"], "faster"),          # a majority, none against
    (["faster", "unsure", "unsure"], "unsure"),          # no majority: not decided
    (["faster", "slower", "faster"], "mixed"),           # depends on the shape
    (["same", "same", "unsure"], "same"),
    (["same", "faster", "same"], "unsure"),              # neither a tie nor a win
    (["slower", "slower", "same"], "slower"),
])
def test_tally_decides_only_by_a_majority_of_decided_shapes(words, overall):
    assert Tally(tuple(_v(w) for w in words)).overall == overall


def test_tally_ratio_is_the_geometric_mean_and_ci_hull_the_bounds_means():
    tally = Tally((_v("faster", 0.5), _v("faster", 2.0)))
    assert tally.ratio == pytest.approx(1.0)
    assert tally.ratio_range == (0.5, 2.0)
    assert tally.ci_hull == pytest.approx((0.9, 1.1))
    assert geomean([1.0, 4.0]) == pytest.approx(2.0)


# ------------------------------------------------------------------------------- layout choice

def test_layout_choice_names_the_clear_winner_with_its_ratio():
    text = run_rule("layout-choice", grid(NSHD=100.0, HNSD=210.0))
    assert "- native:cpu: **NSHD**: faster than HNSD by 2.10x" in text
    assert "NSHD faster (faster 6 of 6)" in text


def test_layout_choice_writes_a_tie_as_a_tie():
    text = run_rule("layout-choice", grid(NSHD=100.0, HNSD=100.5))
    assert "**tie**" in text
    assert "faster than" not in text


def test_layout_choice_with_overlapping_cis_is_unsure_not_a_winner():
    # 3% apart with 10% jitter: the CIs overlap and straddle the 5% band
    records = [dict(r) for r in grid(NSHD=100.0, HNSD=103.0)]
    noisy = [rec("native:cpu", "gather_sdpa", r["layout"], 16, r["batch"], r["ctx"],
                 r["stats"]["median_us"], spread=0.08, n=12) for r in records]
    text = run_rule("layout-choice", noisy)
    assert "**no layout decided**" in text
    assert "faster than" not in text


def test_layout_choice_never_decides_from_unconverged_records():
    records = grid(NSHD=100.0, HNSD=300.0)
    for r in records:
        r["flags"] = ["not-converged"]
        r["stats"]["converged"] = False
    text = run_rule("layout-choice", records)
    assert "**no layout decided**" in text and "not-converged" in text
    assert "3.00x slower" in text        # the numbers are still shown, undecided


def test_layout_choice_refuses_layouts_measured_on_different_shapes():
    records = [r for r in grid(NSHD=100.0, HNSD=200.0)
               if not (r["layout"] == "HNSD" and r["ctx"] == 4096)]
    with pytest.raises(MissingEvidence, match="different shape sets: HNSD lacks 2"):
        run_rule("layout-choice", records)


def test_layout_choice_answers_per_backend():
    records = grid(NSHD=100.0, HNSD=200.0) + grid(backend="mlx:cpu", NSHD=300.0, HNSD=150.0)
    text = run_rule("layout-choice", records)
    assert "- native:cpu: **NSHD**: faster than HNSD by 2.00x" in text
    assert "- mlx:cpu: **HNSD**: faster than NSHD by 2.00x" in text
    only = run_rule("layout-choice", records, backend="mlx:cpu")
    assert "native:cpu" not in only


def test_layout_choice_refuses_mixed_timers_and_missing_ops():
    records = [*grid(), rec(timer="batched")]
    with pytest.raises(MissingEvidence, match=r"several timers.*timer="):
        run_rule("layout-choice", records)
    assert "NSHD" in run_rule("layout-choice", records, timer="host")
    with pytest.raises(MissingEvidence, match="no ok gather_sdpa records"):
        run_rule("layout-choice", grid(op="paged_sdpa"))


# ------------------------------------------------------------------------------- crossover

def _overheads(table: dict[int, float]):
    return lambda block, batch, ctx: 100.0 * table[ctx]


def test_crossover_is_the_smallest_ctx_over_the_threshold():
    records = grid(layouts=("NSHD",), NSHD=_overheads({256: 1.02, 1024: 1.05, 4096: 1.60})) \
        + contiguous()
    text = run_rule("crossover", records)
    assert "+60%" in text and "over" in text
    assert text.count("ctx 4096 (under at 1024)") == 2     # one row per batch


def test_crossover_with_an_unsure_ctx_bounds_rather_than_moves_it():
    records = grid(layouts=("NSHD",), NSHD=_overheads({256: 1.02, 1024: 1.15, 4096: 1.60})) \
        + contiguous()
    # ctx 1024 sits on the threshold: its CI straddles +15%
    text = run_rule("crossover", records)
    assert "ctx <= 4096 (unsure at 1024)" in text


def test_crossover_none_when_every_ctx_is_under():
    records = grid(layouts=("NSHD",), NSHD=104.0) + contiguous()
    assert "none up to ctx 4096 (all under)" in run_rule("crossover", records)
    assert "ctx <= 256 (over at the smallest ctx measured)" in run_rule(
        "crossover", records, threshold="1")


def test_crossover_refuses_a_shape_without_contiguous_sdpa():
    records = grid(layouts=("NSHD",)) + [r for r in contiguous() if r["ctx"] != 1024]
    with pytest.raises(MissingEvidence, match=r"no ok sdpa_contiguous.*ctx1024"):
        run_rule("crossover", records)


def test_crossover_of_the_fused_kernel_over_the_contiguous_lower_bound():
    fused = grid(op="paged_sdpa", layouts=("NSHD",),
                 NSHD=_overheads({256: 1.01, 1024: 1.30, 4096: 1.30}))
    gathered = grid(layouts=("NSHD",), NSHD=104.0)
    text = run_rule("crossover", fused + gathered + contiguous(), op="paged_sdpa")
    assert text.startswith("Overhead of paged_sdpa over sdpa_contiguous")
    assert text.count("ctx 1024 (under at 256)") == 2 and "+30%" in text
    # the default op is still gather-then-SDPA, whose +4% is under +15% everywhere
    assert text != run_rule("crossover", fused + gathered + contiguous())
    assert "none up to ctx 4096 (all under)" in run_rule("crossover",
                                                         fused + gathered + contiguous())


def test_crossover_against_the_fastest_contiguous_sdpa_of_any_backend():
    # flashinfer has no sdpa_contiguous of its own; its fused kernel is measured against the
    # device's lower bound: here cudnn's contiguous SDPA (80) beats native's (100)
    fused = grid(op="paged_sdpa", layouts=("NSHD",), backend="flashinfer:cuda", NSHD=120.0)
    bases = contiguous("native:cuda", 100.0) + contiguous("cudnn:cuda", 80.0)
    with pytest.raises(MissingEvidence, match="no ok sdpa_contiguous on flashinfer:cuda"):
        run_rule("crossover", fused + bases, op="paged_sdpa")
    text = run_rule("crossover", fused + bases, op="paged_sdpa", base="fastest",
                    backend="flashinfer:cuda")
    assert "the fastest sdpa_contiguous of any backend on the same shape (cudnn:cuda on 6 " \
        "comparisons)" in text
    assert "+50%" in text and "ctx <= 256 (over at the smallest ctx measured)" in text
    with pytest.raises(MissingEvidence, match="base=best is neither own nor fastest"):
        run_rule("crossover", fused + bases, op="paged_sdpa", base="best")


def test_crossover_refuses_an_op_that_is_not_a_paged_attention_path():
    with pytest.raises(MissingEvidence, match="op=append is not a paged attention op"):
        run_rule("crossover", grid(op="append") + contiguous(), op="append")
    with pytest.raises(MissingEvidence, match="no ok paged_sdpa"):
        run_rule("crossover", grid() + contiguous(), op="paged_sdpa")


# ------------------------------------------------------------------------------- fused vs gather

def test_fused_vs_gather_by_ctx_and_batch_and_a_backend_without_fused():
    records = (grid(layouts=("NSHD",), NSHD=100.0)
               + grid(op="paged_sdpa", layouts=("NSHD",), NSHD=50.0)
               + grid(backend="torch:cpu", layouts=("NSHD",), NSHD=80.0)
               + [rec("torch:cpu", "paged_sdpa", status="skipped")])
    text = run_rule("fused-vs-gather", records)
    assert "0.50x" in text and "fused is faster (faster 6 of 6)" in text
    assert "- torch:cpu: no ok paged_sdpa (torch:cpu cannot paged_sdpa)" in text


def test_fused_vs_gather_refuses_when_no_backend_has_both():
    with pytest.raises(MissingEvidence, match="no backend has both"):
        run_rule("fused-vs-gather", grid(layouts=("NSHD",)))


def test_fused_vs_gather_same_when_equal():
    records = grid(layouts=("NSHD",), NSHD=100.0) + grid(op="paged_sdpa", layouts=("NSHD",),
                                                         NSHD=100.0)
    assert "fused is same (same 6 of 6)" in run_rule("fused-vs-gather", records)


# ------------------------------------------------------------------------------- block size

def test_block_size_against_the_smallest_block():
    records = grid(op="paged_sdpa", layouts=("NSHD",), blocks=(16, 64),
                   NSHD=lambda block, batch, ctx: 100.0 if block == 16 else 130.0)
    text = run_rule("block-size", records)
    assert "| 64 vs 16 | 1.30x |" in text
    assert "native:cpu paged_sdpa: the larger block is slower" in text
    flat = grid(op="paged_sdpa", layouts=("NSHD",), blocks=(16, 64), NSHD=100.0)
    assert "the larger block is same" in run_rule("block-size", flat)


def test_block_size_refuses_a_single_block_size_and_missing_shapes():
    with pytest.raises(MissingEvidence, match="fewer than two block sizes"):
        run_rule("block-size", grid(op="paged_sdpa"))
    records = [r for r in grid(op="paged_sdpa", blocks=(16, 64))
               if not (r["block_size"] == 64 and r["batch"] == 4)]
    with pytest.raises(MissingEvidence, match="different shape sets"):
        run_rule("block-size", records)


def test_two_variants_of_one_backend_are_two_arms_and_a_plain_filter_keeps_both():
    plain = grid(op="paged_sdpa", layouts=("NSHD",), blocks=(16, 64), backend="flashinfer:cuda",
                 NSHD=100.0)
    variant = grid(op="paged_sdpa", layouts=("NSHD",), blocks=(16, 64),
                   backend="flashinfer:cuda",
                   NSHD=lambda block, batch, ctx: 100.0 if block == 16 else 130.0)
    for r in variant:
        r["options"] = {"tensor_cores": "true"}
    text = run_rule("block-size", plain + variant, backend="flashinfer:cuda")
    assert "flashinfer:cuda paged_sdpa: the larger block is same" in text
    assert "flashinfer:cuda[tensor_cores=true] paged_sdpa: the larger block is slower" in text
    only = run_rule("block-size", plain + variant, backend="flashinfer:cuda[tensor_cores=true]")
    assert "flashinfer:cuda paged_sdpa:" not in only and "1.30x" in only


# ------------------------------------------------------------------------------- append cost

def test_append_cost_per_layout():
    records = grid(op="append", layouts=("NSHD", "HNSD", "NHSD"), NSHD=2.0, HNSD=2.0, NHSD=6.0)
    text = run_rule("append-cost", records)
    assert "NHSD | 6.00 µs | 3.00x slower" in text
    # NSHD and HNSD tie, so neither is decided against the other
    assert "no layout decided" in text
    assert "| native:cpu | NHSD | 6.00 µs | 6.00 µs |" in text
    assert "b1 bs16" in text and "b4 bs16" in text


# ------------------------------------------------------------------------------- native vs peer

def test_native_against_the_fastest_peer_on_each_case():
    records = (grid(op="paged_sdpa", layouts=("NSHD",), NSHD=80.0)
               + grid(op="paged_sdpa", backend="cudnn:cuda", layouts=("NSHD",), NSHD=100.0)
               + grid(op="paged_sdpa", backend="flashinfer:cuda", layouts=("NSHD",),
                      NSHD=lambda block, batch, ctx: 90.0 if ctx == 4096 else 120.0))
    text = run_rule("native-vs-peer", records)
    assert "**native:cpu** is faster (faster 6 of 6)" in text
    assert "fastest peer: cudnn:cuda on 4, flashinfer:cuda on 2" in text


def test_native_against_peers_on_another_op_and_refusals():
    records = (grid(op="paged_sdpa", layouts=("NSHD",), NSHD=100.0)
               + grid(op="gather_sdpa", backend="torch:cpu", layouts=("NSHD",), NSHD=100.0)
               + [rec("torch:cpu", "paged_sdpa", status="skipped")])
    with pytest.raises(MissingEvidence, match=r"no ok paged_sdpa records of the peers.*cannot"):
        run_rule("native-vs-peer", records)
    text = run_rule("native-vs-peer", records, peer_op="gather_sdpa")
    assert "**native:cpu** is same (same 6 of 6)" in text
    partial = [r for r in records if not (r["backend"] == "torch:cpu" and r["ctx"] == 256)]
    with pytest.raises(MissingEvidence, match="no peer gather_sdpa for 2 native:cpu cases"):
        run_rule("native-vs-peer", partial, peer_op="gather_sdpa")


# ------------------------------------------------------------------------------- hardware, table

def test_hardware_from_the_run_lines():
    text = run_rule("hardware", [*grid(), rec(op="paged_sdpa", status="skipped")])
    assert "CPU Test CPU (2 cores)" in text
    assert "| native:cpu | Test CPU | kvmicro._native 0.1 | 20.0 |" in text
    assert "records: ok 12, skipped 1" in text
    assert "`kvmicro sweep --preset quick`" in text
    with pytest.raises(MissingEvidence, match="no run lines"):
        get_rule("hardware").func(Evidence(grid(), ()), {})


def test_results_table_is_the_reports_markdown():
    from kvmicro.report import DEFAULT_COLUMNS, render

    records = grid() + contiguous()
    text = run_rule("results-table", records)
    assert text == render(records, "markdown", DEFAULT_COLUMNS).strip()
    narrowed = run_rule("results-table", records, op="gather_sdpa")
    gathers = [r for r in records if r["op"] == "gather_sdpa"]
    assert narrowed == render(gathers, "markdown", DEFAULT_COLUMNS).strip()
    assert narrowed != text
    with pytest.raises(MissingEvidence, match="no ok records"):
        run_rule("results-table", [rec(status="skipped")])


def test_docs_document_every_rule_and_filter():
    from pathlib import Path

    from kvmicro.adr_rules import FILTERS

    readme = (Path(__file__).parent.parent / "docs" / "adr" / "README.md").read_text()
    for key, rule in RULES.items():
        assert f"| `{key}` |" in readme, key
        for param in rule.params:
            assert f"`{param}`" in readme, (key, param)
    for param in FILTERS:
        assert f"`{param}`" in readme, param
