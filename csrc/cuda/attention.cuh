// Decode attention over K/V rows that come from a "source" (dense tensors or the paged pool), in
// two passes: a split kernel and a combine kernel.
//
// Split kernels: one thread block per (context split, kv head x head tile, batch entry) serves a
// whole GQA group (up to 8 query heads), so each K/V element is read from memory once. Three of
// them: two on tensor cores for 16-bit dtypes with D innermost and head_dim 64/96/128, sharing
// their math (MmaWarpState) and differing in how K/V reach registers -- attention_split_mma_kernel
// (register loads) and attention_split_async_kernel (a cp.async pipeline through shared memory,
// for long splits) -- and attention_split_kernel (SIMT; everything else). In the SIMT one threads
// are grouped into "workers" of TPR lanes; a worker owns one key row at a time and each lane holds
// 16 bytes of it (VPT vectors when a row is wider than a warp). A worker issues U rows of K and V
// (16-byte loads) before using any, keeps an online softmax per query head in float in the log2
// domain (q is prescaled by scale*log2(e), so exp2f does the work of expf), and the block's
// workers are merged in shared memory at the end. With one split the block writes the output;
// otherwise it writes an unnormalised partial state (max, sum, acc) and the combine kernel merges
// the splits.
//
// Instantiated per source in paged_sdpa.cu and sdpa_contiguous.cu through the pickers at the
// bottom of this file (pick_split_*, pick_mma*): they are the support matrix (dtype x head_dim x
// heads per block x 16-byte/strided, and the tensor-core variants).
#pragma once

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "common/validate.h"
#include "cuda/cuda_common.cuh"
#include "cuda/kernels.h"

namespace kvmicro {
namespace cuda {

constexpr int kAttnWarps = 4;
constexpr int kAttnThreads = kAttnWarps * 32;
constexpr int kCombineThreads = 128;
constexpr int kMaxSplits = kVariantMaxSplits;  // s_w of the combine kernel

__host__ __device__ constexpr int pow2_at_least(int n) { return n <= 1 ? 1 : 2 * pow2_at_least((n + 1) / 2); }

// How one key row of D elements of `esize` bytes maps onto lanes.
struct RowShape {
  int vec;      // elements per 16-byte vector
  int nv;       // vectors per row
  int tpr;      // lanes per row (a power of two, at most 32)
  int vpt;      // vectors per lane
  int workers;  // rows in flight across the block per step
  int unroll;   // rows each worker loads before using them
  int tile;     // tokens per pass of the block
};

__host__ __device__ constexpr RowShape row_shape(int esize, int d, int gt) {
  int vec = 16 / esize;
  int nv = d / vec;
  int tpr = pow2_at_least(nv) > 32 ? 32 : pow2_at_least(nv);
  int vpt = (nv + tpr - 1) / tpr;
  int workers = kAttnWarps * (32 / tpr);
  // Registers: q and acc hold gt*vpt*vec floats each; keep the rows in flight within budget.
  int unroll = gt * vpt >= 8 ? 2 : 4;
  return RowShape{vec, nv, tpr, vpt, workers, unroll, workers * unroll};
}

// 16 bytes of row `row` starting at vector `vidx`: one load on the fast path, `vec` strided
// element loads otherwise (packed into the same 16-byte register image).
template <typename T, bool kFast>
__device__ __forceinline__ uint4 load_row_vec(const T* base, int64_t row, int64_t stride_d,
                                              int vidx) {
  constexpr int V = 16 / (int)sizeof(T);
  if constexpr (kFast) {
    return load16(base + row + (int64_t)vidx * V);
  } else {
    uint32_t w[4];
    if constexpr (sizeof(T) == 4) {
      const uint32_t* p = reinterpret_cast<const uint32_t*>(base);
#pragma unroll
      for (int j = 0; j < 4; ++j) w[j] = __ldg(p + row + ((int64_t)vidx * V + j) * stride_d);
    } else {
      const uint16_t* p = reinterpret_cast<const uint16_t*>(base);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        uint32_t lo = __ldg(p + row + ((int64_t)vidx * V + 2 * j) * stride_d);
        uint32_t hi = __ldg(p + row + ((int64_t)vidx * V + 2 * j + 1) * stride_d);
        w[j] = lo | (hi << 16);
      }
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
}

template <typename T>
__device__ __forceinline__ void unpack(const uint4& v, float* out) {
  if constexpr (std::is_same_v<T, float>) {
    out[0] = __uint_as_float(v.x);
    out[1] = __uint_as_float(v.y);
    out[2] = __uint_as_float(v.z);
    out[3] = __uint_as_float(v.w);
  } else {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float2 f;
      if constexpr (std::is_same_v<T, __half>) {
        __half2 h = *reinterpret_cast<const __half2*>(&w[i]);
        f = __half22float2(h);
      } else {
        __nv_bfloat162 h = *reinterpret_cast<const __nv_bfloat162*>(&w[i]);
        f = __bfloat1622float2(h);
      }
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }
}

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

template <typename T, int D, int GT, bool kFast, class Src>
__global__ void __launch_bounds__(kAttnThreads)
    attention_split_kernel(AttnArgs a, Src src) {
  constexpr RowShape S = row_shape((int)sizeof(T), D, GT);
  constexpr int V = S.vec, NV = S.nv, TPR = S.tpr, VPT = S.vpt, NW = S.workers, U = S.unroll;
  constexpr int RPW = 32 / TPR;

  __shared__ float s_acc[NW][GT][D];
  __shared__ float s_m[NW][GT];
  __shared__ float s_l[NW][GT];

  SplitSlice slice;
  if (!split_slice<GT>(a, slice)) return;
  const int split = slice.split, hk = slice.hk, g0 = slice.g0, b = slice.b;
  const int gcount = slice.gcount, start = slice.start, end = slice.end;

  const int lane = threadIdx.x & 31;
  const int r = lane % TPR;
  const int worker = (threadIdx.x >> 5) * RPW + lane / TPR;

  const T* kp = static_cast<const T*>(src.k);
  const T* vp = static_cast<const T*>(src.v);
  const int64_t sd = src.stride_d();

  float q[GT][VPT][V];
#pragma unroll
  for (int g = 0; g < GT; ++g) {
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int vidx = r + j * TPR;
      if (g < gcount && vidx < NV) {
        const int64_t qrow = ((int64_t)b * a.q_heads + hk * a.group + g0 + g) * D;
        uint4 raw = load16(static_cast<const T*>(a.q) + qrow + vidx * V);
        unpack<T>(raw, q[g][j]);
#pragma unroll
        for (int e = 0; e < V; ++e) q[g][j][e] *= a.scale_log2;
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) q[g][j][e] = 0.f;
      }
    }
  }

  float acc[GT][VPT][V];
  float m[GT], l[GT];
#pragma unroll
  for (int g = 0; g < GT; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int j = 0; j < VPT; ++j)
#pragma unroll
      for (int e = 0; e < V; ++e) acc[g][j][e] = 0.f;
  }

  for (int t0 = start; t0 < end; t0 += NW * U) {
    uint4 kr[U][VPT], vr[U][VPT];
    bool ok[U];
    // Issue every load of this pass before the first use: 2*U*VPT 16-byte loads in flight.
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int t = t0 + u * NW + worker;
      ok[u] = t < end;
      int64_t row = 0;
      if (ok[u]) row = src.row_offset(b, hk, t);
#pragma unroll
      for (int j = 0; j < VPT; ++j) {
        const int vidx = r + j * TPR;
        if (ok[u] && vidx < NV) {
          kr[u][j] = load_row_vec<T, kFast>(kp, row, sd, vidx);
          vr[u][j] = load_row_vec<T, kFast>(vp, row, sd, vidx);
        } else {
          kr[u][j] = make_uint4(0, 0, 0, 0);
          vr[u][j] = make_uint4(0, 0, 0, 0);
        }
      }
    }

    float s[U][GT];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kf[VPT][V];
#pragma unroll
      for (int j = 0; j < VPT; ++j) unpack<T>(kr[u][j], kf[j]);
#pragma unroll
      for (int g = 0; g < GT; ++g) {
        float dot = 0.f;
        if (g < gcount) {
#pragma unroll
          for (int j = 0; j < VPT; ++j)
#pragma unroll
            for (int e = 0; e < V; ++e) dot = fmaf(q[g][j][e], kf[j][e], dot);
          // The worker's lanes are TPR consecutive lanes: xor offsets below TPR stay inside it.
#pragma unroll
          for (int off = TPR / 2; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
        }
        s[u][g] = ok[u] ? dot : -INFINITY;
      }
    }

    float p[U][GT];
#pragma unroll
    for (int g = 0; g < GT; ++g) {
      float mt = m[g];
#pragma unroll
      for (int u = 0; u < U; ++u) mt = fmaxf(mt, s[u][g]);
      if (g < gcount && mt != -INFINITY) {
        const float corr = exp2f(m[g] - mt);  // 0 on this worker's first key
        l[g] *= corr;
#pragma unroll
        for (int j = 0; j < VPT; ++j)
#pragma unroll
          for (int e = 0; e < V; ++e) acc[g][j][e] *= corr;
#pragma unroll
        for (int u = 0; u < U; ++u) {
          p[u][g] = exp2f(s[u][g] - mt);  // 0 for keys past the end
          l[g] += p[u][g];
        }
        m[g] = mt;
      } else {
#pragma unroll
        for (int u = 0; u < U; ++u) p[u][g] = 0.f;
      }
    }

#pragma unroll
    for (int u = 0; u < U; ++u) {
      float vf[VPT][V];
#pragma unroll
      for (int j = 0; j < VPT; ++j) unpack<T>(vr[u][j], vf[j]);
#pragma unroll
      for (int g = 0; g < GT; ++g)
#pragma unroll
        for (int j = 0; j < VPT; ++j)
#pragma unroll
          for (int e = 0; e < V; ++e) acc[g][j][e] = fmaf(p[u][g], vf[j][e], acc[g][j][e]);
    }
  }

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Every K/V read of this block is done: let the combine kernel's launch start (it still waits
  // for this grid's completion before reading partial states).
  asm volatile("griddepcontrol.launch_dependents;");
#endif

  // Merge the block's workers.
#pragma unroll
  for (int g = 0; g < GT; ++g) {
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int vidx = r + j * TPR;
      if (vidx < NV) {
#pragma unroll
        for (int e = 0; e < V; ++e) s_acc[worker][g][vidx * V + e] = acc[g][j][e];
      }
    }
    if (r == 0) {
      s_m[worker][g] = m[g];
      s_l[worker][g] = l[g];
    }
  }
  __syncthreads();

  write_block_result<T, D, GT, NW>(a, s_acc, s_m, s_l, b, hk, g0, gcount, split);
}

// ---- tensor-core split kernel (float16 / bfloat16, head_dim a multiple of 32, D innermost) ----
//
// Same contract as attention_split_kernel, but each warp takes 16 keys at a time and does both
// products on the tensor cores (mma.m16n8k16, float accumulate), so a key costs ~10 warp
// instructions instead of ~80:
//   S^T[16 keys x 8 heads] = K[16 x D] . Q^T[D x 8]        (M = keys, N = query heads, K = d)
//   O^T[D x 8 heads]      += V^T[D x 16 keys] . P^T[16 x 8]  (M = d, N = query heads, K = keys)
// Lane (r = lane/4, c = lane%4) loads 16 bytes of keys t0+r and t0+r+8 at d = 32j + 8c .. +7, for
// every j: plain 16-byte loads straight into fragments. That works because a dot product does
// not care in which order d is summed: the 4 registers of one load become the k-pairs of two
// mmas, and q is loaded the same way. V needs keys paired in a register, so each V register is
// transposed in place (movmatrix, 8x8 b16), which again leaves d permuted; the permutation is
// undone when the output is written (mma_d_row). P goes from the S^T accumulator to a B fragment
// by the same transpose.

__device__ __forceinline__ void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                          uint32_t a3, uint32_t b0, uint32_t b1, __half) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                          uint32_t a3, uint32_t b0, uint32_t b1, __nv_bfloat16) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Transpose the 8x8 16-bit matrix a warp holds one register per lane (row lane/4, columns
// 2*(lane%4) and +1).
__device__ __forceinline__ uint32_t transpose8x8(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(y) : "r"(x));
  return y;
}

__device__ __forceinline__ uint32_t pack2(float lo, float hi, __half) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
__device__ __forceinline__ uint32_t pack2(float lo, float hi, __nv_bfloat16) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Head-dim element held in row `row` (0..15) of P.V m-tile `mt` (see the kernel comment).
__host__ __device__ constexpr int mma_d_row(int mt, int row) {
  return 32 * (mt >> 1) + 8 * ((row & 7) >> 1) + 4 * (mt & 1) + 2 * (row >> 3) + (row & 1);
}

constexpr int kMmaHeads = 8;      // query heads per block: the mma's N
constexpr int kMmaTileKeys = 16;  // keys per warp per step: the mma's M (QK) / K (PV)

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

// One warp's 16-key tile as the fragments lane (gr, tq) holds: 16 bytes of keys t0+gr and t0+gr+8
// at d = 32j + 8tq .. +7, for K and V.
template <int D>
struct MmaRows {
  uint4 ka[D / 32], kb[D / 32], va[D / 32], vb[D / 32];
};

// A warp's share of the tensor-core split kernels: Q^T fragments, the O^T accumulator and the
// online softmax of the block's 8 query heads. Both kernels below feed it tiles (MmaRows); they
// differ only in how the tiles get from the pool into registers.
template <typename T, int D>
struct MmaWarpState {
  static constexpr int NB = D / 32;  // 16-byte fragments per key row per lane
  static constexpr int MT = D / 16;  // m-tiles of O^T
  uint4 qf[NB];                      // Q^T B fragments: head g0+gr at d = 32j + 8tq .. +7
  float acc[MT][4];
  float m0, m1;  // running max of heads 2tq and 2tq+1 (the same in the 8 lanes sharing tq)
  float l0, l1;  // this lane's share of their sums

  __device__ __forceinline__ void init(const AttnArgs& a, int b, int hk, int g0, int gcount,
                                       int gr, int tq) {
#pragma unroll
    for (int j = 0; j < NB; ++j) qf[j] = make_uint4(0, 0, 0, 0);
    if (gr < gcount) {
      const T* qrow =
          static_cast<const T*>(a.q) + ((int64_t)b * a.q_heads + hk * a.group + g0 + gr) * D;
#pragma unroll
      for (int j = 0; j < NB; ++j) qf[j] = load16(qrow + 32 * j + 8 * tq);
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0.f;
    m0 = m1 = -INFINITY;
    l0 = l1 = 0.f;
  }

  // One tile; oka / okb say whether keys t0+gr / t0+gr+8 are inside the split (the first key of
  // every tile is).
  __device__ __forceinline__ void consume(const MmaRows<D>& x, bool oka, bool okb, float scale_log2) {
    const T tag{};
    float s[4] = {0.f, 0.f, 0.f, 0.f};  // S[key t0+gr][2tq, +1], S[key t0+gr+8][2tq, +1]
#pragma unroll
    for (int j = 0; j < NB; ++j) {
      mma_16816(s, x.ka[j].x, x.kb[j].x, x.ka[j].y, x.kb[j].y, qf[j].x, qf[j].y, tag);
      mma_16816(s, x.ka[j].z, x.kb[j].z, x.ka[j].w, x.kb[j].w, qf[j].z, qf[j].w, tag);
    }
    s[0] = oka ? s[0] * scale_log2 : -INFINITY;
    s[1] = oka ? s[1] * scale_log2 : -INFINITY;
    s[2] = okb ? s[2] * scale_log2 : -INFINITY;
    s[3] = okb ? s[3] * scale_log2 : -INFINITY;

    // Column (head) max over the 16 keys: the 8 lanes sharing tq hold them.
    float mx0 = fmaxf(s[0], s[2]), mx1 = fmaxf(s[1], s[3]);
#pragma unroll
    for (int off = 4; off < 32; off <<= 1) {
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
    }
    const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);  // finite: the tile's first key is valid
    const float c0 = exp2f(m0 - mn0), c1 = exp2f(m1 - mn1);
    m0 = mn0;
    m1 = mn1;
    const float p0 = exp2f(s[0] - mn0), p1 = exp2f(s[1] - mn1);
    const float p2 = exp2f(s[2] - mn0), p3 = exp2f(s[3] - mn1);
    l0 = fmaf(l0, c0, p0 + p2);
    l1 = fmaf(l1, c1, p1 + p3);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      acc[mt][0] *= c0;
      acc[mt][1] *= c1;
      acc[mt][2] *= c0;
      acc[mt][3] *= c1;
    }

    // P^T fragments: keys 0-7 and 8-15 of the tile, transposed to [head][key pair].
    const uint32_t pk0 = transpose8x8(pack2(p0, p1, tag));
    const uint32_t pk1 = transpose8x8(pack2(p2, p3, tag));
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int j = mt >> 1, w = 2 * (mt & 1);
      mma_16816(acc[mt], transpose8x8(word(x.va[j], w)), transpose8x8(word(x.va[j], w + 1)),
                transpose8x8(word(x.vb[j], w)), transpose8x8(word(x.vb[j], w + 1)), pk0, pk1, tag);
    }
  }

  // The warp's state into the block's merge arrays (d un-permuted, see mma_d_row).
  template <int NW>
  __device__ __forceinline__ void store(float (&s_acc)[NW][kMmaHeads][D], float (&s_m)[NW][kMmaHeads],
                                        float (&s_l)[NW][kMmaHeads], int warp, int gr, int tq) {
#pragma unroll
    for (int off = 4; off < 32; off <<= 1) {
      l0 += __shfl_xor_sync(0xffffffffu, l0, off);
      l1 += __shfl_xor_sync(0xffffffffu, l1, off);
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int d0 = mma_d_row(mt, gr), d1 = mma_d_row(mt, gr + 8);
      s_acc[warp][2 * tq][d0] = acc[mt][0];
      s_acc[warp][2 * tq + 1][d0] = acc[mt][1];
      s_acc[warp][2 * tq][d1] = acc[mt][2];
      s_acc[warp][2 * tq + 1][d1] = acc[mt][3];
    }
    if (gr == 0) {
      s_m[warp][2 * tq] = m0;
      s_m[warp][2 * tq + 1] = m1;
      s_l[warp][2 * tq] = l0;
      s_l[warp][2 * tq + 1] = l1;
    }
  }
};

// A 16-byte read-only load asking L2 to fetch the P = 128 bytes around it from DRAM (P = 0: no
// hint). A key row is 128-256 contiguous bytes that a warp reads in 64-byte pieces over several
// instructions: the hint turns those into whole-line DRAM accesses (4% at 32768/4, docs/cuda.md).
template <int P>
__device__ __forceinline__ uint4 load16_prefetch(const void* p) {
  static_assert(P == 0 || P == 128, "L2 prefetch size");
  if constexpr (P == 0) {
    return load16(p);
  } else {
    uint4 v;
    asm("ld.global.nc.L2::128B.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
  }
}

// Tensor-core split kernel, register loads: each lane loads its fragments straight from the pool.
// Keys past the end read the last valid row instead (their scores are masked), so every load is
// unconditional and all 4*NB of a step issue back to back; the next step's rows are looked up in
// the table while this step's loads are in flight. P: L2 prefetch hint of the K/V loads.
template <typename T, int D, int P, class Src>
__global__ void __launch_bounds__(kAttnThreads)
    attention_split_mma_kernel(AttnArgs a, Src src) {
  static_assert(D % 32 == 0, "16-byte fragment loads cover 32 elements of d per lane quad");
  constexpr int NB = D / 32;
  constexpr int NW = kAttnWarps;

  __shared__ float s_acc[NW][kMmaHeads][D];
  __shared__ float s_m[NW][kMmaHeads];
  __shared__ float s_l[NW][kMmaHeads];

  SplitSlice slice;
  if (!split_slice<kMmaHeads>(a, slice)) return;
  const int split = slice.split, hk = slice.hk, g0 = slice.g0, b = slice.b;
  const int gcount = slice.gcount, start = slice.start, end = slice.end;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gr = lane >> 2, tq = lane & 3;
  const T* kp = static_cast<const T*>(src.k);
  const T* vp = static_cast<const T*>(src.v);
  MmaWarpState<T, D> st;
  st.init(a, b, hk, g0, gcount, gr, tq);

  const int last = end - 1;
  constexpr int kStep = NW * kMmaTileKeys;
  int t0 = start + warp * kMmaTileKeys;
  if (t0 < end) {  // warp-uniform, as is every branch below
    int64_t ra = src.row_offset(b, hk, min(t0 + gr, last));
    int64_t rb = src.row_offset(b, hk, min(t0 + gr + 8, last));
    for (; t0 < end; t0 += kStep) {
      MmaRows<D> x;
#pragma unroll
      for (int j = 0; j < NB; ++j) {
        const int off = 32 * j + 8 * tq;
        x.ka[j] = load16_prefetch<P>(kp + ra + off);
        x.kb[j] = load16_prefetch<P>(kp + rb + off);
        x.va[j] = load16_prefetch<P>(vp + ra + off);
        x.vb[j] = load16_prefetch<P>(vp + rb + off);
      }
      if (t0 + kStep < end) {
        ra = src.row_offset(b, hk, min(t0 + kStep + gr, last));
        rb = src.row_offset(b, hk, min(t0 + kStep + gr + 8, last));
      }
      st.consume(x, t0 + gr < end, t0 + gr + 8 < end, a.scale_log2);
    }
  }

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
  st.store(s_acc, s_m, s_l, warp, gr, tq);
  __syncthreads();
  write_block_result<T, D, kMmaHeads, NW>(a, s_acc, s_m, s_l, b, hk, g0, gcount, split);
}

// ---- cp.async pipeline ---------------------------------------------------------------------

// 16 bytes global -> shared, bypassing L1, asking L2 to fetch the 128 bytes around them (measured
// the same as 256 on the H100, docs/cuda.md).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned dst = (unsigned)__cvta_generic_to_shared(smem);
  asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16;" ::"r"(dst), "l"(gmem)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
__device__ __forceinline__ uint4 lds16(const void* p) {
  return *reinterpret_cast<const uint4*>(p);
}

// Dynamic shared memory of attention_split_async_kernel: S stages of one 16-key K and V tile per
// warp; the block merge (s_acc) reuses it after the main loop.
__host__ __device__ constexpr int async_smem_bytes(int d, int stages, int esize) {
  return kAttnWarps * stages * 2 * kMmaTileKeys * d * esize > kAttnWarps * kMmaHeads * d * 4
             ? kAttnWarps * stages * 2 * kMmaTileKeys * d * esize
             : kAttnWarps * kMmaHeads * d * 4;
}

// Tensor-core split kernel, cp.async pipeline: each warp streams its tiles through S stages of
// shared memory (cp.async, 16 bytes per copy, no registers held), S-1 tiles in flight while it
// computes on one, then reads the fragments of MmaRows from shared memory. Copies are issued as
// 128-byte row pieces (8 lanes per row, 4 rows per instruction; row offsets looked up once per
// tile by lanes 0-15 and shuffled), independent of the fragment layout. Where a row is a multiple
// of 128 bytes, odd rows store their 16-byte chunks XOR 4, so the fragment reads (rows gr and
// gr+1 in one phase) hit distinct banks. Every warp syncs only itself (__syncwarp): a stage is
// private to its warp.
template <typename T, int D, int S, class Src>
__global__ void __launch_bounds__(kAttnThreads)
    attention_split_async_kernel(AttnArgs a, Src src) {
  static_assert(D % 32 == 0, "16-byte fragment loads cover 32 elements of d per lane quad");
  static_assert(S >= 2, "a pipeline needs two stages");
  constexpr int NB = D / 32;
  constexpr int NW = kAttnWarps;
  constexpr int TK = kMmaTileKeys;
  constexpr int CH = D / 8;  // 16-byte chunks per row
  constexpr int kHalves = (CH + 7) / 8;
  constexpr int kSwz = CH % 8 == 0 ? 4 : 0;
  constexpr int kTileElems = TK * D;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  auto& s_acc = *reinterpret_cast<float (*)[NW][kMmaHeads][D]>(smem_raw);
  __shared__ float s_m[NW][kMmaHeads];
  __shared__ float s_l[NW][kMmaHeads];

  SplitSlice slice;
  if (!split_slice<kMmaHeads>(a, slice)) return;
  const int split = slice.split, hk = slice.hk, g0 = slice.g0, b = slice.b;
  const int gcount = slice.gcount, start = slice.start, end = slice.end;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gr = lane >> 2, tq = lane & 3;
  const T* kp = static_cast<const T*>(src.k);
  const T* vp = static_cast<const T*>(src.v);
  T* stages = reinterpret_cast<T*>(smem_raw) + warp * S * 2 * kTileElems;  // [S][K, V][TK][D]

  const int last = end - 1;
  constexpr int kStep = NW * TK;
  const int t_first = start + warp * TK;
  const int tiles = t_first < end ? (end - t_first + kStep - 1) / kStep : 0;  // warp-uniform

  auto issue = [&](int tile) {
    const int t = t_first + tile * kStep;
    const int64_t mine = src.row_offset(b, hk, min(t + (lane & 15), last));  // key t + lane%16
    T* sk = stages + (tile % S) * 2 * kTileElems;
    T* sv = sk + kTileElems;
#pragma unroll
    for (int i = 0; i < TK / 4; ++i) {
      const int r = (lane >> 3) + 4 * i;
      const int64_t row = __shfl_sync(0xffffffffu, mine, r);
#pragma unroll
      for (int h = 0; h < kHalves; ++h) {
        const int c = (lane & 7) + 8 * h;
        if (CH % 8 == 0 || c < CH) {
          const int sc = c ^ (kSwz * (r & 1));
          cp_async16(sk + r * D + sc * 8, kp + row + c * 8);
          cp_async16(sv + r * D + sc * 8, vp + row + c * 8);
        }
      }
    }
  };

  MmaWarpState<T, D> st;
  st.init(a, b, hk, g0, gcount, gr, tq);
#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    if (s < tiles) issue(s);
    cp_async_commit();  // empty groups too: the wait count below stays S - 2
  }
  const int swz = kSwz * (gr & 1);  // rows gr and gr + 8 share their parity
  for (int tile = 0; tile < tiles; ++tile) {
    cp_async_wait<S - 2>();  // this lane's copies of `tile` have landed
    __syncwarp();            // ... every lane's, and the stage refilled next was read by all
    if (tile + S - 1 < tiles) issue(tile + S - 1);
    cp_async_commit();
    const T* sk = stages + (tile % S) * 2 * kTileElems;
    const T* sv = sk + kTileElems;
    MmaRows<D> x;
#pragma unroll
    for (int j = 0; j < NB; ++j) {
      const int off = ((4 * j + tq) ^ swz) * 8;
      x.ka[j] = lds16(sk + gr * D + off);
      x.kb[j] = lds16(sk + (gr + 8) * D + off);
      x.va[j] = lds16(sv + gr * D + off);
      x.vb[j] = lds16(sv + (gr + 8) * D + off);
    }
    const int t0 = t_first + tile * kStep;
    st.consume(x, t0 + gr < end, t0 + gr + 8 < end, a.scale_log2);
  }
  cp_async_wait<0>();

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
  __syncthreads();  // s_acc aliases every warp's stages
  st.store(s_acc, s_m, s_l, warp, gr, tq);
  __syncthreads();
  write_block_result<T, D, kMmaHeads, NW>(a, s_acc, s_m, s_l, b, hk, g0, gcount, split);
}

// Second pass: one block per (batch entry, query head) merges the splits that hold tokens.
// Threads split the work both ways: thread t owns float4 column t % V of the partial outputs
// (V = head_dim / 4) for splits t / V, t / V + P, ... (P = threads / V phases), and the phases are
// summed in shared memory at the end. Its first kPre partial rows are loaded before the softmax
// statistics are reduced, so that latency overlaps the reductions.
template <typename T>
__global__ void __launch_bounds__(kCombineThreads)
    attention_combine_kernel(AttnArgs a, int head_dim) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Launched early under programmatic dependent launch: wait for the split kernel's writes.
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  constexpr int kPre = 8;
  __shared__ float s_w[kMaxSplits];
  __shared__ float s_red[kCombineThreads / 32];
  __shared__ float s_bcast;
  __shared__ float4 s_sum[kCombineThreads];

  const int64_t head = blockIdx.x;
  const int b = (int)(head / a.q_heads);
  const int n = min(a.splits, (a.ctx[b] + a.chunk - 1) / a.chunk);
  const float* ml = a.part_ml + head * a.splits * 2;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int V = head_dim / 4;  // every supported head_dim is a multiple of 16
  const int P = kCombineThreads / V;
  const int col = threadIdx.x % V, phase = threadIdx.x / V;
  const bool active = phase < P;
  const float4* po = reinterpret_cast<const float4*>(a.part_o + head * a.splits * head_dim);

  float4 pre[kPre];
#pragma unroll
  for (int i = 0; i < kPre; ++i) {
    const int s = phase + i * P;
    pre[i] = active && s < n ? po[(int64_t)s * V + col] : make_float4(0.f, 0.f, 0.f, 0.f);
  }

  float M = -INFINITY;
  for (int s = threadIdx.x; s < n; s += kCombineThreads) M = fmaxf(M, ml[2 * s]);
  M = warp_max(M);
  if (lane == 0) s_red[warp] = M;
  __syncthreads();
  if (threadIdx.x == 0) {
    float x = s_red[0];
    for (int w = 1; w < kCombineThreads / 32; ++w) x = fmaxf(x, s_red[w]);
    s_bcast = x;
  }
  __syncthreads();
  M = s_bcast;

  float L = 0.f;
  for (int s = threadIdx.x; s < n; s += kCombineThreads) {
    const float w = exp2f(ml[2 * s] - M);
    s_w[s] = w;
    L = fmaf(ml[2 * s + 1], w, L);
  }
  L = warp_sum(L);
  __syncthreads();  // s_red is reused
  if (lane == 0) s_red[warp] = L;
  __syncthreads();
  if (threadIdx.x == 0) {
    float x = 0.f;
    for (int w = 0; w < kCombineThreads / 32; ++w) x += s_red[w];
    s_bcast = 1.f / x;
  }
  __syncthreads();
  const float inv = s_bcast;

  float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
  auto add = [&](const float4& x, float w) {
    o.x = fmaf(x.x, w, o.x);
    o.y = fmaf(x.y, w, o.y);
    o.z = fmaf(x.z, w, o.z);
    o.w = fmaf(x.w, w, o.w);
  };
#pragma unroll
  for (int i = 0; i < kPre; ++i) {
    const int s = phase + i * P;
    if (active && s < n) add(pre[i], s_w[s]);
  }
#pragma unroll 4
  for (int s = phase + kPre * P; active && s < n; s += P) add(po[(int64_t)s * V + col], s_w[s]);
  s_sum[threadIdx.x] = o;
  __syncthreads();
  if (threadIdx.x < V) {
    float4 t = s_sum[threadIdx.x];
    for (int p = 1; p < P; ++p) {
      const float4 x = s_sum[p * V + threadIdx.x];
      t.x += x.x;
      t.y += x.y;
      t.z += x.z;
      t.w += x.w;
    }
    T* out = static_cast<T*>(a.out) + head * head_dim + 4 * threadIdx.x;
    out[0] = from_float<T>(t.x * inv);
    out[1] = from_float<T>(t.y * inv);
    out[2] = from_float<T>(t.z * inv);
    out[3] = from_float<T>(t.w * inv);
  }
}

// ---- host side: kernel selection and split planning ------------------------------------------

template <class Src>
using SplitFn = void (*)(AttnArgs, Src);
using CombineFn = void (*)(AttnArgs, int);

template <class Src, typename T, int D, int GT>
SplitFn<Src> pick_split_fast(bool strided) {
  if constexpr (Src::kStrided) {
    if (strided) return &attention_split_kernel<T, D, GT, false, Src>;
  }
  return &attention_split_kernel<T, D, GT, true, Src>;
}

template <class Src, typename T, int D>
SplitFn<Src> pick_split_gt(int gt, bool strided) {
  switch (gt) {
    case 1: return pick_split_fast<Src, T, D, 1>(strided);
    case 4: return pick_split_fast<Src, T, D, 4>(strided);
    default: return pick_split_fast<Src, T, D, 8>(strided);
  }
}

template <class Src, typename T>
SplitFn<Src> pick_split_d(int d, int gt, bool strided) {
  switch (d) {
    case 64: return pick_split_gt<Src, T, 64>(gt, strided);
    case 80: return pick_split_gt<Src, T, 80>(gt, strided);
    case 96: return pick_split_gt<Src, T, 96>(gt, strided);
    case 128: return pick_split_gt<Src, T, 128>(gt, strided);
    case 256: return pick_split_gt<Src, T, 256>(gt, strided);
    default: return nullptr;
  }
}

// Split count for the SIMT kernel: the fewest splits that minimise (waves of thread blocks) x
// (tokens per split), plus a charge for the combine pass, so a lone long sequence spreads over
// every SM while a big batch stays at one split per block slot. That kernel is latency-bound per
// block and wants every slot filled.
inline int choose_splits(int max_ctx, int64_t blocks_per_split, int64_t slots, int tile,
                         int min_chunk) {
  const int64_t combine_cost = tile;  // the combine launch, in tokens of one split's work
  const int s_max = std::max(1, std::min(kMaxSplits, ceil_div(max_ctx, std::max(tile, min_chunk))));
  int best = 1;
  int64_t best_cost = INT64_MAX;
  for (int s = 1; s <= s_max; ++s) {
    const int64_t chunk = (int64_t)ceil_div(ceil_div(max_ctx, s), tile) * tile;
    const int s_eff = ceil_div(max_ctx, chunk);
    const int64_t waves = ceil_div(blocks_per_split * s_eff, std::max<int64_t>(slots, 1));
    const int64_t cost = waves * chunk + (s_eff > 1 ? combine_cost : 0);
    if (cost < best_cost) {
      best_cost = cost;
      best = s_eff;
    }
  }
  return best;
}

// Split count for the tensor-core kernels: about `per_sm` thread blocks per SM, in one wave, and
// no split shorter than min_chunk. Measured on the H100 (docs/cuda.md): 2 blocks/SM beat both
// fuller grids (2.6-3 waves of 3 blocks/SM cost 5-10% more at 4096/4, 32768/1 and 32768/4) and
// emptier ones; the per-block start (q, the first table lookups and loads with nothing in flight
// yet) and the merge at its end are what more, shorter splits pay for.
constexpr int kMmaBlocksPerSm = 2;
static_assert(Variant{}.blocks_per_sm == kMmaBlocksPerSm, "the option's default is the rule");
// L2 prefetch hint of the register-load kernel's K/V loads (load16_prefetch).
constexpr int kMmaPrefetch = 128;
static_assert(Variant{}.l2_prefetch == kMmaPrefetch, "the option's default is the measured best");
inline int splits_for_blocks(int max_ctx, int64_t blocks_per_split, int64_t target_blocks,
                             int tile, int min_chunk) {
  const int s_max = std::max(1, std::min(kMaxSplits, ceil_div(max_ctx, std::max(tile, min_chunk))));
  const int64_t s = target_blocks / std::max<int64_t>(blocks_per_split, 1);
  return (int)std::max<int64_t>(1, std::min<int64_t>(s, s_max));
}

template <class Src, typename T, int P>
SplitFn<Src> pick_mma_d(int d) {
  switch (d) {
    case 64: return &attention_split_mma_kernel<T, 64, P, Src>;
    case 96: return &attention_split_mma_kernel<T, 96, P, Src>;
    case 128: return &attention_split_mma_kernel<T, 128, P, Src>;
    default: return nullptr;
  }
}

template <class Src, typename T>
SplitFn<Src> pick_mma(int d, int prefetch) {
  return prefetch == 0 ? pick_mma_d<Src, T, 0>(d) : pick_mma_d<Src, T, 128>(d);
}

template <class Src, typename T, int S>
SplitFn<Src> pick_async_d(int d) {
  switch (d) {
    case 64: return &attention_split_async_kernel<T, 64, S, Src>;
    case 96: return &attention_split_async_kernel<T, 96, S, Src>;
    case 128: return &attention_split_async_kernel<T, 128, S, Src>;
    default: return nullptr;
  }
}

template <class Src, typename T>
SplitFn<Src> pick_async(int d, int stages) {
  return stages == 2 ? pick_async_d<Src, T, 2>(d) : pick_async_d<Src, T, 3>(d);
}

// Tensor-core kernel choice (docs/cuda.md): the cp.async pipeline pays off once every warp has
// tiles to overlap, from kAsyncMinTiles tiles per warp per split; below that the register-load
// kernel starts sooner. Two stages beat three (more blocks per SM fit).
constexpr int kAsyncMinTiles = 4;
constexpr int kAsyncStages = 2;
static_assert(Variant{}.stages == kAsyncStages, "the option's default is the measured best");

template <class Src>
AttnPlan plan_attention(const char* op, const OpParams& p, const DeviceProps& dev,
                        const Variant& var, bool strided) {
  const int D = p.pool.head_dim;
  if (D != 64 && D != 80 && D != 96 && D != 128 && D != 256)
    throw UnsupportedError(std::string("[") + op + "] head_dim " + std::to_string(D) +
                           " is not supported by native:cuda (supported: 64, 80, 96, 128, 256)");
  if (p.q_len != 1)
    throw UnsupportedError(std::string("[") + op + "] native:cuda implements decode only (q_len 1, got " +
                           std::to_string(p.q_len) + ")");
  if (p.batch > 65535)
    throw UnsupportedError(std::string("[") + op + "] batch " + std::to_string(p.batch) +
                           " exceeds the 65535 a grid dimension holds");
  AttnPlan plan;
  plan.head_dim = D;
  plan.strided = strided;
  const int group = p.group;
  const DType dt = (DType)p.dtype;
  SplitFn<Src> split = nullptr;
  CombineFn combine = nullptr;
  int esize = 2;
  // Tensor cores where the 16-byte fragment loads apply: 16-bit dtypes, D-innermost rows, head_dim
  // a multiple of 32 up to 128 (256 would need more registers than it saves); the SIMT kernel
  // serves the rest. Option kernel=simt forces the SIMT kernel (for comparison); kernel=mma or
  // async on a case they cannot run is refused, never silently replaced.
  const bool mma_fits = (dt == DType::kFloat16 || dt == DType::kBFloat16) && !strided &&
                        D % 32 == 0 && D <= 128 && dev.cc_major >= 8;
  const AttnKernel kernel = var.kernel;
  if (!mma_fits && (kernel == AttnKernel::kMma || kernel == AttnKernel::kAsync))
    throw UnsupportedError(op_message(
        op, "option kernel=", attn_kernel_name(kernel), " needs tensor cores: float16/bfloat16, ",
        "D innermost, head_dim 64/96/128 and compute capability 8.0+; this case is ",
        dtype_name(p.dtype), ", ", strided ? "D not innermost" : "D innermost", ", head_dim ", D,
        ", sm_", dev.cc_major, dev.cc_minor));
  plan.tensor_cores = mma_fits && kernel != AttnKernel::kSimt;
  if (plan.tensor_cores) {
    combine = dt == DType::kFloat16 ? &attention_combine_kernel<__half>
                                    : &attention_combine_kernel<__nv_bfloat16>;
    plan.tile = kAttnWarps * kMmaTileKeys;
  }
  plan.heads_per_block = plan.tensor_cores ? kMmaHeads : group == 1 ? 1 : group <= 4 ? 4 : 8;
  plan.head_tiles = ceil_div(group, plan.heads_per_block);
  if (!plan.tensor_cores) switch (dt) {
    case DType::kFloat16:
      split = pick_split_d<Src, __half>(D, plan.heads_per_block, strided);
      combine = &attention_combine_kernel<__half>;
      break;
    case DType::kBFloat16:
      split = pick_split_d<Src, __nv_bfloat16>(D, plan.heads_per_block, strided);
      combine = &attention_combine_kernel<__nv_bfloat16>;
      break;
    case DType::kFloat32:
      split = pick_split_d<Src, float>(D, plan.heads_per_block, strided);
      combine = &attention_combine_kernel<float>;
      esize = 4;
      break;
    default:
      throw UnsupportedError(std::string("[") + op + "] dtype id " + std::to_string(p.dtype) +
                             " is not supported by native:cuda");
  }
  if (!plan.tensor_cores && !split)
    throw UnsupportedError(std::string("[") + op + "] no kernel for head_dim " + std::to_string(D));
  if (!plan.tensor_cores) plan.tile = row_shape(esize, D, plan.heads_per_block).tile;

  const int64_t per_split = (int64_t)p.batch * p.pool.kv_heads * plan.head_tiles;
  const int forced = var.splits;
  const int min_chunk = var.min_chunk;
  auto chunk_for = [&](int splits) {
    return ceil_div(ceil_div(p.max_ctx, splits), plan.tile) * plan.tile;
  };
  auto occupancy = [&](SplitFn<Src> fn) {
    if (plan.smem_bytes > 0)  // static + dynamic past 48 KB needs the opt-in
      KV_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(fn),
                                         cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         plan.smem_bytes));
    KV_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&plan.blocks_per_sm, fn,
                                                                kAttnThreads, plan.smem_bytes));
  };
  int splits = 1;
  if (plan.tensor_cores) {
    // Both tensor-core kernels fit at least kMmaBlocksPerSm blocks per SM at their defaults, so
    // the split count comes first and the kernel is chosen from the tokens it leaves each warp.
    const int per_sm = var.blocks_per_sm;
    auto splits_at = [&](int blocks_per_sm) {
      return forced > 0 ? std::min(forced, kMaxSplits)
                        : splits_for_blocks(p.max_ctx, per_split,
                                            (int64_t)blocks_per_sm * dev.sm_count, plan.tile,
                                            min_chunk);
    };
    splits = splits_at(per_sm);
    const bool half = dt == DType::kFloat16;
    const bool async = kernel == AttnKernel::kAsync ||
                       (kernel == AttnKernel::kAuto &&
                        chunk_for(splits) >= kAsyncMinTiles * plan.tile);
    if (async) {
      plan.stages = var.stages;  // 2 or 3 (parse_variant)
      plan.prefetch = 128;  // cp_async16's hint
      split = half ? pick_async<Src, __half>(D, plan.stages)
                   : pick_async<Src, __nv_bfloat16>(D, plan.stages);
      plan.smem_bytes = async_smem_bytes(D, plan.stages, 2);
    } else {
      plan.prefetch = var.l2_prefetch;  // 0 or 128 (parse_variant)
      split = half ? pick_mma<Src, __half>(D, plan.prefetch)
                   : pick_mma<Src, __nv_bfloat16>(D, plan.prefetch);
    }
    occupancy(split);
    if (plan.blocks_per_sm < per_sm) splits = splits_at(std::max(plan.blocks_per_sm, 1));
  } else {
    occupancy(split);
    const int64_t slots = (int64_t)dev.sm_count * std::max(plan.blocks_per_sm, 1);
    splits = forced > 0 ? std::min(forced, kMaxSplits)
                        : choose_splits(p.max_ctx, per_split, slots, plan.tile, min_chunk);
  }
  plan.split = reinterpret_cast<const void*>(split);
  plan.combine = reinterpret_cast<const void*>(combine);
  const int64_t chunk = chunk_for(splits);
  splits = ceil_div(p.max_ctx, chunk);
  plan.splits = splits;
  plan.chunk = (int)chunk;
  plan.grid = dim3((unsigned)splits, (unsigned)(p.pool.kv_heads * plan.head_tiles), (unsigned)p.batch);
  plan.combine_blocks = p.batch * p.q_heads;
  plan.pdl = dev.cc_major >= 9 && var.pdl;
  return plan;
}

template <class Src>
void launch_attention(const AttnPlan& plan, const AttnArgs& args, const Src& src,
                      cudaStream_t stream) {
  auto split = reinterpret_cast<SplitFn<Src>>(plan.split);
  split<<<plan.grid, kAttnThreads, plan.smem_bytes, stream>>>(args, src);
  KV_CUDA_CHECK_LAUNCH("attention split");
  if (plan.splits == 1) return;
  auto combine = reinterpret_cast<CombineFn>(plan.combine);
  if (plan.pdl) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3((unsigned)plan.combine_blocks);
    cfg.blockDim = dim3(kCombineThreads);
    cfg.dynamicSmemBytes = 0;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    KV_CUDA_CHECK(cudaLaunchKernelEx(&cfg, combine, args, plan.head_dim));
  } else {
    combine<<<plan.combine_blocks, kCombineThreads, 0, stream>>>(args, plan.head_dim);
    KV_CUDA_CHECK_LAUNCH("attention combine");
  }
}

}  // namespace cuda
}  // namespace kvmicro
