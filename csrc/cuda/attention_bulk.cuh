// The tensor-core split kernel that streams K/V rows into shared memory with bulk asynchronous
// copies, the copy engine of sm_90 (attention_split_bulk_kernel, option kernel=bulk): the math of
// attention_mma.cuh, the pipeline of attention_async.cuh, one copy per row instead of 16-byte
// pieces.
#pragma once

#include "cuda/attention_mma.cuh"

namespace kvmicro {
namespace cuda {

// ---- bulk copies and transaction barriers (PTX ISA 8.0, sm_90) -------------------------------
//
// cp.async.bulk moves one contiguous run of bytes (a multiple of 16, both ends 16-byte aligned)
// from global to shared memory without a tensor map: the SM's copy engine does the transfer, so
// a lane spends one instruction on a whole K or V row. Completion is counted in bytes on an
// mbarrier in shared memory: each lane announces its row's bytes (expect_tx) with its arrival, the
// copy engine subtracts them as they land, and the barrier's phase completes once all 32 lanes
// have arrived and no byte is outstanding. Below sm_90 the kernel compiles to a trap and these to
// nothing; the planner never launches it there (kernel=bulk is Unsupported before sm_90).

__device__ __forceinline__ unsigned smem_address(const void* p) {
  return (unsigned)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void bulk_barrier_init(uint64_t* bar, int arrivals) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_address(bar)), "r"(arrivals)
               : "memory");
#endif
}

// Makes initialised barriers visible to the copy engine (the async proxy) before a copy names one.
__device__ __forceinline__ void bulk_barrier_init_fence() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}

// This lane's arrival on the barrier's current phase, announcing `bytes` its copy will deliver.
__device__ __forceinline__ void bulk_arrive_expect(uint64_t* bar, unsigned bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_address(bar)),
               "r"(bytes)
               : "memory");
#endif
}

__device__ __forceinline__ void bulk_copy_g2s(void* smem, const void* gmem, unsigned bytes,
                                              uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
          smem_address(smem)),
      "l"(gmem), "r"(bytes), "r"(smem_address(bar))
      : "memory");
#endif
}

// Spin until the barrier's phase of parity `parity` has completed: every copy it counted landed.
__device__ __forceinline__ void bulk_wait(uint64_t* bar, unsigned parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  unsigned done = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}"
        : "=r"(done)
        : "r"(smem_address(bar)), "r"(parity)
        : "memory");
  } while (!done);
#endif
}

// A staged row's pitch in shared memory: the row, padded so that it is an odd multiple of 64
// bytes. Fragment reads of 16 bytes take rows gr and gr+1 in one phase (8 lanes: 4 chunks of
// each); 64 bytes apart modulo 128, the two rows fall in distinct banks. A bulk copy writes its
// row contiguously, so the cp.async kernel's XOR swizzle is not available: padding is.
__host__ __device__ constexpr int bulk_pitch_bytes(int d, int esize) {
  return (d * esize) % 128 == 64 ? d * esize : ((d * esize + 64) / 128) * 128 + 64;
}

// Dynamic shared memory of attention_split_bulk_kernel: S stages of one 16-key K and V tile per
// warp at the padded pitch; the block merge (s_acc) reuses it after the main loop.
__host__ __device__ constexpr int bulk_smem_bytes(int d, int stages, int esize) {
  return kAttnWarps * stages * 2 * kMmaTileKeys * bulk_pitch_bytes(d, esize) >
                 kAttnWarps * kMmaHeads * d * 4
             ? kAttnWarps * stages * 2 * kMmaTileKeys * bulk_pitch_bytes(d, esize)
             : kAttnWarps * kMmaHeads * d * 4;
}

// Tensor-core split kernel, bulk-copy pipeline: each warp streams its 16-key tiles through S
// stages of shared memory private to it, S-1 tiles in flight while it computes on one. Per tile
// every lane copies one row: lanes 0-15 the K rows of keys t .. t+15, lanes 16-31 the V rows
// (keys past the split's end copy its last row, masked as in the other kernels), each announcing
// its bytes on the stage's barrier (32 arrivals per phase). Then the fragments of MmaRows are
// read from shared memory, as in attention_split_async_kernel. A stage is refilled only after
// __syncwarp: every lane has read it. sm_90+ only. C: the combine mode (write_block_result).
template <typename T, int D, int S, class Src, AttnCombine C>
__global__ void __launch_bounds__(kAttnThreads)
    attention_split_bulk_kernel(AttnArgs a, Src src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // no bulk copies before sm_90 (the planner refuses kernel=bulk there)
#else
  static_assert(D % 32 == 0, "16-byte fragment loads cover 32 elements of d per lane quad");
  static_assert(S >= 2, "a pipeline needs two stages");
  static_assert(kMmaTileKeys * 2 == 32, "one lane per K or V row of a tile");
  constexpr int NB = D / 32;
  constexpr int NW = kAttnWarps;
  constexpr int TK = kMmaTileKeys;
  constexpr unsigned kRowBytes = D * sizeof(T);
  constexpr int kPitch = bulk_pitch_bytes(D, (int)sizeof(T)) / (int)sizeof(T);  // elements
  constexpr int kTileElems = TK * kPitch;
  static_assert(kRowBytes % 16 == 0 && (kPitch * sizeof(T)) % 16 == 0,
                "bulk copies move 16-byte units");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  auto& s_acc = *reinterpret_cast<float (*)[NW][kMmaHeads][D]>(smem_raw);
  __shared__ float s_m[NW][kMmaHeads];
  __shared__ float s_l[NW][kMmaHeads];
  __shared__ __align__(8) uint64_t s_bar[NW][S];

  SplitSlice slice;
  if (!split_slice<kMmaHeads, C>(a, slice)) return;
  const int split = slice.split, hk = slice.hk, g0 = slice.g0, b = slice.b;
  const int gcount = slice.gcount, start = slice.start, end = slice.end;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gr = lane >> 2, tq = lane & 3;
  // Lanes 0-15 copy K rows, 16-31 V rows; both halves look up the same 16 row offsets.
  const T* pool = static_cast<const T*>(lane < TK ? src.k : src.v);
  T* stages = reinterpret_cast<T*>(smem_raw) + warp * S * 2 * kTileElems;  // [S][K, V][TK][pitch]
  uint64_t* bars = s_bar[warp];
  if (lane == 0)
    for (int s = 0; s < S; ++s) bulk_barrier_init(&bars[s], 32);
  bulk_barrier_init_fence();
  __syncwarp();

  const int last = end - 1;
  constexpr int kStep = NW * TK;
  const int t_first = start + warp * TK;
  const int tiles = t_first < end ? (end - t_first + kStep - 1) / kStep : 0;  // warp-uniform

  auto issue = [&](int tile) {
    const int t = t_first + tile * kStep;
    const int64_t row = src.row_offset(b, hk, min(t + (lane & 15), last));
    T* dst = stages + (tile % S) * 2 * kTileElems + (lane >= TK ? kTileElems : 0) +
             (lane & 15) * kPitch;
    uint64_t* bar = &bars[tile % S];
    bulk_arrive_expect(bar, kRowBytes);
    bulk_copy_g2s(dst, pool + row, kRowBytes, bar);
  };

  MmaWarpState<T, D> st;
  st.init(a, b, hk, g0, gcount, gr, tq);
#pragma unroll
  for (int s = 0; s < S - 1; ++s)
    if (s < tiles) issue(s);
  for (int tile = 0; tile < tiles; ++tile) {
    bulk_wait(&bars[tile % S], (unsigned)(tile / S) & 1u);  // every row of `tile` has landed
    __syncwarp();  // ... and every lane has read the stage refilled next
    if (tile + S - 1 < tiles) issue(tile + S - 1);
    const T* sk = stages + (tile % S) * 2 * kTileElems;
    const T* sv = sk + kTileElems;
    MmaRows<D> x;
#pragma unroll
    for (int j = 0; j < NB; ++j) {
      const int off = (4 * j + tq) * 8;
      x.ka[j] = *reinterpret_cast<const uint4*>(sk + gr * kPitch + off);
      x.kb[j] = *reinterpret_cast<const uint4*>(sk + (gr + 8) * kPitch + off);
      x.va[j] = *reinterpret_cast<const uint4*>(sv + gr * kPitch + off);
      x.vb[j] = *reinterpret_cast<const uint4*>(sv + (gr + 8) * kPitch + off);
    }
    const int t0 = t_first + tile * kStep;
    st.consume(x, t0 + gr < end, t0 + gr + 8 < end, a.scale_log2);
  }

  allow_dependent_launch();
  __syncthreads();  // s_acc aliases every warp's stages, all of whose copies have landed
  st.store(s_acc, s_m, s_l, warp, gr, tq);
  __syncthreads();
  write_block_result<T, D, kMmaHeads, NW, C>(a, s_acc, s_m, s_l, b, hk, g0, gcount, split);
#endif
}

}  // namespace cuda
}  // namespace kvmicro
