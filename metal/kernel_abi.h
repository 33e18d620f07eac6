// What the Metal host (csrc/metal/*.mm) and the .metal kernels agree on, in one header that
// compiles as MSL, as C++17 (host) and under the MSL shim (tests/msl_shim): threadgroup shapes,
// threadgroup memory sizes, the partition rule and the instantiation macro. docs/metal.md
// describes every kernel; the buffer slots are csrc/common/params.h's BufferIndex.
//
// Kernel names ([[host_name]]) are `<op>_<dtype>[_d<head_dim>][_strided]`, dtype one of f16, f32,
// bf16 (bf16 only where __METAL_VERSION__ >= 310). The instantiation list at the bottom of each
// .metal file is the support matrix.
#pragma once

#include "../csrc/common/paged_kv.h"
#include "../csrc/common/params.h"

// A program-scope (or static member) constant: MSL puts those in the constant address space.
#if defined(__METAL_VERSION__)
#define KV_CONST constant constexpr
#else
#define KV_CONST constexpr
#endif

namespace kvmicro {
namespace mtl {

// Attention (paged_sdpa_*, sdpa_contiguous_*): one threadgroup of kAttnSimdgroups simdgroups per
// (partition, kv head x query tile, sequence). A query tile is up to kMaxQueryTile query heads of
// one kv head's GQA group; groups of <= 8 heads are one tile, so each K/V byte is read once.
KV_CONST int kSimdWidth = 32;
KV_CONST int kAttnSimdgroups = 4;
KV_CONST int kAttnThreads = kSimdWidth * kAttnSimdgroups;  // threads per threadgroup
KV_CONST int kMaxQueryTile = 8;

KV_HD int query_tiles(int group) { return (group + kMaxQueryTile - 1) / kMaxQueryTile; }

// Threadgroup memory of an attention threadgroup, [[threadgroup(0)]]: per simdgroup a running
// (max, sum) for each query of the tile, plus one float row of D for the final merge. Fixed by
// head_dim, independent of the context length; a multiple of 16 bytes as Metal requires.
KV_HD int attn_threadgroup_bytes(int head_dim) {
  const int floats = kAttnSimdgroups * kMaxQueryTile * 2 + kAttnSimdgroups * head_dim;
  return (floats * 4 + 15) / 16 * 16;
}

// The partition rule: split the context only when the grid would otherwise leave the GPU idle.
// With fewer than 8 threadgroups per GPU core (sequences x kv heads x query tiles), cut each
// sequence into fixed partitions of kPartitionTokens and merge them in a second pass (combine_*);
// otherwise one partition of max_ctx tokens, and the attention kernel writes the output itself.
KV_CONST int kPartitionTokens = 512;
KV_CONST int kGroupsPerCore = 8;

KV_HD PartitionParams choose_partitions(int batch, int kv_heads, int group, int max_ctx,
                                        int gpu_cores) {
  PartitionParams part;
  const int groups = batch * kv_heads * query_tiles(group);
  if (groups < kGroupsPerCore * gpu_cores && max_ctx > kPartitionTokens) {
    part.partition_tokens = kPartitionTokens;
    part.partitions = (max_ctx + kPartitionTokens - 1) / kPartitionTokens;
  } else {
    part.partition_tokens = max_ctx;
    part.partitions = 1;
  }
  return part;
}

// combine_*: one threadgroup of kCombineThreads per (query head, sequence); no threadgroup memory.
KV_CONST int kCombineThreads = 128;
// gather_*: one threadgroup of kCopyThreads per (logical block, kv head, sequence).
// append_*: one threadgroup of kCopyThreads per (sequence, kv head).
KV_CONST int kCopyThreads = 64;

}  // namespace mtl
}  // namespace kvmicro

// One instantiation of kernel template `func` under the name the host asks for. On Metal an
// explicit instantiation carrying [[host_name]]; under the shim a registration the launcher finds
// by that name (tests/msl_shim/msl_shim.h).
#if defined(KVMICRO_MSL_SHIM)
#define KV_INSTANTIATE(name, func, ...) KVMICRO_SHIM_REGISTER(name, func, __VA_ARGS__)
#elif defined(__METAL_VERSION__)
#define KV_INSTANTIATE(name, func, ...) \
  template [[host_name(name)]] [[kernel]] decltype(func<__VA_ARGS__>) func<__VA_ARGS__>;
#endif

// bfloat exists from MSL 3.1 (macOS 14); older compilers get no bf16 instantiations and the host
// raises Unsupported for bfloat16.
#if defined(__METAL_VERSION__) && __METAL_VERSION__ >= 310
#define KV_HAS_BFLOAT 1
#else
#define KV_HAS_BFLOAT 0
#endif
