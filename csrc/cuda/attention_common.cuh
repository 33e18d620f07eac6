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

#include <cooperative_groups.h>

#include "common/variant.h"
#include "cuda/cuda_common.cuh"
#include "cuda/kernels.h"
#include "cuda/timeline.cuh"

namespace kvmicro {
namespace cuda {

constexpr int kAttnWarps = 4;
constexpr int kAttnThreads = kAttnWarps * 32;
constexpr int kCombineThreads = 128;
constexpr int kMaxSplits = kVariantMaxSplits;  // s_w of the combine kernel

__host__ __device__ constexpr int pow2_at_least(int n) { return n <= 1 ? 1 : 2 * pow2_at_least((n + 1) / 2); }

// Programmatic dependent launch of the op's first kernel (option pdl_entry, sm_90+): launched
// so, its blocks are scheduled while the kernel before it in the stream finishes, and wait here
// for that kernel's completion and memory flush before their first global read. Launched without
// it (the default), this returns at once: no prerequisite grid is pending.
__device__ __forceinline__ void wait_for_prior_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// What a split kernel's thread block owns, from its place in the grid (context split, kv head x
// head tile, batch entry): query heads g0 .. g0+gcount-1 of kv head hk, tokens [start, end) of
// sequence b.
struct SplitSlice {
  int split, hk, g0, b, gcount, start, end, ctx;  // ctx: the sequence's length
};

// The block's slice; false for a split that starts past its (short) sequence's end: that block
// does nothing and the combine pass never reads it. Uniform across the block, so the caller
// returns before any barrier. Under combine=cluster such a block must stay for its cluster's
// barriers: it gets an empty slice (start == end) and true.
template <int GT, AttnCombine C = AttnCombine::kSeparate>
__device__ __forceinline__ bool split_slice(const AttnArgs& a, SplitSlice& w) {
  w.split = blockIdx.x;
  w.hk = blockIdx.y / a.head_tiles;
  w.g0 = (blockIdx.y % a.head_tiles) * GT;
  w.b = blockIdx.z;
  w.gcount = min(GT, a.group - w.g0);
  wait_for_prior_grids();  // before the first read: the kernel before may have written any input
  const int ctx_b = a.ctx[w.b];
  w.ctx = ctx_b;
  w.start = w.split * a.chunk;
  if (w.start >= ctx_b) {
    if constexpr (C != AttnCombine::kCluster) return false;
    w.start = ctx_b;
  }
  w.end = min(w.start + a.chunk, ctx_b);
  return true;
}

// Programmatic dependent launch (sm_90+): once every block of the split grid has passed this (or
// exited), the combine kernel may launch. It still waits (griddepcontrol.wait) for the grid's
// completion and memory flush before it reads a partial state, so where the trigger sits
// decides only when the combine blocks become resident, not what they read. The split kernels
// call it after their main loop, when a block's K/V reads are done: as their first statement
// it measured slower on the H200 (4096/1 +5.8%, 1024/1 +2%; docs/cuda.md).
__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
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

// Splits that hold tokens of a sequence of ctx tokens: splits 0 .. n-1 (split_slice returns
// false for the rest, so exactly these n blocks of a (b, kv head, head tile) reach
// write_block_result).
__device__ __forceinline__ int splits_with_tokens(const AttnArgs& a, int ctx) {
  return min(a.splits, (ctx + a.chunk - 1) / a.chunk);
}

// combine=last: after this block's partial state is in global memory, count its arrival on the
// (b, kv head, head tile) counter; true in the block that arrives last (of the n that hold tokens),
// which then merges every split's partial state (merge_splits). Uniform across the block.
//
// Memory ordering (PTX memory model; the pattern of cooperative groups' grid sync):
//   every thread: its stores of part_o / part_ml, then __threadfence() (fence.sc.gpu) and the
//   barrier: the block's stores are ordered before thread 0's fence at CTA scope, and a gpu-scope
//   fence is cumulative, so thread 0's __threadfence() + atomicAdd releases all of them;
//   the last block: thread 0's atomicAdd reads the value every earlier block's atomicAdd wrote
//   (RMWs on one address form one chain), then its __threadfence() acquires, and the barrier
//   passes that on to the block's threads, whose loads then see every other block's partials.
//   Those loads are __ldcg (cached in L2 only): L1 is not coherent across SMs, so a plain load
//   could return a line of part_o / part_ml an earlier launch left in this SM's L1.
// The last block resets the counter to 0: no other block of this launch touches it after the n-th
// arrival, and the next launch (a repeat, a graph replay) starts after this one ends, so every
// launch finds it at 0 without a memset. Allocated and zeroed at prepare (cuda_op.cu).
__device__ __forceinline__ bool arrive_last(const AttnArgs& a, int n) {
  __shared__ int s_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    int32_t* counter = a.arrivals + (int64_t)blockIdx.z * gridDim.y + blockIdx.y;
    __threadfence();
    const bool last = atomicAdd(counter, 1) == n - 1;
    if (last) {
      atomicExch(counter, 0);
      __threadfence();
    }
    s_last = last;
  }
  __syncthreads();
  return s_last != 0;
}

// combine=last, in the block that arrived last: merge the n partial states of query heads
// g0 .. g0+gcount-1 of (b, hk) into the output, with the arithmetic of attention_combine_kernel
// (max over splits, weights exp2(m_s - M), sums of l and o, one 1/L). One warp per head reduces M
// and L (into s_m[0] / s_l[0], dead after the block's partial was written); the weights of up to
// NW*D splits per head at a time go to s_acc (dead too), then each thread sums float4 columns of
// its heads over the splits in order s = 0 .. n-1 (the same order whichever block is last, so
// the result is bit-repeatable).
template <typename T, int D, int GT, int NW>
__device__ __forceinline__ void merge_splits(const AttnArgs& a, float (&s_acc)[NW][GT][D],
                                             float (&s_m)[NW][GT], float (&s_l)[NW][GT], int b,
                                             int hk, int g0, int gcount, int n) {
  static_assert(D % 4 == 0, "float4 columns");
  constexpr int V4 = D / 4;
  constexpr int kItems = (GT * V4 + kAttnThreads - 1) / kAttnThreads;
  constexpr int kChunk = NW * D;  // weights per head that s_acc holds
  const int64_t head0 = (int64_t)b * a.q_heads + hk * a.group + g0;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int g = warp; g < gcount; g += kAttnWarps) {
    const float* ml = a.part_ml + 2 * (head0 + g) * a.splits;
    float M = -INFINITY;
    for (int s = lane; s < n; s += 32) M = fmaxf(M, __ldcg(ml + 2 * s));
    M = warp_max(M);
    float L = 0.f;
    for (int s = lane; s < n; s += 32)
      L = fmaf(__ldcg(ml + 2 * s + 1), exp2f(__ldcg(ml + 2 * s) - M), L);
    L = warp_sum(L);
    if (lane == 0) {
      s_m[0][g] = M;
      s_l[0][g] = 1.f / L;
    }
  }
  float* s_w = &s_acc[0][0][0];  // [GT][kChunk]
  // This thread's items: float4 column c of head g for i = threadIdx.x + k * kAttnThreads.
  bool mine[kItems];
  int item_g[kItems];
  const float4* po[kItems];  // the item's column in split 0's partial output
  float4 o[kItems];
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int i = threadIdx.x + k * kAttnThreads;
    mine[k] = i < gcount * V4;
    item_g[k] = mine[k] ? i / V4 : 0;
    po[k] = reinterpret_cast<const float4*>(a.part_o + (head0 + item_g[k]) * a.splits * D) + i % V4;
    o[k] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
  for (int s0 = 0; s0 < n; s0 += kChunk) {
    const int cn = min(kChunk, n - s0);
    __syncthreads();  // s_m[0] / s_l[0] written; the previous chunk's weights all read
    for (int i = threadIdx.x; i < gcount * cn; i += kAttnThreads) {
      const int g = i / cn, s = i % cn;
      s_w[g * kChunk + s] =
          exp2f(__ldcg(a.part_ml + 2 * ((head0 + g) * a.splits + s0 + s)) - s_m[0][g]);
    }
    __syncthreads();
    // Splits outermost, items inside: every item's loads of a split are in flight together.
#pragma unroll 4
    for (int s = 0; s < cn; ++s) {
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        if (!mine[k]) continue;
        const float4 x = __ldcg(po[k] + (int64_t)(s0 + s) * V4);
        const float ws = s_w[item_g[k] * kChunk + s];
        o[k].x = fmaf(x.x, ws, o[k].x);
        o[k].y = fmaf(x.y, ws, o[k].y);
        o[k].z = fmaf(x.z, ws, o[k].z);
        o[k].w = fmaf(x.w, ws, o[k].w);
      }
    }
  }
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    if (!mine[k]) continue;
    const int g = item_g[k], c = (threadIdx.x + k * kAttnThreads) % V4;
    const float inv = s_l[0][g];
    T* out = static_cast<T*>(a.out) + (head0 + g) * D + 4 * c;
    out[0] = from_float<T>(o[k].x * inv);
    out[1] = from_float<T>(o[k].y * inv);
    out[2] = from_float<T>(o[k].z * inv);
    out[3] = from_float<T>(o[k].w * inv);
  }
}

// The block's workers merged for query head g, element d: the max M of their running maxima, the
// sum L and the unnormalised output O, each worker weighted by exp2(m_w - M) (0 for a worker that
// saw no key). kMayBeEmpty: the block may hold no key at all (combine=cluster keeps such blocks
// for its barriers); then M is -inf and L = O = 0 instead of NaN.
template <int D, int GT, int NW, bool kMayBeEmpty>
__device__ __forceinline__ void merge_workers(const float (&s_acc)[NW][GT][D],
                                              const float (&s_m)[NW][GT],
                                              const float (&s_l)[NW][GT], int g, int d, float& M,
                                              float& L, float& O) {
  M = -INFINITY;
#pragma unroll
  for (int w = 0; w < NW; ++w) M = fmaxf(M, s_m[w][g]);
  L = 0.f;
  O = 0.f;
  if (kMayBeEmpty && M == -INFINITY) return;
#pragma unroll
  for (int w = 0; w < NW; ++w) {
    const float c = exp2f(s_m[w][g] - M);
    L = fmaf(s_l[w][g], c, L);
    O = fmaf(s_acc[w][g][d], c, O);
  }
}

// combine=cluster (sm_90+): the splits of one (batch entry, kv head, head tile) are the blocks of
// one thread block cluster (cluster dims (splits, 1, 1), so a block's rank is its split), and
// they merge through distributed shared memory, with no scratch in global memory and no second
// launch. Each block merges its workers into a partial state in its own shared memory (the
// output sums in s_acc[0], max and sum in s_pm / s_pl; a block whose split holds no tokens
// stores max -inf, sum 0), the cluster barrier (arrive.release / wait.acquire: the partials are
// visible cluster-wide after it) follows, then block r computes output elements r*threads + t,
// stepping by (cluster blocks) x threads, reading every rank's partial with the combine kernel's
// arithmetic in split order 0 .. n-1 (max over splits, weights exp2(m_s - M), sums of l and o,
// one division), and a second barrier keeps every block's shared memory alive until the last
// remote read. Split 0 always holds tokens (ctx >= 1), so M is finite.
template <typename T, int D, int GT, int NW>
__device__ __forceinline__ void merge_in_cluster(const AttnArgs& a, float (&s_acc)[NW][GT][D],
                                                 float (&s_m)[NW][GT], float (&s_l)[NW][GT],
                                                 int b, int hk, int g0, int gcount) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  __shared__ float s_pm[GT];
  __shared__ float s_pl[GT];
  // In place: thread i alone reads s_acc[*][g][d] and writes s_acc[0][g][d].
  for (int i = threadIdx.x; i < GT * D; i += kAttnThreads) {
    const int g = i / D, d = i % D;
    if (g >= gcount) break;
    float M, L, O;
    merge_workers<D, GT, NW, true>(s_acc, s_m, s_l, g, d, M, L, O);
    s_acc[0][g][d] = O;
    if (d == 0) {
      s_pm[g] = M;
      s_pl[g] = L;
    }
  }
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();
  const int n = (int)cluster.num_blocks();
  const int rank = (int)cluster.block_rank();
  const int64_t head0 = (int64_t)b * a.q_heads + hk * a.group + g0;
  for (int i = rank * kAttnThreads + threadIdx.x; i < gcount * D; i += n * kAttnThreads) {
    const int g = i / D, d = i % D;
    float M = -INFINITY;
#pragma unroll 8
    for (int s = 0; s < n; ++s) M = fmaxf(M, *cluster.map_shared_rank(&s_pm[g], s));
    float L = 0.f, O = 0.f;
#pragma unroll 8
    for (int s = 0; s < n; ++s) {
      const float w = exp2f(*cluster.map_shared_rank(&s_pm[g], s) - M);
      L = fmaf(*cluster.map_shared_rank(&s_pl[g], s), w, L);
      O = fmaf(*cluster.map_shared_rank(&s_acc[0][g][d], s), w, O);
    }
    static_cast<T*>(a.out)[(head0 + g) * D + d] = from_float<T>(O / L);
  }
  cluster.sync();
#else
  __trap();  // the planner refuses combine=cluster below sm_90
#endif
}

// The block's last step, shared by the split kernels: merge the workers' states (in shared
// memory, after a barrier) per query head and element, then write the output (one split, or
// under combine=last the only split of its sequence that holds tokens) or this split's
// unnormalised partial state; under combine=last the last block to finish then merges the
// splits (arrive_last, merge_splits), under combine=cluster the cluster does (merge_in_cluster).
// s_acc, s_m and s_l are dead once this function has read them, which merge_splits relies on.
//
// The combine mode C is a template argument, not a runtime flag, so the combine=separate kernels
// carry no trace of the others (their -Xptxas -v registers, shared memory and spills are
// unchanged).
template <typename T, int D, int GT, int NW, AttnCombine C>
__device__ __forceinline__ void write_block_result(const AttnArgs& a, float (&s_acc)[NW][GT][D],
                                                   float (&s_m)[NW][GT], float (&s_l)[NW][GT],
                                                   int b, int hk, int g0, int gcount, int split) {
  if constexpr (C == AttnCombine::kCluster) {
    if (a.splits > 1) {  // uniform: with one split the block writes the output below
      merge_in_cluster<T, D, GT, NW>(a, s_acc, s_m, s_l, b, hk, g0, gcount);
      return;
    }
  }
  constexpr bool kLast = C == AttnCombine::kLast;
  // Under kLast, a.arrivals is null only with one split (then no block counts).
  const int n = kLast ? splits_with_tokens(a, a.ctx[b]) : a.splits;
  const bool direct = a.splits == 1 || (kLast && n == 1);  // uniform across the block
  for (int i = threadIdx.x; i < GT * D; i += kAttnThreads) {
    const int g = i / D, d = i % D;
    if (g >= gcount) break;  // g only grows with i
    float M, L, O;
    merge_workers<D, GT, NW, false>(s_acc, s_m, s_l, g, d, M, L, O);
    const int64_t head = (int64_t)b * a.q_heads + hk * a.group + g0 + g;
    if (direct) {
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
  if constexpr (kLast) {
    if (direct) return;
    if (!arrive_last(a, n)) return;  // its barriers also end every thread's reads of s_acc/s_m/s_l
    merge_splits<T, D, GT, NW>(a, s_acc, s_m, s_l, b, hk, g0, gcount, n);
  }
}

}  // namespace cuda
}  // namespace kvmicro
