// paged_sdpa: fused decode attention reading K/V from the pool through the block table
// (metal/paged_sdpa.metal). Also the attention (+ combine) dispatches that sdpa_contiguous.mm and
// gather_sdpa share. Mirrors cuda/paged_sdpa.cu.
#include <string>
#include <utility>
#include <vector>

#include "../../metal/kernel_abi.h"
#include "common/validate.h"
#include "metal/metal_kernels.h"

namespace kvmicro {
namespace metal {

namespace {

// Head dims the attention kernels are instantiated for (the list at the bottom of
// metal/paged_sdpa.metal); 80 and 112 take the masked-tail lane mapping.
constexpr int kHeadDims[] = {64, 80, 96, 112, 128, 256};

}  // namespace

const char* dtype_suffix(int32_t dtype) {
  switch (dtype) {
    case (int32_t)DType::kFloat16: return "f16";
    case (int32_t)DType::kBFloat16: return "bf16";
    case (int32_t)DType::kFloat32: return "f32";
  }
  return "unknown";
}

void check_dtype(const char* op, const OpParams& p, const DeviceProps& dev) {
  if (p.dtype == (int32_t)DType::kBFloat16 && !dev.bfloat)
    throw UnsupportedError(op_message(op, "bfloat16 needs an Apple6+ GPU and kernels compiled "
                                          "for MSL 3.1 or newer; this device or library has none"));
}

void add_attention(MetalPlan& plan, const char* op, const char* kernel, const OpParams& p,
                   const DeviceProps& dev, std::vector<BufferIndex> buffers) {
  check_dtype(op, p, dev);
  const int D = p.pool.head_dim;
  bool known = false;
  for (int d : kHeadDims) known = known || d == D;
  if (!known)
    throw UnsupportedError(op_message(op, "head_dim ", D, " has no Metal instantiation (have 64, "
                                          "80, 96, 112, 128, 256)"));
  const uint32_t bytes = (uint32_t)mtl::attn_threadgroup_bytes(D);
  if (bytes > dev.threadgroup_memory)
    throw UnsupportedError(op_message(op, "head_dim ", D, " needs ", (int64_t)bytes,
                                      " bytes of threadgroup memory; the device has ",
                                      (int64_t)dev.threadgroup_memory));
  plan.partition = mtl::choose_partitions(p.batch, p.pool.kv_heads, p.group, p.max_ctx,
                                          kAssumedGpuCores);
  const bool split = plan.partition.partitions > 1;
  const std::string tail = std::string("_") + dtype_suffix(p.dtype) + "_d" + std::to_string(D);

  // One function per dtype and head_dim: the kernel takes the vector path when D is innermost
  // and strided loads otherwise, a branch uniform over the grid (dense K/V is always D-inner).
  const bool strided = std::string(kernel) == "paged_sdpa" && !p.pool.d_contiguous();
  Dispatch d;
  d.function = kernel + tail;
  d.grid.x = (uint32_t)plan.partition.partitions;
  d.grid.y = (uint32_t)(p.pool.kv_heads * mtl::query_tiles(p.group));
  d.grid.z = (uint32_t)p.batch;
  d.threads.x = (uint32_t)mtl::kAttnThreads;
  d.threadgroup_memory.push_back({0, bytes});
  // The partial buffers are arguments of every attention kernel; with one partition they are
  // bound (to 16-byte placeholders) but never touched.
  d.buffers = std::move(buffers);
  d.buffers.insert(d.buffers.end(), {kBufPartialOut, kBufPartialMaxSum});
  d.partition = true;
  d.why = std::string(kernel) + " " + dtype_suffix(p.dtype) + " D" + std::to_string(D) + ", " +
          std::to_string(mtl::query_tiles(p.group)) + " query tile(s) of <= " +
          std::to_string(mtl::kMaxQueryTile) + " heads per kv head, " +
          std::to_string(plan.partition.partitions) + " partition(s) of " +
          std::to_string(plan.partition.partition_tokens) + " tokens (rule fed " +
          std::to_string(kAssumedGpuCores) + " GPU cores, an assumption: Metal reports none)" +
          (strided ? ", strided path (D not innermost)" : "");
  plan.dispatches.push_back(d);

  if (split) {
    Dispatch c;
    c.function = std::string("combine_") + dtype_suffix(p.dtype);
    c.grid.x = (uint32_t)p.q_heads;
    c.grid.y = (uint32_t)p.batch;
    c.threads.x = (uint32_t)mtl::kCombineThreads;
    c.buffers = {kBufCtx, kBufPartialOut, kBufPartialMaxSum, kBufOut};
    c.partition = true;
    c.why = "combine " + std::to_string(plan.partition.partitions) + " partitions";
    plan.dispatches.push_back(c);
  }
}

MetalPlan plan_paged_sdpa(const char* op, const OpParams& p, const DeviceProps& dev) {
  MetalPlan plan;
  add_attention(plan, op, "paged_sdpa", p, dev,
                {kBufQ, kBufKPool, kBufVPool, kBufTable, kBufCtx, kBufOut});
  return plan;
}

}  // namespace metal
}  // namespace kvmicro
