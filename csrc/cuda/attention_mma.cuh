// The tensor-core split kernels' shared math (MmaWarpState: Q^T fragments, the O^T accumulator and
// the online softmax of a block's 8 query heads) and the register-load kernel
// attention_split_mma_kernel. float16/bfloat16, D innermost, head_dim 64/96/128.
#pragma once

#include "cuda/attention_common.cuh"

namespace kvmicro {
namespace cuda {

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
// the table while this step's loads are in flight. P: L2 prefetch hint of the K/V loads;
// C: the combine mode (write_block_result).
template <typename T, int D, int P, class Src, AttnCombine C>
__global__ void __launch_bounds__(kAttnThreads)
    attention_split_mma_kernel(AttnArgs a, Src src) {
  static_assert(D % 32 == 0, "16-byte fragment loads cover 32 elements of d per lane quad");
  constexpr int NB = D / 32;
  constexpr int NW = kAttnWarps;

  __shared__ float s_acc[NW][kMmaHeads][D];
  __shared__ float s_m[NW][kMmaHeads];
  __shared__ float s_l[NW][kMmaHeads];

  KV_STAMP(kTimelineSplit, kStampEntry);
  SplitSlice slice;
  if (!split_slice<kMmaHeads, C>(a, slice)) return;
  KV_STAMP(kTimelineSplit, kStampSliced);
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
      if (t0 == start + warp * kMmaTileKeys) KV_STAMP(kTimelineSplit, kStampFirst);
    }
  }

  allow_dependent_launch();
  st.store(s_acc, s_m, s_l, warp, gr, tq);
  __syncthreads();
  KV_STAMP(kTimelineSplit, kStampLoopEnd);
  write_block_result<T, D, kMmaHeads, NW, C>(a, s_acc, s_m, s_l, b, hk, g0, gcount, split);
  KV_STAMP(kTimelineSplit, kStampExit);
}

}  // namespace cuda
}  // namespace kvmicro
