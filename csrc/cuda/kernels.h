// The host-facing side of the CUDA kernels: argument structs shared by host and kernels, and one
// plan/launch pair per op family (paged_sdpa.cu, sdpa_contiguous.cu, gather.cu, append.cu).
//
// Plan once, run many: plan_*() validates what the kernels support, picks the instantiation and
// the grid (split count from the SM count and occupancy) and never runs on the timed path;
// launch_*() only enqueues kernels on a stream and checks the launch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "common/layout.h"
#include "common/paged_kv.h"
#include "common/params.h"
#include "common/variant.h"

namespace kvmicro {
namespace cuda {

#if defined(__CUDACC__)
#define KV_DEV __device__ __forceinline__
#else
#define KV_DEV inline
#endif

// What the plans need to know of the device, read once per op at prepare.
struct DeviceProps {
  int index = 0;
  int sm_count = 0;
  int cc_major = 0;
  int cc_minor = 0;
  int l2_bytes = 0;
  int smem_per_sm = 0;         // shared memory of one SM, bytes
  int smem_per_block_max = 0;  // the most one block may opt in to, bytes
};

// Dense K/V [B, Hkv, T, D], D innermost: the layout of sdpa_contiguous inputs and of what gather
// produces.
struct DenseView {
  int32_t kv_heads;
  int32_t t_pad;  // T: max_ctx_pad
  int32_t head_dim;
  KV_DEV int64_t row_offset(int64_t b, int64_t h, int64_t t) const {
    return ((b * kv_heads + h) * t_pad + t) * head_dim;
  }
};

// ---- attention (sdpa_contiguous, paged_sdpa, and the attention half of gather_sdpa) ------------

// Where an attention kernel's K/V rows come from. row_offset() is the element offset of row
// (b, h, t) in the k and v buffers; element d of that row sits stride_d() further per step.
struct DenseSrc {
  static constexpr bool kStrided = false;  // always D-innermost
  const void* k;
  const void* v;
  DenseView view;
  KV_DEV int64_t row_offset(int b, int h, int t) const { return view.row_offset(b, h, t); }
  KV_DEV int64_t stride_d() const { return 1; }
};

struct PagedSrc {
  static constexpr bool kStrided = true;  // any layout; D-innermost ones take the 16-byte path
  const void* k;
  const void* v;
  PagedKV kv;  // pool + block table + ctx (common/paged_kv.h); ids validated before prepare
  KV_DEV int64_t row_offset(int b, int h, int t) const { return kv.row_offset(b, t, h); }
  KV_DEV int64_t stride_d() const { return kv.pool.stride_d; }
};

constexpr float kLog2e = 1.4426950408889634f;

// schedule=steal: int32 slots from one claim counter (AttnArgs::arrivals) to the next, a 128-byte
// line each (attention_async.cuh).
constexpr int kClaimCounterStride = 32;

struct AttnArgs {
  const void* q;     // [B, Hq, 1, D]
  void* out;         // [B, Hq, 1, D]
  float* part_o;     // [B, Hq, splits, D] unnormalised partial outputs (only when splits > 1)
  float* part_ml;    // [B, Hq, splits, 2] partial (max in the log2 domain, sum of exp2)
  // One counter per (batch entry, kv head x head tile), [B, Hkv * head_tiles], zero between
  // launches; null unless combine=last (arrivals; the last block to arrive resets its own) or
  // schedule=steal (tiles claimed past the fixed ones, kClaimCounterStride apart; the combine
  // kernel resets them).
  int32_t* arrivals;
  const int32_t* ctx;  // [B]
  int32_t q_heads;
  int32_t group;       // q heads per kv head
  int32_t head_tiles;  // thread blocks per GQA group (1 unless group > 8)
  int32_t splits;      // thread blocks along the context
  int32_t chunk;       // tokens per split (a multiple of the kernel's tile)
  float scale_log2;    // softmax scale * log2(e): scores live in the log2 domain (exp2f)
};

struct AttnPlan {
  const void* split = nullptr;    // __global__ void(AttnArgs, Src), type-erased
  const void* combine = nullptr;  // __global__ void(AttnArgs, int head_dim)
  dim3 grid;
  int splits = 1;
  int chunk = 0;
  int tile = 0;          // tokens one pass of the thread block covers
  int heads_per_block = 1;
  int head_tiles = 1;
  int blocks_per_sm = 0;  // occupancy of the split kernel
  bool strided = false;   // generic (non D-innermost) path
  bool tensor_cores = false;  // mma kernels (16-bit dtypes, D innermost, head_dim 64/96/128)
  int stages = 0;             // tensor cores: pipeline depth (cp.async or bulk); 0 = register loads
  bool bulk = false;          // tensor cores: the bulk-copy pipeline (kernel=bulk, sm_90+)
  int prefetch = 0;           // register loads: L2 prefetch hint in bytes (0, 128, 256)
  int smem_bytes = 0;         // dynamic shared memory of the split kernel
  bool spread = false;        // smem_bytes padded so that blocks_per_sm is one even wave
  bool pdl = false;       // combine launched with programmatic dependent launch (sm_90+)
  // the split kernel launched as a programmatic dependent of the stream's previous kernel (sm_90+),
  // and whether the combine kernel allows the next one early (resolved: never kAuto)
  PdlEntry pdl_entry = PdlEntry::kOff;
  // separate: a second kernel merges the splits; last: the last split block does (one launch,
  // AttnArgs::arrivals); cluster: the splits are one thread block cluster (one launch, sm_90+)
  AttnCombine combine_mode = AttnCombine::kSeparate;
  // schedule=steal: the split kernel claims tiles from AttnArgs::arrivals past its warps' first
  // ones (cp.async kernel, combine=separate, splits > 1), and the combine kernel resets them
  bool steal = false;
  int combine_blocks = 0;
  int head_dim = 0;
};

// `var`: the case's variant options (common/variant.h, docs/cuda.md): kernel, splits, min_chunk,
// blocks_per_sm, stages, l2_prefetch, pdl, pdl_entry, spread, combine,
// schedule. The plans read no environment.
AttnPlan plan_paged_sdpa(const char* op, const OpParams& p, const DeviceProps& dev,
                         const Variant& var);
void launch_paged_sdpa(const AttnPlan& plan, const AttnArgs& args, const PagedSrc& src,
                       cudaStream_t stream);
AttnPlan plan_sdpa_contiguous(const char* op, const OpParams& p, const DeviceProps& dev,
                              const Variant& var);
void launch_sdpa_contiguous(const AttnPlan& plan, const AttnArgs& args, const DenseSrc& src,
                            cudaStream_t stream);

// ---- gather (pool -> dense) -------------------------------------------------------------------

struct GatherArgs {
  const void* k_pool;
  const void* v_pool;
  void* k_dense;
  void* v_dense;
  PagedKV kv;  // pool + block table + ctx (common/paged_kv.h); ids validated before prepare
  DenseView dense;
  int32_t row_vecs;  // 16-byte vectors per row (fast path)
};

struct GatherPlan {
  const void* kernel = nullptr;  // __global__ void(GatherArgs)
  dim3 grid;
  int threads = 256;
  bool strided = false;
  int row_vecs = 0;
};

GatherPlan plan_gather(const char* op, const OpParams& p, const DeviceProps& dev);
void launch_gather(const GatherPlan& plan, const GatherArgs& args, cudaStream_t stream);

// ---- append (one token per sequence into the pool) --------------------------------------------

struct AppendArgs {
  void* k_pool;
  void* v_pool;
  const void* k_new;  // [B, Hkv, D]
  const void* v_new;
  PagedKV kv;  // pool + block table + ctx (common/paged_kv.h); writes use its checked offsets
  int32_t row_units;  // copy units per row: 16-byte vectors (fast) or elements (strided)
};

struct AppendPlan {
  const void* kernel = nullptr;  // __global__ void(AppendArgs)
  dim3 grid;
  int threads = 128;
  bool strided = false;
  int row_units = 0;
};

AppendPlan plan_append(const char* op, const OpParams& p, const DeviceProps& dev);
void launch_append(const AppendPlan& plan, const AppendArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace kvmicro
