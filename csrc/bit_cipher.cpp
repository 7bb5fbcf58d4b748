// Bindings for src/cpu/bit_cipher.cpp: embkern._C.bit_cipher.count
//
// Takes numpy arrays (zero-copy views of torch CPU tensors) and adds one
// chunk's co-occurrence sums into A in place; to_double finalises A. Everything src/ relies on
// is checked here -- dtypes, ranks, shapes against V, b and the offsets,
// C-contiguity, writable accumulators, token ids in [0, V), bit indices in
// [0, b) with at most b a type, both CSR offset arrays -- and reported as
// ValueError / TypeError naming the argument, before the GIL is released.
#include "embkern/bit_cipher.h"

#include <string>

#include "common.h"

namespace embkern {
namespace {

// Offsets of the window, |delta| < 2^40: i + delta never overflows.
constexpr int64_t kMaxDelta = int64_t(1) << 40;
// Quantised table values: x in [0, 1] as round(x * 2^62).
constexpr int64_t kOne = int64_t(1) << 62;

void check_quanta(const View<int64_t>& t, const char* name) {
  int64_t n = 1;
  for (int64_t d : t.shape) n *= d;
  for (int64_t k = 0; k < n; ++k)
    if (t.data[k] < 0 || t.data[k] > kOne)
      value_error(std::string(name) + ": expected quantised weights in [0, 2^62], got " + std::to_string(t.data[k]) +
                  " at flat index " + std::to_string(k));
}

const uint64_t* words(const View<int64_t>& t) { return reinterpret_cast<const uint64_t*>(t.data); }

void count(py::object tokens_, py::object doc_offsets_, py::object bit_offsets_, py::object bit_index_,
           py::object wa_, py::object ws_, py::object wpad_, py::object deltas_, py::object load_, py::object A_,
           py::object parts_, bool concat) {
  auto boff = req<int64_t>(bit_offsets_, "bit_offsets", 1);
  if (boff.size(0) < 1) value_error("bit_offsets: expected shape (V + 1,) with V >= 0, got (0,)");
  const int64_t V = boff.size(0) - 1;
  auto A = req<int64_t>(A_, "A", 4, true);
  expect_shape(A, "A", {V, -1, -1, 2});
  if (A.size(2) < 3) value_error("A: expected A.shape[2] = bits + 2 >= 3, got " + std::to_string(A.size(2)));
  const int64_t bits = A.size(2) - 2;
  auto bidx = req<int32_t>(bit_index_, "bit_index", 1);
  check_csr_offsets(boff.data, V, bidx.size(0), "bit_offsets", "len(bit_index)", bits);
  check_indices(bidx.data, bidx.size(0), bits, "bit_index", "bit positions");
  auto deltas = req<int64_t>(deltas_, "deltas", 1);
  const int64_t n_off = deltas.size(0);
  for (int64_t o = 0; o < n_off; ++o)
    if (deltas.data[o] <= -kMaxDelta || deltas.data[o] >= kMaxDelta)
      value_error("deltas: expected |delta| < 2^40, got deltas[" + std::to_string(o) +
                  "] = " + std::to_string(deltas.data[o]));
  const int64_t nb = concat ? n_off : 1;
  expect_shape(A, "A", {V, nb, bits + 2, 2});
  View<int64_t> parts;
  int64_t n_parts = 0;
  if (!parts_.is_none()) {
    parts = req<int64_t>(parts_, "parts", 5, true);
    expect_shape(parts, "parts", {-1, V, nb, bits + 2, 2});
    n_parts = parts.size(0);
    const int64_t words = V * nb * (bits + 2) * 2;
    // every copy is written by other threads than A: the buffers must be distinct
    if (n_parts > 0 && words > 0 && parts.data < A.data + words && A.data < parts.data + n_parts * words)
      value_error("parts: expected a buffer apart from A's, got one that overlaps it");
  }
  auto wa = req<int64_t>(wa_, "wa", 2);
  expect_shape(wa, "wa", {n_off, V});
  check_quanta(wa, "wa");
  auto wpad = req<int64_t>(wpad_, "wpad", 1);
  expect_shape(wpad, "wpad", {n_off});
  check_quanta(wpad, "wpad");
  View<int64_t> ws;
  if (!ws_.is_none()) {
    ws = req<int64_t>(ws_, "ws", 2);
    expect_shape(ws, "ws", {n_off, V});
    check_quanta(ws, "ws");
  }
  auto load = req<int64_t>(load_, "load", 1);
  expect_shape(load, "load", {V});
  for (int64_t t = 0; t < V; ++t)
    if (load.data[t] < 0 || load.data[t] > (int64_t(1) << 56))
      value_error("load: expected per-type counts in [0, 2^56], got load[" + std::to_string(t) +
                  "] = " + std::to_string(load.data[t]));
  auto tok = req<int32_t>(tokens_, "token_ids", 1);
  const int64_t N = tok.size(0);
  check_indices(tok.data, N, V, "token_ids", "token ids");
  auto doff = req<int64_t>(doc_offsets_, "doc_offsets", 1);
  if (doff.size(0) < 1) value_error("doc_offsets: expected shape (n_docs + 1,), got (0,)");
  const int64_t n_docs = doff.size(0) - 1;
  check_csr_offsets(doff.data, n_docs, N, "doc_offsets", "len(token_ids)");
  run_nogil(0, "bit_cipher.count", [&] {
    bit_cipher::count(tok.data, N, doff.data, n_docs, boff.data, bidx.data, words(wa),
                      ws_.is_none() ? nullptr : words(ws), words(wpad), deltas.data, n_off, concat, V, bits,
                      load.data, reinterpret_cast<uint64_t*>(A.data),
                      n_parts ? reinterpret_cast<uint64_t*>(parts.data) : nullptr, n_parts);
  });
}

void fold(py::object A_, py::object parts_) {
  auto A = req<int64_t>(A_, "A", 4, true);
  expect_shape(A, "A", {-1, -1, -1, 2});
  auto parts = req<int64_t>(parts_, "parts", 5, true);
  expect_shape(parts, "parts", {-1, A.size(0), A.size(1), A.size(2), 2});
  const int64_t n = A.size(0) * A.size(1) * A.size(2), n_parts = parts.size(0);
  if (n_parts > 0 && n > 0 && parts.data < A.data + 2 * n && A.data < parts.data + 2 * n * n_parts)
    value_error("parts: expected a buffer apart from A's, got one that overlaps it");
  run_nogil(0, "bit_cipher.fold", [&] {
    bit_cipher::fold(reinterpret_cast<uint64_t*>(A.data), reinterpret_cast<uint64_t*>(parts.data), n_parts, n);
  });
}

void to_double(py::object A_, py::object out_) {
  auto A = req<int64_t>(A_, "A", 2);
  if (A.size(1) != 2) value_error("A: expected shape (n, 2) (lo, hi words), got second dimension " +
                                  std::to_string(A.size(1)));
  auto out = req<double>(out_, "out", 1, true);
  expect_shape(out, "out", {A.size(0)});
  run_nogil(0, "bit_cipher.to_double", [&] {
    bit_cipher::to_double(words(A), A.size(0), out.data);
  });
}

}  // namespace

void register_bit_cipher_text(py::module_& m);  // csrc/bit_cipher_text.cpp

void register_bit_cipher(py::module_& m) {
  using py::arg;
  register_bit_cipher_text(m);
  m.def("count", &count, arg("token_ids"), arg("doc_offsets"), arg("bit_offsets"), arg("bit_index"), arg("wa"),
        arg("ws"), arg("wpad"), arg("deltas"), arg("load"), arg("A"), arg("parts"), arg("concat"),
        "Adds one chunk's bit-cipher co-occurrence sums into A (V, nb, b + 2, 2) int64 in place: unsigned "
        "128-bit integers as (lo, hi) words, quanta of 2^-62, each block [pad, bit 0 .. bit b-1, q weight]. "
        "token_ids (N,) int32 in [0, V); doc_offsets (n_docs + 1,) int64 CSR over N; bit_offsets (V + 1,) int64 "
        "and bit_index (nnz,) int32: the active bits of each type; wa, ws (n_off, V) float64: the bit and q "
        "weights of a context type at each offset, quantised to integers round(x * 2^62) in [0, 2^62] (ws None "
        "without noise); wpad (n_off,) the pad's "
        "weights; deltas (n_off,) int64 the offsets; load (V,) int64 the counts of the cipher (how rows are "
        "dealt to threads; no effect on the result); parts: None or (K, V, nb, b + 2, 2) int64, K further "
        "copies of A that groups of threads count contiguous ranges of the chunk into (the sums are A + the "
        "parts; see fold); concat: one block per offset.");
  m.def("fold", &fold, arg("A"), arg("parts"),
        "A (V, nb, b + 2, 2) int64 += every copy in parts (K, V, nb, b + 2, 2) int64 (128-bit integer sums), "
        "then parts is zeroed.");
  m.def("to_double", &to_double, arg("A"), arg("out"),
        "out (n,) float64 = A (n, 2) int64 (unsigned 128-bit integers as (lo, hi) words) * 2^-62, each rounded "
        "once to nearest (ties to even).");
}

}  // namespace embkern
