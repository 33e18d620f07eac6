// Parameters shared by host and kernels of every backend (C++, CUDA; Metal mirrors it field by
// field). One struct per launch, filled and validated once when an op is prepared.
#pragma once

#include "layout.h"

namespace kvmicro {

enum class DType : int32_t { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

enum class OpKind : int32_t {
  kSdpaContiguous = 0,  // attention over dense K/V [B, Hkv, T, D]
  kGather = 1,          // pool -> dense K/V
  kGatherSdpa = 2,      // gather, then attention over the dense copy
  kPagedSdpa = 3,       // attention reading the pool through the block table
  kAppend = 4,          // write token ctx[b] of each sequence into the pool
};

// Buffer slots, the same on every backend (Metal binds by these indices).
enum BufferIndex : int32_t {
  kBufQ = 0,        // [B, Hq, q_len, D]
  kBufKPool = 1,    // pool in the case's layout
  kBufVPool = 2,
  kBufTable = 3,    // int32 [B, max_blocks], -1 padded
  kBufCtx = 4,      // int32 [B]
  kBufKDense = 5,   // [B, Hkv, max_ctx_pad, D]
  kBufVDense = 6,
  kBufKNew = 7,     // [B, Hkv, D]
  kBufVNew = 8,
  kBufOut = 9,      // [B, Hq, q_len, D]
  kBufCount = 10,
  // Slots past kBufCount are the Metal kernels' own (metal/kernel_abi.h, docs/metal.md): the
  // params structs, passed as small constant buffers (setBytes), and split-context scratch.
  kBufParams = 10,         // constant OpParams
  kBufPartition = 11,      // constant PartitionParams (attention and combine kernels)
  kBufPartialOut = 12,     // float [B, Hq, partitions, D]: each partition's normalised output
  kBufPartialMaxSum = 13,  // float [B, Hq, partitions, 2]: its (max logit * log2(e), sum of exp2)
  kBufKernelSlotCount = 14,
};

struct OpParams {
  PoolView pool;        // strides of the K and V pools (both share one layout and shape)
  int32_t batch;        // sequences
  int32_t q_heads;      // query heads; q head h reads kv head h / group
  int32_t group;        // q_heads / kv_heads (GQA ratio)
  int32_t q_len;        // queries per sequence (1 = decode)
  int32_t max_blocks;   // width of the block table
  int32_t max_ctx_pad;  // T of the dense tensors: max_blocks * block_size
  int32_t max_ctx;      // longest context in the batch
  float scale;          // softmax scale, 1/sqrt(head_dim) unless given
  int32_t dtype;        // DType of q, pools, dense tensors and output
};

// How split-context attention cuts each sequence: partition p of sequence b covers tokens
// [p * partition_tokens, min(ctx[b], (p + 1) * partition_tokens)); partitions that start at or past
// ctx[b] do nothing and are never read. partitions == 1 writes the output directly.
struct PartitionParams {
  int32_t partition_tokens;  // tokens per partition (>= 1)
  int32_t partitions;        // per sequence, for the longest: ceil(max_ctx / partition_tokens)
};

// Host and kernels must agree on these sizes byte for byte (MSL lays out structs as C++ does).
static_assert(sizeof(PoolView) == 48, "PoolView layout changed: update the Metal host and docs");
static_assert(sizeof(OpParams) == 88, "OpParams layout changed: update the Metal host and docs");
static_assert(sizeof(PartitionParams) == 8, "PartitionParams layout changed");

}  // namespace kvmicro
