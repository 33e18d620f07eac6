// gather on the CPU: copy each sequence's blocks, whole and in table order, from the pool into
// dense K/V [B, Hkv, max_blocks * block_size, D]. Bits are moved, never converted. Only the blocks
// covering ctx[b] are copied; the rest of the dense tensor was zeroed once at prepare and no run
// writes it, so it stays zero.
#include <algorithm>
#include <cstring>

#include "common/layout.h"
#include "common/paged_kv.h"
#include "cpu.h"

namespace kvmicro {
namespace cpu {

namespace {

struct Job {
  const OpParams* p;
  const Buffers* buf;
  int parts;  // block ranges per (sequence, kv head)
};

void copy_row(const char* src, int64_t stride_bytes, int64_t D, int64_t itemsize, char* dst) {
  if (itemsize == 4) {
    for (int64_t d = 0; d < D; ++d) std::memcpy(dst + 4 * d, src + d * stride_bytes, 4);
  } else {
    for (int64_t d = 0; d < D; ++d) std::memcpy(dst + 2 * d, src + d * stride_bytes, 2);
  }
}

void task(void* ctx, int64_t index, int) {
  const Job& job = *static_cast<const Job*>(ctx);
  const OpParams& p = *job.p;
  const PoolView& view = p.pool;
  const int64_t part = index % job.parts, bh = index / job.parts;
  const int b = (int)(bh / view.kv_heads), kvh = (int)(bh % view.kv_heads);
  const int64_t isz = dtype_size(p.dtype), D = view.head_dim, bs = view.block_size;
  const PagedKV kv = make_paged_kv(view, job.buf->table, job.buf->ctx, p.batch, p.max_blocks);
  const int64_t blocks = (kv.seq_len(b) + bs - 1) / bs;
  const int64_t first = blocks * part / job.parts, last = blocks * (part + 1) / job.parts;
  const int64_t dense_head = (bh * p.max_ctx_pad) * D * isz;
  const char* k_pool = static_cast<const char*>(job.buf->k_pool);
  const char* v_pool = static_cast<const char*>(job.buf->v_pool);
  char* k_dense = static_cast<char*>(job.buf->k_dense) + dense_head;
  char* v_dense = static_cast<char*>(job.buf->v_dense) + dense_head;
  for (int64_t lb = first; lb < last; ++lb) {
    for (int64_t s = 0; s < bs; ++s) {
      const int64_t t = lb * bs + s;  // whole blocks: table entries validated inside the pool
      const int64_t src = kv.row_offset(b, t, kvh) * isz;
      const int64_t dst = t * D * isz;
      if (view.d_contiguous()) {
        std::memcpy(k_dense + dst, k_pool + src, (size_t)(D * isz));
        std::memcpy(v_dense + dst, v_pool + src, (size_t)(D * isz));
      } else {
        copy_row(k_pool + src, view.stride_d * isz, D, isz, k_dense + dst);
        copy_row(v_pool + src, view.stride_d * isz, D, isz, v_dense + dst);
      }
    }
  }
}

}  // namespace

void gather(const OpParams& p, const Buffers& buf, ThreadPool& pool) {
  // (sequence, kv head) tasks, each split into block ranges when there are too few of them to
  // keep every thread busy.
  const int64_t base = (int64_t)p.batch * p.pool.kv_heads;
  const int64_t want = 4LL * pool.size();
  const int64_t parts = pool.size() > 1 && base < want
                            ? std::min<int64_t>((want + base - 1) / base, p.max_blocks)
                            : 1;
  Job job{&p, &buf, (int)parts};
  pool.run(base * parts, &task, &job);
}

}  // namespace cpu
}  // namespace kvmicro
