// sdpa_contiguous: decode attention over dense K/V [B, Hkv, T, D] (metal/sdpa_contiguous.metal),
// the lower bound every paged op is compared with. Mirrors cuda/sdpa_contiguous.cu.
#include "common/validate.h"
#include "metal/metal_kernels.h"

namespace kvmicro {
namespace metal {

MetalPlan plan_sdpa_contiguous(const char* op, const OpParams& p, const DeviceProps& dev) {
  MetalPlan plan;
  add_attention(plan, op, "sdpa_contiguous", p, dev,
                {kBufQ, kBufKDense, kBufVDense, kBufCtx, kBufOut});
  return plan;
}

}  // namespace metal
}  // namespace kvmicro
