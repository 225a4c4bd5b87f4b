// fastlayers._C: build information and run-time switches. This file includes no torch
// headers (it compiles in seconds); loading the module also runs the static
// initializers of the op files, which register the fastlayers:: operators with torch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "common/cpu_isa.h"
#include "common/fma_peak.h"

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
  info["version"] = FASTLAYERS_VERSION;
  info["torch_version"] = FASTLAYERS_TORCH_VERSION;
  info["compiler"] = FASTLAYERS_COMPILER;
  info["cpu_isas_compiled"] = std::string(FASTLAYERS_CPU_ISAS);
#if defined(FASTLAYERS_WITH_CUDA)
  info["cuda"] = true;
  info["cuda_version"] = FASTLAYERS_CUDA_VERSION;
  info["cuda_archs"] = FASTLAYERS_CUDA_ARCHS;
#else
  info["cuda"] = false;
  info["cuda_version"] = py::none();
  info["cuda_archs"] = py::none();
#endif
  return info;
}

std::vector<std::string> available_isas() {
  std::vector<std::string> names;
  for (auto isa : fastlayers::available_cpu_isas()) names.emplace_back(fastlayers::cpu_isa_name(isa));
  return names;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastlayers native extension";
  m.def("build_info", &build_info, "How this extension was built.");
  m.def("available_cpu_isas", &available_isas,
        "CPU ISAs compiled into this build that the running CPU supports, narrowest first.");
  m.def("cpu_isa", [] { return std::string(fastlayers::cpu_isa_name(fastlayers::active_cpu_isa())); },
        "The CPU ISA the kernels dispatch to now.");
  m.def("set_cpu_isa", &fastlayers::set_cpu_isa, py::arg("name"),
        "Dispatch the CPU kernels to `name` (base, avx2, avx512); for tests and benchmarks.");
  m.def("measure_fma_peak_gflops", &fastlayers::measure_fma_peak_gflops, py::arg("threads"),
        py::arg("seconds") = 0.5, py::call_guard<py::gil_scoped_release>(),
        "fp32 FMA throughput of this machine, in GFLOP/s, with `threads` threads.");
}
