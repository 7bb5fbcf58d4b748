#include "embkern/build_info.h"

namespace embkern {
const char* compiled_isa() {
  return ""
#ifdef __AVX2__
         "avx2 "
#endif
#ifdef __FMA__
         "fma "
#endif
#ifdef __AVX512F__
         "avx512f "
#endif
#ifdef __ARM_NEON
         "neon "
#endif
      ;
}
}  // namespace embkern
