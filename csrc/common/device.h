// The one C++ device abstraction behind kvmicro._native: CPU, CUDA and Metal each implement
// PreparedOp, and bindings.cpp only converts numpy arrays into OpInputs, calls validate_inputs()
// (csrc/common/validate.h) once, and hands them to make_<device>_op().
//
// Plan once, run many: a factory uploads the inputs (`copies` independent sets, for cache
// rotation), picks the kernel and sizes its scratch; run() only dispatches.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "params.h"
#include "variant.h"

namespace kvmicro {

// A refusal that is not an input error: Python sees kvmicro.Unsupported.
struct UnsupportedError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// Bad input: Python sees kvmicro.InvalidCase (a ValueError).
struct InvalidArgument : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};
// A device API call failed (CUDA / Metal error text included): Python sees RuntimeError.
struct DeviceError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Host-side inputs of one op. 16-bit dtypes arrive as their bit patterns (uint16); float32 as
// float. Element counts follow from `params`; pointers not used by `op` may be null.
struct OpInputs {
  OpKind op;
  OpParams params;         // pool view, shape, scale, dtype
  const void* q;           // [B, Hq, q_len, D]
  const void* k_pool;      // pool.num_elements() elements, in the layout `params.pool` describes
  const void* v_pool;
  const int32_t* table;    // [B, max_blocks], -1 padded
  const int32_t* ctx;      // [B]
  const void* k_dense;     // [B, Hkv, max_ctx_pad, D]
  const void* v_dense;
  const void* k_new;       // [B, Hkv, D]
  const void* v_new;

  // The host pointer behind a buffer slot (null for the output and for absent inputs).
  const void* host(BufferIndex which) const {
    switch (which) {
      case kBufQ: return q;
      case kBufKPool: return k_pool;
      case kBufVPool: return v_pool;
      case kBufTable: return table;
      case kBufCtx: return ctx;
      case kBufKDense: return k_dense;
      case kBufVDense: return v_dense;
      case kBufKNew: return k_new;
      case kBufVNew: return v_new;
      default: return nullptr;
    }
  }
};

inline int64_t dtype_size(int32_t dtype) { return dtype == (int32_t)DType::kFloat32 ? 4 : 2; }

// Element counts of each buffer slot for these params.
inline int64_t buffer_elements(const OpParams& p, BufferIndex which) {
  const int64_t B = p.batch, Hq = p.q_heads, Hkv = p.pool.kv_heads, D = p.pool.head_dim;
  switch (which) {
    case kBufQ:
    case kBufOut: return B * Hq * p.q_len * D;
    case kBufKPool:
    case kBufVPool: return p.pool.num_elements();
    case kBufTable: return B * p.max_blocks;
    case kBufCtx: return B;
    case kBufKDense:
    case kBufVDense: return B * Hkv * p.max_ctx_pad * D;
    case kBufKNew:
    case kBufVNew: return B * Hkv * D;
    default: return 0;
  }
}

// Bytes of a buffer slot: int32 for the table and contexts, the dtype for everything else.
inline int64_t buffer_bytes(const OpParams& p, BufferIndex which) {
  const int64_t item = which == kBufTable || which == kBufCtx ? 4 : dtype_size(p.dtype);
  return buffer_elements(p, which) * item;
}

class PreparedOp {
 public:
  virtual ~PreparedOp() = default;
  // Dispatch one op on the current copy; returns without waiting on asynchronous devices.
  virtual void run() = 0;
  // Wait until every dispatched op has completed (rethrows a device error).
  virtual void sync() = 0;
  virtual int copies() const = 0;
  virtual void select(int copy) = 0;
  // Copy buffer `which` of the current copy to `dst` (buffer_elements * dtype size bytes; int32
  // for table/ctx). Synchronizes first.
  virtual void download(BufferIndex which, void* dst) = 0;
  // Write `bytes` of scratch memory on the device, so that the next op starts with a cold
  // last-level cache. Outside any timed window.
  virtual void flush(int64_t bytes) = 0;
  // `reps` samples of one op each, in microseconds, between device-side timestamps (CUDA
  // events / Metal GPU times / a steady clock after a full sync on CPU), flushing `flush_bytes`
  // before each sample outside the timed window.
  virtual std::vector<double> device_times_us(int reps, int64_t flush_bytes) = 0;
  // `reps` samples of the per-op time of `k` ops captured once and replayed: cycling through the
  // copies when `rotate` (cold:rotate), else all k on the current copy (hot). Throws
  // UnsupportedError where the device has no graphs.
  virtual std::vector<double> graph_times_us(int reps, int k, bool rotate) = 0;
  // Overwrite the current copy's outputs with all-ones bits (NaN), so that a check after the
  // next run() proves that this run wrote them (not an earlier one). Synchronizes.
  virtual void poison_outputs() { throw UnsupportedError("poison_outputs: not implemented here"); }
  // The kernel chosen at prepare and why (a fallback names its reason), for records and tests.
  virtual std::string describe() const { return std::string(); }
};

struct DeviceOptions {
  int index = 0;         // device ordinal (CUDA) or 0
  int priority = 0;      // -1 low, 0 normal, 1 high (stream / queue priority where the device has it)
  int threads = 0;       // CPU worker threads; 0 = hardware concurrency
  int copies = 1;        // independent input sets to upload
  Variant variant;       // kernel variant knobs (validated by parse_variant in validate.h)
};

std::unique_ptr<PreparedOp> make_cpu_op(const OpInputs& in, const DeviceOptions& opt);
#if defined(KVMICRO_WITH_CUDA)
std::unique_ptr<PreparedOp> make_cuda_op(const OpInputs& in, const DeviceOptions& opt);
#endif

}  // namespace kvmicro
