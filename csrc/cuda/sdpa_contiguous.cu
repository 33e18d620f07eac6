// sdpa_contiguous: decode attention over dense K/V [B, Hkv, T, D] (DenseSrc in kernels.h), the
// lower bound the paged variants are compared with; also the attention half of gather_sdpa.
// Same kernels as paged_sdpa (attention_*.cuh), so the two differ only in how a row is addressed.
// Instantiations: dtype {float16, bfloat16, float32} x head_dim {64, 80, 96, 128, 256}
//   x query heads per block {1, 4, 8}, 16-byte path only (dense rows are D-innermost), SIMT; and
//   float16/bfloat16 x head_dim {64, 96, 128} on tensor cores: register loads (L2 prefetch hint
//   0 / 128 B) and cp.async (2 / 3 stages); here for combine=separate, in sdpa_contiguous_last.cu
//   for combine=last.
#include "cuda/attention_plan.cuh"

namespace kvmicro {
namespace cuda {

AttnPlan plan_sdpa_contiguous(const char* op, const OpParams& p, const DeviceProps& dev,
                                  const Variant& var) {
  return plan_attention<DenseSrc>(op, p, dev, var, /*strided=*/false);
}

void launch_sdpa_contiguous(const AttnPlan& plan, const AttnArgs& args, const DenseSrc& src,
                            cudaStream_t stream) {
  launch_attention<DenseSrc>(plan, args, src, stream);
}

std::vector<AttnInstance> sdpa_contiguous_instantiations() {
  return attention_instantiations<DenseSrc>();
}

}  // namespace cuda
}  // namespace kvmicro
