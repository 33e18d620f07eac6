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

struct Job {
  const AttentionPlan* plan;
  const Buffers* buf;
  float* workers;
  float* partials;
};

void task(void* ctx, int64_t index, int worker) {
  const Job& job = *static_cast<const Job*>(ctx);
  const AttentionPlan& plan = *job.plan;
  const OpParams& p = plan.p;
  const TaskIndex t = task_index(plan, index);
  const int64_t row_bytes = (int64_t)p.pool.head_dim * dtype_size(p.dtype);
  const int64_t head_bytes = p.max_ctx_pad * row_bytes;
  const int64_t offset = (int64_t)t.b * p.pool.kv_heads * head_bytes;
  const DenseRows rows{static_cast<const char*>(job.buf->k_dense) + offset,
                       static_cast<const char*>(job.buf->v_dense) + offset, row_bytes, head_bytes};
  attend(plan, rows, *job.buf, t.b, t.kvh0, t.split, job.workers + worker * plan.worker_floats,
         job.partials);
}

}  // namespace

void sdpa_contiguous(const AttentionPlan& plan, const Buffers& buf, ThreadPool& pool,
                     AttentionScratch& scratch) {
  Job job{&plan, &buf, scratch.workers.as<float>(), scratch.partials.as<float>()};
  pool.run(attention_tasks(plan), &task, &job);
  if (plan.splits > 1) combine_splits(plan, buf, pool, scratch);
}

}  // namespace cpu
}  // namespace kvmicro
