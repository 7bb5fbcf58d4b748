// embkern._C: the torch-free CPU extension. Each op's bindings live in
// csrc/<op>.cpp and register themselves into a submodule named after the op.
#include <omp.h>

#include "common.h"
#include "embkern/build_info.h"

#ifndef EMBKERN_VERSION
#define EMBKERN_VERSION "dev"
#endif

namespace {
pybind11::dict build_info() {
  pybind11::dict d;
  d["version"] = EMBKERN_VERSION;
  d["compiler"] = __VERSION__;
  d["openmp"] = _OPENMP;
  d["omp_max_threads"] = omp_get_max_threads();
  d["compiled_isa"] = embkern::compiled_isa();
  return d;
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "embkern CPU kernels (torch-free)";
  m.def("build_info", &build_info, "Compiler, OpenMP and instruction-set facts of this build");
  m.def("get_num_threads", []() { return omp_get_max_threads(); });
  m.def("set_num_threads", [](int n) {
    if (n < 1) embkern::value_error("num_threads: expected >= 1, got " + std::to_string(n));
    omp_set_num_threads(n);
  });
  auto hc = m.def_submodule("hypercomplex", "quaternion / dihedron products and KG scoring");
  embkern::register_hypercomplex(hc);
  auto fde = m.def_submodule("fde", "MUVERA fixed dimensional encodings and Chamfer similarity");
  embkern::register_fde(fde);
}
