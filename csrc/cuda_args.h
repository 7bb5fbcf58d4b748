// The device-buffer argument of every csrc/<op>_cuda.cpp binding. Python hands
// each device buffer over as an ArrayView of a torch CUDA tensor (address,
// element count, dtype name); the binding turns it into a typed pointer with
// checked_ptr, which checks the dtype and the count the problem sizes imply.
// The class is bound once, as _C_cuda.ArrayView, and each op's submodule
// exposes the same class (pybind11 refuses a second registration of a type).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

#include "common.h"

namespace embkern {
namespace cuda_args {

// One buffer as Python hands it over: address (device memory), element count
// and dtype name ("float32", "int64", ...).
struct ArrayView {
  uintptr_t ptr = 0;
  int64_t numel = 0;
  std::string dtype;
};

// The view's address as T*, after checking its dtype and element count
// (`what` says where the count comes from). A missing view is an error.
template <typename T>
T* checked_ptr(const std::optional<ArrayView>& v, const char* name, int64_t want, const std::string& what) {
  if (!v) value_error(std::string(name) + ": required, got None");
  if (v->dtype != dtype_name<std::remove_const_t<T>>())
    type_error(std::string(name) + ": expected dtype " + dtype_name<std::remove_const_t<T>>() + ", got " +
               (v->dtype.empty() ? std::string("''") : v->dtype));
  if (v->numel != want)
    value_error(std::string(name) + ": expected " + std::to_string(want) + " elements (" + what + "), got " +
                std::to_string(v->numel));
  if (v->numel > 0 && v->ptr == 0) value_error(std::string(name) + ": null data pointer for a non-empty buffer");
  return reinterpret_cast<T*>(v->ptr);
}

inline void bind_array_view(py::module_& m) {
  py::class_<ArrayView>(m, "ArrayView", "One device buffer: data pointer (int), element count, dtype name")
      .def(py::init([](uintptr_t ptr, int64_t numel, std::string dtype) {
             if (numel < 0) value_error("numel: expected >= 0, got " + std::to_string(numel));
             return ArrayView{ptr, numel, std::move(dtype)};
           }),
           py::arg("ptr"), py::arg("numel"), py::arg("dtype"))
      .def_readonly("ptr", &ArrayView::ptr)
      .def_readonly("numel", &ArrayView::numel)
      .def_readonly("dtype", &ArrayView::dtype)
      .def("__repr__", [](const ArrayView& v) {
        return "ArrayView(ptr=" + std::to_string(v.ptr) + ", numel=" + std::to_string(v.numel) + ", dtype='" +
               v.dtype + "')";
      });
}

}  // namespace cuda_args
}  // namespace embkern
