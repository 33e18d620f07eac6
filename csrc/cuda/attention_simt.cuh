// The SIMT split kernel: every dtype, head_dim and layout (the strided path reads rows whose D is
// not innermost). Threads are grouped into "workers" of TPR lanes; a worker owns one key row at a
// time and each lane holds 16 bytes of it (VPT vectors when a row is wider than a warp). A worker
// issues U rows of K and V (16-byte loads) before using any, and the block's workers are merged in
// shared memory at the end (write_block_result).
#pragma once

#include <type_traits>

#include "cuda/attention_common.cuh"

namespace kvmicro {
namespace cuda {

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

// C: the combine mode (write_block_result).
template <typename T, int D, int GT, bool kFast, class Src, AttnCombine C>
__global__ void __launch_bounds__(kAttnThreads)
    attention_split_kernel(AttnArgs a, Src src) {
  constexpr RowShape S = row_shape((int)sizeof(T), D, GT);
  constexpr int V = S.vec, NV = S.nv, TPR = S.tpr, VPT = S.vpt, NW = S.workers, U = S.unroll;
  constexpr int RPW = 32 / TPR;

  __shared__ float s_acc[NW][GT][D];
  __shared__ float s_m[NW][GT];
  __shared__ float s_l[NW][GT];

  SplitSlice slice;
  if (!split_slice<GT, C>(a, slice)) return;
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

  allow_dependent_launch();
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

  write_block_result<T, D, GT, NW, C>(a, s_acc, s_m, s_l, b, hk, g0, gcount, split);
}

}  // namespace cuda
}  // namespace kvmicro
