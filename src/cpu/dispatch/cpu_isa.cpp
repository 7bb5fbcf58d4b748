// Which instruction-set level the CPU kernels run at (see embkern/cpu_isa.h).
#include "embkern/cpu_isa.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

namespace embkern {
namespace cpu {
namespace {

struct Choice {
  Isa isa = Isa::Generic;
  std::string request;  // EMBKERN_CPU_ISA as read
  std::string error;
};

std::string available_list() {
  std::string s;
  for (int i = 0; i < kIsaLevels; ++i) {
    const Isa l = static_cast<Isa>(i);
    if (isa_compiled(l) && isa_supported(l)) s += (s.empty() ? "" : ", ") + std::string(isa_name(l));
  }
  return s;
}

Choice resolve() {
  Choice c;
  c.isa = best_isa();
  const char* env = std::getenv("EMBKERN_CPU_ISA");
  if (!env || !*env) return c;
  c.request = env;
  Isa want;
  if (c.request == "auto") return c;
  if (!parse_isa(c.request, &want)) {
    c.error = "EMBKERN_CPU_ISA: expected one of generic, avx2, avx512, auto; got '" + c.request + "'";
  } else if (!isa_compiled(want)) {
    c.error = "EMBKERN_CPU_ISA=" + c.request + ": this build of embkern._C has no " + c.request +
              " kernels (levels built and supported here: " + available_list() + ")";
  } else if (!isa_supported(want)) {
    c.error = "EMBKERN_CPU_ISA=" + c.request + ": this CPU lacks " +
              (want == Isa::Avx512 ? "AVX-512F/BW/CD/DQ/VL" : "AVX2/FMA/BMI2 (x86-64-v3)") +
              " (levels it can run: " + available_list() + "); unset it or ask for a lower level";
  } else {
    c.isa = want;
  }
  return c;
}

Choice& choice() {
  static Choice c = resolve();
  return c;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Generic: return "generic";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512: return "avx512";
    case Isa::Native: return "native";
  }
  return "?";
}

bool parse_isa(const std::string& name, Isa* out) {
  for (int i = 0; i < kIsaLevels; ++i)
    if (name == isa_name(static_cast<Isa>(i))) {
      *out = static_cast<Isa>(i);
      return true;
    }
  return false;
}

bool isa_compiled(Isa isa) {
#if defined(EMBKERN_HAVE_NATIVE)
  return isa == Isa::Native;
#else
  switch (isa) {
    case Isa::Generic: return true;
#if defined(EMBKERN_HAVE_AVX2)
    case Isa::Avx2: return true;
#endif
#if defined(EMBKERN_HAVE_AVX512)
    case Isa::Avx512: return true;
#endif
    default: return false;
  }
#endif
}

bool isa_supported(Isa isa) {
  switch (isa) {
    case Isa::Generic: return true;
    case Isa::Native: return true;  // built for this machine's -march=native
#if defined(__x86_64__) || defined(__i386__)
    case Isa::Avx2: __builtin_cpu_init(); return __builtin_cpu_supports("x86-64-v3");
    case Isa::Avx512: __builtin_cpu_init(); return __builtin_cpu_supports("x86-64-v4");
#endif
    default: return false;
  }
}

Isa best_isa() {
  for (int i = kIsaLevels - 1; i >= 0; --i) {
    const Isa l = static_cast<Isa>(i);
    if (isa_compiled(l) && isa_supported(l)) return l;
  }
  return Isa::Generic;
}

Isa active_isa() {
  const Choice& c = choice();
  if (!c.error.empty()) throw std::invalid_argument(c.error);
  return c.isa;
}

std::string isa_error() { return choice().error; }
std::string isa_request() { return choice().request; }

void set_isa(Isa isa) {
  if (!isa_compiled(isa))
    throw std::invalid_argument(std::string("isa: this build has no ") + isa_name(isa) +
                                " kernels (built and supported here: " + available_list() + ")");
  if (!isa_supported(isa))
    throw std::invalid_argument(std::string("isa: this CPU cannot run ") + isa_name(isa) +
                                " (it can run: " + available_list() + ")");
  Choice& c = choice();
  c.isa = isa;
  c.error.clear();
}

}  // namespace cpu
}  // namespace embkern
