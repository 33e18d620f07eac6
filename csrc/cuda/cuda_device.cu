// CUDA device queries for Python (cuda_host.h) and for the prepared ops (cuda_device.cuh): device
// count and properties, making a device current, and the one function every failed CUDA call
// ends in (throw_cuda_error). The prepared op is cuda_op.cu, its timers cuda_timers.cu, the
// memory ceilings cuda_bandwidth.cu.
#include <cstring>
#include <string>

#include "common/device.h"
#include "cuda/cuda_device.cuh"

namespace kvmicro {
namespace cuda {

void throw_cuda_error(cudaError_t err, const char* call, const char* file, int line) {
  const char* base = std::strrchr(file, '/');
  std::string msg = std::string("[cuda] ") + call + " failed: " + cudaGetErrorName(err) + " (" +
                    cudaGetErrorString(err) + ") at " + (base ? base + 1 : file) + ":" +
                    std::to_string(line);
  if (err == cudaErrorMemoryAllocation) {
    // Not sticky: clear it so the device stays usable, and let the sweep record a skip.
    (void)cudaGetLastError();
    throw UnsupportedError(msg + ": out of device memory");
  }
  throw DeviceError(msg);
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

void check_index(int index, const char* what) {
  const int n = device_count();
  if (n == 0) throw UnsupportedError(std::string("[") + what + "] no CUDA device is visible here");
  if (index < 0 || index >= n)
    throw InvalidArgument(std::string("[") + what + "] CUDA device index " + std::to_string(index) +
                          " outside [0, " + std::to_string(n) + ")");
}

std::vector<double> graph_replay_us_per_op(cudaGraphExec_t graph, cudaStream_t stream,
                                           cudaEvent_t start, cudaEvent_t stop, int reps, int k) {
  KV_CUDA_CHECK(cudaGraphLaunch(graph, stream));  // warm replay: the graph's first upload
  KV_CUDA_CHECK(cudaStreamSynchronize(stream));
  std::vector<double> out;
  out.reserve((size_t)reps);
  for (int i = 0; i < reps; ++i) {
    KV_CUDA_CHECK(cudaEventRecord(start, stream));
    KV_CUDA_CHECK(cudaGraphLaunch(graph, stream));
    KV_CUDA_CHECK(cudaEventRecord(stop, stream));
    KV_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0.f;
    KV_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    out.push_back(ms * 1000.0 / k);
  }
  return out;
}

void use_device(int index) {
  int current = -1;
  KV_CUDA_CHECK(cudaGetDevice(&current));
  if (current != index) KV_CUDA_CHECK(cudaSetDevice(index));
}

int device_attr(cudaDeviceAttr a, int index) {
  int v = 0;
  KV_CUDA_CHECK(cudaDeviceGetAttribute(&v, a, index));
  return v;
}

CudaDeviceInfo device_info(int index) {
  check_index(index, "cuda_device_info");
  CudaDeviceInfo info;
  cudaDeviceProp prop;
  KV_CUDA_CHECK(cudaGetDeviceProperties(&prop, index));
  info.name = prop.name;
  info.index = index;
  info.sm_count = prop.multiProcessorCount;
  info.l2_bytes = prop.l2CacheSize;
  info.memory_bytes = (int64_t)prop.totalGlobalMem;
  info.cc_major = prop.major;
  info.cc_minor = prop.minor;
  info.clock_khz = device_attr(cudaDevAttrClockRate, index);
  info.mem_clock_khz = device_attr(cudaDevAttrMemoryClockRate, index);
  info.bus_width = device_attr(cudaDevAttrGlobalMemoryBusWidth, index);
  info.max_shared_per_block_optin = device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin, index);
  KV_CUDA_CHECK(cudaDriverGetVersion(&info.driver_version));
  KV_CUDA_CHECK(cudaRuntimeGetVersion(&info.runtime_version));
  char bus_id[32] = {0};
  KV_CUDA_CHECK(cudaDeviceGetPCIBusId(bus_id, sizeof(bus_id), index));
  info.pci_bus_id = bus_id;
  use_device(index);
  KV_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&info.priority_least, &info.priority_greatest));
  return info;
}

DeviceProps query_props(int index) {
  DeviceProps d;
  d.index = index;
  d.sm_count = device_attr(cudaDevAttrMultiProcessorCount, index);
  d.cc_major = device_attr(cudaDevAttrComputeCapabilityMajor, index);
  d.cc_minor = device_attr(cudaDevAttrComputeCapabilityMinor, index);
  d.l2_bytes = device_attr(cudaDevAttrL2CacheSize, index);
  d.smem_per_sm = device_attr(cudaDevAttrMaxSharedMemoryPerMultiprocessor, index);
  d.smem_per_block_max = device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin, index);
  return d;
}

}  // namespace cuda
}  // namespace kvmicro
