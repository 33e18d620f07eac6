// Host side of decode attention: kernel selection and split planning (plan_attention) and the
// launch of both passes (launch_attention; one pass under combine=last). Instantiated per source
// in paged_sdpa.cu and sdpa_contiguous.cu (combine=last: paged_sdpa_last.cu,
// sdpa_contiguous_last.cu) through the pickers below (pick_split*, pick_mma*, pick_async*): they are
// the support matrix (dtype x head_dim x heads per block x 16-byte/strided, and the tensor-core
// variants), checked against the capability table (common/capabilities.h) by
// tests/test_capabilities.py through cuda_instantiations().
#pragma once

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include "common/capabilities.h"
#include "common/validate.h"
#include "cuda/attention_async.cuh"
#include "cuda/attention_bulk.cuh"
#include "cuda/attention_combine.cuh"
#include "cuda/attention_mma.cuh"
#include "cuda/attention_simt.cuh"
#include "cuda/cuda_host.h"

namespace kvmicro {
namespace cuda {

// ---- host side: kernel selection and split planning ------------------------------------------

template <class Src>
using SplitFn = void (*)(AttnArgs, Src);
using CombineFn = void (*)(AttnArgs, int);

// The combine kernel for pdl_entry: only under early does it allow the next op's split kernel to
// be scheduled before its blocks exit (so the default combine is unchanged). kSteal
// (schedule=steal, 16-bit dtypes only): its own instantiation, which also zeroes the claim
// counters.
template <typename T, bool kSteal = false>
CombineFn combine_kernel(PdlEntry entry) {
  return entry == PdlEntry::kEarly ? &attention_combine_kernel<T, true, kSteal>
                                   : &attention_combine_kernel<T, false, kSteal>;
}

// A kernel's dynamic shared-memory limit is process-wide state that every live plan of it shares:
// raise it to what this plan launches with, never lower it below what another plan launches with
// (spread pads one plan of a kernel past another's need; lowering the limit made the padded
// plan's launch fail with cudaErrorInvalidValue on the H200).
inline void allow_dynamic_smem(const void* fn, int bytes) {
  cudaFuncAttributes attributes;
  KV_CUDA_CHECK(cudaFuncGetAttributes(&attributes, fn));
  if (attributes.maxDynamicSharedSizeBytes < bytes)
    KV_CUDA_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

inline CombineFn combine_for(DType dt, PdlEntry entry, bool steal) {
  switch (dt) {
    case DType::kFloat16:
      return steal ? combine_kernel<__half, true>(entry) : combine_kernel<__half>(entry);
    case DType::kBFloat16:
      return steal ? combine_kernel<__nv_bfloat16, true>(entry)
                   : combine_kernel<__nv_bfloat16>(entry);
    default: return combine_kernel<float>(entry);  // no tensor cores, so never schedule=steal
  }
}

// Thread blocks of the split grid.
inline int64_t split_blocks(const AttnPlan& plan) {
  return (int64_t)plan.grid.x * plan.grid.y * plan.grid.z;
}

// pdl_entry=auto: early where being scheduled beside the previous combine cannot
// unbalance the split kernel's one wave: its grid has no more blocks than the GPU has SMs, or it
// is a pipelined kernel (cp.async or bulk), whose shared memory is then padded to one even wave
// (spread_blocks; its 64-80 KB of stages already take the shared-memory carveout, so the padding
// costs it nothing).
// Elsewhere (the register-load kernel at two or more blocks per SM, and the one-launch combine
// modes) off: early measured slower there on the H200 (docs/cuda.md, "The split kernel under PDL
// after the previous kernel"). The default; where it loses (hot, at batches whose K/V just fits
// the L2, up to 11% on the H200) and wins (cold there, -2 to -3%): "pdl_entry=auto as the default".
inline PdlEntry auto_pdl_entry(const AttnPlan& plan, const DeviceProps& dev) {
  if (plan.combine_mode != AttnCombine::kSeparate) return PdlEntry::kOff;
  return split_blocks(plan) <= dev.sm_count || plan.stages > 0 ? PdlEntry::kEarly : PdlEntry::kOff;
}

// Every picker takes C, the combine mode (write_block_result): separate and last are instantiated
// for every shape, cluster for the tensor-core kernels only (pick_split_kernel).
template <class Src, typename T, int D, int GT, AttnCombine C>
SplitFn<Src> pick_split_fast(bool strided) {
  if constexpr (Src::kStrided) {
    if (strided) return &attention_split_kernel<T, D, GT, false, Src, C>;
  }
  return &attention_split_kernel<T, D, GT, true, Src, C>;
}

template <class Src, typename T, int D, AttnCombine C>
SplitFn<Src> pick_split_gt(int gt, bool strided) {
  switch (gt) {
    case 1: return pick_split_fast<Src, T, D, 1, C>(strided);
    case 4: return pick_split_fast<Src, T, D, 4, C>(strided);
    default: return pick_split_fast<Src, T, D, 8, C>(strided);
  }
}

template <class Src, typename T, AttnCombine C>
SplitFn<Src> pick_split_d(int d, int gt, bool strided) {
  switch (d) {
    case 64: return pick_split_gt<Src, T, 64, C>(gt, strided);
    case 80: return pick_split_gt<Src, T, 80, C>(gt, strided);
    case 96: return pick_split_gt<Src, T, 96, C>(gt, strided);
    case 128: return pick_split_gt<Src, T, 128, C>(gt, strided);
    case 256: return pick_split_gt<Src, T, 256, C>(gt, strided);
    default: return nullptr;
  }
}

// Split count for the SIMT kernel: the fewest splits that minimise (waves of thread blocks) x
// (tokens per split), plus a charge for the combine pass, so a lone long sequence spreads over
// every SM while a big batch stays at one split per block slot. That kernel is latency-bound per
// block and wants every slot filled.
inline int choose_splits(int max_ctx, int64_t blocks_per_split, int64_t slots, int tile,
                         int min_chunk) {
  const int64_t combine_cost = tile;  // the combine launch, in tokens of one split's work
  const int s_max = std::max(1, std::min(kMaxSplits, ceil_div(max_ctx, std::max(tile, min_chunk))));
  int best = 1;
  int64_t best_cost = INT64_MAX;
  for (int s = 1; s <= s_max; ++s) {
    const int64_t chunk = (int64_t)ceil_div(ceil_div(max_ctx, s), tile) * tile;
    const int s_eff = ceil_div(max_ctx, chunk);
    const int64_t waves = ceil_div(blocks_per_split * s_eff, std::max<int64_t>(slots, 1));
    const int64_t cost = waves * chunk + (s_eff > 1 ? combine_cost : 0);
    if (cost < best_cost) {
      best_cost = cost;
      best = s_eff;
    }
  }
  return best;
}

// Split count for the tensor-core kernels: about `per_sm` thread blocks per SM, in one wave, and
// no split shorter than min_chunk. Measured on the H100 (docs/cuda.md): 2 blocks/SM beat both
// fuller grids (2.6-3 waves of 3 blocks/SM cost 5-10% more at 4096/4, 32768/1 and 32768/4) and
// emptier ones; the per-block start (q, the first table lookups and loads with nothing in flight
// yet) and the merge at its end are what more, shorter splits pay for.
constexpr int kMmaBlocksPerSm = 2;
static_assert(Variant{}.blocks_per_sm == kMmaBlocksPerSm, "the option's default is the rule");
// L2 prefetch hint of the register-load kernel's K/V loads (load16_prefetch).
constexpr int kMmaPrefetch = 128;
static_assert(Variant{}.l2_prefetch == kMmaPrefetch, "the option's default is the measured best");
inline int splits_for_blocks(int max_ctx, int64_t blocks_per_split, int64_t target_blocks,
                             int tile, int min_chunk) {
  const int s_max = std::max(1, std::min(kMaxSplits, ceil_div(max_ctx, std::max(tile, min_chunk))));
  const int64_t s = target_blocks / std::max<int64_t>(blocks_per_split, 1);
  return (int)std::max<int64_t>(1, std::min<int64_t>(s, s_max));
}

template <class Src, typename T, int P, AttnCombine C>
SplitFn<Src> pick_mma_d(int d) {
  switch (d) {
    case 64: return &attention_split_mma_kernel<T, 64, P, Src, C>;
    case 96: return &attention_split_mma_kernel<T, 96, P, Src, C>;
    case 128: return &attention_split_mma_kernel<T, 128, P, Src, C>;
    default: return nullptr;
  }
}

template <class Src, typename T, AttnCombine C>
SplitFn<Src> pick_mma(int d, int prefetch) {
  return prefetch == 0 ? pick_mma_d<Src, T, 0, C>(d) : pick_mma_d<Src, T, 128, C>(d);
}

template <class Src, typename T, int S, AttnCombine C>
SplitFn<Src> pick_async_d(int d) {
  switch (d) {
    case 64: return &attention_split_async_kernel<T, 64, S, Src, C>;
    case 96: return &attention_split_async_kernel<T, 96, S, Src, C>;
    case 128: return &attention_split_async_kernel<T, 128, S, Src, C>;
    default: return nullptr;
  }
}

template <class Src, typename T, AttnCombine C>
SplitFn<Src> pick_async(int d, int stages, bool steal) {
  if constexpr (C == AttnCombine::kSeparate) {
    // schedule=steal: two stages only (the default; three never more than 0.4% faster on the
    // H200, docs/cuda.md), so its instantiations stay few
    if (steal) {
      if (stages != 2) return nullptr;
      switch (d) {
        case 64: return &attention_split_async_kernel<T, 64, 2, Src, C, true>;
        case 96: return &attention_split_async_kernel<T, 96, 2, Src, C, true>;
        case 128: return &attention_split_async_kernel<T, 128, 2, Src, C, true>;
        default: return nullptr;
      }
    }
  } else {
    if (steal) return nullptr;
  }
  return stages == 2 ? pick_async_d<Src, T, 2, C>(d) : pick_async_d<Src, T, 3, C>(d);
}

// kernel=bulk: combine=separate only (its one-launch forms were not worth their compile time:
// combine=last and cluster measured slower than separate on the cp.async kernel).
template <class Src, typename T, int S>
SplitFn<Src> pick_bulk_d(int d) {
  switch (d) {
    case 64: return &attention_split_bulk_kernel<T, 64, S, Src, AttnCombine::kSeparate>;
    case 96: return &attention_split_bulk_kernel<T, 96, S, Src, AttnCombine::kSeparate>;
    case 128: return &attention_split_bulk_kernel<T, 128, S, Src, AttnCombine::kSeparate>;
    default: return nullptr;
  }
}

template <class Src, typename T>
SplitFn<Src> pick_bulk(int d, int stages) {
  return stages == 2 ? pick_bulk_d<Src, T, 2>(d) : pick_bulk_d<Src, T, 3>(d);
}

// One split kernel by what plan_attention chose: family, dtype, head_dim, then the family's
// knob (SIMT: heads per block and path; mma: L2 prefetch; async and bulk: stages). Null where no
// kernel is instantiated. The combine=last and combine=cluster instantiations of the two sources are
// compiled in translation units of their own (paged_sdpa_last.cu, paged_sdpa_cluster.cu and their
// sdpa_contiguous twins), so the sets build in parallel; pick_split_last() and
// pick_split_cluster() are their entries.
enum class SplitFamily { kSimt, kMma, kAsync, kBulk };
struct SplitKey {
  SplitFamily family;
  DType dtype;
  int head_dim;
  int heads_per_block;  // SIMT
  bool strided;         // SIMT
  int prefetch;         // mma
  int stages;           // async, bulk
  bool steal = false;   // async: schedule=steal
};

template <class Src, AttnCombine C>
SplitFn<Src> pick_split_kernel(const SplitKey& k) {
  const int d = k.head_dim;
  switch (k.family) {
    case SplitFamily::kSimt:
      if constexpr (C == AttnCombine::kCluster) {
        return nullptr;  // tensor-core kernels only
      } else {
        switch (k.dtype) {
          case DType::kFloat16:
            return pick_split_d<Src, __half, C>(d, k.heads_per_block, k.strided);
          case DType::kBFloat16:
            return pick_split_d<Src, __nv_bfloat16, C>(d, k.heads_per_block, k.strided);
          case DType::kFloat32:
            return pick_split_d<Src, float, C>(d, k.heads_per_block, k.strided);
          default: return nullptr;
        }
      }
    case SplitFamily::kMma:
      if (k.dtype == DType::kFloat16) return pick_mma<Src, __half, C>(d, k.prefetch);
      if (k.dtype == DType::kBFloat16) return pick_mma<Src, __nv_bfloat16, C>(d, k.prefetch);
      return nullptr;
    case SplitFamily::kAsync:
      if (k.dtype == DType::kFloat16) return pick_async<Src, __half, C>(d, k.stages, k.steal);
      if (k.dtype == DType::kBFloat16)
        return pick_async<Src, __nv_bfloat16, C>(d, k.stages, k.steal);
      return nullptr;
    case SplitFamily::kBulk:
      if constexpr (C != AttnCombine::kSeparate) {
        return nullptr;
      } else {
        if (k.dtype == DType::kFloat16) return pick_bulk<Src, __half>(d, k.stages);
        if (k.dtype == DType::kBFloat16) return pick_bulk<Src, __nv_bfloat16>(d, k.stages);
        return nullptr;
      }
  }
  return nullptr;
}

// pick_split_kernel<Src, kLast>, compiled in paged_sdpa_last.cu / sdpa_contiguous_last.cu, and
// <Src, kCluster>, compiled in paged_sdpa_cluster.cu / sdpa_contiguous_cluster.cu.
SplitFn<PagedSrc> pick_split_last(const PagedSrc*, const SplitKey& k);
SplitFn<DenseSrc> pick_split_last(const DenseSrc*, const SplitKey& k);
SplitFn<PagedSrc> pick_split_cluster(const PagedSrc*, const SplitKey& k);
SplitFn<DenseSrc> pick_split_cluster(const DenseSrc*, const SplitKey& k);

template <class Src>
SplitFn<Src> pick_split(const SplitKey& k, AttnCombine combine) {
  switch (combine) {
    case AttnCombine::kLast: return pick_split_last(static_cast<const Src*>(nullptr), k);
    case AttnCombine::kCluster: return pick_split_cluster(static_cast<const Src*>(nullptr), k);
    default: return pick_split_kernel<Src, AttnCombine::kSeparate>(k);
  }
}

// combine=cluster: the most blocks a cluster may hold (sm_90: 8 portable, 16 with the
// non-portable opt-in, which the cluster kernels set at prepare).
constexpr int kMaxClusterBlocks = 16;

// Tensor-core kernel choice (docs/cuda.md): the cp.async pipeline pays off once every warp has
// tiles to overlap, from kAsyncMinTiles tiles per warp per split; below that the register-load
// kernel starts sooner. Two stages beat three (more blocks per SM fit).
constexpr int kAsyncMinTiles = 4;
constexpr int kAsyncStages = 2;
static_assert(Variant{}.stages == kAsyncStages, "the option's default is the measured best");

// combine=cluster's launch: the split grid with cluster dims (plan.splits, 1, 1). The returned
// config points at attr, which must outlive it.
// The split kernel's launch: a thread block cluster of the splits under combine=cluster, and a
// programmatic dependent of the stream's previous kernel under pdl_entry. `attr` holds the
// attributes the config points at, so it must outlive the launch.
inline cudaLaunchConfig_t split_launch(const AttnPlan& plan, cudaStream_t stream,
                                       cudaLaunchAttribute (&attr)[2]) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = plan.grid;
  cfg.blockDim = dim3(kAttnThreads);
  cfg.dynamicSmemBytes = (size_t)plan.smem_bytes;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 0;
  if (plan.combine_mode == AttnCombine::kCluster && plan.splits > 1) {
    cudaLaunchAttribute& c = attr[cfg.numAttrs++];
    c.id = cudaLaunchAttributeClusterDimension;
    c.val.clusterDim.x = (unsigned)plan.splits;
    c.val.clusterDim.y = 1;
    c.val.clusterDim.z = 1;
  }
  if (plan.pdl_entry != PdlEntry::kOff) {
    cudaLaunchAttribute& e = attr[cfg.numAttrs++];
    e.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    e.val.programmaticStreamSerializationAllowed = 1;
  }
  return cfg;
}

// spread=true: pad the split kernel's dynamic shared memory until at most ceil(blocks / SMs) of
// its blocks fit on one SM, so that the grid is one even wave wherever it is dispatched. A kernel
// of one wave takes as long as its most loaded SM, and blocks dispatched beside another kernel's
// resident blocks (pdl_entry=early: the previous op's combine) may otherwise be placed three to
// an SM on some and one on others. The padding leaves room for one combine block beside the
// wave, so that the combine still launches early under PDL. A block's footprint is its shared
// memory plus the 1 KB the runtime reserves per block; the occupancy query has the last word.
template <class Fn>
void spread_blocks(AttnPlan& plan, Fn split, const DeviceProps& dev) {
  constexpr int kReservedPerBlock = 1024;
  const auto fn = reinterpret_cast<const void*>(split);
  const int wave = (int)std::min<int64_t>(ceil_div(split_blocks(plan), (int64_t)dev.sm_count), 64);
  if (wave >= plan.blocks_per_sm) return;  // already no more slots than one even wave needs
  cudaFuncAttributes attributes;
  KV_CUDA_CHECK(cudaFuncGetAttributes(&attributes, fn));
  const int static_bytes = (int)attributes.sharedSizeBytes;
  int room = dev.smem_per_sm;
  if (plan.splits > 1 && plan.combine_mode == AttnCombine::kSeparate) {
    KV_CUDA_CHECK(cudaFuncGetAttributes(&attributes, plan.combine));
    room -= (int)attributes.sharedSizeBytes + kReservedPerBlock;
  }
  const int ceiling = dev.smem_per_block_max - static_bytes;
  int bytes = std::max(plan.smem_bytes,
                       std::min(ceiling, room / wave - kReservedPerBlock - static_bytes) / 128 * 128);
  int resident = 0;
  for (;;) {  // where no size leaves room for the combine block, the wave alone decides
    allow_dynamic_smem(fn, bytes);
    KV_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, fn, kAttnThreads, bytes));
    if (resident <= wave || bytes + 128 > ceiling) break;
    bytes += 128;
  }
  if (resident < 1) return;  // cannot happen below the opt-in ceiling; keep the plan as it was
  plan.smem_bytes = bytes;
  plan.blocks_per_sm = resident;
  plan.spread = true;
}

template <class Src>
AttnPlan plan_attention(const char* op, const OpParams& p, const DeviceProps& dev,
                        const Variant& var, bool strided) {
  const int D = p.pool.head_dim;
  if (!caps::cuda_attention_head_dim(D))
    throw UnsupportedError(op_message(op, "head_dim ", D, " is not supported by native:cuda "
                                      "(supported: ", caps::list_string(caps::kCudaAttentionHeadDims),
                                      ")"));
  if (p.q_len != 1)
    throw UnsupportedError(std::string("[") + op + "] native:cuda implements decode only (q_len 1, got " +
                           std::to_string(p.q_len) + ")");
  if (p.batch > 65535)
    throw UnsupportedError(std::string("[") + op + "] batch " + std::to_string(p.batch) +
                           " exceeds the 65535 a grid dimension holds");
  AttnPlan plan;
  plan.head_dim = D;
  plan.strided = strided;
  const int group = p.group;
  const DType dt = (DType)p.dtype;
  SplitFn<Src> split = nullptr;
  int esize = 2;
  // Tensor cores where the 16-byte fragment loads apply: 16-bit dtypes, D-innermost rows, head_dim
  // a multiple of 32 up to 128 (256 would need more registers than it saves); the SIMT kernel
  // serves the rest. Option kernel=simt forces the SIMT kernel (for comparison); kernel=mma or
  // async on a case they cannot run is refused, never silently replaced.
  const bool mma_fits = caps::tensor_core_dtype(p.dtype) && !strided &&
                        caps::cuda_tensor_core_head_dim(D) && dev.cc_major >= 8;
  const AttnKernel kernel = var.kernel;
  if (!mma_fits &&
      (kernel == AttnKernel::kMma || kernel == AttnKernel::kAsync || kernel == AttnKernel::kBulk))
    throw UnsupportedError(op_message(
        op, "option kernel=", attn_kernel_name(kernel), " needs tensor cores: float16/bfloat16, ",
        "D innermost, head_dim ", caps::list_string(caps::kCudaTensorCoreHeadDims),
        " and compute capability 8.0+; this case is ",
        dtype_name(p.dtype), ", ", strided ? "D not innermost" : "D innermost", ", head_dim ", D,
        ", sm_", dev.cc_major, dev.cc_minor));
  if (kernel == AttnKernel::kBulk && dev.cc_major < 9)
    throw UnsupportedError(op_message(op, "option kernel=bulk needs bulk asynchronous copies "
                                      "(compute capability 9.0+); this GPU is sm_",
                                      dev.cc_major, dev.cc_minor));
  if (kernel == AttnKernel::kBulk && var.combine != AttnCombine::kSeparate)
    throw UnsupportedError(op_message(op, "option kernel=bulk runs under combine=separate only, "
                                      "not combine=", attn_combine_name(var.combine)));
  plan.tensor_cores = mma_fits && kernel != AttnKernel::kSimt;
  if (plan.tensor_cores) plan.tile = kAttnWarps * kMmaTileKeys;
  plan.heads_per_block = plan.tensor_cores ? kMmaHeads : group == 1 ? 1 : group <= 4 ? 4 : 8;
  plan.head_tiles = ceil_div(group, plan.heads_per_block);
  plan.combine_mode = var.combine;
  if (plan.combine_mode == AttnCombine::kCluster) {
    if (dev.cc_major < 9)
      throw UnsupportedError(op_message(op, "option combine=cluster needs thread block clusters "
                                        "(compute capability 9.0+); this GPU is sm_",
                                        dev.cc_major, dev.cc_minor));
    if (!plan.tensor_cores)
      throw UnsupportedError(op_message(
          op, "option combine=cluster runs on the tensor-core kernels only (float16/bfloat16, ",
          "D innermost, head_dim ", caps::list_string(caps::kCudaTensorCoreHeadDims),
          "); this case is ", dtype_name(p.dtype), ", ", strided ? "D not innermost" : "D innermost",
          ", head_dim ", D, kernel == AttnKernel::kSimt ? ", kernel=simt" : ""));
    if (var.splits > kMaxClusterBlocks)
      throw UnsupportedError(op_message(op, "option splits=", var.splits, " exceeds the ",
                                        kMaxClusterBlocks, " blocks a cluster holds "
                                        "(combine=cluster)"));
  }
  const bool steal = var.schedule == AttnSchedule::kSteal;
  if (steal && plan.combine_mode != AttnCombine::kSeparate)
    throw UnsupportedError(op_message(op, "option schedule=steal runs under combine=separate "
                                      "only (the combine kernel resets its counters), not "
                                      "combine=", attn_combine_name(plan.combine_mode)));
  if (steal && var.stages != 2)
    throw UnsupportedError(op_message(op, "option schedule=steal runs with stages=2 only, not ",
                                      "stages=", var.stages));
  SplitKey key{SplitFamily::kSimt, dt, D, plan.heads_per_block, strided, 0, 0};
  if (!plan.tensor_cores) switch (dt) {
    case DType::kFloat16:
    case DType::kBFloat16:
      break;
    case DType::kFloat32:
      esize = 4;
      break;
    default:
      throw UnsupportedError(std::string("[") + op + "] dtype id " + std::to_string(p.dtype) +
                             " is not supported by native:cuda");
  }
  if (!plan.tensor_cores) split = pick_split<Src>(key, plan.combine_mode);
  if (!plan.tensor_cores && !split)
    throw UnsupportedError(std::string("[") + op + "] no kernel for head_dim " + std::to_string(D));
  if (!plan.tensor_cores) plan.tile = row_shape(esize, D, plan.heads_per_block).tile;

  const int64_t per_split = (int64_t)p.batch * p.pool.kv_heads * plan.head_tiles;
  const int forced = var.splits;
  const int min_chunk = var.min_chunk;
  auto chunk_for = [&](int splits) {
    return ceil_div(ceil_div(p.max_ctx, splits), plan.tile) * plan.tile;
  };
  auto occupancy = [&](SplitFn<Src> fn) {
    // static + dynamic past 48 KB needs the opt-in
    if (plan.smem_bytes > 0) allow_dynamic_smem(reinterpret_cast<const void*>(fn), plan.smem_bytes);
    KV_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&plan.blocks_per_sm, fn,
                                                                kAttnThreads, plan.smem_bytes));
  };
  int splits = 1;
  if (plan.tensor_cores) {
    // Both tensor-core kernels fit at least kMmaBlocksPerSm blocks per SM at their defaults, so
    // the split count comes first and the kernel is chosen from the tokens it leaves each warp.
    const int per_sm = var.blocks_per_sm;
    auto splits_at = [&](int blocks_per_sm) {
      return forced > 0 ? std::min(forced, kMaxSplits)
                        : splits_for_blocks(p.max_ctx, per_split,
                                            (int64_t)blocks_per_sm * dev.sm_count, plan.tile,
                                            min_chunk);
    };
    splits = splits_at(per_sm);
    // combine=cluster: a cluster holds every split of a sequence and head group.
    if (plan.combine_mode == AttnCombine::kCluster) splits = std::min(splits, kMaxClusterBlocks);
    const bool async = kernel == AttnKernel::kAsync ||
                       (kernel == AttnKernel::kAuto &&
                        chunk_for(splits) >= kAsyncMinTiles * plan.tile);
    if (kernel == AttnKernel::kBulk) {
      plan.stages = var.stages;  // 2 or 3 (parse_variant)
      plan.bulk = true;
      key.family = SplitFamily::kBulk;
      key.stages = plan.stages;
      split = pick_split<Src>(key, plan.combine_mode);
      plan.smem_bytes = bulk_smem_bytes(D, plan.stages, 2);
    } else if (async) {
      plan.stages = var.stages;  // 2 or 3 (parse_variant)
      plan.prefetch = 128;  // cp_async16's hint
      key.family = SplitFamily::kAsync;
      key.stages = plan.stages;
      key.steal = plan.steal = steal;
      split = pick_split<Src>(key, plan.combine_mode);
      plan.smem_bytes = async_smem_bytes(D, plan.stages, 2);
    } else {
      plan.prefetch = var.l2_prefetch;  // 0 or 128 (parse_variant)
      key.family = SplitFamily::kMma;
      key.prefetch = plan.prefetch;
      split = pick_split<Src>(key, plan.combine_mode);
    }
    occupancy(split);
    if (plan.blocks_per_sm < per_sm) splits = splits_at(std::max(plan.blocks_per_sm, 1));
    if (plan.combine_mode == AttnCombine::kCluster) splits = std::min(splits, kMaxClusterBlocks);
  } else {
    occupancy(split);
    const int64_t slots = (int64_t)dev.sm_count * std::max(plan.blocks_per_sm, 1);
    splits = forced > 0 ? std::min(forced, kMaxSplits)
                        : choose_splits(p.max_ctx, per_split, slots, plan.tile, min_chunk);
  }
  plan.split = reinterpret_cast<const void*>(split);
  const int64_t chunk = chunk_for(splits);
  splits = ceil_div(p.max_ctx, chunk);
  plan.splits = splits;
  // schedule=steal is the cp.async kernel's, and needs splits to balance: never dropped silently
  if (steal && !plan.steal)
    throw UnsupportedError(op_message(
        op, "option schedule=steal runs on the cp.async kernel only (kernel=async, or auto where "
        "it picks it); this case's plan is the ",
        !plan.tensor_cores ? "SIMT" : plan.bulk ? "bulk-copy" : "register-load", " kernel"));
  if (plan.steal && splits == 1)
    throw UnsupportedError(op_message(op, "option schedule=steal needs more than one split to "
                                      "balance; this plan has one (max context ", p.max_ctx,
                                      ", ", chunk, " tokens per split)"));
  plan.chunk = (int)chunk;
  plan.grid = dim3((unsigned)splits, (unsigned)(p.pool.kv_heads * plan.head_tiles), (unsigned)p.batch);
  plan.combine_blocks = p.batch * p.q_heads;
  // One launch under combine=last and cluster: no second kernel whose launch PDL could overlap.
  plan.pdl = dev.cc_major >= 9 && var.pdl && plan.combine_mode == AttnCombine::kSeparate;
  plan.pdl_entry = dev.cc_major < 9                   ? PdlEntry::kOff
                  : var.pdl_entry == PdlEntry::kAuto ? auto_pdl_entry(plan, dev)
                                                     : var.pdl_entry;
  plan.combine = reinterpret_cast<const void*>(combine_for(dt, plan.pdl_entry, plan.steal));
  const bool auto_spread = var.pdl_entry == PdlEntry::kAuto &&
                           plan.pdl_entry == PdlEntry::kEarly && plan.stages > 0;
  if (var.spread || auto_spread) spread_blocks(plan, split, dev);
  if (plan.combine_mode == AttnCombine::kCluster && splits > 1) {
    // The cluster is (splits, 1, 1): check that one fits this kernel's resources on an SM group.
    KV_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(split),
                                       cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    cudaLaunchAttribute attr[2];
    const cudaLaunchConfig_t cfg = split_launch(plan, nullptr, attr);
    int clusters = 0;
    KV_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&clusters, reinterpret_cast<const void*>(split), &cfg));
    if (clusters < 1)
      throw UnsupportedError(op_message(op, "combine=cluster: a cluster of ", splits,
                                        " blocks of this kernel does not fit on this GPU"));
  }
  return plan;
}

// The instantiations the pickers above hold, probed over head_dim 1..512 (no device needed: a
// pick returns a kernel's host-side address or null). One entry per (kernel family, dtype,
// head_dim, variant): simt "gt<heads per block>/<16-byte|strided>", mma "prefetch<bytes>",
// async "stages<n>", listed only where both combine modes (separate, last) are instantiated; bulk
// "stages<n>" where combine=separate is (its only mode).
// tests/test_native_capabilities.py compares them with common/capabilities.h.
template <class Src>
void probe_dtype(DType dtype, std::vector<AttnInstance>& out) {
  auto both = [](const SplitKey& k) {
    return pick_split<Src>(k, AttnCombine::kSeparate) != nullptr &&
           pick_split<Src>(k, AttnCombine::kLast) != nullptr;
  };
  const int32_t id = (int32_t)dtype;
  for (int d = 1; d <= 512; ++d) {
    for (int gt : caps::kCudaSimtHeadsPerBlock)
      for (int strided = 0; strided <= (Src::kStrided ? 1 : 0); ++strided)
        if (both({SplitFamily::kSimt, dtype, d, gt, strided != 0, 0, 0}))
          out.push_back({"simt", id, d, "gt" + std::to_string(gt) +
                                            (strided ? "/strided" : "/16-byte")});
    for (int prefetch : caps::kCudaMmaPrefetch)
      if (both({SplitFamily::kMma, dtype, d, 0, false, prefetch, 0}))
        out.push_back({"mma", id, d, "prefetch" + std::to_string(prefetch)});
    for (int stages : caps::kCudaAsyncStages)
      if (both({SplitFamily::kAsync, dtype, d, 0, false, 0, stages}))
        out.push_back({"async", id, d, "stages" + std::to_string(stages)});
    for (int stages : caps::kCudaBulkStages)
      if (pick_split<Src>({SplitFamily::kBulk, dtype, d, 0, false, 0, stages},
                          AttnCombine::kSeparate) != nullptr)
        out.push_back({"bulk", id, d, "stages" + std::to_string(stages)});
  }
}

template <class Src>
std::vector<AttnInstance> attention_instantiations() {
  std::vector<AttnInstance> out;
  probe_dtype<Src>(DType::kFloat16, out);
  probe_dtype<Src>(DType::kBFloat16, out);
  probe_dtype<Src>(DType::kFloat32, out);
  return out;
}

template <class Src>
void launch_attention(const AttnPlan& plan, const AttnArgs& args, const Src& src,
                      cudaStream_t stream) {
  auto split = reinterpret_cast<SplitFn<Src>>(plan.split);
  cudaLaunchAttribute attr[2];
  const cudaLaunchConfig_t cfg = split_launch(plan, stream, attr);
  if (cfg.numAttrs > 0) {
    KV_CUDA_CHECK(cudaLaunchKernelEx(&cfg, split, args, src));
  } else {
    split<<<plan.grid, kAttnThreads, plan.smem_bytes, stream>>>(args, src);
    KV_CUDA_CHECK_LAUNCH("attention split");
  }
  // One launch wrote the output: one split, or the splits merged by the last block or a cluster.
  if (plan.splits == 1 || plan.combine_mode != AttnCombine::kSeparate) return;
  auto combine = reinterpret_cast<CombineFn>(plan.combine);
  if (plan.pdl) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3((unsigned)plan.combine_blocks);
    cfg.blockDim = dim3(kCombineThreads);
    cfg.dynamicSmemBytes = 0;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    KV_CUDA_CHECK(cudaLaunchKernelEx(&cfg, combine, args, plan.head_dim));
  } else {
    combine<<<plan.combine_blocks, kCombineThreads, 0, stream>>>(args, plan.head_dim);
    KV_CUDA_CHECK_LAUNCH("attention combine");
  }
}

}  // namespace cuda
}  // namespace kvmicro
