// What every CUDA file of kvmicro shares: the checked-call macro, element types by DType, and
// 16-byte vector loads/stores converted to float. Kernels take their addresses from
// common/layout.h (PoolView); nothing here knows a layout.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "common/device.h"

namespace kvmicro {
namespace cuda {

[[noreturn]] void throw_cuda_error(cudaError_t err, const char* call, const char* file, int line);

// Every CUDA runtime call goes through this: a failure becomes DeviceError (Python RuntimeError)
// carrying CUDA's text and the call, so a broken launch is never silently timed.
#define KV_CUDA_CHECK(call)                                                          \
  do {                                                                               \
    cudaError_t kv_err_ = (call);                                                    \
    if (kv_err_ != cudaSuccess) ::kvmicro::cuda::throw_cuda_error(kv_err_, #call, __FILE__, __LINE__); \
  } while (0)

// After each <<<...>>>: launch-configuration errors surface only through cudaGetLastError.
#define KV_CUDA_CHECK_LAUNCH(what) KV_CUDA_CHECK(cudaGetLastError())

// ---- element types ---------------------------------------------------------------------------

template <DType>
struct Elem;
template <>
struct Elem<DType::kFloat16> {
  using T = __half;
};
template <>
struct Elem<DType::kBFloat16> {
  using T = __nv_bfloat16;
};
template <>
struct Elem<DType::kFloat32> {
  using T = float;
};

// One 16-byte vector: 8 half-width or 4 float elements.
template <typename T>
struct Vec {
  static constexpr int kElems = 16 / (int)sizeof(T);
};

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(float x) { return x; }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }

// Unpack one 16-byte vector into floats.
__device__ __forceinline__ void unpack(const uint4& v, float (&out)[8], __half) {
  const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 f = __half22float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void unpack(const uint4& v, float (&out)[8], __nv_bfloat16) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 f = __bfloat1622float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void unpack(const uint4& v, float (&out)[4], float) {
  out[0] = __uint_as_float(v.x);
  out[1] = __uint_as_float(v.y);
  out[2] = __uint_as_float(v.z);
  out[3] = __uint_as_float(v.w);
}

// Read-only 16-byte load through the non-coherent path. Not `.cs` (evict-first): the hot-cache
// policy deliberately measures K/V that stay in L2 between calls.
__device__ __forceinline__ uint4 load16(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

inline int ceil_div(int64_t a, int64_t b) { return (int)((a + b - 1) / b); }

}  // namespace cuda
}  // namespace kvmicro
