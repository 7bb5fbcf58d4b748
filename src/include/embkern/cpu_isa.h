// Runtime choice of the CPU kernels' instruction-set level.
//
// Each kernel source in src/cpu/<op>.cpp is compiled once per level, into a
// namespace of that name (embkern::<op>::generic, ::avx2, ::avx512; or
// ::native for an EMBKERN_ARCH=native build), with the level's flags set per
// object library in CMakeLists.txt:
//   generic  baseline x86-64 (SSE2), or plain C++ on other architectures
//   avx2     x86-64-v3: AVX2, FMA, BMI1/2, F16C, LZCNT, MOVBE
//   avx512   x86-64-v4: v3 + AVX-512F/BW/CD/DQ/VL
// src/cpu/dispatch/<op>.cpp defines the public embkern::<op> functions, each
// a switch on active_isa(). Every level computes the same bits for the exact
// ops (FDE, the hypercomplex products, the GEMM's FMA chain and so ranks and
// top-k indices): all sources are built with -ffp-contract=off, and a fused
// multiply-add is written out (std::fma or an intrinsic) where one is meant.
#pragma once
#include <string>

namespace embkern {
namespace cpu {

enum class Isa : int { Generic = 0, Avx2 = 1, Avx512 = 2, Native = 3 };
constexpr int kIsaLevels = 4;

const char* isa_name(Isa isa);
// Built into this module.
bool isa_compiled(Isa isa);
// This CPU and OS can run it (cpuid + xgetbv through __builtin_cpu_supports).
bool isa_supported(Isa isa);
// The highest level that is both compiled and supported.
Isa best_isa();
// The level the kernels run at: best_isa(), or the one the environment
// variable EMBKERN_CPU_ISA (generic|avx2|avx512|auto) asks for, read once.
// Throws std::invalid_argument, naming the variable, when it asks for an
// unknown level or one this CPU lacks: the first kernel call reports it.
Isa active_isa();
// "" or the message active_isa() would throw.
std::string isa_error();
// What EMBKERN_CPU_ISA held when it was read ("" when unset).
std::string isa_request();
// Switch levels at run time (tests compare levels in one process). Throws
// std::invalid_argument for a level that is not compiled or not supported.
// Not thread-safe against kernels running at the same time.
void set_isa(Isa isa);
bool parse_isa(const std::string& name, Isa* out);

}  // namespace cpu
}  // namespace embkern

// Wrap a kernel source's definitions (and its header's declarations, when
// that header is included by a per-level object) in the level's namespace.
#ifdef EMBKERN_ISA_NS
#define EMBKERN_ISA_BEGIN namespace EMBKERN_ISA_NS {
#define EMBKERN_ISA_END }
#else
#define EMBKERN_ISA_BEGIN
#define EMBKERN_ISA_END
#endif

// Dispatch helper for src/cpu/dispatch/<op>.cpp: `EMBKERN_DISPATCH(fn<T>, a, b)`
// returns level::fn<T>(a, b) for the active level (namespaces relative to the
// op's namespace). Levels that are not built are compiled out.
// The level every build has (for calls that must not throw, e.g. a release
// in a destructor, and do not depend on the level).
#if defined(EMBKERN_HAVE_NATIVE)
#define EMBKERN_ISA_BASE native
#else
#define EMBKERN_ISA_BASE generic
#endif
#if defined(EMBKERN_HAVE_NATIVE)
#define EMBKERN_DISPATCH(FN, ...)                     \
  do {                                                \
    (void)::embkern::cpu::active_isa();               \
    return native::FN(__VA_ARGS__);                   \
  } while (0)
#else
#if defined(EMBKERN_HAVE_AVX512)
#define EMBKERN_CASE_AVX512(FN, ...) \
  case ::embkern::cpu::Isa::Avx512:  \
    return avx512::FN(__VA_ARGS__);
#else
#define EMBKERN_CASE_AVX512(FN, ...)
#endif
#if defined(EMBKERN_HAVE_AVX2)
#define EMBKERN_CASE_AVX2(FN, ...) \
  case ::embkern::cpu::Isa::Avx2:  \
    return avx2::FN(__VA_ARGS__);
#else
#define EMBKERN_CASE_AVX2(FN, ...)
#endif
#define EMBKERN_DISPATCH(FN, ...)                      \
  do {                                                 \
    switch (::embkern::cpu::active_isa()) {            \
      EMBKERN_CASE_AVX512(FN, __VA_ARGS__)             \
      EMBKERN_CASE_AVX2(FN, __VA_ARGS__)               \
      default:                                         \
        return generic::FN(__VA_ARGS__);               \
    }                                                  \
  } while (0)
#endif
