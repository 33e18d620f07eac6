// Attention building blocks for the CPU: the chunk kernels (AVX2/F16C/FMA and portable), the
// plan (kernel choice, context splits, scratch sizes), query/output conversion and the
// split-combine pass. The driver loop is the template in attention.h.
//
// Softmax runs in the log2 domain: queries are pre-multiplied by scale * log2(e), so every
// exponential is an exp2 (one polynomial, no multiply by log2(e) per key).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "attention.h"
#include "common/half.h"
#include "common/validate.h"

namespace kvmicro {
namespace cpu {

namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kF16 = (int)DType::kFloat16;
constexpr int kBF16 = (int)DType::kBFloat16;
constexpr int kF32 = (int)DType::kFloat32;

// Rounded up to whole cache lines, so every region of the worker scratch starts on one.
int64_t lines(int64_t floats) { return (floats + 15) / 16 * 16; }

// ---- portable chunk kernel ---------------------------------------------------------------------

template <int DT>
void to_float_row(const void* src, int D, float* dst) {
  const uint16_t* h = static_cast<const uint16_t*>(src);
  for (int d = 0; d < D; ++d) dst[d] = DT == kF16 ? f16_to_f32(h[d]) : bf16_to_f32(h[d]);
}

template <int DT>
void chunk_portable(const float* q, int G, int D, const void* const* k_rows,
                    const void* const* v_rows, int n, const SoftmaxState& st) {
  const float* k[kChunk];
  const float* v[kChunk];
  for (int r = 0; r < n; ++r) {
    if (DT == kF32) {
      k[r] = static_cast<const float*>(k_rows[r]);
      v[r] = static_cast<const float*>(v_rows[r]);
    } else {
      float* kf = st.tmp + (int64_t)r * D;
      float* vf = st.tmp + (int64_t)(kChunk + r) * D;
      to_float_row<DT>(k_rows[r], D, kf);
      to_float_row<DT>(v_rows[r], D, vf);
      k[r] = kf;
      v[r] = vf;
    }
  }
  float p[kChunk];
  for (int g = 0; g < G; ++g) {
    const float* qg = q + (int64_t)g * D;
    float chunk_max = -INFINITY;
    for (int r = 0; r < n; ++r) {
      float s = 0.0f;
      for (int d = 0; d < D; ++d) s += qg[d] * k[r][d];
      p[r] = s;
      chunk_max = std::max(chunk_max, s);
    }
    const float m_new = std::max(st.m[g], chunk_max);
    const float alpha = std::exp2(st.m[g] - m_new);  // 0 on the first chunk (m = -inf)
    float sum = 0.0f;
    for (int r = 0; r < n; ++r) {
      p[r] = std::exp2(p[r] - m_new);
      sum += p[r];
    }
    st.l[g] = st.l[g] * alpha + sum;
    st.m[g] = m_new;
    float* acc = st.acc + (int64_t)g * D;
    for (int d = 0; d < D; ++d) acc[d] *= alpha;
    for (int r = 0; r < n; ++r)
      for (int d = 0; d < D; ++d) acc[d] += p[r] * v[r][d];
  }
}

// ---- AVX2 / F16C / FMA chunk kernel ------------------------------------------------------------
#if KVMICRO_X86_SIMD

#if defined(__clang__)
#define KV_UNROLL _Pragma("unroll")
#else
#define KV_UNROLL _Pragma("GCC unroll 16")
#endif

// 8 elements of a row, widened to float.
template <int DT>
KV_TARGET_AVX2 inline __m256 load8(const void* row, int d) {
  if constexpr (DT == kF32) {
    return _mm256_loadu_ps(static_cast<const float*>(row) + d);
  } else {
    const __m128i h = _mm_loadu_si128((const __m128i*)(static_cast<const uint16_t*>(row) + d));
    if constexpr (DT == kF16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));  // bf16: << 16
  }
}

// Lane i of the result = the sum of the 8 lanes of v[i].
KV_TARGET_AVX2 inline __m256 hsum8(const __m256* v) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

KV_TARGET_AVX2 inline float hmax(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}

KV_TARGET_AVX2 inline float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}

// 2^x for x <= 0: 2^round(x) times a degree-6 polynomial of 2^f on f in [-0.5, 0.5] (relative error
// ~1e-7, far below float16/bfloat16 rounding). x <= -127 (and -inf) gives exactly 0; NaN gives NaN.
KV_TARGET_AVX2 inline __m256 exp2_nonpos(__m256 x) {
  // maxps returns its second operand when either is NaN: x second, so a NaN score stays NaN (and
  // poisons the sums, as in the oracle) instead of becoming 2^-127 = 0 and silently dropping a key.
  x = _mm256_max_ps(_mm256_set1_ps(-127.0f), x);
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);
  // Taylor coefficients of e^(f ln 2): (ln 2)^k / k!
  __m256 poly = _mm256_set1_ps(1.5403530393381606e-4f);
  poly = _mm256_fmadd_ps(poly, f, _mm256_set1_ps(1.3333558146428443e-3f));
  poly = _mm256_fmadd_ps(poly, f, _mm256_set1_ps(9.6181291076284772e-3f));
  poly = _mm256_fmadd_ps(poly, f, _mm256_set1_ps(5.5504108664821580e-2f));
  poly = _mm256_fmadd_ps(poly, f, _mm256_set1_ps(2.4022650695910071e-1f));
  poly = _mm256_fmadd_ps(poly, f, _mm256_set1_ps(6.9314718055994531e-1f));
  poly = _mm256_fmadd_ps(poly, f, _mm256_set1_ps(1.0f));
  // n = -127 gives exponent field 0: the factor is +0.0, so the result is exactly 0.
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(poly, _mm256_castsi256_ps(e));
}

// Scores of R keys (rows r0 .. r0+R-1) against GT queries: s[g * kChunk + r]. Each K row is loaded
// and widened once per d-step and used by all GT queries; GT * R <= 8 accumulators, summed across
// lanes together by hsum8.
template <int DT, int GT, int R>
KV_TARGET_AVX2 inline void score_rows(const float* q, int D, const void* const* k_rows, float* s,
                                      int r0) {
  static_assert(GT * R <= 16, "two hsum8 reduce at most 16 accumulators");
  __m256 acc[GT][R];
  KV_UNROLL for (int g = 0; g < GT; ++g) KV_UNROLL for (int r = 0; r < R; ++r) acc[g][r] =
      _mm256_setzero_ps();
  for (int d = 0; d < D; d += 8) {
    __m256 k[R];
    KV_UNROLL for (int r = 0; r < R; ++r) k[r] = load8<DT>(k_rows[r0 + r], d);
    KV_UNROLL for (int g = 0; g < GT; ++g) {
      const __m256 qv = _mm256_loadu_ps(q + (int64_t)g * D + d);
      KV_UNROLL for (int r = 0; r < R; ++r) acc[g][r] = _mm256_fmadd_ps(qv, k[r], acc[g][r]);
    }
  }
  constexpr int kSlots = GT * R <= 8 ? 8 : 16;
  __m256 v[kSlots];
  KV_UNROLL for (int i = 0; i < kSlots; ++i) v[i] = _mm256_setzero_ps();
  KV_UNROLL for (int g = 0; g < GT; ++g) KV_UNROLL for (int r = 0; r < R; ++r) v[g * R + r] =
      acc[g][r];
  alignas(32) float sums[kSlots];
  _mm256_store_ps(sums, hsum8(v));
  if constexpr (kSlots == 16) _mm256_store_ps(sums + 8, hsum8(v + 8));
  KV_UNROLL for (int g = 0; g < GT; ++g) KV_UNROLL for (int r = 0; r < R; ++r)
      s[g * kChunk + r0 + r] = sums[g * R + r];
}

// acc[g] = acc[g] * alpha[g] + sum_r p[g][r] * V[r], 16 (then 8) dims at a time with the GT
// outputs in registers; each V row is widened once per d-step and used by all GT queries.
template <int DT, int GT>
KV_TARGET_AVX2 inline void accumulate_values(const float* p, const float* alpha, int D,
                                             const void* const* v_rows, int n, float* acc) {
  int d = 0;
  for (; d + 16 <= D; d += 16) {
    __m256 o[GT][2];
    KV_UNROLL for (int g = 0; g < GT; ++g) {
      const __m256 a = _mm256_set1_ps(alpha[g]);
      o[g][0] = _mm256_mul_ps(_mm256_loadu_ps(acc + (int64_t)g * D + d), a);
      o[g][1] = _mm256_mul_ps(_mm256_loadu_ps(acc + (int64_t)g * D + d + 8), a);
    }
    for (int r = 0; r < n; ++r) {
      const __m256 v0 = load8<DT>(v_rows[r], d), v1 = load8<DT>(v_rows[r], d + 8);
      KV_UNROLL for (int g = 0; g < GT; ++g) {
        const __m256 pg = _mm256_broadcast_ss(p + g * kChunk + r);
        o[g][0] = _mm256_fmadd_ps(pg, v0, o[g][0]);
        o[g][1] = _mm256_fmadd_ps(pg, v1, o[g][1]);
      }
    }
    KV_UNROLL for (int g = 0; g < GT; ++g) {
      _mm256_storeu_ps(acc + (int64_t)g * D + d, o[g][0]);
      _mm256_storeu_ps(acc + (int64_t)g * D + d + 8, o[g][1]);
    }
  }
  if (d < D) {  // head_dim % 16 == 8 (80, 72, ...)
    __m256 o[GT];
    KV_UNROLL for (int g = 0; g < GT; ++g) o[g] =
        _mm256_mul_ps(_mm256_loadu_ps(acc + (int64_t)g * D + d), _mm256_set1_ps(alpha[g]));
    for (int r = 0; r < n; ++r) {
      const __m256 v0 = load8<DT>(v_rows[r], d);
      KV_UNROLL for (int g = 0; g < GT; ++g) o[g] =
          _mm256_fmadd_ps(_mm256_broadcast_ss(p + g * kChunk + r), v0, o[g]);
    }
    KV_UNROLL for (int g = 0; g < GT; ++g) _mm256_storeu_ps(acc + (int64_t)g * D + d, o[g]);
  }
}

// One chunk for GT (<= 4) query heads: scores, online-softmax update, value accumulation.
template <int DT, int GT>
KV_TARGET_AVX2 void chunk_tile(const float* q, int D, const void* const* k_rows,
                               const void* const* v_rows, int n, float* m, float* l, float* acc) {
  static_assert(kChunk % 8 == 0, "the softmax step works on whole 8-lane vectors");
  constexpr int R = GT == 1 ? 8 : GT == 2 ? 4 : GT == 3 ? 4 : 3;
  alignas(32) float s[GT * kChunk];
  int r = 0;
  for (; r + R <= n; r += R) score_rows<DT, GT, R>(q, D, k_rows, s, r);
  for (; r < n; ++r) score_rows<DT, GT, 1>(q, D, k_rows, s, r);
  float alpha[GT];
  KV_UNROLL for (int g = 0; g < GT; ++g) {
    float* sg = s + g * kChunk;
    for (int i = n; i < kChunk; ++i) sg[i] = -INFINITY;  // exp2 of them is exactly 0
    __m256 vmax = _mm256_load_ps(sg);
    KV_UNROLL for (int i = 8; i < kChunk; i += 8) vmax = _mm256_max_ps(vmax, _mm256_load_ps(sg + i));
    const float m_new = std::max(m[g], hmax(vmax));
    // m[g] = -inf on the first chunk: alpha = 0 (and acc, l are still 0)
    alpha[g] = _mm256_cvtss_f32(exp2_nonpos(_mm256_set1_ps(m[g] - m_new)));
    const __m256 mn = _mm256_set1_ps(m_new);
    __m256 sum = _mm256_setzero_ps();
    KV_UNROLL for (int i = 0; i < kChunk; i += 8) {
      const __m256 pi = exp2_nonpos(_mm256_sub_ps(_mm256_load_ps(sg + i), mn));
      _mm256_store_ps(sg + i, pi);
      sum = _mm256_add_ps(sum, pi);
    }
    l[g] = l[g] * alpha[g] + hsum(sum);
    m[g] = m_new;
  }
  accumulate_values<DT, GT>(s, alpha, D, v_rows, n, acc);
}

template <int DT>
KV_TARGET_AVX2 void chunk_avx2(const float* q, int G, int D, const void* const* k_rows,
                               const void* const* v_rows, int n, const SoftmaxState& st) {
  // Query heads in tiles of 4 (registers); a K/V row re-read for a later tile comes from L1.
  for (int g = 0; g < G; g += 4) {
    const float* qg = q + (int64_t)g * D;
    float* acc = st.acc + (int64_t)g * D;
    switch (std::min(4, G - g)) {
      case 1: chunk_tile<DT, 1>(qg, D, k_rows, v_rows, n, st.m + g, st.l + g, acc); break;
      case 2: chunk_tile<DT, 2>(qg, D, k_rows, v_rows, n, st.m + g, st.l + g, acc); break;
      case 3: chunk_tile<DT, 3>(qg, D, k_rows, v_rows, n, st.m + g, st.l + g, acc); break;
      default: chunk_tile<DT, 4>(qg, D, k_rows, v_rows, n, st.m + g, st.l + g, acc); break;
    }
  }
}

#endif  // KVMICRO_X86_SIMD

ChunkKernel pick_kernel(int32_t dtype, bool simd) {
#if KVMICRO_X86_SIMD
  if (simd) {
    switch (dtype) {
      case kF16: return &chunk_avx2<kF16>;
      case kBF16: return &chunk_avx2<kBF16>;
      default: return &chunk_avx2<kF32>;
    }
  }
#endif
  (void)simd;
  switch (dtype) {
    case kF16: return &chunk_portable<kF16>;
    case kBF16: return &chunk_portable<kBF16>;
    default: return &chunk_portable<kF32>;
  }
}

void to_float(int32_t dtype, bool simd, const void* src, int64_t n, float* dst) {
  const uint16_t* h = static_cast<const uint16_t*>(src);
  if (dtype == kF32) {
    std::memcpy(dst, src, (size_t)n * sizeof(float));
  } else if (dtype == kBF16) {
    bf16_to_f32_row(h, dst, n);
  } else if (simd) {
    f16_to_f32_row(h, dst, n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_f32(h[i]);
  }
}

void from_float(int32_t dtype, bool simd, const float* src, int64_t n, void* dst) {
  uint16_t* h = static_cast<uint16_t*>(dst);
  if (dtype == kF32) {
    std::memcpy(dst, src, (size_t)n * sizeof(float));
  } else if (dtype == kBF16) {
    f32_to_bf16_row(src, h, n);
  } else if (simd) {
    f32_to_f16_row(src, h, n);
  } else {
    for (int64_t i = 0; i < n; ++i) h[i] = f32_to_f16(src[i]);
  }
}

void* out_row(const AttentionPlan& plan, const Buffers& buf, int b, int q_head) {
  const OpParams& p = plan.p;
  const int64_t row = ((int64_t)b * p.q_heads + q_head) * p.q_len;
  return static_cast<char*>(buf.out) + row * p.pool.head_dim * dtype_size(p.dtype);
}

struct CombineJob {
  const AttentionPlan* plan;
  const Buffers* buf;
  float* partials;
  float* workers;  // per worker: worker_stride floats, the first D used here
  int64_t worker_stride;
};

void combine_task(void* ctx, int64_t task, int worker) {
  const CombineJob& job = *static_cast<const CombineJob*>(ctx);
  const AttentionPlan& plan = *job.plan;
  const OpParams& p = plan.p;
  const int G = p.group, D = p.pool.head_dim, S = plan.splits;
  const int b = (int)(task / p.pool.kv_heads), kvh = (int)(task % p.pool.kv_heads);
  float* row = job.workers + (int64_t)worker * job.worker_stride;
  const int64_t stride = (int64_t)G * (D + 2);  // one split's [m, l, acc[D]] x G
  const float* base = job.partials + task * S * stride;
  for (int g = 0; g < G; ++g) {
    float m_max = -INFINITY;
    for (int s = 0; s < S; ++s) m_max = std::max(m_max, base[s * stride + g * (D + 2)]);
    float l = 0.0f;
    std::fill(row, row + D, 0.0f);
    for (int s = 0; s < S; ++s) {
      const float* part = base + s * stride + g * (D + 2);
      const float w = std::exp2(part[0] - m_max);  // empty split: m = -inf, weight 0
      l += part[1] * w;
      for (int d = 0; d < D; ++d) row[d] += part[2 + d] * w;
    }
    const float inv = 1.0f / l;
    for (int d = 0; d < D; ++d) row[d] *= inv;
    from_float(p.dtype, plan.simd, row, D, out_row(plan, *job.buf, b, kvh * G + g));
  }
}

}  // namespace

int64_t worker_scratch_floats(int query_heads, int head_dim) {
  const int64_t QD = (int64_t)query_heads * head_dim, rows = 2LL * kChunk * head_dim;
  return lines(QD) + 2 * lines(query_heads) + lines(QD) + 2 * lines(rows);
}

WorkerScratch worker_scratch(const AttentionPlan& plan, float* base) {
  const int Q = plan.heads_per_task * plan.p.group, D = plan.p.pool.head_dim;
  const int64_t QD = (int64_t)Q * D, rows = 2LL * kChunk * D;
  WorkerScratch w;
  w.q = base;
  w.m = w.q + lines(QD);
  w.l = w.m + lines(Q);
  w.acc = w.l + lines(Q);
  w.tmp = w.acc + lines(QD);
  w.rows = w.tmp + lines(rows);
  return w;
}

void load_query(const AttentionPlan& plan, const void* src, float* dst) {
  const int D = plan.p.pool.head_dim;
  to_float(plan.p.dtype, plan.simd, src, D, dst);
  const float factor = plan.p.scale * kLog2e;
  for (int d = 0; d < D; ++d) dst[d] *= factor;
}

void load_strided_row(int32_t dtype, const void* src, int64_t stride_d, int D, float* dst) {
  if (dtype == kF32) {
    const float* f = static_cast<const float*>(src);
    for (int d = 0; d < D; ++d) dst[d] = f[d * stride_d];
    return;
  }
  const uint16_t* h = static_cast<const uint16_t*>(src);
  if (dtype == kF16) {
    for (int d = 0; d < D; ++d) dst[d] = f16_to_f32(h[d * stride_d]);
  } else {
    for (int d = 0; d < D; ++d) dst[d] = bf16_to_f32(h[d * stride_d]);
  }
}

void finish_task(const AttentionPlan& plan, const Buffers& buf, const WorkerScratch& w, int b,
                 int kvh, int slot, int split, float* partials) {
  const OpParams& p = plan.p;
  const int G = p.group, D = p.pool.head_dim;
  const float* m = w.m + slot * G;
  const float* l = w.l + slot * G;
  float* acc_base = w.acc + (int64_t)slot * G * D;
  if (plan.splits == 1) {
    for (int g = 0; g < G; ++g) {
      float* acc = acc_base + (int64_t)g * D;
      const float inv = 1.0f / l[g];  // l >= 1: the running max's own key contributes 2^0
      for (int d = 0; d < D; ++d) acc[d] *= inv;
      from_float(p.dtype, plan.simd, acc, D, out_row(plan, buf, b, kvh * G + g));
    }
    return;
  }
  const int64_t stride = (int64_t)G * (D + 2);
  float* dst = partials + (((int64_t)b * p.pool.kv_heads + kvh) * plan.splits + split) * stride;
  for (int g = 0; g < G; ++g) {
    float* part = dst + (int64_t)g * (D + 2);
    part[0] = m[g];
    part[1] = l[g];
    std::memcpy(part + 2, acc_base + (int64_t)g * D, (size_t)D * sizeof(float));
  }
}

void combine_splits(const AttentionPlan& plan, const Buffers& buf, ThreadPool& pool,
                    AttentionScratch& scratch) {
  // The workers' attention scratch is free again here: each worker's first D floats hold the
  // output row it is combining.
  CombineJob job{&plan, &buf, scratch.partials.as<float>(), scratch.workers.as<float>(),
                 plan.worker_floats};
  pool.run((int64_t)plan.p.batch * plan.p.pool.kv_heads, &combine_task, &job);
}

AttentionPlan plan_attention(const OpParams& p, OpKind op, int threads, bool simd) {
  AttentionPlan plan;
  plan.p = p;
  const int D = p.pool.head_dim;
  // The fused op reads the pool; the others attend over dense [B, Hkv, T, D] rows (D innermost).
  plan.strided = op == OpKind::kPagedSdpa && !p.pool.d_contiguous();
  const bool cpu_simd = simd && simd_available();
  plan.simd = cpu_simd && D % 8 == 0;
  plan.kernel = pick_kernel(plan.strided ? kF32 : p.dtype, plan.simd);

  // Serve all kv heads in one task where the pool keeps a slot's heads closer together than a
  // block's slots (H inside S: NSHD, SNHD, ...): a chunk of tokens is then one contiguous span
  // per block, read front to back. Dense rows and head-major pools keep one head per task.
  const bool heads_together = op == OpKind::kPagedSdpa && p.pool.stride_h < p.pool.stride_s;
  plan.heads_per_task = heads_together ? p.pool.kv_heads : 1;

  // Split long contexts when the tasks alone would leave threads idle or unbalanced: aim at
  // >= 4 tasks per thread, but keep >= 256 keys per split.
  const int64_t base = (int64_t)p.batch * (p.pool.kv_heads / plan.heads_per_task);
  const int64_t want = 4LL * threads;
  int64_t splits = 1;
  if (threads > 1 && base < want) splits = (want + base - 1) / base;
  splits = std::max<int64_t>(1, std::min<int64_t>(splits, p.max_ctx / 256));
  plan.splits = (int)splits;

  plan.worker_floats = worker_scratch_floats(plan.heads_per_task * p.group, D);
  plan.partial_floats =
      splits > 1 ? (int64_t)p.batch * p.pool.kv_heads * splits * p.group * (D + 2) : 0;

  std::string why;
  if (!cpu_simd) {
#if KVMICRO_X86_SIMD
    why = simd ? " (the CPU lacks AVX2/F16C/FMA)" : " (option simd=0)";
#else
    why = simd ? " (built without x86 SIMD)" : " (option simd=0)";
#endif
  } else if (!plan.simd) {
    why = " (head_dim " + std::to_string(D) + " is not a multiple of 8)";
  }
  plan.name = std::string(plan.simd ? "avx2+f16c+fma" : "portable") + why +
              " " + dtype_name(p.dtype) +
              (plan.strided ? ", D not innermost: rows gathered to float32 first"
                            : ", rows D-contiguous") +
              ", " + std::to_string(base * splits) + " tasks (" + std::to_string(p.batch) +
              (p.batch > 1 ? " sequences x " : " sequence x ") +
              (plan.heads_per_task > 1
                   ? "all " + std::to_string(plan.heads_per_task) + " kv heads together"
                   : std::to_string(p.pool.kv_heads) + " kv heads") +
              " x " + std::to_string(splits) + " split" + (splits > 1 ? "s" : "") + "), " +
              std::to_string(threads) + " thread" + (threads > 1 ? "s" : "");
  return plan;
}

}  // namespace cpu
}  // namespace kvmicro
