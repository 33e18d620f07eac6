#!/usr/bin/env python3
"""Experimental patches to the CUDA kernel sources (docs/cuda.md, "Kernel arguments, the fixed
cost and `combine=last`"): each patches a source tree in place, for scripts/device_trees.sh to
build beside the original. None is part of the product.

    python3 scripts/kernel_patches.py pad_args TREE     # AttnArgs padded, the padding unread
    python3 scripts/kernel_patches.py noinline TREE     # merge_splits __noinline__
    python3 scripts/kernel_patches.py relive TREE       # slice re-derived after the main loop
    python3 scripts/kernel_patches.py bounds_last TREE  # combine=last kernels: >= 2 blocks/SM
    python3 scripts/kernel_patches.py bounds TREE       # both modes: the same

``pad_args``: an ``OpParams`` and a ``PartitionParams`` that no kernel reads appended to
``AttnArgs``: the argument size of kernels that take ``OpParams``, without their code change
(measured: as slow as taking ``OpParams``).

``relive``: the combine=last kernels (cp.async and register-load tensor-core kernels) re-derive
their slice after the main loop from fresh (volatile) reads of blockIdx, so that split, hk, g0
and gcount need not live through the loop; the combine=separate kernels are unchanged (their
PTX instruction counts are equal, nvcc 13). Measured, did not help: ``noinline``, ``relive``.

``bounds_last`` / ``bounds``: ``__launch_bounds__(kAttnThreads, 2)`` on the tensor-core split
kernels (cp.async and register loads) of combine=last only, or of both modes. The split rule
targets 2 blocks per SM, so the bound costs no occupancy the plans use, and it lets ptxas spend
registers instead of recomputing loop invariants (without a minimum it keeps ~128). nvcc 13
``-Xptxas -v`` for sm_90, fp16 D128: ``bounds_last`` takes the combine=last cp.async kernel from
123 to 128 registers and leaves the combine=separate kernels' PTX byte for byte as it was;
``bounds`` takes the separate cp.async kernels from 126 to 136 (2 stages) and from 96, with 8
bytes of spills, to 130 (3 stages), the register-load kernel from 151 to 158. Not measured yet.
"""

from __future__ import annotations

import sys


def pad_args(root: str) -> None:
    path = f"{root}/csrc/cuda/kernels.h"
    s = open(path).read()
    end = ("  float scale_log2;    // softmax scale * log2(e): scores live in the log2 domain "
           "(exp2f)\n};")
    assert end in s, "AttnArgs changed: update the patch"
    open(path, "w").write(s.replace(end, end[:-3] + "\n  OpParams unused_p;  // A/B probe\n"
                                    "  PartitionParams unused_part;\n};", 1))


def noinline(root: str) -> None:
    path = f"{root}/csrc/cuda/attention_common.cuh"
    s = open(path).read()
    old = "__device__ __forceinline__ void merge_splits"
    assert old in s, "merge_splits changed: update the patch"
    open(path, "w").write(s.replace(old, "__device__ __noinline__ void merge_splits", 1))


def relive(root: str) -> None:
    common = f"{root}/csrc/cuda/attention_common.cuh"
    s = open(common).read()
    anchor = "__device__ __forceinline__ float warp_max(float x) {"
    assert anchor in s, "attention_common.cuh changed: update the patch"
    open(common, "w").write(s.replace(anchor, SLICE_AFTER_LOOP + anchor, 1))
    for name in ("attention_async.cuh", "attention_mma.cuh"):
        path = f"{root}/csrc/cuda/{name}"
        t = open(path).read()
        assert CALL in t, f"{name} changed: update the patch"
        open(path, "w").write(t.replace(CALL, CALL_AFTER_LOOP, 1))


SLICE_AFTER_LOOP = """\
// combine=last: the slice again, from fresh reads of blockIdx (volatile: the compiler may not
// reuse the values read before the main loop, so none of them has to live through it).
template <int GT>
__device__ __forceinline__ SplitSlice slice_after_loop(const AttnArgs& a) {
  unsigned x, y, z;
  asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(x));
  asm volatile("mov.u32 %0, %%ctaid.y;" : "=r"(y));
  asm volatile("mov.u32 %0, %%ctaid.z;" : "=r"(z));
  SplitSlice w;
  w.split = (int)x;
  w.hk = (int)y / a.head_tiles;
  w.g0 = ((int)y % a.head_tiles) * GT;
  w.b = (int)z;
  w.gcount = min(GT, a.group - w.g0);
  w.start = w.end = 0;  // not needed after the loop
  return w;
}

"""
CALL = ("  write_block_result<T, D, kMmaHeads, NW, C>"
        "(a, s_acc, s_m, s_l, b, hk, g0, gcount, split);\n")
CALL_AFTER_LOOP = ("  if constexpr (C == AttnCombine::kLast) {\n"
                   "    const SplitSlice w = slice_after_loop<kMmaHeads>(a);\n"
                   "    write_block_result<T, D, kMmaHeads, NW, C>"
                   "(a, s_acc, s_m, s_l, w.b, w.hk, w.g0, w.gcount, w.split);\n"
                   "  } else {\n  " + CALL + "  }\n")


def _bounds(root: str, minimum: str) -> None:
    for name in ("attention_async.cuh", "attention_mma.cuh"):
        path = f"{root}/csrc/cuda/{name}"
        t = open(path).read()
        old = "__global__ void __launch_bounds__(kAttnThreads)\n    attention_split_"
        assert t.count(old) == 1, f"{name} changed: update the patch"
        new = f"__global__ void __launch_bounds__(kAttnThreads, {minimum})\n    attention_split_"
        open(path, "w").write(t.replace(old, new, 1))


def bounds_last(root: str) -> None:
    # 0: no minimum, the same PTX as without the argument
    _bounds(root, "C == AttnCombine::kLast ? 2 : 0")


def bounds(root: str) -> None:
    _bounds(root, "2")


PATCHES = {"pad_args": pad_args, "noinline": noinline, "relive": relive,
           "bounds_last": bounds_last, "bounds": bounds}

if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in PATCHES:
        sys.exit(__doc__)
    PATCHES[sys.argv[1]](sys.argv[2])
    print(f"patched {sys.argv[2]}: {sys.argv[1]}")
