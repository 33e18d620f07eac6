// Kernel variant knobs: what the caller asked the planner for, beyond the case's shape. They reach
// C++ as arguments of prepare (Python: the backend's case options, `native:cuda[kernel=mma]`),
// are parsed and validated here once, and the planners read only this struct: no environment
// variable enters a plan, so a record's options say exactly what ran.
//
// Every value arrives as text (the form a backend spec carries) and validate.h's parse_variant()
// parses it strictly: a number must be all digits and in range, a choice one of its names;
// anything else is an InvalidArgument that quotes the option, the value and what is valid, e.g.
//   [paged_sdpa] option stages=5 is not one of 2, 3
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace kvmicro {

enum class AttnKernel : int32_t {
  kAuto = 0,   // the planner's choice (docs/cuda.md)
  kSimt = 1,   // CUDA cores, any dtype / head_dim / layout
  kMma = 2,    // tensor cores, register loads
  kAsync = 3,  // tensor cores, cp.async pipeline
  kBulk = 4,   // tensor cores, bulk-copy pipeline (sm_90+)
};

inline const char* attn_kernel_name(AttnKernel k) {
  switch (k) {
    case AttnKernel::kAuto: return "auto";
    case AttnKernel::kSimt: return "simt";
    case AttnKernel::kMma: return "mma";
    case AttnKernel::kAsync: return "async";
    case AttnKernel::kBulk: return "bulk";
  }
  return "unknown";
}

// How the context splits' partial states become the output (docs/cuda.md).
enum class AttnCombine : int32_t {
  kSeparate = 0,  // a second kernel merges them (under programmatic dependent launch on sm_90+)
  kLast = 1,      // one launch: the last split block of a (sequence, kv head, head tile) merges
  kCluster = 2,   // one launch: the splits of a (sequence, kv head, head tile) form a thread block
                  // cluster (sm_90+) and merge through distributed shared memory
};

inline const char* attn_combine_name(AttnCombine c) {
  switch (c) {
    case AttnCombine::kSeparate: return "separate";
    case AttnCombine::kLast: return "last";
    case AttnCombine::kCluster: return "cluster";
  }
  return "unknown";
}

// When the attention's split kernel may be scheduled relative to the kernel before it in the
// stream (sm_90+; docs/cuda.md). Under exit and early it is a programmatic dependent of that
// kernel and waits for it (griddepcontrol.wait) before its first read.
enum class PdlEntry : int32_t {
  kOff = 0,    // stream order: once the kernel before has completed
  kExit = 1,   // as the blocks of the kernel before exit
  kEarly = 2,  // as kExit, and the combine kernel allows it once its own wait is over
  kAuto = 3,   // the planner's choice per plan (cuda/attention_plan.cuh: auto_pdl_entry)
};

inline const char* pdl_entry_name(PdlEntry e) {
  switch (e) {
    case PdlEntry::kOff: return "off";
    case PdlEntry::kExit: return "exit";
    case PdlEntry::kEarly: return "early";
    case PdlEntry::kAuto: return "auto";
  }
  return "unknown";
}

// Which tokens of its sequence a split kernel's thread block reads (docs/cuda.md).
enum class AttnSchedule : int32_t {
  kStatic = 0,  // its split's fixed range of chunk tokens
  kSteal = 1,   // its warps' first tiles fixed, the rest claimed one 16-key tile at a time from a
                // counter per (sequence, kv head x head tile): the split blocks of a sequence end
                // together however fast their SMs stream (cp.async kernel, combine=separate)
};

inline const char* attn_schedule_name(AttnSchedule s) {
  switch (s) {
    case AttnSchedule::kStatic: return "static";
    case AttnSchedule::kSteal: return "steal";
  }
  return "unknown";
}

// The most context splits a plan may use (the combine kernel's shared-memory bound).
constexpr int kVariantMaxSplits = 512;

struct Variant {
  // ---- CUDA attention (sdpa_contiguous, paged_sdpa, gather_sdpa's attention half) ----
  AttnKernel kernel = AttnKernel::kAuto;
  int32_t splits = 0;         // context splits; 0 = the planner's choice, else forced (1..512)
  int32_t min_chunk = 64;     // fewest tokens per split the planner may choose
  int32_t blocks_per_sm = 2;  // tensor-core split rule: thread blocks per SM it aims at
  int32_t stages = 2;         // pipeline depth of the async and bulk kernels (2 or 3)
  int32_t l2_prefetch = 128;  // L2 prefetch hint of the mma kernel's loads, bytes (0 or 128)
  bool pdl = true;            // combine pass under programmatic dependent launch (sm_90+)
  PdlEntry pdl_entry = PdlEntry::kAuto;  // the split kernel under PDL after the previous kernel
  // at most ceil(blocks / SMs) split blocks resident per SM (its shared memory padded)
  bool spread = false;
  AttnCombine combine = AttnCombine::kSeparate;  // combine kernel, last block, or cluster
  AttnSchedule schedule = AttnSchedule::kStatic;  // fixed split ranges, or tiles claimed
  // ---- CPU ----
  bool simd = true;           // AVX2/F16C/FMA kernels where the CPU has them (else portable)
};

// Option names each device takes, in the order messages list them.
inline const std::vector<std::string>& variant_keys(const std::string& device) {
  static const std::vector<std::string> cuda{"kernel", "splits",      "min_chunk", "blocks_per_sm",
                                             "stages", "l2_prefetch", "pdl",       "pdl_entry",
                                             "spread", "combine",     "schedule"};
  static const std::vector<std::string> cpu{"simd"};
  static const std::vector<std::string> none;
  if (device == "cuda") return cuda;
  if (device == "cpu") return cpu;
  return none;
}

}  // namespace kvmicro
