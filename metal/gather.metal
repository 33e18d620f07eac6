// gather: copy each sequence's blocks, whole and in table order, from the pool into dense K/V
// [B, Hkv, max_ctx_pad, D]. Bits are moved, never converted. Only blocks that hold some of the
// sequence's ctx[b] tokens are copied; the rest of the dense tensor is not written.
//
// Dispatch (docs/metal.md): grid (max_blocks, kv_heads, batch) of kCopyThreads threads, no
// threadgroup memory. D innermost: each thread moves 4-element vectors (8 bytes in half);
// `_strided`: single elements through PoolView::elem_offset.
#include <metal_stdlib>

#include "kernel_abi.h"

using namespace metal;
using namespace kvmicro;
using namespace kvmicro::mtl;

template <typename T, bool kDInner>
kernel void gather(constant OpParams& p [[buffer(kBufParams)]],
                   const device T* k_pool [[buffer(kBufKPool)]],
                   const device T* v_pool [[buffer(kBufVPool)]],
                   const device int32_t* table [[buffer(kBufTable)]],
                   const device int32_t* ctx [[buffer(kBufCtx)]],
                   device T* k_dense [[buffer(kBufKDense)]],
                   device T* v_dense [[buffer(kBufVDense)]],
                   uint3 group_pos [[threadgroup_position_in_grid]],
                   uint tid [[thread_index_in_threadgroup]],
                   uint3 threads [[threads_per_threadgroup]]) {
  const PagedKV kv = make_paged_kv(p.pool, table, ctx, p.batch, p.max_blocks);
  const int logical_block = (int)group_pos.x;
  const int h = (int)group_pos.y;
  const int b = (int)group_pos.z;
  const int bs = kv.pool.block_size;
  const int D = kv.pool.head_dim;
  if ((int64_t)logical_block * bs >= kv.seq_len(b)) return;
  const int32_t block = kv.physical_block(b, logical_block);
  const int64_t dense0 = (((int64_t)b * kv.pool.kv_heads + h) * p.max_ctx_pad +
                          (int64_t)logical_block * bs) * D;
  if (kDInner) {
    const int vectors = bs * D / 4;
    for (int i = (int)tid; i < vectors; i += (int)threads.x) {
      const int s = i * 4 / D;
      const int d = i * 4 - s * D;
      const int64_t src = kv.pool.row_offset(block, s, h) + d;
      *((device vec<T, 4>*)(k_dense + dense0 + (int64_t)i * 4)) =
          *((const device vec<T, 4>*)(k_pool + src));
      *((device vec<T, 4>*)(v_dense + dense0 + (int64_t)i * 4)) =
          *((const device vec<T, 4>*)(v_pool + src));
    }
  } else {
    for (int e = (int)tid; e < bs * D; e += (int)threads.x) {
      const int s = e / D;
      const int64_t src = kv.pool.elem_offset(block, s, h, e - s * D);
      k_dense[dense0 + e] = k_pool[src];
      v_dense[dense0 + e] = v_pool[src];
    }
  }
}

// ---- support matrix: dtype x (D innermost | strided) -------------------------------------------
// Bits are moved, so the element width is all that matters; one instantiation per dtype keeps
// the names the host forms (gather_<dtype>[_strided]).
KV_INSTANTIATE("gather_f16", gather, half, true)
KV_INSTANTIATE("gather_f16_strided", gather, half, false)
KV_INSTANTIATE("gather_f32", gather, float, true)
KV_INSTANTIATE("gather_f32_strided", gather, float, false)
#if KV_HAS_BFLOAT
KV_INSTANTIATE("gather_bf16", gather, bfloat, true)
KV_INSTANTIATE("gather_bf16_strided", gather, bfloat, false)
#endif
