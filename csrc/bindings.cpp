// kvmicro._native: the pybind11 module. Thin on purpose: it converts numpy arrays into OpInputs,
// has common/validate.h check them once, and hands them to the device's factory. It computes
// nothing and never touches a kernel.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <initializer_list>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "common/capabilities.h"
#include "common/device.h"
#include "common/half.h"
#include "common/layout.h"
#include "common/validate.h"
#include "cpu/cpu.h"
#if defined(KVMICRO_WITH_CUDA)
#include "cuda/cuda_bindings.h"
#endif
#if defined(KVMICRO_WITH_METAL)
#include "metal/metal_bindings.h"  // native:metal (csrc/metal, Apple only)
#endif

#ifndef KVMICRO_VERSION
#define KVMICRO_VERSION "unknown"
#endif

namespace py = pybind11;

namespace kvmicro {
namespace {

enum class Elem { kData, kInt32 };  // an array of the op's dtype, or of int32 indices

// Check one argument (None, or a C-contiguous ndarray of the expected element type) and record
// its shape and data pointer.
ArrayDims inspect(const char* op, const char* name, const py::object& obj, Elem elem, DType dtype,
                  const void** data) {
  ArrayDims out;
  *data = nullptr;
  if (obj.is_none()) return out;
  if (!py::isinstance<py::array>(obj))
    invalid(op, name, " must be a numpy array, got ",
            py::str(py::type::handle_of(obj).attr("__name__")).cast<std::string>());
  const py::array arr = py::reinterpret_borrow<py::array>(obj);
  bool ok;
  const char* want;
  if (elem == Elem::kInt32) {
    ok = py::isinstance<py::array_t<int32_t>>(arr);
    want = "int32";
  } else if (dtype == DType::kFloat32) {
    ok = py::isinstance<py::array_t<float>>(arr);
    want = "float32";
  } else {
    ok = py::isinstance<py::array_t<uint16_t>>(arr);
    want = dtype == DType::kFloat16 ? "uint16 (the bit patterns of float16)"
                                    : "uint16 (the bit patterns of bfloat16)";
  }
  if (!ok)
    invalid(op, name, " has dtype ", py::str(arr.dtype()).cast<std::string>(), "; expected ", want);
  if (!(arr.flags() & py::array::c_style)) invalid(op, name, " must be C-contiguous");
  out.present = true;
  for (py::ssize_t i = 0; i < arr.ndim(); ++i) out.dims.push_back((int64_t)arr.shape(i));
  *data = arr.data();
  return out;
}

// What Python holds: the device op plus what it needs to shape its outputs.
struct NativeOp {
  std::unique_ptr<PreparedOp> op;
  std::string device;
  OpKind kind;
  OpParams params;
  std::vector<int64_t> pool_shape;  // physical shape, in the layout's order

  py::array download(BufferIndex which, const std::vector<int64_t>& shape) {
    py::array arr = params.dtype == (int32_t)DType::kFloat32
                        ? py::array(py::dtype::of<float>(), shape)
                        : py::array(py::dtype::of<uint16_t>(), shape);
    void* dst = arr.mutable_data();
    {
      py::gil_scoped_release release;
      op->download(which, dst);
    }
    return arr;
  }

  // attention: (out,); gather: (k_dense, v_dense); append: (k_pool, v_pool).
  py::tuple output() {
    const OpParams& p = params;
    const int64_t B = p.batch, Hkv = p.pool.kv_heads, D = p.pool.head_dim;
    if (is_attention(kind))
      return py::make_tuple(download(kBufOut, {B, p.q_heads, p.q_len, D}));
    if (kind == OpKind::kGather) {
      const std::vector<int64_t> dense{B, Hkv, p.max_ctx_pad, D};
      return py::make_tuple(download(kBufKDense, dense), download(kBufVDense, dense));
    }
    return py::make_tuple(download(kBufKPool, pool_shape), download(kBufVPool, pool_shape));
  }
};

std::unique_ptr<NativeOp> prepare(const std::string& device, const std::string& op_str,
                                  const std::string& layout, const std::string& dtype_str,
                                  int64_t block_size, double scale, const py::object& q,
                                  const py::object& k_pool, const py::object& v_pool,
                                  const py::object& block_table, const py::object& ctx,
                                  const py::object& k_dense, const py::object& v_dense,
                                  const py::object& k_new, const py::object& v_new, int copies,
                                  int threads, int index, int priority,
                                  const std::map<std::string, std::string>& options) {
  const OpKind op = parse_op(op_str);
  const char* name = op_name(op);
  const DType dtype = parse_dtype(op, dtype_str);

  OpInputs in{};
  in.op = op;
  InputDims dims;
  const void* ptr;
  dims.q = inspect(name, "q", q, Elem::kData, dtype, &in.q);
  dims.k_pool = inspect(name, "k_pool", k_pool, Elem::kData, dtype, &in.k_pool);
  dims.v_pool = inspect(name, "v_pool", v_pool, Elem::kData, dtype, &in.v_pool);
  dims.block_table = inspect(name, "block_table", block_table, Elem::kInt32, dtype, &ptr);
  in.table = static_cast<const int32_t*>(ptr);
  dims.ctx = inspect(name, "ctx", ctx, Elem::kInt32, dtype, &ptr);
  in.ctx = static_cast<const int32_t*>(ptr);
  dims.k_dense = inspect(name, "k_dense", k_dense, Elem::kData, dtype, &in.k_dense);
  dims.v_dense = inspect(name, "v_dense", v_dense, Elem::kData, dtype, &in.v_dense);
  dims.k_new = inspect(name, "k_new", k_new, Elem::kData, dtype, &in.k_new);
  dims.v_new = inspect(name, "v_new", v_new, Elem::kData, dtype, &in.v_new);

  in.params = derive_params(op, layout, dtype, block_size, scale, dims);
  validate_inputs(in);

  if (copies < 1) invalid(name, "copies ", copies, " must be >= 1");
  if (threads < 0 || threads > 1024)
    invalid(name, "threads ", threads, " must be in [0, 1024] (0 = every core)");
  if (index < 0) invalid(name, "device index ", index, " must be >= 0");
  if (priority < -1 || priority > 1)
    invalid(name, "priority ", priority, " must be -1 (low), 0 (normal) or 1 (high)");
  DeviceOptions opt;
  opt.copies = copies;
  opt.threads = threads;
  opt.index = index;
  opt.priority = priority;
  // native:metal's options are its submission axes, parsed by the Metal host (metal_host.h).
  if (device != "metal")
    opt.variant = parse_variant(name, device, {options.begin(), options.end()});

  auto result = std::make_unique<NativeOp>();
  result->device = device;
  result->kind = op;
  result->params = in.params;
  result->pool_shape = dims.k_pool.dims;
  // The arrays stay referenced by this frame's arguments while the factory copies them.
  py::gil_scoped_release release;
  if (device == "cpu") {
    result->op = make_cpu_op(in, opt);
  } else if (device == "cuda") {
#if defined(KVMICRO_WITH_CUDA)
    result->op = make_cuda_op(in, opt);
#else
    throw UnsupportedError(op_message(name, "device 'cuda': kvmicro._native was built without CUDA "
                                            "(no nvcc at build time, or KVMICRO_CUDA=OFF)"));
#endif
  } else if (device == "metal") {
#if defined(KVMICRO_WITH_METAL)
    result->op = make_metal_op_from(in, opt, options);
#else
    throw UnsupportedError(op_message(name, "device 'metal': kvmicro._native was built without "
                                            "Metal (it needs macOS)"));
#endif
  } else {
    invalid(name, "unknown device ", quoted(device), "; expected cpu or cuda");
  }
  return result;
}

py::dict pool_strides(const std::string& layout, int64_t N, int64_t S, int64_t H, int64_t D) {
  for (int64_t v : {N, S, H, D})
    if (v <= 0 || v > INT32_MAX) invalid("layout", "dimension ", v, " must be in [1, 2^31)");
  check_layout("layout", layout);
  // The outermost stride is the product of the three inner sizes, and the pool's element count
  // that of all four: both must fit the int64 offsets kernels form.
  if ((double)N * (double)S * (double)H * (double)D >= 9.2e18)
    invalid("layout", "a pool of N ", N, " x S ", S, " x H ", H, " x D ", D,
            " elements overflows the int64 offsets kernels use");
  PoolView view;
  make_pool_view(layout.c_str(), (int32_t)N, (int32_t)S, (int32_t)H, (int32_t)D, &view);
  py::dict out;
  out["N"] = view.stride_n;
  out["S"] = view.stride_s;
  out["H"] = view.stride_h;
  out["D"] = view.stride_d;
  return out;
}

// Test hooks for common/half.h: float32 -> 16-bit patterns and back, through the portable
// scalar code or (simd=True, where the CPU has it) the F16C row converters the kernels use.
py::array_t<uint16_t> round_to(const std::string& dtype, py::array_t<float, py::array::c_style> x,
                               bool simd) {
  const DType dt = parse_dtype(OpKind::kGather, dtype);
  if (dt == DType::kFloat32) invalid("convert", "round_to needs float16 or bfloat16");
  py::array_t<uint16_t> out(x.size());
  const float* src = x.data();
  uint16_t* dst = out.mutable_data();
  const bool f16c = simd && cpu_has_avx2_f16c_fma();
  for (py::ssize_t i = 0; i < x.size(); ++i)
    dst[i] = dt == DType::kBFloat16 ? f32_to_bf16(src[i]) : f32_to_f16(src[i]);
  if (f16c && dt == DType::kFloat16) f32_to_f16_row(src, dst, x.size());
  return out;
}

py::array_t<float> widen(const std::string& dtype, py::array_t<uint16_t, py::array::c_style> bits,
                         bool simd) {
  const DType dt = parse_dtype(OpKind::kGather, dtype);
  if (dt == DType::kFloat32) invalid("convert", "widen needs float16 or bfloat16");
  py::array_t<float> out(bits.size());
  const uint16_t* src = bits.data();
  float* dst = out.mutable_data();
  if (dt == DType::kBFloat16) {
    bf16_to_f32_row(src, dst, bits.size());
  } else if (simd && cpu_has_avx2_f16c_fma()) {
    f16_to_f32_row(src, dst, bits.size());
  } else {
    for (py::ssize_t i = 0; i < bits.size(); ++i) dst[i] = f16_to_f32(src[i]);
  }
  return out;
}

// common/capabilities.h as Python sees it: {device: {op: {"dtypes", "head_dims" (None: any),
// "variants", and for CUDA attention "kernels": {variant: {"dtypes", "head_dims"}}}}}.
py::dict capabilities() {
  auto dtypes = [](const auto& list) {
    py::list out;
    for (DType d : list) out.append(dtype_name((int32_t)d));
    return out;
  };
  auto ints = [](const auto& list) {
    py::list out;
    for (int32_t v : list) out.append(v);
    return out;
  };
  auto names = [](std::initializer_list<const char*> list) {
    py::list out;
    for (const char* v : list) out.append(v);
    return out;
  };
  auto entry = [](py::list dt, py::object head_dims, py::list variants) {
    py::dict e;
    e["dtypes"] = dt;
    e["head_dims"] = head_dims;
    e["variants"] = variants;
    return e;
  };
  const OpKind ops[] = {OpKind::kSdpaContiguous, OpKind::kGather, OpKind::kGatherSdpa,
                        OpKind::kPagedSdpa, OpKind::kAppend};
  py::dict cpu, cuda;
  for (OpKind op : ops) {
    const bool attn = is_attention(op);
    // CPU: any head_dim (the AVX2 kernels where it is a multiple of 8, else the portable ones).
    cpu[op_name(op)] = entry(dtypes(caps::kAllDTypes), py::none(),
                             attn ? names({"avx2+f16c+fma", "portable"}) : names({}));
    if (!attn) {  // gather, append: byte movers, any head_dim
      cuda[op_name(op)] = entry(dtypes(caps::kAllDTypes), py::none(), names({"16-byte", "strided"}));
      continue;
    }
    py::dict e = entry(dtypes(caps::kAllDTypes), ints(caps::kCudaAttentionHeadDims),
                       names({"simt", "mma", "async", "bulk"}));
    py::dict kernels;
    kernels["simt"] = entry(dtypes(caps::kAllDTypes), ints(caps::kCudaAttentionHeadDims),
                            names({"gt1", "gt4", "gt8", "16-byte", "strided"}));
    kernels["mma"] = entry(dtypes(caps::kTensorCoreDTypes), ints(caps::kCudaTensorCoreHeadDims),
                           names({"prefetch0", "prefetch128"}));
    kernels["async"] = entry(dtypes(caps::kTensorCoreDTypes), ints(caps::kCudaTensorCoreHeadDims),
                             names({"stages2", "stages3"}));
    kernels["bulk"] = entry(dtypes(caps::kTensorCoreDTypes), ints(caps::kCudaTensorCoreHeadDims),
                            names({"stages2", "stages3"}));
    e["kernels"] = kernels;
    cuda[op_name(op)] = e;
  }
  py::dict out;
  out["cpu"] = cpu;
  out["cuda"] = cuda;
  return out;
}

py::dict cpu_features() {
  py::dict f;
  py::list compiled;
  bool avx2 = false, f16c = false, fma = false;
#if KVMICRO_X86_SIMD
  compiled.append("avx2");
  compiled.append("f16c");
  compiled.append("fma");
#endif
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  avx2 = __builtin_cpu_supports("avx2");
  f16c = __builtin_cpu_supports("f16c");
  fma = __builtin_cpu_supports("fma");
#endif
#if defined(__x86_64__) || defined(_M_X64)
  f["arch"] = "x86_64";
#elif defined(__aarch64__) || defined(_M_ARM64)
  f["arch"] = "arm64";
#else
  f["arch"] = "other";
#endif
  f["compiled"] = compiled;  // kernels built in (per-function target attributes)
  f["avx2"] = avx2;          // what this CPU has, detected at run time
  f["f16c"] = f16c;
  f["fma"] = fma;
  f["simd"] = cpu::simd_available() ? "avx2+f16c+fma" : "portable";
  f["threads"] = (int)std::thread::hardware_concurrency();
  return f;
}

py::dict build_info() {
  py::dict b;
#if defined(__clang__)
  b["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  b["compiler"] = std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
  b["compiler"] = std::string("msvc ") + std::to_string(_MSC_VER);
#else
  b["compiler"] = "unknown";
#endif
#if defined(KVMICRO_WITH_CUDA)
  b["cuda"] = true;
#else
  b["cuda"] = false;
#endif
#if defined(KVMICRO_WITH_METAL)
  b["metal"] = true;
#else
  b["metal"] = false;
#endif
  // The CUDA kernels stamp their timeline (timeline.cuh): timings of this build are perturbed.
#if defined(KVMICRO_TIMELINE) && KVMICRO_TIMELINE
  b["timeline"] = true;
#else
  b["timeline"] = false;
#endif
  b["version"] = KVMICRO_VERSION;
  b["pybind11"] = std::to_string(PYBIND11_VERSION_MAJOR) + "." +
                  std::to_string(PYBIND11_VERSION_MINOR) + "." +
                  std::to_string(PYBIND11_VERSION_PATCH);
  return b;
}

}  // namespace
}  // namespace kvmicro

PYBIND11_MODULE(_native, m) {
  using namespace kvmicro;
  m.doc() = "kvmicro's native core: paged-KV ops on CPU (and CUDA / Metal where built)";

  // kvmicro.errors is plain Python with no imports of its own: safe to import while kvmicro is
  // still initialising. The references are kept for the life of the process.
  py::module_ errors = py::module_::import("kvmicro.errors");
  static PyObject* invalid_case = py::object(errors.attr("InvalidCase")).release().ptr();
  static PyObject* unsupported = py::object(errors.attr("Unsupported")).release().ptr();
  py::register_exception_translator([](std::exception_ptr e) {
    try {
      if (e) std::rethrow_exception(e);
    } catch (const InvalidArgument& err) {
      PyErr_SetString(invalid_case, err.what());
    } catch (const UnsupportedError& err) {
      PyErr_SetString(unsupported, err.what());
    } catch (const DeviceError& err) {
      PyErr_SetString(PyExc_RuntimeError, err.what());
    }
  });

  py::class_<NativeOp>(m, "PreparedOp",
                       "One op prepared on a device: inputs uploaded (`copies` sets), validated, "
                       "kernel chosen. run() only dispatches.")
      .def("run", [](NativeOp& o) { o.op->run(); }, py::call_guard<py::gil_scoped_release>(),
           "Dispatch the op once on the current copy (on CPU it has completed on return).")
      .def("sync", [](NativeOp& o) { o.op->sync(); }, py::call_guard<py::gil_scoped_release>(),
           "Wait until every dispatched op has completed.")
      .def("select", [](NativeOp& o, int copy) { o.op->select(copy); }, py::arg("copy"),
           "Make input set `copy` current (0 <= copy < copies).")
      .def_property_readonly("copies", [](const NativeOp& o) { return o.op->copies(); })
      .def("output", &NativeOp::output,
           "Results of the current copy: attention (out,), gather (k_dense, v_dense), append "
           "(k_pool, v_pool); uint16 bit patterns for 16-bit dtypes, float32 otherwise.")
      .def("device_times",
           [](NativeOp& o, int reps, int64_t flush_bytes) {
             return o.op->device_times_us(reps, flush_bytes);
           },
           py::arg("reps"), py::arg("flush_bytes") = 0, py::call_guard<py::gil_scoped_release>(),
           "`reps` samples (µs) of one op each between device-side timestamps, flushing "
           "`flush_bytes` of cache before each, outside the timed window.")
      .def("graph_times",
           [](NativeOp& o, int reps, int k, bool rotate) {
             return o.op->graph_times_us(reps, k, rotate);
           },
           py::arg("reps"), py::arg("k"), py::arg("rotate") = true,
           py::call_guard<py::gil_scoped_release>(),
           "`reps` samples (µs per op) of `k` ops captured once and replayed, cycling through "
           "the copies when `rotate`, else all on the current copy (CUDA only).")
      .def("flush", [](NativeOp& o, int64_t nbytes) { o.op->flush(nbytes); }, py::arg("nbytes"),
           py::call_guard<py::gil_scoped_release>(),
           "Write `nbytes` of device scratch so that the next op starts with a cold cache.")
      .def("poison_outputs", [](NativeOp& o) { o.op->poison_outputs(); },
           py::call_guard<py::gil_scoped_release>(),
           "Overwrite the current copy's outputs with NaN bits (CUDA only), so a check after "
           "the next run proves that run wrote them.")
      .def_property_readonly("kernel", [](const NativeOp& o) { return o.op->describe(); },
                             "The kernel chosen at prepare, and why.")
      .def_property_readonly("device", [](const NativeOp& o) { return o.device; })
      .def_property_readonly("op", [](const NativeOp& o) { return std::string(op_name(o.kind)); });

  m.def("prepare", &prepare, py::arg("device"), py::arg("op"), py::arg("layout"), py::arg("dtype"),
        py::arg("block_size"), py::arg("scale"), py::arg("q"), py::arg("k_pool"),
        py::arg("v_pool"), py::arg("block_table"), py::arg("ctx"), py::arg("k_dense"),
        py::arg("v_dense"), py::arg("k_new"), py::arg("v_new"), py::kw_only(),
        py::arg("copies") = 1, py::arg("threads") = 0, py::arg("index") = 0,
        py::arg("priority") = 0, py::arg("options") = std::map<std::string, std::string>{},
        "Validate the arrays (16-bit dtypes as uint16 bit patterns, float32 as float32, table and "
        "ctx int32; None where the op does not read an array) and prepare `op` on `device`. "
        "`options`: the kernel variant knobs as text (cuda: kernel, splits, min_chunk, "
        "blocks_per_sm, stages, l2_prefetch, pdl, pdl_entry, spread, combine, schedule; cpu: "
        "simd), validated here.");
  m.def("pool_strides", &pool_strides, py::arg("layout"), py::arg("N"), py::arg("S"),
        py::arg("H"), py::arg("D"),
        "Element strides of the logical axes N, S, H, D in a pool of this layout (layout.h).");
  m.def("round_to", &round_to, py::arg("dtype"), py::arg("x"), py::arg("simd") = false,
        "Test hook: float32 values -> float16/bfloat16 bit patterns (round to nearest even).");
  m.def("widen", &widen, py::arg("dtype"), py::arg("bits"), py::arg("simd") = false,
        "Test hook: float16/bfloat16 bit patterns -> float32 (exact).");
  m.def("capabilities", &capabilities,
        "The native kernels' support matrix (common/capabilities.h): {device: {op: {dtypes, "
        "head_dims (None: any), variants[, kernels]}}}; the native backends' supports() read it.");
  m.def("cpu_features", &cpu_features, "CPU vector features: compiled in and detected here.");
  m.def("build_info", &build_info, "How this extension was built.");

#if defined(KVMICRO_WITH_CUDA)
  kvmicro::register_cuda(m);
#endif
#if defined(KVMICRO_WITH_METAL)
  kvmicro::register_metal(m);
#endif
}
