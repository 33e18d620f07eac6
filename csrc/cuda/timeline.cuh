// The timeline probe of the attention kernels (issue 21: where the split kernel's time beyond a
// plain read of its bytes goes). Off unless the extension is built with -DKVMICRO_TIMELINE=ON:
// then thread 0 of every block of the tensor-core split kernels with register loads and with
// cp.async (the kernels the planner picks for 16-bit dtypes; not the SIMT or bulk-copy kernels)
// and of the combine kernel writes the device's global timer (ns, the same clock on every SM) at
// fixed points of its life into a per-translation-unit table, and
// cuda_timeline() hands the table to Python (scripts/timeline.py). Each run overwrites its
// blocks' rows, so after a graph replay the table holds the last op's. In the default build
// KV_STAMP expands to nothing: no kernel carries a trace of the probe.
#pragma once

#include <cstdint>

#include "cuda/cuda_host.h"

namespace kvmicro {
namespace cuda {

constexpr int kTimelineSlots = 8192;  // blocks per kernel recorded (by linear block index)
constexpr int kTimelineStamps = 5;
constexpr int kTimelineFields = 2 * kTimelineStamps + 1;

// Row of a split block: entry (before waiting for any earlier grid), sliced (its context length
// read and its slice known; 0 for a block past its sequence's end, which returns there), first
// (warp 0's first tile in shared memory or registers), loop_end (every warp's last tile
// consumed), exit (its output or partial state written), as global-timer values (ns, one clock
// for every SM: where blocks sit against each other; its tick may be coarser than 1 ns); then sm
// (the SM it ran on); then the same five points in the SM's cycle counter (clock64: exact
// within the block, so the script takes phase lengths from it). Row of a combine block: entry,
// released (after griddepcontrol.wait: the split grid complete and flushed), stats (the splits'
// max and sum reduced), summed (the weighted partial rows summed in shared memory), exit.
enum TimelineField : int {
  kStampEntry = 0,
  kStampSliced = 1,
  kStampFirst = 2,
  kStampLoopEnd = 3,
  kStampExit = 4,
  kStampReleased = kStampSliced,  // the combine block's points 2-4
  kStampStats = kStampFirst,
  kStampSummed = kStampLoopEnd,
  kFieldSm = kTimelineStamps,
  kFieldCycles = kTimelineStamps + 1,  // + point: the cycle counter at that point
};
enum TimelineKernel : int { kTimelineSplit = 0, kTimelineCombine = 1 };
static_assert(kTimelineSlots == kTimelineSlotsHost && kTimelineFields == kTimelineFieldsHost,
              "cuda_host.h describes the table to the bindings");

#if defined(KVMICRO_TIMELINE) && KVMICRO_TIMELINE

// static: one table per translation unit (no relocatable device code); the host functions of
// paged_sdpa.cu read the one its kernels write.
static __device__ unsigned long long g_kv_timeline[2][kTimelineSlots][kTimelineFields];

__device__ __forceinline__ void timeline_stamp(int kernel, int field) {
  if (threadIdx.x != 0) return;
  const unsigned slot = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  if (slot >= (unsigned)kTimelineSlots) return;
  unsigned long long now, cycles;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now)::"memory");
  asm volatile("mov.u64 %0, %%clock64;" : "=l"(cycles)::"memory");
  unsigned long long* row = g_kv_timeline[kernel][slot];
  row[field] = now;
  row[kFieldCycles + field] = cycles;
  if (field == kStampEntry) {
    unsigned sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    row[kFieldSm] = sm;
  }
}

#define KV_STAMP(kernel, field) ::kvmicro::cuda::timeline_stamp((kernel), (field))

#else

#define KV_STAMP(kernel, field) ((void)0)

#endif

}  // namespace cuda
}  // namespace kvmicro
