// Metal device queries, submission options and ceilings for Python (metal_bindings.cpp) and
// provenance: plain structs, no Objective-C, so the binding file compiles as ordinary C++.
// Mirrors cuda/cuda_host.h.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include "common/device.h"

namespace kvmicro {
namespace metal {

// Devices Metal reports here (MTLCopyAllDevices); 0, never an exception, without Metal.
int device_count();

struct MetalDeviceInfo {
  std::string name;               // MTLDevice.name, e.g. "Apple M2 Max"
  int index = 0;
  uint64_t registry_id = 0;       // MTLDevice.registryID
  bool unified_memory = false;    // hasUnifiedMemory
  uint64_t working_set_bytes = 0; // recommendedMaxWorkingSetSize
  uint64_t max_buffer_bytes = 0;  // maxBufferLength
  uint64_t threadgroup_memory_bytes = 0;  // maxThreadgroupMemoryLength
  bool apple7 = false, apple8 = false, apple9 = false, metal3 = false;  // supportsFamily
  bool bfloat = false;            // bfloat16 kernels usable: the library has them and Apple6+
  std::string os_version;         // NSProcessInfo operatingSystemVersionString
  std::string library;            // where the kernels came from: metallib path or "source"
};

MetalDeviceInfo device_info(int index);

// How ops are submitted: the case options of native:metal (src/kvmicro/backends/native_metal.py),
// each a variant knob that is part of a record's identity.
struct SubmitOptions {
  bool private_storage = false;  // storage=private: MTLStorageModePrivate, uploads through a blit
  bool shared_queue = true;      // queue=shared: one queue per (device, QoS, in_flight) in the
                                 // process; queue=per_stream: this op's own MTLCommandQueue
  int per_buffer = 1;            // run() calls encoded into one command buffer before its commit
  int in_flight = 64;            // the queue's maxCommandBufferCount (Metal's default is 64)
};

// The priority is DeviceOptions::priority (-1/0/1), as on CUDA: on Metal it becomes the QoS class
// of the submitting thread while it encodes and commits (UTILITY / USER_INITIATED /
// USER_INTERACTIVE), because Metal has no public GPU priority for a compute queue.

// Parse the string options the Python side passes ({"storage": "private", ...}); an unknown key
// or bad value raises InvalidArgument naming it and the valid ones.
SubmitOptions parse_submit_options(const char* op, const std::map<std::string, std::string>& kv);

std::unique_ptr<PreparedOp> make_metal_op(const OpInputs& in, const DeviceOptions& opt,
                                          const SubmitOptions& submit);

// Memory ceilings in decimal GB/s, measured once per device and cached, on GPU time
// (GPUEndTime - GPUStartTime): a blit copy (bytes read + written) and a 16-byte read kernel.
struct Bandwidth {
  double read_gbps = 0;
  double copy_gbps = 0;
  int64_t bytes = 0;
  int reps = 0;
};

Bandwidth measure_bandwidth(int index);

}  // namespace metal
}  // namespace kvmicro
