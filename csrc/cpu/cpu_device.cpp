// The CPU device: the persistent thread pool and the CPU PreparedOp (make_cpu_op).
//
// prepare (the constructor) copies `copies` independent input sets into aligned buffers (huge
// pages for pools), allocates outputs and scratch, plans the kernel and starts the threads.
// run() only dispatches, and computes synchronously on the calling thread plus the pool, so
// sync() has nothing to wait for. device_times_us() reads a steady clock around run(), after the
// flush.
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "attention.h"
#include "common/half.h"
#include "common/validate.h"
#include "cpu.h"

namespace kvmicro {
namespace cpu {

namespace {

inline void cpu_relax() {
#if KVMICRO_X86_SIMD
  _mm_pause();
#elif defined(__aarch64__) && (defined(__GNUC__) || defined(__clang__))
  __asm__ __volatile__("yield");
#endif
}

// An idle worker spins (pause) for kWorkerSpin, then yields until kWorkerYield, then sleeps: the
// gap between two ops of a timing loop (a few µs of Python) never pays a futex wake-up, and a
// worker does not burn a core long once measuring stops or another process wants it.
constexpr auto kWorkerSpin = std::chrono::microseconds(200);
constexpr auto kWorkerYield = std::chrono::microseconds(2000);
// How long the caller spins for the workers' last tasks before it sleeps.
constexpr auto kCallerSpin = std::chrono::microseconds(50);

}  // namespace

bool simd_available() {
#if KVMICRO_X86_SIMD
  return cpu_has_avx2_f16c_fma();
#else
  return false;
#endif
}

// ---- ThreadPool --------------------------------------------------------------------------------

ThreadPool::ThreadPool(int threads) {
  try {
    for (int id = 1; id < threads; ++id) workers_.emplace_back([this, id] { worker_main(id); });
  } catch (const std::exception& err) {
    // A constructor that throws runs no destructor: stop and join the workers already started
    // here, or they would wait forever on a condition variable being destroyed under them.
    const int started = (int)workers_.size() + 1;
    stop_workers();
    throw UnsupportedError("[native:cpu] could not start thread " + std::to_string(started) +
                           " of " + std::to_string(threads) + " (" + err.what() +
                           "); ask for fewer threads");
  }
}

ThreadPool::~ThreadPool() { stop_workers(); }

void ThreadPool::stop_workers() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_.store(true);
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
  workers_.clear();
}

void ThreadPool::drain(int worker) {
  for (;;) {
    const int64_t i = next_.fetch_add(1, std::memory_order_relaxed);
    if (i >= n_) return;
    fn_(ctx_, i, worker);
  }
}

void ThreadPool::run(int64_t n, TaskFn fn, void* ctx) {
  if (n <= 0) return;
  if (workers_.empty() || n == 1) {
    for (int64_t i = 0; i < n; ++i) fn(ctx, i, 0);
    return;
  }
  n_ = n;
  fn_ = fn;
  ctx_ = ctx;
  next_.store(0, std::memory_order_relaxed);
  pending_.store((int)workers_.size(), std::memory_order_relaxed);
  // seq_cst pairs with the sleeper's increment-then-check below (no lost wake-up); it also
  // publishes n_, fn_, ctx_ to the workers that see the new generation.
  generation_.fetch_add(1, std::memory_order_seq_cst);
  if (sleepers_.load(std::memory_order_seq_cst) > 0) {
    std::lock_guard<std::mutex> lock(mu_);
    cv_.notify_all();
  }
  drain(0);
  // The workers are finishing their last tasks: spin a little, then sleep (a worker descheduled
  // by another process must not cost a spinning core).
  const auto start = std::chrono::steady_clock::now();
  for (int spins = 1; pending_.load(std::memory_order_acquire) != 0; ++spins) {
    cpu_relax();
    if ((spins & 63) == 0 && std::chrono::steady_clock::now() - start > kCallerSpin) {
      std::unique_lock<std::mutex> lock(done_mu_);
      caller_waiting_.store(true, std::memory_order_seq_cst);
      done_cv_.wait(lock, [&] { return pending_.load(std::memory_order_seq_cst) == 0; });
      caller_waiting_.store(false, std::memory_order_relaxed);
      break;
    }
  }
}

void ThreadPool::worker_main(int id) {
  uint64_t seen = 0;
  for (;;) {
    const auto idle_since = std::chrono::steady_clock::now();
    uint64_t gen;
    for (int spins = 1; (gen = generation_.load(std::memory_order_acquire)) == seen; ++spins) {
      if (stop_.load(std::memory_order_relaxed)) return;
      if ((spins & 63) != 0) {
        cpu_relax();
        continue;
      }
      const auto idle = std::chrono::steady_clock::now() - idle_since;
      if (idle < kWorkerSpin) continue;
      if (idle < kWorkerYield) {
        std::this_thread::yield();  // gives the core away only if someone else wants it
        continue;
      }
      std::unique_lock<std::mutex> lock(mu_);
      sleepers_.fetch_add(1, std::memory_order_seq_cst);
      cv_.wait(lock, [&] {
        return generation_.load(std::memory_order_seq_cst) != seen || stop_.load();
      });
      sleepers_.fetch_sub(1, std::memory_order_seq_cst);
    }
    seen = gen;
    drain(id);
    // seq_cst pairs with the caller's waiting-flag-then-check: no lost wake-up.
    if (pending_.fetch_sub(1, std::memory_order_seq_cst) == 1 &&
        caller_waiting_.load(std::memory_order_seq_cst)) {
      std::lock_guard<std::mutex> lock(done_mu_);
      done_cv_.notify_one();
    }
  }
}

// ---- CpuOp -------------------------------------------------------------------------------------

namespace {

// The buffers each op holds per copy: its inputs (copied) and its outputs / scratch (allocated).
bool holds(OpKind op, BufferIndex which) {
  switch (which) {
    case kBufQ:
    case kBufOut: return is_attention(op);
    case kBufKPool:
    case kBufVPool:
    case kBufTable: return op != OpKind::kSdpaContiguous;
    case kBufCtx: return true;
    case kBufKDense:
    case kBufVDense: return op != OpKind::kPagedSdpa && op != OpKind::kAppend;
    case kBufKNew:
    case kBufVNew: return op == OpKind::kAppend;
    default: return false;
  }
}

// Inputs are copied in; gather's destination and gather_sdpa's scratch start zeroed (the padding
// past each sequence's blocks is never written by a run); the output starts zeroed.
const void* source(const OpInputs& in, BufferIndex which) {
  const bool dense_is_input = in.op == OpKind::kSdpaContiguous;
  if ((which == kBufKDense || which == kBufVDense) && !dense_is_input) return nullptr;
  return in.host(which);
}

class CpuOp final : public PreparedOp {
 public:
  CpuOp(const OpInputs& in, const DeviceOptions& opt) : op_(in.op), p_(in.params) {
    const char* name = op_name(op_);
    if (is_attention(op_) && p_.q_len != 1)
      throw UnsupportedError(
          op_message(name, "native:cpu implements decode only (q_len 1); got q_len ", p_.q_len));
    if (opt.copies < 1) invalid(name, "copies ", opt.copies, " must be >= 1");
    if (opt.threads < 0) invalid(name, "threads ", opt.threads, " must be >= 0 (0 = all cores)");
    threads_ = opt.threads > 0 ? opt.threads
                               : std::max(1, (int)std::thread::hardware_concurrency());

    copies_.resize(opt.copies);
    for (Copy& c : copies_) {
      for (int i = 0; i < kBufCount; ++i) {
        const BufferIndex which = (BufferIndex)i;
        if (!holds(op_, which)) continue;
        const int64_t bytes = buffer_bytes(p_, which);
        c.mem[i].reset(bytes);
        const void* src = source(in, which);
        if (src != nullptr) {
          std::memcpy(c.mem[i].data(), src, (size_t)bytes);
        } else {
          std::memset(c.mem[i].data(), 0, (size_t)bytes);
        }
      }
      Buffers& v = c.view;
      v.q = c.mem[kBufQ].data();
      v.k_pool = c.mem[kBufKPool].data();
      v.v_pool = c.mem[kBufVPool].data();
      v.table = c.mem[kBufTable].as<int32_t>();
      v.ctx = c.mem[kBufCtx].as<int32_t>();
      v.k_dense = c.mem[kBufKDense].data();
      v.v_dense = c.mem[kBufVDense].data();
      v.k_new = c.mem[kBufKNew].data();
      v.v_new = c.mem[kBufVNew].data();
      v.out = c.mem[kBufOut].data();
    }

    if (is_attention(op_)) {
      plan_ = plan_attention(p_, op_, threads_, opt.variant.simd);
      scratch_.workers.reset(threads_ * plan_.worker_floats * (int64_t)sizeof(float));
      scratch_.partials.reset(plan_.partial_floats * (int64_t)sizeof(float));
      describe_ = std::string(name) + ": " + (op_ == OpKind::kGatherSdpa ? "gather, then " : "") +
                  plan_.name;
    } else {
      describe_ = std::string(name) + ": " +
                  (p_.pool.d_contiguous() ? "row copies (D innermost)"
                                          : "element copies (D not innermost)") +
                  ", " + dtype_name(p_.dtype) + ", " +
                  (op_ == OpKind::kAppend ? std::string("calling thread")
                                          : std::to_string(threads_) + " threads");
    }
    pool_ = std::make_unique<ThreadPool>(op_ == OpKind::kAppend ? 1 : threads_);
  }

  void run() override {
    // One op at a time: two Python threads calling run() would otherwise share the pool and the
    // scratch. Uncontended, the lock costs tens of nanoseconds.
    std::lock_guard<std::mutex> lock(run_mu_);
    const Buffers& buf = copies_[current_].view;
    switch (op_) {
      case OpKind::kSdpaContiguous: sdpa_contiguous(plan_, buf, *pool_, scratch_); break;
      case OpKind::kGather: gather(p_, buf, *pool_); break;
      case OpKind::kGatherSdpa:
        gather(p_, buf, *pool_);
        sdpa_contiguous(plan_, buf, *pool_, scratch_);
        break;
      case OpKind::kPagedSdpa: paged_sdpa(plan_, buf, *pool_, scratch_); break;
      case OpKind::kAppend: append(p_, buf); break;
    }
  }

  void sync() override {}  // run() has already completed: nothing is in flight on a CPU
  int copies() const override { return (int)copies_.size(); }

  void select(int copy) override {
    std::lock_guard<std::mutex> lock(run_mu_);
    if (copy < 0 || copy >= (int)copies_.size())
      throw std::out_of_range(op_message(op_name(op_), "copy ", copy, " outside [0, ",
                                         copies_.size(), ")"));
    current_ = copy;
  }

  void download(BufferIndex which, void* dst) override {
    if (which < 0 || which >= kBufCount || !holds(op_, which))
      invalid(op_name(op_), "buffer ", (int)which, " is not held by this op");
    std::lock_guard<std::mutex> lock(run_mu_);
    const AlignedBuffer& mem = copies_[current_].mem[which];
    std::memcpy(dst, mem.data(), (size_t)mem.bytes());
  }

  void flush(int64_t bytes) override {
    if (bytes <= 0) return;
    std::lock_guard<std::mutex> lock(run_mu_);
    if (flush_.bytes() < bytes) flush_.reset(bytes);
    // A new value each time: every line is written (dirty in the cache), displacing the op's data.
    std::memset(flush_.data(), ++flush_value_, (size_t)bytes);
  }

  std::vector<double> device_times_us(int reps, int64_t flush_bytes) override {
    if (reps < 1) invalid(op_name(op_), "reps ", reps, " must be >= 1");
    if (flush_bytes < 0) invalid(op_name(op_), "flush_bytes ", flush_bytes, " must be >= 0");
    std::vector<double> samples;
    samples.reserve(reps);
    for (int i = 0; i < reps; ++i) {
      flush(flush_bytes);
      const auto t0 = std::chrono::steady_clock::now();
      run();
      sync();
      const auto t1 = std::chrono::steady_clock::now();
      samples.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    }
    return samples;
  }

  std::vector<double> graph_times_us(int, int, bool) override {
    throw UnsupportedError(op_message(op_name(op_),
                                      "native:cpu has no graph timer: a CPU has no graph capture "
                                      "(the batched timer is the CPU's steady state)"));
  }

  std::string describe() const override { return describe_; }

 private:
  struct Copy {
    AlignedBuffer mem[kBufCount];
    Buffers view;
  };

  OpKind op_;
  OpParams p_;
  int threads_ = 1;
  std::vector<Copy> copies_;
  int current_ = 0;
  AttentionPlan plan_;
  AttentionScratch scratch_;
  std::unique_ptr<ThreadPool> pool_;
  AlignedBuffer flush_;
  unsigned char flush_value_ = 0;
  std::string describe_;
  std::mutex run_mu_;
};

}  // namespace

}  // namespace cpu

std::unique_ptr<PreparedOp> make_cpu_op(const OpInputs& in, const DeviceOptions& opt) {
  return std::make_unique<cpu::CpuOp>(in, opt);
}

}  // namespace kvmicro
