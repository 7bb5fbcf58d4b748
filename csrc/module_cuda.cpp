// embkern._C_cuda: the torch-free CUDA extension. Importing it never needs a
// GPU: cudart is linked statically and loads the driver on first use.
#include <pybind11/pybind11.h>

#include "cuda_args.h"
#include "embkern/cuda_device.h"

namespace py = pybind11;

namespace embkern {
// One hook per op with a CUDA path, defined in csrc/<op>_cuda.cpp.
void register_fde_cuda(py::module_& m);
void register_bit_cipher_cuda(py::module_& m);
}  // namespace embkern

#ifndef EMBKERN_VERSION
#define EMBKERN_VERSION "dev"
#endif

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "embkern CUDA kernels (torch-free)";
  m.attr("__version__") = EMBKERN_VERSION;
  m.def("runtime_version", &embkern::cuda::runtime_version,
        "CUDA runtime version the module was built with (e.g. 13000)");
  m.def(
      "device_count",
      []() {
        std::string err;
        int n = embkern::cuda::device_count(&err);
        return py::make_tuple(n, err);
      },
      "(count, error): visible CUDA devices, and the runtime's reason when there are none");
  m.def(
      "device_info",
      [](int index) {
        embkern::cuda::DeviceInfo info;
        std::string err;
        if (!embkern::cuda::device_info(index, &info, &err)) {
          throw py::value_error("index: no CUDA device " + std::to_string(index) + " (" + err + ")");
        }
        py::dict d;
        d["index"] = info.index;
        d["name"] = info.name;
        d["capability"] = py::make_tuple(info.major, info.minor);
        d["multiprocessors"] = info.multiprocessors;
        d["total_memory"] = info.total_memory;
        return d;
      },
      "Name, compute capability, SM count and memory of one device");
  embkern::cuda_args::bind_array_view(m);
  auto fde = m.def_submodule("fde", "MUVERA fixed dimensional encodings on the GPU");
  fde.attr("ArrayView") = m.attr("ArrayView");
  embkern::register_fde_cuda(fde);
  auto bc = m.def_submodule("bit_cipher", "bit-cipher co-occurrence counting on the GPU");
  bc.attr("ArrayView") = m.attr("ArrayView");
  embkern::register_bit_cipher_cuda(bc);
}
