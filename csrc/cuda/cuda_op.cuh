// The PreparedOp behind native:cuda. Mirrors the Metal host code: one stream (with its priority)
// per prepared op, buffers uploaded once per copy, a kernel plan picked once; run() only enqueues.
// cuda_op.cu: construction (plan, upload), dispatch, downloads, describe(); cuda_timers.cu: the
// device and graph timers.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "common/device.h"
#include "cuda/cuda_device.cuh"
#include "cuda/kernels.h"

namespace kvmicro {
namespace cuda {

// ---- the prepared op ---------------------------------------------------------------------------

enum class Fill { kNone, kUpload, kPoison };

class CudaOp final : public PreparedOp {
 public:
  CudaOp(const OpInputs& in, const DeviceOptions& opt);
  ~CudaOp() override;

  void run() override;
  void sync() override;
  int copies() const override { return (int)sets_.size(); }
  void select(int copy) override;
  void download(BufferIndex which, void* dst) override;
  void flush(int64_t bytes) override;
  void poison_outputs() override;
  std::vector<double> device_times_us(int reps, int64_t flush_bytes) override;
  std::vector<double> graph_times_us(int reps, int k, bool rotate) override;
  std::string describe() const override;

 private:
  // One independent input set (cache rotation): its buffers and the kernel arguments over them.
  struct Set {
    DeviceBuffer buf[kBufCount];
    AttnArgs attn{};
    PagedSrc paged{};
    DenseSrc dense{};
    GatherArgs gather{};
    AppendArgs append{};
  };

  Fill fill_for(BufferIndex which) const;
  void build_args(Set& s);
  void enqueue(const Set& s);
  void ensure_flush(int64_t bytes);
  void build_graph(int k, bool rotate);
  void destroy_graph();

  OpKind op_;
  OpParams p_;
  const char* name_;
  int device_;
  DeviceProps props_;
  StreamHandle stream_h_;
  EventHandle start_h_, stop_h_;
  cudaStream_t stream_ = nullptr;  // == stream_h_.s
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
  std::vector<std::unique_ptr<Set>> sets_;
  int current_ = 0;
  DeviceBuffer part_o_, part_ml_, arrivals_, flush_;
  unsigned flush_value_ = 0;
  AttnPlan attn_plan_;
  GatherPlan gather_plan_;
  AppendPlan append_plan_;
  cudaGraphExec_t graph_ = nullptr;
  int graph_k_ = 0;
  int graph_copy_ = -1;  // the copy every op of the graph uses; -1: the graph cycles the copies
};

}  // namespace cuda
}  // namespace kvmicro
