// append on the CPU: write each sequence's next token (k_new/v_new [B, Hkv, D]) at logical position
// ctx[b] (common/paged_kv.h: block table[b][ctx[b] / block_size], slot ctx[b] % block_size), every
// kv head. It moves
// B * Hkv rows — far too little work to hand to other threads — so it runs on the calling thread.
#include <cstring>

#include "common/paged_kv.h"
#include "cpu.h"

namespace kvmicro {
namespace cpu {

void append(const OpParams& p, const Buffers& buf) {
  const PagedKV kv = make_paged_kv(p.pool, buf.table, buf.ctx, p.batch, p.max_blocks);
  const int64_t isz = dtype_size(p.dtype), D = p.pool.head_dim;
  char* k_pool = static_cast<char*>(buf.k_pool);
  char* v_pool = static_cast<char*>(buf.v_pool);
  for (int b = 0; b < p.batch; ++b) {
    const int64_t t = kv.seq_len(b);  // the position append writes
    for (int h = 0; h < p.pool.kv_heads; ++h) {
      const int64_t src = ((int64_t)b * p.pool.kv_heads + h) * D * isz;
      const char* k_new = static_cast<const char*>(buf.k_new) + src;
      const char* v_new = static_cast<const char*>(buf.v_new) + src;
      // A write is where a bad id would corrupt memory: the checked offset, although prepare
      // validated ctx[b] < max_blocks * block_size and this table entry.
      const int64_t row = kv.checked_row_offset(b, t, h);
      if (row < 0) continue;
      if (p.pool.d_contiguous()) {
        std::memcpy(k_pool + row * isz, k_new, (size_t)(D * isz));
        std::memcpy(v_pool + row * isz, v_new, (size_t)(D * isz));
        continue;
      }
      for (int64_t d = 0; d < D; ++d) {
        const int64_t at = kv.elem_offset(b, t, h, d) * isz;
        std::memcpy(k_pool + at, k_new + d * isz, (size_t)isz);
        std::memcpy(v_pool + at, v_new + d * isz, (size_t)isz);
      }
    }
  }
}

}  // namespace cpu
}  // namespace kvmicro
