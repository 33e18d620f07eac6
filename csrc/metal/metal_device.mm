// Metal host code: the PreparedOp behind native:metal (make_metal_op), device queries and the
// memory ceilings. Mirrors cuda/cuda_device.cu: buffers uploaded once per copy, a plan picked
// once, its pipelines taken from the per-device cache; run() only encodes and commits.
//
// Submission (SubmitOptions, the case's options): storage shared | private; queue shared (one per
// QoS class and in-flight bound in the process) | per_stream (this op's own); the submitting
// thread's QoS class from the priority; per_buffer run() calls per command buffer; in_flight =
// the queue's maxCommandBufferCount.
//
// Timers live here so Python never enters a sample:
//   device_times_us: [flush command buffer, waited] one command buffer holding one op, waited;
//                    GPUEndTime - GPUStartTime. A 0.0 time or a status other than Completed is
//                    a failed sample and raises, never a number.
//   Before its first sample, either timer runs the op back to back for kWarmSeconds of wall
//   time (Apple GPU clocks ramp up slowly on short work; a count of warm-up runs is not enough).
//   graph_times_us:  native:metal's batched GPU timer: k ops in one compute encoder of one
//                    command buffer, GPU time minus an empty-buffer baseline (median of 5 empty
//                    command buffers, taken per call), over k.
// Both are elapsed GPU time of the command buffer: under contention they include time the GPU
// spent on other work while the buffer was resident (docs/metal-host.md).
#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "common/validate.h"
#include "metal/metal_common.h"
#include "metal/metal_host.h"
#include "metal/metal_kernels.h"

namespace kvmicro {
namespace metal {

namespace {

MTLResourceOptions storage_options(bool private_storage) {
  return private_storage ? MTLResourceStorageModePrivate : MTLResourceStorageModeShared;
}

const char* status_name(MTLCommandBufferStatus s) {
  switch (s) {
    case MTLCommandBufferStatusNotEnqueued: return "NotEnqueued";
    case MTLCommandBufferStatusEnqueued: return "Enqueued";
    case MTLCommandBufferStatusCommitted: return "Committed";
    case MTLCommandBufferStatusScheduled: return "Scheduled";
    case MTLCommandBufferStatusCompleted: return "Completed";
    case MTLCommandBufferStatusError: return "Error";
  }
  return "unknown";
}

// Wait for `cb` and refuse anything but a completed buffer.
void wait_completed(id<MTLCommandBuffer> cb, const char* what) {
  [cb waitUntilCompleted];
  if (cb.status != MTLCommandBufferStatusCompleted)
    KV_METAL_FAIL(std::string("[metal] ") + what + ": command buffer ended with status " +
                      status_name(cb.status),
                  cb.error);
}

// GPU seconds of a completed buffer, in µs; 0.0 start/end times are a failed sample.
double gpu_us(id<MTLCommandBuffer> cb, const char* what) {
  const double start = cb.GPUStartTime, end = cb.GPUEndTime;
  if (start <= 0.0 || end <= start)
    throw DeviceError(std::string("[metal] ") + what + ": GPUStartTime " + std::to_string(start) +
                      " / GPUEndTime " + std::to_string(end) +
                      " is not a GPU interval: a failed sample");
  return (end - start) * 1e6;
}

id<MTLCommandBuffer> new_command_buffer(id<MTLCommandQueue> queue) {
  id<MTLCommandBuffer> cb = [queue commandBuffer];
  if (!cb) KV_METAL_FAIL("[metal] commandBuffer returned nil", nil);
  return cb;
}

// Blit fills and copies on macOS take offsets and sizes in multiples of 4 bytes; buffers are
// allocated in multiples of 16, so a rounded-up range always lies inside its buffer.
int64_t round4(int64_t bytes) { return (bytes + 3) / 4 * 4; }

id<MTLBuffer> new_buffer(id<MTLDevice> device, int64_t bytes, MTLResourceOptions options,
                         const char* op) {
  const int64_t length = (std::max<int64_t>(bytes, 16) + 15) / 16 * 16;
  id<MTLBuffer> b = [device newBufferWithLength:(NSUInteger)length options:options];
  if (!b)
    throw UnsupportedError(std::string("[") + op + "] newBufferWithLength " +
                           std::to_string(bytes) + " bytes failed: out of device memory");
  return b;
}

// Wall time the GPU timers spend running the op before their first sample.
constexpr double kWarmSeconds = 0.5;

enum class Fill { kNone, kUpload, kPoison };

// Which slots an op uploads, and which it writes (poisoned with all-ones bits, NaN in every
// dtype, so an op that writes nothing cannot pass the check). As in cuda_device.cu.
Fill fill_for(OpKind op, BufferIndex which) {
  const bool table_ctx = which == kBufTable || which == kBufCtx;
  const bool pools = which == kBufKPool || which == kBufVPool;
  const bool dense = which == kBufKDense || which == kBufVDense;
  switch (op) {
    case OpKind::kSdpaContiguous:
      if (which == kBufQ || which == kBufCtx || dense) return Fill::kUpload;
      return which == kBufOut ? Fill::kPoison : Fill::kNone;
    case OpKind::kGather:
      if (pools || table_ctx) return Fill::kUpload;
      return dense ? Fill::kPoison : Fill::kNone;
    case OpKind::kGatherSdpa:
      if (which == kBufQ || pools || table_ctx) return Fill::kUpload;
      return (dense || which == kBufOut) ? Fill::kPoison : Fill::kNone;
    case OpKind::kPagedSdpa:
      if (which == kBufQ || pools || table_ctx) return Fill::kUpload;
      return which == kBufOut ? Fill::kPoison : Fill::kNone;
    case OpKind::kAppend:
      if (pools || table_ctx || which == kBufKNew || which == kBufVNew) return Fill::kUpload;
      return Fill::kNone;
  }
  return Fill::kNone;
}

}  // namespace

SubmitOptions parse_submit_options(const char* op, const std::map<std::string, std::string>& kv) {
  SubmitOptions s;
  auto as_int = [&](const std::string& key, const std::string& v, int lo, int hi) {
    char* end = nullptr;
    const long x = std::strtol(v.c_str(), &end, 10);
    if (v.empty() || !end || *end != '\0' || x < lo || x > hi)
      invalid(op, "metal option ", key, "=", v, " must be an integer in [", lo, ", ", hi, "]");
    return (int)x;
  };
  for (const auto& [key, value] : kv) {
    if (key == "storage") {
      if (value != "shared" && value != "private")
        invalid(op, "metal option storage=", value, "; expected shared or private");
      s.private_storage = value == "private";
    } else if (key == "queue") {
      if (value != "shared" && value != "per_stream")
        invalid(op, "metal option queue=", value, "; expected shared or per_stream");
      s.shared_queue = value == "shared";
    } else if (key == "per_buffer") {
      s.per_buffer = as_int(key, value, 1, 4096);
    } else if (key == "in_flight") {
      s.in_flight = as_int(key, value, 1, 64);
    } else {
      invalid(op, "unknown metal option '", key, "'; expected storage, queue, per_buffer or "
              "in_flight");
    }
  }
  return s;
}

// ---- the prepared op ---------------------------------------------------------------------------

class MetalOp final : public PreparedOp {
 public:
  MetalOp(const OpInputs& in, const DeviceOptions& opt, const SubmitOptions& submit);
  ~MetalOp() override;

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
  struct Set {
    id<MTLBuffer> buf[kBufCount];
  };

  void encode(id<MTLComputeCommandEncoder> enc, const Set& s) const;
  void commit_open();
  void wait_pending();
  void encode_flush(id<MTLCommandBuffer> cb, int64_t bytes);
  void warm_by_wall_time();
  void fill(id<MTLBuffer> buf, const void* src, int64_t bytes, uint8_t value,
            id<MTLCommandBuffer> cb);

  OpKind op_;
  OpParams p_;
  const char* name_;
  SubmitOptions submit_;
  Context& ctx_;
  qos_class_t qos_;
  id<MTLCommandQueue> queue_ = nil;
  MetalPlan plan_;
  std::vector<id<MTLComputePipelineState>> pipelines_;
  std::vector<Set> sets_;
  int current_ = 0;
  // Split-context scratch, shared by the copies (each op overwrites it before reading it).
  id<MTLBuffer> part_o_ = nil, part_ml_ = nil;
  id<MTLBuffer> flush_ = nil;
  uint8_t flush_value_ = 0;
  // run(): the command buffer being filled, its encoder, and the run() calls in it.
  id<MTLCommandBuffer> open_cb_ = nil;
  id<MTLComputeCommandEncoder> open_enc_ = nil;
  int open_count_ = 0;
  std::vector<id<MTLCommandBuffer>> pending_;  // committed, not yet waited
  bool warmed_ = false;                         // warm_by_wall_time() has run
};

MetalOp::MetalOp(const OpInputs& in, const DeviceOptions& opt, const SubmitOptions& submit)
    : op_(in.op),
      p_(in.params),
      name_(op_name(in.op)),
      submit_(submit),
      ctx_(context(opt.index, op_name(in.op))),
      qos_(qos_for_priority(opt.priority)) {
  if (opt.copies < 1) invalid(name_, "copies ", opt.copies, " must be >= 1");
  // Fail now, not on the first run, when this thread's QoS cannot be set.
  { QosScope probe(qos_); }

  DeviceProps props;
  props.index = opt.index;
  props.bfloat = ctx_.bfloat;
  props.threadgroup_memory = ctx_.device.maxThreadgroupMemoryLength;
  props.max_threads = ctx_.device.maxThreadsPerThreadgroup.width;
  // Plan before allocating: an unsupported case costs no device memory.
  switch (op_) {
    case OpKind::kSdpaContiguous: plan_ = plan_sdpa_contiguous(name_, p_, props); break;
    case OpKind::kPagedSdpa: plan_ = plan_paged_sdpa(name_, p_, props); break;
    case OpKind::kGather:
    case OpKind::kGatherSdpa: plan_ = plan_gather(name_, p_, props); break;
    case OpKind::kAppend: plan_ = plan_append(name_, p_, props); break;
  }
  for (const Dispatch& d : plan_.dispatches) {
    id<MTLComputePipelineState> state = ctx_.pipeline(d.function);
    const uint64_t threads = (uint64_t)d.threads.x * d.threads.y * d.threads.z;
    if (threads > state.maxTotalThreadsPerThreadgroup)
      throw UnsupportedError(op_message(name_, "kernel ", d.function, " allows ",
                                        (int64_t)state.maxTotalThreadsPerThreadgroup,
                                        " threads per threadgroup; the plan needs ",
                                        (int64_t)threads));
    pipelines_.push_back(state);
  }
  queue_ = submit_.shared_queue ? ctx_.shared_queue((unsigned)qos_, submit_.in_flight)
                                : ctx_.new_queue(submit_.in_flight);

  QosScope scope(qos_);
  @autoreleasepool {
    id<MTLCommandBuffer> cb = new_command_buffer(queue_);
    const MTLResourceOptions options = storage_options(submit_.private_storage);
    sets_.resize((size_t)opt.copies);
    for (Set& set : sets_) {
      for (int w = 0; w < kBufCount; ++w) {
        const BufferIndex which = (BufferIndex)w;
        const Fill f = fill_for(op_, which);
        if (f == Fill::kNone) continue;
        const int64_t bytes = buffer_bytes(p_, which);
        const void* src = f == Fill::kUpload ? in.host(which) : nullptr;
        if (f == Fill::kUpload && !src)
          invalid(name_, "input buffer ", w, " is missing");
        set.buf[w] = new_buffer(ctx_.device, bytes, options, name_);
        fill(set.buf[w], src, bytes, 0xFF, cb);
      }
    }
    if (is_attention(op_)) {
      // [B, Hq, partitions, D] and [B, Hq, partitions, 2] floats; 16-byte placeholders (bound,
      // never touched) with one partition.
      const bool split = plan_.partition.partitions > 1;
      const int64_t rows = (int64_t)p_.batch * p_.q_heads * plan_.partition.partitions;
      part_o_ = new_buffer(ctx_.device, split ? rows * p_.pool.head_dim * 4 : 16, options, name_);
      part_ml_ = new_buffer(ctx_.device, split ? rows * 2 * 4 : 16, options, name_);
    }
    [cb commit];
    wait_completed(cb, "upload");
  }
}

// Upload `src` (or fill with `value` when src is null) into `buf`: a memcpy into shared memory,
// a blit from a shared staging buffer (encoded into `cb`) for private memory.
void MetalOp::fill(id<MTLBuffer> buf, const void* src, int64_t bytes, uint8_t value,
                   id<MTLCommandBuffer> cb) {
  if (!submit_.private_storage) {
    if (src) std::memcpy(buf.contents, src, (size_t)bytes);
    else std::memset(buf.contents, value, (size_t)bytes);
    return;
  }
  id<MTLBlitCommandEncoder> blit = [cb blitCommandEncoder];
  if (!blit) KV_METAL_FAIL("[metal] blitCommandEncoder returned nil", nil);
  if (src) {
    id<MTLBuffer> staging = new_buffer(ctx_.device, bytes, MTLResourceStorageModeShared, name_);
    std::memcpy(staging.contents, src, (size_t)bytes);
    [blit copyFromBuffer:staging sourceOffset:0 toBuffer:buf destinationOffset:0
                    size:(NSUInteger)round4(bytes)];
  } else {
    [blit fillBuffer:buf range:NSMakeRange(0, (NSUInteger)round4(bytes)) value:value];
  }
  [blit endEncoding];
}

MetalOp::~MetalOp() {
  // Never throw from here: an error at teardown has nobody left to report to.
  @autoreleasepool {
    if (open_cb_) {
      [open_enc_ endEncoding];
      [open_cb_ commit];
      pending_.push_back(open_cb_);
    }
    for (id<MTLCommandBuffer> cb : pending_) [cb waitUntilCompleted];
  }
}

void MetalOp::encode(id<MTLComputeCommandEncoder> enc, const Set& s) const {
  for (size_t i = 0; i < plan_.dispatches.size(); ++i) {
    const Dispatch& d = plan_.dispatches[i];
    [enc setComputePipelineState:pipelines_[i]];
    for (BufferIndex slot : d.buffers) {
      id<MTLBuffer> b = slot == kBufPartialOut      ? part_o_
                        : slot == kBufPartialMaxSum ? part_ml_
                                                    : s.buf[slot];
      [enc setBuffer:b offset:0 atIndex:(NSUInteger)slot];
    }
    [enc setBytes:&p_ length:sizeof(OpParams) atIndex:(NSUInteger)kBufParams];
    if (d.partition)
      [enc setBytes:&plan_.partition length:sizeof(PartitionParams)
            atIndex:(NSUInteger)kBufPartition];
    for (const auto& [index, bytes] : d.threadgroup_memory)
      [enc setThreadgroupMemoryLength:(NSUInteger)((bytes + 15) / 16 * 16) atIndex:(NSUInteger)index];
    [enc dispatchThreadgroups:MTLSizeMake(d.grid.x, d.grid.y, d.grid.z)
        threadsPerThreadgroup:MTLSizeMake(d.threads.x, d.threads.y, d.threads.z)];
  }
}

void MetalOp::commit_open() {
  if (!open_cb_) return;
  [open_enc_ endEncoding];
  [open_cb_ commit];
  pending_.push_back(open_cb_);
  open_cb_ = nil;
  open_enc_ = nil;
  open_count_ = 0;
}

void MetalOp::wait_pending() {
  // Buffers of one queue complete in commit order; waiting on each also checks each status.
  std::vector<id<MTLCommandBuffer>> done;
  done.swap(pending_);
  for (id<MTLCommandBuffer> cb : done) wait_completed(cb, name_);
}

void MetalOp::run() {
  QosScope scope(qos_);
  @autoreleasepool {
    if (!open_cb_) {
      open_cb_ = new_command_buffer(queue_);
      open_enc_ = [open_cb_ computeCommandEncoder];
      if (!open_enc_) KV_METAL_FAIL("[metal] computeCommandEncoder returned nil", nil);
    }
    encode(open_enc_, sets_[(size_t)current_]);
    if (++open_count_ >= submit_.per_buffer) commit_open();
  }
}

void MetalOp::sync() {
  QosScope scope(qos_);
  @autoreleasepool {
    commit_open();
    wait_pending();
  }
}

void MetalOp::select(int copy) {
  if (copy < 0 || copy >= copies())
    invalid(name_, "copy ", copy, " outside [0, ", copies(), ")");
  current_ = copy;
}

void MetalOp::download(BufferIndex which, void* dst) {
  if ((int)which < 0 || (int)which >= kBufCount || !sets_[(size_t)current_].buf[which])
    invalid(name_, "buffer ", (int)which, " is not used by this op");
  sync();
  const int64_t bytes = buffer_bytes(p_, which);
  id<MTLBuffer> src = sets_[(size_t)current_].buf[which];
  if (!submit_.private_storage) {
    std::memcpy(dst, src.contents, (size_t)bytes);
    return;
  }
  @autoreleasepool {
    id<MTLBuffer> staging = new_buffer(ctx_.device, bytes, MTLResourceStorageModeShared, name_);
    id<MTLCommandBuffer> cb = new_command_buffer(queue_);
    id<MTLBlitCommandEncoder> blit = [cb blitCommandEncoder];
    if (!blit) KV_METAL_FAIL("[metal] blitCommandEncoder returned nil", nil);
    [blit copyFromBuffer:src sourceOffset:0 toBuffer:staging destinationOffset:0
                    size:(NSUInteger)round4(bytes)];
    [blit endEncoding];
    [cb commit];
    wait_completed(cb, "download");
    std::memcpy(dst, staging.contents, (size_t)bytes);
  }
}

void MetalOp::encode_flush(id<MTLCommandBuffer> cb, int64_t bytes) {
  if (!flush_ || (int64_t)flush_.length < round4(bytes))
    flush_ = new_buffer(ctx_.device, bytes, MTLResourceStorageModePrivate, name_);
  id<MTLBlitCommandEncoder> blit = [cb blitCommandEncoder];
  if (!blit) KV_METAL_FAIL("[metal] blitCommandEncoder returned nil", nil);
  [blit fillBuffer:flush_ range:NSMakeRange(0, (NSUInteger)round4(bytes)) value:++flush_value_];
  [blit endEncoding];
}

void MetalOp::flush(int64_t bytes) {
  if (bytes <= 0) return;
  QosScope scope(qos_);
  @autoreleasepool {
    commit_open();
    id<MTLCommandBuffer> cb = new_command_buffer(queue_);
    encode_flush(cb, bytes);
    [cb commit];
    pending_.push_back(cb);
    wait_pending();
  }
}

void MetalOp::poison_outputs() {
  QosScope scope(qos_);
  @autoreleasepool {
    commit_open();
    wait_pending();
    id<MTLCommandBuffer> cb = new_command_buffer(queue_);
    Set& s = sets_[(size_t)current_];
    for (int w = 0; w < kBufCount; ++w)
      if (fill_for(op_, (BufferIndex)w) == Fill::kPoison)
        fill(s.buf[w], nullptr, buffer_bytes(p_, (BufferIndex)w), 0xFF, cb);
    [cb commit];
    wait_completed(cb, "poison_outputs");
  }
}

void MetalOp::warm_by_wall_time() {
  if (warmed_) return;
  const auto start = std::chrono::steady_clock::now();
  do {
    @autoreleasepool {
      id<MTLCommandBuffer> cb = new_command_buffer(queue_);
      id<MTLComputeCommandEncoder> enc = [cb computeCommandEncoder];
      if (!enc) KV_METAL_FAIL("[metal] computeCommandEncoder returned nil", nil);
      for (int j = 0; j < 8; ++j) encode(enc, sets_[(size_t)current_]);
      [enc endEncoding];
      [cb commit];
      wait_completed(cb, "warm-up");
    }
  } while (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() <
           kWarmSeconds);
  warmed_ = true;
}

std::vector<double> MetalOp::device_times_us(int reps, int64_t flush_bytes) {
  if (reps < 1) invalid(name_, "reps ", reps, " must be >= 1");
  QosScope scope(qos_);
  std::vector<double> out;
  out.reserve((size_t)reps);
  @autoreleasepool {
    commit_open();
    wait_pending();
  }
  warm_by_wall_time();
  for (int i = 0; i < reps; ++i) {
    @autoreleasepool {
      if (flush_bytes > 0) {
        id<MTLCommandBuffer> f = new_command_buffer(queue_);
        encode_flush(f, flush_bytes);
        [f commit];
        wait_completed(f, "flush");
      }
      id<MTLCommandBuffer> cb = new_command_buffer(queue_);
      id<MTLComputeCommandEncoder> enc = [cb computeCommandEncoder];
      if (!enc) KV_METAL_FAIL("[metal] computeCommandEncoder returned nil", nil);
      encode(enc, sets_[(size_t)current_]);
      [enc endEncoding];
      [cb commit];
      wait_completed(cb, "device timer");
      out.push_back(gpu_us(cb, "device timer"));
    }
  }
  return out;
}

std::vector<double> MetalOp::graph_times_us(int reps, int k, bool rotate) {
  if (reps < 1) invalid(name_, "reps ", reps, " must be >= 1");
  if (k < 1) invalid(name_, "batched timer of k ", k, " ops: k must be >= 1");
  QosScope scope(qos_);
  std::vector<double> out;
  out.reserve((size_t)reps);
  @autoreleasepool {
    commit_open();
    wait_pending();
  }
  warm_by_wall_time();
  // The empty-buffer baseline: what a command buffer with one empty encoder costs on the GPU
  // clock (scheduling, start/end), the median of five taken now.
  std::vector<double> empty;
  for (int i = 0; i < 5; ++i) {
    @autoreleasepool {
      id<MTLCommandBuffer> cb = new_command_buffer(queue_);
      id<MTLComputeCommandEncoder> enc = [cb computeCommandEncoder];
      if (!enc) KV_METAL_FAIL("[metal] computeCommandEncoder returned nil", nil);
      [enc endEncoding];
      [cb commit];
      wait_completed(cb, "batched timer baseline");
      empty.push_back(gpu_us(cb, "batched timer baseline"));
    }
  }
  std::nth_element(empty.begin(), empty.begin() + 2, empty.end());
  const double baseline = empty[2];
  for (int i = 0; i < reps; ++i) {
    @autoreleasepool {
      id<MTLCommandBuffer> cb = new_command_buffer(queue_);
      id<MTLComputeCommandEncoder> enc = [cb computeCommandEncoder];
      if (!enc) KV_METAL_FAIL("[metal] computeCommandEncoder returned nil", nil);
      for (int j = 0; j < k; ++j)
        encode(enc, sets_[(size_t)(rotate ? j % copies() : current_)]);
      [enc endEncoding];
      [cb commit];
      wait_completed(cb, "batched timer");
      const double total = gpu_us(cb, "batched timer");
      if (total <= baseline)
        throw DeviceError(op_message(name_, "batched timer: ", k, " ops took ", total,
                                     " µs of GPU time, not more than the empty-buffer baseline ",
                                     baseline, " µs: a failed sample"));
      out.push_back((total - baseline) / k);
    }
  }
  return out;
}

std::string MetalOp::describe() const {
  std::string out = std::string("metal:") + std::to_string(ctx_.index) + " " + name_;
  for (const Dispatch& d : plan_.dispatches)
    out += "; " + d.why + " (" + d.function + ", grid " + std::to_string(d.grid.x) + "x" +
           std::to_string(d.grid.y) + "x" + std::to_string(d.grid.z) + ", " +
           std::to_string(d.threads.x * d.threads.y * d.threads.z) + " threads)";
  out += std::string("; storage ") + (submit_.private_storage ? "private" : "shared") +
         "; queue " + (submit_.shared_queue ? "shared" : "per_stream") + " (maxCommandBufferCount " +
         std::to_string(submit_.in_flight) + "); submitting thread QoS " + qos_name(qos_) +
         " (no GPU priority: Metal has no public one); " + std::to_string(submit_.per_buffer) +
         " run() per command buffer; GPU timers warm up for 0.5 s of wall time; graph timer = k "
         "dispatches in one encoder and one command "
         "buffer minus an empty-buffer baseline; library: " + ctx_.library_origin;
  return out;
}

// ---- device queries and memory ceilings --------------------------------------------------------

MetalDeviceInfo device_info(int index) {
  Context& ctx = context(index, "metal_device_info");
  MetalDeviceInfo info;
  @autoreleasepool {
    id<MTLDevice> d = ctx.device;
    info.name = to_std(d.name);
    info.index = index;
    info.registry_id = d.registryID;
    info.unified_memory = d.hasUnifiedMemory;
    info.working_set_bytes = d.recommendedMaxWorkingSetSize;
    info.max_buffer_bytes = d.maxBufferLength;
    info.threadgroup_memory_bytes = d.maxThreadgroupMemoryLength;
    info.apple7 = [d supportsFamily:MTLGPUFamilyApple7];
    info.apple8 = [d supportsFamily:MTLGPUFamilyApple8];
    info.apple9 = [d supportsFamily:MTLGPUFamilyApple9];
    info.metal3 = [d supportsFamily:MTLGPUFamilyMetal3];
    info.bfloat = ctx.bfloat;
    info.os_version = to_std([NSProcessInfo processInfo].operatingSystemVersionString);
    info.library = ctx.library_origin;
  }
  return info;
}

namespace {

// The read probe's kernel: its own tiny library, not part of metal/ (it measures the device,
// not kvmicro's kernels).
const char* const kReadProbeSource = R"msl(
#include <metal_stdlib>
using namespace metal;
kernel void kv_bandwidth_read(device const uint4* src [[buffer(0)]],
                              device uint* sink [[buffer(1)]],
                              constant uint& n [[buffer(2)]],
                              uint gid [[thread_position_in_grid]],
                              uint grid [[threads_per_grid]]) {
  uint4 acc = uint4(0);
  for (uint i = gid; i < n; i += grid) acc ^= src[i];
  const uint x = acc.x ^ acc.y ^ acc.z ^ acc.w;
  if (x == 0x9E3779B9u) sink[0] = x;  // depends on every load; practically never true
}
)msl";

}  // namespace

Bandwidth measure_bandwidth(int index) {
  static std::mutex* mutex = new std::mutex;
  static auto* cache = new std::map<int, Bandwidth>;
  Context& ctx = context(index, "metal_bandwidth");
  std::lock_guard<std::mutex> lock(*mutex);
  auto it = cache->find(index);
  if (it != cache->end()) return it->second;

  Bandwidth bw;
  @autoreleasepool {
    id<MTLDevice> d = ctx.device;
    // 1 GiB per buffer, less where the working set is small: far past any system-level cache.
    uint64_t bytes = std::min<uint64_t>((uint64_t)1 << 30, d.recommendedMaxWorkingSetSize / 8);
    bytes = bytes / (1 << 20) * (1 << 20);
    if (bytes < ((uint64_t)64 << 20))
      throw UnsupportedError("[metal_bandwidth] too small a working set to measure");
    id<MTLBuffer> a = new_buffer(d, (int64_t)bytes, MTLResourceStorageModePrivate, "metal_bandwidth");
    id<MTLBuffer> b = new_buffer(d, (int64_t)bytes, MTLResourceStorageModePrivate, "metal_bandwidth");
    id<MTLBuffer> sink = new_buffer(d, 16, MTLResourceStorageModeShared, "metal_bandwidth");
    id<MTLCommandQueue> queue = ctx.new_queue(4);
    NSError* err = nil;
    id<MTLLibrary> lib = [d newLibraryWithSource:[NSString stringWithUTF8String:kReadProbeSource]
                                         options:nil
                                           error:&err];
    if (!lib) KV_METAL_FAIL("[metal_bandwidth] compiling the read probe", err);
    id<MTLFunction> fn = [lib newFunctionWithName:@"kv_bandwidth_read"];
    if (!fn) KV_METAL_FAIL("[metal_bandwidth] kv_bandwidth_read missing", nil);
    id<MTLComputePipelineState> read = [d newComputePipelineStateWithFunction:fn error:&err];
    if (!read) KV_METAL_FAIL("[metal_bandwidth] read probe pipeline", err);

    const int reps = 10;
    double best_copy = 1e30, best_read = 1e30;
    const uint32_t n = (uint32_t)(bytes / 16);
    for (int i = 0; i < reps + 2; ++i) {  // two warm-up rounds
      @autoreleasepool {
        id<MTLCommandBuffer> cb = new_command_buffer(queue);
        id<MTLBlitCommandEncoder> blit = [cb blitCommandEncoder];
        [blit copyFromBuffer:a sourceOffset:0 toBuffer:b destinationOffset:0
                        size:(NSUInteger)bytes];
        [blit endEncoding];
        [cb commit];
        wait_completed(cb, "metal_bandwidth copy");
        if (i >= 2) best_copy = std::min(best_copy, gpu_us(cb, "metal_bandwidth copy"));

        id<MTLCommandBuffer> rb = new_command_buffer(queue);
        id<MTLComputeCommandEncoder> enc = [rb computeCommandEncoder];
        [enc setComputePipelineState:read];
        [enc setBuffer:a offset:0 atIndex:0];
        [enc setBuffer:sink offset:0 atIndex:1];
        [enc setBytes:&n length:sizeof(n) atIndex:2];
        const NSUInteger threads = std::min<NSUInteger>(256, read.maxTotalThreadsPerThreadgroup);
        [enc dispatchThreadgroups:MTLSizeMake(4096, 1, 1)
            threadsPerThreadgroup:MTLSizeMake(threads, 1, 1)];
        [enc endEncoding];
        [rb commit];
        wait_completed(rb, "metal_bandwidth read");
        if (i >= 2) best_read = std::min(best_read, gpu_us(rb, "metal_bandwidth read"));
      }
    }
    bw.bytes = (int64_t)bytes;
    bw.reps = reps;
    bw.copy_gbps = 2.0 * (double)bytes / (best_copy * 1e-6) / 1e9;
    bw.read_gbps = (double)bytes / (best_read * 1e-6) / 1e9;
  }
  (*cache)[index] = bw;
  return bw;
}

std::unique_ptr<PreparedOp> make_metal_op(const OpInputs& in, const DeviceOptions& opt,
                                          const SubmitOptions& submit) {
  return std::make_unique<MetalOp>(in, opt, submit);
}

}  // namespace metal
}  // namespace kvmicro
