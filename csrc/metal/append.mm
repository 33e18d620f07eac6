// append: write token ctx[b] of each sequence into the pool (metal/append.metal): physical block
// table[b][ctx[b] / block_size], slot ctx[b] % block_size. Mirrors cuda/append.cu.
#include <string>

#include "../../metal/kernel_abi.h"
#include "common/validate.h"
#include "metal/metal_kernels.h"

namespace kvmicro {
namespace metal {

MetalPlan plan_append(const char* op, const OpParams& p, const DeviceProps& dev) {
  check_dtype(op, p, dev);
  Dispatch d;
  d.function = std::string("append_") + dtype_suffix(p.dtype);  // any layout, through stride_d
  // One threadgroup per (sequence, kv head); its threads write the K and V rows.
  d.grid.x = (uint32_t)p.batch;
  d.grid.y = (uint32_t)p.pool.kv_heads;
  d.threads.x = (uint32_t)mtl::kCopyThreads;
  d.buffers = {kBufKPool, kBufVPool, kBufTable, kBufCtx, kBufKNew, kBufVNew};
  d.why = std::string("append ") + dtype_suffix(p.dtype) +
          (p.pool.d_contiguous() ? " rows" : " rows through stride_d (D not innermost)");
  MetalPlan plan;
  plan.dispatches.push_back(d);
  return plan;
}

}  // namespace metal
}  // namespace kvmicro
