// Timers of native:cuda's prepared op, kept in C++ so Python never enters a sample:
//   device_times_us: [optional scratch memset on the stream] event, run, event, sync, elapsed.
//   graph_times_us:  k runs (cycling over the copies, or all on the current one) captured once
//                    into a CUDA graph, then (event, graph launch, event, sync) / k per sample.
#include <string>
#include <vector>

#include "cuda/cuda_op.cuh"

namespace kvmicro {
namespace cuda {

std::vector<double> CudaOp::device_times_us(int reps, int64_t flush_bytes) {
  if (reps < 1)
    throw InvalidArgument(std::string("[") + name_ + "] reps " + std::to_string(reps) + " must be >= 1");
  use_device(device_);
  if (flush_bytes > 0) ensure_flush(flush_bytes);
  sync();
  std::vector<double> out;
  out.reserve((size_t)reps);
  for (int i = 0; i < reps; ++i) {
    if (flush_bytes > 0)
      KV_CUDA_CHECK(cudaMemsetAsync(flush_.get(), (int)(++flush_value_ & 0xFF), (size_t)flush_bytes,
                                    stream_));
    KV_CUDA_CHECK(cudaEventRecord(start_, stream_));
    enqueue(*sets_[current_]);
    KV_CUDA_CHECK(cudaEventRecord(stop_, stream_));
    KV_CUDA_CHECK(cudaEventSynchronize(stop_));
    float ms = 0.f;
    KV_CUDA_CHECK(cudaEventElapsedTime(&ms, start_, stop_));
    out.push_back(ms * 1000.0);
  }
  return out;
}

void CudaOp::destroy_graph() {
  if (graph_) (void)cudaGraphExecDestroy(graph_);
  graph_ = nullptr;
  graph_k_ = 0;
  graph_copy_ = -1;
}

void CudaOp::build_graph(int k, bool rotate) {
  destroy_graph();
  cudaGraph_t graph = nullptr;
  KV_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
  try {
    for (int i = 0; i < k; ++i) enqueue(*sets_[rotate ? i % copies() : current_]);
  } catch (...) {
    // Leave the stream out of capture mode before reporting the launch that failed.
    (void)cudaStreamEndCapture(stream_, &graph);
    if (graph) (void)cudaGraphDestroy(graph);
    (void)cudaGetLastError();
    throw;
  }
  KV_CUDA_CHECK(cudaStreamEndCapture(stream_, &graph));
  const cudaError_t err = cudaGraphInstantiate(&graph_, graph, 0);
  (void)cudaGraphDestroy(graph);
  if (err != cudaSuccess) {
    graph_ = nullptr;
    KV_CUDA_CHECK(err);
  }
  graph_k_ = k;
  graph_copy_ = rotate ? -1 : current_;
}

std::vector<double> CudaOp::graph_times_us(int reps, int k, bool rotate) {
  if (reps < 1)
    throw InvalidArgument(std::string("[") + name_ + "] reps " + std::to_string(reps) + " must be >= 1");
  if (k < 1)
    throw InvalidArgument(std::string("[") + name_ + "] graph of k " + std::to_string(k) +
                          " ops: k must be >= 1");
  use_device(device_);
  sync();
  if (!graph_ || graph_k_ != k || graph_copy_ != (rotate ? -1 : current_)) build_graph(k, rotate);
  return graph_replay_us_per_op(graph_, stream_, start_, stop_, reps, k);
}

}  // namespace cuda
}  // namespace kvmicro
