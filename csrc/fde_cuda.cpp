// Bindings for src/cuda/fde.cu (filled in with the CUDA kernels).
#include <pybind11/pybind11.h>

namespace embkern {
void register_fde_cuda(pybind11::module_& m) { (void)m; }
}  // namespace embkern
