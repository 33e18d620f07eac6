#!/usr/bin/env python3
"""Calibrate kvmicro's verdicts (src/kvmicro/verdict.py) on this machine: an A/A test and a
planted slowdown.

1. Run the same sweep ``--repeats`` times back to back (optionally with one core kept busy by a
   background Python loop: ``--busy``): by default the inline sweep (:func:`inline_sweep`: 28
   native:cpu cases, one kernel thread, host timer, hot cache, rounds interleaved across the
   cases), or ``--engine cli``: ``kvmicro sweep --sweep-args ...`` as a user runs it.
2. A/A: compare every pair of those identical sweeps case by case (``compare_records``; "across",
   the unpaired rule: nothing pairs the rounds of two sweeps; allowing, as ``kvmicro compare
   BASE NEW`` does, for the drift between the two sweeps that their matched cases show,
   ``between_runs_sd``, after the run's host factor from the records' host-speed references,
   ``between_runs_host_factor``, is divided out; "across_without_drift": neither), and, for the
   inline sweep, the two interleaved arms of each sweep ("within": their records share a
   ``rounds.group``, so ``compare_records`` applies the paired rule where they share 3 rounds or
   more;
   "within_unpaired": the same pairs under the unpaired rule, for comparison): any faster or
   slower verdict is false. The target is at most 1% of the matched cases.
3. Planted slowdown: the same pairs, with every sample of the NEW record multiplied by
   ``--factor`` (default 1.3; the record's statistics scaled alike, its flags kept: spread and
   convergence do not change with the scale). A slower verdict finds it; the target is at least
   95% of the matched cases.

    python scripts/calibrate_verdicts.py --repeats 4 --out results/calibration
    python scripts/calibrate_verdicts.py --repeats 4 --busy --out results/calibration
    python scripts/calibrate_verdicts.py --from results/calibration/quiet-*.jsonl \
        [--summary docs/calibration/here-quiet-native-cpu.json]

Every matched case counts, including those whose records did not converge or errored (those
are unsure or n/a: never false, never found). The summary goes to stdout and, as JSON, to
``OUT/summary-{quiet,busy}-{native-cpu,native-cuda,cli}.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from kvmicro.compare import between_runs, verdict  # noqa: E402
from kvmicro.record import record_key  # noqa: E402
from kvmicro.results import read_results  # noqa: E402
from kvmicro.verdict import (  # noqa: E402
    interleaved_rounds,
    scaled_record,
    untrusted_reason,
)

DEFAULT_SWEEP = ("--backend native:cpu --preset quick --dtype float32 --cache hot")


def plant(record: dict[str, Any], factor: float) -> dict[str, Any]:
    """``record`` as if every sample had taken ``factor`` times as long (its host-speed
    reference kept: a planted slowdown is the code's, not the host's)."""
    return scaled_record(record, factor)


def inline_cases(backend: str = "native:cpu") -> list[Any]:
    """The inline sweep's grid: the quick preset's shape (Hq 32, Hkv 8, D 128, float32, reverse
    placement, block 16) at ctx 256 and 1024, batch 1 and 4, for four ops and two layouts."""
    from kvmicro.workload import Case

    cases = []
    for ctx in (256, 1024):
        for batch in (1, 4):
            cases.append(Case(op="sdpa_contiguous", backend=backend, ctx=ctx, batch=batch,
                              dtype="float32", placement="reverse"))
            for op in ("gather", "paged_sdpa", "append"):
                for layout in ("NSHD", "HNSD"):
                    cases.append(Case(op=op, backend=backend, ctx=ctx, batch=batch,
                                      layout=layout, dtype="float32", placement="reverse"))
    return cases


def inline_sweep(paths: tuple[Path, Path], max_time_s: float, threads: int,
                 backend_name: str = "native:cpu", timer: str = "", rounds: int = 3,
                 min_samples: int = 10, interleaved_rounds: int | None = None,
                 min_round_samples: int | None = None) -> None:
    """One sweep of :func:`inline_cases` on native:cpu with ``threads`` kernel threads (host
    timer, hot cache), or on native:cuda (device timer: CUDA events, hot cache): every case
    prepared and checked against the oracle once, then measured
    as two identical arms (two Samplers on the same prepared case), every arm's rounds
    interleaved with every other's (one round of each in turn, as a runner interleaves a shape
    group's cases, so that drift of the host lands in both arms alike). Arm A's records go to
    ``paths[0]``, arm B's to ``paths[1]``, each written as ``kvmicro sweep`` writes it."""
    from kvmicro.backends.native import NativeCpuBackend, NativeCudaBackend
    from kvmicro.check import compare
    from kvmicro.harness.cache import HotCache
    from kvmicro.harness.measure import MeasureConfig, Sampler, interleaved_order
    from kvmicro.harness.noise import host_load
    from kvmicro.results import ResultsWriter, case_record
    from kvmicro.workload import materialize

    # None: MeasureConfig's defaults, as a sweep has them
    sampling = {k: v for k, v in (("interleaved_rounds", interleaved_rounds),
                                  ("min_round_samples", min_round_samples)) if v is not None}
    cuda = backend_name == "native:cuda"
    backend = NativeCudaBackend() if cuda else NativeCpuBackend(threads=threads)
    config = MeasureConfig(timer=timer or ("device" if cuda else "host"), cache="hot", noise=0.05,
                           min_samples=min_samples,
                           max_time_s=max_time_s, warmup_count=3, warmup_time_s=0.05,
                           rounds=rounds, **sampling)
    prepared, samplers = [], []
    # every arm's rounds are interleaved with every other's: one group, as a runner's chunk
    group = uuid.uuid4().hex[:16]
    for case in inline_cases(backend_name):
        arrays = materialize(case)
        p = backend.prepare(case, arrays)
        p.run()
        p.sync()
        check = compare(case, arrays, p.output())
        if not check.passed:
            raise SystemExit(f"{case.op} {case.layout}: check failed: {check}")
        prepared.append((case, p, check))
        samplers.append((Sampler(p, config, HotCache(), interleave_group=group),
                         Sampler(p, config, HotCache(), interleave_group=group)))
    every = [s for pair in samplers for s in pair]
    passes = 0
    while not all(s.done() for s in every):
        # as the runner does: every other pass in reverse (arm B first), so neither arm always
        # runs right after the other
        for s in interleaved_order(every, passes):
            if not s.done():
                s.round()
        passes += 1
    provenance = {"argv": ["calibrate_verdicts.py", "inline", f"threads={threads}"],
                  "host_load": host_load()}
    with ResultsWriter(paths[0], provenance) as a, ResultsWriter(paths[1], provenance) as b:
        for (case, p, check), (arm_a, arm_b) in zip(prepared, samplers, strict=True):
            for writer, arm in ((a, arm_a), (b, arm_b)):
                writer.write(case_record(case, status="ok", measurement=arm.result(),
                                         check=check.to_dict(), device=backend_name))
            p.release()


def run_sweeps(repeats: int, out_dir: Path, label: str, sweep_args: str, busy: bool,
               engine: str, max_time_s: float, threads: int, backend: str,
               timer: str = "", rounds: int = 3, min_samples: int = 10,
               interleaved_rounds: int | None = None,
               min_round_samples: int | None = None) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    loop = None
    if busy:
        # one core kept busy, as a user's other work would
        loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    paths = []
    try:
        for i in range(repeats):
            tag = engine if engine == "cli" else backend.replace(":", "-") + (f"-{timer}" if timer
                                                                            else "")
            path = out_dir / f"{label}-{tag}-{i}.jsonl"
            twin = out_dir / f"{label}-{tag}-{i}-b.jsonl"
            for p in (path, twin):
                if p.exists():
                    p.unlink()
            start = time.monotonic()
            if engine == "inline":
                inline_sweep((path, twin), max_time_s, threads, backend, timer, rounds,
                             min_samples, interleaved_rounds, min_round_samples)
                status = "ok"
            else:
                argv = [sys.executable, "-m", "kvmicro", "sweep", *shlex.split(sweep_args),
                        "--out", str(path), "-q"]
                done = subprocess.run(argv, env=env, stderr=subprocess.PIPE, text=True)
                status = f"exit {done.returncode}"
            print(f"sweep {i + 1}/{repeats} ({label}, {engine}): {status}, "
                  f"{time.monotonic() - start:.0f} s -> {path}", file=sys.stderr)
            paths.append(path)
    finally:
        if loop is not None:
            loop.terminate()
            loop.wait()
    return paths


def unpaired(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` without its interleave group: compare_records then applies the unpaired rule."""
    rounds = record.get("rounds")
    if not isinstance(rounds, dict) or "group" not in rounds:
        return record
    return {**record, "rounds": {k: v for k, v in rounds.items() if k != "group"}}


#: per pair of two runs, what ``compare BASE NEW`` allows for: (A/A host factor, A/A drift,
#: planted host factor, planted drift) - compare.between_runs
RunAllowance = tuple[float | None, float | None, float | None, float | None]


def _tally(pairs: list[tuple[dict[str, Any], dict[str, Any]]], threshold: float,
           factor: float, pairing: bool = True,
           allowances: list[RunAllowance] | None = None) -> dict[str, Any]:
    """A/A and planted verdicts over (base, new) record pairs; ``pairing`` False: under the
    unpaired rule even where the records' rounds were interleaved. ``allowances``: per pair,
    the host factor and drift between the two runs that ``compare BASE NEW`` allows for."""
    aa: Counter[str] = Counter()
    planted: Counter[str] = Counter()
    both_ok = trusted = paired = by_paired = eligible = found_eligible = 0
    for i, (b, n) in enumerate(pairs):
        if not pairing:
            b, n = unpaired(b), unpaired(n)
        aa_host, aa_drift, planted_host, planted_drift = \
            allowances[i] if allowances else (None, None, None, None)
        aa[verdict(b, n, threshold * 100.0, aa_drift, aa_host).verdict] += 1
        found = verdict(b, plant(n, factor), threshold * 100.0, planted_drift, planted_host)
        planted[found.verdict] += 1
        both_ok += n.get("status") == "ok" and b.get("status") == "ok"
        trusted += not untrusted_reason(n) and not untrusted_reason(b)
        pair = interleaved_rounds(n, b) is not None
        paired += pair
        by_paired += found.verdict == "slower" and found.detail is not None \
            and found.detail.paired_rounds > 0
        # eligible: the pair passes the gates of the rule that applies to it
        ok = not untrusted_reason(n, paired=pair) and not untrusted_reason(b, paired=pair)
        eligible += ok
        found_eligible += ok and found.verdict == "slower"
    matched = sum(aa.values())
    false = aa["faster"] + aa["slower"]
    return {"rule": "paired where interleaved" if pairing else "unpaired",
            "matched": matched, "both_ok": both_ok, "both_trusted": trusted,
            "interleaved": paired, "planted_found_by_paired_rule": by_paired,
            "eligible": eligible, "planted_found_among_eligible": found_eligible,
            "aa": dict(aa), "aa_false": false,
            "aa_false_pct": 100.0 * false / matched if matched else None,
            "planted": dict(planted),
            "planted_found_pct": 100.0 * planted["slower"] / matched if matched else None}


def analyse(paths: list[Path], threshold: float, factor: float) -> dict[str, Any]:
    """``across``: every pair of sweeps (``compare BASE NEW``); ``within``: the two interleaved
    arms of each inline sweep (what the report's fastest-layout mark compares)."""
    sweeps = []
    for path in paths:
        _, records = read_results(path)
        sweeps.append({record_key(r): r for r in records})
    across: list[tuple[dict[str, Any], dict[str, Any]]] = []
    allowances: list[RunAllowance] = []
    for base, new in itertools.combinations(sweeps, 2):
        matched = [(base[k], new[k]) for k in new if k in base]
        # what compare BASE NEW allows for between these two sweeps, from their matched cases
        # as compare sees them (A/A, and with NEW planted)
        aa_hosts, aa_drift = between_runs([(n, b) for b, n in matched])
        planted_hosts, planted_drift = between_runs([(plant(n, factor), b) for b, n in matched])
        across += matched
        allowances += [(h, aa_drift, p, planted_drift)
                       for h, p in zip(aa_hosts, planted_hosts, strict=True)]
    within = []
    for path, sweep in zip(paths, sweeps, strict=True):
        twin = path.with_name(path.stem + "-b.jsonl")
        if twin.exists():
            other = {record_key(r): r for r in read_results(twin)[1]}
            within += [(sweep[k], other[k]) for k in sweep if k in other]
    flags: Counter[str] = Counter()
    for sweep in sweeps:
        for r in sweep.values():
            flags.update(r.get("flags") or [])
            flags["records"] += 1
            flags[f"status {r.get('status')}"] += 1
    out: dict[str, Any] = {"files": [str(p) for p in paths], "threshold": threshold,
                           "factor": factor, "record_flags": dict(flags),
                           "across": _tally(across, threshold, factor,
                                            allowances=allowances),
                           "across_without_drift": _tally(across, threshold, factor)}
    if within:
        out["within"] = _tally(within, threshold, factor)
        out["within_unpaired"] = _tally(within, threshold, factor, pairing=False)
    return out


def describe(label: str, s: dict[str, Any]) -> str:
    lines = [f"{label}: {len(s['files'])} identical sweeps, threshold {s['threshold'] * 100:g}%, "
             f"planted {s['factor']:g}x"]
    for scope, what in (("within", "two interleaved arms of one sweep, paired rule"),
                        ("within_unpaired", "the same pairs under the unpaired rule"),
                        ("across", "pairs of sweeps run one after the other, unpaired rule "
                                   "allowing for the drift between them (compare BASE NEW)"),
                        ("across_without_drift", "the same pairs, the drift not allowed for")):
        t = s.get(scope)
        if not t:
            continue
        lines += [
            f"  {scope} ({what}): {t['matched']} case pairs, {t['both_ok']} both ok, "
            f"{t['both_trusted']} both trusted (converged, no untrusting flag), "
            f"{t.get('interleaved', 0)} with >= 3 interleaved rounds in common, "
            f"{t.get('eligible', 0)} eligible (pass the gates of the rule that applies)",
            f"    A/A: false faster/slower {t['aa_false']} ({t['aa_false_pct']:.2f}%); "
            + ", ".join(f"{k} {v}" for k, v in sorted(t["aa"].items())),
            f"    planted: found (slower) {t['planted'].get('slower', 0)} "
            f"({t['planted_found_pct']:.1f}%); "
            + ", ".join(f"{k} {v}" for k, v in sorted(t["planted"].items()))
            + (f"; {t['planted_found_by_paired_rule']} of them by the paired rule"
               if t.get("planted_found_by_paired_rule") else ""),
        ]
    lines.append("  record flags: " + ", ".join(f"{k} {v}"
                                                for k, v in sorted(s["record_flags"].items())))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=4, help="identical sweeps (default 4)")
    parser.add_argument("--busy", action="store_true",
                        help="keep one core busy with a background Python loop meanwhile")
    parser.add_argument("--engine", choices=("inline", "cli"), default="inline",
                        help="inline (default): the cases of inline_cases() measured in this "
                        "process with interleaved rounds; cli: `kvmicro sweep --sweep-args`")
    parser.add_argument("--backend", choices=("native:cpu", "native:cuda"), default="native:cpu",
                        help="inline: native:cpu (host timer) or native:cuda (device timer)")
    parser.add_argument("--timer", default="",
                        help="inline: the timer (default host on native:cpu, device on "
                        "native:cuda; batched, graph: k ops per sample)")
    parser.add_argument("--threads", type=int, default=1,
                        help="inline: native:cpu kernel threads (default 1; 0: all cores)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="inline: the fewest rounds a case's samples are spread over "
                        "(MeasureConfig.rounds, default 3 as in a sweep)")
    parser.add_argument("--min-samples", type=int, default=10,
                        help="inline: the criterion's fewest samples (default 10, as in a sweep)")
    parser.add_argument("--interleaved-rounds", type=int, default=None,
                        help="inline: the fewest rounds of an interleaved case "
                        "(MeasureConfig.interleaved_rounds; default: a sweep's, 6; 1: none extra)")
    parser.add_argument("--min-round-samples", type=int, default=None,
                        help="inline: the fewest samples an interleaved round aims at "
                        "(MeasureConfig.min_round_samples; default: a sweep's, 4)")
    parser.add_argument("--max-time", type=float, default=0.5,
                        help="inline: seconds of sampling per case (default 0.5)")
    parser.add_argument("--sweep-args", default=DEFAULT_SWEEP,
                        help=f"cli: the sweep's arguments (default: {DEFAULT_SWEEP})")
    parser.add_argument("--out", default="results/calibration", help="directory for the files")
    parser.add_argument("--from", dest="files", nargs="+", metavar="FILE",
                        help="analyse these results files instead of sweeping")
    parser.add_argument("--summary", metavar="JSON",
                        help="with --from: write the summary here too (re-analysing files with "
                        "the current verdict rule)")
    parser.add_argument("--threshold", type=float, default=5.0, help="percent (default 5)")
    parser.add_argument("--factor", type=float, default=1.3, help="planted slowdown (1.3)")
    args = parser.parse_args(argv)
    label = "busy" if args.busy else "quiet"
    if args.files:
        # an inline sweep's arm-B file travels with its arm-A file, not as a sweep of its own
        paths = [Path(f) for f in args.files if not f.endswith("-b.jsonl")]
    else:
        if args.repeats < 2:
            parser.error("--repeats must be at least 2 (an A/A test compares pairs)")
        paths = run_sweeps(args.repeats, Path(args.out), label, args.sweep_args, args.busy,
                           args.engine, args.max_time, args.threads, args.backend,
                           args.timer, args.rounds, args.min_samples,
                           args.interleaved_rounds, args.min_round_samples)
    summary = analyse(paths, args.threshold / 100.0, args.factor)
    summary.update(label=label, busy=args.busy, engine=args.engine,
                   **({"sweep_args": args.sweep_args} if args.engine == "cli" else
                      {"backend": args.backend, "threads": args.threads,
                       "timer": args.timer or "default", "max_time_s": args.max_time,
                       "rounds": args.rounds, "min_samples": args.min_samples,
                       "interleaved_rounds": args.interleaved_rounds,
                       "min_round_samples": args.min_round_samples}))
    print(describe(label, summary))
    if args.files and args.summary:
        Path(args.summary).write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.summary}", file=sys.stderr)
    if not args.files:
        tag = args.engine if args.engine == "cli" else args.backend.replace(":", "-") + (
            f"-{args.timer}" if args.timer else "")
        target = Path(args.out) / f"summary-{label}-{tag}.json"
        target.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {target}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
