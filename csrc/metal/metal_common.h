// What every Objective-C++ file of the Metal host shares: the per-device context (device,
// library, pipeline cache, shared queues), error text from NSError, and the thread-QoS scope that
// is native:metal's priority. Mirrors cuda/cuda_common.cuh. Objective-C++ only.
#pragma once

#import <Foundation/Foundation.h>
#import <Metal/Metal.h>

#include <pthread/qos.h>

#include <map>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "common/device.h"

namespace kvmicro {
namespace metal {

std::string to_std(NSString* s);

// A failed Metal call becomes DeviceError (Python RuntimeError) carrying Metal's text and where.
[[noreturn]] void throw_metal_error(const std::string& what, NSError* err,
                                    const char* file, int line);
#define KV_METAL_FAIL(what, err) ::kvmicro::metal::throw_metal_error((what), (err), __FILE__, __LINE__)

// One per device for the life of the process (never freed: Metal objects must not be released
// during static destruction). Everything in it is created once and then only read, or guarded.
struct Context {
  id<MTLDevice> device = nil;
  int index = 0;
  // The metallib (one library), or one library per embedded .metal file compiled at run time.
  std::vector<id<MTLLibrary>> libraries;
  std::string library_origin;  // "metallib <path>" or "source ... (why no metallib)"
  bool bfloat = false;         // Apple6+ and the library has bfloat16 instantiations

  // One MTLComputePipelineState per kernel variant, built on first use (double-checked).
  id<MTLComputePipelineState> pipeline(const std::string& function);
  // queue=shared: one queue per (QoS class, maxCommandBufferCount) in the process.
  id<MTLCommandQueue> shared_queue(unsigned qos, int in_flight);
  id<MTLCommandQueue> new_queue(int in_flight);

 private:
  std::shared_mutex pipelines_mutex_;
  std::unordered_map<std::string, id<MTLComputePipelineState>> pipelines_;
  std::mutex queues_mutex_;
  std::map<std::pair<unsigned, int>, id<MTLCommandQueue>> queues_;
};

// The context of device `index` (MTLCopyAllDevices order; 0 = MTLCreateSystemDefaultDevice).
// Throws UnsupportedError without Metal, InvalidArgument for an index outside the devices.
Context& context(int index, const char* what);

// Loads the kernels once per device: the metallib CMake built beside the module, else the
// embedded .metal sources through newLibraryWithSource (metal_library.mm).
void load_library(Context& ctx);

// priority -1/0/1 -> QOS_CLASS_UTILITY / USER_INITIATED / USER_INTERACTIVE.
qos_class_t qos_for_priority(int priority);
const char* qos_name(qos_class_t qos);

// While alive, the calling thread runs at `qos` (the thread that encodes and commits is the
// only public lever macOS gives over submission; METAL.md). Restores the previous class after.
class QosScope {
 public:
  explicit QosScope(qos_class_t qos);
  ~QosScope();
  QosScope(const QosScope&) = delete;
  QosScope& operator=(const QosScope&) = delete;

 private:
  qos_class_t previous_ = QOS_CLASS_UNSPECIFIED;
  int previous_relative_ = 0;
  bool changed_ = false;
};

}  // namespace metal
}  // namespace kvmicro
