// The tensor-core split kernel that streams K/V through a cp.async pipeline in shared memory
// (attention_split_async_kernel): the math of attention_mma.cuh, for long splits.
#pragma once

#include "cuda/attention_mma.cuh"

namespace kvmicro {
namespace cuda {

// ---- cp.async pipeline ---------------------------------------------------------------------

// 16 bytes global -> shared, bypassing L1, asking L2 to fetch the 128 bytes around them (measured
// the same as 256 on the H100, docs/cuda.md).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned dst = (unsigned)__cvta_generic_to_shared(smem);
  asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16;" ::"r"(dst), "l"(gmem)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
__device__ __forceinline__ uint4 lds16(const void* p) {
  return *reinterpret_cast<const uint4*>(p);
}

// Dynamic shared memory of attention_split_async_kernel: S stages of one 16-key K and V tile per
// warp; the block merge (s_acc) reuses it after the main loop.
__host__ __device__ constexpr int async_smem_bytes(int d, int stages, int esize) {
  return kAttnWarps * stages * 2 * kMmaTileKeys * d * esize > kAttnWarps * kMmaHeads * d * 4
             ? kAttnWarps * stages * 2 * kMmaTileKeys * d * esize
             : kAttnWarps * kMmaHeads * d * 4;
}

// Tensor-core split kernel, cp.async pipeline: each warp streams its tiles through S stages of
// shared memory (cp.async, 16 bytes per copy, no registers held), S-1 tiles in flight while it
// computes on one, then reads the fragments of MmaRows from shared memory. Copies are issued as
// 128-byte row pieces (8 lanes per row, 4 rows per instruction; row offsets looked up once per
// tile by lanes 0-15 and shuffled), independent of the fragment layout. Where a row is a multiple
// of 128 bytes, odd rows store their 16-byte chunks XOR 4, so the fragment reads (rows gr and
// gr+1 in one phase) hit distinct banks. Every warp syncs only itself (__syncwarp): a stage is
// private to its warp. C: the combine mode (write_block_result).
//
// kSteal (schedule=steal; combine=separate, more than one split): a warp's tiles are not its
// split's. The sequence's 16-key tiles are numbered 0, 1, ...; of the W warps of the n blocks
// that hold tokens (splits_with_tokens), warp w = split * NW + warp takes tiles w, W + w, ...
// for its first S - 1 (a fixed start, so the first copies go out as soon as without it), then
// claims each next one from the (batch entry, kv head x head tile) counter (AttnArgs::arrivals:
// tile (S - 1) * W + the counter's old value), two claims in flight while its tiles land. A
// warp's tiles only grow, so it stops at its first tile past the sequence's end; every claim
// below the end is consumed by the warp that made it (see the loop). Each counter has a
// 128-byte line of its own (kClaimCounterStride): on one line, every warp's claims of every
// sequence and head meet at one L2 slice. Online softmax does not care which
// keys a warp saw or in what order, so the split's partial state is still the merge of its
// warps; which keys each split holds changes from run to run, so the sums' rounding does too.
// The combine kernel zeroes the counters (attention_combine_kernel, kResetClaims).
template <typename T, int D, int S, class Src, AttnCombine C, bool kSteal = false>
__global__ void __launch_bounds__(kAttnThreads)
    attention_split_async_kernel(AttnArgs a, Src src) {
  static_assert(D % 32 == 0, "16-byte fragment loads cover 32 elements of d per lane quad");
  static_assert(S >= 2, "a pipeline needs two stages");
  constexpr int NB = D / 32;
  constexpr int NW = kAttnWarps;
  constexpr int TK = kMmaTileKeys;
  constexpr int CH = D / 8;  // 16-byte chunks per row
  constexpr int kHalves = (CH + 7) / 8;
  constexpr int kSwz = CH % 8 == 0 ? 4 : 0;
  constexpr int kTileElems = TK * D;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  auto& s_acc = *reinterpret_cast<float (*)[NW][kMmaHeads][D]>(smem_raw);
  __shared__ float s_m[NW][kMmaHeads];
  __shared__ float s_l[NW][kMmaHeads];

  KV_STAMP(kTimelineSplit, kStampEntry);
  SplitSlice slice;
  if (!split_slice<kMmaHeads, C>(a, slice)) return;
  KV_STAMP(kTimelineSplit, kStampSliced);
  const int split = slice.split, hk = slice.hk, g0 = slice.g0, b = slice.b;
  const int gcount = slice.gcount, start = slice.start, end = slice.end;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gr = lane >> 2, tq = lane & 3;
  const T* kp = static_cast<const T*>(src.k);
  const T* vp = static_cast<const T*>(src.v);
  T* stages = reinterpret_cast<T*>(smem_raw) + warp * S * 2 * kTileElems;  // [S][K, V][TK][D]

  // Keys past `last` (the split's; under kSteal the sequence's) read `last`'s row instead.
  const int last = (kSteal ? slice.ctx : end) - 1;
  constexpr int kStep = NW * TK;
  const int t_first = start + warp * TK;
  const int tiles = t_first < end ? (end - t_first + kStep - 1) / kStep : 0;  // warp-uniform

  // The copies of the tile of keys t .. t+TK-1 into stage `stage`.
  auto issue_at = [&](int t, int stage) {
    const int64_t mine = src.row_offset(b, hk, min(t + (lane & 15), last));  // key t + lane%16
    T* sk = stages + stage * 2 * kTileElems;
    T* sv = sk + kTileElems;
#pragma unroll
    for (int i = 0; i < TK / 4; ++i) {
      const int r = (lane >> 3) + 4 * i;
      const int64_t row = __shfl_sync(0xffffffffu, mine, r);
#pragma unroll
      for (int h = 0; h < kHalves; ++h) {
        const int c = (lane & 7) + 8 * h;
        if (CH % 8 == 0 || c < CH) {
          const int sc = c ^ (kSwz * (r & 1));
          cp_async16(sk + r * D + sc * 8, kp + row + c * 8);
          cp_async16(sv + r * D + sc * 8, vp + row + c * 8);
        }
      }
    }
  };

  auto issue = [&](int tile) { issue_at(t_first + tile * kStep, tile % S); };

  MmaWarpState<T, D> st;
  st.init(a, b, hk, g0, gcount, gr, tq);
  const int swz = kSwz * (gr & 1);  // rows gr and gr + 8 share their parity
  // The tile in stage `stage`, keys t0 .. t0+TK-1 of which those below `stop` are real.
  auto consume = [&](int stage, int t0, int stop) {
    const T* sk = stages + stage * 2 * kTileElems;
    const T* sv = sk + kTileElems;
    MmaRows<D> x;
#pragma unroll
    for (int j = 0; j < NB; ++j) {
      const int off = ((4 * j + tq) ^ swz) * 8;
      x.ka[j] = lds16(sk + gr * D + off);
      x.kb[j] = lds16(sk + (gr + 8) * D + off);
      x.va[j] = lds16(sv + gr * D + off);
      x.vb[j] = lds16(sv + (gr + 8) * D + off);
    }
    st.consume(x, t0 + gr < stop, t0 + gr + 8 < stop, a.scale_log2);
  };
  if constexpr (kSteal) {
    const int ctx = slice.ctx;
    const int warps = splits_with_tokens(a, ctx) * NW;  // W
    const int warp_id = split * NW + warp;  // w
    int32_t* counter =
        a.arrivals + ((int64_t)blockIdx.z * gridDim.y + blockIdx.y) * kClaimCounterStride;
    int pending[S - 1];  // first keys of the tiles in flight, oldest first (increasing)
#pragma unroll
    for (int s = 0; s < S - 1; ++s) {
      pending[s] = (s * warps + warp_id) * TK;
      if (pending[s] < ctx) issue_at(pending[s], s);
      cp_async_commit();  // empty groups too: the wait count below stays S - 2
    }
    // Two claims in flight (lane 0's registers), the older read first: a claim's round trip
    // to L2, queued behind the K/V stream, has two tiles' time to come back. A warp whose
    // fixed tiles run past the end claims too, but then every tile from (S - 1) * W on is past
    // the end as well, so what it drops holds no key; and the claims a warp drops when it stops
    // were made after one that came back past the end (one thread's atomics on one address
    // take effect in program order), so they are past it too.
    int claim = 0, claim_next = 0;
    if (lane == 0) {
      claim = atomicAdd(counter, 1);
      claim_next = atomicAdd(counter, 1);
    }
    for (int tile = 0; pending[0] < ctx; ++tile) {
      cp_async_wait<S - 2>();  // this lane's copies of the oldest tile have landed
      __syncwarp();            // ... every lane's, and the stage refilled next was read by all
      if (tile == 0) KV_STAMP(kTimelineSplit, kStampFirst);
      const int t0 = pending[0];
#pragma unroll
      for (int s = 0; s + 1 < S - 1; ++s) pending[s] = pending[s + 1];
      const int next = ((S - 1) * warps + __shfl_sync(0xffffffffu, claim, 0)) * TK;
      pending[S - 2] = next;
      claim = claim_next;
      if (next < ctx) {
        issue_at(next, (tile + S - 1) % S);
        if (lane == 0) claim_next = atomicAdd(counter, 1);
      }
      cp_async_commit();
      consume(tile % S, t0, ctx);
    }
  } else {
#pragma unroll
    for (int s = 0; s < S - 1; ++s) {
      if (s < tiles) issue(s);
      cp_async_commit();  // empty groups too: the wait count below stays S - 2
    }
    for (int tile = 0; tile < tiles; ++tile) {
      cp_async_wait<S - 2>();  // this lane's copies of `tile` have landed
      __syncwarp();            // ... every lane's, and the stage refilled next was read by all
      if (tile == 0) KV_STAMP(kTimelineSplit, kStampFirst);
      if (tile + S - 1 < tiles) issue(tile + S - 1);
      cp_async_commit();
      consume(tile % S, t_first + tile * kStep, end);
    }
  }
  cp_async_wait<0>();

  allow_dependent_launch();
  __syncthreads();  // s_acc aliases every warp's stages
  KV_STAMP(kTimelineSplit, kStampLoopEnd);
  st.store(s_acc, s_m, s_l, warp, gr, tq);
  __syncthreads();
  write_block_result<T, D, kMmaHeads, NW, C>(a, s_acc, s_m, s_l, b, hk, g0, gcount, split);
  KV_STAMP(kTimelineSplit, kStampExit);
}

}  // namespace cuda
}  // namespace kvmicro
