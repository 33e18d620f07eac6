"""Decoding-budget regimes: prefill and decode latency of a synthetic decoder over a grid of
decoding budgets, with cliff detection (``kvmicro regimes``).

For each model (:mod:`kvmicro.decoder`: GPT-2-small, OPT-125m, BLOOM-560m shapes, random
weights), backend and KV-cache mode (on: append + attention over the cache; off: the prefix
recomputed each step), and each decoding budget B of the grid, one *run* is: allocate (untimed),
prefill the prompt (timed: one sample), then B - 1 decode steps (each timed on its own), as
``max_new_tokens=B`` generates B tokens. The timer is ``host``: the device is synchronised before
the start and after the end of each prefill and each step, so a sample is what a synchronous
decode loop pays for that step, launch overhead included.

Runs are interleaved: warm-up rounds first, then round r measures every (mode, budget) once in a
shuffled order, so slow drift of the machine spreads over the grid instead of masquerading as a
slope or a cliff. Every point reports its run count, median, 95% CI of the median and spread
(:class:`~kvmicro.harness.stats.Stats`) of the per-run prefill time and of the per-run mean decode
step; :func:`detect` (:mod:`kvmicro.cliffs`) then looks for intervals of budgets where either
jumps above the curve's trend. ``--refine`` bisects each interval's edges between grid points with
fresh runs and re-measures to confirm.

Before any timing, the backend's decoder is checked against the float64 numpy reference on a
reduced model of the same family, and KV-cache-on logits against KV-cache-off logits on the model
measured; a mismatch stops the run (no timing is recorded for an unchecked implementation).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .cliffs import DEFAULT_RATIO, Analysis, Interval, analyse, detect, refine
from .decoder import (
    CONFIGS,
    DECODER_BACKENDS,
    Decoder,
    ModelConfig,
    get_config,
    make_ops,
    make_weights,
    random_prompt,
)
from .errors import InvalidCase, KvmicroError
from .harness.stats import Stats

SCHEMA_VERSION = 1
TIMER = "host"
PHASES: tuple[str, ...] = ("prefill", "decode")
#: relative logit tolerance (max |err| / max |reference|) by compute dtype
TOLERANCE = {"float64": 1e-9, "float32": 1e-4, "float16": 3e-2, "bfloat16": 6e-2}


@dataclass
class Point:
    """One (model, backend, KV mode, budget): its runs' prefill times and per-step decode times."""

    model: str
    backend: str
    kv_cache: bool
    budget: int
    prefill_us: list[float] = field(default_factory=list)
    #: per run, one time per decode step (budget - 1 of them)
    steps_us: list[list[float]] = field(default_factory=list)

    @property
    def runs(self) -> int:
        return len(self.prefill_us)

    def samples(self, phase: str) -> list[float]:
        """The per-run values a phase's statistics and detection use: the prefill time, or the
        mean decode step time of each run."""
        if phase == "prefill":
            return list(self.prefill_us)
        if phase == "decode":
            return [float(np.mean(s)) for s in self.steps_us]
        raise InvalidCase(f"unknown phase {phase!r}; expected one of {', '.join(PHASES)}")

    def record(self, **extra: Any) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": "regime_point", "schema_version": SCHEMA_VERSION, "model": self.model,
            "backend": self.backend, "kv_cache": self.kv_cache, "budget": self.budget,
            "decode_steps": self.budget - 1, "runs": self.runs, "timer": TIMER, **extra}
        for phase in PHASES:
            s = self.samples(phase)
            out[phase] = {"samples_us": [round(v, 3) for v in s],
                          "stats": Stats.from_samples(s).to_dict() if s else None}
        flat = [v for run in self.steps_us for v in run]
        out["decode"]["step_stats"] = Stats.from_samples(flat).to_dict() if flat else None
        out["decode"]["steps_us"] = [[round(v, 2) for v in run] for run in self.steps_us]
        return out


# ---------------------------------------------------------------------------------- building


def reduced(cfg: ModelConfig) -> ModelConfig:
    """A small model of the same family (same features, 2 layers): for the oracle check."""
    heads = min(cfg.heads, 4)
    return cfg.scaled(layers=2, heads=heads, d_model=16 * heads, d_ff=64 * heads, vocab=512,
                      max_positions=min(cfg.max_positions, 64) if cfg.max_positions else 0)


def check_decoder(cfg: ModelConfig, backend: str, dtype: str | None, seed: int = 0,
                  decoder: Decoder | None = None, steps: int = 3) -> dict[str, Any]:
    """Check ``backend``'s decoder against the float64 reference (reduced model of the family),
    and its KV-cache-on logits against cache-off logits (the model itself, when ``decoder`` is
    given). Returns the errors; raises KvmicroError on a mismatch."""
    small = reduced(cfg)
    w = make_weights(small, seed)
    prompt = random_prompt(small, 5, seed)
    ref = Decoder(small, w, make_ops("numpy:cpu")).logits_trace(prompt, steps, True)
    test = Decoder(small, w, make_ops(backend, dtype))
    tol = TOLERANCE[test.ops.dtype]
    scale = float(np.abs(ref).max())
    result: dict[str, Any] = {"tolerance": tol, "dtype": test.ops.dtype}
    for kv in (True, False):
        err = float(np.abs(test.logits_trace(prompt, steps, kv) - ref).max()) / scale
        result[f"oracle_rel_err_kv_{'on' if kv else 'off'}"] = err
        if not err <= tol:
            raise KvmicroError(f"[regimes] {backend} {cfg.name} (reduced) disagrees with the "
                               f"float64 reference, KV cache {'on' if kv else 'off'}: relative "
                               f"error {err:.3g} > {tol:.3g}")
    if decoder is not None:
        prompt = random_prompt(cfg, 8, seed)
        on = decoder.logits_trace(prompt, steps, True)
        off = decoder.logits_trace(prompt, steps, False)
        err = float(np.abs(on - off).max()) / max(float(np.abs(off).max()), 1e-30)
        result["kv_on_vs_off_rel_err"] = err
        if not err <= 2 * tol:
            raise KvmicroError(f"[regimes] {backend} {cfg.name}: KV-cache-on logits disagree "
                               f"with cache-off logits: relative error {err:.3g} > {2 * tol:.3g}")
    return result


# ---------------------------------------------------------------------------------- timing


def time_run(decoder: Decoder, prompt: np.ndarray, budget: int, kv_cache: bool
             ) -> tuple[float, list[float]]:
    """One run: (prefill µs, [decode step µs] * (budget - 1)), each synchronised."""
    ops = decoder.ops
    clock = time.perf_counter
    decoder.start(prompt, budget, kv_cache)
    t0 = clock()
    decoder.prefill()
    ops.sync()
    prefill = (clock() - t0) * 1e6
    steps = []
    for _ in range(budget - 1):
        t0 = clock()
        decoder.step()
        ops.sync()
        steps.append((clock() - t0) * 1e6)
    return prefill, steps


def measure_points(decoder: Decoder, prompt: np.ndarray, budgets: Sequence[int],
                   kv_modes: Sequence[bool], runs: int, warmup: int, seed: int = 0,
                   progress: Callable[[str], None] | None = None) -> list[Point]:
    """Every (mode, budget) ``runs`` times after ``warmup`` discarded rounds, interleaved in a
    shuffled order per round (see the module docstring)."""
    if runs < 1 or warmup < 0:
        raise InvalidCase(f"[regimes] runs {runs} must be >= 1 and warmup {warmup} >= 0")
    points = {(kv, b): Point(decoder.cfg.name, decoder.ops.backend, kv, b)
              for kv in kv_modes for b in budgets}
    keys = list(points)
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    try:
        for rnd in range(warmup + runs):
            for i in rng.permutation(len(keys)):
                kv, budget = keys[i]
                prefill, steps = time_run(decoder, prompt, budget, kv)
                if rnd >= warmup:
                    points[kv, budget].prefill_us.append(prefill)
                    points[kv, budget].steps_us.append(steps)
            if progress:
                what = "warm-up round" if rnd < warmup else "round"
                k = rnd + 1 if rnd < warmup else rnd - warmup + 1
                of = warmup if rnd < warmup else runs
                progress(f"{decoder.cfg.name} {decoder.ops.backend}: {what} {k}/{of} done "
                         f"({time.perf_counter() - started:.0f} s)")
    except KeyboardInterrupt:
        if progress:
            progress("interrupted: keeping the rounds completed so far")
        for p in points.values():       # keep complete rounds only, so every point has the same n
            n = min(q.runs for q in points.values())
            del p.prefill_us[n:], p.steps_us[n:]
        raise _Interrupted(list(points.values())) from None
    return list(points.values())


class _Interrupted(Exception):
    def __init__(self, points: list[Point]) -> None:
        super().__init__("interrupted")
        self.points = points


def analyse_phase(points: Sequence[Point], phase: str, *, ratio: float = DEFAULT_RATIO
                  ) -> Analysis:
    """Cliff analysis of one phase over one (model, backend, mode)'s budgets."""
    pts = sorted(points, key=lambda p: p.budget)
    return analyse([p.budget for p in pts], [p.samples(phase) for p in pts], ratio=ratio)


def refine_phase(analysis: Analysis, decoder: Decoder, prompt: np.ndarray, kv_cache: bool,
                 phase: str, runs: int) -> list[Interval]:
    """Bisect each interval's edges with ``runs`` fresh runs per probe, then confirm."""

    def measure(budget: float) -> list[float]:
        b = round(budget)
        p = Point(decoder.cfg.name, decoder.ops.backend, kv_cache, b)
        for _ in range(runs):
            prefill, steps = time_run(decoder, prompt, b, kv_cache)
            p.prefill_us.append(prefill)
            p.steps_us.append(steps)
        return p.samples(phase)

    return refine(analysis, measure, resolution=1.0)


# ---------------------------------------------------------------------------------- the command


def parse_budgets(text: str) -> list[int]:
    """``8,16,32`` or ``start:stop:step`` (inclusive), or a mix: ``8:64:8,96,128``."""
    out: list[int] = []
    for item in (t.strip() for t in str(text).split(",")):
        if not item:
            continue
        try:
            if ":" in item:
                parts = [int(v) for v in item.split(":")]
                if len(parts) != 3 or parts[2] < 1:
                    raise ValueError
                out.extend(range(parts[0], parts[1] + 1, parts[2]))
            else:
                out.append(int(item))
        except ValueError:
            raise InvalidCase(f"--budgets: cannot read {item!r}; expected integers or "
                              "start:stop:step, e.g. 8:256:8") from None
    bad = [b for b in out if b < 2]
    if bad:
        raise InvalidCase(f"--budgets: budget {bad[0]} must be >= 2 (one prefill token and at "
                          "least one decode step)")
    budgets = sorted(set(out))
    if len(budgets) < 3:
        raise InvalidCase(f"--budgets: {len(budgets)} budgets; cliff detection needs >= 3")
    return budgets


def _choices(text: str, valid: Iterable[str], what: str) -> list[str]:
    valid = tuple(valid)
    items = [t.strip() for t in text.split(",") if t.strip()]
    for item in items:
        if item not in valid:
            raise InvalidCase(f"--{what}: unknown value {item!r}; expected one of "
                              f"{', '.join(valid)}")
    if not items:
        raise InvalidCase(f"--{what}: nothing given; expected any of {', '.join(valid)}")
    return items


def _kv_modes(text: str) -> list[bool]:
    return [m == "on" for m in _choices(text, ("on", "off"), "kv")]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``kvmicro regimes`` options (cli.py calls this and :func:`cmd_regimes`)."""
    p.add_argument("--model", default="gpt2",
                   help=f"comma-separated: {', '.join(CONFIGS)} (default gpt2)")
    p.add_argument("--backend", default="torch:cpu",
                   help=f"one of {', '.join(DECODER_BACKENDS[1:])} (default torch:cpu)")
    p.add_argument("--dtype", help="float32 (CPU default), float16 (GPU default), bfloat16")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens (default 32)")
    p.add_argument("--budgets", default="8:128:8",
                   help="decoding budgets (max new tokens): list or start:stop:step "
                   "(default 8:128:8)")
    p.add_argument("--kv", default="on,off", help="KV cache modes: on, off or on,off (default)")
    p.add_argument("--runs", type=int, default=10, help="timed runs per point (default 10)")
    p.add_argument("--warmup", type=int, default=1, help="discarded rounds first (default 1)")
    p.add_argument("--threads", type=int, help="torch:cpu intra-op threads (1 avoids "
                   "spinning thread pools on a shared machine)")
    p.add_argument("--layers", type=int, help="override the layer count (smaller, faster)")
    p.add_argument("--vocab", type=int, help="override the vocabulary size")
    p.add_argument("--ratio", type=float, default=DEFAULT_RATIO,
                   help=f"spike ratio over the baseline that counts (default {DEFAULT_RATIO})")
    p.add_argument("--refine", action="store_true",
                   help="bisect each interval's edges between grid points and re-measure")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="results JSONL (default results/regimes-<timestamp>.jsonl)")
    p.add_argument("--plot", metavar="PNG", help="draw the curves with intervals shaded")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``regimes`` to the ``kvmicro`` subcommands (``sub``: argparse's subparsers)."""
    p = sub.add_parser("regimes", help="decode latency over decoding budgets of a synthetic "
                       "GPT-2/OPT/BLOOM-shaped decoder, with cliff detection",
                       description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.set_defaults(func=cmd_regimes)
    return p


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> tuple[Path, list[dict[str, Any]], bool]:
    """Run ``kvmicro regimes``; returns the results path, its interval records, and whether it
    was interrupted."""
    from .results import dumps, provenance

    models = _choices(args.model, CONFIGS, "model")
    if args.backend not in DECODER_BACKENDS:
        raise InvalidCase(f"--backend: unknown decoder backend {args.backend!r}; expected one "
                          f"of {', '.join(DECODER_BACKENDS)}")
    budgets = parse_budgets(args.budgets)
    kv_modes = _kv_modes(args.kv)
    if args.runs < 1:
        raise InvalidCase(f"--runs {args.runs} must be >= 1 (6 or more for a 95% CI)")
    if args.warmup < 0:
        raise InvalidCase(f"--warmup {args.warmup} must be >= 0")
    if args.prompt < 1:
        raise InvalidCase(f"--prompt {args.prompt} must be >= 1")
    if not args.ratio > 1:
        raise InvalidCase(f"--ratio {args.ratio} must be > 1")
    cfgs = [get_config(m, layers=args.layers, vocab=args.vocab) for m in models]
    for cfg in cfgs:
        cfg.check_length(args.prompt + max(budgets))
    out = Path(args.out) if args.out else Path("results") / time.strftime(
        "regimes-%Y%m%d-%H%M%S.jsonl")
    if out.exists():
        raise InvalidCase(f"{out} exists; choose another --out")
    progress = None if args.quiet else _say
    make_ops(args.backend, args.dtype, args.threads)  # Unsupported here, before any work, names why
    out.parent.mkdir(parents=True, exist_ok=True)
    intervals: list[dict[str, Any]] = []
    interrupted = False
    all_points: dict[tuple[str, bool], list[Point]] = {}
    analyses: dict[tuple[str, bool, str], Analysis] = {}
    with out.open("w") as fh:
        def write(rec: dict[str, Any]) -> None:
            fh.write(dumps(rec) + "\n")
            fh.flush()

        run_line = provenance(["kvmicro", *getattr(args, "argv", [])], [], {})
        run_line.update(command="regimes", timer=TIMER, budgets=budgets, prompt=args.prompt,
                        runs=args.runs, warmup=args.warmup, ratio=args.ratio,
                        decoder_backend=args.backend)
        write(run_line)
        for cfg in cfgs:
            t0 = time.perf_counter()
            ops = make_ops(args.backend, args.dtype, args.threads)
            decoder = Decoder(cfg, make_weights(cfg, args.seed), ops)
            check = check_decoder(cfg, args.backend, args.dtype, args.seed, decoder)
            if progress:
                progress(f"{cfg.name} {args.backend} {ops.dtype}: {cfg.parameters / 1e6:.0f}M "
                         f"parameters, checked (max relative error "
                         f"{max(v for k, v in check.items() if 'err' in k):.2g}) in "
                         f"{time.perf_counter() - t0:.1f} s")
            prompt = random_prompt(cfg, args.prompt, args.seed)
            try:
                points = measure_points(decoder, prompt, budgets, kv_modes, args.runs,
                                        args.warmup, args.seed, progress)
            except _Interrupted as stop:
                points, interrupted = stop.points, True
            extra = {"dtype": ops.dtype, "prompt": args.prompt, "layers": cfg.layers,
                     "vocab": cfg.vocab, "check": check, "seed": args.seed,
                     "threads": args.threads}
            for p in sorted(points, key=lambda q: (not q.kv_cache, q.budget)):
                if p.runs:
                    write(p.record(**extra))
            for kv in kv_modes:
                pts = [p for p in points if p.kv_cache == kv and p.runs]
                all_points[cfg.name, kv] = pts
                if len(pts) < 3:
                    continue
                for phase in PHASES:
                    a = analyse_phase(pts, phase, ratio=args.ratio)
                    analyses[cfg.name, kv, phase] = a
                    found = a.intervals
                    if args.refine and found and not interrupted:
                        found = refine_phase(a, decoder, prompt, kv, phase, args.runs)
                    rec = {"type": "regime_intervals", "schema_version": SCHEMA_VERSION,
                           "model": cfg.name, "backend": args.backend, "dtype": ops.dtype,
                           "kv_cache": kv, "phase": phase, "ratio_threshold": args.ratio,
                           "runs": min(p.runs for p in pts),
                           "intervals": [iv.to_dict() for iv in found]}
                    write(rec)
                    intervals.append(rec)
            del decoder
            if interrupted:
                break
    if args.plot:
        plot(all_points, analyses, args.plot)
    return out, intervals, interrupted


def summary(intervals: Sequence[dict[str, Any]]) -> str:
    """One line per (model, mode, phase): flat, or each interval with its ratio and CI."""
    lines = []
    for rec in intervals:
        head = (f"{rec['model']} {rec['backend']} KV {'on ' if rec['kv_cache'] else 'off'} "
                f"{rec['phase']:<7} (n={rec['runs']}):")
        if not rec["intervals"]:
            lines.append(f"{head} flat (no point above {rec['ratio_threshold']:g}x the baseline "
                         "with separated CIs)")
        for iv in rec["intervals"]:
            span = (f"budget {iv['start']:g}" if iv["start"] == iv["end"]
                    else f"budgets {iv['start']:g}-{iv['end']:g}")
            conf = ("" if iv["confirmed"] is None
                    else " confirmed" if iv["confirmed"] else " NOT confirmed on re-measure")
            lines.append(f"{head} cliff at {span}: {iv['ratio']:.2f}x at {iv['peak']:g} "
                         f"(95% CI {iv['ratio_ci'][0]:.2f}-{iv['ratio_ci'][1]:.2f}){conf}")
    return "\n".join(lines)


def cmd_regimes(args: argparse.Namespace) -> int:
    """The ``kvmicro regimes`` command: exit 0, or 130 when interrupted (Ctrl-C or SIGTERM:
    the rounds completed so far are written and analysed)."""
    import signal

    def sigterm_as_interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, sigterm_as_interrupt)
    try:
        out, intervals, interrupted = run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(summary(intervals), flush=True)
    _say(f"kvmicro regimes: wrote {out}")
    return 130 if interrupted else 0


# ---------------------------------------------------------------------------------- reading


def read(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """A regimes results file: (run line, point records, interval records)."""
    run_line: dict[str, Any] = {}
    points, intervals = [], []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise InvalidCase(f"{path}:{n}: not a JSON line") from None
        kind = rec.get("type")
        if kind == "run":
            run_line = rec
        elif kind == "regime_point":
            points.append(rec)
        elif kind == "regime_intervals":
            intervals.append(rec)
    return run_line, points, intervals


# ---------------------------------------------------------------------------------- plot


def plot(points: dict[tuple[str, bool], list[Point]],
         analyses: dict[tuple[str, bool, str], Analysis], path: str | Path) -> Path | None:
    """Median and 95% CI per budget, the baseline, and detected intervals shaded; one panel per
    (model, KV mode, phase). Needs matplotlib (the ``plot`` extra); without it, says so and
    returns None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _say("kvmicro regimes: matplotlib is not installed (pip install kvmicro[plot]); "
             "no plot drawn")
        return None
    keys = [k for k in analyses]
    if not keys:
        return None
    cols = 2
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(11, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        model, kv, phase = key
        a = analyses[key]
        med = np.asarray([s.median_us for s in a.stats]) / 1e3
        lo = np.asarray([s.ci95_lo_us for s in a.stats]) / 1e3
        hi = np.asarray([s.ci95_hi_us for s in a.stats]) / 1e3
        ax.errorbar(a.x, med, yerr=[med - lo, hi - med], fmt="o-", ms=3, lw=1, capsize=2,
                    label="median, 95% CI")
        ax.plot(a.x, a.baseline / 1e3, "--", color="grey", lw=1, label="baseline")
        step = float(np.min(np.diff(a.x))) if a.x.size > 1 else 1.0
        for iv in a.intervals:
            ax.axvspan(iv.start - step / 2, iv.end + step / 2, color="red", alpha=0.2)
        unit = "ms per step" if phase == "decode" else "ms"
        ax.set_title(f"{model}, KV cache {'on' if kv else 'off'}: {phase}", fontsize=9)
        ax.set_xlabel("decoding budget (tokens)")
        ax.set_ylabel(unit)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    _say(f"kvmicro regimes: wrote {out}")
    return out


__all__ = [
    "PHASES",
    "TIMER",
    "Point",
    "add_arguments",
    "add_parser",
    "analyse_phase",
    "check_decoder",
    "cmd_regimes",
    "detect",
    "measure_points",
    "parse_budgets",
    "plot",
    "read",
    "refine_phase",
    "run",
    "summary",
    "time_run",
]
