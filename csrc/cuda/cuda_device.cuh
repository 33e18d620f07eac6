// The CUDA device as the host code uses it: which devices there are, making one current, what the
// plans need to know of it, and owners for device memory, streams and events (so that a prepare
// that fails half-way leaks nothing). Implemented in cuda_device.cu.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>

#include "cuda/cuda_common.cuh"
#include "cuda/cuda_host.h"
#include "cuda/kernels.h"

namespace kvmicro {
namespace cuda {

// Throws Unsupported when no device is visible, InvalidArgument for an index outside [0, count);
// `what` names the caller in the message.
void check_index(int index, const char* what);
// Make device `index` current on this thread (a no-op when it already is).
void use_device(int index);
int device_attr(cudaDeviceAttr a, int index);
// What the plans need to know of device `index` (kernels.h DeviceProps).
DeviceProps query_props(int index);

// The graph timer's arithmetic (docs/methodology.md), for an op's graph (CudaOp::graph_times_us)
// and the read floor's (read_floor_us): one warm replay of `graph` (its first upload) and a sync,
// then `reps` samples of (event, replay, event, sync), each the elapsed µs / k, the graph's ops.
std::vector<double> graph_replay_us_per_op(cudaGraphExec_t graph, cudaStream_t stream,
                                           cudaEvent_t start, cudaEvent_t stop, int reps, int k);

// Device memory owned by one object; freed on every path out (a failed prepare included).
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { reset(); }
  void allocate(size_t bytes) {
    reset();
    KV_CUDA_CHECK(cudaMalloc(&ptr_, std::max<size_t>(bytes, 1)));
    bytes_ = bytes;
  }
  void reset() {
    if (ptr_) (void)cudaFree(ptr_);  // errors here would only mask the one being reported
    ptr_ = nullptr;
    bytes_ = 0;
  }
  void* get() const { return ptr_; }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Stream and events owned by one object, so a prepare that fails half-way leaks nothing.
struct StreamHandle {
  cudaStream_t s = nullptr;
  ~StreamHandle() {
    if (s) {
      (void)cudaStreamSynchronize(s);
      (void)cudaStreamDestroy(s);
    }
  }
};
struct EventHandle {
  cudaEvent_t e = nullptr;
  ~EventHandle() {
    if (e) (void)cudaEventDestroy(e);
  }
};

}  // namespace cuda
}  // namespace kvmicro
