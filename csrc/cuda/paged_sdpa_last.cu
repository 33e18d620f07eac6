// paged_sdpa's combine=last split kernels (the last split block of a sequence merges; see
// attention_common.cuh, write_block_result): the same instantiation list as paged_sdpa.cu with
// C = kLast, in a translation unit of its own so the two sets compile in parallel.
#include "cuda/attention_plan.cuh"

namespace kvmicro {
namespace cuda {

SplitFn<PagedSrc> pick_split_last(const PagedSrc*, const SplitKey& k) {
  return pick_split_kernel<PagedSrc, AttnCombine::kLast>(k);
}

}  // namespace cuda
}  // namespace kvmicro
