// The Metal-only entries of kvmicro._native, added by bindings.cpp under KVMICRO_WITH_METAL:
//   metal_device_count() -> int
//   metal_device_info(index) -> dict (name, registry_id, unified_memory, working_set_bytes,
//       max_buffer_bytes, threadgroup_memory_bytes, apple7/8/9, metal3, bfloat, os_version,
//       library)
//   metal_bandwidth(index) -> dict (read_gbps, copy_gbps, bytes, reps, method)
//   metal_submit_options(dict) -> dict: the parsed submission options, for tests
// Mirrors cuda/cuda_bindings.h.
#pragma once

#include <pybind11/pybind11.h>

#include <map>
#include <memory>
#include <string>

#include "common/device.h"

namespace kvmicro {

void register_metal(pybind11::module_& m);

// bindings.cpp's prepare() for device "metal": the submission options arrive as strings.
std::unique_ptr<PreparedOp> make_metal_op_from(const OpInputs& in, const DeviceOptions& opt,
                                               const std::map<std::string, std::string>& options);

}  // namespace kvmicro
