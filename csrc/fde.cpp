// Bindings for src/cpu/fde.cpp (filled in with the CPU kernels).
#include "common.h"

namespace embkern {
void register_fde(py::module_& m) { (void)m; }
}  // namespace embkern
