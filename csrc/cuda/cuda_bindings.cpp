// Converts only: the work is in cuda_device.cu, cuda_bandwidth.cu and the attention pickers
// (cuda_host.h).
#include "cuda/cuda_bindings.h"

#include "common/validate.h"
#include "cuda/cuda_host.h"

namespace py = pybind11;

namespace kvmicro {

void register_cuda(py::module_& m) {
  m.def("cuda_device_count", &cuda::device_count,
        "CUDA devices visible here (0 without a driver or GPU; never raises).");

  m.def(
      "cuda_device_info",
      [](int index) {
        const cuda::CudaDeviceInfo info = cuda::device_info(index);
        py::dict d;
        d["name"] = info.name;
        d["index"] = info.index;
        d["sm_count"] = info.sm_count;
        d["l2_bytes"] = info.l2_bytes;
        d["memory_bytes"] = info.memory_bytes;
        d["clock_khz"] = info.clock_khz;
        d["mem_clock_khz"] = info.mem_clock_khz;
        d["bus_width"] = info.bus_width;
        d["cc_major"] = info.cc_major;
        d["cc_minor"] = info.cc_minor;
        d["driver_version"] = info.driver_version;
        d["runtime_version"] = info.runtime_version;
        d["priority_least"] = info.priority_least;
        d["priority_greatest"] = info.priority_greatest;
        d["max_shared_per_block_optin"] = info.max_shared_per_block_optin;
        d["pci_bus_id"] = info.pci_bus_id;
        return d;
      },
      py::arg("index") = 0, "Properties of CUDA device `index` (raises for a bad index).");

  m.def(
      "cuda_instantiations",
      [] {
        py::dict out;
        const std::pair<const char*, std::vector<cuda::AttnInstance> (*)()> ops[] = {
            {"paged_sdpa", &cuda::paged_sdpa_instantiations},
            {"sdpa_contiguous", &cuda::sdpa_contiguous_instantiations}};
        for (const auto& op : ops) {
          py::list items;
          for (const cuda::AttnInstance& i : op.second())
            items.append(py::make_tuple(i.kernel, dtype_name(i.dtype), i.head_dim, i.variant));
          out[op.first] = items;
        }
        return out;
      },
      "The attention kernels instantiated, probed through the planners' pickers (no device "
      "needed): {op: [(kernel, dtype, head_dim, variant), ...]}.");

  m.def(
      "cuda_bandwidth",
      [](int index) {
        cuda::Bandwidth bw;
        {
          py::gil_scoped_release release;
          bw = cuda::measure_bandwidth(index);
        }
        py::dict d;
        d["read_gbps"] = bw.read_gbps;
        d["copy_gbps"] = bw.copy_gbps;
        d["memcpy_gbps"] = bw.memcpy_gbps;
        d["copy_kernel_gbps"] = bw.copy_kernel_gbps;
        d["bytes"] = bw.bytes;
        d["reps"] = bw.reps;
        d["method"] =
            "CUDA events; read: 16-byte xor-reduction kernel; copy: max of cudaMemcpyAsync D2D "
            "and a 16-byte copy kernel, bytes read + written; decimal GB/s; best of reps";
        return d;
      },
      py::arg("index") = 0,
      "Measured memory ceilings of CUDA device `index` in decimal GB/s (cached per device).");

  m.def(
      "cuda_read_floor",
      [](int index, int64_t bytes, int copies, int k, int reps) {
        std::vector<double> samples;
        {
          py::gil_scoped_release release;
          samples = cuda::read_floor_us(index, bytes, copies, k, reps);
        }
        // A list built here: this file does without pybind11/stl.h's casters.
        py::list out;
        for (double us : samples) out.append(us);
        return out;
      },
      py::arg("index"), py::arg("bytes"), py::arg("copies"), py::arg("k"), py::arg("reps"),
      "µs per op of `reps` replays of a CUDA graph of k streaming-read kernels over `bytes` "
      "each (op i reads copy i % copies): what one kernel that reads those bytes costs in the "
      "graph timer's arithmetic, hot (copies=1) or cold (copies totalling several L2s).");

  m.def(
      "cuda_timeline_reset",
      [](int index) {
        py::gil_scoped_release release;
        cuda::timeline_reset(index);
      },
      py::arg("index") = 0,
      "Zero the timeline probe's table (builds with -DKVMICRO_TIMELINE=ON; else Unsupported).");

  m.def(
      "cuda_timeline",
      [](int index) {
        std::vector<uint64_t> table;
        {
          py::gil_scoped_release release;
          table = cuda::timeline_read(index);
        }
        // Rows that were stamped: (slot, then timeline.cuh's fields).
        auto rows = [&](int kernel) {
          py::list out;
          for (int slot = 0; slot < cuda::kTimelineSlotsHost; ++slot) {
            const uint64_t* f =
                table.data() + ((size_t)kernel * cuda::kTimelineSlotsHost + slot) *
                                   cuda::kTimelineFieldsHost;
            if (f[0] == 0) continue;
            py::tuple row(1 + cuda::kTimelineFieldsHost);
            row[0] = slot;
            for (int i = 0; i < cuda::kTimelineFieldsHost; ++i) row[1 + i] = f[i];
            out.append(row);
          }
          return out;
        };
        py::dict d;
        d["fields"] = py::make_tuple("slot", "entry", "sliced", "first", "loop_end", "exit", "sm",
                                     "entry_cycles", "sliced_cycles", "first_cycles",
                                     "loop_end_cycles", "exit_cycles");
        d["slots"] = cuda::kTimelineSlotsHost;
        d["split"] = rows(0);
        d["combine"] = rows(1);
        d["clock"] = "%globaltimer (ns) and %clock64 (SM cycles)";
        return d;
      },
      py::arg("index") = 0,
      "The timeline probe's table after the last run (timeline.cuh): per kernel the stamped "
      "blocks' rows; combine rows carry `released` in the `sliced` field.");
}

}  // namespace kvmicro
