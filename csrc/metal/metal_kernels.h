// The host-facing side of the .metal kernels (metal/*.metal): which function runs, on what grid,
// with which buffers, one plan per op family (paged_sdpa.mm, sdpa_contiguous.mm, gather.mm,
// append.mm). Mirrors cuda/kernels.h.
//
// Plan once, run many: plan_*() checks what the kernels support and picks the function name (an
// entry of the instantiation list at the bottom of each .metal file) and the grid; it never runs
// on the timed path. Encoding is generic (metal_device.mm): bind every slot the plan lists by its
// BufferIndex, OpParams at kBufParams and PartitionParams at kBufPartition (setBytes), size
// threadgroup memory, dispatch. Threadgroup shapes, memory sizes and the partition rule come from
// metal/kernel_abi.h, the header the kernels compile with, so host and kernels cannot disagree.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "common/params.h"

namespace kvmicro {
namespace metal {

// Metal exposes no GPU core count; the partition rule (kernel_abi.h choose_partitions) is fed
// this many, and describe() says so.
constexpr int kAssumedGpuCores = 32;

// What the plans need of the device, read once per op at prepare.
struct DeviceProps {
  int index = 0;
  bool bfloat = false;                 // Apple6+ and the library has bfloat instantiations
  uint64_t threadgroup_memory = 0;     // maxThreadgroupMemoryLength
  uint64_t max_threads = 1024;         // maxThreadsPerThreadgroup.width
};

struct Size3 {
  uint32_t x = 1, y = 1, z = 1;
};

// One dispatch of one pipeline: dispatchThreadgroups:grid threadsPerThreadgroup:threads.
struct Dispatch {
  std::string function;                 // the kernel's [[host_name]]
  Size3 grid;                           // threadgroups
  Size3 threads;                        // threads per threadgroup
  std::vector<BufferIndex> buffers;     // slots bound, by index (the kernel's [[buffer(i)]]);
                                        // kBufPartialOut / kBufPartialMaxSum: the op's scratch
  bool partition = false;               // binds PartitionParams at kBufPartition
  std::vector<std::pair<int, uint32_t>> threadgroup_memory;  // [[threadgroup(i)]] -> bytes
  std::string why;                      // the variant and why it was picked, for describe()
};

// The dispatches of one op, in order (gather_sdpa has two). A serial compute encoder orders them.
struct MetalPlan {
  std::vector<Dispatch> dispatches;
  PartitionParams partition{1, 1};      // attention: how each sequence's context is split
};

// "float16" -> "f16", the suffix the .metal instantiation lists use.
const char* dtype_suffix(int32_t dtype);
// Refuse a dtype the device cannot run (bfloat needs Apple6+ and MSL 3.1 kernels).
void check_dtype(const char* op, const OpParams& p, const DeviceProps& dev);

// The attention dispatch both attention ops share (paged_sdpa.mm): one threadgroup per
// (partition, kv head x query tile, sequence) serving the query tile, so each K/V byte is read
// once per tile; `kernel` is "paged_sdpa" or "sdpa_contiguous", `buffers` the slots it reads.
// Appends the attention dispatch (and, with more than one partition, the combine dispatch).
void add_attention(MetalPlan& plan, const char* op, const char* kernel, const OpParams& p,
                   const DeviceProps& dev, std::vector<BufferIndex> buffers);

MetalPlan plan_sdpa_contiguous(const char* op, const OpParams& p, const DeviceProps& dev);
MetalPlan plan_paged_sdpa(const char* op, const OpParams& p, const DeviceProps& dev);
MetalPlan plan_gather(const char* op, const OpParams& p, const DeviceProps& dev);
MetalPlan plan_append(const char* op, const OpParams& p, const DeviceProps& dev);

}  // namespace metal
}  // namespace kvmicro
