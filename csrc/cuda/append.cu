// append: write token ctx[b] of every sequence (k_new/v_new [B, Hkv, D]) into the pool at
// physical block table[b][ctx[b] / block_size], slot ctx[b] % block_size. One thread per 16-byte
// vector (D innermost) or per element (any other layout); K and V in one launch. The address goes
// through PagedKV::checked_row_offset (common/paged_kv.h): a write is the one place a bad id would
// corrupt memory.
// Instantiations: element size {2, 4} x {16-byte path, strided path}.
#include <string>
#include <type_traits>

#include "cuda/cuda_common.cuh"
#include "cuda/kernels.h"

namespace kvmicro {
namespace cuda {
namespace {

constexpr int kAppendThreads = 128;

template <int ESIZE, bool kFast>
__global__ void __launch_bounds__(kAppendThreads) append_kernel(AppendArgs a) {
  using E = std::conditional_t<ESIZE == 2, uint16_t, uint32_t>;
  constexpr int VE = 16 / ESIZE;
  const int kv_heads = a.kv.pool.kv_heads;
  const int64_t per_tensor = (int64_t)a.kv.batch * kv_heads * a.row_units;
  int64_t i = (int64_t)blockIdx.x * kAppendThreads + threadIdx.x;
  if (i >= 2 * per_tensor) return;
  const bool is_v = i >= per_tensor;
  if (is_v) i -= per_tensor;
  const int unit = (int)(i % a.row_units);
  const int64_t bh = i / a.row_units;  // b * Hkv + h: the row of k_new / v_new
  const int b = (int)(bh / kv_heads), h = (int)(bh % kv_heads);
  const int64_t t = a.kv.seq_len(b);  // the position append writes
  const int64_t row = a.kv.checked_row_offset(b, t, h);
  if (row < 0) return;
  E* pool = static_cast<E*>(is_v ? a.v_pool : a.k_pool);
  const E* src = static_cast<const E*>(is_v ? a.v_new : a.k_new);
  const int64_t D = a.kv.pool.head_dim;
  if constexpr (kFast) {
    const uint4 val = load16(src + bh * D + (int64_t)unit * VE);
    *reinterpret_cast<uint4*>(pool + row + (int64_t)unit * VE) = val;
  } else {
    pool[a.kv.elem_offset(b, t, h, unit)] = src[bh * D + unit];
  }
}

using AppendFn = void (*)(AppendArgs);

}  // namespace

AppendPlan plan_append(const char* op, const OpParams& p, const DeviceProps& dev) {
  AppendPlan plan;
  const int esize = (int)dtype_size(p.dtype);
  const int D = p.pool.head_dim;
  plan.strided = !(p.pool.d_contiguous() && (D * esize) % 16 == 0);
  plan.row_units = plan.strided ? D : D * esize / 16;
  AppendFn fn;
  if (esize == 2) fn = plan.strided ? &append_kernel<2, false> : &append_kernel<2, true>;
  else fn = plan.strided ? &append_kernel<4, false> : &append_kernel<4, true>;
  plan.kernel = reinterpret_cast<const void*>(fn);
  plan.threads = kAppendThreads;
  const int64_t total = 2 * (int64_t)p.batch * p.pool.kv_heads * plan.row_units;
  if (total >= (int64_t)1 << 31)
    throw UnsupportedError(std::string("[") + op + "] batch x kv_heads x head_dim too large");
  plan.grid = dim3((unsigned)ceil_div(total, kAppendThreads));
  return plan;
}

void launch_append(const AppendPlan& plan, const AppendArgs& args, cudaStream_t stream) {
  auto fn = reinterpret_cast<AppendFn>(plan.kernel);
  fn<<<plan.grid, plan.threads, 0, stream>>>(args);
  KV_CUDA_CHECK_LAUNCH("append");
}

}  // namespace cuda
}  // namespace kvmicro
