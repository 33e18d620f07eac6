// Device queries and ceilings for Python (cuda_bindings.cpp) and provenance: plain structs, no CUDA
// headers, so the binding file compiles as ordinary C++.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace kvmicro {
namespace cuda {

// Devices visible to the runtime; 0 (never an exception) when there is no driver or no GPU.
int device_count();

struct CudaDeviceInfo {
  std::string name;
  int index = 0;
  int sm_count = 0;
  int64_t l2_bytes = 0;
  int64_t memory_bytes = 0;
  int clock_khz = 0;
  int mem_clock_khz = 0;
  int bus_width = 0;
  int cc_major = 0;
  int cc_minor = 0;
  int driver_version = 0;   // CUDA driver API version (e.g. 13000)
  int runtime_version = 0;  // CUDA runtime this module was linked with
  int priority_least = 0;   // cudaDeviceGetStreamPriorityRange: numerically largest = lowest
  int priority_greatest = 0;
  int max_shared_per_block_optin = 0;
  std::string pci_bus_id;   // "0000:3B:00.0": how NVML (the throttle guard) finds this device
};

CudaDeviceInfo device_info(int index);

// Memory ceilings in decimal GB/s, measured once per device and cached: a large reduction kernel
// (bytes read) and a large device-to-device copy (bytes read + bytes written) through both
// cudaMemcpyAsync and a 16-byte copy kernel; copy_gbps is the larger of the two. Best of `reps`.
struct Bandwidth {
  double read_gbps = 0;
  double copy_gbps = 0;
  double memcpy_gbps = 0;
  double copy_kernel_gbps = 0;
  int64_t bytes = 0;  // buffer size each figure moved through
  int reps = 0;
};

Bandwidth measure_bandwidth(int index);

// What reading `bytes` costs one kernel, per op, in the graph timer's arithmetic: `copies`
// buffers of `bytes`, a CUDA graph of k launches of the read kernel (op i reads buffer
// i % copies), replayed `reps` times between two events; µs per op of each replay. One copy
// leaves the buffer in L2 where it fits (hot); copies totalling several L2s evict it (cold).
std::vector<double> read_floor_us(int index, int64_t bytes, int copies, int k, int reps);

// The timeline probe of the paged attention kernels (timeline.cuh; paged_sdpa.cu), in a build
// with -DKVMICRO_TIMELINE=ON: zero the table; copy it out (after a device sync) as
// [kernel: split, combine][kTimelineSlotsHost][kTimelineFieldsHost] global-timer values, 0 where
// nothing was stamped. Without the probe both raise UnsupportedError.
constexpr int kTimelineSlotsHost = 8192;  // timeline.cuh's kTimelineSlots, checked there
constexpr int kTimelineFieldsHost = 11;
void timeline_reset(int index);
std::vector<uint64_t> timeline_read(int index);

// One attention kernel instantiation (attention_instantiations in
// attention_plan.cuh; paged_sdpa.cu and sdpa_contiguous.cu list theirs).
struct AttnInstance {
  std::string kernel;   // simt, mma, async
  int32_t dtype;        // DType
  int32_t head_dim;
  std::string variant;  // gt<heads>/<16-byte|strided>, prefetch<bytes>, stages<n>
};
std::vector<AttnInstance> paged_sdpa_instantiations();
std::vector<AttnInstance> sdpa_contiguous_instantiations();

}  // namespace cuda
}  // namespace kvmicro
