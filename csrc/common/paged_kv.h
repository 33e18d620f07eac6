// The paged KV cache as a kernel sees it: a pool (layout.h's PoolView), the block table and the
// context lengths. The one place that turns (sequence, logical token, kv head, dim) into an
// element offset, shared by the CPU, CUDA and Metal kernels; no kernel walks the table itself.
//
//   PagedKV kv = make_paged_kv(params.pool, table, ctx, params.batch, params.max_blocks);
//   int64_t at = kv.elem_offset(b, t, h, d);   // element offset into the K pool and the V pool
//
// Both pools share one layout and shape, so one offset serves K and V. All offset arithmetic is
// 64-bit: a pool of 2^31 elements or more (a few GB) must not wrap.
//
// Trust: the unchecked methods assume inputs validated on the host (validate.h: every table entry
// a sequence uses lies in [0, num_blocks), ctx[b] <= max_blocks * block_size). The checked_*
// methods assume nothing: they never read past the table row (or the table) and return -1 for any
// index outside the pool, for kernels that write (append) or that must survive bad input.
//
// Compiles as C++17, CUDA (methods are __host__ __device__) and MSL. In MSL the table and ctx
// pointers are `device` (KV_DEVICE), and a PagedKV must live in the thread address space (a local
// variable): build it in the kernel from the params, do not call its methods on a `constant`
// object.
#pragma once

#include "layout.h"

namespace kvmicro {

struct PagedKV {
  PoolView pool;                   // strides and sizes of the K and V pools
  const KV_DEVICE int32_t* table;  // [batch, max_blocks] physical block ids, -1 padded
  const KV_DEVICE int32_t* ctx;    // [batch] tokens each sequence holds
  int32_t batch;
  int32_t max_blocks;  // width of a table row

  // Tokens sequence b holds (the keys its attention sees; append writes token seq_len(b)).
  KV_HD int32_t seq_len(int64_t b) const { return ctx[b]; }

  // Row b of the block table.
  KV_HD const KV_DEVICE int32_t* table_row(int64_t b) const { return table + b * max_blocks; }

  // Physical block holding logical block `logical_block` of sequence b.
  KV_HD int32_t physical_block(int64_t b, int64_t logical_block) const {
    return table[b * max_blocks + logical_block];
  }

  // Element offset of d == 0 of (sequence b, logical token t, kv head h): the start of a K/V row.
  KV_HD int64_t row_offset(int64_t b, int64_t t, int64_t h) const {
    const int64_t bs = pool.block_size;
    return pool.row_offset(physical_block(b, t / bs), t % bs, h);
  }

  // Element offset of (sequence b, logical token t, kv head h, dim d).
  KV_HD int64_t elem_offset(int64_t b, int64_t t, int64_t h, int64_t d) const {
    return row_offset(b, t, h) + d * pool.stride_d;
  }

  // row_offset, or -1 unless b < batch, t < max_blocks * block_size, 0 <= h < kv_heads and the
  // table entry lies inside the pool. Reads at most one table entry, and only inside the table.
  KV_HD int64_t checked_row_offset(int64_t b, int64_t t, int64_t h) const {
    if (b < 0 || b >= batch || t < 0 || h < 0 || h >= pool.kv_heads) return -1;
    const int64_t bs = pool.block_size;
    const int64_t logical_block = t / bs;
    if (logical_block >= max_blocks) return -1;
    const int32_t block = physical_block(b, logical_block);
    if (block < 0 || block >= pool.num_blocks) return -1;
    return pool.row_offset(block, t % bs, h);
  }

  // elem_offset, or -1 when checked_row_offset is -1 or d lies outside [0, head_dim).
  KV_HD int64_t checked_elem_offset(int64_t b, int64_t t, int64_t h, int64_t d) const {
    if (d < 0 || d >= pool.head_dim) return -1;
    const int64_t row = checked_row_offset(b, t, h);
    return row < 0 ? row : row + d * pool.stride_d;
  }
};

KV_HD PagedKV make_paged_kv(PoolView pool, const KV_DEVICE int32_t* table,
                            const KV_DEVICE int32_t* ctx, int32_t batch, int32_t max_blocks) {
  PagedKV kv;
  kv.pool = pool;
  kv.table = table;
  kv.ctx = ctx;
  kv.batch = batch;
  kv.max_blocks = max_blocks;
  return kv;
}

}  // namespace kvmicro
