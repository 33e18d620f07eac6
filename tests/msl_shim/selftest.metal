// Kernels that test the MSL shim itself (tests/test_metal_shim.py): SIMD functions, 16-bit
// conversions, threadgroup memory fill, threadgroup order, and the failures the shim must report
// instead of hanging. Not part of kvmicro's kernels; slots borrow params.h names.
#include <metal_stdlib>

#include "../../metal/kernel_abi.h"

using namespace metal;
using namespace kvmicro;

// out[thread][0..8): simd_sum, simd_max, simd_min, simd_shuffle, simd_broadcast,
// simd_shuffle_xor, simd_shuffle_down of x = lane * lane + 100 * simdgroup, and a float4 xor.
template <typename T>
kernel void simd_ops(device float* out [[buffer(kBufOut)]],
                     uint tid [[thread_index_in_threadgroup]],
                     uint lane [[thread_index_in_simdgroup]],
                     uint simd_id [[simdgroup_index_in_threadgroup]]) {
  const float x = float(lane * lane) + 100.0f * float(simd_id);
  device float* o = out + tid * 8;
  o[0] = simd_sum(x);
  o[1] = simd_max(x);
  o[2] = simd_min(x);
  o[3] = simd_shuffle(x, (ushort)((lane + 5) % 32));
  o[4] = simd_broadcast(x, (ushort)3);
  o[5] = simd_shuffle_xor(x, (ushort)6);
  o[6] = simd_shuffle_down(x, (ushort)4);
  const float4 v = simd_shuffle_xor(float4(x, 1.0f, 2.0f, 3.0f), (ushort)1);
  o[7] = v.x;
}

// float -> half and bfloat bits, and back, for every input.
template <typename T>
kernel void conversions(const device float* in [[buffer(kBufQ)]],
                        device half* as_half [[buffer(kBufKDense)]],
                        device bfloat* as_bfloat [[buffer(kBufVDense)]],
                        device float* back [[buffer(kBufOut)]],
                        uint3 pos [[thread_position_in_grid]]) {
  const uint i = pos.x;
  as_half[i] = half(in[i]);
  as_bfloat[i] = bfloat(in[i]);
  back[2 * i] = float(as_half[i]);
  back[2 * i + 1] = float(as_bfloat[i]);
}

// Each threadgroup's thread 0: what threadgroup memory held before any write (must be NaN), and
// the order in which threadgroups ran (a counter in device memory; groups run one at a time).
template <typename T>
kernel void order_and_fill(device float* seen [[buffer(kBufOut)]],
                           device int* counter [[buffer(kBufCtx)]],
                           threadgroup float* scratch [[threadgroup(0)]],
                           uint3 group [[threadgroup_position_in_grid]],
                           uint tid [[thread_index_in_threadgroup]]) {
  if (tid == 0) {
    seen[group.x * 2] = scratch[0];
    seen[group.x * 2 + 1] = float(counter[0]);
    counter[0] = counter[0] + 1;
    scratch[0] = 1.0f;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

// A barrier that half the threads reach from another line.
template <typename T>
kernel void divergent_barrier(device float* out [[buffer(kBufOut)]],
                              uint tid [[thread_index_in_threadgroup]]) {
  if (tid < 32) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  } else {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  out[tid] = 1.0f;
}

// One thread returns before a barrier the others wait at.
template <typename T>
kernel void early_return(device float* out [[buffer(kBufOut)]],
                         uint tid [[thread_index_in_threadgroup]]) {
  if (tid == 5) return;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = 1.0f;
}

// Half a simdgroup calls simd_sum; the other half leaves.
template <typename T>
kernel void partial_simd(device float* out [[buffer(kBufOut)]],
                         uint tid [[thread_index_in_threadgroup]],
                         uint lane [[thread_index_in_simdgroup]]) {
  if (lane < 16) out[tid] = simd_sum(1.0f);
}

// Thread 0 spins on a flag nobody sets while the others wait at a barrier: only the watchdog
// ends it.
template <typename T>
kernel void stuck(volatile device int* flag [[buffer(kBufCtx)]],
                  uint tid [[thread_index_in_threadgroup]]) {
  if (tid == 0)
    while (flag[0] == 0) {
    }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

KV_INSTANTIATE("simd_ops", simd_ops, float)
KV_INSTANTIATE("conversions", conversions, float)
KV_INSTANTIATE("order_and_fill", order_and_fill, float)
KV_INSTANTIATE("divergent_barrier", divergent_barrier, float)
KV_INSTANTIATE("early_return", early_return, float)
KV_INSTANTIATE("partial_simd", partial_simd, float)
KV_INSTANTIATE("stuck", stuck, float)
