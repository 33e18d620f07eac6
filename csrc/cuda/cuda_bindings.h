// The CUDA-only entries of kvmicro._native, added by bindings.cpp under KVMICRO_WITH_CUDA:
//   cuda_device_count() -> int
//   cuda_device_info(index) -> dict (name, sm_count, l2_bytes, memory_bytes, clock_khz,
//       mem_clock_khz, bus_width, cc_major, cc_minor, driver_version, runtime_version,
//       priority_least, priority_greatest, max_shared_per_block_optin)
//   cuda_bandwidth(index) -> dict (read_gbps, copy_gbps, memcpy_gbps, copy_kernel_gbps, bytes,
//       reps, method)
#pragma once

#include <pybind11/pybind11.h>

namespace kvmicro {

void register_cuda(pybind11::module_& m);

}  // namespace kvmicro
