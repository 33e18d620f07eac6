"""The paired rule: two records whose rounds were interleaved (one ``rounds.group``, round i of both
taken in pass i) are compared round by round, so that drift of the host between passes, which hits
both alike, cancels; records that were not interleaved, or share fewer than 3 rounds, keep the
unpaired rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kvmicro.errors import InvalidCase
from kvmicro.harness.cache import HotCache
from kvmicro.harness.measure import MeasureConfig, Sampler
from kvmicro.verdict import (
    MIN_CROSSOVER_ROUNDS,
    MIN_PAIRED_ROUNDS,
    MIN_ROUND_SAMPLES,
    PAIRED_EXCUSED_FLAGS,
    compare_paired,
    compare_records,
    interleaved_rounds,
    paired_round_numbers,
    record_round_medians,
    t_quantile,
    t_two_sided_p,
    untrusted_reason,
)

#: the two speeds this kind of VM flips between, ~1.4x apart
FAST, SLOW = 1.0, 1.4


def drifting_pair(rng: np.random.Generator, *, factor: float = 1.0, rounds: int = 8,
                  per_round: int = 20, flip_within: float = 0.0, sigma: float = 0.04,
                  group: str | None = "chunk-1") -> tuple[dict, dict]:
    """(new, base) records sampled in interleaved rounds on a host whose speed flips between
    FAST and SLOW from one pass to the next (both records of a pass see the same speed, except,
    with probability ``flip_within``, when the host flips between their two rounds); new is
    ``factor`` times slower. Both are flagged as the Sampler flags drifting rounds: rounds-disagree
    and not-converged, with the criterion itself met."""
    speeds = rng.choice([FAST, SLOW], size=rounds)
    speeds[:2] = (FAST, SLOW)   # at least one flip, whatever the seed
    new, base = [], []
    for speed in speeds:
        other = SLOW if speed == FAST else FAST
        new_speed = other if rng.random() < flip_within else speed
        base.append(rng.lognormal(math.log(100.0 * speed), sigma, per_round))
        new.append(rng.lognormal(math.log(100.0 * new_speed * factor), sigma, per_round))

    def record(parts: list[np.ndarray]) -> dict:
        x = np.concatenate(parts)
        rounds_field = {"count": rounds, "sizes": [per_round] * rounds,
                        "index": list(range(rounds)), "agree": False}
        if group is not None:
            rounds_field["group"] = group
        return {"status": "ok", "flags": ["wide-spread", "not-converged", "rounds-disagree"],
                "samples_us": x.tolist(),
                "stats": {"median_us": float(np.median(x)), "converged": False,
                          "ci95_lo_us": float(np.percentile(x, 45)),
                          "ci95_hi_us": float(np.percentile(x, 55))},
                "criterion": {"name": "ci-median", "converged": False, "met": True,
                              "why_not": "rounds disagree: ..."},
                "rounds": rounds_field}

    return record(new), record(base)


def without_group(rec: dict) -> dict:
    return {**rec, "rounds": {k: v for k, v in rec["rounds"].items() if k != "group"}}


# ------------------------------------------------------------------------ the paired rule


def test_a_planted_1_3x_slowdown_under_a_common_1_4x_drift_is_slower():
    rng = np.random.default_rng(16)
    covered = 0
    for _ in range(200):
        new, base = drifting_pair(rng, factor=1.3)
        v = compare_records(new, base)
        assert v.verdict == "slower", v.reason
        assert v.paired_rounds == 8 and v.level == pytest.approx(0.99)
        assert "paired over 8 interleaved rounds" in v.reason
        covered += v.ratio_ci[0] < 1.3 < v.ratio_ci[1]
    assert covered >= 190   # a 99% interval of the true ratio


def test_a_speedup_under_drift_is_faster():
    rng = np.random.default_rng(17)
    new, base = drifting_pair(rng, factor=0.7)
    v = compare_records(new, base)
    assert v.verdict == "faster" and v.ratio == pytest.approx(0.7, rel=0.03)


def test_the_same_code_under_drift_is_never_called_faster_or_slower():
    """A/A: 600 pairs on the drifting host, a tenth of the passes flipping between the two
    records' rounds too. The 99% t-interval beyond the threshold bounds the false rate by 1%
    whatever the noise; here it is zero, and about half the pairs are named the same (the
    crossover estimate of 6 rounds or more spends a degree of freedom on the order of the
    passes: 296 of 600 here, 304 without it)."""
    rng = np.random.default_rng(18)
    verdicts = []
    for i in range(600):
        new, base = drifting_pair(rng, rounds=3 + i % 10, per_round=4 + i % 20,
                                  flip_within=0.1 if i % 2 else 0.0)
        verdicts.append(compare_records(new, base).verdict)
    false = verdicts.count("faster") + verdicts.count("slower")
    assert false <= 0.01 * len(verdicts)
    assert false == 0
    assert verdicts.count("same") > 0.45 * len(verdicts)


def test_the_false_rate_stays_within_alpha_when_the_round_ratios_are_pure_noise():
    """The worst case for an interval test: round ratios so noisy that the threshold is
    negligible; the 99% interval then excludes the band on either side at most 1% of the time."""
    rng = np.random.default_rng(19)
    false = 0
    trials = 4000
    for _ in range(trials):
        n = int(rng.integers(3, 12))
        r = np.exp(rng.normal(0.0, 1.0, n))
        false += compare_paired(r, np.ones(n)).verdict in ("faster", "slower")
    assert false / trials <= 0.01 + 3 * math.sqrt(0.01 * 0.99 / trials)


def heavy_tailed_round_medians(rng: np.random.Generator, n: int, *, second_faster: float,
                               alternate: bool) -> tuple[np.ndarray, np.ndarray]:
    """(new, base) round medians of one A/A pair on a bad host: the host flips 1.4x between
    passes; each round median carries Student-t noise on 2 degrees of freedom (heavy tails:
    infinite variance), scale 3%; in a fifth of the passes the host also flips between the two
    rounds (a ratio of 1.4 or 1/1.4); the arm that runs second in a pass is ``second_faster``
    faster (the twin's data still in the cache). Without ``alternate`` new always runs second;
    with it every other pass runs in reverse (:func:`interleaved_order`)."""
    speed = rng.choice([FAST, SLOW], size=n)
    noise = 0.03 * rng.standard_t(2, size=(2, n))
    flip = np.where(rng.random(n) < 0.2, rng.choice([1.4, 1 / 1.4], size=n), 1.0)
    new_second = np.array([not alternate or i % 2 == 0 for i in range(n)])
    order = np.where(new_second, 1.0 - second_faster, 1.0 / (1.0 - second_faster))
    new = 100.0 * speed * np.exp(noise[0]) * flip * order
    base = 100.0 * speed * np.exp(noise[1])
    return new, base


def test_a_a_with_heavy_tailed_round_noise_stays_under_the_bound():
    """4,000 A/A pairs of 3 to 12 rounds with heavy-tailed noise, flips within passes and a 5%
    advantage for whichever arm runs second, alternated as the runner alternates it: false
    faster/slower at most 1% (the t-test is conservative under symmetric heavy tails)."""
    rng = np.random.default_rng(28)
    trials = 4000
    bound = 0.01 + 3 * math.sqrt(0.01 * 0.99 / trials)
    for numbered in (False, True):      # the plain estimate, and the crossover one (>= 6)
        false = 0
        for _ in range(trials):
            n = int(rng.integers(3, 13))
            v = compare_paired(*heavy_tailed_round_medians(rng, n, second_faster=0.05,
                                                           alternate=True),
                               rounds=list(range(n)) if numbered else None)
            false += v.verdict in ("faster", "slower")
        assert false / trials <= bound


def test_an_order_effect_the_runner_did_not_alternate_would_be_called_a_difference():
    """Why the runner reverses every other pass: a 25% advantage for the arm that runs second
    (what a 32 MB case showed here when arm B always followed arm A) is real between the two
    positions, and the paired rule names it; alternated, it is scatter, not a verdict."""
    rng = np.random.default_rng(29)
    fixed = [compare_paired(*heavy_tailed_round_medians(rng, 8, second_faster=0.25,
                                                        alternate=False)).verdict
             for _ in range(300)]
    alternated = [compare_paired(*heavy_tailed_round_medians(rng, 8, second_faster=0.25,
                                                             alternate=True)).verdict
                  for _ in range(300)]
    assert fixed.count("faster") > 150
    assert alternated.count("faster") + alternated.count("slower") <= 3


def test_the_crossover_estimate_removes_the_order_of_the_passes():
    """Even and odd passes run in opposite orders, so an advantage d for the record that runs
    second adds +d to one parity's log ratios and -d to the other's: the mean of the two
    parities' means is the ratio without it, with odd counts too."""
    mu, d = math.log(1.3), 0.25
    rounds = list(range(7))
    logs = np.array([mu + (d if r % 2 == 0 else -d) for r in rounds])
    v = compare_paired(np.exp(logs) * 100.0, np.full(7, 100.0), rounds=rounds)
    assert v.ratio == pytest.approx(1.3) and v.ratio_ci == pytest.approx((1.3, 1.3))
    assert v.verdict == "slower" and "balanced over both pass orders" in v.reason
    plain = compare_paired(np.exp(logs) * 100.0, np.full(7, 100.0))
    assert plain.ratio == pytest.approx(math.exp(mu + d / 7))   # 4 even rounds, 3 odd
    assert plain.verdict == "unsure" and "geometric mean" in plain.reason
    # fewer than MIN_CROSSOVER_ROUNDS, or one parity only: the plain estimate
    assert MIN_CROSSOVER_ROUNDS == 6
    short = compare_paired([130.0, 131.0, 129.0, 130.0, 130.5], [100.0] * 5, rounds=range(5))
    assert "geometric mean" in short.reason
    same_parity = compare_paired([130.0] * 6, [100.0] * 6, rounds=[0, 2, 4, 6, 8, 10])
    assert "geometric mean" in same_parity.reason
    with pytest.raises(InvalidCase, match="round numbers"):
        compare_paired([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], rounds=[0, 1])


def test_a_1_3x_slowdown_under_a_25pct_order_effect_is_found_by_the_crossover_estimate():
    """What the ctx-1024 batch-4 cases look like here when the neighbours are busy: round
    ratios alternating between ~0.95 and ~1.6 around a true 1.3 (here with the heavy-tailed
    noise and the flips within passes on top). The plain estimate drowns in that scatter (8 of
    300 found); the crossover estimate finds most (185 of 300)."""
    rng = np.random.default_rng(30)
    crossover = plain = 0
    for _ in range(300):
        n = int(rng.integers(6, 13))
        new, base = heavy_tailed_round_medians(rng, n, second_faster=0.25, alternate=True)
        crossover += compare_paired(new * 1.3, base, rounds=range(n)).verdict == "slower"
        plain += compare_paired(new * 1.3, base).verdict == "slower"
    assert crossover >= 170 and plain <= 20


def test_records_pair_by_round_number_and_the_rule_uses_the_numbers():
    rng = np.random.default_rng(31)
    new, base = drifting_pair(rng, factor=1.3)
    assert paired_round_numbers(new, base) == list(range(8))
    assert "balanced over both pass orders" in compare_records(new, base).reason
    assert paired_round_numbers(without_group(new), base) is None


def test_records_not_interleaved_keep_the_unpaired_rule():
    rng = np.random.default_rng(20)
    new, base = drifting_pair(rng, factor=1.3)
    for a, b in ((without_group(new), without_group(base)),
                 (new, {**base, "rounds": {**base["rounds"], "group": "another-chunk"}})):
        assert interleaved_rounds(a, b) is None
        v = compare_records(a, b)
        # the unpaired rule: drifting rounds gate, as before
        assert v.verdict == "unsure" and v.paired_rounds == 0
        assert "rounds-disagree" in v.reason


def test_fewer_than_three_common_rounds_keep_the_unpaired_rule():
    rng = np.random.default_rng(21)
    new, base = drifting_pair(rng, factor=1.3, rounds=MIN_PAIRED_ROUNDS - 1)
    assert interleaved_rounds(new, base) is None
    v = compare_records(new, base)
    assert v.verdict == "unsure" and v.paired_rounds == 0 and "rounds-disagree" in v.reason
    # records with more rounds, but only two round numbers in common
    new, base = drifting_pair(rng, factor=1.3, rounds=4)
    base["rounds"]["index"] = [0, 1, 7, 8]
    assert interleaved_rounds(new, base) is None
    assert compare_records(new, base).paired_rounds == 0


def test_rounds_pair_by_their_number_not_their_position():
    # base kept no sample in round 1 (its sizes skip it): round 2 pairs with round 2
    new = {"samples_us": [10.0, 10.0, 20.0, 20.0, 30.0, 30.0, 40.0, 40.0],
           "rounds": {"sizes": [2, 2, 2, 2], "index": [0, 1, 2, 3], "group": "g"}}
    base = {"samples_us": [5.0, 5.0, 15.0, 15.0, 20.0, 20.0],
            "rounds": {"sizes": [2, 2, 2], "index": [0, 2, 3], "group": "g"}}
    assert record_round_medians(base) == {0: 5.0, 2: 15.0, 3: 20.0}
    assert interleaved_rounds(new, base) == ([10.0, 30.0, 40.0], [5.0, 15.0, 20.0])


@pytest.mark.parametrize("flags,criterion", [
    (["noisy", "rounds-disagree"], {"met": True}),
    (["host-busy", "not-converged"], {"met": False}),
    (["noisy", "host-busy", "not-converged", "rounds-disagree"], {"met": False}),
    (["not-converged", "rounds-disagree"], {}),   # written before `met`
])
def test_in_the_paired_scope_what_the_round_ratios_show_does_not_gate(flags, criterion):
    """noisy, host-busy and not-converged describe pooled samples; the paired interval is
    computed from the round ratios, whose scatter already carries them."""
    rng = np.random.default_rng(22)
    new, base = drifting_pair(rng, factor=1.3)
    new = {**new, "flags": flags, "criterion": criterion,
           "stats": {**new["stats"], "converged": False}}
    assert untrusted_reason(new, paired=True) == ""
    assert untrusted_reason(new) != ""          # the unpaired rule still gates on them
    v = compare_records(new, base)
    assert v.verdict == "slower" and v.paired_rounds == 8, v.reason
    assert set(PAIRED_EXCUSED_FLAGS) == {"noisy", "host-busy", "not-converged",
                                          "rounds-disagree"}


def test_in_the_paired_scope_few_samples_and_a_failed_status_still_gate():
    rng = np.random.default_rng(22)
    new, base = drifting_pair(rng, factor=1.3)
    few = {**new, "flags": ["few-samples"]}
    assert "few-samples" in untrusted_reason(few, paired=True)
    v = compare_records(few, base)
    assert v.verdict == "unsure" and v.reason.startswith("new record")
    for status in ("error", "check-failed"):
        assert compare_records(new, {**base, "status": status}).verdict == "unsure"


def test_a_noisy_host_busy_pair_with_a_planted_1_3x_is_found():
    """Records as this VM writes them under load: six rounds of four samples, 8% lognormal
    noise within a round (the pooled median's CI wider than a 5% target: noisy), a neighbour
    disturbing samples (host-busy: the guard dropped them), the host flipping 1.4x between
    passes."""
    rng = np.random.default_rng(27)
    found = 0
    for _ in range(200):
        new, base = drifting_pair(rng, factor=1.3, rounds=6, per_round=4, sigma=0.08)
        for rec in (new, base):
            rec["flags"] = ["noisy", "host-busy", "not-converged", "rounds-disagree",
                            "wide-spread"]
            rec["criterion"] = {**rec["criterion"], "met": False}
        assert untrusted_reason(new) != ""     # the unpaired rule would not look
        found += compare_records(new, base).verdict == "slower"
    assert found >= 190


def test_rounds_with_fewer_than_two_samples_do_not_pair():
    new = {"samples_us": [10.0, 10.0, 20.0, 30.0, 30.0, 40.0, 40.0],
           "rounds": {"sizes": [2, 1, 2, 2], "index": [0, 1, 2, 3], "group": "g"}}
    base = {"samples_us": [5.0, 5.0, 15.0, 15.0, 20.0, 20.0, 25.0, 25.0],
            "rounds": {"sizes": [2, 2, 2, 2], "index": [0, 1, 2, 3], "group": "g"}}
    assert MIN_ROUND_SAMPLES == 2
    assert record_round_medians(new) == {0: 10.0, 1: 20.0, 2: 30.0, 3: 40.0}
    assert record_round_medians(new, MIN_ROUND_SAMPLES) == {0: 10.0, 2: 30.0, 3: 40.0}
    # round 1 of new is one sample: rounds 0, 2, 3 pair
    assert interleaved_rounds(new, base) == ([10.0, 30.0, 40.0], [5.0, 20.0, 25.0])
    new["rounds"]["sizes"] = [2, 1, 1, 3]
    assert interleaved_rounds(new, base) is None     # two pairable rounds: not enough


def test_too_few_samples_are_unsure_even_when_the_rounds_pair():
    v = compare_paired([130.0, 131.0, 129.0], [100.0, 100.5, 99.5], new_n=3, base_n=30)
    assert v.verdict == "unsure" and "too few samples" in v.reason


def test_an_inconclusive_pairing_of_records_without_drift_falls_back_to_the_unpaired_rule():
    rng = np.random.default_rng(24)
    # three short rounds whose ratios scatter: the 99% t-interval on 2 degrees of freedom is
    # wide; neither record drifted, and 300 samples a side decide unpaired
    sizes = [100, 100, 100]
    base_x = rng.lognormal(math.log(100.0), 0.02, 300)
    new_x = base_x * 1.3 * np.repeat([1.0, 1.25, 0.8], 100)
    new_x[:] = np.concatenate([np.sort(p) for p in np.split(new_x, 3)])
    rec = {"status": "ok", "flags": [], "criterion": {"met": True, "converged": True},
           "stats": {"converged": True}}
    new = {**rec, "samples_us": new_x.tolist(),
           "rounds": {"sizes": sizes, "index": [0, 1, 2], "group": "g"}}
    base = {**rec, "samples_us": base_x.tolist(),
            "rounds": {"sizes": sizes, "index": [0, 1, 2], "group": "g"}}
    paired = compare_paired(*interleaved_rounds(new, base))
    assert paired.verdict == "unsure"
    v = compare_records(new, base)
    assert v.paired_rounds == 0 and "unpaired rule (neither record drifted)" in v.reason
    assert v.verdict == compare_records(without_group(new), without_group(base)).verdict


def test_identical_round_medians_are_the_same_with_a_zero_width_interval():
    v = compare_paired([100.0, 120.0, 140.0], [100.0, 120.0, 140.0])
    assert v.verdict == "same" and v.ratio_ci == (1.0, 1.0) and v.p_value == 1.0


def test_paired_inputs_are_validated():
    with pytest.raises(InvalidCase, match="as many new as base"):
        compare_paired([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(InvalidCase, match="finite positive"):
        compare_paired([1.0, -2.0, 3.0], [1.0, 2.0, 3.0])
    assert compare_paired([1.0, 2.0], [1.0, 2.0]).verdict == "unsure"


# -------------------------------------------------------------------- Student's t, exactly


def test_the_t_distribution_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 5, 8, 13, 30, 100):
        for level in (0.9, 0.95, 0.99):
            assert t_quantile(level, df) == pytest.approx(stats.t.ppf(0.5 + level / 2, df),
                                                          rel=1e-9)
        for t in (0.0, 0.5, 2.0, 6.0):
            assert t_two_sided_p(t, df) == pytest.approx(2 * stats.t.sf(t, df), abs=1e-12)
    with pytest.raises(InvalidCase, match="level"):
        t_quantile(1.0, 3)


# ------------------------------------------------------------ what the Sampler records


class _Steady:
    """A prepared case whose device timer returns ``per_op_us`` (rounds with ``empty`` in
    their number keep no sample: every sample of them is non-finite and dropped)."""

    timers = ("device",)

    def __init__(self, per_op_us: float) -> None:
        from kvmicro.workload import Case

        self.case = Case(op="gather", backend="native:cpu", ctx=64, batch=1)
        self.per_op_us = per_op_us
        self.copies = 1

    def select(self, copy: int) -> None:
        pass

    def run(self) -> None:
        pass

    def sync(self) -> None:
        pass

    def clock_fraction(self):
        return None

    def device_times(self, reps: int, flush_bytes: int = 0) -> list[float]:
        return [self.per_op_us] * reps


def test_interleaved_samplers_record_their_group_and_round_numbers():
    config = MeasureConfig(timer="device", criterion="sample-count", min_samples=9,
                           warmup_count=1, warmup_time_s=0.0, host_guard=False)
    a, b = _Steady(5.0), _Steady(7.0)
    samplers = [Sampler(a, config, HotCache(), interleave_group="g7"),
                Sampler(b, config, HotCache(), interleave_group="g7")]
    passes = 0
    while not all(s.done() for s in samplers):
        for s in samplers:
            if not s.done():
                if s is samplers[1]:
                    b.per_op_us = math.nan if passes == 1 else 7.0
                s.round()
        passes += 1
    ma, mb = (s.result() for s in samplers)
    assert ma.rounds["group"] == mb.rounds["group"] == "g7"
    # interleaved: at least 6 rounds of at least 4 samples (MeasureConfig.interleaved_rounds,
    # min_round_samples), whatever the criterion's 9 samples would ask of 3 rounds
    assert ma.rounds["index"] == list(range(6)) and ma.rounds["sizes"] == [4] * 6
    # b's round 1 kept nothing: its runs of samples are rounds 0, 2, ...
    assert mb.rounds["index"][:2] == [0, 2] and len(mb.rounds["index"]) == len(mb.rounds["sizes"])
    assert ma.criterion["met"] is True
    # a plain back-to-back measurement names no group
    plain = Sampler(_Steady(5.0), config, HotCache())
    while not plain.done():
        plain.round()
    assert "group" not in plain.result().rounds


# ---------------------------------------------------------------- where it is used


def test_the_fastest_layout_mark_pairs_the_rounds_of_one_sweep():
    from kvmicro.report import MARK_FASTEST, MARK_UNSURE, layout_marks

    rng = np.random.default_rng(25)
    slow, fast = drifting_pair(rng, factor=1.3)
    assert layout_marks({"NSHD": fast, "HNSD": slow})["NSHD"] == MARK_FASTEST
    # the same numbers from two separate runs: drift gates, as before
    marks = layout_marks({"NSHD": without_group(fast), "HNSD": without_group(slow)})
    assert marks["NSHD"] == MARK_UNSURE


def test_compare_names_the_interval_the_paired_rule_decided_on():
    from kvmicro.compare import CompareResult, render, verdict

    rng = np.random.default_rng(26)
    new, base = drifting_pair(rng, factor=1.3)
    case = {"backend": "native:cpu", "op": "gather", "batch": 1, "ctx": 64, "layout": "NSHD",
            "timer": "host", "cache": "hot"}
    c = verdict({**base, **case}, {**new, **case})
    assert c.verdict == "slower" and c.detail is not None and c.detail.paired_rounds == 8
    text = render(CompareResult([c], [], [], []))
    assert "ratio [CI]" in text and "99% t-interval of their round-by-round ratios" in text


def test_the_round_fields_a_paired_verdict_reads_are_in_the_schema():
    jsonschema = pytest.importorskip("jsonschema")
    from kvmicro.record import results_schema
    from kvmicro.results import case_record
    from kvmicro.workload import Case

    config = MeasureConfig(timer="device", criterion="sample-count", min_samples=9,
                           warmup_count=1, warmup_time_s=0.0, host_guard=False)
    s = Sampler(_Steady(5.0), config, HotCache(), interleave_group="g1")
    while not s.done():
        s.round()
    line = case_record(Case(op="gather", backend="native:cpu", ctx=64, batch=1), status="ok",
                       measurement=s.result(), device="cpu")
    assert line["rounds"]["group"] == "g1" and line["criterion"]["met"] is True
    validator = jsonschema.Draft202012Validator(results_schema())
    assert [e.message for e in validator.iter_errors(line)] == []
    bad = {**line, "rounds": {**line["rounds"], "group": 7, "index": [-1]}}
    assert len(list(validator.iter_errors(bad))) == 2
