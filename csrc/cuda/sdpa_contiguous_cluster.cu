// sdpa_contiguous's (and gather_sdpa's) combine=cluster split kernels (the splits of a sequence
// and head group are one thread block cluster and merge in distributed shared memory; see
// attention_common.cuh, merge_in_cluster): the tensor-core instantiations of sdpa_contiguous.cu
// with C = kCluster, in a translation unit of its own so the sets compile in parallel.
#include "cuda/attention_plan.cuh"

namespace kvmicro {
namespace cuda {

SplitFn<DenseSrc> pick_split_cluster(const DenseSrc*, const SplitKey& k) {
  return pick_split_kernel<DenseSrc, AttnCombine::kCluster>(k);
}

}  // namespace cuda
}  // namespace kvmicro
