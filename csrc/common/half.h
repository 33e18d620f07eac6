// float16 / bfloat16 <-> float32 conversion for host code (CPU kernels, bindings, CUDA/Metal host).
//
// The scalar functions are portable and exact: they implement IEEE binary16 and bfloat16 with
// round-to-nearest-even, subnormals, infinities and NaN, independent of the FPU's rounding mode, so
// every build (gcc or clang, x86-64 or arm64) writes the same bits. They agree bit for bit with
// F16C's vcvtph2ps / vcvtps2ph (NaNs come out quiet, payload kept, as there) and with numpy /
// kvmicro.dtypes on every non-NaN value.
//
// On x86-64 with gcc or clang, row converters with F16C are compiled per function (target
// attribute) and chosen at run time with __builtin_cpu_supports, so one build runs on any x86-64
// and never needs a global -march flag.
#pragma once

#include <cstdint>
#include <cstring>

// nvcc's host pass is left out: its front end need not accept target attributes.
// -DKVMICRO_PORTABLE_ONLY builds what a non-x86 machine builds (to check that path compiles).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__) && \
    !defined(KVMICRO_PORTABLE_ONLY)
#define KVMICRO_X86_SIMD 1
#include <immintrin.h>
// Functions carrying this attribute may only be called after cpu_has_avx2_f16c_fma() said yes.
#define KV_TARGET_AVX2 __attribute__((target("avx2,f16c,fma")))
#else
#define KVMICRO_X86_SIMD 0
#endif

namespace kvmicro {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    // Zero or subnormal: mant * 2^-24 is exact in float32 (mant < 2^10, power-of-two scale).
    const float mag = (float)mant * 5.9604644775390625e-8f;
    return bits_float(float_bits(mag) | sign);
  }
  if (exp == 31) {  // inf, or NaN made quiet with its payload (as vcvtph2ps does)
    return bits_float(sign | 0x7f800000u | (mant << 13) | (mant ? 0x400000u : 0u));
  }
  return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

inline uint16_t f32_to_f16(float f) {
  const uint32_t x = float_bits(f);
  const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
  const uint32_t a = x & 0x7fffffffu;
  if (a >= 0x7f800000u) {  // inf, or NaN made quiet with its top payload bits (as vcvtps2ph does)
    return (uint16_t)(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u | ((a >> 13) & 0x3ffu) : 0u));
  }
  if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // >= 65520 rounds past 65504
  if (a >= 0x38800000u) {                                     // normal half (>= 2^-14)
    uint32_t h = ((a >> 23) - 112u) << 10 | ((a >> 13) & 0x3ffu);
    const uint32_t rest = a & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is right
    return (uint16_t)(sign | h);
  }
  if (a <= 0x33000000u) return sign;  // <= 2^-25: rounds to zero (the tie goes to even zero)
  // Subnormal half: units of 2^-24. value = m * 2^(e - 150), so units = m >> (126 - e).
  const uint32_t e = a >> 23;
  const uint32_t m = (a & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - e;  // 14..24
  uint32_t h = m >> shift;
  const uint32_t rest = m & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  if (rest > half || (rest == half && (h & 1u))) ++h;  // 1024 becomes the smallest normal: right
  return (uint16_t)(sign | h);
}

inline float bf16_to_f32(uint16_t h) { return bits_float((uint32_t)h << 16); }

inline uint16_t f32_to_bf16(float f) {
  const uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);  // quiet NaN
  return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);  // RNE; overflow lands on inf
}

// ---- rows -------------------------------------------------------------------------------------

#if KVMICRO_X86_SIMD
inline bool cpu_has_avx2_f16c_fma() {
  // Evaluated once: __builtin_cpu_supports reads cpuid (and the OS's XSAVE state for AVX).
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }();
  return yes;
}

KV_TARGET_AVX2 inline void f16_to_f32_row_f16c(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(src + i))));
  for (; i < n; ++i) dst[i] = f16_to_f32(src[i]);
}

KV_TARGET_AVX2 inline void f32_to_f16_row_f16c(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128((__m128i*)(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) dst[i] = f32_to_f16(src[i]);
}
#else
inline bool cpu_has_avx2_f16c_fma() { return false; }
#endif

inline void f16_to_f32_row(const uint16_t* src, float* dst, int64_t n) {
#if KVMICRO_X86_SIMD
  if (cpu_has_avx2_f16c_fma()) return f16_to_f32_row_f16c(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_f32(src[i]);
}

inline void f32_to_f16_row(const float* src, uint16_t* dst, int64_t n) {
#if KVMICRO_X86_SIMD
  if (cpu_has_avx2_f16c_fma()) return f32_to_f16_row_f16c(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_f16(src[i]);
}

inline void bf16_to_f32_row(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
}

inline void f32_to_bf16_row(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
}

}  // namespace kvmicro
