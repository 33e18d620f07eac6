"""Results files: the record schema, provenance, append-only JSON Lines writing, reading, merging.

A results file is JSON Lines, one object per line, ``schema_version`` in every line. A run starts
with its provenance (``{"type": "run", ...}``); then one ``{"type": "case", ...}`` per case, in the
order measured. A resumed run appends a new run line and its cases to the same file. docs/schema.md
describes every field.

Writes are append-only, one ``write`` of a whole line each, flushed and fsynced, so a killed writer
loses at most the line in flight. A damaged last line (cut short, or not valid UTF-8) is one rule
everywhere: readers ignore it with a warning, and a resumed writer cuts it off before appending.
A writer holds an exclusive lock on its file (``flock``), so two sweeps never append to one file
at once. A reader refuses a file of an unknown major schema version by name; version 1 (before
backend options) and version 2 are read. Case lines are :class:`~kvmicro.record.Record` objects
in JSON; their identity is :func:`~kvmicro.record.record_key`.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from .derived import exceeds_ceiling, figures
from .errors import InvalidCase
from .harness.measure import Measurement
from .harness.stats import MIN_CI_SAMPLES, Stats
from .record import (
    KEY_FIELDS,
    READABLE_VERSIONS,
    SCHEMA_VERSION,
    STATUSES,
    Record,
    case_key,
    record_key,
)
from .workload import Case

try:  # POSIX: an exclusive lock per results file; elsewhere writers are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

#: a record whose spread_pct exceeds this is flagged ``wide-spread`` (informational: a wide
#: distribution of single samples says nothing against a well-known median)
SPREAD_FLAG_PCT = 10.0
#: the noise target assumed for ``noisy`` when a record's criterion names none (MeasureConfig's
#: default, --noise 0.02)
DEFAULT_NOISE = 0.02
#: the flags a case record may carry (docs/schema.md says what each means)
FLAGS: tuple[str, ...] = ("noisy", "wide-spread", "not-converged", "dropped", "few-samples",
                          "cache-not-cold", "cache-size-assumed", "cache-hit-suspected",
                          "host-busy", "rounds-disagree")
#: fields a case record always has (case_record refuses to let ``extra`` replace them)
_CORE_FIELDS: tuple[str, ...] = (
    "type", "schema_version", "device", "timer", "cache", "cache_bytes", "cache_pools",
    "cache_policy", "criterion", "k", "dropped", "dropped_why", "clock", "warmup_samples",
    "elapsed_s", "samples_us", "stats", "derived", "check", "status", "reason", "flags")


# ------------------------------------------------------------------------------------ JSON

def _json_safe(value: Any) -> Any:
    """Plain JSON values: numpy scalars and arrays unwrapped, tuples as lists, dataclasses as
    dicts, and non-finite floats as null (strict JSON has no Infinity or NaN)."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if is_dataclass(value) and not isinstance(value, type):
        return _json_safe(asdict(value))
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy scalar or array
        return _json_safe(value.tolist())
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    raise InvalidCase(f"[results] cannot store {type(value).__name__} value {value!r} in JSON")


def dumps(record: Mapping[str, Any]) -> str:
    """One strict-JSON line (no trailing newline)."""
    return json.dumps(_json_safe(record), allow_nan=False)


# ------------------------------------------------------------------------------ provenance

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _device_entry(name: str) -> dict[str, Any]:
    from .backends.registry import get_backend

    try:
        backend = get_backend(name)
        availability = backend.availability()
        if not availability:
            return {"available": False, "reason": availability.reason}
        info = backend.device_info()
        return {"available": True, **asdict(info), "versions": dict(backend.versions())}
    except Exception as exc:  # provenance must never stop a run; it records why it lacks a field
        return {"available": False, "error": f"{type(exc).__name__}: {exc}"}


def provenance(argv: Sequence[str], backends: Sequence[str],
               bandwidth: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The run line: kvmicro version and git commit, argv, host, OS, CPU, each backend's device
    (name, kind, cache and memory sizes, driver/framework versions), framework versions, the
    measured bandwidth per backend (``{"read_gbps", "copy_gbps", ...}``) and the start time."""
    from . import __version__
    from .environment import host_info
    from .harness.noise import host_load

    host = host_info()
    frameworks = host.pop("frameworks")
    git = host.pop("git")
    return _json_safe({
        "type": "run",
        "schema_version": SCHEMA_VERSION,
        "kvmicro_version": __version__,
        "git_sha": git.get("sha"),
        "git_dirty": git.get("dirty"),
        "argv": list(argv),
        "started_at": _now(),
        "host": host,
        "frameworks": frameworks,
        "backends": list(backends),
        "devices": {name: _device_entry(name) for name in backends},
        "bandwidth": {name: dict(values) for name, values in bandwidth.items()},
        # the host's competing load when the run started (harness/noise.py)
        "host_load": host_load(),
    })


#: run-line fields whose difference makes two files' numbers incomparable or suspect
_PROVENANCE_FIELDS: tuple[tuple[str, ...], ...] = (
    ("host", "hostname"), ("host", "cpu", "model"), ("host", "os_release"), ("host", "kernel"),
    ("kvmicro_version",), ("git_sha",), ("frameworks",), ("devices",),
)


def _dig(d: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(d, Mapping):
            return None
        d = d.get(key)  # type: ignore[assignment]
    return d


def _device_names(devices: Any) -> Any:
    if not isinstance(devices, Mapping):
        return devices
    return {name: (entry.get("name") if isinstance(entry, Mapping) else entry)
            for name, entry in devices.items()}


def provenance_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """What differs between two run lines among host, CPU, OS, versions and devices; one line
    each. Devices compare by name only, frameworks by version (absent frameworks ignored)."""
    out: list[str] = []
    for path in _PROVENANCE_FIELDS:
        va, vb = _dig(a, path), _dig(b, path)
        if path == ("devices",):
            va, vb = _device_names(va), _device_names(vb)
            shared = set(va or {}) & set(vb or {})
            va = {k: va[k] for k in sorted(shared)} if va else va
            vb = {k: vb[k] for k in sorted(shared)} if vb else vb
        if path == ("frameworks",) and isinstance(va, Mapping) and isinstance(vb, Mapping):
            for name in sorted(set(va) | set(vb)):
                if va.get(name) and vb.get(name) and va[name] != vb[name]:
                    out.append(f"frameworks.{name}: {va[name]} vs {vb[name]}")
            continue
        if va is not None and vb is not None and va != vb:
            out.append(f"{'.'.join(path)}: {va!r} vs {vb!r}")
    return out


# --------------------------------------------------------------------------------- records

def median_halfwidth(stats: Mapping[str, Any]) -> float | None:
    """Half the width of the median's 95% CI over the median (a fraction), None when the stats
    lack it."""
    try:
        lo, hi = float(stats["ci95_lo_us"]), float(stats["ci95_hi_us"])
        median = float(stats["median_us"])
    except (KeyError, TypeError, ValueError):
        return None
    if not (math.isfinite(lo) and math.isfinite(hi) and math.isfinite(median)):
        return None
    half = (hi - lo) / 2.0
    if median > 0:
        return half / median
    return 0.0 if half == 0 else math.inf


def _noise_target(criterion: Mapping[str, Any] | None) -> float:
    params = criterion.get("params") if isinstance(criterion, Mapping) else None
    noise = params.get("noise") if isinstance(params, Mapping) else None
    if isinstance(noise, (int, float)) and not isinstance(noise, bool) and 0 < noise < 1:
        return float(noise)
    return DEFAULT_NOISE


def flags_for(stats: Mapping[str, Any] | None, criterion: Mapping[str, Any] | None,
              dropped: int, cache_policy: Mapping[str, Any] | None,
              spread_threshold_pct: float = SPREAD_FLAG_PCT,
              derived: Mapping[str, Any] | None = None) -> list[str]:
    """The flags of a measured record (see :data:`FLAGS`).

    ``noisy``: the median is not known well enough - the half-width of its 95% CI exceeds the
    run's noise target (the criterion's ``noise`` parameter; :data:`DEFAULT_NOISE` when it names
    none) times the median. It gates verdicts. ``wide-spread``: ``spread_pct`` (p95 - p05 over
    the median) above ``spread_threshold_pct``; it describes the samples and gates nothing.
    ``cache-hit-suspected``: a cold policy, yet the derived GB/s is above the device's measured
    copy ceiling."""
    flags: list[str] = []
    if stats:
        half = median_halfwidth(stats)
        if half is not None and half > _noise_target(criterion):
            flags.append("noisy")
        spread = stats.get("spread_pct")
        if spread is not None and spread > spread_threshold_pct:
            flags.append("wide-spread")
    if criterion is not None and not criterion.get("converged", False):
        flags.append("not-converged")
    if dropped:
        flags.append("dropped")
    if stats and stats.get("n") is not None and stats["n"] < MIN_CI_SAMPLES:
        flags.append("few-samples")
    if cache_policy and cache_policy.get("cold_enough") is False:
        flags.append("cache-not-cold")
    if cache_policy and cache_policy.get("cache_bytes_assumed"):
        flags.append("cache-size-assumed")
    if cache_policy and str(cache_policy.get("name", "")).startswith("cold") \
            and exceeds_ceiling(dict(derived) if derived else None):
        flags.append("cache-hit-suspected")
    return flags


def _check_dict(check: Any) -> dict[str, Any] | None:
    if check is None:
        return None
    if hasattr(check, "to_dict"):
        check = check.to_dict()
    if not isinstance(check, Mapping):
        raise InvalidCase(f"[results] check must be a CheckResult or a dict, got "
                          f"{type(check).__name__}")
    return dict(check)


def case_record(case: Case, *, status: str, reason: str = "",
                measurement: Measurement | None = None, check: Any = None,
                derived: Mapping[str, Any] | None = None, device: str = "",
                extra: Mapping[str, Any] | None = None, timer: str = "", cache: str = "",
                spread_threshold_pct: float = SPREAD_FLAG_PCT) -> dict[str, Any]:
    """One case line. ``status`` is ok (needs ``measurement``), skipped or error (with a
    ``reason``). A record without a measurement names the timer and cache it was meant for through
    ``timer``/``cache`` or ``extra={"timer": ..., "cache": ...}``, so that resume and compare can
    key it. Other ``extra`` keys are added at the top level and may not replace a schema field."""
    if status not in STATUSES:
        raise InvalidCase(f"[results] status {status!r} is not one of {', '.join(STATUSES)}")
    if status == "ok" and measurement is None:
        raise InvalidCase("[results] an ok record needs its measurement")
    if status != "ok" and not reason:
        raise InvalidCase(f"[results] a {status} record needs a reason")
    extra = dict(extra or {})
    timer = timer or str(extra.pop("timer", "") or "")
    cache = cache or str(extra.pop("cache", "") or "")
    clash = sorted(set(extra) & (set(_CORE_FIELDS) | set(case.flat())))
    if clash:
        raise InvalidCase(f"[results] extra fields {', '.join(clash)} would replace record fields")
    derived_dict = dict(derived) if derived is not None else None
    measured: dict[str, Any] = {}
    if measurement is not None:
        m = measurement
        if timer and timer != m.timer:
            raise InvalidCase(f"[results] timer {timer!r} given but measured with {m.timer!r}")
        stats = {**m.stats.to_dict(), "converged": m.converged}
        measured = {
            "timer": m.timer, "cache": m.cache.get("name", cache),
            "cache_bytes": m.cache.get("bytes", 0), "cache_pools": m.cache.get("pools", 1),
            "cache_policy": dict(m.cache), "criterion": dict(m.criterion), "k": m.k,
            "dropped": m.dropped, "dropped_why": dict(m.dropped_why), "clock": dict(m.clock),
            "warmup_samples": m.warmup_samples, "elapsed_s": m.elapsed_s,
            "samples_us": tuple(m.samples_us), "stats": stats,
            "flags": tuple(dict.fromkeys([*flags_for(stats, m.criterion, m.dropped, m.cache,
                                                     spread_threshold_pct, derived_dict),
                                          *m.flags])),
        }
        # the harness's rounds and host-noise guard views (harness/measure.py, noise.py)
        for name in ("rounds", "host"):
            if getattr(m, name, None):
                extra.setdefault(name, dict(getattr(m, name)))
    else:
        measured = {"timer": timer, "cache": cache}
    record = Record(case=case, status=status, reason=reason, device=device,
                    derived=derived_dict, check=_check_dict(check), extra=extra, **measured)
    return _json_safe(record.to_json())


def _name(value: Any) -> Any:
    return value.get("name") if isinstance(value, Mapping) else value


# --------------------------------------------------------------------------------- reading

def _major(version: Any) -> int | None:
    if isinstance(version, bool):
        return None
    if isinstance(version, int):
        return version
    if isinstance(version, str) and version.split(".")[0].isdigit():
        return int(version.split(".")[0])
    return None


def _check_version(obj: Mapping[str, Any], where: str) -> None:
    version = obj.get("schema_version")
    major = _major(version)
    if major is None:
        raise InvalidCase(f"{where}: no usable schema_version ({version!r}); not a kvmicro "
                          "results line")
    if major not in READABLE_VERSIONS:
        raise InvalidCase(f"{where}: schema_version {version} is not readable by this kvmicro "
                          f"(it reads schemas {', '.join(map(str, READABLE_VERSIONS))}); use a "
                          f"kvmicro release that writes schema {major}")


def _parse_line(raw: bytes) -> tuple[Any, str]:
    """A line's JSON value and "" , or None and why it is damaged (not UTF-8, not JSON)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not valid UTF-8 at byte {exc.start}"
    try:
        return json.loads(text), ""
    except json.JSONDecodeError as exc:
        return None, f"not a JSON line ({exc.msg})"


def _iter_jsonl(path: Path, data: bytes) -> Iterator[dict[str, Any]]:
    lines = data.split(b"\n")
    # the index of the last line holding anything: only that one may be a killed writer's stub
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        where = f"{path}:{i + 1}"
        obj, damage = _parse_line(line)
        if damage:
            if i == last:
                warnings.warn(f"{where}: ignoring a truncated or damaged last line ({damage}; "
                              "a writer was killed mid-write)", stacklevel=3)
                return
            raise InvalidCase(f"{where}: {damage}; the file is corrupt before its last "
                              "line") from None
        if not isinstance(obj, dict):
            raise InvalidCase(f"{where}: a results line must be a JSON object")
        _check_version(obj, where)
        yield obj


def _pb_host(machine: Mapping[str, Any]) -> dict[str, Any]:
    cpu = machine.get("cpu") or {}
    return {"hostname": machine.get("node"), "os": machine.get("system"),
            "kernel": machine.get("release"), "machine": machine.get("machine"),
            "python": machine.get("python_version"),
            "cpu": {"model": cpu.get("brand_raw") or machine.get("processor"),
                    "cores": cpu.get("count")}}


def _pb_stats(stats: Mapping[str, Any]) -> tuple[list[float], dict[str, Any] | None]:
    """Samples (µs) and a stats dict from pytest-benchmark's stats (seconds per iteration)."""
    data = stats.get("data")
    if data:
        samples = [float(s) * 1e6 for s in data]
        return samples, Stats.from_samples(samples).to_dict()
    if stats.get("median") is None:
        return [], None
    # no raw data saved: keep the figures pytest-benchmark has, leave the rest unknown
    summary: dict[str, Any] = dict.fromkeys(Stats.FIELDS)
    summary.update({"n": stats.get("rounds"), "min_us": stats["min"] * 1e6,
                    "max_us": stats["max"] * 1e6, "mean_us": stats["mean"] * 1e6,
                    "median_us": stats["median"] * 1e6, "stdev_us": stats["stddev"] * 1e6})
    return [], summary


def _pb_records(bench: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    extra = dict(bench.get("extra_info") or {})
    origin = {"source": "pytest-benchmark", "benchmark": bench.get("fullname") or bench.get("name"),
              "group": bench.get("group")}
    if extra.get("type") == "case":
        _check_version(extra, where)
        return [{**extra, **{k: v for k, v in origin.items() if k not in extra}}]
    if isinstance(extra.get("case"), Mapping):
        flat = dict(extra["case"])
    elif "op" in extra and "backend" in extra:
        flat = {k: v for k, v in extra.items()
                if k not in ("device_timer", "derived", "check", "device", "timer", "cache",
                             "kernel")}
    else:
        return []
    samples, stats = _pb_stats(bench.get("stats") or {})
    base = {"type": "case", "schema_version": SCHEMA_VERSION, **flat,
            "device": extra.get("device", ""), "check": extra.get("check"), "status": "ok",
            "reason": "", **origin}
    if extra.get("kernel") is not None:
        base["kernel"] = extra["kernel"]
    host_stats = dict(stats) if stats else None
    host = {**base, "timer": _name(extra.get("timer")) or "host",
            "cache": _name(extra.get("cache")) or "hot", "samples_us": samples,
            "stats": host_stats, "derived": extra.get("derived"), "criterion": None,
            "flags": flags_for(host_stats, None, 0, None) if host_stats else []}
    out = [host]
    device = extra.get("device_timer")
    if isinstance(device, Mapping) and isinstance(device.get("stats"), Mapping):
        dstats = dict(device["stats"])
        derived = None
        if isinstance(extra.get("derived"), Mapping) and dstats.get("median_us"):
            # the host record's derived figures scaled to the device median; the overhead needs a
            # device-timer contiguous median this benchmark does not have
            hd = extra["derived"]
            nbytes = hd.get("bytes")
            copy_gbps = (float(hd["gbps"]) / float(hd["pct_of_peak"]) * 100.0
                         if hd.get("gbps") and hd.get("pct_of_peak") else None)
            if nbytes:
                derived = figures(str(flat.get("op", "")), int(nbytes),
                                  float(dstats["median_us"]), copy_gbps)
            else:
                derived = {"bytes": None, "gbps": None, "pct_of_peak": None, "overhead_pct": None}
        crit = device.get("criterion") if isinstance(device.get("criterion"), Mapping) else None
        cache = device.get("cache")
        out.append({**base, "timer": _name(device.get("timer")) or "device",
                    "cache": _name(cache) or "", "cache_policy": cache
                    if isinstance(cache, Mapping) else None,
                    "samples_us": list(device.get("samples_us") or []), "stats": dstats,
                    "criterion": crit, "derived": derived,
                    "flags": flags_for(dstats, crit, 0, cache if isinstance(cache, Mapping)
                                       else None, derived=derived)})
    return out


def _iter_pytest_benchmark(path: Path, doc: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    machine = doc.get("machine_info") or {}
    commit = doc.get("commit_info") or {}
    yield {"type": "run", "schema_version": SCHEMA_VERSION, "source": "pytest-benchmark",
           "path": str(path), "started_at": doc.get("datetime"),
           "pytest_benchmark_version": doc.get("version"), "host": _pb_host(machine),
           "git_sha": commit.get("id"), "git_dirty": commit.get("dirty"),
           "machine_info": machine, "commit_info": commit}
    skipped = 0
    for i, bench in enumerate(doc.get("benchmarks") or []):
        records = _pb_records(bench, f"{path}: benchmarks[{i}]")
        skipped += not records
        yield from records
    if skipped:
        warnings.warn(f"{path}: {skipped} benchmark(s) without kvmicro case fields in "
                      "extra_info were skipped", stacklevel=3)


def iter_results(path: str | Path) -> Iterator[dict[str, Any]]:
    """Every line of a results file in order (run and case objects); a pytest-benchmark JSON file
    yields one synthesised run line and its benchmarks as case records. A ``.gz`` file is read
    decompressed (large evidence files are committed gzipped)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InvalidCase(f"results file {path} does not exist") from None
    except IsADirectoryError:
        raise InvalidCase(f"results file {path} is a directory") from None
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise InvalidCase(f"{path}: not a readable gzip file ({exc})") from None
    text = data.decode("utf-8", errors="replace")
    stripped = text.lstrip()
    if stripped.startswith("{") and "\n{" not in stripped.rstrip():
        # one JSON document: pytest-benchmark's output (a kvmicro file has a line per object)
        try:
            doc = json.loads(stripped)
        except json.JSONDecodeError:
            doc = None
        if isinstance(doc, dict) and "benchmarks" in doc and "type" not in doc:
            yield from _iter_pytest_benchmark(path, doc)
            return
    yield from _iter_jsonl(path, data)


def read_results(path: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(run lines, case records)`` of a kvmicro JSONL file or a pytest-benchmark JSON file.
    A truncated last line is ignored with a warning; another major schema version is refused."""
    runs: list[dict[str, Any]] = []
    cases: list[dict[str, Any]] = []
    for obj in iter_results(path):
        kind = obj.get("type")
        if kind == "run":
            runs.append(obj)
        elif kind == "case":
            cases.append(obj)
        # other types of the same major version are additions this reader does not know: skip
    return runs, cases


# --------------------------------------------------------------------------------- writing

def _repair_tail(path: Path) -> None:
    """Cut a damaged last line (what readers ignore: cut short by a killed writer, or not valid
    UTF-8) so that appending starts on a fresh line; a last line that is complete JSON but lost
    only its newline is kept and given one."""
    with open(path, "rb+") as f:
        data = f.read()
        body = data.rstrip(b"\n\r\t ")
        if not body:
            return
        cut = body.rfind(b"\n") + 1
        tail = body[cut:]
        _, damage = _parse_line(tail)
        if not damage:
            if not data.endswith(b"\n"):
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
        else:
            warnings.warn(f"{path}: dropping a truncated or damaged last line ({len(tail)} "
                          f"bytes, {damage}) before resuming", stacklevel=3)
            f.truncate(cut)
        f.flush()
        os.fsync(f.fileno())


def _lock(file: IO[str], path: Path) -> None:
    """Hold an exclusive lock on an open results file until it is closed; refuse at once when
    another writer (a second ``sweep --resume``) holds it."""
    if fcntl is None:  # pragma: no cover
        return
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.close()
        raise InvalidCase(f"{path} is being written by another kvmicro process (its lock is "
                          "held); wait for it to finish or write to another --out") from None


class ResultsWriter:
    """Appends records to a JSONL results file, one flushed and fsynced line each.

    A new file starts with ``provenance``; an existing non-empty file is never overwritten:
    without ``resume`` opening it raises, with ``resume`` a truncated last line is cut, a new run
    line is appended and :attr:`done_keys` holds the :func:`record_key` of every case already in
    it (whatever its status), so a sweep can skip them. The file is locked (exclusive
    ``flock``) from before it is read until :meth:`close`: a second writer is refused.
    """

    def __init__(self, path: str | Path, provenance: Mapping[str, Any],
                 resume: bool = False) -> None:
        self.path = Path(path)
        self.done_keys: set[tuple[Any, ...]] = set()
        #: the case records found in the file when resuming
        self.existing: list[dict[str, Any]] = []
        self._file: IO[str] | None = None
        run = {**provenance, "type": "run", "schema_version": SCHEMA_VERSION}
        if self.path.exists() and self.path.stat().st_size > 0 and not resume:
            raise InvalidCase(f"{self.path} exists; results files are never overwritten: "
                              "resume it (--resume) or choose another --out")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a", encoding="utf-8")
        _lock(file, self.path)
        self._file = file
        try:
            self._start(run, resume)
        except BaseException:
            self.close()
            raise

    def _start(self, run: dict[str, Any], resume: bool) -> None:
        if self.path.stat().st_size > 0:
            if not resume:
                raise InvalidCase(f"{self.path} exists; results files are never overwritten: "
                                  "resume it (--resume) or choose another --out")
            _repair_tail(self.path)
            runs, cases = read_results(self.path)
            if runs and runs[0].get("source") == "pytest-benchmark":
                raise InvalidCase(f"{self.path} is a pytest-benchmark file; only kvmicro JSONL "
                                  "files can be resumed")
            for line in provenance_differences(runs[-1], run) if runs else []:
                warnings.warn(f"{self.path}: resuming on different provenance: {line}",
                              stacklevel=3)
            self.existing = cases
            self.done_keys = {record_key(c) for c in cases}
            run["resumed"] = True
        self._write_line(run)

    def _write_line(self, obj: Mapping[str, Any]) -> None:
        if self._file is None:
            raise InvalidCase(f"[results] {self.path} is closed")
        line = dumps(obj) + "\n"
        self._file.write(line)
        self._file.flush()
        os.fsync(self._file.fileno())

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one case record (from :func:`case_record`) and make it durable."""
        if record.get("type") != "case":
            raise InvalidCase(f"[results] write() takes case records, got type "
                              f"{record.get('type')!r}")
        _check_version(record, f"[results] record for {self.path}")
        self._write_line(record)
        self.done_keys.add(record_key(record))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------- merging

def merge(paths: Sequence[str | Path], out: str | Path) -> int:
    """Join results files (shards, pytest-benchmark JSON) into the new JSONL file ``out``, each
    input's lines in order. Warns when provenance differs between inputs (host, CPU, OS, versions,
    devices) and when a case appears more than once (all copies are kept). Never overwrites
    ``out``. Returns the number of case records written."""
    out = Path(out)
    if not paths:
        raise InvalidCase("merge needs at least one input file")
    if out.exists() and out.stat().st_size > 0:
        raise InvalidCase(f"{out} exists; merge never overwrites a file")
    if any(Path(p).resolve() == out.resolve() for p in paths):
        raise InvalidCase(f"{out} is both an input and the output of merge")
    objects: list[dict[str, Any]] = []
    first_run: tuple[Path, dict[str, Any]] | None = None
    seen_diffs: set[str] = set()
    keys: Counter[tuple[Any, ...]] = Counter()
    for raw in paths:
        path = Path(raw)
        for obj in iter_results(path):
            if obj.get("type") == "run":
                if first_run is None:
                    first_run = (path, obj)
                else:
                    for line in provenance_differences(first_run[1], obj):
                        if line not in seen_diffs:
                            seen_diffs.add(line)
                            warnings.warn(f"merge: provenance of {path} differs from "
                                          f"{first_run[0]}: {line}", stacklevel=2)
            elif obj.get("type") == "case":
                keys[record_key(obj)] += 1
            objects.append(obj)
    repeated = sum(1 for n in keys.values() if n > 1)
    if repeated:
        warnings.warn(f"merge: {repeated} case(s) appear more than once across the inputs; all "
                      "copies are kept", stacklevel=2)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "x" if not out.exists() else "w", encoding="utf-8") as f:
        for obj in objects:
            f.write(dumps(obj) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return sum(keys.values())


__all__ = ["DEFAULT_NOISE", "FLAGS", "KEY_FIELDS", "READABLE_VERSIONS", "SCHEMA_VERSION",
           "SPREAD_FLAG_PCT", "STATUSES", "Record", "ResultsWriter", "case_key", "case_record",
           "dumps", "flags_for", "iter_results", "median_halfwidth", "merge", "provenance",
           "provenance_differences", "read_results", "record_key"]
