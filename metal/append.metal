// append: write each sequence's next token (k_new / v_new [B, Hkv, D]) at logical position ctx[b]:
// block table[b][ctx[b] / block_size], slot ctx[b] % block_size. A write is the one place a bad
// block id would corrupt memory, so the address comes from PagedKV::checked_row_offset (the host
// validated the table too; a refused address writes nothing).
//
// Dispatch (docs/metal.md): grid (batch, kv_heads) of kCopyThreads threads, no threadgroup
// memory; each thread writes head-dim entries tid, tid + threads, ... (any layout: stride_d).
#include <metal_stdlib>

#include "kernel_abi.h"

using namespace metal;
using namespace kvmicro;
using namespace kvmicro::mtl;

template <typename T>
kernel void append(constant OpParams& p [[buffer(kBufParams)]],
                   device T* k_pool [[buffer(kBufKPool)]],
                   device T* v_pool [[buffer(kBufVPool)]],
                   const device int32_t* table [[buffer(kBufTable)]],
                   const device int32_t* ctx [[buffer(kBufCtx)]],
                   const device T* k_new [[buffer(kBufKNew)]],
                   const device T* v_new [[buffer(kBufVNew)]],
                   uint3 group_pos [[threadgroup_position_in_grid]],
                   uint tid [[thread_index_in_threadgroup]],
                   uint3 threads [[threads_per_threadgroup]]) {
  const PagedKV kv = make_paged_kv(p.pool, table, ctx, p.batch, p.max_blocks);
  const int b = (int)group_pos.x;
  const int h = (int)group_pos.y;
  const int64_t row = kv.checked_row_offset(b, kv.seq_len(b), h);
  if (row < 0) return;
  const int D = kv.pool.head_dim;
  const int64_t src = ((int64_t)b * kv.pool.kv_heads + h) * D;
  for (int d = (int)tid; d < D; d += (int)threads.x) {
    k_pool[row + d * kv.pool.stride_d] = k_new[src + d];
    v_pool[row + d * kv.pool.stride_d] = v_new[src + d];
  }
}

// ---- support matrix: dtype (any layout) --------------------------------------------------------
KV_INSTANTIATE("append_f16", append, half)
KV_INSTANTIATE("append_f32", append, float)
#if KV_HAS_BFLOAT
KV_INSTANTIATE("append_bf16", append, bfloat)
#endif
