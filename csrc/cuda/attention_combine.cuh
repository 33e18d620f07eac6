// The second pass of decode attention: merge the splits' partial states into the output.
#pragma once

#include "cuda/attention_common.cuh"

namespace kvmicro {
namespace cuda {

// Second pass: one block per (batch entry, query head) merges the splits that hold tokens.
// Threads split the work both ways: thread t owns float4 column t % V of the partial outputs
// (V = head_dim / 4) for splits t / V, t / V + P, ... (P = threads / V phases), and the phases are
// summed in shared memory at the end. Its first kPre partial rows are loaded before the softmax
// statistics are reduced, so that latency overlaps the reductions.
//
// kResetClaims (schedule=steal): the block of query head 0 of each batch entry zeroes that
// entry's claim counters (AttnArgs::arrivals, one per kv head x head tile) once the split grid
// is complete, so the next op's split kernel, which runs after this grid (stream order, or
// griddepcontrol.wait under pdl_entry), finds them at 0.
template <typename T, bool kAllowNextEarly, bool kResetClaims = false>
__global__ void __launch_bounds__(kCombineThreads)
    attention_combine_kernel(AttnArgs a, int head_dim) {
  KV_STAMP(kTimelineCombine, kStampEntry);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Launched early under programmatic dependent launch: wait for the split kernel's writes.
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  KV_STAMP(kTimelineCombine, kStampReleased);
  // pdl_entry=early: the next op's split kernel may be scheduled now (it waits for this grid
  // before its first read). Measured faster where that grid fits one block per SM and up to 19%
  // slower on the cp.async kernel without spread (docs/cuda.md), so it is its own instantiation,
  // not the default's.
  if constexpr (kAllowNextEarly) allow_dependent_launch();
  constexpr int kPre = 8;
  __shared__ float s_w[kMaxSplits];
  __shared__ float s_red[kCombineThreads / 32];
  __shared__ float s_bcast;
  __shared__ float4 s_sum[kCombineThreads];

  const int64_t head = blockIdx.x;
  const int b = (int)(head / a.q_heads);
  if constexpr (kResetClaims) {
    const int units = a.q_heads / a.group * a.head_tiles;
    if (head % a.q_heads == 0)
      for (int u = threadIdx.x; u < units; u += kCombineThreads)
        a.arrivals[((int64_t)b * units + u) * kClaimCounterStride] = 0;
  }
  const int n = splits_with_tokens(a, a.ctx[b]);
  const float* ml = a.part_ml + head * a.splits * 2;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int V = head_dim / 4;  // every supported head_dim is a multiple of 16
  const int P = kCombineThreads / V;
  const int col = threadIdx.x % V, phase = threadIdx.x / V;
  const bool active = phase < P;
  const float4* po = reinterpret_cast<const float4*>(a.part_o + head * a.splits * head_dim);

  float4 pre[kPre];
#pragma unroll
  for (int i = 0; i < kPre; ++i) {
    const int s = phase + i * P;
    pre[i] = active && s < n ? po[(int64_t)s * V + col] : make_float4(0.f, 0.f, 0.f, 0.f);
  }

  float M = -INFINITY;
  for (int s = threadIdx.x; s < n; s += kCombineThreads) M = fmaxf(M, ml[2 * s]);
  M = warp_max(M);
  if (lane == 0) s_red[warp] = M;
  __syncthreads();
  if (threadIdx.x == 0) {
    float x = s_red[0];
    for (int w = 1; w < kCombineThreads / 32; ++w) x = fmaxf(x, s_red[w]);
    s_bcast = x;
  }
  __syncthreads();
  M = s_bcast;

  float L = 0.f;
  for (int s = threadIdx.x; s < n; s += kCombineThreads) {
    const float w = exp2f(ml[2 * s] - M);
    s_w[s] = w;
    L = fmaf(ml[2 * s + 1], w, L);
  }
  L = warp_sum(L);
  __syncthreads();  // s_red is reused
  if (lane == 0) s_red[warp] = L;
  __syncthreads();
  if (threadIdx.x == 0) {
    float x = 0.f;
    for (int w = 0; w < kCombineThreads / 32; ++w) x += s_red[w];
    s_bcast = 1.f / x;
  }
  __syncthreads();
  const float inv = s_bcast;
  KV_STAMP(kTimelineCombine, kStampStats);

  float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
  auto add = [&](const float4& x, float w) {
    o.x = fmaf(x.x, w, o.x);
    o.y = fmaf(x.y, w, o.y);
    o.z = fmaf(x.z, w, o.z);
    o.w = fmaf(x.w, w, o.w);
  };
#pragma unroll
  for (int i = 0; i < kPre; ++i) {
    const int s = phase + i * P;
    if (active && s < n) add(pre[i], s_w[s]);
  }
#pragma unroll 4
  for (int s = phase + kPre * P; active && s < n; s += P) add(po[(int64_t)s * V + col], s_w[s]);
  s_sum[threadIdx.x] = o;
  __syncthreads();
  KV_STAMP(kTimelineCombine, kStampSummed);
  if (threadIdx.x < V) {
    float4 t = s_sum[threadIdx.x];
    for (int p = 1; p < P; ++p) {
      const float4 x = s_sum[p * V + threadIdx.x];
      t.x += x.x;
      t.y += x.y;
      t.z += x.z;
      t.w += x.w;
    }
    T* out = static_cast<T*>(a.out) + head * head_dim + 4 * threadIdx.x;
    out[0] = from_float<T>(t.x * inv);
    out[1] = from_float<T>(t.y * inv);
    out[2] = from_float<T>(t.z * inv);
    out[3] = from_float<T>(t.w * inv);
  }
  KV_STAMP(kTimelineCombine, kStampExit);
}

}  // namespace cuda
}  // namespace kvmicro
