// The MSL shim: enough of Metal Shading Language for g++ to compile kvmicro's .metal kernels as
// C++20 and run them on CPU threads, so that they can be checked against the oracle on Linux.
// Test-only; nothing here ships. It emulates, it does not validate MSL: only Apple's compiler
// (xcrun metal) sees MSL-only errors. tests/test_metal_lint.py keeps the kernels in the subset
// this header compiles (docs/metal.md lists it).
//
// Layout of this header: (1) every std header, (2) the runtime (types, builtins, barriers, SIMD
// exchange, launcher, job runner) written with std names, (3) last, the MSL keyword macros
// (`device`, `thread`, `kernel`, ...), which would break std headers included after them.
//
// Semantics, stricter than a GPU where that catches bugs:
// - a threadgroup is real concurrent threads; threadgroups run one after another, in a shuffled
//   order (a kernel must not depend on the order of its threadgroups);
// - threadgroup_barrier: every thread of the group must arrive, from the same call site. A thread
//   arriving at another site, a thread returning while others wait, or a barrier that does not
//   complete within the watchdog (KV_SHIM_WATCHDOG_MS, default 2000) ends the process with
//   "non-uniform barrier at file:line";
// - simd_* functions need all 32 lanes of the simdgroup at the same call site (same rules);
// - threadgroup memory exists only as host-sized [[threadgroup(i)]] parameters, and it and every
//   output buffer are filled with NaN bytes (0xFF) before each launch.
#pragma once

// ---- (1) std headers ---------------------------------------------------------------------------
#include <algorithm>
#include <array>
#include <barrier>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <source_location>
#include <sstream>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include <unistd.h>

#include "../../csrc/common/half.h"  // the project's exact float16 / bfloat16 conversions

// ---- (2) the runtime ---------------------------------------------------------------------------

// 16-bit floats as MSL has them: storage of IEEE binary16 / bfloat16 bits, converted to and from
// float with round-to-nearest-even. There is no arithmetic on them: an expression converts to
// float first (kernels compute in float; the lint test forbids the `h` literal suffix).
struct half {
  uint16_t bits;
  half() = default;
  half(float f) : bits(kvmicro::f32_to_f16(f)) {}
  operator float() const { return kvmicro::f16_to_f32(bits); }
};
struct bfloat {
  uint16_t bits;
  bfloat() = default;
  bfloat(float f) : bits(kvmicro::f32_to_bf16(f)) {}
  operator float() const { return kvmicro::bf16_to_f32(bits); }
};
static_assert(sizeof(half) == 2 && sizeof(bfloat) == 2);

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;

namespace metal {

// MSL vector types: .x .y .z .w and [i]; 3-vectors take the size of 4-vectors, as in MSL.
template <class T, int N>
struct vec;

#define KVMICRO_SHIM_VEC_COMMON(N)                                                      \
  static constexpr int kSize = N;                                                       \
  T& operator[](int i) { return (&x)[i]; }                                              \
  const T& operator[](int i) const { return (&x)[i]; }                                  \
  template <class U>                                                                    \
  explicit vec(const vec<U, N>& o) {                                                    \
    for (int i = 0; i < N; ++i) (*this)[i] = T(float(o[i]));                            \
  }

template <class T>
struct alignas(2 * sizeof(T)) vec<T, 2> {
  T x, y;
  vec() = default;
  explicit vec(T s) : x(s), y(s) {}
  vec(T a, T b) : x(a), y(b) {}
  KVMICRO_SHIM_VEC_COMMON(2)
};
template <class T>
struct alignas(4 * sizeof(T)) vec<T, 3> {
  T x, y, z;
  vec() = default;
  explicit vec(T s) : x(s), y(s), z(s) {}
  vec(T a, T b, T c) : x(a), y(b), z(c) {}
  KVMICRO_SHIM_VEC_COMMON(3)
};
template <class T>
struct alignas(4 * sizeof(T)) vec<T, 4> {
  T x, y, z, w;
  vec() = default;
  explicit vec(T s) : x(s), y(s), z(s), w(s) {}
  vec(T a, T b, T c, T d) : x(a), y(b), z(c), w(d) {}
  KVMICRO_SHIM_VEC_COMMON(4)
};
#undef KVMICRO_SHIM_VEC_COMMON

#define KVMICRO_SHIM_VEC_OP(op)                                                         \
  template <class T, int N>                                                             \
  vec<T, N> operator op(const vec<T, N>& a, const vec<T, N>& b) {                       \
    vec<T, N> r;                                                                        \
    for (int i = 0; i < N; ++i) r[i] = a[i] op b[i];                                    \
    return r;                                                                           \
  }                                                                                     \
  template <class T, int N>                                                             \
  vec<T, N> operator op(const vec<T, N>& a, std::type_identity_t<T> s) {                \
    vec<T, N> r;                                                                        \
    for (int i = 0; i < N; ++i) r[i] = a[i] op s;                                       \
    return r;                                                                           \
  }                                                                                     \
  template <class T, int N>                                                             \
  vec<T, N> operator op(std::type_identity_t<T> s, const vec<T, N>& a) {                \
    vec<T, N> r;                                                                        \
    for (int i = 0; i < N; ++i) r[i] = s op a[i];                                       \
    return r;                                                                           \
  }                                                                                     \
  template <class T, int N>                                                             \
  vec<T, N>& operator op##=(vec<T, N>& a, const vec<T, N>& b) {                         \
    return a = a op b;                                                                  \
  }                                                                                     \
  template <class T, int N>                                                             \
  vec<T, N>& operator op##=(vec<T, N>& a, std::type_identity_t<T> s) {                  \
    return a = a op s;                                                                  \
  }
KVMICRO_SHIM_VEC_OP(+)
KVMICRO_SHIM_VEC_OP(-)
KVMICRO_SHIM_VEC_OP(*)
KVMICRO_SHIM_VEC_OP(/)
#undef KVMICRO_SHIM_VEC_OP

template <class T, int N>
vec<T, N> operator-(const vec<T, N>& a) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r[i] = -a[i];
  return r;
}

template <int N>
float dot(const vec<float, N>& a, const vec<float, N>& b) {
  float s = 0.0f;
  for (int i = 0; i < N; ++i) s += a[i] * b[i];
  return s;
}

// metal:: math on float (and int for min/max). Exact libm results: Metal's fast-math versions
// are approximate, which the oracle tolerance covers.
inline float exp2(float x) { return std::exp2(x); }
inline float exp(float x) { return std::exp(x); }
inline float log2(float x) { return std::log2(x); }
inline float sqrt(float x) { return std::sqrt(x); }
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
inline float fabs(float x) { return std::fabs(x); }
inline float abs(float x) { return std::fabs(x); }
inline float fma(float a, float b, float c) { return std::fma(a, b, c); }
inline float floor(float x) { return std::floor(x); }
inline float ceil(float x) { return std::ceil(x); }
inline bool isnan(float x) { return std::isnan(x); }
inline bool isinf(float x) { return std::isinf(x); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline float min(float a, float b) { return std::fmin(a, b); }
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline uint max(uint a, uint b) { return a > b ? a : b; }
inline uint min(uint a, uint b) { return a < b ? a : b; }
inline float clamp(float x, float lo, float hi) { return std::fmin(std::fmax(x, lo), hi); }
namespace fast {
inline float exp2(float x) { return std::exp2(x); }
inline float exp(float x) { return std::exp(x); }
}  // namespace fast
namespace precise {
inline float exp2(float x) { return std::exp2(x); }
inline float exp(float x) { return std::exp(x); }
}  // namespace precise

enum class mem_flags : int { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags((int)a | (int)b); }

}  // namespace metal

typedef metal::vec<float, 2> float2;
typedef metal::vec<float, 3> float3;
typedef metal::vec<float, 4> float4;
typedef metal::vec<half, 2> half2;
typedef metal::vec<half, 3> half3;
typedef metal::vec<half, 4> half4;
typedef metal::vec<bfloat, 2> bfloat2;
typedef metal::vec<bfloat, 3> bfloat3;
typedef metal::vec<bfloat, 4> bfloat4;
typedef metal::vec<int, 2> int2;
typedef metal::vec<int, 3> int3;
typedef metal::vec<int, 4> int4;
typedef metal::vec<uint, 2> uint2;
typedef metal::vec<uint, 3> uint3;
typedef metal::vec<uint, 4> uint4;
static_assert(sizeof(float3) == 16 && sizeof(half3) == 8 && sizeof(half4) == 8 &&
              alignof(float4) == 16, "MSL vector sizes");

namespace msl {

[[noreturn]] inline void fail(const std::string& message) {
  std::fprintf(stderr, "msl_shim: %s\n", message.c_str());
  std::fflush(stderr);
  _exit(86);
}

inline std::string where(const std::source_location& loc) {
  return std::string(loc.file_name()) + ":" + std::to_string(loc.line());
}

inline int watchdog_ms() {
  const char* env = std::getenv("KV_SHIM_WATCHDOG_MS");
  return env ? std::atoi(env) : 2000;
}

constexpr int kSimdWidth = 32;

// One meeting point of `expected` threads: a threadgroup barrier, or one simdgroup's SIMD
// exchange. All its state is guarded by its mutex.
struct Rendezvous {
  std::mutex mu;
  int exited = 0;  // threads of its scope (threadgroup or simdgroup) that returned
  int expected = 0;
  int arrived = 0;
  uint64_t generation = 0;
  std::source_location site;
  std::condition_variable cv;
};

// The running threadgroup.
struct Group {
  int threads = 0;
  Rendezvous barrier;
  std::vector<std::unique_ptr<Rendezvous>> simd;  // one per simdgroup
  // SIMD exchange slots, double-buffered by each lane's op count: [simdgroup][parity][lane].
  std::vector<std::array<std::array<std::array<unsigned char, 32>, kSimdWidth>, 2>> slots;
};

// What a thread knows of itself (the builtin attributes).
struct ThreadCtx {
  Group* group = nullptr;
  uint3 thread_position_in_threadgroup{0u};
  uint3 threadgroup_position_in_grid{0u};
  uint3 threads_per_threadgroup{0u};
  uint3 threadgroups_per_grid{0u};
  uint thread_index = 0;
  uint simdgroup = 0;
  uint lane = 0;
  uint64_t simd_ops = 0;  // this lane's SIMD exchanges so far (picks the slot buffer)
};

inline thread_local ThreadCtx* tls = nullptr;

inline void meet(Rendezvous& r, const char* scope, std::unique_lock<std::mutex>& lock,
                 const std::source_location& loc) {
  if (r.exited > 0)
    fail("non-uniform barrier at " + where(loc) + ": " + std::to_string(r.exited) +
         " thread(s) of the " + scope + " already returned");
  if (r.arrived == 0) {
    r.site = loc;
  } else if (r.site.line() != loc.line() || std::strcmp(r.site.file_name(), loc.file_name())) {
    fail("non-uniform barrier at " + where(loc) + ": other threads of the " + scope +
         " wait at " + where(r.site));
  }
  if (++r.arrived == r.expected) {
    r.arrived = 0;
    ++r.generation;
    r.cv.notify_all();
    return;
  }
  const uint64_t mine = r.generation;
  const int ms = watchdog_ms();
  if (!r.cv.wait_for(lock, std::chrono::milliseconds(ms), [&] { return r.generation != mine; }))
    fail("non-uniform barrier at " + where(loc) + ": " + std::to_string(r.arrived) + " of " +
         std::to_string(r.expected) + " threads of the " + scope + " arrived within " +
         std::to_string(ms) + " ms");
}

inline void threadgroup_barrier_at(const std::source_location& loc) {
  Rendezvous& r = tls->group->barrier;
  std::unique_lock<std::mutex> lock(r.mu);
  meet(r, "threadgroup", lock, loc);
}

// A thread left the kernel: it must not leave others waiting at a barrier.
inline void thread_exit() {
  Group& g = *tls->group;
  {
    std::unique_lock<std::mutex> lock(g.barrier.mu);
    ++g.barrier.exited;
    if (g.barrier.arrived > 0)
      fail("non-uniform barrier at " + where(g.barrier.site) +
           ": a thread of the threadgroup returned while others wait there");
  }
  Rendezvous& s = *g.simd[tls->simdgroup];
  std::unique_lock<std::mutex> lock(s.mu);
  ++s.exited;
  if (s.arrived > 0)
    fail("non-uniform barrier at " + where(s.site) +
         ": a lane of the simdgroup returned while others wait at this SIMD op");
}

// Every lane deposits `value`; once all 32 have, each gets the whole simdgroup's values.
template <class T>
std::array<T, kSimdWidth> simd_exchange(const T& value, const std::source_location& loc) {
  static_assert(sizeof(T) <= 32 && std::is_trivially_copyable_v<T>);
  ThreadCtx& c = *tls;
  Group& g = *c.group;
  const int parity = (int)(c.simd_ops++ & 1);
  auto& buf = g.slots[c.simdgroup][parity];
  std::array<T, kSimdWidth> all;
  Rendezvous& r = *g.simd[c.simdgroup];
  std::unique_lock<std::mutex> lock(r.mu);
  std::memcpy(buf[c.lane].data(), &value, sizeof(T));
  meet(r, "simdgroup", lock, loc);
  for (int i = 0; i < kSimdWidth; ++i) std::memcpy(&all[i], buf[i].data(), sizeof(T));
  return all;
}

// ---- argument binding --------------------------------------------------------------------------

enum class Builtin : int {
  thread_position_in_threadgroup,
  thread_index_in_threadgroup,
  threadgroup_position_in_grid,
  threads_per_threadgroup,
  threadgroups_per_grid,
  thread_position_in_grid,
  simdgroup_index_in_threadgroup,
  thread_index_in_simdgroup,
  simdgroups_per_threadgroup,
  threads_per_simdgroup,
};

// Where one kernel parameter comes from, generated from its attribute by bindgen.py.
struct Binding {
  enum Kind { kBuffer, kThreadgroupMemory, kBuiltin } kind;
  int index;  // buffer slot (BufferIndex), threadgroup(i), or Builtin
  static Binding buffer(int slot) { return {kBuffer, slot}; }
  static Binding tg_memory(int i) { return {kThreadgroupMemory, i}; }
  static Binding builtin(Builtin b) { return {kBuiltin, (int)b}; }
};

struct LaunchState {
  std::string kernel;
  std::vector<unsigned char*> buffers;  // by slot; nullptr = not bound
  std::vector<unsigned char*> tg_memory;
};

inline uint3 builtin_value(Builtin b) {
  const ThreadCtx& c = *tls;
  switch (b) {
    case Builtin::thread_position_in_threadgroup: return c.thread_position_in_threadgroup;
    case Builtin::thread_index_in_threadgroup: return uint3(c.thread_index, 0u, 0u);
    case Builtin::threadgroup_position_in_grid: return c.threadgroup_position_in_grid;
    case Builtin::threads_per_threadgroup: return c.threads_per_threadgroup;
    case Builtin::threadgroups_per_grid: return c.threadgroups_per_grid;
    case Builtin::thread_position_in_grid: {
      uint3 r;
      for (int i = 0; i < 3; ++i)
        r[i] = c.threadgroup_position_in_grid[i] * c.threads_per_threadgroup[i] +
               c.thread_position_in_threadgroup[i];
      return r;
    }
    case Builtin::simdgroup_index_in_threadgroup: return uint3(c.simdgroup, 0u, 0u);
    case Builtin::thread_index_in_simdgroup: return uint3(c.lane, 0u, 0u);
    case Builtin::simdgroups_per_threadgroup: {
      const uint n = c.threads_per_threadgroup.x * c.threads_per_threadgroup.y *
                     c.threads_per_threadgroup.z;
      return uint3(n / kSimdWidth, 0u, 0u);
    }
    case Builtin::threads_per_simdgroup: return uint3((uint)kSimdWidth, 0u, 0u);
  }
  fail("unknown builtin");
}

template <class P>
P make_arg(const Binding& b, const LaunchState& s, int position) {
  using U = std::remove_cv_t<std::remove_reference_t<P>>;
  const std::string what = "kernel " + s.kernel + " parameter " + std::to_string(position);
  if constexpr (std::is_pointer_v<U> || std::is_reference_v<P>) {
    unsigned char* mem = nullptr;
    if (b.kind == Binding::kBuffer) {
      if (b.index < 0 || b.index >= (int)s.buffers.size() || !s.buffers[b.index])
        fail(what + " reads buffer slot " + std::to_string(b.index) + ", which is not bound");
      mem = s.buffers[b.index];
    } else if (b.kind == Binding::kThreadgroupMemory && std::is_pointer_v<U>) {
      if (b.index < 0 || b.index >= (int)s.tg_memory.size() || !s.tg_memory[b.index])
        fail(what + " uses threadgroup(" + std::to_string(b.index) + "), which has no size");
      mem = s.tg_memory[b.index];
    } else {
      fail(what + ": a pointer or reference needs [[buffer(i)]] or [[threadgroup(i)]]");
    }
    if constexpr (std::is_pointer_v<U>)
      return reinterpret_cast<U>(mem);
    else
      return *reinterpret_cast<U*>(mem);
  } else {
    if (b.kind != Binding::kBuiltin) fail(what + ": a value parameter must be a builtin");
    const uint3 v = builtin_value((Builtin)b.index);
    if constexpr (std::is_same_v<U, uint3>)
      return v;
    else if constexpr (std::is_same_v<U, uint2>)
      return uint2(v.x, v.y);
    else
      return (U)v.x;
  }
}

using Invoker = std::function<void(const std::vector<Binding>&, const LaunchState&)>;

struct KernelEntry {
  std::string host_name;
  std::string function;  // the kernel template's name: the key of its bindings
  Invoker invoke;
};

inline std::map<std::string, KernelEntry>& kernels() {
  static std::map<std::string, KernelEntry> table;
  return table;
}
inline std::map<std::string, std::vector<Binding>>& bindings() {
  static std::map<std::string, std::vector<Binding>> table;
  return table;
}

template <class... P, size_t... I>
void call_kernel(void (*fn)(P...), const std::vector<Binding>& b, const LaunchState& s,
                 std::index_sequence<I...>) {
  fn(make_arg<P>(b[I], s, (int)I)...);
}

template <class... P>
bool register_kernel(const char* host_name, const char* function, void (*fn)(P...)) {
  KernelEntry e;
  e.host_name = host_name;
  e.function = function;
  e.invoke = [fn, host_name](const std::vector<Binding>& b, const LaunchState& s) {
    if (b.size() != sizeof...(P))
      fail(std::string("kernel ") + host_name + " has " + std::to_string(sizeof...(P)) +
           " parameters but " + std::to_string(b.size()) + " bindings");
    call_kernel(fn, b, s, std::index_sequence_for<P...>{});
  };
  if (!kernels().emplace(host_name, std::move(e)).second)
    fail(std::string("kernel name ") + host_name + " instantiated twice");
  return true;
}

inline bool register_bindings(const char* function, std::vector<Binding> b) {
  bindings()[function] = std::move(b);
  return true;
}

// ---- the launcher ------------------------------------------------------------------------------

struct Launch {
  std::string kernel;
  uint3 grid{1u};
  uint3 threads{1u};
  std::vector<size_t> tg_bytes;  // [[threadgroup(i)]] sizes, as setThreadgroupMemoryLength
};

// Runs the grid: threadgroups one after another in a shuffled order, each as real threads.
inline void launch(const Launch& L, const std::vector<unsigned char*>& buffers, uint64_t seed) {
  auto found = kernels().find(L.kernel);
  if (found == kernels().end()) fail("no kernel named " + L.kernel + " in this library");
  const KernelEntry& k = found->second;
  auto bound = bindings().find(k.function);
  if (bound == bindings().end()) fail("no bindings generated for function " + k.function);
  const int n = (int)(L.threads.x * L.threads.y * L.threads.z);
  if (n <= 0 || n % kSimdWidth)
    fail(L.kernel + ": threads per threadgroup must be a positive multiple of 32");
  std::vector<uint3> order;
  for (uint z = 0; z < L.grid.z; ++z)
    for (uint y = 0; y < L.grid.y; ++y)
      for (uint x = 0; x < L.grid.x; ++x) order.push_back(uint3(x, y, z));
  std::mt19937_64 rng(seed);
  std::shuffle(order.begin(), order.end(), rng);

  // Exactly sized allocations, so that AddressSanitizer sees an overrun of threadgroup memory.
  std::vector<std::unique_ptr<unsigned char[]>> tg;
  LaunchState state;
  state.kernel = L.kernel;
  state.buffers = buffers;
  for (size_t bytes : L.tg_bytes) {
    tg.emplace_back(new unsigned char[bytes]);
    state.tg_memory.push_back(tg.back().get());
  }
  // One set of n threads runs every threadgroup of the launch in turn (creating threads per
  // group would dominate the run time); between groups they meet at a launch-internal barrier
  // whose completion step refills threadgroup memory and resets the group's state.
  Group g;
  g.threads = n;
  g.barrier.expected = n;
  const int simdgroups = n / kSimdWidth;
  for (int s = 0; s < simdgroups; ++s) {
    g.simd.emplace_back(new Rendezvous);
    g.simd.back()->expected = kSimdWidth;
  }
  g.slots.resize(simdgroups);
  auto prepare_group = [&]() noexcept {
    for (size_t i = 0; i < L.tg_bytes.size(); ++i) std::memset(tg[i].get(), 0xFF, L.tg_bytes[i]);
    g.barrier.arrived = 0;
    g.barrier.exited = 0;
    for (auto& r : g.simd) {
      r->arrived = 0;
      r->exited = 0;
    }
  };
  prepare_group();
  std::barrier<decltype(prepare_group)> between_groups(n, prepare_group);
  std::vector<std::thread> threads;
  threads.reserve(n);
  for (int i = 0; i < n; ++i) {
    threads.emplace_back([&, i] {
      for (const uint3& pos : order) {
        ThreadCtx c;
        c.group = &g;
        c.thread_index = (uint)i;
        c.thread_position_in_threadgroup =
            uint3(i % L.threads.x, (i / L.threads.x) % L.threads.y,
                  i / (L.threads.x * L.threads.y));
        c.threadgroup_position_in_grid = pos;
        c.threads_per_threadgroup = L.threads;
        c.threadgroups_per_grid = L.grid;
        c.simdgroup = (uint)(i / kSimdWidth);
        c.lane = (uint)(i % kSimdWidth);
        tls = &c;
        k.invoke(bound->second, state);
        thread_exit();
        tls = nullptr;
        between_groups.arrive_and_wait();
      }
    });
  }
  for (auto& t : threads) t.join();
}

// ---- the job runner: what the Python tests drive ---------------------------------------------
//
//   driver list                 prints every kernel name this library holds, one per line
//   driver JOB                  runs a job file, lines:
//     seed N                      shuffle seed for the threadgroup order
//     buffer SLOT BYTES PATH      slot's contents from a file of exactly BYTES bytes
//     buffer SLOT BYTES nan       an output: BYTES of 0xFF (NaN in every float type)
//     launch NAME GX GY GZ TX TY TZ [TG0 TG1 ...]   dispatch NAME; threadgroup(i) of TGi bytes
//     output SLOT PATH            after the launches, write the slot's bytes to PATH
inline int run_job(int argc, char** argv) {
  if (argc == 2 && std::string(argv[1]) == "list") {
    for (const auto& [name, entry] : kernels())
      std::printf("%s %s\n", name.c_str(), entry.function.c_str());
    return 0;
  }
  if (argc != 2) fail("usage: driver list | driver JOB");
  std::ifstream job(argv[1]);
  if (!job) fail(std::string("cannot read job ") + argv[1]);
  std::vector<std::vector<unsigned char>> storage(64);
  std::vector<std::pair<int, std::string>> outputs;
  uint64_t seed = 0;
  std::string line;
  while (std::getline(job, line)) {
    std::istringstream in(line);
    std::string word;
    if (!(in >> word)) continue;
    if (word == "seed") {
      in >> seed;
    } else if (word == "buffer") {
      int slot;
      size_t bytes;
      std::string path;
      in >> slot >> bytes >> path;
      if (slot < 0 || slot >= (int)storage.size()) fail("bad slot in: " + line);
      storage[slot].assign(bytes, 0xFF);
      if (path != "nan") {
        std::ifstream f(path, std::ios::binary);
        f.read(reinterpret_cast<char*>(storage[slot].data()), (std::streamsize)bytes);
        if (!f || f.gcount() != (std::streamsize)bytes) fail("short file for: " + line);
      }
    } else if (word == "launch") {
      Launch L;
      in >> L.kernel >> L.grid.x >> L.grid.y >> L.grid.z >> L.threads.x >> L.threads.y >>
          L.threads.z;
      size_t bytes;
      while (in >> bytes) L.tg_bytes.push_back(bytes);
      std::vector<unsigned char*> ptrs(storage.size(), nullptr);
      for (size_t i = 0; i < storage.size(); ++i)
        if (!storage[i].empty()) ptrs[i] = storage[i].data();
      launch(L, ptrs, seed);
    } else if (word == "output") {
      int slot;
      std::string path;
      in >> slot >> path;
      outputs.emplace_back(slot, path);
    } else {
      fail("unknown job line: " + line);
    }
  }
  for (const auto& [slot, path] : outputs) {
    std::ofstream f(path, std::ios::binary);
    f.write(reinterpret_cast<const char*>(storage[slot].data()),
            (std::streamsize)storage[slot].size());
    if (!f) fail("cannot write " + path);
  }
  return 0;
}

}  // namespace msl

// ---- SIMD functions and barriers, as kernels call them (the call site comes along) ------------
namespace metal {

template <class T>
T simd_sum(T x, std::source_location loc = std::source_location::current()) {
  const auto all = msl::simd_exchange(x, loc);
  T s = all[0];
  for (int i = 1; i < msl::kSimdWidth; ++i) s = s + all[i];
  return s;
}
template <class T>
T simd_max(T x, std::source_location loc = std::source_location::current()) {
  const auto all = msl::simd_exchange(x, loc);
  T s = all[0];
  for (int i = 1; i < msl::kSimdWidth; ++i) s = max(s, all[i]);
  return s;
}
template <class T>
T simd_min(T x, std::source_location loc = std::source_location::current()) {
  const auto all = msl::simd_exchange(x, loc);
  T s = all[0];
  for (int i = 1; i < msl::kSimdWidth; ++i) s = min(s, all[i]);
  return s;
}
template <class T>
T simd_shuffle(T x, ushort lane, std::source_location loc = std::source_location::current()) {
  return msl::simd_exchange(x, loc)[lane % msl::kSimdWidth];
}
template <class T>
T simd_broadcast(T x, ushort lane, std::source_location loc = std::source_location::current()) {
  return msl::simd_exchange(x, loc)[lane % msl::kSimdWidth];
}
template <class T>
T simd_shuffle_xor(T x, ushort mask, std::source_location loc = std::source_location::current()) {
  return msl::simd_exchange(x, loc)[(msl::tls->lane ^ mask) % msl::kSimdWidth];
}
template <class T>
T simd_shuffle_down(T x, ushort delta,
                    std::source_location loc = std::source_location::current()) {
  const uint src = msl::tls->lane + delta;
  const auto all = msl::simd_exchange(x, loc);
  return src < (uint)msl::kSimdWidth ? all[src] : x;
}

inline void threadgroup_barrier(mem_flags,
                                std::source_location loc = std::source_location::current()) {
  msl::threadgroup_barrier_at(loc);
}
// A simdgroup barrier meets the simdgroup's lanes (the same rules as a SIMD op).
inline void simdgroup_barrier(mem_flags,
                              std::source_location loc = std::source_location::current()) {
  (void)msl::simd_exchange(0, loc);
}

}  // namespace metal

// ---- (3) MSL keywords and the MSL branch of shared headers -------------------------------------
#define KVMICRO_MSL_SHIM 1
// The MSL version the shim stands for; 310 enables the bfloat instantiations. A test builds with
// -DKV_SHIM_METAL_VERSION=300 to check that bf16 kernels disappear below MSL 3.1.
#if defined(KV_SHIM_METAL_VERSION)
#define __METAL_VERSION__ KV_SHIM_METAL_VERSION
#else
#define __METAL_VERSION__ 310
#endif
#define kernel
#define device
#define constant
// `threadgroup` is also the name of an attribute ([[threadgroup(0)]]), so it cannot expand to
// nothing; `volatile` works in both places (a keyword in an attribute-token counts as an
// identifier, and an unknown attribute is ignored). Threadgroup memory is thus reached through
// volatile pointers: the shim's subset keeps it to scalar types.
#define threadgroup volatile
#define thread
#define METAL_FUNC inline

#define KVMICRO_SHIM_CAT2(a, b) a##b
#define KVMICRO_SHIM_CAT(a, b) KVMICRO_SHIM_CAT2(a, b)
#define KVMICRO_SHIM_REGISTER(name, func, ...)                                   \
  static const bool KVMICRO_SHIM_CAT(kvmicro_shim_kernel_, __COUNTER__) =        \
      ::msl::register_kernel(name, #func, &func<__VA_ARGS__>);
