// paged_sdpa on the CPU: fused attention that reads K/V straight from the pool through the block
// table, in any layout (addresses from common/paged_kv.h; D-innermost rows go to the vector kernel as they
// are, other layouts are gathered row by row into float first).
#include "attention.h"
#include "common/paged_kv.h"

namespace kvmicro {
namespace cpu {

namespace {

// Rows of one sequence's kv head, through the paged-KV view (common/paged_kv.h). The table entries
// were validated at prepare, so every block id here lies inside the pool.
struct PagedRows {
  const char* k;
  const char* v;
  PagedKV kv;
  int b;
  int64_t itemsize;

  void fill(int64_t t, int n, int kvh, const void** k_rows, const void** v_rows) const {
    for (int r = 0; r < n; ++r) {
      const int64_t off = kv.row_offset(b, t + r, kvh) * itemsize;
      k_rows[r] = k + off;
      v_rows[r] = v + off;
    }
  }
  int64_t head_step() const { return kv.pool.stride_h * itemsize; }
  int64_t stride_d() const { return kv.pool.stride_d; }
};

}  // namespace

void paged_sdpa(const AttentionPlan& plan, const Buffers& buf, ThreadPool& pool,
                AttentionScratch& scratch) {
  const OpParams& p = plan.p;
  run_attention(plan, buf, pool, scratch, [&](int b) {
    return PagedRows{static_cast<const char*>(buf.k_pool), static_cast<const char*>(buf.v_pool),
                     make_paged_kv(p.pool, buf.table, buf.ctx, p.batch, p.max_blocks), b,
                     dtype_size(p.dtype)};
  });
}

}  // namespace cpu
}  // namespace kvmicro
