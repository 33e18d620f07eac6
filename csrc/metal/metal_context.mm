// Per-device state shared by every prepared op of the process: the MTLDevice, its library, the
// pipeline cache (one MTLComputePipelineState per kernel variant, double-checked as in MLX's
// Device::get_kernel) and the shared queues; plus the thread-QoS scope and Metal's error text.
#include <cstring>
#include <memory>
#include <string>

#include "common/validate.h"
#include "metal/metal_common.h"

namespace kvmicro {
namespace metal {

std::string to_std(NSString* s) {
  if (!s) return std::string();
  const char* utf8 = s.UTF8String;
  return utf8 ? std::string(utf8) : std::string();
}

void throw_metal_error(const std::string& what, NSError* err, const char* file,
                       int line) {
  const char* base = std::strrchr(file, '/');
  std::string msg = what;
  if (err)
    msg += ": " + to_std(err.localizedDescription) + " (" + to_std(err.domain) + " " +
           std::to_string((long)err.code) + ")";
  msg += std::string(" at ") + (base ? base + 1 : file) + ":" + std::to_string(line);
  throw DeviceError(msg);
}

namespace {

std::mutex& contexts_mutex() {
  static std::mutex* m = new std::mutex;
  return *m;
}
std::map<int, Context*>& contexts() {
  static auto* c = new std::map<int, Context*>;  // never freed, see Context
  return *c;
}

id<MTLDevice> find_device(int index) {
  if (index == 0) return MTLCreateSystemDefaultDevice();
  NSArray<id<MTLDevice>>* all = MTLCopyAllDevices();
  if ((NSUInteger)index >= all.count) return nil;
  return [all objectAtIndex:(NSUInteger)index];
}

}  // namespace

int device_count() {
  @autoreleasepool {
    NSArray<id<MTLDevice>>* all = MTLCopyAllDevices();
    if (all.count > 0) return (int)all.count;
    return MTLCreateSystemDefaultDevice() ? 1 : 0;
  }
}

Context& context(int index, const char* what) {
  std::lock_guard<std::mutex> lock(contexts_mutex());
  auto it = contexts().find(index);
  if (it != contexts().end()) return *it->second;
  const int n = device_count();
  if (n == 0) throw UnsupportedError(std::string("[") + what + "] no Metal device is visible here");
  if (index < 0 || index >= n)
    throw InvalidArgument(std::string("[") + what + "] Metal device index " +
                          std::to_string(index) + " outside [0, " + std::to_string(n) + ")");
  auto ctx = std::make_unique<Context>();
  ctx->index = index;
  ctx->device = find_device(index);
  if (!ctx->device)
    throw UnsupportedError(std::string("[") + what + "] Metal device " + std::to_string(index) +
                           " could not be opened");
  load_library(*ctx);
  Context* raw = ctx.release();
  contexts()[index] = raw;
  return *raw;
}

id<MTLComputePipelineState> Context::pipeline(const std::string& function) {
  {
    std::shared_lock<std::shared_mutex> read(pipelines_mutex_);
    auto it = pipelines_.find(function);
    if (it != pipelines_.end()) return it->second;
  }
  std::unique_lock<std::shared_mutex> write(pipelines_mutex_);
  auto it = pipelines_.find(function);  // another thread may have built it meanwhile
  if (it != pipelines_.end()) return it->second;
  @autoreleasepool {
    NSString* name = [NSString stringWithUTF8String:function.c_str()];
    id<MTLFunction> fn = nil;
    for (id<MTLLibrary> library : libraries) {
      if (name) fn = [library newFunctionWithName:name];
      if (fn) break;
    }
    if (!fn)
      throw UnsupportedError("[metal] kernel '" + function + "' is not in the library (" +
                             library_origin + "): no instantiation for this case");
    NSError* err = nil;
    id<MTLComputePipelineState> state = [device newComputePipelineStateWithFunction:fn error:&err];
    if (!state) KV_METAL_FAIL("[metal] newComputePipelineStateWithFunction " + function, err);
    pipelines_.emplace(function, state);
    return state;
  }
}

id<MTLCommandQueue> Context::new_queue(int in_flight) {
  id<MTLCommandQueue> q = [device newCommandQueueWithMaxCommandBufferCount:(NSUInteger)in_flight];
  if (!q) KV_METAL_FAIL("[metal] newCommandQueueWithMaxCommandBufferCount", nil);
  return q;
}

id<MTLCommandQueue> Context::shared_queue(unsigned qos, int in_flight) {
  std::lock_guard<std::mutex> lock(queues_mutex_);
  auto key = std::make_pair(qos, in_flight);
  auto it = queues_.find(key);
  if (it != queues_.end()) return it->second;
  id<MTLCommandQueue> q = new_queue(in_flight);
  queues_.emplace(key, q);
  return q;
}

qos_class_t qos_for_priority(int priority) {
  if (priority < 0) return QOS_CLASS_UTILITY;
  if (priority > 0) return QOS_CLASS_USER_INTERACTIVE;
  return QOS_CLASS_USER_INITIATED;
}

const char* qos_name(qos_class_t qos) {
  switch (qos) {
    case QOS_CLASS_USER_INTERACTIVE: return "USER_INTERACTIVE";
    case QOS_CLASS_USER_INITIATED: return "USER_INITIATED";
    case QOS_CLASS_DEFAULT: return "DEFAULT";
    case QOS_CLASS_UTILITY: return "UTILITY";
    case QOS_CLASS_BACKGROUND: return "BACKGROUND";
    case QOS_CLASS_UNSPECIFIED: return "UNSPECIFIED";
  }
  return "unknown";
}

QosScope::QosScope(qos_class_t qos) {
  if (pthread_get_qos_class_np(pthread_self(), &previous_, &previous_relative_) != 0)
    previous_ = QOS_CLASS_UNSPECIFIED;
  if (previous_ == qos) return;
  const int err = pthread_set_qos_class_self_np(qos, 0);
  if (err != 0)
    throw UnsupportedError(std::string("[metal] pthread_set_qos_class_self_np(") + qos_name(qos) +
                           ") failed with errno " + std::to_string(err) +
                           ": this thread's QoS cannot be set (was it given a pthread priority?)");
  changed_ = true;
}

QosScope::~QosScope() {
  if (!changed_) return;
  // UNSPECIFIED cannot be requested again; DEFAULT is what an unspecified thread runs at.
  (void)pthread_set_qos_class_self_np(
      previous_ == QOS_CLASS_UNSPECIFIED ? QOS_CLASS_DEFAULT : previous_, previous_relative_);
}

}  // namespace metal
}  // namespace kvmicro
