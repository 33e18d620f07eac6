// sdpa_contiguous on the CPU: attention over dense K/V [B, Hkv, T, D] — the lower bound the paged
// ops are measured against. Also the second half of gather_sdpa (over the gathered copy).
#include "attention.h"

namespace kvmicro {
namespace cpu {

namespace {

// Row t of one sequence's kv head h: dense[b][h][t][:], D-contiguous.
struct DenseRows {
  const char* k;  // dense[b][0][0]
  const char* v;
  int64_t row_bytes;   // D * itemsize
  int64_t head_bytes;  // T * D * itemsize

  void fill(int64_t t, int n, int kvh, const void** k_rows, const void** v_rows) const {
    for (int r = 0; r < n; ++r) {
      const int64_t off = kvh * head_bytes + (t + r) * row_bytes;
      k_rows[r] = k + off;
      v_rows[r] = v + off;
    }
  }
  int64_t head_step() const { return head_bytes; }
  int64_t stride_d() const { return 1; }
};

}  // namespace

void sdpa_contiguous(const AttentionPlan& plan, const Buffers& buf, ThreadPool& pool,
                     AttentionScratch& scratch) {
  const OpParams& p = plan.p;
  const int64_t row_bytes = (int64_t)p.pool.head_dim * dtype_size(p.dtype);
  const int64_t head_bytes = p.max_ctx_pad * row_bytes;
  run_attention(plan, buf, pool, scratch, [&](int b) {
    const int64_t offset = (int64_t)b * p.pool.kv_heads * head_bytes;
    return DenseRows{static_cast<const char*>(buf.k_dense) + offset,
                     static_cast<const char*>(buf.v_dense) + offset, row_bytes, head_bytes};
  });
}

}  // namespace cpu
}  // namespace kvmicro
