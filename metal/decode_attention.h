// Decode attention (q_len 1) shared by paged_sdpa.metal and sdpa_contiguous.metal: the two differ
// only in where row t of K and V lives (a Rows source); the arithmetic is this one template.
//
// Threadgroup: kAttnSimdgroups simdgroups (128 threads) serve one (partition, kv head x query
// tile, sequence). Grid: (partitions, kv_heads * query_tiles(group), batch).
//
// Lane mapping: a K/V row of D elements is kChunks 4-element vectors; kLanesPerRow lanes (the
// smallest power of two >= kChunks, at most 32) read one row, lane `sub` taking chunks sub,
// sub + kLanesPerRow, ... (a masked tail where kChunks is not a power of two: D = 80 uses 20 of
// 32 lanes). A simdgroup thus reads kRowsPerSimd = 32 / kLanesPerRow rows per step, each lane 4
// elements (8 bytes in half, 16 in float) per chunk of K and of V. Every query of the tile is
// dotted with the row the lane holds, so a K/V byte is read once for the whole GQA group.
//
// Softmax: online, in float, in the log2 domain (queries pre-scaled by scale * log2(e), exp2).
// Each row slot of each simdgroup keeps its own running (max, sum, accumulator); slots merge
// through simd_shuffle_xor, simdgroups through threadgroup memory whose size depends on head_dim
// only (attn_threadgroup_bytes), never on the context. Running maxima start at a finite kEmpty,
// not -inf: Metal compiles with fast math, which may assume there are no infinities.
//
// Padded tokens are never attended: rows at or past t_end are neither loaded nor counted.
#pragma once

#include <metal_stdlib>

#include "kernel_abi.h"

using namespace metal;

namespace kvmicro {
namespace mtl {

KV_CONST float kLog2e = 1.4426950408889634f;
KV_CONST float kEmpty = -1.0e30f;  // running max before any key: exp2(kEmpty - real) == 0

constexpr int lanes_for_chunks(int chunks) {
  return chunks > 16 ? 32 : chunks > 8 ? 16 : chunks > 4 ? 8 : chunks > 2 ? 4 : chunks > 1 ? 2 : 1;
}

template <int D>
struct LaneMap {
  static_assert(D % 4 == 0, "head_dim must be a multiple of 4");
  static KV_CONST int kChunks = D / 4;
  static KV_CONST int kLanesPerRow = lanes_for_chunks(kChunks);
  static KV_CONST int kChunksPerLane = (kChunks + kLanesPerRow - 1) / kLanesPerRow;
  static KV_CONST int kRowsPerSimd = kSimdWidth / kLanesPerRow;
};

// Four elements of a row starting at element offset `at`: one vector load when D is innermost
// (every row starts at a multiple of D, so the load is aligned), else four strided loads.
template <typename T, bool kDInner>
inline float4 load4(const device T* base, int64_t at, int64_t stride_d) {
  if (kDInner) return float4(*((const device vec<T, 4>*)(base + at)));
  return float4(float(base[at]), float(base[at + stride_d]), float(base[at + 2 * stride_d]),
                float(base[at + 3 * stride_d]));
}

// K/V rows read through the block table (paged_sdpa): sequence b, kv head h.
struct PagedRows {
  PagedKV kv;
  int b;
  int h;
  int64_t row(int t) const {
    const int bs = kv.pool.block_size;
#if defined(KV_PLANT_TABLE_OFF_BY_ONE)
    const int logical_block = (t + 1) / bs;  // planted bug (tests/test_metal_shim.py)
#else
    const int logical_block = t / bs;
#endif
    return kv.pool.row_offset(kv.physical_block(b, logical_block), t - logical_block * bs, h);
  }
};

// K/V rows of dense [B, Hkv, T, D] tensors (sdpa_contiguous): base is row 0 of (b, h).
struct DenseRows {
  int64_t base;
  int head_dim;
  int64_t row(int t) const { return base + (int64_t)t * head_dim; }
};

// Weight of a running state with max m once the merged max is m_all.
inline float rescale(float m, float m_all) { return exp2(m - m_all); }

template <typename T, int D, bool kDInner, typename Rows>
inline void attend(const constant OpParams& p, const constant PartitionParams& part,
                   const device T* q, const device T* k, const device T* v, Rows rows,
                   int64_t stride_d, int ctx, device T* out, device float* part_out,
                   device float* part_ml, threadgroup float* scratch, uint3 group_pos,
                   uint simd_id, uint lane) {
  constexpr int L = LaneMap<D>::kLanesPerRow;
  constexpr int C = LaneMap<D>::kChunksPerLane;
  constexpr int R = LaneMap<D>::kRowsPerSimd;
  constexpr int Q = kMaxQueryTile;
  const int G = p.group;
  const int tiles = query_tiles(G);
  const int partition = (int)group_pos.x;
  const int kvh = (int)group_pos.y / tiles;
  const int g0 = ((int)group_pos.y % tiles) * Q;
  const int nq = min(Q, G - g0);
  const int b = (int)group_pos.z;
  const int t_begin = partition * part.partition_tokens;
  // The whole threadgroup leaves together (no barrier was reached): an empty partition, which
  // the combine pass never reads.
  if (t_begin >= ctx) return;
  const int t_end = min(ctx, t_begin + part.partition_tokens);
  const int slot = (int)lane / L;
  const int sub = (int)lane % L;

  float4 qv[Q][C];
  const float q_scale = p.scale * kLog2e;
  for (int g = 0; g < Q; ++g) {
    const int64_t q_row = ((int64_t)b * p.q_heads + (int64_t)kvh * G + g0 + g) * D;
    for (int c = 0; c < C; ++c) {
      const int chunk = sub + c * L;
      qv[g][c] = float4(0.0f);
      if (g < nq && chunk < LaneMap<D>::kChunks)
        qv[g][c] = float4(*((const device vec<T, 4>*)(q + q_row + chunk * 4))) * q_scale;
    }
  }

  float m[Q];
  float l[Q];
  float4 acc[Q][C];
  for (int g = 0; g < Q; ++g) {
    m[g] = kEmpty;
    l[g] = 0.0f;
    for (int c = 0; c < C; ++c) acc[g][c] = float4(0.0f);
  }

  // Each simdgroup steps through the partition kAttnSimdgroups * R rows at a time; the loop
  // bound is uniform within a simdgroup (shuffles need every lane), rows past t_end are masked.
  for (int t0 = t_begin + (int)simd_id * R; t0 < t_end; t0 += kAttnSimdgroups * R) {
    const int t = t0 + slot;
    const bool valid = t < t_end;
    const int64_t row = valid ? rows.row(t) : 0;
    float4 kc[C];
    float4 vc[C];
    for (int c = 0; c < C; ++c) {
      const int chunk = sub + c * L;
      kc[c] = float4(0.0f);
      vc[c] = float4(0.0f);
      if (valid && chunk < LaneMap<D>::kChunks) {
        kc[c] = load4<T, kDInner>(k, row + (int64_t)chunk * 4 * stride_d, stride_d);
        vc[c] = load4<T, kDInner>(v, row + (int64_t)chunk * 4 * stride_d, stride_d);
      }
    }
    float4 s4[Q / 4];
    for (int j = 0; j < Q / 4; ++j) s4[j] = float4(0.0f);
    for (int g = 0; g < Q; ++g) {
      float s = 0.0f;
      for (int c = 0; c < C; ++c) s += dot(qv[g][c], kc[c]);
      s4[g / 4][g % 4] = s;
    }
    for (int mask = 1; mask < L; mask <<= 1)
      for (int j = 0; j < Q / 4; ++j) s4[j] += simd_shuffle_xor(s4[j], (ushort)mask);
    if (valid) {
      for (int g = 0; g < Q; ++g) {
        const float s = s4[g / 4][g % 4];
        const float m_new = max(m[g], s);
        const float alpha = exp2(m[g] - m_new);
        const float w = exp2(s - m_new);
        l[g] = l[g] * alpha + w;
        for (int c = 0; c < C; ++c) acc[g][c] = acc[g][c] * alpha + vc[c] * w;
        m[g] = m_new;
      }
    }
  }

  // Merge the row slots of this simdgroup (only when a row takes fewer than 32 lanes).
  for (int mask = L; mask < kSimdWidth; mask <<= 1) {
    for (int g = 0; g < Q; ++g) {
      const float m_other = simd_shuffle_xor(m[g], (ushort)mask);
      const float l_other = simd_shuffle_xor(l[g], (ushort)mask);
      const float m_new = max(m[g], m_other);
      const float a = rescale(m[g], m_new);
      const float a_other = rescale(m_other, m_new);
      l[g] = l[g] * a + l_other * a_other;
      for (int c = 0; c < C; ++c)
        acc[g][c] = acc[g][c] * a + simd_shuffle_xor(acc[g][c], (ushort)mask) * a_other;
      m[g] = m_new;
    }
  }

  // Merge the simdgroups through threadgroup memory, one query at a time.
  threadgroup float* ml = scratch;                             // [simdgroup][query][2]
  threadgroup float* o_rows = scratch + kAttnSimdgroups * Q * 2;  // [simdgroup][D]
  if (lane == 0) {
    for (int g = 0; g < Q; ++g) {
      ml[((int)simd_id * Q + g) * 2] = m[g];
      ml[((int)simd_id * Q + g) * 2 + 1] = l[g];
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
#if defined(KV_PLANT_DIVERGENT_BARRIER)
  // planted bug (tests/test_metal_shim.py): a barrier only simdgroup 0 reaches
  if (simd_id == 0) threadgroup_barrier(mem_flags::mem_threadgroup);
#endif
  const int tid = (int)simd_id * kSimdWidth + (int)lane;
  for (int g = 0; g < nq; ++g) {
    float m_all = kEmpty;
    for (int s = 0; s < kAttnSimdgroups; ++s) m_all = max(m_all, ml[(s * Q + g) * 2]);
    float total = 0.0f;
    for (int s = 0; s < kAttnSimdgroups; ++s)
      total += ml[(s * Q + g) * 2 + 1] * rescale(ml[(s * Q + g) * 2], m_all);
    const float mine = rescale(m[g], m_all);
    if (slot == 0) {
      for (int c = 0; c < C; ++c) {
        const int chunk = sub + c * L;
        if (chunk < LaneMap<D>::kChunks) {
          const float4 o = acc[g][c] * mine;
          threadgroup float* dst = o_rows + (int)simd_id * D + chunk * 4;
          dst[0] = o.x;
          dst[1] = o.y;
          dst[2] = o.z;
          dst[3] = o.w;
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const int64_t hq = (int64_t)kvh * G + g0 + g;
    const int64_t out_row = ((int64_t)b * p.q_heads + hq) * D;
    const int64_t part_row = ((int64_t)b * p.q_heads + hq) * part.partitions + partition;
    for (int d = tid; d < D; d += kAttnThreads) {
      float o = 0.0f;
      for (int s = 0; s < kAttnSimdgroups; ++s) o += o_rows[s * D + d];
      o = o / total;
      if (part.partitions == 1)
        out[out_row + d] = T(o);
      else
        part_out[part_row * D + d] = o;
    }
    if (part.partitions > 1 && tid == 0) {
      part_ml[part_row * 2] = m_all;
      part_ml[part_row * 2 + 1] = total;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
}

}  // namespace mtl
}  // namespace kvmicro
