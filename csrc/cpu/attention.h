// The attention driver shared by sdpa_contiguous.cpp and paged_sdpa.cpp. The two differ only in
// where row t of K and V lives (a `Rows` source); everything else — queries, the online softmax in
// chunks of kChunk keys, split-context partial states, the output — is this one template, so the
// contiguous lower bound and the paged op run the same arithmetic.
//
// One task = (sequence b, kv heads, split): every query head of a kv head's GQA group is served at
// once, so each K/V row is read from memory once per group (the chunk kernel dots one K row with
// all `group` queries, and accumulates one V row into all `group` outputs).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common/half.h"
#include "common/layout.h"
#include "cpu.h"

namespace kvmicro {
namespace cpu {

// Per-worker scratch, carved out of AttentionScratch::workers. HB = plan.heads_per_task.
struct WorkerScratch {
  float* q;     // [HB * group][D], scaled by scale * log2(e)
  float* m;     // [HB * group]
  float* l;     // [HB * group]
  float* acc;   // [HB * group][D]
  float* tmp;   // [2 * kChunk][D]: the portable kernel's conversion rows
  float* rows;  // [2 * kChunk][D]: strided (D not innermost) rows gathered as float
};

int64_t worker_scratch_floats(int query_heads, int head_dim);
WorkerScratch worker_scratch(const AttentionPlan& plan, float* base);

// Query row (D elements of the op's dtype) -> float, times scale * log2(e).
void load_query(const AttentionPlan& plan, const void* src, float* dst);
// Row of D elements `stride_d` apart (dtype) -> contiguous float.
void load_strided_row(int32_t dtype, const void* src, int64_t stride_d, int D, float* dst);
// Result of one kv head of a task (its `slot` among the task's heads): the output rows
// (splits == 1) or its partial state (splits > 1).
void finish_task(const AttentionPlan& plan, const Buffers& buf, const WorkerScratch& w, int b,
                 int kvh, int slot, int split, float* partials);
// Second pass when splits > 1: combine each (b, kv head)'s partial states into the output.
void combine_splits(const AttentionPlan& plan, const Buffers& buf, ThreadPool& pool,
                    AttentionScratch& scratch);

// How many (chunk, head) kernel calls ahead rows are prefetched: several microseconds of work,
// more than a DRAM round trip, little enough that the lines are still in L2 when used.
constexpr int kPrefetchCalls = 8;

inline void prefetch_row(const void* p, int64_t bytes) {
#if defined(__GNUC__) || defined(__clang__)
  const char* c = static_cast<const char*>(p);
  // Into L2 (locality 2 = prefetcht1), not L1: a chunk's rows for every head of a task exceed
  // what L1 can have in flight, and L1 hits on them matter less than having them on the chip.
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 2);
#else
  (void)p;
  (void)bytes;
#endif
}

// Rows: `void fill(int64_t t, int n, int kvh, const void** k, const void** v) const` sets the
// addresses of tokens t .. t+n-1 of kv head kvh (element d == 0); `int64_t head_step() const` is
// the byte distance from a row of head h to the same token's row of head h + 1;
// `int64_t stride_d() const`.
//
// A task serves plan.heads_per_task kv heads starting at kvh0, over its split of the context.
// Chunk by chunk, it runs every head of the task over the same keys, so where a layout keeps the
// heads of one slot together (NSHD) it walks each block's memory front to back.
template <class Rows>
void attend(const AttentionPlan& plan, const Rows& rows, const Buffers& buf, int b, int kvh0,
            int split, float* worker, float* partials) {
  const OpParams& p = plan.p;
  const int G = p.group, D = p.pool.head_dim, HB = plan.heads_per_task;
  const int64_t GD = (int64_t)G * D;
  const int64_t isz = dtype_size(p.dtype);
  const WorkerScratch w = worker_scratch(plan, worker);

  for (int i = 0; i < HB * G; ++i) {  // the task's query heads are consecutive: kvh0 * G + i
    const int64_t q_row = ((int64_t)b * p.q_heads + (int64_t)kvh0 * G + i) * p.q_len;
    load_query(plan, static_cast<const char*>(buf.q) + q_row * D * isz, w.q + i * (int64_t)D);
    w.m[i] = -INFINITY;
    w.l[i] = 0.0f;
  }
  std::fill(w.acc, w.acc + HB * GD, 0.0f);

  const int64_t ctx = buf.ctx[b];
  const int64_t t_begin = ctx * split / plan.splits, t_end = ctx * (split + 1) / plan.splits;
  const int64_t row_bytes = plan.strided ? 0 : D * isz;
  const int64_t head_step = rows.head_step();
  // Row addresses of kv head kvh0, once per chunk; another head's are a constant step away.
  const void* k_base[kChunk];
  const void* v_base[kChunk];
  const void* k_pf[kChunk];
  const void* v_pf[kChunk];
  const void* k_rows[kChunk];
  const void* v_rows[kChunk];
  // Software prefetch: before each (chunk, head) kernel call, the same head's rows
  // kPrefetchCalls calls ahead. A paged pool's loads jump between blocks, which hardware
  // prefetchers do not follow; issuing them one head at a time spreads them evenly over the work.
  const int pf_chunks = std::max(1, (kPrefetchCalls + HB - 1) / HB);
  for (int64_t t = t_begin; t < t_end; t += kChunk) {
    const int n = (int)std::min<int64_t>(kChunk, t_end - t);
    const int64_t t_pf = t + (int64_t)pf_chunks * kChunk;
    const int n_pf = row_bytes ? (int)std::min<int64_t>(kChunk, t_end - t_pf) : 0;
    if (n_pf > 0) rows.fill(t_pf, n_pf, kvh0, k_pf, v_pf);
    rows.fill(t, n, kvh0, k_base, v_base);
    for (int h = 0; h < HB; ++h) {
      const int64_t step = h * head_step;
      for (int r = 0; r < n_pf; ++r) {
        prefetch_row(static_cast<const char*>(k_pf[r]) + step, row_bytes);
        prefetch_row(static_cast<const char*>(v_pf[r]) + step, row_bytes);
      }
      const SoftmaxState st{w.m + h * G, w.l + h * G, w.acc + h * GD, w.tmp};
      if (plan.strided) {
        for (int r = 0; r < n; ++r) {
          float* kf = w.rows + (int64_t)r * D;
          float* vf = w.rows + (int64_t)(kChunk + r) * D;
          load_strided_row(p.dtype, static_cast<const char*>(k_base[r]) + step, rows.stride_d(),
                           D, kf);
          load_strided_row(p.dtype, static_cast<const char*>(v_base[r]) + step, rows.stride_d(),
                           D, vf);
          k_rows[r] = kf;
          v_rows[r] = vf;
        }
      } else {
        for (int r = 0; r < n; ++r) {
          k_rows[r] = static_cast<const char*>(k_base[r]) + step;
          v_rows[r] = static_cast<const char*>(v_base[r]) + step;
        }
      }
      plan.kernel(w.q + h * GD, G, D, k_rows, v_rows, n, st);
    }
  }
  for (int h = 0; h < HB; ++h) finish_task(plan, buf, w, b, kvh0 + h, h, split, partials);
}

// Task index -> (b, first kv head, split), in that nesting order.
struct TaskIndex {
  int b, kvh0, split;
};
inline int head_groups(const AttentionPlan& plan) {
  return plan.p.pool.kv_heads / plan.heads_per_task;
}
inline TaskIndex task_index(const AttentionPlan& plan, int64_t task) {
  const int64_t bg = task / plan.splits;
  return TaskIndex{(int)(bg / head_groups(plan)),
                   (int)(bg % head_groups(plan)) * plan.heads_per_task, (int)(task % plan.splits)};
}

inline int64_t attention_tasks(const AttentionPlan& plan) {
  return (int64_t)plan.p.batch * head_groups(plan) * plan.splits;
}

// The whole attention op over one row source: a task per (sequence, kv-head group, split) on the
// pool, then the split merge. `rows_for(b)` returns the Rows of sequence b (PagedRows, DenseRows).
template <class RowsFor>
void run_attention(const AttentionPlan& plan, const Buffers& buf, ThreadPool& pool,
                   AttentionScratch& scratch, const RowsFor& rows_for) {
  struct Job {
    const AttentionPlan* plan;
    const Buffers* buf;
    float* workers;
    float* partials;
    const RowsFor* rows_for;
  };
  Job job{&plan, &buf, scratch.workers.as<float>(), scratch.partials.as<float>(), &rows_for};
  pool.run(
      attention_tasks(plan),
      [](void* ctx, int64_t index, int worker) {
        const Job& j = *static_cast<const Job*>(ctx);
        const TaskIndex t = task_index(*j.plan, index);
        attend(*j.plan, (*j.rows_for)(t.b), *j.buf, t.b, t.kvh0, t.split,
               j.workers + worker * j.plan->worker_floats, j.partials);
      },
      &job);
  if (plan.splits > 1) combine_splits(plan, buf, pool, scratch);
}

}  // namespace cpu
}  // namespace kvmicro
