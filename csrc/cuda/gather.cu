// gather: copy each sequence's blocks (its first ceil(ctx[b] / block_size) blocks, whole, as the
// oracle and the byte count define it) out of the pool into dense K/V [B, Hkv, T, D]: what an
// engine without a paged kernel does before attention. Positions past the last block are left as
// they are. One launch covers K and V (blockIdx.z). Each thread moves kUnroll units, issuing
// every load before the first store; D-innermost layouts move 16-byte vectors, any other layout
// moves single elements; every pool address comes from common/paged_kv.h (PagedKV).
// Instantiations: element size {2, 4} x {16-byte path, strided path}.
#include <string>
#include <type_traits>

#include "cuda/cuda_common.cuh"
#include "cuda/kernels.h"

namespace kvmicro {
namespace cuda {
namespace {

constexpr int kGatherThreads = 256;
constexpr int kUnroll = 4;

template <int ESIZE, bool kFast>
__global__ void __launch_bounds__(kGatherThreads) gather_kernel(GatherArgs a) {
  using E = std::conditional_t<ESIZE == 2, uint16_t, uint32_t>;
  constexpr int VE = 16 / ESIZE;  // elements per 16-byte vector
  const int h = blockIdx.y % a.dense.kv_heads;
  const int b = blockIdx.y / a.dense.kv_heads;
  const E* src = static_cast<const E*>(blockIdx.z ? a.v_pool : a.k_pool);
  E* dst = static_cast<E*>(blockIdx.z ? a.v_dense : a.k_dense);
  const unsigned units = kFast ? (unsigned)a.row_vecs : (unsigned)a.dense.head_dim;
  const int bs = a.kv.pool.block_size;
  const unsigned tokens = (unsigned)((a.kv.seq_len(b) + bs - 1) / bs) * (unsigned)bs;
  const unsigned total = tokens * units;
  const unsigned first = blockIdx.x * (kUnroll * kGatherThreads) + threadIdx.x;
  if (first >= total) return;

  if constexpr (kFast) {
    uint4 val[kUnroll];
    int64_t out[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const unsigned i = first + u * kGatherThreads;
      if (i < total) {
        const unsigned t = i / units, v = i - t * units;
        val[u] = load16(src + a.kv.row_offset(b, t, h) + (int64_t)v * VE);
        out[u] = a.dense.row_offset(b, h, t) + (int64_t)v * VE;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (first + u * kGatherThreads < total) *reinterpret_cast<uint4*>(dst + out[u]) = val[u];
  } else {
    E val[kUnroll];
    int64_t out[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const unsigned i = first + u * kGatherThreads;
      if (i < total) {
        const unsigned t = i / units, d = i - t * units;
        val[u] = __ldg(src + a.kv.elem_offset(b, t, h, d));
        out[u] = a.dense.row_offset(b, h, t) + d;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (first + u * kGatherThreads < total) dst[out[u]] = val[u];
  }
}

using GatherFn = void (*)(GatherArgs);

}  // namespace

GatherPlan plan_gather(const char* op, const OpParams& p, const DeviceProps& dev) {
  GatherPlan plan;
  const int esize = (int)dtype_size(p.dtype);
  const int D = p.pool.head_dim;
  plan.strided = !(p.pool.d_contiguous() && (D * esize) % 16 == 0);
  plan.row_vecs = plan.strided ? 0 : D * esize / 16;
  const int64_t units = plan.strided ? D : plan.row_vecs;
  if ((int64_t)p.max_ctx_pad * units >= (int64_t)1 << 31)
    throw UnsupportedError(std::string("[") + op + "] ctx " + std::to_string(p.max_ctx_pad) +
                           " x head_dim " + std::to_string(D) + " is too large for native:cuda gather");
  const int64_t rows = (int64_t)p.batch * p.pool.kv_heads;
  if (rows > 65535)
    throw UnsupportedError(std::string("[") + op + "] batch x kv_heads " + std::to_string(rows) +
                           " exceeds the 65535 a grid dimension holds");
  GatherFn fn;
  if (esize == 2) fn = plan.strided ? &gather_kernel<2, false> : &gather_kernel<2, true>;
  else fn = plan.strided ? &gather_kernel<4, false> : &gather_kernel<4, true>;
  plan.kernel = reinterpret_cast<const void*>(fn);
  plan.threads = kGatherThreads;
  plan.grid = dim3((unsigned)ceil_div((int64_t)p.max_ctx_pad * units, kUnroll * kGatherThreads),
                   (unsigned)rows, 2);
  return plan;
}

void launch_gather(const GatherPlan& plan, const GatherArgs& args, cudaStream_t stream) {
  auto fn = reinterpret_cast<GatherFn>(plan.kernel);
  fn<<<plan.grid, plan.threads, 0, stream>>>(args);
  KV_CUDA_CHECK_LAUNCH("gather");
}

}  // namespace cuda
}  // namespace kvmicro
