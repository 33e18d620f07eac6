// native:cuda's prepared op: plan before allocating, upload `copies` input sets (outputs poisoned,
// never uploaded), build each set's kernel arguments once; run() enqueues the plan's launches on
// the op's stream. make_cuda_op is the factory bindings.cpp calls.
#include <algorithm>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "common/validate.h"
#include "cuda/cuda_op.cuh"

namespace kvmicro {
namespace cuda {

Fill CudaOp::fill_for(BufferIndex which) const {
  // Outputs and intermediates are poisoned (all-ones bits: NaN in every dtype), never uploaded
  // from the expected values, so an op that writes nothing cannot pass the check.
  switch (op_) {
    case OpKind::kSdpaContiguous:
      if (which == kBufQ || which == kBufCtx || which == kBufKDense || which == kBufVDense)
        return Fill::kUpload;
      return which == kBufOut ? Fill::kPoison : Fill::kNone;
    case OpKind::kGather:
      if (which == kBufKPool || which == kBufVPool || which == kBufTable || which == kBufCtx)
        return Fill::kUpload;
      return (which == kBufKDense || which == kBufVDense) ? Fill::kPoison : Fill::kNone;
    case OpKind::kGatherSdpa:
      if (which == kBufQ || which == kBufKPool || which == kBufVPool || which == kBufTable ||
          which == kBufCtx)
        return Fill::kUpload;
      return (which == kBufKDense || which == kBufVDense || which == kBufOut) ? Fill::kPoison
                                                                              : Fill::kNone;
    case OpKind::kPagedSdpa:
      if (which == kBufQ || which == kBufKPool || which == kBufVPool || which == kBufTable ||
          which == kBufCtx)
        return Fill::kUpload;
      return which == kBufOut ? Fill::kPoison : Fill::kNone;
    case OpKind::kAppend:
      if (which == kBufKPool || which == kBufVPool || which == kBufTable || which == kBufCtx ||
          which == kBufKNew || which == kBufVNew)
        return Fill::kUpload;
      return Fill::kNone;
  }
  return Fill::kNone;
}

static int map_priority(int priority, int device) {
  int least = 0, greatest = 0;
  KV_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  (void)device;
  if (priority < 0) return least;
  if (priority > 0) return greatest;
  // CUDA's default stream priority is 0 (which is also `least` on current GPUs).
  return std::min(std::max(0, greatest), least);
}

CudaOp::CudaOp(const OpInputs& in, const DeviceOptions& opt)
    : op_(in.op), p_(in.params), name_(op_name(in.op)), device_(opt.index) {
  check_index(opt.index, name_);
  if (p_.dtype < 0 || p_.dtype > 2)
    throw InvalidArgument(std::string("[") + name_ + "] dtype id " + std::to_string(p_.dtype) +
                          " unknown");
  if (opt.copies < 1)
    throw InvalidArgument(std::string("[") + name_ + "] copies " + std::to_string(opt.copies) +
                          " must be >= 1");
  KV_CUDA_CHECK(cudaSetDevice(device_));
  props_ = query_props(device_);

  // Plan before allocating: an unsupported case costs no device memory.
  switch (op_) {
    case OpKind::kSdpaContiguous: attn_plan_ = plan_sdpa_contiguous(name_, p_, props_, opt.variant); break;
    case OpKind::kPagedSdpa: attn_plan_ = plan_paged_sdpa(name_, p_, props_, opt.variant); break;
    case OpKind::kGather: gather_plan_ = plan_gather(name_, p_, props_); break;
    case OpKind::kGatherSdpa:
      gather_plan_ = plan_gather(name_, p_, props_);
      attn_plan_ = plan_sdpa_contiguous(name_, p_, props_, opt.variant);
      break;
    case OpKind::kAppend: append_plan_ = plan_append(name_, p_, props_); break;
    default:
      throw InvalidArgument(std::string("[cuda] unknown op id ") + std::to_string((int)op_));
  }

  KV_CUDA_CHECK(cudaStreamCreateWithPriority(&stream_h_.s, cudaStreamNonBlocking,
                                             map_priority(opt.priority, device_)));
  stream_ = stream_h_.s;
  KV_CUDA_CHECK(cudaEventCreate(&start_h_.e));
  start_ = start_h_.e;
  KV_CUDA_CHECK(cudaEventCreate(&stop_h_.e));
  stop_ = stop_h_.e;

  for (int c = 0; c < opt.copies; ++c) {
    auto set = std::make_unique<Set>();
    for (int w = 0; w < kBufCount; ++w) {
      const BufferIndex which = (BufferIndex)w;
      const Fill fill = fill_for(which);
      if (fill == Fill::kNone) continue;
      const int64_t bytes = buffer_bytes(p_, which);
      set->buf[w].allocate((size_t)bytes);
      if (fill == Fill::kUpload) {
        const void* src = in.host(which);
        if (!src)
          throw InvalidArgument(std::string("[") + name_ + "] input buffer " + std::to_string(w) +
                                " is missing");
        KV_CUDA_CHECK(cudaMemcpy(set->buf[w].get(), src, (size_t)bytes, cudaMemcpyHostToDevice));
      } else {
        KV_CUDA_CHECK(cudaMemset(set->buf[w].get(), 0xFF, (size_t)bytes));
      }
    }
    sets_.push_back(std::move(set));
  }
  // combine=cluster merges in shared memory: no partial states in global memory.
  if (attn_plan_.split && attn_plan_.splits > 1 &&
      attn_plan_.combine_mode != AttnCombine::kCluster) {
    const int64_t heads = (int64_t)p_.batch * p_.q_heads * attn_plan_.splits;
    part_o_.allocate((size_t)(heads * p_.pool.head_dim * sizeof(float)));
    part_ml_.allocate((size_t)(heads * 2 * sizeof(float)));
    if (attn_plan_.combine_mode == AttnCombine::kLast || attn_plan_.steal) {
      // One counter per split-kernel (batch entry, kv head x head tile); zero from here on: the
      // last block of each launch resets its own (attention_common.cuh, arrive_last), or under
      // schedule=steal the combine kernel does (attention_combine.cuh).
      // (steal: a 128-byte line per counter, kClaimCounterStride)
      const int64_t counters = (int64_t)p_.batch * attn_plan_.grid.y *
                               (attn_plan_.steal ? kClaimCounterStride : 1);
      arrivals_.allocate((size_t)(counters * sizeof(int32_t)));
      KV_CUDA_CHECK(cudaMemset(arrivals_.get(), 0, (size_t)(counters * sizeof(int32_t))));
    }
  }
  for (auto& s : sets_) build_args(*s);
  KV_CUDA_CHECK(cudaDeviceSynchronize());
}

void CudaOp::build_args(Set& s) {
  auto ptr = [&](BufferIndex w) { return s.buf[w].get(); };
  const DenseView dense{p_.pool.kv_heads, p_.max_ctx_pad, p_.pool.head_dim};
  // one view of this set's pools, table and lengths, read by every op's kernel arguments
  const PagedKV kv = make_paged_kv(p_.pool, static_cast<const int32_t*>(ptr(kBufTable)),
                                   static_cast<const int32_t*>(ptr(kBufCtx)), p_.batch,
                                   p_.max_blocks);
  if (attn_plan_.split) {
    AttnArgs& a = s.attn;
    a.q = ptr(kBufQ);
    a.out = ptr(kBufOut);
    a.part_o = static_cast<float*>(part_o_.get());
    a.part_ml = static_cast<float*>(part_ml_.get());
    // null unless splits > 1 under combine=last or schedule=steal
    a.arrivals = static_cast<int32_t*>(arrivals_.get());
    a.ctx = static_cast<const int32_t*>(ptr(kBufCtx));
    a.q_heads = p_.q_heads;
    a.group = p_.group;
    a.head_tiles = attn_plan_.head_tiles;
    a.splits = attn_plan_.splits;
    a.chunk = attn_plan_.chunk;
    a.scale_log2 = p_.scale * kLog2e;  // see AttnArgs
    s.dense = DenseSrc{ptr(kBufKDense), ptr(kBufVDense), dense};
    s.paged = PagedSrc{ptr(kBufKPool), ptr(kBufVPool), kv};
  }
  if (gather_plan_.kernel) {
    GatherArgs& g = s.gather;
    g.k_pool = ptr(kBufKPool);
    g.v_pool = ptr(kBufVPool);
    g.k_dense = ptr(kBufKDense);
    g.v_dense = ptr(kBufVDense);
    g.kv = kv;
    g.dense = dense;
    g.row_vecs = gather_plan_.row_vecs;
  }
  if (append_plan_.kernel) {
    AppendArgs& a = s.append;
    a.k_pool = ptr(kBufKPool);
    a.v_pool = ptr(kBufVPool);
    a.k_new = ptr(kBufKNew);
    a.v_new = ptr(kBufVNew);
    a.kv = kv;
    a.row_units = append_plan_.row_units;
  }
}

CudaOp::~CudaOp() {
  // Never throw from here; an error at teardown has nobody left to report to. The handles
  // release the stream and events after this body.
  if (stream_) (void)cudaStreamSynchronize(stream_);
  destroy_graph();
}

void CudaOp::enqueue(const Set& s) {
  switch (op_) {
    case OpKind::kSdpaContiguous: launch_sdpa_contiguous(attn_plan_, s.attn, s.dense, stream_); break;
    case OpKind::kPagedSdpa: launch_paged_sdpa(attn_plan_, s.attn, s.paged, stream_); break;
    case OpKind::kGather: launch_gather(gather_plan_, s.gather, stream_); break;
    case OpKind::kGatherSdpa:
      launch_gather(gather_plan_, s.gather, stream_);
      launch_sdpa_contiguous(attn_plan_, s.attn, s.dense, stream_);
      break;
    case OpKind::kAppend: launch_append(append_plan_, s.append, stream_); break;
  }
}

void CudaOp::run() {
  use_device(device_);
  enqueue(*sets_[current_]);
}

void CudaOp::sync() { KV_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

void CudaOp::select(int copy) {
  if (copy < 0 || copy >= copies())
    throw InvalidArgument(std::string("[") + name_ + "] copy " + std::to_string(copy) +
                          " outside [0, " + std::to_string(copies()) + ")");
  current_ = copy;
}

void CudaOp::download(BufferIndex which, void* dst) {
  if ((int)which < 0 || (int)which >= kBufCount || !sets_[current_]->buf[which].get())
    throw InvalidArgument(std::string("[") + name_ + "] buffer " + std::to_string((int)which) +
                          " is not used by this op");
  use_device(device_);
  sync();
  KV_CUDA_CHECK(cudaMemcpy(dst, sets_[current_]->buf[which].get(),
                           (size_t)buffer_bytes(p_, which), cudaMemcpyDeviceToHost));
}

void CudaOp::ensure_flush(int64_t bytes) {
  if ((int64_t)flush_.bytes() < bytes) flush_.allocate((size_t)bytes);
}

void CudaOp::poison_outputs() {
  use_device(device_);
  Set& s = *sets_[current_];
  for (int w = 0; w < kBufCount; ++w)
    if (fill_for((BufferIndex)w) == Fill::kPoison)
      KV_CUDA_CHECK(cudaMemsetAsync(s.buf[w].get(), 0xFF, s.buf[w].bytes(), stream_));
  sync();
}

void CudaOp::flush(int64_t bytes) {
  if (bytes <= 0) return;
  use_device(device_);
  ensure_flush(bytes);
  KV_CUDA_CHECK(cudaMemsetAsync(flush_.get(), (int)(++flush_value_ & 0xFF), (size_t)bytes, stream_));
  sync();
}

static const char* dtype_label(int32_t dtype) {
  return dtype == (int32_t)DType::kFloat16 ? "f16" : dtype == (int32_t)DType::kBFloat16 ? "bf16" : "f32";
}

std::string CudaOp::describe() const {
  std::string out = std::string("cuda:") + std::to_string(device_) + " " + name_;
  if (gather_plan_.kernel)
    out += std::string("; gather ") + dtype_label(p_.dtype) +
           (gather_plan_.strided ? " strided elements (D not innermost)" : " 16-byte vectors") +
           ", grid " + std::to_string(gather_plan_.grid.x) + "x" + std::to_string(gather_plan_.grid.y) + "x2";
  if (attn_plan_.split) {
    const AttnPlan& a = attn_plan_;
    out += std::string("; attention ") + dtype_label(p_.dtype) + " D" + std::to_string(a.head_dim) +
           ", " + std::to_string(a.heads_per_block) + " q heads/block x " + std::to_string(a.head_tiles) +
           " tile(s), " +
           (!a.tensor_cores ? std::string("SIMT, ")
            : std::string("tensor cores (") +
                  (a.stages ? std::string(a.bulk ? "bulk copies, " : "cp.async, ") +
                                  std::to_string(a.stages) + " stages"
                            : std::string("register loads")) +
                  (a.prefetch ? ", L2 prefetch " + std::to_string(a.prefetch) + " B), " : "), ")) +
           (a.strided ? "strided path (D not innermost)" : "16-byte path") +
           ", splits " + std::to_string(a.splits) + " x " + std::to_string(a.chunk) + " tokens (tile " +
           std::to_string(a.tile) + "), " + std::to_string(a.blocks_per_sm) + " blocks/SM" +
           (a.spread ? " (shared memory padded to " + std::to_string(a.smem_bytes) + " B: one even wave)"
                     : "");
    if (a.splits > 1)
      out += a.combine_mode == AttnCombine::kLast ? ", combine by the last block (one launch)"
             : a.combine_mode == AttnCombine::kCluster
                 ? ", combine in a cluster of " + std::to_string(a.splits) + " blocks (one launch)"
             : a.pdl ? ", combine with PDL"
                     : ", combine";
    if (a.steal) out += ", tiles past each warp's first claimed from a counter per sequence and "
                        "head group (schedule=steal)";
  }
  if (attn_plan_.split && attn_plan_.pdl_entry != PdlEntry::kOff)
    out += std::string(", split kernel under PDL after the previous kernel (waits for it; ") +
           (attn_plan_.pdl_entry == PdlEntry::kEarly ? "early" : "at its exit") + ")";
  if (append_plan_.kernel)
    out += std::string("; append ") + dtype_label(p_.dtype) +
           (append_plan_.strided ? " strided elements (D not innermost)" : " 16-byte vectors");
  return out;
}

}  // namespace cuda

std::unique_ptr<PreparedOp> make_cuda_op(const OpInputs& in, const DeviceOptions& opt) {
  return std::make_unique<cuda::CudaOp>(in, opt);
}

}  // namespace kvmicro
