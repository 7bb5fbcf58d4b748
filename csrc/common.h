// Shared helpers for the pybind11 boundary: take buffers through the buffer
// protocol (numpy arrays, or torch CPU tensors via .numpy()), check them, and
// raise Python ValueError / TypeError naming the argument. No math here.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <climits>

#include <sys/resource.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <new>
#include <sstream>
#include <string>
#include <vector>

#include "embkern/saturating.h"

namespace embkern {
namespace py = pybind11;

[[noreturn]] inline void value_error(const std::string& msg) { throw py::value_error(msg); }
[[noreturn]] inline void type_error(const std::string& msg) { throw py::type_error(msg); }
// Needs the GIL (as every raise here does).
[[noreturn]] inline void memory_error(const std::string& msg) {
  PyErr_SetString(PyExc_MemoryError, msg.c_str());
  throw py::error_already_set();
}

// ---- sizes up front ----------------------------------------------------------

// sat_mul / sat_add / sat_sum for sizes and byte counts: embkern/saturating.h.

// "12.3 GB" (10^9 bytes), for the messages.
inline std::string gb(int64_t bytes) {
  if (bytes == INT64_MAX) return "more than 9.2e9 GB (the size overflows int64)";
  char buf[48];
  std::snprintf(buf, sizeof(buf), "%.3g GB", double(bytes) / 1e9);
  return buf;
}

// What one allocation may take: the machine's physical memory, or less when
// an address-space limit (ulimit -v / RLIMIT_AS) leaves less than that above
// what the process already maps (read from /proc/self/statm).
inline int64_t memory_limit_bytes() {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  int64_t limit = pages > 0 && page > 0 ? int64_t(pages) * int64_t(page) : INT64_MAX;
  struct rlimit rl;
  if (getrlimit(RLIMIT_AS, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY) {
    int64_t mapped = 0;
    std::ifstream statm("/proc/self/statm");
    if (statm >> mapped) mapped *= int64_t(page > 0 ? page : 4096);
    const int64_t left = int64_t(rl.rlim_cur) > mapped ? int64_t(rl.rlim_cur) - mapped : 0;
    limit = std::min(limit, left);
  }
  return limit;
}

// MemoryError naming `what` (the config and the buffer) and the size in GB
// when `bytes` cannot be had. Below 256 MB it does not look (the check reads
// /proc; small calls are the common ones and cannot fail for lack of memory
// in any setting this library targets).
inline void check_memory(int64_t bytes, const std::string& what) {
  if (bytes >= 0 && bytes < (int64_t(1) << 28)) return;
  const int64_t limit = memory_limit_bytes();
  if (bytes < 0 || bytes > limit)
    memory_error(what + " needs " + gb(bytes) + ", more than the " + gb(limit) +
                 " this process can allocate (physical memory, or the address-space limit)");
}

// Bytes of an array with dimensions `dims` and `elem` bytes an element
// (saturating), after check_memory(bytes, what).
inline int64_t checked_bytes(std::initializer_list<int64_t> dims, int64_t elem, const std::string& what) {
  int64_t b = elem;
  for (int64_t v : dims) b = sat_mul(b, v);
  check_memory(b, what);
  return b;
}

// Runs fn() without the GIL; a std::bad_alloc from it (thrown after any
// parallel region, see src/) becomes MemoryError naming `what` and `bytes`.
template <class F>
void run_nogil(int64_t bytes, const std::string& what, F&& fn) {
  bool oom = false;
  {
    py::gil_scoped_release nogil;
    try {
      fn();
    } catch (const std::bad_alloc&) {
      oom = true;
    }
  }
  if (oom) memory_error(what + ": allocating " + gb(bytes) + " failed (out of memory)");
}

// ---- shared structure checks ------------------------------------------------

// CSR offsets of `rows` rows over `total` entries: offsets[0] == 0,
// non-decreasing, offsets[rows] == total (`total_name` says what total is),
// and, when max_row >= 0, at most max_row entries a row. The one check of
// every CSR pair at this boundary (FDE points on the CPU and the GPU,
// filters).
inline void check_csr_offsets(const int64_t* off, int64_t rows, int64_t total, const std::string& name,
                              const std::string& total_name, int64_t max_row = -1) {
  if (off[0] != 0) value_error(name + ": expected " + name + "[0] == 0, got " + std::to_string(off[0]));
  for (int64_t b = 0; b < rows; ++b) {
    if (off[b + 1] < off[b])
      value_error(name + ": expected non-decreasing offsets, got " + name + "[" + std::to_string(b + 1) +
                  "] = " + std::to_string(off[b + 1]) + " < " + name + "[" + std::to_string(b) +
                  "] = " + std::to_string(off[b]));
    if (max_row >= 0 && off[b + 1] - off[b] > max_row)
      value_error(name + ": expected at most " + std::to_string(max_row) + " entries a row, got " +
                  std::to_string(off[b + 1] - off[b]) + " in row " + std::to_string(b));
  }
  if (off[rows] != total)
    value_error(name + ": expected " + name + "[-1] == " + total_name + " = " + std::to_string(total) + ", got " +
                std::to_string(off[rows]));
}

// Every value of x[0..n) in [0, upper): else a ValueError naming `name`,
// the range (`what` says what the values are) and the first value outside.
template <typename I>
void check_indices(const I* x, int64_t n, int64_t upper, const std::string& name, const std::string& what) {
  for (int64_t i = 0; i < n; ++i)
    if (x[i] < 0 || int64_t(x[i]) >= upper)
      value_error(name + ": expected " + what + " in [0, " + std::to_string(upper) + "), got " + name + "[" +
                  std::to_string(i) + "] = " + std::to_string(x[i]));
}

// The float dtype of an array argument (the kernels are instantiated for float32 and float64):
// anything else is a TypeError naming the argument.
enum class FloatKind { F32, F64 };

inline FloatKind float_kind(const py::object& obj, const char* name) {
  if (!py::isinstance<py::buffer>(obj)) {
    type_error(std::string(name) + ": expected a float32 or float64 array, got " +
               std::string(py::str(py::type::of(obj).attr("__name__"))));
  }
  py::buffer_info info = obj.cast<py::buffer>().request();
  // The usual format strings first: py::dtype(info) parses the format in numpy's
  // Python code (_dtype_from_pep3118), 3.9 of the 12.5 us of a raw selective-
  // attention decode call at B=1 H=2 Lk=64. Other spellings ("<f", "=d") still parse.
  if (info.format == py::format_descriptor<float>::format()) return FloatKind::F32;
  if (info.format == py::format_descriptor<double>::format()) return FloatKind::F64;
  py::dtype dt(info);
  if (dt.equal(py::dtype::of<float>())) return FloatKind::F32;
  if (dt.equal(py::dtype::of<double>())) return FloatKind::F64;
  type_error(std::string(name) + ": expected dtype float32 or float64, got format '" + info.format + "'");
}

// A Python-style tuple: "(3,)", "(2, 5)".
inline std::string tuple_str(const std::vector<py::ssize_t>& xs) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < xs.size(); ++i) s << (i ? ", " : "") << xs[i];
  if (xs.size() == 1) s << ",";
  s << ")";
  return s.str();
}

inline std::string shape_str(const py::buffer_info& info) { return tuple_str(info.shape); }

// A checked view of a buffer of element type T: C-contiguous, or (view()'s
// `lead`) C-contiguous below a leading index with a uniform stride.
template <typename T>
struct View {
  T* data = nullptr;
  std::vector<int64_t> shape;
  // Elements from one value of the leading dims (taken as one index) to the
  // next; the product of the trailing sizes when the buffer is C-contiguous.
  int64_t lead_stride = 0;
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
// With `lead` in [1, ndim), only dims >= lead must be C-contiguous; dims < lead
// must step as one index (each one's stride the next one's times its size,
// size-1 dims ignored) by a non-negative whole number of elements: a slice
// [:, :, :L] of a (B, H, capacity, d) buffer. Every address such a view names
// lies inside the buffer that exported it, so reading it is memory-safe.
template <typename T>
View<T> view(py::buffer buf, const char* name, int ndim, bool writable = false, int lead = 0) {
  // Ask read-only first, so that a read-only output is an error naming it
  // (pybind11's own says only "buffer source array is read-only").
  py::buffer_info info = buf.request(false);
  if (writable) {
    if (info.readonly) value_error(std::string(name) + ": expected a writable buffer, got a read-only one");
    info = buf.request(true);
  }
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
  const py::ssize_t nd = info.ndim;
  const py::ssize_t inner_from = (lead > 0 && lead < nd) ? lead : 0;
  py::ssize_t expect = static_cast<py::ssize_t>(sizeof(T));
  for (py::ssize_t i = nd - 1; i >= inner_from; --i) {
    if (info.shape[i] > 1 && info.strides[i] != expect) {
      value_error(std::string(name) + ": expected a C-contiguous buffer" +
                  (inner_from ? " below dim " + std::to_string(inner_from) : std::string()) + ", got shape " +
                  shape_str(info) + " with non-contiguous strides");
    }
    expect *= info.shape[i];
  }
  View<T> v;
  v.lead_stride = static_cast<int64_t>(expect / static_cast<py::ssize_t>(sizeof(T)));
  bool first = true;
  for (py::ssize_t i = inner_from - 1; i >= 0; --i) {
    if (info.shape[i] <= 1) continue;
    const py::ssize_t st = info.strides[i];
    if (first ? (st < 0 || st % static_cast<py::ssize_t>(sizeof(T)) != 0) : st != expect) {
      value_error(std::string(name) + ": expected dims 0.." + std::to_string(inner_from - 1) +
                  " to step as one index by whole elements, got shape " + shape_str(info) + " with strides " +
                  tuple_str(info.strides) + " bytes");
    }
    if (first) v.lead_stride = static_cast<int64_t>(st / static_cast<py::ssize_t>(sizeof(T)));
    first = false;
    expect = st * info.shape[i];
  }
  v.data = static_cast<T*>(info.ptr);
  v.shape.assign(info.shape.begin(), info.shape.end());
  return v;
}

// `obj` as a checked view (see view()); anything that is not a buffer, None
// included, is a TypeError naming the argument rather than pybind11's cast error.
template <typename T>
View<T> req(const py::object& obj, const char* name, int ndim, bool writable = false, int lead = 0) {
  if (obj.is_none() || !py::isinstance<py::buffer>(obj)) {
    type_error(std::string(name) + ": expected an array, got " +
               std::string(py::str(py::type::of(obj).attr("__name__"))));
  }
  return view<T>(obj.cast<py::buffer>(), name, ndim, writable, lead);
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
