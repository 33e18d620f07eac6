"""Where a measurement ran: host, OS, CPU and its vector flags, memory, framework versions, git sha.

Everything here is read from the OS (``/proc``, ``/sys``, ``platform``) and from installed package
metadata; no framework is imported, so asking for versions never initialises a GPU runtime or pays a
framework's import time, and an absent framework is simply ``None``.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from .backends.common import usable_cores

#: vector features that decide which kernel paths a CPU can take
VECTOR_FLAGS: tuple[str, ...] = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16",
                                 "avx512_fp16", "amx_tile", "neon", "sve", "sve2")

#: what has been done with the metal/ kernels so far (docs/metal.md), said wherever env runs
METAL_KERNELS = ("native:metal kernels: emulated on Linux through the MSL shim, not compiled by "
                 "Apple's compiler, not run on an Apple GPU")

#: distribution name -> the key it is reported under (import names differ from package names)
FRAMEWORKS: dict[str, str] = {
    "numpy": "numpy",
    "torch": "torch",
    "mlx": "mlx",
    "nvidia-cudnn-frontend": "cudnn_frontend",
    "nvidia-cudnn-cu12": "cudnn_cu12",
    "nvidia-cudnn-cu13": "cudnn_cu13",
    "flashinfer-python": "flashinfer",
    "pybind11": "pybind11",
    "pytest-benchmark": "pytest_benchmark",
}


def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def _cpuinfo() -> dict[str, str]:
    """The first processor's ``key: value`` lines of /proc/cpuinfo (empty off Linux)."""
    info: dict[str, str] = {}
    for line in _read("/proc/cpuinfo").splitlines():
        if not line.strip():
            if info:
                break
            continue
        key, _, value = line.partition(":")
        info.setdefault(key.strip().lower(), value.strip())
    return info


def cpu_model() -> str:
    info = _cpuinfo()
    for key in ("model name", "hardware", "cpu model", "processor"):
        value = info.get(key, "")
        if value and not value.isdigit():
            return value
    if sys.platform == "darwin":
        out = _run(["sysctl", "-n", "machdep.cpu.brand_string"])
        if out:
            return out
    return platform.processor() or platform.machine()


def vector_flags() -> list[str]:
    """The :data:`VECTOR_FLAGS` this CPU has. On ARM, Linux calls NEON ``asimd``; every Apple
    silicon and AArch64 CPU has NEON."""
    info = _cpuinfo()
    words = set((info.get("flags") or info.get("features") or "").split())
    machine = platform.machine().lower()
    if "asimd" in words or machine in ("arm64", "aarch64"):
        words.add("neon")
    return [flag for flag in VECTOR_FLAGS if flag in words]


def _cache_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}.get(text[-1:], 1)
    digits = text.rstrip("KMG")
    return int(digits) * scale if digits.isdigit() else 0


def llc_bytes() -> int:
    """The CPU's last-level cache in bytes (the largest level of cpu0's caches), 0 if unknown."""
    best_level, best_size = 0, 0
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    if base.is_dir():
        for index in sorted(base.glob("index*")):
            level = _read(index / "level").strip()
            size = _cache_size(_read(index / "size"))
            if level.isdigit() and (int(level), size) > (best_level, best_size):
                best_level, best_size = int(level), size
    if not best_size and sys.platform == "darwin":
        for key in ("hw.l3cachesize", "hw.l2cachesize"):
            out = _run(["sysctl", "-n", key])
            if out.isdigit() and int(out) > 0:
                return int(out)
    return best_size


def memory_bytes() -> dict[str, int]:
    """Total and available host memory in bytes (0 where the OS does not say)."""
    total = available = 0
    for line in _read("/proc/meminfo").splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            if key == "MemTotal":
                total = int(parts[0]) * 1024
            elif key == "MemAvailable":
                available = int(parts[0]) * 1024
    if not total:
        try:
            total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            total = 0
    return {"total": total, "available": available}


def framework_versions() -> dict[str, str | None]:
    """Installed versions of the frameworks kvmicro can use, from package metadata (no import)."""
    versions: dict[str, str | None] = {}
    for dist, key in FRAMEWORKS.items():
        try:
            versions[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[key] = None
    return versions


def _run(cmd: list[str], cwd: str | Path | None = None) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=5,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


@lru_cache(maxsize=1)
def git_info() -> dict[str, Any]:
    """The git commit of the checkout kvmicro runs from, if it runs from one: ``sha`` and
    ``dirty`` (uncommitted changes), or an empty dict for an installed wheel."""
    here = Path(__file__).resolve().parent
    top = _run(["git", "rev-parse", "--show-toplevel"], cwd=here)
    if not top:
        return {}
    sha = _run(["git", "rev-parse", "HEAD"], cwd=here)
    if not sha:
        return {}
    dirty = bool(_run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here))
    return {"sha": sha, "dirty": dirty}


def host_info() -> dict[str, Any]:
    """Host, OS, kernel, python, CPU (model, cores, vector flags, last-level cache), memory,
    framework versions and the git commit, as JSON-ready values."""
    os_name = platform.system()
    pretty = ""
    for line in _read("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            pretty = line.split("=", 1)[1].strip().strip('"')
    if not pretty and os_name == "Darwin":
        pretty = f"macOS {platform.mac_ver()[0]}"
    info = {
        "hostname": socket.gethostname(),
        "os": os_name,
        "os_release": pretty or platform.platform(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "cpu": {
            "model": cpu_model(),
            "cores": os.cpu_count() or 1,
            "usable_cores": usable_cores(),
            "vector_flags": vector_flags(),
            "llc_bytes": llc_bytes(),
        },
        "memory_bytes": memory_bytes()["total"],
        "frameworks": framework_versions(),
        "git": git_info(),
        "metal_kernels": METAL_KERNELS,
    }
    if os_name == "Darwin":  # what native:metal's submission axes do and do not control
        from .backends.native_metal import METAL_AXES

        info["metal_axes"] = dict(METAL_AXES)
    return info


__all__ = ["FRAMEWORKS", "VECTOR_FLAGS", "cpu_model", "framework_versions", "git_info",
           "host_info", "llc_bytes", "memory_bytes", "usable_cores", "vector_flags"]
