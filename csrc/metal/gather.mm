// gather: pool -> dense K/V [B, Hkv, max_ctx_pad, D] through the block table
// (metal/gather.metal). gather_sdpa is this dispatch followed by sdpa_contiguous's, in one
// encoder. Mirrors cuda/gather.cu.
#include <string>

#include "../../metal/kernel_abi.h"
#include "common/validate.h"
#include "metal/metal_kernels.h"

namespace kvmicro {
namespace metal {

MetalPlan plan_gather(const char* op, const OpParams& p, const DeviceProps& dev) {
  check_dtype(op, p, dev);
  Dispatch d;
  d.function = std::string("gather_") + dtype_suffix(p.dtype) +
               (p.pool.d_contiguous() ? "" : "_strided");
  // One threadgroup per (logical block, kv head, sequence) copying that block's K and V rows.
  d.grid.x = (uint32_t)p.max_blocks;
  d.grid.y = (uint32_t)p.pool.kv_heads;
  d.grid.z = (uint32_t)p.batch;
  d.threads.x = (uint32_t)mtl::kCopyThreads;
  d.buffers = {kBufKPool, kBufVPool, kBufTable, kBufCtx, kBufKDense, kBufVDense};
  d.why = std::string("gather ") + dtype_suffix(p.dtype) +
          (p.pool.d_contiguous() ? " rows" : " strided elements (D not innermost)");
  MetalPlan plan;
  plan.dispatches.push_back(d);
  if (op == std::string("gather_sdpa"))
    add_attention(plan, op, "sdpa_contiguous", p, dev,
                  {kBufQ, kBufKDense, kBufVDense, kBufCtx, kBufOut});
  return plan;
}

}  // namespace metal
}  // namespace kvmicro
