"""Architecture decision records filled from results files: ``kvmicro adr fill|new``.

An ADR is Markdown with fill regions::

    <!-- kvmicro:layout-choice results=evidence/cpu-*.jsonl.gz backend=native:cpu -->
    ...replaced on every fill...
    <!-- /kvmicro:layout-choice -->

The key names an evidence rule (:data:`kvmicro.adr_rules.RULES`); the ``key=value`` words after
it are the rule's parameters (no spaces inside a value; commas separate alternatives).
``results=GLOB`` says which results files the region reads: a glob relative to the ADR's
folder (any repository path, ``../results/*.jsonl.gz`` included), matched against the files
given with ``--results`` by file name, or, when no ``--results`` are given, expanded on disk
(so ``kvmicro adr fill --check ADR.md`` finds its own evidence). A region without
``results=`` reads every file.

Filling is all or nothing: if any region's evidence is missing, mismatched (records of several
devices or hosts in one region, arms measured on different shape sets) or ambiguous, nothing is
written and every refusal is reported with its key and line. The region's text depends only on
the records, never on the clock, so a second fill with the same files changes no byte; each
region ends with a provenance line naming the files, devices, runs (start time and git commit,
taken from the results files' run lines) and the rule. When several runs measured the same case,
the latest run's record is used: new data replaces old.
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import os
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .adr_rules import RULES, Evidence, MissingEvidence, check_params, get_rule, policy_name
from .errors import KvmicroError

OPEN = re.compile(r"<!--\s*kvmicro:([a-z][a-z0-9-]*)((?:\s+[A-Za-z_][A-Za-z0-9_]*=\S+)*)\s*-->")
CLOSE = "<!-- /kvmicro:{key} -->"
CLOSE_RE = re.compile(r"<!--\s*/kvmicro:([a-z][a-z0-9-]*)\s*-->")
#: where `kvmicro adr new` finds its template, relative to the working directory
DEFAULT_TEMPLATE = Path("docs/adr/template.md")
#: the rules `adr new` puts under each results file, in this order
SCAFFOLD_RULES: tuple[str, ...] = ("hardware", "layout-choice", "crossover", "fused-vs-gather",
                                   "block-size", "append-cost", "native-vs-peer",
                                   "results-table")


class AdrError(MissingEvidence):
    """A region cannot be filled; the message starts with its key and line."""


# ----------------------------------------------------------------------------------- regions

@dataclass(frozen=True)
class Region:
    key: str
    params: dict[str, str]
    line: int
    #: offsets of the region's content: text[start:end] lies between its two markers
    start: int
    end: int

    @property
    def label(self) -> str:
        words = " ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.key}{' ' + words if words else ''} (line {self.line})"


def parse_regions(text: str, where: str = "ADR") -> list[Region]:
    """Every fill region of ``text`` in order; an unclosed, stray or nested marker raises."""
    regions: list[Region] = []
    pos = 0
    while True:
        m = OPEN.search(text, pos)
        stray = CLOSE_RE.search(text, pos)
        if stray and (not m or stray.start() < m.start()):
            line = text.count("\n", 0, stray.start()) + 1
            raise AdrError(f"{where}:{line}: closing marker of {stray.group(1)} without an "
                           "opening one")
        if not m:
            return regions
        key = m.group(1)
        line = text.count("\n", 0, m.start()) + 1
        params: dict[str, str] = {}
        for word in m.group(2).split():
            name, _, value = word.partition("=")
            if name in params:
                raise AdrError(f"{where}:{line}: region {key} gives {name}= twice")
            params[name] = value
        close = CLOSE_RE.search(text, m.end())
        nested = OPEN.search(text, m.end())
        if nested and (not close or nested.start() < close.start()):
            raise AdrError(f"{where}:{line}: region {key} contains another region")
        if not close or close.group(1) != key:
            raise AdrError(f"{where}:{line}: region {key} is not closed by "
                           f"{CLOSE.format(key=key)}")
        regions.append(Region(key, params, line, m.end(), close.start()))
        pos = close.end()


def _opening(key: str, params: Mapping[str, str]) -> str:
    words = "".join(f" {k}={v}" for k, v in params.items())
    return f"<!-- kvmicro:{key}{words} -->"


# ---------------------------------------------------------------------------------- evidence

@dataclass(frozen=True)
class ResultsFile:
    path: Path
    runs: tuple[dict[str, Any], ...]
    #: (record, index of its run in ``runs``)
    cases: tuple[tuple[dict[str, Any], int], ...]


def load_results(path: Path) -> ResultsFile:
    """A results file's run lines and case records (``.jsonl``, ``.jsonl.gz``, pytest-benchmark
    JSON), each record tied to the run line before it."""
    from .results import iter_results

    runs: list[dict[str, Any]] = []
    cases: list[tuple[dict[str, Any], int]] = []
    for obj in iter_results(path):
        if obj.get("type") == "run":
            runs.append(obj)
        elif obj.get("type") == "case":
            if not runs:
                raise AdrError(f"{path}: case records before any run line: no provenance")
            cases.append((obj, len(runs) - 1))
    return ResultsFile(path, tuple(runs), tuple(cases))


def _matches(path: Path, pattern: str) -> bool:
    return fnmatch.fnmatch(path.name, Path(pattern).name)


def expand_results(folder: Path, pattern: str) -> list[Path]:
    """The files a ``results=`` glob names, relative to ``folder`` (the ADR's): any repository
    path, e.g. ``../results/h200-*.jsonl.gz``. The glob-free leading folders (``..`` included)
    are joined as a path and only the rest is globbed, because ``Path.glob`` does not treat
    ``..`` alike on every Python version."""
    parts = Path(pattern).parts
    literal = 0
    while literal < len(parts) - 1 and not glob.has_magic(parts[literal]):
        literal += 1
    base = folder.joinpath(*parts[:literal])
    rest = Path(*parts[literal:]).as_posix()
    if not glob.has_magic(rest):
        return [base / rest] if (base / rest).is_file() else []
    return sorted(p for p in base.glob(rest) if p.is_file())


def discover(adr: Path, regions: Sequence[Region]) -> list[Path]:
    """The results files named by the regions' ``results=`` globs, relative to the ADR."""
    found: set[Path] = set()
    for region in regions:
        pattern = region.params.get("results")
        if pattern:
            found.update(expand_results(adr.parent, pattern))
    return sorted(found)


@dataclass(frozen=True)
class Selection:
    evidence: Evidence
    #: id(record) -> (file, run line)
    origin: dict[int, tuple[ResultsFile, dict[str, Any]]]


def select_evidence(region: Region, files: Sequence[ResultsFile]) -> Selection:
    """The region's records: those of its files, the latest run's copy of each case."""
    from .results import record_key

    pattern = region.params.get("results")
    chosen = [f for f in files if not pattern or _matches(f.path, pattern)]
    if not chosen:
        given = ", ".join(f.path.name for f in files) or "none"
        raise MissingEvidence(f"no results file matches results={pattern} (files: {given})")
    latest: dict[Any, tuple[str, dict[str, Any], ResultsFile, dict[str, Any]]] = {}
    for f in chosen:
        for rec, run_index in f.cases:
            run = f.runs[run_index]
            stamp = str(run.get("started_at") or "")
            key = record_key(rec)
            if key not in latest or stamp >= latest[key][0]:
                latest[key] = (stamp, rec, f, run)
    records = [entry[1] for entry in latest.values()]
    origin = {id(entry[1]): (entry[2], entry[3]) for entry in latest.values()}
    runs = {id(run): run for f in chosen for run in f.runs}
    return Selection(Evidence(records, tuple(runs.values())), origin)


def _short_sha(run: Mapping[str, Any]) -> str:
    sha = str(run.get("git_sha") or "unknown")[:10]
    return sha + ("+dirty" if run.get("git_dirty") else "")


def _device_kind(run: Mapping[str, Any], backend: str) -> str:
    entry = (run.get("devices") or {}).get(backend)
    return str(entry.get("kind") or "") if isinstance(entry, Mapping) else ""


def check_one_machine(used: Sequence[Mapping[str, Any]], selection: Selection) -> None:
    """Refuse records that did not all come from one machine: runs on several hosts, one backend
    on several devices, or backends of one device kind (cuda, cpu, ...) on differently named
    devices. Backends of different kinds on one host (mlx:gpu beside native:cuda) may name the
    same GPU differently and are allowed together."""
    hosts: set[str] = set()
    by_backend: dict[str, set[str]] = {}
    by_kind: dict[str, set[str]] = {}
    for rec in used:
        _, run = selection.origin[id(rec)]
        host = run.get("host") or {}
        hosts.add(f"{host.get('hostname')} / {(host.get('cpu') or {}).get('model')}")
        backend, device = str(rec.get("backend")), str(rec.get("device") or "?")
        by_backend.setdefault(backend, set()).add(device)
        kind = _device_kind(run, backend)
        if kind:
            by_kind.setdefault(kind, set()).add(device)
    if len(hosts) > 1:
        raise MissingEvidence(f"records from runs on several hosts ({'; '.join(sorted(hosts))}): "
                              "fill one region per machine (results= or device=)")
    for what, groups in (("backend", by_backend), ("device kind", by_kind)):
        for name, devices in sorted(groups.items()):
            if len(devices) > 1:
                raise MissingEvidence(f"records from several devices ({'; '.join(sorted(devices))})"
                                      f" for {what} {name}: fill one region per device "
                                      "(results= or device=)")


def provenance_line(key: str, used: Sequence[Mapping[str, Any]], selection: Selection) -> str:
    """Files, devices, host, runs (start time, git commit) and record count of what a region
    used; refuses records that do not come from one machine (:func:`check_one_machine`)."""
    used = [r for r in {id(r): r for r in used}.values() if id(r) in selection.origin]
    if not used:
        raise MissingEvidence("the rule used no records from the results files")
    check_one_machine(used, selection)
    origins = [selection.origin[id(r)] for r in used]
    backends_of: dict[str, set[str]] = {}
    for rec in used:
        backends_of.setdefault(str(rec.get("device") or "?"), set()).add(str(rec.get("backend")))
    if len(backends_of) == 1:
        devices = f"device {next(iter(backends_of))}"
    else:
        devices = "devices " + "; ".join(f"{name} ({', '.join(sorted(b))})"
                                         for name, b in sorted(backends_of.items()))
    host = origins[0][1].get("host") or {}
    host_text = f"{host.get('hostname')} / {(host.get('cpu') or {}).get('model')}"
    files = sorted({f.path.name for f, _ in origins})
    runs = sorted({(str(run.get("started_at")), _short_sha(run)) for _, run in origins})
    run_text = ", ".join(f"{stamp} (git {sha})" for stamp, sha in runs)
    return (f"<sub>Evidence: {', '.join(files)}; {devices}; host {host_text}; "
            f"run{'s' if len(runs) > 1 else ''} {run_text}; {len(used)} records; rule `{key}` "
            "(docs/adr/README.md).</sub>")


def fill_region(region: Region, files: Sequence[ResultsFile]) -> str:
    """The new content of one region (between its markers)."""
    rule = get_rule(region.key)
    params = {k: v for k, v in region.params.items() if k != "results"}
    check_params(rule, params)
    selection = select_evidence(region, files)
    finding = rule.func(selection.evidence, params)
    prov = provenance_line(region.key, finding.used, selection)
    return f"\n{finding.text.strip()}\n\n{prov}\n"


@dataclass(frozen=True)
class FillResult:
    text: str
    errors: list[str]
    changed: list[str]
    regions: int


def fill_text(text: str, files: Sequence[ResultsFile], where: str = "ADR") -> FillResult:
    """``text`` with every region refilled; ``errors`` lists the regions that could not be."""
    regions = parse_regions(text, where)
    parts: list[str] = []
    pos = 0
    errors: list[str] = []
    changed: list[str] = []
    for region in regions:
        try:
            content = fill_region(region, files)
        except MissingEvidence as exc:
            errors.append(f"{where}: region {region.label}: {exc}")
            content = text[region.start:region.end]
        if content != text[region.start:region.end]:
            changed.append(region.label)
        parts += [text[pos:region.start], content]
        pos = region.end
    parts.append(text[pos:])
    return FillResult("".join(parts), errors, changed, len(regions))


def _load_all(paths: Sequence[Path]) -> list[ResultsFile]:
    return [load_results(p) for p in paths]


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fill(adr: Path, results: Sequence[Path] = (), check: bool = False) -> tuple[int, list[str]]:
    """Fill (or with ``check`` only verify) the ADR at ``adr``. Returns (exit status, messages):
    1 when a region cannot be filled (nothing is written) or, with ``check``, when the file is
    not what a fill would make it (stale)."""
    text = adr.read_text(encoding="utf-8")
    regions = parse_regions(text, str(adr))
    if not regions:
        return 1, [f"{adr}: no kvmicro fill regions"]
    paths = list(results) or discover(adr, regions)
    if not paths:
        return 1, [f"{adr}: no evidence: give --results FILE... or results= in the regions"]
    result = fill_text(text, _load_all(paths), str(adr))
    if result.errors:
        return 1, [*result.errors, f"{adr}: unchanged ({len(result.errors)} region(s) refused)"]
    if check:
        if result.text != text:
            return 1, [f"{adr}: stale: {label} differs from a fill with "
                       f"{', '.join(p.name for p in paths)}" for label in result.changed] \
                or [f"{adr}: stale outside its regions"]
        return 0, [f"{adr}: current ({result.regions} regions)"]
    if result.text != text:
        _write_atomic(adr, result.text)
    return 0, [f"{adr}: filled {result.regions} regions, {len(result.changed)} changed"]


# ---------------------------------------------------------------------------------------- new

def slug(title: str) -> str:
    words = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
    if not words:
        raise AdrError(f"title {title!r} has no letters or digits to name a file by")
    return words


def next_number(folder: Path) -> int:
    numbers = [int(m.group(1)) for p in folder.glob("*.md")
               if (m := re.match(r"(\d{4})-", p.name))]
    return max(numbers, default=0) + 1


#: rules that describe a whole file whatever its timers and caches
_WHOLE_FILE_RULES: tuple[str, ...] = ("hardware", "results-table")


def _measurement_kinds(f: ResultsFile) -> list[dict[str, str]]:
    """``timer=``/``cache=`` parameters, one set per timer x cache policy of the file's ok
    records; none when the file has only one (comparisons never mix them)."""
    kinds = sorted({(policy_name(rec.get("timer")), policy_name(rec.get("cache")))
                    for rec, _ in f.cases if rec.get("status") == "ok"})
    if len(kinds) <= 1:
        return [{}]
    return [{"timer": timer, "cache": cache} for timer, cache in kinds]


def _scaffold_regions(adr: Path, files: Sequence[ResultsFile]) -> tuple[str, list[str]]:
    """One evidence section per results file: each scaffold rule's region (per timer and cache
    policy when the file has several), kept only when the file can fill it (the others are
    reported)."""
    sections, notes = [], []
    for f in files:
        rel = os.path.relpath(f.path.resolve(), adr.parent.resolve())
        devices = sorted({str(rec.get("device")) for rec, _ in f.cases if rec.get("device")})
        sections.append(f"### {f.path.name}: {'; '.join(devices) or 'unknown device'}\n")
        for key in SCAFFOLD_RULES:
            for kind in [{}] if key in _WHOLE_FILE_RULES else _measurement_kinds(f):
                region = Region(key, {"results": Path(rel).as_posix(), **kind}, 0, 0, 0)
                try:
                    content = fill_region(region, files)
                except MissingEvidence as exc:
                    notes.append(f"left out {region.label.removesuffix(' (line 0)')} for "
                                 f"{f.path.name}: {exc}")
                    continue
                sections.append(f"{_opening(key, region.params)}{content}"
                                f"{CLOSE.format(key=key)}\n")
    return "\n".join(sections), notes


def new(title: str, results: Sequence[Path], out: Path | None = None,
        template: Path = DEFAULT_TEMPLATE, status: str = "proposed") -> tuple[Path, list[str]]:
    """Write a new ADR from ``template``: its placeholders ``{{number}}``, ``{{title}}``,
    ``{{date}}`` (the latest run's date, not today's), ``{{status}}`` and ``{{evidence}}``
    (regions for every results file) filled. Never overwrites a file."""
    if not results:
        raise AdrError("adr new needs --results FILE...: the evidence the ADR stands on")
    if not template.is_file():
        raise AdrError(f"template {template} does not exist")
    files = _load_all(results)
    folder = out.parent if out else template.parent
    number = next_number(folder)
    path = out or folder / f"{number:04d}-{slug(title)}.md"
    if path.exists():
        raise AdrError(f"{path} exists; adr new never overwrites a file")
    dates = sorted(str(run.get("started_at") or "")[:10] for f in files for run in f.runs)
    evidence, notes = _scaffold_regions(path, files)
    text = template.read_text(encoding="utf-8")
    for name, value in (("number", f"{number:04d}"), ("title", title),
                        ("date", dates[-1] if dates and dates[-1] else "unknown"),
                        ("status", status), ("evidence", evidence.rstrip("\n"))):
        text = text.replace("{{" + name + "}}", value)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "x", encoding="utf-8", newline="") as f:
        f.write(text)
    return path, notes


# ---------------------------------------------------------------------------------------- CLI

def add_parser(sub: Any) -> None:
    """The ``adr`` subcommand, for cli.build_parser."""
    adr = sub.add_parser("adr", help="fill or scaffold architecture decision records from "
                         "results files", description=__doc__.split("\n\n")[0])
    # the same parser class as the parent's: bad input raises the CLI's usage error
    actions = adr.add_subparsers(dest="adr_command", metavar="ACTION", parser_class=type(adr))
    actions.required = True
    fl = actions.add_parser("fill", help="refill every region of ADR files from their rules")
    fl.add_argument("adrs", nargs="+", metavar="ADR", help="Markdown files with kvmicro regions")
    fl.add_argument("--results", nargs="+", metavar="FILE", default=[],
                    help="results files (.jsonl, .jsonl.gz, pytest-benchmark .json); default: "
                    "the files the regions' results= globs name, relative to each ADR")
    fl.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 if a fill would change the file (stale)")
    fl.set_defaults(func=cmd_adr_fill)
    nw = actions.add_parser("new", help="scaffold an ADR from docs/adr/template.md")
    nw.add_argument("--title", required=True)
    nw.add_argument("--results", nargs="+", metavar="FILE", required=True)
    nw.add_argument("--out", help="the new file (default docs/adr/NNNN-<title>.md)")
    nw.add_argument("--template", default=str(DEFAULT_TEMPLATE))
    nw.add_argument("--status", default="proposed")
    nw.set_defaults(func=cmd_adr_new)
    rules = ", ".join(RULES)
    adr.epilog = f"rules: {rules}"


def cmd_adr_fill(args: argparse.Namespace) -> int:
    status = 0
    for adr in args.adrs:
        try:
            code, messages = fill(Path(adr), [Path(p) for p in args.results], check=args.check)
        except KvmicroError as exc:   # a malformed ADR, a missing or unreadable results file
            code, messages = 1, [f"{adr}: {exc}", f"{adr}: unchanged"]
        for line in messages:
            print(f"kvmicro adr: {line}", file=sys.stderr if code else sys.stdout, flush=True)
        status = max(status, code)
    return status


def cmd_adr_new(args: argparse.Namespace) -> int:
    try:
        path, notes = new(args.title, [Path(p) for p in args.results],
                          Path(args.out) if args.out else None, Path(args.template), args.status)
    except AdrError as exc:
        print(f"kvmicro adr: {exc}", file=sys.stderr, flush=True)
        return 1
    for note in notes:
        print(f"kvmicro adr: {note}", file=sys.stderr, flush=True)
    print(f"kvmicro adr: wrote {path}", flush=True)
    return 0


__all__ = ["AdrError", "FillResult", "Region", "add_parser", "fill", "fill_region", "fill_text",
           "load_results", "new", "parse_regions", "select_evidence"]
