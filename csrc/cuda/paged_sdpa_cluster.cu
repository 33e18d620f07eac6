// paged_sdpa's combine=cluster split kernels (the splits of a sequence and head group are one
// thread block cluster and merge in distributed shared memory; see attention_common.cuh,
// merge_in_cluster): the tensor-core instantiations of paged_sdpa.cu with C = kCluster, in a
// translation unit of their own so the sets compile in parallel.
#include "cuda/attention_plan.cuh"

namespace kvmicro {
namespace cuda {

SplitFn<PagedSrc> pick_split_cluster(const PagedSrc*, const SplitKey& k) {
  return pick_split_kernel<PagedSrc, AttnCombine::kCluster>(k);
}

}  // namespace cuda
}  // namespace kvmicro
