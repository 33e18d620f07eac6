// combine: the second pass of split-context attention (paged_sdpa, sdpa_contiguous with
// partitions > 1). For each (query head, sequence) it merges the partitions that overlap the
// sequence, ceil(ctx[b] / partition_tokens) of them (never a partition the first pass skipped):
//   out = sum_p w_p * o_p / sum_p w_p,   w_p = l_p * exp2(m_p - max_p m_p)
// with o_p the partition's normalised output and (m_p, l_p) its max logit (log2 units) and sum.
//
// Dispatch (docs/metal.md): grid (q_heads, batch) of kCombineThreads threads, no threadgroup
// memory; each thread owns head-dim entries tid, tid + threads, ...
#include <metal_stdlib>

#include "kernel_abi.h"

using namespace metal;
using namespace kvmicro;
using namespace kvmicro::mtl;

template <typename T>
kernel void combine(constant OpParams& p [[buffer(kBufParams)]],
                    constant PartitionParams& part [[buffer(kBufPartition)]],
                    const device int32_t* ctx [[buffer(kBufCtx)]],
                    const device float* part_out [[buffer(kBufPartialOut)]],
                    const device float* part_ml [[buffer(kBufPartialMaxSum)]],
                    device T* out [[buffer(kBufOut)]],
                    uint3 group_pos [[threadgroup_position_in_grid]],
                    uint tid [[thread_index_in_threadgroup]],
                    uint3 threads [[threads_per_threadgroup]]) {
  const int64_t hq = group_pos.x;
  const int64_t b = group_pos.y;
  const int D = p.pool.head_dim;
  const int used = (ctx[b] + part.partition_tokens - 1) / part.partition_tokens;
  const int64_t first = (b * p.q_heads + hq) * part.partitions;
  float m_all = -1.0e30f;
  for (int i = 0; i < used; ++i) m_all = max(m_all, part_ml[(first + i) * 2]);
  float total = 0.0f;
  for (int i = 0; i < used; ++i)
    total += part_ml[(first + i) * 2 + 1] * exp2(part_ml[(first + i) * 2] - m_all);
  for (int d = (int)tid; d < D; d += (int)threads.x) {
    float o = 0.0f;
    for (int i = 0; i < used; ++i) {
      const float w = part_ml[(first + i) * 2 + 1] * exp2(part_ml[(first + i) * 2] - m_all);
      o += w * part_out[(first + i) * D + d];
    }
    out[(b * p.q_heads + hq) * D + d] = T(o / total);
  }
}

// ---- support matrix: dtype ---------------------------------------------------------------------
KV_INSTANTIATE("combine_f16", combine, half)
KV_INSTANTIATE("combine_f32", combine, float)
#if KV_HAS_BFLOAT
KV_INSTANTIATE("combine_bf16", combine, bfloat)
#endif
