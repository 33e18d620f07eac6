// The device's memory ceilings for provenance and % of peak (cuda_host.h measure_bandwidth): a
// large reduction kernel (bytes read) and a large device-to-device copy (bytes read + written)
// through cudaMemcpyAsync and a 16-byte copy kernel. Measured once per device and cached. And
// the cost of one streaming read of a given size per op in the graph timer (read_floor_us): what
// any one-kernel op that reads those bytes pays at least.
#include <algorithm>
#include <map>
#include <mutex>

#include "cuda/cuda_device.cuh"

namespace kvmicro {
namespace cuda {

// ---- memory ceilings --------------------------------------------------------------------------

namespace {

constexpr int kBwThreads = 256;

__global__ void __launch_bounds__(kBwThreads)
    read_kernel(const uint4* __restrict__ src, size_t n, unsigned* sink) {
  const size_t stride = (size_t)gridDim.x * kBwThreads;
  size_t i = (size_t)blockIdx.x * kBwThreads + threadIdx.x;
  unsigned acc = 0;
  for (; i + 3 * stride < n; i += 4 * stride) {
    const uint4 a = __ldg(src + i), b = __ldg(src + i + stride);
    const uint4 c = __ldg(src + i + 2 * stride), d = __ldg(src + i + 3 * stride);
    acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^
           d.z ^ d.w;
  }
  for (; i < n; i += stride) {
    const uint4 a = __ldg(src + i);
    acc ^= a.x ^ a.y ^ a.z ^ a.w;
  }
  // Depends on every load, so none can be dropped; practically never true.
  if (acc == 0x9E3779B9u) sink[0] = acc;
}

__global__ void __launch_bounds__(kBwThreads)
    copy_kernel(const uint4* __restrict__ src, uint4* __restrict__ dst, size_t n) {
  const size_t stride = (size_t)gridDim.x * kBwThreads;
  size_t i = (size_t)blockIdx.x * kBwThreads + threadIdx.x;
  for (; i + 3 * stride < n; i += 4 * stride) {
    const uint4 a = __ldg(src + i), b = __ldg(src + i + stride);
    const uint4 c = __ldg(src + i + 2 * stride), d = __ldg(src + i + 3 * stride);
    dst[i] = a;
    dst[i + stride] = b;
    dst[i + 2 * stride] = c;
    dst[i + 3 * stride] = d;
  }
  for (; i < n; i += stride) dst[i] = __ldg(src + i);
}

template <class F>
double best_ms(cudaStream_t s, cudaEvent_t e0, cudaEvent_t e1, int reps, F&& f) {
  for (int i = 0; i < 2; ++i) f();  // warm-up
  KV_CUDA_CHECK(cudaStreamSynchronize(s));
  double best = 1e30;
  for (int i = 0; i < reps; ++i) {
    KV_CUDA_CHECK(cudaEventRecord(e0, s));
    f();
    KV_CUDA_CHECK(cudaEventRecord(e1, s));
    KV_CUDA_CHECK(cudaEventSynchronize(e1));
    float ms = 0.f;
    KV_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    best = std::min(best, (double)ms);
  }
  return best;
}

// Thread blocks of the read kernel over n 16-byte vectors: 8 per SM (2048 threads), fewer where
// the buffer has fewer vectors than that grid has threads.
int read_blocks(const DeviceProps& props, size_t n) {
  const size_t full = (size_t)props.sm_count * (2048 / kBwThreads);
  return (int)std::max<size_t>(1, std::min(full, (n + kBwThreads - 1) / kBwThreads));
}

}  // namespace

std::vector<double> read_floor_us(int index, int64_t bytes, int copies, int k, int reps) {
  auto bad = [](const std::string& what) {
    throw InvalidArgument("[cuda_read_floor] " + what);
  };
  if (bytes < 16 || bytes % 16 != 0)
    bad("bytes " + std::to_string(bytes) + " must be a positive multiple of 16");
  if (copies < 1) bad("copies " + std::to_string(copies) + " must be >= 1");
  if (k < 1) bad("k " + std::to_string(k) + " must be >= 1");
  if (reps < 1) bad("reps " + std::to_string(reps) + " must be >= 1");
  check_index(index, "cuda_read_floor");
  use_device(index);
  const DeviceProps props = query_props(index);
  size_t free_b = 0, total_b = 0;
  KV_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  if ((double)bytes * copies > 0.5 * (double)free_b)
    throw UnsupportedError("[cuda_read_floor] " + std::to_string(copies) + " copies of " +
                           std::to_string(bytes) + " bytes exceed half the device's free memory (" +
                           std::to_string(free_b) + " bytes)");
  std::vector<DeviceBuffer> buffers((size_t)copies);
  for (DeviceBuffer& b : buffers) {
    b.allocate((size_t)bytes);
    KV_CUDA_CHECK(cudaMemset(b.get(), 0x5A, (size_t)bytes));
  }
  DeviceBuffer sink;
  sink.allocate(16);
  struct GraphHandle {
    cudaGraphExec_t exec = nullptr;
    ~GraphHandle() {
      if (exec) (void)cudaGraphExecDestroy(exec);
    }
  } graph_exec;
  // Declared after the buffers and the graph: synchronised before either is freed.
  StreamHandle stream;
  EventHandle e0, e1;
  KV_CUDA_CHECK(cudaStreamCreateWithFlags(&stream.s, cudaStreamNonBlocking));
  KV_CUDA_CHECK(cudaEventCreate(&e0.e));
  KV_CUDA_CHECK(cudaEventCreate(&e1.e));
  cudaStream_t s = stream.s;
  const size_t n = (size_t)bytes / 16;
  const int blocks = read_blocks(props, n);
  cudaGraph_t graph = nullptr;
  KV_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < k; ++i)
    read_kernel<<<blocks, kBwThreads, 0, s>>>(
        static_cast<const uint4*>(buffers[(size_t)(i % copies)].get()), n,
        static_cast<unsigned*>(sink.get()));
  const cudaError_t launched = cudaGetLastError();
  KV_CUDA_CHECK(cudaStreamEndCapture(s, &graph));
  KV_CUDA_CHECK(launched);
  const cudaError_t made = cudaGraphInstantiate(&graph_exec.exec, graph, 0);
  (void)cudaGraphDestroy(graph);
  KV_CUDA_CHECK(made);
  return graph_replay_us_per_op(graph_exec.exec, s, e0.e, e1.e, reps, k);
}

Bandwidth measure_bandwidth(int index) {
  static std::mutex mutex;
  static std::map<int, Bandwidth> cache;
  check_index(index, "cuda_bandwidth");
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(index);
  if (it != cache.end()) return it->second;

  use_device(index);
  const DeviceProps props = query_props(index);
  size_t free_b = 0, total_b = 0;
  KV_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  // 1 GiB per buffer (20x a 50 MB L2), less on a small card.
  size_t bytes = std::min<size_t>((size_t)1 << 30, free_b / 4);
  bytes = bytes / (1 << 20) * (1 << 20);
  if (bytes < ((size_t)64 << 20))
    throw UnsupportedError("[cuda_bandwidth] too little free device memory to measure");
  DeviceBuffer a, b, sink;
  a.allocate(bytes);
  b.allocate(bytes);
  sink.allocate(16);
  KV_CUDA_CHECK(cudaMemset(a.get(), 0x5A, bytes));
  KV_CUDA_CHECK(cudaMemset(b.get(), 0x00, bytes));
  cudaStream_t s = nullptr;
  cudaEvent_t e0 = nullptr, e1 = nullptr;
  KV_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  KV_CUDA_CHECK(cudaEventCreate(&e0));
  KV_CUDA_CHECK(cudaEventCreate(&e1));
  struct Cleanup {
    cudaStream_t s;
    cudaEvent_t e0, e1;
    ~Cleanup() {
      (void)cudaStreamSynchronize(s);
      (void)cudaEventDestroy(e0);
      (void)cudaEventDestroy(e1);
      (void)cudaStreamDestroy(s);
    }
  } cleanup{s, e0, e1};

  const size_t n = bytes / 16;
  const int blocks = props.sm_count * (2048 / kBwThreads);
  const int reps = 10;
  const double read_ms = best_ms(s, e0, e1, reps, [&] {
    read_kernel<<<blocks, kBwThreads, 0, s>>>(static_cast<const uint4*>(a.get()), n,
                                               static_cast<unsigned*>(sink.get()));
    KV_CUDA_CHECK_LAUNCH("read_kernel");
  });
  const double memcpy_ms = best_ms(s, e0, e1, reps, [&] {
    KV_CUDA_CHECK(cudaMemcpyAsync(b.get(), a.get(), bytes, cudaMemcpyDeviceToDevice, s));
  });
  const double kernel_ms = best_ms(s, e0, e1, reps, [&] {
    copy_kernel<<<blocks, kBwThreads, 0, s>>>(static_cast<const uint4*>(a.get()),
                                               static_cast<uint4*>(b.get()), n);
    KV_CUDA_CHECK_LAUNCH("copy_kernel");
  });
  Bandwidth bw;
  bw.bytes = (int64_t)bytes;
  bw.reps = reps;
  bw.read_gbps = bytes / (read_ms * 1e-3) / 1e9;
  bw.memcpy_gbps = 2.0 * bytes / (memcpy_ms * 1e-3) / 1e9;
  bw.copy_kernel_gbps = 2.0 * bytes / (kernel_ms * 1e-3) / 1e9;
  bw.copy_gbps = std::max(bw.memcpy_gbps, bw.copy_kernel_gbps);
  cache[index] = bw;
  return bw;
}

}  // namespace cuda
}  // namespace kvmicro
