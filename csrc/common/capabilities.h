// The support matrix of kvmicro's native kernels, in one place: per device and op, the dtypes, the
// head dims and the kernel variants. The planners refuse what is not here (Unsupported naming the
// value and this list), `_native.capabilities()` hands it to Python, where the native backends'
// supports() read it, and tests/test_native_capabilities.py checks it against the kernels'
// instantiation lists (cuda/attention_plan.cuh's pickers, probed through cuda_instantiations()).
//
// Plain C++ (no CUDA, no pybind11): bindings.cpp, the CPU and the CUDA code all include it.
#pragma once

#include <cstdint>
#include <string>

#include "params.h"

namespace kvmicro {
namespace caps {

constexpr DType kAllDTypes[] = {DType::kFloat16, DType::kBFloat16, DType::kFloat32};
constexpr DType kTensorCoreDTypes[] = {DType::kFloat16, DType::kBFloat16};

// CUDA attention (sdpa_contiguous, paged_sdpa, gather_sdpa's attention half), SIMT kernel: every
// dtype, these head dims, 1/4/8 query heads per block, 16-byte and (paged) strided paths.
constexpr int32_t kCudaAttentionHeadDims[] = {64, 80, 96, 128, 256};
constexpr int32_t kCudaSimtHeadsPerBlock[] = {1, 4, 8};
// Tensor-core kernels (mma: L2 prefetch 0 / 128 B; async and bulk: 2 / 3 stages): float16/bfloat16,
// D innermost, head_dim a multiple of 32 up to 128, compute capability 8.0+ (bulk: 9.0+, and
// combine=separate only).
constexpr int32_t kCudaTensorCoreHeadDims[] = {64, 96, 128};
constexpr int32_t kCudaMmaPrefetch[] = {0, 128};
constexpr int32_t kCudaAsyncStages[] = {2, 3};
constexpr int32_t kCudaBulkStages[] = {2, 3};

template <class T, int32_t N>
constexpr bool contains(const T (&list)[N], T value) {
  for (int32_t i = 0; i < N; ++i)
    if (list[i] == value) return true;
  return false;
}

inline bool cuda_attention_head_dim(int32_t d) { return contains(kCudaAttentionHeadDims, d); }
inline bool cuda_tensor_core_head_dim(int32_t d) { return contains(kCudaTensorCoreHeadDims, d); }
inline bool tensor_core_dtype(int32_t dtype) {
  return dtype == (int32_t)DType::kFloat16 || dtype == (int32_t)DType::kBFloat16;
}

// "64, 80, 96, 128, 256": a list as messages quote it.
template <int32_t N>
inline std::string list_string(const int32_t (&list)[N]) {
  std::string out;
  for (int32_t i = 0; i < N; ++i) out += (i ? ", " : "") + std::to_string(list[i]);
  return out;
}

}  // namespace caps
}  // namespace kvmicro
