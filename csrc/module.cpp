// embkern._C: the torch-free CPU extension. Each op's bindings live in
// csrc/<op>.cpp and register themselves into a submodule named after the op.
#include <omp.h>

#include "common.h"
#include <algorithm>
#include <stdexcept>

#include "embkern/cpu_isa.h"

#ifndef EMBKERN_VERSION
#define EMBKERN_VERSION "dev"
#endif

namespace embkern {
#ifdef EMBKERN_OMP_FORWARD
void load_openmp_runtime();  // csrc/omp_runtime.cpp
std::string openmp_runtime_path();
#else
inline void load_openmp_runtime() {}
inline std::string openmp_runtime_path() { return "linked at build time"; }
#endif
void register_selective_attention(pybind11::module_& m);  // csrc/selective_attention.cpp
void register_bit_cipher(pybind11::module_& m);            // csrc/bit_cipher.cpp
void register_rel_conv_attention(pybind11::module_& m);   // csrc/rel_conv_attention.cpp
}  // namespace embkern

namespace {
namespace cpu = embkern::cpu;

// The CPU kernels' instruction-set levels: which are built, which this CPU
// runs, which one is active and why (EMBKERN_CPU_ISA).
pybind11::dict isa_info() {
  pybind11::dict d;
  pybind11::list built, runnable;
  for (int i = 0; i < cpu::kIsaLevels; ++i) {
    const auto l = static_cast<cpu::Isa>(i);
    if (!cpu::isa_compiled(l)) continue;
    built.append(cpu::isa_name(l));
    if (cpu::isa_supported(l)) runnable.append(cpu::isa_name(l));
  }
  d["compiled"] = built;
  d["available"] = runnable;
  d["best"] = cpu::isa_name(cpu::best_isa());
  d["env_var"] = "EMBKERN_CPU_ISA";
  d["requested"] = cpu::isa_request();
  const std::string err = cpu::isa_error();
  d["error"] = err;
  d["active"] = err.empty() ? pybind11::object(pybind11::str(cpu::isa_name(cpu::active_isa()))) : pybind11::none();
  return d;
}

void set_isa(const std::string& name) {
  cpu::Isa l;
  if (!cpu::parse_isa(name, &l))
    embkern::value_error("isa: expected one of generic, avx2, avx512, native; got '" + name + "'");
  cpu::set_isa(l);  // std::invalid_argument -> ValueError
}

pybind11::dict build_info() {
  pybind11::dict d;
  d["version"] = EMBKERN_VERSION;
  d["compiler"] = __VERSION__;
  d["openmp"] = _OPENMP;
  d["omp_max_threads"] = omp_get_max_threads();
  d["openmp_runtime"] = embkern::openmp_runtime_path();
  d["isa"] = isa_info();
  return d;
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  // Before anything can enter an OpenMP region.
  embkern::load_openmp_runtime();
  m.doc() = "embkern CPU kernels (torch-free)";
  m.def("build_info", &build_info, "Compiler, OpenMP and instruction-set facts of this build");
  m.def("isa_info", &isa_info, "CPU kernel ISA levels: compiled, available on this CPU, active, EMBKERN_CPU_ISA");
  m.def("set_isa", &set_isa, pybind11::arg("level"),
        "Run the CPU kernels at another ISA level (generic|avx2|avx512) from now on; for tests and benchmarks. "
        "Not safe while kernels run in other threads.");
  m.def("get_num_threads", []() { return omp_get_max_threads(); });
  m.def(
      "set_num_threads",
      [](int64_t n) {
        // Oversubscription is allowed for experiments, but not without bound:
        // libgomp would try to start that many threads at the next region.
        const int64_t hw = std::max<int64_t>(1, omp_get_num_procs());
        const int64_t cap = std::min<int64_t>(1024, 8 * hw);
        if (n < 1 || n > cap)
          embkern::value_error("num_threads: expected 1 <= num_threads <= " + std::to_string(cap) + " (8 x the " +
                               std::to_string(hw) + " processors OpenMP sees, at most 1024), got " +
                               std::to_string(n));
        omp_set_num_threads(static_cast<int>(n));
      },
      pybind11::arg("num_threads"), "Threads of the CPU kernels' OpenMP regions (1 .. 8 x processors, <= 1024)");
  auto hc = m.def_submodule("hypercomplex", "quaternion / dihedron products and KG scoring");
  embkern::register_hypercomplex(hc);
  auto fde = m.def_submodule("fde", "MUVERA fixed dimensional encodings and Chamfer similarity");
  embkern::register_fde(fde);
  auto ssa = m.def_submodule("selective_attention", "selective attention (per-query and per-value temperatures)");
  embkern::register_selective_attention(ssa);
  auto bc = m.def_submodule("bit_cipher", "bit-cipher co-occurrence counting");
  embkern::register_bit_cipher(bc);
  auto rca = m.def_submodule("rel_conv_attention", "Transformer-XL relative attention and the causal depthwise convolution");
  embkern::register_rel_conv_attention(rca);
}
