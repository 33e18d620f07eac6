// paged_sdpa on the CPU: fused attention that reads K/V straight from the pool through the block
// table, in any layout (addresses from PoolView; D-innermost rows go to the vector kernel as they
// are, other layouts are gathered row by row into float first).
#include "attention.h"

namespace kvmicro {
namespace cpu {

namespace {

// Row t of one sequence's kv head: block table[t / block_size], slot t % block_size. The table
// entries were validated at prepare, so every block id here lies inside the pool.
struct PagedRows {
  const char* k;
  const char* v;
  const int32_t* table_row;
  PoolView view;
  int64_t itemsize;

  void fill(int64_t t, int n, int kvh, const void** k_rows, const void** v_rows) const {
    // The page math of layout.h for the first token; the rest step slot by slot (no division
    // per token), moving to the table's next block when a block is used up.
    TokenLocation loc = logical_to_physical(table_row, view.block_size, t);
    int64_t logical_block = t / view.block_size;
    for (int r = 0; r < n; ++r) {
      if (loc.slot == view.block_size) {
        loc.slot = 0;
        loc.block = table_row[++logical_block];
      }
      const int64_t off = view.row_offset(loc.block, loc.slot, kvh) * itemsize;
      k_rows[r] = k + off;
      v_rows[r] = v + off;
      ++loc.slot;
    }
  }
  int64_t head_step() const { return view.stride_h * itemsize; }
  int64_t stride_d() const { return view.stride_d; }
};

}  // namespace

void paged_sdpa(const AttentionPlan& plan, const Buffers& buf, ThreadPool& pool,
                AttentionScratch& scratch) {
  const OpParams& p = plan.p;
  run_attention(plan, buf, pool, scratch, [&](int b) {
    return PagedRows{static_cast<const char*>(buf.k_pool), static_cast<const char*>(buf.v_pool),
                     buf.table + (int64_t)b * p.max_blocks, p.pool, dtype_size(p.dtype)};
  });
}

}  // namespace cpu
}  // namespace kvmicro
