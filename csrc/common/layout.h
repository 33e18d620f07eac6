// The one place that owns pool layout and page math, shared by the CPU, CUDA and Metal code.
//
// A pool stores logical axes N (physical block), S (slot in block), H (kv head), D (head dim) in
// the order its layout string gives, outermost first ("NSHD" = pool[n][s][h][d]). PoolView holds
// the four element strides parsed once from that string, and every address a kernel forms goes
// through it; no kernel multiplies strides inline. Mirrored in Python by kvmicro.workload.Layout
// (tests/test_layout.py proves the two agree on all 24 permutations).
//
// The same text compiles as C++17, CUDA and Metal Shading Language (the MSL shim of tests/msl_shim
// takes the MSL branch too: it defines __METAL_VERSION__). MSL has no <stdint.h> (metal_stdlib
// provides the fixed-width types), needs an address space on every pointer (KV_DEVICE) and has no
// use for the layout-string parser, which only host code calls.
#pragma once

#if !defined(__METAL_VERSION__)
#include <stdint.h>
#endif

#if defined(__CUDACC__)
#define KV_HD __host__ __device__ __forceinline__
#else
#define KV_HD inline
#endif

// The address space of pointers into device buffers: `device` in MSL, nothing in C++ and CUDA.
#if defined(__METAL_VERSION__)
#define KV_DEVICE device
#else
#define KV_DEVICE
#endif

namespace kvmicro {

// Logical axis ids, in the order the Python side names them.
enum Axis : int { kAxisN = 0, kAxisS = 1, kAxisH = 2, kAxisD = 3 };

struct PoolView {
  int64_t stride_n;  // elements between physical blocks
  int64_t stride_s;  // elements between slots of one block
  int64_t stride_h;  // elements between kv heads
  int64_t stride_d;  // elements between head-dim entries (1 when D is innermost)
  int32_t num_blocks;
  int32_t block_size;
  int32_t kv_heads;
  int32_t head_dim;

  KV_HD int64_t elem_offset(int64_t n, int64_t s, int64_t h, int64_t d) const {
    return n * stride_n + s * stride_s + h * stride_h + d * stride_d;
  }
  // Offset of element d == 0 of (block n, slot s, head h): the start of one K or V row.
  KV_HD int64_t row_offset(int64_t n, int64_t s, int64_t h) const {
    return n * stride_n + s * stride_s + h * stride_h;
  }
  KV_HD bool d_contiguous() const { return stride_d == 1; }
  KV_HD int64_t num_elements() const {
    return (int64_t)num_blocks * block_size * kv_heads * head_dim;
  }
};

// Where logical token `t` of a sequence lives: physical block and slot.
struct TokenLocation {
  int32_t block;
  int32_t slot;
};

// Page math for one sequence: its row of the block table (width max_blocks).
KV_HD TokenLocation logical_to_physical(const KV_DEVICE int32_t* table_row, int32_t block_size,
                                        int64_t t) {
  TokenLocation loc;
  loc.block = table_row[t / block_size];
  loc.slot = (int32_t)(t % block_size);
  return loc;
}

// Like logical_to_physical, but never reads past the row or returns a block outside the pool:
// out-of-range gives block -1. Used where a kernel could otherwise trust unvalidated input.
KV_HD TokenLocation checked_logical_to_physical(const KV_DEVICE int32_t* table_row,
                                                int32_t max_blocks, int32_t block_size,
                                                int32_t num_blocks, int64_t t) {
  TokenLocation loc;
  int64_t logical_block = t / block_size;
  loc.slot = (int32_t)(t % block_size);
  loc.block = -1;
  if (t >= 0 && logical_block < max_blocks) {
    int32_t b = table_row[logical_block];
    if (b >= 0 && b < num_blocks) loc.block = b;
  }
  return loc;
}

#if !defined(__METAL_VERSION__)
// Parse a layout string into strides. Returns false (and leaves `view` untouched) unless `layout`
// is exactly a permutation of the letters N, S, H, D.
inline bool make_pool_view(const char* layout, int32_t num_blocks, int32_t block_size,
                           int32_t kv_heads, int32_t head_dim, PoolView* view) {
  const char letters[4] = {'N', 'S', 'H', 'D'};
  int64_t sizes[4] = {num_blocks, block_size, kv_heads, head_dim};
  int axis_at[4];
  bool seen[4] = {false, false, false, false};
  for (int i = 0; i < 4; ++i) {
    if (layout[i] == '\0') return false;
    int axis = -1;
    for (int a = 0; a < 4; ++a)
      if (layout[i] == letters[a]) axis = a;
    if (axis < 0 || seen[axis]) return false;
    seen[axis] = true;
    axis_at[i] = axis;
  }
  if (layout[4] != '\0') return false;
  int64_t strides[4];
  int64_t step = 1;
  for (int i = 3; i >= 0; --i) {
    strides[axis_at[i]] = step;
    step *= sizes[axis_at[i]];
  }
  view->stride_n = strides[kAxisN];
  view->stride_s = strides[kAxisS];
  view->stride_h = strides[kAxisH];
  view->stride_d = strides[kAxisD];
  view->num_blocks = num_blocks;
  view->block_size = block_size;
  view->kv_heads = kv_heads;
  view->head_dim = head_dim;
  return true;
}
#endif  // !__METAL_VERSION__

}  // namespace kvmicro
