// Converts only: the work is in metal_device.mm (metal_host.h). Mirrors cuda/cuda_bindings.cpp.
#include "metal/metal_bindings.h"

#include <pybind11/stl.h>

#include "common/validate.h"
#include "metal/metal_host.h"

namespace py = pybind11;

namespace kvmicro {

std::unique_ptr<PreparedOp> make_metal_op_from(const OpInputs& in, const DeviceOptions& opt,
                                               const std::map<std::string, std::string>& options) {
  return metal::make_metal_op(in, opt, metal::parse_submit_options(op_name(in.op), options));
}

void register_metal(py::module_& m) {
  m.def("metal_device_count", &metal::device_count,
        "Metal devices visible here (0 without Metal; never raises).");

  m.def(
      "metal_device_info",
      [](int index) {
        metal::MetalDeviceInfo info;
        {
          py::gil_scoped_release release;
          info = metal::device_info(index);
        }
        py::dict d;
        d["name"] = info.name;
        d["index"] = info.index;
        d["registry_id"] = info.registry_id;
        d["unified_memory"] = info.unified_memory;
        d["working_set_bytes"] = info.working_set_bytes;
        d["max_buffer_bytes"] = info.max_buffer_bytes;
        d["threadgroup_memory_bytes"] = info.threadgroup_memory_bytes;
        d["apple7"] = info.apple7;
        d["apple8"] = info.apple8;
        d["apple9"] = info.apple9;
        d["metal3"] = info.metal3;
        d["bfloat"] = info.bfloat;
        d["os_version"] = info.os_version;
        d["library"] = info.library;
        return d;
      },
      py::arg("index") = 0, "Properties of Metal device `index` (raises for a bad index).");

  m.def(
      "metal_bandwidth",
      [](int index) {
        metal::Bandwidth bw;
        {
          py::gil_scoped_release release;
          bw = metal::measure_bandwidth(index);
        }
        py::dict d;
        d["read_gbps"] = bw.read_gbps;
        d["copy_gbps"] = bw.copy_gbps;
        d["bytes"] = bw.bytes;
        d["reps"] = bw.reps;
        d["method"] =
            "Metal GPUEndTime - GPUStartTime; read: 16-byte xor-reduction kernel; copy: blit "
            "copyFromBuffer between private buffers, bytes read + written; decimal GB/s; best of "
            "reps";
        return d;
      },
      py::arg("index") = 0,
      "Measured memory ceilings of Metal device `index` in decimal GB/s (cached per device).");

  m.def(
      "metal_submit_options",
      [](const std::map<std::string, std::string>& options) {
        const metal::SubmitOptions s = metal::parse_submit_options("metal", options);
        py::dict d;
        d["storage"] = s.private_storage ? "private" : "shared";
        d["queue"] = s.shared_queue ? "shared" : "per_stream";
        d["per_buffer"] = s.per_buffer;
        d["in_flight"] = s.in_flight;
        return d;
      },
      py::arg("options"), "Parse native:metal submission options as prepare() does.");
}

}  // namespace kvmicro
