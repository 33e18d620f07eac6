"""Measuring one case: the one path every measurement takes (sweep workers, ``kvmicro check``, the
pytest plugin and the scripts all come through :class:`Runner`):

    supports? -> materialize (shared by every op of a shape) -> prepare (copies the cache policy
    needs) -> run once, check against the oracle -> measure -> derive -> record -> release

``Unsupported`` and out-of-memory become skipped records, an oracle mismatch or any other failure
an error record; nothing raises out of :meth:`Runner.run_case` but Ctrl-C.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import oracle
from .backends.registry import get_backend
from .check import CheckResult, compare
from .dtypes import carrier
from .errors import KvmicroError, Unsupported
from .points import Point, by_case, contiguous_key, shape_key
from .workload import ATTENTION_OPS, Case, Layout

#: memory for the input copies ``cold:rotate`` uploads per case. 2 GiB holds enough copies to
#: rotate 5x a 60 MB L2 for every op but append, whose working set (one slot per sequence) no
#: affordable number of whole-pool copies can make cold: there more copies only cost uploads.
DEFAULT_ROTATE_BUDGET_BYTES = 2 * 1024 ** 3


def _arrays_key(case: Case) -> tuple[Any, ...]:
    # materialize draws the same numbers for every layout (the layout only permutes the pools at
    # the end), so arrays are shared across layouts and ops; append stores one more token, which
    # can change the table and the pool, so it gets its own arrays
    return (shape_key(case)[1:], case.placement, case.op == "append")


class ArrayCache:
    """Host arrays and oracle results, computed once per shape and shared by every op, layout and
    backend of that shape. Holds the last ``size`` shapes (the run order keeps a shape's points
    together, so two slots, plain and append, suffice)."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._entries: OrderedDict[tuple[Any, ...], dict[str, Any]] = OrderedDict()

    def _entry(self, case: Case) -> dict[str, Any]:
        from .workload import materialize

        key = _arrays_key(case)
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        while len(self._entries) >= self.size:
            self._entries.popitem(last=False)
        logical = materialize(case.with_(layout="NSHD"))
        entry: dict[str, Any] = {"logical": logical, "layouts": {}, "refs": {}}
        self._entries[key] = entry
        return entry

    def arrays(self, case: Case) -> dict[str, np.ndarray]:
        """``materialize(case)``, exactly."""
        entry = self._entry(case)
        if case.layout not in entry["layouts"]:
            logical, layout = entry["logical"], Layout(case.layout)
            entry["layouts"] = {case.layout: {
                **logical,
                "k_pool": layout.from_logical(logical["k_pool"]),
                "v_pool": layout.from_logical(logical["v_pool"])}}
        return entry["layouts"][case.layout]

    def reference(self, case: Case) -> Any:
        """``oracle.run(case, arrays)`` in float64. Attention results do not depend on the layout
        (the logical pool is the same), so they are computed once per shape; gather and append
        are recomputed on each call (see :meth:`expected` for the cheap exact check)."""
        if case.op not in ATTENTION_OPS:
            return oracle.run(case, self.arrays(case))
        entry = self._entry(case)
        if "attention" not in entry["refs"]:
            base = case.with_(layout="NSHD", op="sdpa_contiguous")
            entry["refs"]["attention"] = oracle.run(base, entry["logical"])
        return entry["refs"]["attention"]

    def expected(self, case: Case) -> tuple[np.ndarray, np.ndarray]:
        """The oracle's (k, v) result of gather or append, converted to the dtype's carrier: the
        values are copies of carrier values, so the conversion is exact and an exact op can be
        checked with a plain equality instead of a float64 difference of pool-sized arrays.
        Computed once per shape (append on the NSHD pool, then permuted into the layout)."""
        entry = self._entry(case)
        refs = entry["refs"]
        if case.op not in refs:
            dtype = carrier(case.dtype)
            ref = oracle.run(case.with_(layout="NSHD"), entry["logical"])
            refs[case.op] = tuple(np.asarray(r).astype(dtype) for r in ref)
            del ref
        ref = refs[case.op]
        if case.op == "append" and case.layout != "NSHD":
            if refs.get("append_layout", (None,))[0] != case.layout:
                layout = Layout(case.layout)
                refs["append_layout"] = (case.layout,
                                         tuple(layout.from_logical(pool) for pool in ref))
            return refs["append_layout"][1]
        return ref

    def clear(self) -> None:
        self._entries.clear()


def exact_check(case: Case, out: Any, expected: tuple[np.ndarray, np.ndarray]) -> Any:
    """``CheckResult`` of a gather or append output that equals ``expected`` exactly (gather on
    the positions each sequence holds, as check.compare does), else None: the caller then asks
    check.compare, which measures and explains the difference."""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        return None
    for got, want in zip(out, expected, strict=True):
        got = np.asarray(got)
        if got.shape != want.shape or got.dtype != want.dtype:
            return None
        if case.op == "gather":
            if not all(np.array_equal(got[b, :, :n], want[b, :, :n])
                       for b, n in enumerate(case.ctx_list)):
                return None
        elif not np.array_equal(got, want):
            return None
    return CheckResult(0.0, 0.0, True, "")


def is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError, torch's OutOfMemoryError, or a CUDA/Metal allocation failure by its message."""
    if isinstance(exc, MemoryError):
        return True
    if "OutOfMemory" in type(exc).__name__:
        return True
    text = str(exc).lower()
    return "out of memory" in text or "cudaerrormemoryallocation" in text


class Runner:
    """Measures cases into records, one case at a time, in this process: the one measurement path.

    :meth:`run_case` is what a sweep worker calls per case; ``kvmicro check`` calls
    :meth:`check_case`, the pytest plugin :meth:`prepare_checked` and :meth:`measure_prepared`.
    Host arrays and oracle results are shared across the cases of a shape (:class:`ArrayCache`),
    the device ceilings are measured once per device, and each ``sdpa_contiguous`` median is kept
    as the baseline of the overhead of the later attention ops of its shape (a sweep's parent
    hands them to a fresh worker with :meth:`set_baseline`).
    """

    def __init__(self, measure: dict[str, Any] | None = None,
                 rotate_budget_bytes: int = DEFAULT_ROTATE_BUDGET_BYTES,
                 bandwidth: dict[str, dict[str, Any]] | None = None) -> None:
        self.measure_overrides = dict(measure or {})
        self.rotate_budget_bytes = int(rotate_budget_bytes)
        self.cache = ArrayCache()
        #: per backend: the copy/read ceilings (given, or measured on first use)
        self._bandwidth: dict[str, dict[str, Any]] = dict(bandwidth or {})
        self._bandwidth_by_device: dict[tuple[str, str], dict[str, Any]] = {}
        self._device: dict[str, str] = {}
        self._contiguous: dict[tuple[Any, ...], float] = {}
        #: seconds the last prepare_checked spent preparing and checking (go into the records)
        self.timings: dict[str, float] = {}

    # -- per backend, once ------------------------------------------------------------------
    def availability_reason(self, backend: str) -> str:
        """Empty when ``backend`` can run here, else why not."""
        try:
            avail = get_backend(backend).availability()
        except ImportError as exc:
            return f"backend {backend} is not available here: {exc}"
        return "" if avail else f"backend {backend} is not available here: {avail.reason}"

    def device_name(self, backend: str) -> str:
        if backend not in self._device:
            try:
                self._device[backend] = get_backend(backend).device_info().name
            except Exception as exc:  # device_info of an unavailable backend may fail; not fatal
                self._device[backend] = f"? ({exc})"
        return self._device[backend]

    def bandwidth(self, backend: str) -> dict[str, Any]:
        """The backend's device copy/read ceilings, measured once per device per run."""
        if backend not in self._bandwidth:
            b = get_backend(backend)
            info = b.device_info()
            key = (info.kind, info.name)
            if key not in self._bandwidth_by_device:
                self._bandwidth_by_device[key] = dict(b.bandwidth())
            self._bandwidth[backend] = self._bandwidth_by_device[key]
        return self._bandwidth[backend]

    # -- baselines --------------------------------------------------------------------------
    def set_baseline(self, point: Point, median_us: float) -> None:
        """``median_us`` of ``sdpa_contiguous`` for ``point``'s shape, timer and cache."""
        self._contiguous[contiguous_key(point)] = float(median_us)

    def baseline(self, point: Point) -> float | None:
        """The ``sdpa_contiguous`` median ``point``'s overhead is against, if measured."""
        return self._contiguous.get(contiguous_key(point))

    # -- per case ---------------------------------------------------------------------------
    def config(self, point: Point) -> Any:
        from .harness.measure import MeasureConfig

        return MeasureConfig(timer=point.timer, cache=point.cache, **self.measure_overrides)

    def cache_policy(self, point: Point) -> Any:
        from .harness.cache import make_cache_policy

        info = get_backend(point.case.backend).device_info()
        # the policy's own budget is a quarter of the device's memory; a sweep caps it, since
        # every rotated copy is uploaded per case and copies past the target buy nothing
        budget = min(info.memory_bytes // 4 if info.memory_bytes else self.rotate_budget_bytes,
                     self.rotate_budget_bytes)
        return make_cache_policy(point.cache, info, point.timer, budget_bytes=max(1, budget))

    def prepare_checked(self, case: Case, copies: int = 1) -> tuple[Any, CheckResult]:
        """Prepare ``case`` with ``copies`` input sets, run it once and check it against the oracle.
        Returns ``(prepared, check_result)``; the caller releases ``prepared``. Raises
        ``Unsupported`` when the backend refuses the case."""
        backend = get_backend(case.backend)
        backend.supports(case)
        arrays = self.cache.arrays(case)
        if case.op == "append" and backend.device_info().kind == "cpu":
            # append writes into its pools; a CPU backend that wraps host memory must not change
            # the arrays the next backend sees (a device backend uploads a copy anyway)
            arrays = {**arrays, "k_pool": arrays["k_pool"].copy(),
                      "v_pool": arrays["v_pool"].copy()}
        t0 = time.perf_counter()
        prepared = backend.prepare(case, arrays, copies)
        t1 = time.perf_counter()
        try:
            prepared.select(0)
            prepared.run()
            prepared.sync()
            out = prepared.output()
            result = None
            if case.op not in ATTENTION_OPS:
                result = exact_check(case, out, self.cache.expected(case))
            if result is None:   # a mismatch (or an odd result): the oracle's full account
                result = compare(case, arrays, out, self.cache.reference(case))
        except BaseException:
            prepared.release()
            raise
        self.timings = {"prepare_s": round(t1 - t0, 4),
                        "check_s": round(time.perf_counter() - t1, 4)}
        return prepared, result

    def check_case(self, case: Case) -> tuple[str, str, CheckResult | None]:
        """``(status, reason, check)`` of ``case`` against the oracle, without measuring it:
        ``ok``, ``skipped`` (unavailable, refused, out of memory) or ``error`` (a mismatch, or an
        exception: then ``check`` is None)."""
        reason = self.availability_reason(case.backend)
        if reason:
            return "skipped", reason, None
        try:
            prepared, check = self.prepare_checked(case)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            status, why = failure(exc)
            return status, why, None
        prepared.release()
        if not check.passed:
            return "error", mismatch_reason(case, check), check
        return "ok", "", check

    def derive(self, point: Point, stats: Any) -> dict[str, Any]:
        """Bytes, GB/s, % of the device's ceilings and, for attention ops, the overhead against
        the ``sdpa_contiguous`` baseline of the same shape, timer and cache. ``stats`` is a
        :class:`~kvmicro.harness.stats.Stats` or a median in µs."""
        from .derived import derive

        bandwidth = self.bandwidth(point.case.backend)
        return derive(point.case, stats, bandwidth.get("copy_gbps"), self.baseline(point),
                      read_gbps=bandwidth.get("read_gbps"))

    def measure_prepared(self, point: Point, prepared: Any, check: CheckResult,
                         policy: Any = None, extra: dict[str, Any] | None = None
                         ) -> dict[str, Any]:
        """The record of ``point`` measured on a case already prepared and checked: measure (its
        rounds back to back), derive, and keep an ``sdpa_contiguous`` median as its shape's
        baseline. A timer the prepared case lacks is a skipped record, a failure of the
        measurement an error record."""
        from .harness.measure import measure

        if point.timer not in prepared.timers:
            return self._failed(point, prepared, check, extra, "skipped", _no_timer(point,
                                                                                    prepared))
        try:
            m = measure(prepared, self.config(point),
                        policy if policy is not None else self.cache_policy(point))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            return self._failed(point, prepared, check, extra, *failure(exc))
        return self.measured(point, prepared, check, m, extra)

    def measured(self, point: Point, prepared: Any, check: CheckResult, m: Any,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The ok record of a measurement ``m`` of ``point`` (derived figures included), or an
        error record when deriving fails; an ``sdpa_contiguous`` median becomes its shape's
        baseline."""
        from .results import case_record

        try:
            derived = self.derive(point, m.stats)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            return self._failed(point, prepared, check, extra, *failure(exc))
        if point.case.op == "sdpa_contiguous":
            self.set_baseline(point, m.stats.median_us)
        return case_record(point.case, status="ok", measurement=m, check=check.to_dict(),
                           derived=derived, device=self.device_name(point.case.backend),
                           extra=dict(extra or {}))

    def _failed(self, point: Point, prepared: Any, check: CheckResult | None,
                extra: dict[str, Any] | None, status: str, reason: str) -> dict[str, Any]:
        from .results import case_record

        return case_record(point.case, status=status, reason=reason,
                           device=self.device_name(point.case.backend),
                           check=check.to_dict() if check is not None else None,
                           extra={"timer": point.timer, "cache": point.cache, **(extra or {})})

    def _prepare_points(self, points: list[Point]) -> _Prepared | list[dict[str, Any]]:
        """Prepare and check the case of ``points`` for all of them (as many input copies as the
        most demanding cache policy needs); or, when that fails, their records (skipped: the
        backend is unavailable or refuses; error: a mismatch or an exception)."""
        from .derived import footprint_bytes, working_set_bytes

        case = points[0].case
        timings: dict[str, Any] = {"priority": _priority(case)}
        reason = self.availability_reason(case.backend)
        if reason:
            return [self._failed(p, None, None, timings, "skipped", reason) for p in points]
        try:
            policies = [self.cache_policy(p) for p in points]
            copies = max(max(1, int(pol.copies_needed(working_set_bytes(case),
                                                      footprint_bytes(case))))
                         for pol in policies)
            prepared, check = self.prepare_checked(case, copies)
            timings.update(self.timings, kernel=prepared.kernel)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            status, why = failure(exc)
            return [self._failed(p, None, None, timings, status, why) for p in points]
        if not check.passed:
            prepared.release()
            why = mismatch_reason(case, check)
            return [self._failed(p, None, check, timings, "error", why) for p in points]
        return _Prepared(points, prepared, check, policies, timings, copies)

    def run_case(self, points: list[Point]) -> Iterator[dict[str, Any]]:
        """Records for the points of one case (its timers and cache policies), one per point and
        in their order: prepared once, checked against the oracle, then measured point by
        point."""
        ready = self._prepare_points(points)
        if isinstance(ready, list):
            yield from ready
            return
        try:
            for p, policy in zip(points, ready.policies, strict=True):
                yield self.measure_prepared(p, ready.prepared, ready.check, policy, ready.timings)
        finally:
            ready.prepared.release()

    # -- a shape group ----------------------------------------------------------------------
    def memory_budget(self, backend: str) -> int:
        """Bytes of inputs the cases measured together may hold on ``backend``'s device: half
        its memory (a quarter of the host's for a CPU), at least one rotation budget."""
        from .environment import memory_bytes

        info = get_backend(backend).device_info()
        total = info.memory_bytes if info.kind != "cpu" else 0
        if not total:
            total = int(memory_bytes().get("total") or 0) // 2
        return max(total // 2, self.rotate_budget_bytes)

    def chunks(self, points: list[Point]) -> list[list[list[Point]]]:
        """``points`` (one shape group) as runs of cases measured together: consecutive cases
        whose inputs (pools with their slack, times the copies their cache policies upload, plus
        a flush scratch under cold:flush) fit :meth:`memory_budget` together; a case alone in
        its run is measured on its own."""
        from .derived import footprint_bytes, working_set_bytes

        out: list[list[list[Point]]] = []
        used = 0
        budget = None
        for case_points in by_case(points):
            case = case_points[0].case
            try:
                copies = max(max(1, int(self.cache_policy(p).copies_needed(
                    working_set_bytes(case), footprint_bytes(case)))) for p in case_points)
                need = footprint_bytes(case) * copies
                if any(p.cache == "cold:flush" for p in case_points):
                    # each prepared case may keep its own flush scratch: twice the cache
                    need += 2 * get_backend(case.backend).device_info().cache_bytes
                budget = self.memory_budget(case.backend) if budget is None else budget
            except Exception:   # the case will fail on its own; measure it alone
                out.append([case_points])
                used, budget = 0, None
                continue
            if out and len(out[-1]) and used + need <= budget and \
                    out[-1][-1][0].case.backend.split(":")[1] == case.backend.split(":")[1]:
                out[-1].append(case_points)
                used += need
            else:
                out.append([case_points])
                used = need
        return out

    def run_group(self, points: list[Point], interleave: bool = True
                  ) -> Iterator[dict[str, Any]]:
        """Records for ``points`` (the cases of one shape group), one per point and in their
        order. With ``interleave`` the cases that fit in memory together (:meth:`chunks`) are
        prepared and checked first, then measured in interleaved rounds: round 1 of every
        point, then round 2, ..., so that each case's samples spread over at least
        ``MeasureConfig.rounds`` rounds taken at different moments (a host disturbance hits
        several cases a little, not one case a lot). Without it, or where only one case fits,
        case by case."""
        for chunk in (self.chunks(points) if interleave else [[c] for c in by_case(points)]):
            if len(chunk) == 1:
                yield from self.run_case(chunk[0])
            else:
                yield from self._run_interleaved(chunk)

    def _run_interleaved(self, chunk: list[list[Point]]) -> Iterator[dict[str, Any]]:
        from .harness.measure import Sampler, interleaved_order

        # names this chunk's interleaved rounds in its records (rounds.group): two records of
        # one group took their round i in the same pass, and a verdict may pair them
        group = uuid.uuid4().hex[:16]
        records: dict[int, dict[str, Any]] = {}      # by position in the chunk's points
        samplers: dict[int, tuple[Point, _Prepared, Any]] = {}
        held: list[_Prepared] = []
        position = 0
        try:
            for case_points in chunk:
                ready = self._prepare_points(case_points)
                if isinstance(ready, list):
                    for record in ready:
                        records[position] = record
                        position += 1
                    continue
                held.append(ready)
                for p, policy in zip(case_points, ready.policies, strict=True):
                    if p.timer not in ready.prepared.timers:
                        records[position] = self._failed(
                            p, ready.prepared, ready.check, ready.timings, "skipped",
                            _no_timer(p, ready.prepared))
                    else:
                        try:
                            samplers[position] = (p, ready, Sampler(
                                ready.prepared, self.config(p), policy, interleave_group=group))
                        except KvmicroError as exc:
                            records[position] = self._failed(p, ready.prepared, ready.check,
                                                             ready.timings, *failure(exc))
                    position += 1
            active = dict(samplers)
            passes = 0
            while active:
                # every other pass in reverse, so no member always follows the same neighbour
                for pos, (p, ready, sampler) in interleaved_order(list(active.items()), passes):
                    try:
                        sampler.round()
                        if sampler.done():
                            del active[pos]
                    except (KeyboardInterrupt, SystemExit):
                        raise
                    except BaseException as exc:
                        records[pos] = self._failed(p, ready.prepared, ready.check,
                                                    ready.timings, *failure(exc))
                        del active[pos]
                passes += 1
            for pos in range(position):   # in point order: sdpa_contiguous first
                if pos not in records:
                    p, ready, sampler = samplers[pos]
                    try:
                        m = sampler.result()
                    except (KeyboardInterrupt, SystemExit):
                        raise
                    except BaseException as exc:
                        records[pos] = self._failed(p, ready.prepared, ready.check,
                                                    ready.timings, *failure(exc))
                    else:
                        records[pos] = self.measured(p, ready.prepared, ready.check, m,
                                                     {**ready.timings,
                                                      "interleaved_cases": len(held)})
                yield records[pos]
        finally:
            for ready in held:
                ready.prepared.release()


@dataclass
class _Prepared:
    """A case prepared and checked for its points (Runner._prepare_points)."""

    points: list[Point]
    prepared: Any
    check: CheckResult
    policies: list[Any]
    timings: dict[str, Any]
    copies: int


def _no_timer(point: Point, prepared: Any) -> str:
    return (f"timer {point.timer} not available on {point.case.backend} (it has "
            f"{', '.join(prepared.timers)})")


def _priority(case: Case) -> str:
    """The submission priority ``case`` runs under: its ``priority`` option where the backend has
    one, else the backend's (process-wide) priority."""
    backend = get_backend(case.backend)
    parse = getattr(backend, "parse_options", None)
    if parse is not None:
        try:
            return str(parse(getattr(case, "options", ())).get("priority", backend.priority))
        except KvmicroError:
            pass
    return backend.priority


def mismatch_reason(case: Case, check: CheckResult) -> str:
    """The reason of the error record of a case whose output disagrees with the oracle."""
    return (f"{case.op} on {case.backend} disagrees with the oracle: max |err| "
            f"{check.max_abs_err:.3g} > tolerance {check.tolerance:.3g}"
            + (f" ({check.detail})" if check.detail else ""))


def failure(exc: BaseException) -> tuple[str, str]:
    """The status and reason a failed case is recorded with: a refusal or an exhausted device is
    a skip, anything else an error."""
    if isinstance(exc, Unsupported):
        return "skipped", str(exc)
    if is_out_of_memory(exc):
        return "skipped", f"out of memory: {exc}"
    return "error", _describe(exc)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, KvmicroError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


__all__ = ["DEFAULT_ROTATE_BUDGET_BYTES", "ArrayCache", "Runner", "exact_check",
           "failure", "is_out_of_memory", "mismatch_reason"]
