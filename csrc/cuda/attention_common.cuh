// What every decode-attention kernel shares (attention_simt.cuh, attention_mma.cuh,
// attention_async.cuh, attention_combine.cuh): the block shape, the slice of work a split
// kernel's thread block owns, warp reductions, and the block's last step (merge its workers,
// write the output or a partial state).
//
// Decode attention runs in two passes: a split kernel and a combine kernel. One split-kernel
// thread block per (context split, kv head x head tile, batch entry) serves a whole GQA group (up
// to 8 query heads), so each K/V element is read from memory once; it keeps an online softmax per
// query head in float in the log2 domain (q is prescaled by scale*log2(e), so exp2f does the work
// of expf). With one split the block writes the output; otherwise it writes an unnormalised
// partial state (max, sum, acc) and the combine kernel merges the splits. Kernels read K/V rows
// from a "source" (kernels.h: DenseSrc or PagedSrc).
#pragma once

#include <cmath>
#include <cstdint>

#include "common/variant.h"
#include "cuda/cuda_common.cuh"
#include "cuda/kernels.h"

namespace kvmicro {
namespace cuda {

constexpr int kAttnWarps = 4;
constexpr int kAttnThreads = kAttnWarps * 32;
constexpr int kCombineThreads = 128;
constexpr int kMaxSplits = kVariantMaxSplits;  // s_w of the combine kernel

__host__ __device__ constexpr int pow2_at_least(int n) { return n <= 1 ? 1 : 2 * pow2_at_least((n + 1) / 2); }

// What a split kernel's thread block owns, from its place in the grid (context split, kv head x
// head tile, batch entry): query heads g0 .. g0+gcount-1 of kv head hk, tokens [start, end) of
// sequence b.
struct SplitSlice {
  int split, hk, g0, b, gcount, start, end;
};

// The block's slice; false for a split that starts past its (short) sequence's end: that block
// does nothing and the combine pass never reads it. Uniform across the block, so the caller
// returns before any barrier.
template <int GT>
__device__ __forceinline__ bool split_slice(const AttnArgs& a, SplitSlice& w) {
  w.split = blockIdx.x;
  w.hk = blockIdx.y / a.head_tiles;
  w.g0 = (blockIdx.y % a.head_tiles) * GT;
  w.b = blockIdx.z;
  w.gcount = min(GT, a.group - w.g0);
  const int ctx_b = a.ctx[w.b];
  w.start = w.split * a.chunk;
  if (w.start >= ctx_b) return false;
  w.end = min(w.start + a.chunk, ctx_b);
  return true;
}

// The block's last step, shared by both split kernels: merge the workers' states (in shared
// memory, after a barrier) per query head and element, then write the output (one split) or this
// split's unnormalised partial state.
template <typename T, int D, int GT, int NW>
__device__ __forceinline__ void write_block_result(const AttnArgs& a, const float (&s_acc)[NW][GT][D],
                                                   const float (&s_m)[NW][GT],
                                                   const float (&s_l)[NW][GT], int b, int hk,
                                                   int g0, int gcount, int split) {
  for (int i = threadIdx.x; i < GT * D; i += kAttnThreads) {
    const int g = i / D, d = i % D;
    if (g >= gcount) break;  // g only grows with i
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < NW; ++w) M = fmaxf(M, s_m[w][g]);
    float L = 0.f, O = 0.f;
#pragma unroll
    for (int w = 0; w < NW; ++w) {
      const float c = exp2f(s_m[w][g] - M);  // 0 for a worker that saw no key
      L = fmaf(s_l[w][g], c, L);
      O = fmaf(s_acc[w][g][d], c, O);
    }
    const int64_t head = (int64_t)b * a.q_heads + hk * a.group + g0 + g;
    if (a.splits == 1) {
      static_cast<T*>(a.out)[head * D + d] = from_float<T>(O / L);
    } else {
      const int64_t ps = head * a.splits + split;
      a.part_o[ps * D + d] = O;
      if (d == 0) {
        a.part_ml[2 * ps] = M;
        a.part_ml[2 * ps + 1] = L;
      }
    }
  }
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

}  // namespace cuda
}  // namespace kvmicro
