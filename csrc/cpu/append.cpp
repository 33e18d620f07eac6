// append on the CPU: write each sequence's next token (k_new/v_new [B, Hkv, D]) at logical position
// ctx[b]: block table[b][ctx[b] / block_size], slot ctx[b] % block_size, every kv head. It moves
// B * Hkv rows — far too little work to hand to other threads — so it runs on the calling thread.
#include <cstring>

#include "common/layout.h"
#include "cpu.h"

namespace kvmicro {
namespace cpu {

void append(const OpParams& p, const Buffers& buf) {
  const PoolView& view = p.pool;
  const int64_t isz = dtype_size(p.dtype), D = view.head_dim;
  char* k_pool = static_cast<char*>(buf.k_pool);
  char* v_pool = static_cast<char*>(buf.v_pool);
  for (int b = 0; b < p.batch; ++b) {
    // Validated at prepare: ctx[b] < max_blocks * block_size and this entry is inside the pool.
    const TokenLocation loc =
        logical_to_physical(buf.table + (int64_t)b * p.max_blocks, view.block_size, buf.ctx[b]);
    for (int h = 0; h < view.kv_heads; ++h) {
      const int64_t src = ((int64_t)b * view.kv_heads + h) * D * isz;
      const char* k_new = static_cast<const char*>(buf.k_new) + src;
      const char* v_new = static_cast<const char*>(buf.v_new) + src;
      const int64_t row = view.row_offset(loc.block, loc.slot, h);
      if (view.d_contiguous()) {
        std::memcpy(k_pool + row * isz, k_new, (size_t)(D * isz));
        std::memcpy(v_pool + row * isz, v_new, (size_t)(D * isz));
        continue;
      }
      for (int64_t d = 0; d < D; ++d) {
        const int64_t at = view.elem_offset(loc.block, loc.slot, h, d) * isz;
        std::memcpy(k_pool + at, k_new + d * isz, (size_t)isz);
        std::memcpy(v_pool + at, v_new + d * isz, (size_t)isz);
      }
    }
  }
}

}  // namespace cpu
}  // namespace kvmicro
