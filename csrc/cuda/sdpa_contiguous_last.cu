// sdpa_contiguous's (and gather_sdpa's) combine=last split kernels (the last split block of a
// sequence merges; see attention_common.cuh, write_block_result): the same instantiation list as
// sdpa_contiguous.cu with C = kLast, in a translation unit of its own so the two sets compile in
// parallel.
#include "cuda/attention_plan.cuh"

namespace kvmicro {
namespace cuda {

SplitFn<DenseSrc> pick_split_last(const DenseSrc*, const SplitKey& k) {
  return pick_split_kernel<DenseSrc, AttnCombine::kLast>(k);
}

}  // namespace cuda
}  // namespace kvmicro
