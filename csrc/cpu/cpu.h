// What the CPU op files share: owned buffers, the persistent thread pool, one copy's buffer set,
// and the entry point of each op family (one family per .cpp file).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include "common/device.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace kvmicro {
namespace cpu {

// An owned byte buffer, 64-byte aligned (rows start on a cache line) or 2 MiB aligned when large.
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(int64_t bytes) { reset(bytes); }
  AlignedBuffer(AlignedBuffer&& o) noexcept : data_(o.data_), bytes_(o.bytes_), align_(o.align_) {
    o.data_ = nullptr;
    o.bytes_ = 0;
  }
  AlignedBuffer& operator=(AlignedBuffer&& o) noexcept {
    if (this != &o) {
      release();
      data_ = o.data_;
      bytes_ = o.bytes_;
      align_ = o.align_;
      o.data_ = nullptr;
      o.bytes_ = 0;
    }
    return *this;
  }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  ~AlignedBuffer() { release(); }

  void reset(int64_t bytes) {
    release();
    if (bytes <= 0) return;
    // Large buffers (pools, dense K/V) get 2 MiB alignment and, on Linux, transparent huge pages:
    // a kv head's rows of a paged pool are spread over every 4 KiB page of every block, so with
    // small pages nearly each row costs a TLB miss (and a two-level walk under a hypervisor).
    align_ = bytes >= kHugeThreshold ? kHugePage : 64;
    const size_t rounded = ((size_t)bytes + align_ - 1) / align_ * align_;
    data_ = ::operator new(rounded, std::align_val_t(align_));
    bytes_ = bytes;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (align_ == kHugePage) madvise(data_, rounded, MADV_HUGEPAGE);  // a hint: failure is fine
#endif
  }
  void* data() const { return data_; }
  int64_t bytes() const { return bytes_; }
  template <class T>
  T* as() const { return static_cast<T*>(data_); }

 private:
  static constexpr size_t kHugePage = size_t(2) << 20;
  static constexpr int64_t kHugeThreshold = int64_t(4) << 20;

  void release() {
    if (data_) ::operator delete(data_, std::align_val_t(align_));
    data_ = nullptr;
    bytes_ = 0;
  }
  void* data_ = nullptr;
  int64_t bytes_ = 0;
  size_t align_ = 64;
};

// A pool of `threads - 1` persistent workers plus the calling thread, created once at prepare
// (UnsupportedError naming the thread when the system cannot start one).
// run() hands out task indices [0, n) dynamically (an atomic counter) and returns when all are
// done. Idle workers spin briefly before sleeping, so back-to-back runs (a decode loop, the
// batched timer) do not pay a futex wake-up per op.
class ThreadPool {
 public:
  using TaskFn = void (*)(void* ctx, int64_t task, int worker);

  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return (int)workers_.size() + 1; }
  void run(int64_t n, TaskFn fn, void* ctx);

 private:
  void worker_main(int id);
  void drain(int worker);
  void stop_workers();  // ask every worker to return, and join them

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int64_t> next_{0};
  std::atomic<int> pending_{0};  // workers yet to finish the current generation
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
  std::mutex done_mu_;  // the caller sleeps on done_cv_ when the last tasks take long
  std::condition_variable done_cv_;
  std::atomic<bool> caller_waiting_{false};
  int64_t n_ = 0;
  TaskFn fn_ = nullptr;
  void* ctx_ = nullptr;
};

// One copy's buffers (raw pointers into the op's AlignedBuffers; null where the op has none).
struct Buffers {
  const void* q = nullptr;
  void* k_pool = nullptr;
  void* v_pool = nullptr;
  const int32_t* table = nullptr;
  const int32_t* ctx = nullptr;
  void* k_dense = nullptr;
  void* v_dense = nullptr;
  const void* k_new = nullptr;
  const void* v_new = nullptr;
  void* out = nullptr;
};

// Whether the AVX2/F16C/FMA kernels can run here: compiled in and the CPU has them. A case may
// still ask for the portable kernels (option simd=0, Variant::simd), which lets tests check that
// path on x86.
bool simd_available();

// ---- attention (attention.cpp, sdpa_contiguous.cpp, paged_sdpa.cpp) --------------------------

// Tokens per online-softmax step: scores for this many keys are computed, then one rescale.
constexpr int kChunk = 16;

// Running softmax state of one (sequence, kv head) task: per query head of the GQA group, the
// running max m (log2 domain), the running sum l and the unnormalised output acc[D].
struct SoftmaxState {
  float* m;    // [group]
  float* l;    // [group]
  float* acc;  // [group][head_dim]
  float* tmp;  // [2 * kChunk][head_dim] conversion scratch for the portable kernel
};

// Fold `n` (<= kChunk) keys/values into `st`. q: [group][head_dim] float32, already multiplied by
// scale * log2(e). Rows hold head_dim elements of the kernel's dtype, contiguous.
using ChunkKernel = void (*)(const float* q, int group, int head_dim, const void* const* k_rows,
                             const void* const* v_rows, int n, const SoftmaxState& st);

struct AttentionPlan {
  OpParams p;
  int heads_per_task = 1;   // kv heads one task serves together (all where a slot keeps its heads
                            // side by side, NSHD; one where each head's rows are apart, HNSD)
  int splits = 1;           // token ranges per (sequence, heads); partial states combined after
  bool strided = false;     // D not innermost: rows are converted into float scratch first
  bool simd = false;        // AVX2/F16C/FMA chunk kernel (else portable)
  ChunkKernel kernel = nullptr;
  int64_t worker_floats = 0;   // scratch floats each worker needs
  int64_t partial_floats = 0;  // scratch floats for split partial states
  std::string name;            // which kernel and why, for PreparedOp.kernel
};

// `simd`: the case allows the AVX2/F16C/FMA kernels (Variant::simd); they run where available.
AttentionPlan plan_attention(const OpParams& p, OpKind op, int threads, bool simd);

// Scratch owned by the op, sized by the plan.
struct AttentionScratch {
  AlignedBuffer workers;   // threads x worker_floats
  AlignedBuffer partials;  // partial_floats
};

void sdpa_contiguous(const AttentionPlan& plan, const Buffers& buf, ThreadPool& pool,
                     AttentionScratch& scratch);
void paged_sdpa(const AttentionPlan& plan, const Buffers& buf, ThreadPool& pool,
                AttentionScratch& scratch);

// ---- data movement (gather.cpp, append.cpp) --------------------------------------------------

// Copy the blocks covering each sequence's ctx, whole, into k_dense/v_dense (positions past the
// last block are never written: the op zeroes them once at prepare).
void gather(const OpParams& p, const Buffers& buf, ThreadPool& pool);
// Write k_new/v_new at logical position ctx[b] of every sequence.
void append(const OpParams& p, const Buffers& buf);

}  // namespace cpu
}  // namespace kvmicro
