// sdpa_contiguous: decode attention over dense K/V [B, Hkv, max_ctx_pad, D] (D innermost), the
// lower bound every paged op is compared with. The same template as paged_sdpa
// (decode_attention.h), the same dispatch and partition rule; only the row source differs.
#include <metal_stdlib>

#include "decode_attention.h"

using namespace metal;
using namespace kvmicro;
using namespace kvmicro::mtl;

template <typename T, int D>
kernel void sdpa_contiguous(constant OpParams& p [[buffer(kBufParams)]],
                            constant PartitionParams& part [[buffer(kBufPartition)]],
                            const device T* q [[buffer(kBufQ)]],
                            const device T* k_dense [[buffer(kBufKDense)]],
                            const device T* v_dense [[buffer(kBufVDense)]],
                            const device int32_t* ctx [[buffer(kBufCtx)]],
                            device T* out [[buffer(kBufOut)]],
                            device float* part_out [[buffer(kBufPartialOut)]],
                            device float* part_ml [[buffer(kBufPartialMaxSum)]],
                            threadgroup float* scratch [[threadgroup(0)]],
                            uint3 group_pos [[threadgroup_position_in_grid]],
                            uint simd_id [[simdgroup_index_in_threadgroup]],
                            uint lane [[thread_index_in_simdgroup]]) {
  const int b = (int)group_pos.z;
  const int kvh = (int)group_pos.y / query_tiles(p.group);
  DenseRows rows;
  rows.base = ((int64_t)b * p.pool.kv_heads + kvh) * p.max_ctx_pad * D;
  rows.head_dim = D;
  attend<T, D, true>(p, part, q, k_dense, v_dense, rows, 1, ctx[b], out, part_out, part_ml,
                     scratch, group_pos, simd_id, lane);
}

// ---- support matrix: dtype x head_dim ----------------------------------------------------------
#define KV_SDPA_DTYPE(tname, T)                                          \
  KV_INSTANTIATE("sdpa_contiguous_" tname "_d64", sdpa_contiguous, T, 64)   \
  KV_INSTANTIATE("sdpa_contiguous_" tname "_d80", sdpa_contiguous, T, 80)   \
  KV_INSTANTIATE("sdpa_contiguous_" tname "_d96", sdpa_contiguous, T, 96)   \
  KV_INSTANTIATE("sdpa_contiguous_" tname "_d112", sdpa_contiguous, T, 112) \
  KV_INSTANTIATE("sdpa_contiguous_" tname "_d128", sdpa_contiguous, T, 128) \
  KV_INSTANTIATE("sdpa_contiguous_" tname "_d256", sdpa_contiguous, T, 256)

KV_SDPA_DTYPE("f16", half)
KV_SDPA_DTYPE("f32", float)
#if KV_HAS_BFLOAT
KV_SDPA_DTYPE("bf16", bfloat)
#endif
