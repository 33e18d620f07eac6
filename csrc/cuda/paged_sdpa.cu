// paged_sdpa: fused decode attention that reads K/V straight from the pool through the block
// table (PagedSrc in kernels.h: logical_to_physical + PoolView, no copy). Kernels are the shared
// templates of attention_*.cuh; this file is their paged instantiation list:
//   dtype {float16, bfloat16, float32} x head_dim {64, 80, 96, 128, 256}
//   x query heads per block {1, 4, 8} x {16-byte path (D innermost), strided path (any layout)}
//   (SIMT), and float16/bfloat16 x head_dim {64, 96, 128} on tensor cores: register loads (L2
//   prefetch hint 0 / 128 B) and cp.async (2 / 3 stages); here for combine=separate, in
//   paged_sdpa_last.cu for combine=last
#include "cuda/attention_plan.cuh"
#include "cuda/cuda_device.cuh"
#include "cuda/cuda_host.h"

namespace kvmicro {
namespace cuda {

AttnPlan plan_paged_sdpa(const char* op, const OpParams& p, const DeviceProps& dev,
                         const Variant& var) {
  // The 16-byte path needs D innermost: then every other stride is a multiple of head_dim, and
  // head_dim * element size is a multiple of 16 for every supported head_dim, so rows are aligned.
  const bool strided = !p.pool.d_contiguous();
  return plan_attention<PagedSrc>(op, p, dev, var, strided);
}

void launch_paged_sdpa(const AttnPlan& plan, const AttnArgs& args, const PagedSrc& src,
                       cudaStream_t stream) {
  launch_attention<PagedSrc>(plan, args, src, stream);
}

std::vector<AttnInstance> paged_sdpa_instantiations() {
  return attention_instantiations<PagedSrc>();
}

// ---- the timeline probe (timeline.cuh): the table this file's kernels stamp ----------------------

#if defined(KVMICRO_TIMELINE) && KVMICRO_TIMELINE
void timeline_reset(int index) {
  check_index(index, "cuda_timeline_reset");
  use_device(index);
  void* table = nullptr;
  KV_CUDA_CHECK(cudaGetSymbolAddress(&table, g_kv_timeline));
  KV_CUDA_CHECK(cudaMemset(table, 0, sizeof(g_kv_timeline)));
  KV_CUDA_CHECK(cudaDeviceSynchronize());
}

std::vector<uint64_t> timeline_read(int index) {
  check_index(index, "cuda_timeline");
  use_device(index);
  KV_CUDA_CHECK(cudaDeviceSynchronize());  // every stamping kernel has finished
  std::vector<uint64_t> out(sizeof(g_kv_timeline) / sizeof(uint64_t));
  KV_CUDA_CHECK(cudaMemcpyFromSymbol(out.data(), g_kv_timeline, sizeof(g_kv_timeline)));
  return out;
}
#else
static const char* kNoTimeline =
    "this extension was built without the timeline probe (build it with -DKVMICRO_TIMELINE=ON, "
    "scripts/timeline.py)";

void timeline_reset(int) {
  throw UnsupportedError(std::string("[cuda_timeline_reset] ") + kNoTimeline);
}

std::vector<uint64_t> timeline_read(int) {
  throw UnsupportedError(std::string("[cuda_timeline] ") + kNoTimeline);
}
#endif

}  // namespace cuda
}  // namespace kvmicro
