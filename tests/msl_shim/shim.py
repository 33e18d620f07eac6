"""Build the .metal kernels against the MSL shim and run a kvmicro case through them.

``build(name)`` compiles ``metal/<name>.metal`` with g++ as C++20 (AddressSanitizer and UBSan on)
into an executable cached under the temp dir, keyed by a hash of every source and flag, so a
second run costs nothing. ``run_case(case, arrays)`` does what the Metal host will do - fill the
params structs, pick the kernel by name, size the grid and threadgroup memory, bind buffers by
BufferIndex slot - and returns the result in the oracle's conventions. The constants come from
metal/kernel_abi.h and the slots from csrc/common/params.h, parsed here rather than copied.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvmicro.dtypes import from_bits16, to_bits16
from kvmicro.workload import Case, Layout

from . import bindgen

ROOT = bindgen.ROOT
METAL = ROOT / "metal"
SHIM = Path(__file__).resolve().parent
CACHE = Path(tempfile.gettempdir()) / "kvmicro-msl-shim"
CXX = os.environ.get("CXX", "g++")
FLAGS = ("-std=c++20", "-O0", "-g0", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
         "-fno-strict-aliasing", "-Wall", "-Wno-attributes", "-Werror")
RUN_ENV = {"ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0",
           "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}
DTYPE_SUFFIX = {"float16": "f16", "bfloat16": "bf16", "float32": "f32"}
DTYPE_ID = {"float16": 0, "bfloat16": 1, "float32": 2}


class ShimError(RuntimeError):
    """A shim executable failed: compile error, sanitizer report, non-uniform barrier, ..."""


def have_compiler() -> bool:
    return shutil.which(CXX) is not None


def _abi_constants() -> dict[str, int]:
    """``KV_CONST int kName = ...;`` of kernel_abi.h: literals, or products of earlier names."""
    text = (METAL / "kernel_abi.h").read_text()
    values: dict[str, int] = {}
    for name, expr in re.findall(r"KV_CONST int (k\w+) = ([^;]+);", text):
        product = 1
        for factor in expr.split("*"):
            factor = factor.strip()
            product *= values[factor] if factor in values else int(factor)
        values[name] = product
    return values


ABI = _abi_constants()
SLOT = bindgen.buffer_indices()


def attn_threadgroup_bytes(head_dim: int) -> int:
    """metal/kernel_abi.h attn_threadgroup_bytes: what the host sets for [[threadgroup(0)]]."""
    floats = ABI["kAttnSimdgroups"] * ABI["kMaxQueryTile"] * 2 + ABI["kAttnSimdgroups"] * head_dim
    return (floats * 4 + 15) // 16 * 16


def query_tiles(group: int) -> int:
    return -(-group // ABI["kMaxQueryTile"])


# ---- building ----------------------------------------------------------------------------------


def source_path(name: str) -> Path:
    """``metal/<name>.metal``, or the shim's own ``selftest`` kernels."""
    return SHIM / "selftest.metal" if name == "selftest" else METAL / f"{name}.metal"


def _sources() -> list[Path]:
    common = ROOT / "csrc" / "common"
    return sorted([*METAL.glob("*.metal"), *METAL.glob("*.h"), *SHIM.glob("*.h"),
                   *SHIM.glob("*.metal"),
                   SHIM / "driver.cpp", SHIM / "include" / "metal_stdlib", SHIM / "bindgen.py",
                   common / "layout.h", common / "paged_kv.h", common / "params.h",
                   common / "half.h"])


def _key(name: str, defines: Sequence[str]) -> str:
    h = hashlib.sha256()
    for path in _sources():
        h.update(path.name.encode())
        h.update(path.read_bytes())
    h.update(" ".join((CXX, *FLAGS, *defines, name)).encode())
    return h.hexdigest()[:20]


def _command(name: str, defines: Sequence[str], bindings: Path, out: Path) -> list[str]:
    return [CXX, *FLAGS, *(f"-D{d}" for d in defines), f"-I{SHIM / 'include'}",
            f"-DKV_METAL_SOURCE=\"{source_path(name)}\"",
            f"-DKV_METAL_BINDINGS=\"{bindings}\"", str(SHIM / "driver.cpp"), "-o", str(out)]


def build_many(names: Iterable[tuple[str, tuple[str, ...]]], jobs: int = 2) -> dict[Any, Path]:
    """Compile (name, defines) pairs, ``jobs`` g++ at a time; cached ones are not rebuilt."""
    CACHE.mkdir(parents=True, exist_ok=True)
    result: dict[Any, Path] = {}
    pending: list[tuple[Any, list[str], Path, Path]] = []
    for name, defines in names:
        exe = CACHE / f"{name}-{_key(name, defines)}"
        result[(name, defines)] = exe
        if exe.exists():
            continue
        bindings = CACHE / f"{exe.name}.bind.h"
        bindings.write_text(bindgen.generate(source_path(name)))
        tmp = exe.with_name(exe.name + f".tmp{os.getpid()}")
        pending.append(((name, defines), _command(name, defines, bindings, tmp), tmp, exe))
    while pending:
        batch, pending = pending[:jobs], pending[jobs:]
        procs = [(item, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         text=True), tmp, exe) for item, cmd, tmp, exe in batch]
        for item, proc, tmp, exe in procs:
            out, _ = proc.communicate()
            if proc.returncode:
                raise ShimError(f"building {item} failed:\n{out}")
            os.replace(tmp, exe)
    return result


def build(name: str, defines: Sequence[str] = ()) -> Path:
    return build_many([(name, tuple(defines))])[(name, tuple(defines))]


def kernel_names(exe: Path) -> dict[str, str]:
    """host_name -> kernel template, as the executable registered them."""
    out = subprocess.run([str(exe), "list"], capture_output=True, text=True, check=True,
                         env={**os.environ, **RUN_ENV}).stdout
    return dict(line.split() for line in out.splitlines())


# ---- running -----------------------------------------------------------------------------------


@dataclass
class Job:
    """One launch of one executable: buffers by slot (bytes, or an int size for a NaN output)."""

    exe: Path
    kernel: str
    grid: tuple[int, int, int]
    threads: tuple[int, int, int]
    tg_bytes: tuple[int, ...] = ()
    buffers: dict[int, bytes | int] = field(default_factory=dict)
    outputs: tuple[int, ...] = ()
    seed: int = 0


def run(job: Job, timeout: float = 300.0) -> dict[int, bytes]:
    with tempfile.TemporaryDirectory(prefix="kvmicro-shim-") as tmp:
        lines = [f"seed {job.seed}"]
        for slot, data in sorted(job.buffers.items()):
            if isinstance(data, int):
                lines.append(f"buffer {slot} {data} nan")
            else:
                path = Path(tmp) / f"in{slot}.bin"
                path.write_bytes(data)
                lines.append(f"buffer {slot} {len(data)} {path}")
        lines.append(" ".join(["launch", job.kernel, *map(str, job.grid), *map(str, job.threads),
                               *map(str, job.tg_bytes)]))
        for slot in job.outputs:
            lines.append(f"output {slot} {Path(tmp) / f'out{slot}.bin'}")
        (Path(tmp) / "job.txt").write_text("\n".join(lines) + "\n")
        proc = subprocess.run([str(job.exe), str(Path(tmp) / "job.txt")], capture_output=True,
                              text=True, timeout=timeout, env={**os.environ, **RUN_ENV})
        if proc.returncode:
            raise ShimError(f"{job.kernel} exited with {proc.returncode}:\n"
                            f"{proc.stderr[-4000:]}")
        return {slot: (Path(tmp) / f"out{slot}.bin").read_bytes() for slot in job.outputs}


def _to_bytes(x: np.ndarray, dtype: str) -> bytes:
    if dtype == "float32":
        return np.ascontiguousarray(x, dtype=np.float32).tobytes()
    return to_bits16(x, dtype).tobytes()


def _from_bytes(data: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == "float32":
        return np.frombuffer(data, dtype=np.float32).reshape(shape).copy()
    return from_bits16(np.frombuffer(data, dtype=np.uint16), dtype).reshape(shape).copy()


def op_params(case: Case, arrays: dict[str, np.ndarray]) -> bytes:
    """OpParams (csrc/common/params.h) as the host fills it: 88 bytes."""
    num_blocks = Layout(case.layout).to_logical(arrays["k_pool"]).shape[0]
    st = Layout(case.layout).strides(num_blocks, case.block_size, case.kv_heads, case.head_dim)
    pool = struct.pack("<4q4i", st["N"], st["S"], st["H"], st["D"], num_blocks, case.block_size,
                       case.kv_heads, case.head_dim)
    rest = struct.pack("<7ifi", case.batch, case.q_heads, case.group, case.q_len,
                       case.max_blocks, case.max_ctx_pad, max(case.ctx_list), case.softmax_scale,
                       DTYPE_ID[case.dtype])
    blob = pool + rest
    return blob + b"\0" * (88 - len(blob))


def run_case(case: Case, arrays: dict[str, np.ndarray], exes: dict[str, Path],
             partition_tokens: int | None = None, seed: int = 0) -> Any:
    """``case.op`` through the shim, as the Metal host will dispatch it; the oracle's result
    conventions (attention: [B, Hq, 1, D]; gather: (k, v) dense; append: (k, v) pools)."""
    B, Hq, Hkv, D, dt = case.batch, case.q_heads, case.kv_heads, case.head_dim, case.dtype
    params = op_params(case, arrays)
    sfx = DTYPE_SUFFIX[dt]
    common = {SLOT["kBufParams"]: params,
              SLOT["kBufTable"]: np.ascontiguousarray(arrays["block_table"], np.int32).tobytes(),
              SLOT["kBufCtx"]: np.ascontiguousarray(arrays["ctx"], np.int32).tobytes()}
    pool_in = {SLOT["kBufKPool"]: _to_bytes(arrays["k_pool"], dt),
               SLOT["kBufVPool"]: _to_bytes(arrays["v_pool"], dt)}
    copy = (ABI["kCopyThreads"], 1, 1)
    if case.op == "gather":
        dense = (B, Hkv, case.max_ctx_pad, D)
        nbytes = int(np.prod(dense)) * case.itemsize
        out = run(Job(exes["gather"], f"gather_{sfx}" + ("" if Layout(case.layout).d_innermost
                                                           else "_strided"),
                      (case.max_blocks, Hkv, B), copy,
                      buffers={**common, **pool_in, SLOT["kBufKDense"]: nbytes,
                               SLOT["kBufVDense"]: nbytes},
                      outputs=(SLOT["kBufKDense"], SLOT["kBufVDense"]), seed=seed))
        return tuple(_from_bytes(out[s], dt, dense)
                     for s in (SLOT["kBufKDense"], SLOT["kBufVDense"]))
    if case.op == "append":
        new = {SLOT["kBufKNew"]: _to_bytes(arrays["k_new"], dt),
               SLOT["kBufVNew"]: _to_bytes(arrays["v_new"], dt)}
        out = run(Job(exes["append"], f"append_{sfx}", (B, Hkv, 1), copy,
                      buffers={**common, **pool_in, **new},
                      outputs=(SLOT["kBufKPool"], SLOT["kBufVPool"]), seed=seed))
        shape = arrays["k_pool"].shape
        return tuple(_from_bytes(out[s], dt, shape) for s in (SLOT["kBufKPool"], SLOT["kBufVPool"]))
    if case.op not in ("paged_sdpa", "sdpa_contiguous"):
        raise ValueError(f"the shim runs no {case.op!r}")
    max_ctx = max(case.ctx_list)
    tokens = max_ctx if partition_tokens is None else partition_tokens
    partitions = -(-max_ctx // tokens)
    partition = struct.pack("<2i", tokens, partitions)
    parts = B * Hq * partitions if partitions > 1 else 1
    bufs = {**common, SLOT["kBufPartition"]: partition,
            SLOT["kBufQ"]: _to_bytes(arrays["q"], dt),
            SLOT["kBufOut"]: B * Hq * D * case.itemsize,
            SLOT["kBufPartialOut"]: parts * D * 4, SLOT["kBufPartialMaxSum"]: parts * 2 * 4}
    if case.op == "paged_sdpa":
        bufs.update(pool_in)
    else:
        bufs[SLOT["kBufKDense"]] = _to_bytes(arrays["k_dense"], dt)
        bufs[SLOT["kBufVDense"]] = _to_bytes(arrays["v_dense"], dt)
    outputs = ((SLOT["kBufOut"],) if partitions == 1
               else (SLOT["kBufPartialOut"], SLOT["kBufPartialMaxSum"]))
    first = run(Job(exes[case.op], f"{case.op}_{sfx}_d{D}",
                    (partitions, Hkv * query_tiles(case.group), B), (ABI["kAttnThreads"], 1, 1),
                    (attn_threadgroup_bytes(D),), bufs, outputs, seed))
    if partitions > 1:
        first = run(Job(exes["combine"], f"combine_{sfx}", (Hq, B, 1),
                        (ABI["kCombineThreads"], 1, 1),
                        buffers={**common, SLOT["kBufPartition"]: partition,
                                 SLOT["kBufPartialOut"]: first[SLOT["kBufPartialOut"]],
                                 SLOT["kBufPartialMaxSum"]: first[SLOT["kBufPartialMaxSum"]],
                                 SLOT["kBufOut"]: B * Hq * D * case.itemsize},
                        outputs=(SLOT["kBufOut"],), seed=seed))
    return _from_bytes(first[SLOT["kBufOut"]], dt, (B, Hq, 1, D))
