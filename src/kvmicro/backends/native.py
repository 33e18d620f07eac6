"""kvmicro's own kernels, through the compiled extension ``kvmicro._native``.

``native:cpu`` (threaded C++, AVX2/F16C/FMA where the CPU has them), ``native:cuda`` (when the
extension was built with CUDA and a GPU is visible) and ``native:metal`` (macOS only; never here).
The extension validates and times inside C++; this module only converts carrier arrays to what
the extension takes (16-bit dtypes as uint16 bit patterns) and back.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from ..dtypes import from_bits16, to_bits16
from ..errors import InvalidCase, Unsupported
from ..workload import OPS, Case, Layout
from .base import PRIORITY_OPTION, Availability, Backend, DeviceInfo, Option, Prepared
from .common import require, usable_cores
from .nvml import sm_clock, sm_clock_status

_ARRAY_ARGS = ("q", "k_pool", "v_pool", "block_table", "ctx", "k_dense", "v_dense", "k_new",
               "v_new")
_DATA_ARGS = ("q", "k_pool", "v_pool", "k_dense", "v_dense", "k_new", "v_new")
# the arrays each op reads; the rest are passed as None so that nothing unused is copied
_READS: dict[str, tuple[str, ...]] = {
    "sdpa_contiguous": ("q", "k_pool", "v_pool", "block_table", "ctx", "k_dense", "v_dense"),
    "gather": ("k_pool", "v_pool", "block_table", "ctx"),
    "gather_sdpa": ("q", "k_pool", "v_pool", "block_table", "ctx"),
    "paged_sdpa": ("q", "k_pool", "v_pool", "block_table", "ctx"),
    "append": ("k_pool", "v_pool", "block_table", "ctx", "k_new", "v_new"),
}


def load_native() -> ModuleType:
    """Import ``kvmicro._native`` (raises ImportError when the extension is not built)."""
    from .. import _native  # type: ignore[attr-defined]

    return _native


def _import_problem() -> str | None:
    try:
        load_native()
    except ImportError as err:
        return (f"kvmicro._native is not built or does not load ({err}); build it with "
                "`pip install .` or scripts/dev-build.sh")
    return None


def to_native(array: Any, dtype: str, name: str) -> np.ndarray:
    """A carrier array as the extension takes it: uint16 bits for 16-bit dtypes, float32, int32.

    Nothing is coerced silently: block ids and contexts must be integers (a float table would be
    truncated, a bool one read as 0/1), data arrays real floating point (an int, object or string
    array would be parsed as numbers); anything else raises InvalidCase naming the array."""
    if not isinstance(array, np.ndarray):
        raise InvalidCase(f"{name} must be a numpy array, got {type(array).__name__}")
    if name not in _DATA_ARGS:
        if array.dtype.kind not in "iu":
            raise InvalidCase(f"{name} has dtype {array.dtype} (e.g. {_first(array)}); block ids "
                              "and contexts must be integers")
        if array.dtype != np.int32 and array.size and (
                array.min() < np.iinfo(np.int32).min or array.max() > np.iinfo(np.int32).max):
            raise InvalidCase(f"{name} holds values outside int32 (min {array.min()}, max "
                              f"{array.max()})")
        return np.ascontiguousarray(array, dtype=np.int32)
    if array.dtype.kind != "f":
        raise InvalidCase(f"{name} has dtype {array.dtype} (e.g. {_first(array)}); a {dtype} "
                          "case carries floating-point values (kvmicro.dtypes)")
    if dtype == "float32":
        return np.ascontiguousarray(array, dtype=np.float32)
    return to_bits16(array, dtype)


def _first(array: np.ndarray) -> str:
    """The array's first element, for a message."""
    if not array.size:
        return "empty"
    first = array.flat[0]
    return repr(first.item() if isinstance(first, np.generic) else first)


def from_native(array: np.ndarray, dtype: str) -> np.ndarray:
    """An extension result back in the carrier type of ``dtype``."""
    return array if dtype == "float32" else from_bits16(array, dtype)


def capabilities() -> dict[str, Any]:
    """The native kernels' support matrix: ``{device: {op: {"dtypes", "head_dims" (None: any),
    "variants"[, "kernels"]}}}`` as the extension declares it (common/capabilities.h)."""
    return dict(load_native().capabilities())


def _check_capability(backend: str, case: Case, table: dict[str, Any]) -> None:
    if case.dtype not in table["dtypes"]:
        raise Unsupported(f"[{case.op}] {backend} does not support dtype {case.dtype} "
                          f"(supported: {', '.join(table['dtypes'])})")
    dims = table["head_dims"]
    if dims is not None and case.head_dim not in dims:
        raise Unsupported(f"[{case.op}] head_dim {case.head_dim} is not supported by "
                          f"{backend} (supported: {', '.join(map(str, dims))})")


class NativePrepared(Prepared):
    """A case prepared by the extension: wraps its ``PreparedOp``."""

    def __init__(self, case: Case, op: Any, timers: tuple[str, ...]) -> None:
        super().__init__(case)
        self._op = op
        self.timers = timers
        self.copies = op.copies

    @property
    def kernel(self) -> str:
        """The kernel the extension chose at prepare, and why."""
        return str(self._op.kernel)

    def run(self) -> None:
        self._op.run()

    def sync(self) -> None:
        self._op.sync()

    def select(self, copy: int) -> None:
        super().select(copy)
        self._op.select(copy)

    def output(self) -> Any:
        results = tuple(from_native(a, self.case.dtype) for a in self._op.output())
        return results[0] if len(results) == 1 else results

    def flush_cache(self, nbytes: int) -> None:
        self._op.flush(int(nbytes))

    def poison_outputs(self) -> None:
        """Overwrite the current copy's outputs with NaN bits (native:cuda only)."""
        self._op.poison_outputs()

    def device_times(self, reps: int, flush_bytes: int = 0) -> list[float]:
        return list(self._op.device_times(int(reps), int(flush_bytes)))

    def graph_times(self, reps: int, k: int, rotate: bool = True) -> list[float]:
        if "graph" not in self.timers:
            raise Unsupported(f"{self.case.backend} has no graph timer")
        return list(self._op.graph_times(int(reps), int(k), bool(rotate)))

    def release(self) -> None:
        # Dropping the only reference frees the buffers and joins the CPU threads now.
        self._op = _Released(self.case.backend)


class _Released:
    """Stands in for a released op, so that a late call fails with a clear message."""

    def __init__(self, backend: str) -> None:
        self._backend = backend

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"{self._backend}: this prepared case was released")


#: the extension's priority argument: the device's least / default / greatest stream priority
_PRIORITY_LEVEL = {"low": -1, "normal": 0, "high": 1}


class _NativeBackend(Backend):
    ops = OPS
    device = "cpu"
    timers: tuple[str, ...] = ("host", "batched", "device")

    def __init__(self, index: int = 0, threads: int = 0) -> None:
        self.index = index
        self.threads = threads

    def versions(self) -> dict[str, str]:
        if _import_problem():
            return {}
        info = load_native().build_info()
        return {"kvmicro._native": str(info["version"]), "compiler": str(info["compiler"])}

    def supports(self, case: Case) -> None:
        """The base checks, then the extension's capability table (common/capabilities.h):
        dtype and head_dim of the op, and of the kernel a ``kernel`` option asks for."""
        super().supports(case)
        native = None if _import_problem() else load_native()
        if native is None or not hasattr(native, "capabilities"):
            return  # availability() says why; the extension's planners still refuse
        table = native.capabilities()[self.device].get(case.op)
        if table is None:
            raise Unsupported(f"{self.name} does not implement {case.op}")
        _check_capability(self.name, case, table)
        kernel = self.parse_options(case.options).get("kernel", "auto")
        if kernel not in ("auto", "simt") and "kernels" in table:
            # The same refusal as the planner's: a tensor-core kernel is never silently replaced.
            need = table["kernels"][kernel]
            d_inner = case.op != "paged_sdpa" or Layout(case.layout).d_innermost
            if case.dtype not in need["dtypes"] or case.head_dim not in need["head_dims"] or \
                    not d_inner:
                raise Unsupported(
                    f"[{case.op}] option kernel={kernel} needs tensor cores: "
                    f"{'/'.join(need['dtypes'])}, D innermost, head_dim "
                    f"{', '.join(map(str, need['head_dims']))}; this case is {case.dtype}, "
                    f"{'D innermost' if d_inner else 'D not innermost'}, head_dim {case.head_dim}")

    def prepare(self, case: Case, arrays: dict[str, np.ndarray], copies: int = 1) -> Prepared:
        require(self, case)
        options = self.parse_options(case.options)
        priority = _PRIORITY_LEVEL[options.pop("priority", "normal")]
        # The variant knobs go to the extension as text, which validates them again (it is also
        # called directly); only the priority travels as its own argument.
        variant = {key: self.OPTIONS[key].canonical(value) for key, value in options.items()}
        reads = _READS[case.op]
        args = [to_native(arrays[k], case.dtype, k) if k in reads else None for k in _ARRAY_ARGS]
        # a CPU pool gets one thread per core this process may use (a pinned worker has one)
        threads = self.threads or (usable_cores() if self.device == "cpu" else 0)
        op = load_native().prepare(
            self.device, case.op, case.layout, case.dtype, case.block_size, case.softmax_scale,
            *args, copies=copies, threads=threads, index=self.index, priority=priority,
            options=variant)
        prepared = NativePrepared(case, op, self.timers)
        prepared.sm_clock = self._sm_clock()
        return prepared

    def _sm_clock(self) -> Any:
        """The throttle guard's clock for this backend's device (None on the CPU)."""
        return None


class NativeCpuBackend(_NativeBackend):
    """Threaded C++ kernels on the host CPU."""

    name = "native:cpu"
    OPTIONS: ClassVar[dict[str, Option]] = {
        "simd": Option("bool", True, help="the AVX2/F16C/FMA kernels where the CPU has them "
                                          "(false: the portable kernels, as on other CPUs)"),
    }

    def availability(self) -> Availability:
        problem = _import_problem()
        if problem:
            return Availability(False, problem)
        features = load_native().cpu_features()
        return Availability(True, f"{features['simd']} kernels, {features['threads']} threads")

    def device_info(self) -> DeviceInfo:
        threads = self.threads or usable_cores()
        extra: dict[str, Any] = {"machine": platform.machine()}
        if not _import_problem():
            extra["cpu_features"] = dict(load_native().cpu_features())
            extra["build"] = dict(load_native().build_info())
        return DeviceInfo(name=f"{cpu_name()} ({threads} threads)", kind="cpu",
                          cache_bytes=last_level_cache_bytes(), memory_bytes=0, extra=extra)


class NativeCudaBackend(_NativeBackend):
    """kvmicro's CUDA kernels (built when nvcc was found at build time)."""

    name = "native:cuda"
    device = "cuda"
    #: the planner's knobs (docs/cuda.md); defaults are what the planner does unasked
    OPTIONS: ClassVar[dict[str, Option]] = {
        "priority": PRIORITY_OPTION,
        "kernel": Option("choice", "auto", ("auto", "simt", "mma", "async", "bulk"),
                         help="attention kernel: auto (the planner's rule), simt, mma (tensor "
                              "cores, register loads), async (tensor cores, cp.async pipeline), "
                              "bulk (tensor cores, bulk-copy pipeline; sm_90+, "
                              "combine=separate)"),
        "splits": Option("int", 0, minimum=0, maximum=512,
                         help="context splits of the attention kernel (0: the planner's choice)"),
        "min_chunk": Option("int", 64, minimum=1, maximum=2**31 - 1,
                            help="fewest tokens per split the planner may choose"),
        "blocks_per_sm": Option("int", 2, minimum=1, maximum=64,
                                help="thread blocks per SM the tensor-core split rule aims at"),
        "stages": Option("int", 2, minimum=2, maximum=3,
                         help="pipeline depth of the async and bulk kernels"),
        "l2_prefetch": Option("choice", "128", ("0", "128"),
                              help="L2 prefetch hint (bytes) of the mma kernel's loads"),
        "pdl": Option("bool", True,
                      help="launch the split combine with programmatic dependent launch (sm_90+)"),
        "pdl_entry": Option("choice", "auto", ("off", "exit", "early", "auto"),
                            help="launch the attention's split kernel as a programmatic dependent "
                                 "of the stream's previous kernel (sm_90+), its blocks waiting "
                                 "for it before their first read: off (stream order), exit "
                                 "(scheduled as that kernel's blocks exit), early (also allowed "
                                 "by the combine kernel once its own wait is over) or auto, the "
                                 "default (the planner: early where the split grid fits one "
                                 "block per SM or is the cp.async kernel, then padded as "
                                 "spread=true; else off)"),
        "spread": Option("bool", False,
                         help="pad the split kernel's shared memory so that at most "
                              "ceil(blocks / SMs) of its blocks are resident per SM: one even "
                              "wave wherever the grid is dispatched from"),
        "combine": Option("choice", "separate", ("separate", "last", "cluster"),
                          help="how the context splits are merged: separate (a second kernel), "
                               "last (one launch: the last split block of each sequence and "
                               "head group merges them) or cluster (one launch, sm_90+: the "
                               "splits of a sequence and head group form a thread block cluster "
                               "and merge through distributed shared memory; tensor-core "
                               "kernels, at most 16 splits)"),
        "schedule": Option("choice", "static", ("static", "steal"),
                           help="which tokens a split block reads: static (its split's fixed "
                                "range) or steal (its warps' first tiles fixed, the rest claimed "
                                "16 keys at a time from a counter per sequence and head group, "
                                "so the splits of a sequence end together; the cp.async kernel "
                                "under combine=separate with more than one split, and not "
                                "bitwise repeatable run to run)"),
    }
    timers = ("host", "batched", "device", "graph")
    #: A build of the timeline probe (``build_info()["timeline"]``, -DKVMICRO_TIMELINE=ON) stamps
    #: the global timer in its kernels, so its timings are not native:cuda's: there this backend
    #: is unavailable, and no sweep records them, unless an instance says it is the probe's
    #: reader (scripts/timeline.py and its test set this).
    timeline_probe = False

    def availability(self) -> Availability:
        problem = _import_problem()
        if problem:
            return Availability(False, problem)
        native = load_native()
        build = native.build_info()
        if not build["cuda"]:
            return Availability(False, "kvmicro._native was built without CUDA (no nvcc at build "
                                       "time, or KVMICRO_CUDA=OFF)")
        if build.get("timeline") and not self.timeline_probe:
            return Availability(False, "kvmicro._native is the timeline probe's build "
                                       "(-DKVMICRO_TIMELINE=ON): its kernels stamp the global "
                                       "timer, so its timings are not native:cuda's; rebuild "
                                       "without it to measure")
        count_fn = getattr(native, "cuda_device_count", None)
        if count_fn is None:
            return Availability(False, "kvmicro._native has CUDA but no cuda_device_count()")
        count = int(count_fn())
        if count == 0:
            return Availability(False, "no CUDA device is visible (no GPU, or no driver)")
        if self.index >= count:
            return Availability(False, f"CUDA device {self.index} requested, {count} visible")
        return Availability(True, f"{count} CUDA device(s)")

    def device_info(self) -> DeviceInfo:
        info_fn = None if _import_problem() else getattr(load_native(), "cuda_device_info", None)
        if info_fn is None or not self.availability():
            return DeviceInfo(name="unavailable", kind="cuda", extra={"index": self.index})
        info = dict(info_fn(self.index))
        info["throttle_guard"] = sm_clock_status(str(info.get("pci_bus_id", "")))
        name = str(info.pop("name", f"CUDA device {self.index}"))
        cache = int(info.pop("l2_cache_bytes", info.pop("l2_bytes", 0)) or 0)
        memory = int(info.pop("total_memory_bytes", info.pop("memory_bytes", 0)) or 0)
        info["index"] = self.index
        return DeviceInfo(name=name, kind="cuda", cache_bytes=cache, memory_bytes=memory,
                          extra=info)

    def _sm_clock(self) -> Any:
        return sm_clock(_cuda_bus_id(self.index))

    def bandwidth(self) -> dict[str, Any]:
        measure = None if _import_problem() else getattr(load_native(), "cuda_bandwidth", None)
        if measure is None:
            # The host's numpy figure would be silently wrong for a GPU.
            raise Unsupported("native:cuda: this kvmicro._native has no cuda_bandwidth()")
        return dict(measure(self.index))


@functools.cache
def _cuda_bus_id(index: int) -> str:
    return str(load_native().cuda_device_info(index).get("pci_bus_id", ""))


class NativeMetalBackend(Backend):
    """kvmicro's Metal kernels: Apple GPUs only."""

    name = "native:metal"
    ops = OPS

    def __init__(self, index: int = 0) -> None:
        self.index = index

    def availability(self) -> Availability:
        return Availability(False, "native:metal needs macOS with Metal; this build has none")

    def device_info(self) -> DeviceInfo:
        return DeviceInfo(name="unavailable", kind="metal")

    def prepare(self, case: Case, arrays: dict[str, np.ndarray], copies: int = 1) -> Prepared:
        raise Unsupported(self.availability().reason)


# ---- host facts -----------------------------------------------------------------------------


def _sysctl(key: str) -> str:
    """A macOS sysctl value, or "" (elsewhere, or when it is not there)."""
    if sys.platform != "darwin":
        return ""
    try:
        done = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, sysctl on macOS, else what platform knows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return (_sysctl("machdep.cpu.brand_string") or platform.processor() or platform.machine()
            or "unknown CPU")


def _parse_size(text: str) -> int:
    text = text.strip().upper()
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def last_level_cache_bytes() -> int:
    """Size of the largest (last-level) data or unified cache of CPU 0; 0 if unknown."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = sorted(os.listdir(base))
    except OSError:
        entries = []
    for entry in entries:
        if not entry.startswith("index"):
            continue
        try:
            with open(f"{base}/{entry}/type", encoding="utf-8") as f:
                if f.read().strip() == "Instruction":
                    continue
            with open(f"{base}/{entry}/size", encoding="utf-8") as f:
                best = max(best, _parse_size(f.read()))
        except (OSError, ValueError):
            continue
    if best:
        return best
    for key in ("hw.l3cachesize", "hw.l2cachesize"):
        value = _sysctl(key)
        if value.isdigit() and int(value) > 0:
            return int(value)
    for name in ("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"):
        try:
            value = os.sysconf(name)
        except (ValueError, OSError, AttributeError):
            continue
        if value and value > 0:
            return int(value)
    return 0


__all__ = [
    "NativeCpuBackend",
    "NativeCudaBackend",
    "NativeMetalBackend",
    "NativePrepared",
    "capabilities",
    "cpu_name",
    "last_level_cache_bytes",
    "load_native",
]
