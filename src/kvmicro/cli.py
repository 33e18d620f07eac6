"""The ``kvmicro`` command (also ``python -m kvmicro``): wiring only, stdlib argparse.

    kvmicro env                      host, devices, every backend: available or why not
    kvmicro check [--backend B]      every op x odd shape x backend against the float64 oracle
    kvmicro sweep [--preset quick]   measure a grid of cases into a JSONL results file
    kvmicro report FILE...           tables (text / Markdown), CSV, plots
    kvmicro compare BASE NEW         per-case verdicts (faster/slower/same/unsure); exit 1 on a
                                     slowdown, 2 when nothing matched
    kvmicro compare FILE... --new-backend native:cuda --base-backend cudnn:cuda,flashinfer:cuda
                                     the same, a backend against the fastest of its peers
    kvmicro merge FILE... --out F    join shards into one file
    kvmicro agree FILE...            cross-device agreement of a sweep --agreement file; exit 1
                                     when a device differs beyond noise
    kvmicro adr fill ADR.md [--check] / adr new --title T --results FILE...
                                     decision records filled from results files
    kvmicro regimes --model gpt2     decode latency over decoding budgets, cliffs detected
    kvmicro contention --load 4      a case at each priority with and without background load

Bad input prints one line ``kvmicro: error: ...`` on stderr and exits 2; so does a compare where
nothing matched or a named backend matches no record. A check mismatch, a sweep error record, a
sweep with no ok record or a compare slowdown exits 1; Ctrl-C during a sweep exits 130 with a
valid file. ``kvmicro --version`` prints the version.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .errors import InvalidCase, KvmicroError, Unsupported

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """Bad command-line input; printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _print(text: str = "", file: Any = None) -> None:
    print(text, file=file if file is not None else sys.stdout, flush=True)


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ env


def cmd_env(args: argparse.Namespace) -> int:
    from .backends.registry import BACKEND_NAMES, get_backend
    from .environment import host_info

    info: dict[str, Any] = {"host": host_info(), "backends": {}}
    for name in BACKEND_NAMES:
        entry: dict[str, Any] = {}
        try:
            backend = get_backend(name)
            avail = backend.availability()
            entry["available"] = bool(avail)
            entry["reason" if not avail else "note"] = avail.reason
            if avail:
                dev = backend.device_info()
                entry["device"] = {"name": dev.name, "kind": dev.kind,
                                   "cache_bytes": dev.cache_bytes,
                                   "memory_bytes": dev.memory_bytes, **dev.extra}
                entry["versions"] = backend.versions()
        except Exception as exc:   # a backend module that cannot import is "not available"
            entry = {"available": False, "reason": f"{type(exc).__name__}: {exc}"}
        info["backends"][name] = entry
    if args.json:
        _print(json.dumps(info, indent=2, default=str))
        return EXIT_OK
    _print("host:")
    for key, value in info["host"].items():
        _print(f"  {key}: {_flat(value)}")
    _print("backends:")
    width = max(len(n) for n in info["backends"])
    for name, entry in info["backends"].items():
        if entry["available"]:
            dev = entry.get("device", {})
            note = f" ({entry['note']})" if entry.get("note") else ""
            _print(f"  {name:<{width}}  available{note}: {dev.get('name', '?')}")
            extra = {k: v for k, v in dev.items() if k not in ("name",) and v}
            if extra:
                _print(f"  {'':<{width}}  {_flat(extra)}")
        else:
            _print(f"  {name:<{width}}  not available: {entry['reason']}")
    return EXIT_OK


def _flat(value: Any, nested: bool = False) -> str:
    if isinstance(value, dict):
        text = ", ".join(f"{k}={_flat(v, True)}" for k, v in value.items())
        return f"{{{text}}}" if nested else text
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


# ---------------------------------------------------------------------------------------- check


def _selected_backends(spec: str | None) -> list[str]:
    """``--backend`` for check: default every available backend; a named one must be available."""
    from .backends.registry import available_backends, get_backend, resolve

    if not spec:
        names = available_backends()
        if not names:
            raise Unsupported("no backend is available here (see `kvmicro env`)")
        return names
    names = resolve(spec)
    for name in names:
        avail = get_backend(name).availability()
        if not avail:
            raise Unsupported(f"backend {name} is not available here: {avail.reason}")
    return names


def cmd_check(args: argparse.Namespace) -> int:
    from .check import check_matrix
    from .runner import Runner
    from .workload import OPS

    ops = OPS if not args.op else tuple(_split(args.op, OPS, "op"))
    backends = _selected_backends(args.backend)
    tally: dict[str, Counter[str]] = {b: Counter() for b in backends}
    skipped: dict[str, Counter[str]] = {b: Counter() for b in backends}
    worst: dict[str, dict[tuple[str, str], tuple[float, float]]] = {b: {} for b in backends}
    failures = 0
    start = time.monotonic()
    runner = Runner()   # the sweep's path: prepare, run once, check against the oracle
    for base in check_matrix(ops, quick=args.quick):
        for name in backends:
            case = base.with_(backend=name)
            tally[name]["cases"] += 1
            status, reason, result = runner.check_case(case)
            if status == "skipped":
                skipped[name][reason] += 1
                continue
            if result is None:
                failures += 1
                tally[name]["errors"] += 1
                _print(f"ERROR {_case_label(case)}: {reason}")
                continue
            kind = "attention" if result.tolerance > 0 else "exact"
            key = (case.dtype, kind)
            prev = worst[name].get(key, (0.0, result.tolerance))
            worst[name][key] = (max(prev[0], result.max_abs_err), result.tolerance)
            if result.passed:
                tally[name]["passed"] += 1
            else:
                failures += 1
                tally[name]["failed"] += 1
                detail = f" ({result.detail})" if result.detail else ""
                _print(f"FAIL  {_case_label(case)}: max |err| {result.max_abs_err:.3g} > "
                       f"tolerance {result.tolerance:.3g}{detail}")
    for name in backends:
        t = tally[name]
        n_skip = sum(skipped[name].values())
        _print(f"{name}: {t['cases']} cases, {t['passed']} passed, {t['failed']} failed, "
               f"{t['errors']} errors, {n_skip} skipped")
        for reason, count in sorted(skipped[name].items()):
            _print(f"  skipped x{count}: {reason}")
        for (dtype, kind), (err, tol) in sorted(worst[name].items()):
            verdict = "ok" if err <= tol else "MISMATCH"
            _print(f"  {dtype:<9} {kind:<9} max |err| {err:.3g} (tolerance {tol:.3g}) {verdict}")
    _print(f"check {'FAILED' if failures else 'passed'} in {time.monotonic() - start:.1f} s")
    return EXIT_FAIL if failures else EXIT_OK


def _case_label(case: Any) -> str:
    ctx = case.ctx if isinstance(case.ctx, int) else "+".join(map(str, case.ctx_list))
    return (f"{case.op} {case.backend} {case.layout} {case.placement} B{case.batch} "
            f"Hq{case.q_heads} Hkv{case.kv_heads} D{case.head_dim} ctx{ctx} "
            f"bs{case.block_size} {case.dtype}")


def _split(text: str, valid: Sequence[str], what: str) -> list[str]:
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if item not in valid:
            raise InvalidCase(f"--{what}: unknown value {item!r}; expected one of "
                              f"{', '.join(valid)}")
        out.append(item)
    return out


# ---------------------------------------------------------------------------------------- sweep


def _default_out() -> Path:
    return Path("results") / f"kvmicro-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"


def _sigterm_as_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def cmd_sweep(args: argparse.Namespace) -> int:
    from . import report, sweep
    from .backends.registry import set_priority

    set_priority(args.priority)
    preset = sweep.get_preset(args.preset)
    shard = sweep.parse_shard(args.shard) if args.shard else (0, 1)
    grid = sweep.make_grid(args.preset, backend=args.backend, seed=args.seed,
                           **{axis: getattr(args, axis) for axis in sweep.AXIS_FIELDS
                              if axis != "backend"})
    if args.priority != "normal":
        # --priority is the `priority` option of every backend that has one (a spec's own wins)
        import dataclasses

        from .backends.registry import with_priority

        grid = dataclasses.replace(grid, backends=tuple(
            dict.fromkeys(with_priority(b, args.priority) for b in grid.backends)))
    points = sweep.expand(grid, shard)
    measure = dict(preset.measure)
    for option, name in (("noise", "noise"), ("min_samples", "min_samples"),
                         ("max_time", "max_time_s"), ("criterion", "criterion"),
                         ("throttle_threshold", "throttle_threshold")):
        if getattr(args, option) is not None:
            measure[name] = getattr(args, option)
    if not args.rotate_budget > 0:
        raise InvalidCase(f"--rotate-budget {args.rotate_budget} must be a positive number of GiB")
    if not args.case_timeout > 0:
        raise InvalidCase(f"--case-timeout {args.case_timeout} must be a positive number of "
                          "seconds")
    if args.noise is not None and not 0 < args.noise < 1:
        raise InvalidCase(f"--noise {args.noise} must be a fraction in (0, 1), e.g. 0.02 for 2%")
    if args.throttle_threshold is not None and not 0 <= args.throttle_threshold < 1:
        raise InvalidCase(f"--throttle-threshold {args.throttle_threshold} must be a fraction in "
                          "[0, 1), e.g. 0.75; 0 turns the throttle guard off")
    if args.criterion is not None:
        from .harness.criteria import make_criterion

        make_criterion(args.criterion)   # an unknown name raises, listing the valid ones
    from .harness.measure import MeasureConfig

    MeasureConfig(**measure).make_criterion()   # bad sampling settings fail here, not per case
    lanes = None
    devices = None
    if not 0 <= args.agreement_threshold < 100:
        raise InvalidCase(f"--agreement-threshold {args.agreement_threshold} must be >= 0 and "
                          "< 100 (percent)")
    if args.devices:
        from .devices import check_backends, deal, parse_devices

        devices = parse_devices(args.devices)
        check_backends(points, devices)
        lanes = deal(points, devices)
    elif args.agreement:
        raise InvalidCase("--agreement needs --devices (it compares the devices)")
    if args.dry_run:
        _print(sweep.plan_summary(points))
        if lanes is None:
            for p in points:
                _print(p.label)
        for device, lane in (lanes or {}).items():
            weight = sum(sweep.point_weight(p) for p in lane)
            _print(f"{device}: {len(lane)} measurements, weight {weight:.2f}")
            for p in lane:
                _print(f"  {p.label}")
        return EXIT_OK
    if args.resume and not args.out:
        raise InvalidCase("--resume needs --out FILE: the results file to continue")
    out = Path(args.out) if args.out else _default_out()
    if out.exists() and not args.resume:
        raise InvalidCase(f"{out} exists; add --resume to continue it, or choose another --out")
    _err(f"kvmicro sweep: {sweep.plan_summary(points)}"
         + (f" (shard {shard[0]}/{shard[1]})" if shard != (0, 1) else "") + f" -> {out}")
    from .harness.noise import announce_guard_off, announce_if_busy, host_load

    # once, plainly, before the first number (the run line keeps the load too)
    load = host_load()
    announce_if_busy(load) or announce_guard_off(load.get("why_off", ""))
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        if args.agreement:
            status = _sweep_agreement(args, points, devices or [], measure)
            if status is not None:
                return status
        outcome = sweep.run_sweep(points, out, argv=["kvmicro", *args.argv],
                                  resume=args.resume, measure=measure,
                                  progress=False if args.quiet else None,
                                  rotate_budget_bytes=int(args.rotate_budget * 1024 ** 3),
                                  case_timeout_s=args.case_timeout, lanes=lanes)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not args.quiet:
        _print(report.summary(outcome.records))
    resumed = f", {outcome.resumed} already there" if outcome.resumed else ""
    _err(f"kvmicro sweep: wrote {len(outcome.records)} records to {out}{resumed} "
         f"in {outcome.elapsed_s:.1f} s")
    if outcome.interrupted:
        _err("kvmicro sweep: interrupted; the file is valid, continue with --resume")
        return EXIT_INTERRUPTED
    if outcome.records and not outcome.counts.get("ok"):
        _err("kvmicro sweep: no record is ok (see the reasons above): nothing was measured")
        return EXIT_FAIL
    return EXIT_FAIL if outcome.counts.get("error") else EXIT_OK


def _sweep_agreement(args: argparse.Namespace, points: list[Any], devices: list[Any],
                     measure: dict[str, Any]) -> int | None:
    """``sweep --agreement FILE``: the agreement cases on every device first; an exit status
    when the sweep must not go on (a device disagrees, or Ctrl-C), else None."""
    from . import sweep
    from .agreement import agreement_lanes, check_agreement
    from .results import read_results

    if len(devices) < 2:
        raise InvalidCase("--agreement compares devices: give --devices two or more")
    path = Path(args.agreement)
    if path.exists() and not args.resume:
        raise InvalidCase(f"{path} exists; add --resume to continue it, or choose another "
                          "--agreement file")
    lanes = agreement_lanes(points, devices)
    _err(f"kvmicro sweep: agreement: {len(next(iter(lanes.values())))} measurements on each of "
         f"{', '.join(map(str, devices))} -> {path}")
    outcome = sweep.run_sweep([], path, argv=["kvmicro", *args.argv], resume=args.resume,
                              measure=measure, progress=False if args.quiet else None,
                              rotate_budget_bytes=int(args.rotate_budget * 1024 ** 3),
                              case_timeout_s=args.case_timeout, lanes=lanes)
    if outcome.interrupted:
        _err("kvmicro sweep: interrupted during the agreement check")
        return EXIT_INTERRUPTED
    report = check_agreement(read_results(path)[1], threshold=args.agreement_threshold / 100)
    _print(report.render())
    if report.exit_code:
        _err("kvmicro sweep: the devices do not agree (see above); not sweeping" if
             report.exit_code == 1 else "kvmicro sweep: the agreement check compared nothing")
        return EXIT_FAIL
    return None


def cmd_agree(args: argparse.Namespace) -> int:
    from .agreement import check_agreement
    from .results import read_results

    if not 0 <= args.threshold < 100:
        raise InvalidCase(f"--threshold {args.threshold} must be >= 0 and < 100 (percent)")
    records = [r for path in args.files for r in read_results(path)[1]]
    report = check_agreement(records, threshold=args.threshold / 100)
    _print(report.render())
    return report.exit_code


# ------------------------------------------------------------------------------- report, etc.


def cmd_report(args: argparse.Namespace) -> int:
    from . import report

    columns = report.parse_columns(args.columns)
    _, records = report.load(args.files)
    _print(report.render(records, args.format, columns), file=None)
    if args.plot:
        for path in report.plot(records, args.plot):
            _err(f"kvmicro report: wrote {path}")
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from . import compare

    if not 0 <= args.threshold < 100:
        raise InvalidCase(f"--threshold {args.threshold} must be >= 0 and < 100 (percent)")
    if args.new_backend or args.base_backend:
        if not (args.new_backend and args.base_backend):
            raise InvalidCase("--new-backend and --base-backend go together")
        from .results import read_results

        records = [r for path in args.files for r in read_results(path)[1]]
        bases = [b.strip() for b in args.base_backend.split(",") if b.strip()]
        result = compare.compare_backends(records, bases, args.new_backend, args.threshold)
    elif len(args.files) != 2:
        raise InvalidCase(f"compare takes two files, BASE and NEW (got {len(args.files)}), or "
                          "--new-backend/--base-backend with any number of files")
    else:
        result = compare.compare_files(args.files[0], args.files[1], args.threshold)
    for warning in result.warnings:
        _err(f"kvmicro compare: warning: {warning}")
    _print(compare.render(result, args.threshold, show_same=not args.changes_only))
    if not result.comparisons:
        _err("kvmicro compare: error: no case matched: nothing was compared")
    return result.exit_code


def cmd_merge(args: argparse.Namespace) -> int:
    from .results import merge

    out = Path(args.out)
    if out.exists():
        raise InvalidCase(f"{out} exists; merge never overwrites a file")
    merged = merge([Path(f) for f in args.files], out)
    _err(f"kvmicro merge: wrote {out}" + (f" ({merged} records)" if merged is not None else ""))
    return EXIT_OK


# ---------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from .sweep import CACHES, DEFAULT_CASE_TIMEOUT_S, DEFAULT_PRESET, PRESETS

    parser = _Parser(prog="kvmicro", description="Op-by-op measurements of a paged KV cache "
                     "during LLM decode.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"kvmicro {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    env = sub.add_parser("env", help="host, devices, and every backend: available or why not")
    env.add_argument("--json", action="store_true", help="print JSON")
    env.set_defaults(func=cmd_env)

    check = sub.add_parser("check", help="check every op of every backend against the oracle")
    check.add_argument("--backend", help="comma-separated backends (default: every available)")
    check.add_argument("--op", help="comma-separated ops (default: all)")
    check.add_argument("--quick", action="store_true", help="the reduced matrix")
    check.set_defaults(func=cmd_check)

    sw = sub.add_parser("sweep", help="measure a grid of cases into a results file",
                        description="Lists are comma-separated; an axis left out takes the "
                        "preset's values. ctx may be ragged: 37+300 (one per sequence).")
    sw.add_argument("--preset", default=DEFAULT_PRESET, choices=list(PRESETS),
                    help=f"named grid (default {DEFAULT_PRESET}): " + "; ".join(
                        f"{p.name}: {p.description}" for p in PRESETS.values()))
    sw.add_argument("--backend", default="auto",
                    help="backends, or auto (the best device here; default) or all")
    sw.add_argument("--op", help="sdpa_contiguous, gather, gather_sdpa, paged_sdpa, append, all")
    sw.add_argument("--layout", help="NSHD, HNSD, NHSD, any permutation of NSHD, presets, all")
    sw.add_argument("--placement", help="contiguous, reverse, random, fragmented, all")
    sw.add_argument("--ctx", help="tokens per sequence, e.g. 1024,4096 or ragged 37+300")
    sw.add_argument("--batch", help="sequences, e.g. 1,4")
    sw.add_argument("--block", help="block sizes in tokens, e.g. 16,32,64")
    sw.add_argument("--heads", help="q:kv head counts, e.g. 32:8")
    sw.add_argument("--head-dim", dest="head_dim", help="e.g. 64,128")
    sw.add_argument("--dtype", help="float16, bfloat16, float32, all")
    sw.add_argument("--slack", help="pool size over blocks needed, e.g. 2")
    sw.add_argument("--timer", help="host, batched, device, graph, or auto (the preset's for "
                    "the device)")
    sw.add_argument("--cache", help=", ".join(CACHES))
    sw.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    sw.add_argument("--out", help="results file (default results/kvmicro-<timestamp>.jsonl)")
    sw.add_argument("--resume", action="store_true", help="skip cases already in --out")
    sw.add_argument("--shard", help="i/n: run only shape groups i, i+n, ... (for n machines)")
    sw.add_argument("--noise", type=float, help="target CI half-width of the median as a "
                    "fraction (default 0.02 = 2%%)")
    sw.add_argument("--min-samples", dest="min_samples", type=int, help="samples before stopping")
    sw.add_argument("--max-time", dest="max_time", type=float,
                    help="seconds of sampling per case at most")
    sw.add_argument("--criterion", help="stopping rule: ci-median (default), stdrel, sample-count")
    sw.add_argument("--throttle-threshold", dest="throttle_threshold", type=float,
                    help="drop a sample when the GPU's SM clock after it is below this fraction "
                    "of its maximum (default 0.75; 0: off; CUDA with nvidia-ml-py only)")
    sw.add_argument("--case-timeout", dest="case_timeout", type=float,
                    default=DEFAULT_CASE_TIMEOUT_S, metavar="S",
                    help="a worker that sends no record for S seconds is presumed hung: killed, "
                    "its case recorded as an error, a fresh worker goes on (default "
                    f"{DEFAULT_CASE_TIMEOUT_S:g})")
    sw.add_argument("--rotate-budget", dest="rotate_budget", type=float, default=2.0,
                    metavar="GB", help="device memory for the input copies cold:rotate uploads "
                    "per case (default 2 GiB)")
    sw.add_argument("--priority", default="normal",
                    help="stream / queue priority class for backends that have one (native:cuda): "
                    "low, normal (default) or high; other backends skip non-normal priorities")
    sw.add_argument("--devices", metavar="DEVICES",
                    help="all (every GPU here) or a list (cuda:0,cuda:1; cpu:0,cpu:1 for CPU "
                    "cores): one pinned worker per device, devices measuring at once, each given "
                    "whole shape groups (docs/multi-gpu.md)")
    sw.add_argument("--agreement", metavar="FILE",
                    help="with --devices: first measure a few identical cases on every device "
                    "into FILE; stop with exit 1 when a device differs beyond noise")
    sw.add_argument("--agreement-threshold", dest="agreement_threshold", type=float,
                    default=5.0, metavar="PCT",
                    help="percent difference below which devices agree (default 5)")
    sw.add_argument("--dry-run", action="store_true", help="list the measurements and exit")
    sw.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")
    sw.set_defaults(func=cmd_sweep)

    rep = sub.add_parser("report", help="tables, CSV and plots from result files")
    rep.add_argument("files", nargs="+", metavar="FILE",
                     help="kvmicro JSONL or pytest-benchmark JSON")
    rep.add_argument("--format", default="table", choices=["table", "markdown", "csv"])
    rep.add_argument("--plot", metavar="PNG", help="also draw latency and overhead vs ctx")
    rep.add_argument("--columns", help="statistics per cell, e.g. median_us,overhead_pct "
                     "(default); any of Stats.FIELDS and bytes, gbps, pct_of_peak")
    rep.set_defaults(func=cmd_report)

    cmp_ = sub.add_parser("compare", help="per-case verdicts between two result files, or "
                          "between backends in the same files")
    cmp_.add_argument("files", nargs="+", metavar="FILE",
                      help="BASE NEW; or, with --new-backend, any files whose records are pooled")
    cmp_.add_argument("--new-backend", metavar="BACKEND",
                      help="compare this backend's cases with --base-backend's on the same "
                           "cases; a plain name matches every variant of it, "
                           "'native:cuda[splits=8]' that variant, 'native:cuda[]' the default "
                           "options only")
    cmp_.add_argument("--base-backend", metavar="BACKENDS",
                      help="comma-separated; on each case the fastest of them is the base")
    cmp_.add_argument("--threshold", type=float, default=5.0,
                      help="percent change below which a case is the same (default 5)")
    cmp_.add_argument("--changes-only", action="store_true", help="hide cases that are the same")
    cmp_.set_defaults(func=cmd_compare)

    mg = sub.add_parser("merge", help="join result files (shards) into one")
    mg.add_argument("files", nargs="+", metavar="FILE")
    mg.add_argument("--out", "-o", required=True, help="the merged file (must not exist)")
    mg.set_defaults(func=cmd_merge)

    ag = sub.add_parser("agree", help="cross-device agreement of a sweep --agreement file: "
                        "exit 1 when a device differs beyond noise")
    ag.add_argument("files", nargs="+", metavar="FILE")
    ag.add_argument("--threshold", type=float, default=5.0,
                    help="percent difference below which devices agree (default 5)")
    ag.set_defaults(func=cmd_agree)

    from .adr import add_parser as add_adr_parser

    add_adr_parser(sub)   # kvmicro adr fill|new: the parser and handlers live in adr.py
    from .contention import add_parser as add_contention_parser
    from .regimes import add_parser as add_regimes_parser

    add_regimes_parser(sub)      # kvmicro regimes: parser and handler in regimes.py
    add_contention_parser(sub)   # kvmicro contention: parser and handler in contention.py
    return parser


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    # one line, no source location: a warning here is about the user's files, not our code
    _err(f"kvmicro: warning: {message}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        argv = list(argv) if argv is not None else sys.argv[1:]
        args = parser.parse_args(argv)
        args.argv = argv   # for the run's provenance
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return int(args.func(args))
    except (UsageError, KvmicroError, FileNotFoundError, FileExistsError) as exc:
        _err(f"kvmicro: error: {_one_line(exc)}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        _err("kvmicro: interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:   # `kvmicro report ... | head`
        return EXIT_OK


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, (FileNotFoundError, FileExistsError)) and exc.filename:
        return f"{exc.strerror or type(exc).__name__}: {exc.filename}"
    return " ".join(str(exc).split()) or type(exc).__name__
