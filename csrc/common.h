// Shared helpers for the pybind11 boundary: take buffers through the buffer
// protocol (numpy arrays, or torch CPU tensors via .numpy()), check them, and
// raise Python ValueError / TypeError naming the argument. No math here.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

namespace embkern {
namespace py = pybind11;

[[noreturn]] inline void value_error(const std::string& msg) { throw py::value_error(msg); }
[[noreturn]] inline void type_error(const std::string& msg) { throw py::type_error(msg); }

inline std::string shape_str(const py::buffer_info& info) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < info.shape.size(); ++i) s << (i ? ", " : "") << info.shape[i];
  if (info.shape.size() == 1) s << ",";
  s << ")";
  return s.str();
}

// A checked view of a C-contiguous buffer of element type T.
template <typename T>
struct View {
  T* data = nullptr;
  std::vector<int64_t> shape;
  int64_t size(int i) const { return shape[static_cast<size_t>(i)]; }
};

template <typename T>
const char* dtype_name() {
  if (std::is_same<T, float>::value) return "float32";
  if (std::is_same<T, double>::value) return "float64";
  if (std::is_same<T, int64_t>::value) return "int64";
  if (std::is_same<T, int32_t>::value) return "int32";
  if (std::is_same<T, uint64_t>::value) return "uint64";
  if (std::is_same<T, uint8_t>::value) return "uint8";
  return "?";
}

// `ndim` < 0 accepts any rank. Non-contiguous buffers are rejected here: the
// Python layer makes inputs contiguous (a documented copy) before calling.
template <typename T>
View<T> view(py::buffer buf, const char* name, int ndim, bool writable = false) {
  py::buffer_info info = buf.request(writable);
  if (info.format != py::format_descriptor<T>::format() &&
      !(info.itemsize == static_cast<py::ssize_t>(sizeof(T)) &&
        py::dtype(info).equal(py::dtype::of<T>()))) {
    type_error(std::string(name) + ": expected dtype " + dtype_name<T>() + ", got format '" +
               info.format + "'");
  }
  if (ndim >= 0 && info.ndim != ndim) {
    value_error(std::string(name) + ": expected " + std::to_string(ndim) + "-d buffer, got shape " +
                shape_str(info));
  }
  py::ssize_t expect = static_cast<py::ssize_t>(sizeof(T));
  for (py::ssize_t i = info.ndim - 1; i >= 0; --i) {
    if (info.shape[i] > 1 && info.strides[i] != expect) {
      value_error(std::string(name) + ": expected a C-contiguous buffer, got shape " +
                  shape_str(info) + " with non-contiguous strides");
    }
    expect *= info.shape[i];
  }
  View<T> v;
  v.data = static_cast<T*>(info.ptr);
  v.shape.assign(info.shape.begin(), info.shape.end());
  return v;
}

template <typename T>
void expect_shape(const View<T>& v, const char* name, std::initializer_list<int64_t> want) {
  bool ok = v.shape.size() == want.size();
  size_t i = 0;
  for (int64_t w : want) {
    if (!ok) break;
    if (w >= 0 && v.shape[i] != w) ok = false;
    ++i;
  }
  if (!ok) {
    std::ostringstream s;
    s << name << ": expected shape (";
    i = 0;
    for (int64_t w : want) s << (i++ ? ", " : "") << (w < 0 ? std::string("*") : std::to_string(w));
    s << "), got (";
    for (size_t j = 0; j < v.shape.size(); ++j) s << (j ? ", " : "") << v.shape[j];
    s << ")";
    value_error(s.str());
  }
}

// Registration hooks, one per op file in csrc/.
void register_hypercomplex(py::module_& m);
void register_fde(py::module_& m);

}  // namespace embkern
