// paged_sdpa: fused decode attention reading K/V straight from the pool through the block table.
//
// Dispatch (docs/metal.md): grid (partitions, kv_heads * query_tiles(group), batch) of
// kAttnThreads threads; [[threadgroup(0)]] = attn_threadgroup_bytes(head_dim). With
// partitions > 1 it writes per-partition partials and combine_<dtype> (combine.metal) finishes.
// Any layout: when D is innermost (stride_d == 1, the common case) rows are read as 4-element
// vectors, otherwise as 4 strided loads per chunk; the branch is uniform over the grid.
#include <metal_stdlib>

#include "decode_attention.h"

using namespace metal;
using namespace kvmicro;
using namespace kvmicro::mtl;

template <typename T, int D>
kernel void paged_sdpa(constant OpParams& p [[buffer(kBufParams)]],
                       constant PartitionParams& part [[buffer(kBufPartition)]],
                       const device T* q [[buffer(kBufQ)]],
                       const device T* k_pool [[buffer(kBufKPool)]],
                       const device T* v_pool [[buffer(kBufVPool)]],
                       const device int32_t* table [[buffer(kBufTable)]],
                       const device int32_t* ctx [[buffer(kBufCtx)]],
                       device T* out [[buffer(kBufOut)]],
                       device float* part_out [[buffer(kBufPartialOut)]],
                       device float* part_ml [[buffer(kBufPartialMaxSum)]],
                       threadgroup float* scratch [[threadgroup(0)]],
                       uint3 group_pos [[threadgroup_position_in_grid]],
                       uint simd_id [[simdgroup_index_in_threadgroup]],
                       uint lane [[thread_index_in_simdgroup]]) {
  const int b = (int)group_pos.z;
  PagedRows rows;
  rows.kv = make_paged_kv(p.pool, table, ctx, p.batch, p.max_blocks);
  rows.b = b;
  rows.h = (int)group_pos.y / query_tiles(p.group);
  const int64_t stride_d = rows.kv.pool.stride_d;
  if (stride_d == 1)
    attend<T, D, true>(p, part, q, k_pool, v_pool, rows, 1, ctx[b], out, part_out, part_ml,
                       scratch, group_pos, simd_id, lane);
  else
    attend<T, D, false>(p, part, q, k_pool, v_pool, rows, stride_d, ctx[b], out, part_out,
                        part_ml, scratch, group_pos, simd_id, lane);
}

// ---- support matrix: dtype x head_dim (every layout) -------------------------------------------
#define KV_PAGED_SDPA(tname, T, D) KV_INSTANTIATE("paged_sdpa_" tname "_d" #D, paged_sdpa, T, D)
#define KV_PAGED_SDPA_DTYPE(tname, T) \
  KV_PAGED_SDPA(tname, T, 64)         \
  KV_PAGED_SDPA(tname, T, 80)         \
  KV_PAGED_SDPA(tname, T, 96)         \
  KV_PAGED_SDPA(tname, T, 112)        \
  KV_PAGED_SDPA(tname, T, 128)        \
  KV_PAGED_SDPA(tname, T, 256)

KV_PAGED_SDPA_DTYPE("f16", half)
KV_PAGED_SDPA_DTYPE("f32", float)
#if KV_HAS_BFLOAT
KV_PAGED_SDPA_DTYPE("bf16", bfloat)
#endif
