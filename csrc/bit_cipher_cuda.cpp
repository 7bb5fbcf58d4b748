// Bindings for src/cuda/bit_cipher.cu: embkern._C_cuda.bit_cipher.
//
// Python (python/embkern/ops/_bit_cipher_cuda.py) describes one chunk as one
// Problem object: each device buffer an ArrayView (data pointer, element
// count, dtype name) of a torch CUDA tensor, the sizes, and host copies of the
// document offsets and the window offsets (checked here: a CSR over N, and
// |delta| < 2^40). Token ids are range-checked by the public Python function
// on the device; the kernels also skip ids outside [0, V), so a bad id never
// reads or writes out of bounds. CUDA failures become RuntimeError with
// cudaGetErrorString text. No math here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>

#include "common.h"
#include "cuda_args.h"
#include "embkern/bit_cipher_cuda.h"

namespace embkern {
namespace {

using cuda_args::ArrayView;
using cuda_args::checked_ptr;

namespace bcc = embkern::bit_cipher_cuda;

struct Problem {
  std::optional<ArrayView> tokens;       // int32 (N,)
  std::optional<ArrayView> doc_offsets;  // int64 (n_docs + 1,)
  py::object doc_offsets_host;           // the same values on the host
  std::optional<ArrayView> code_mask;    // uint64 (V, W)
  std::optional<ArrayView> wa, ws;       // int64 (n_off, V) quanta in [0, 2^62]; ws None without noise
  std::optional<ArrayView> wpad;         // int64 (n_off,) quanta in [0, 2^62]
  std::optional<ArrayView> deltas;       // int64 (n_off,)
  py::object deltas_host;                // the same values on the host
  bool concat = false;
  int64_t vocab_size = 0, bits = 0;
  std::optional<ArrayView> A;  // int64 (V, nb, b + 2, 2): unsigned 128-bit sums as (lo, hi) words
};

bcc::Problem make_problem(const Problem& a) {
  bcc::Problem p;
  const int64_t V = a.vocab_size, b = a.bits;
  if (V < 1 || V > 0x7fffffffLL) value_error("vocab_size: expected 1 <= V < 2^31, got " + std::to_string(V));
  if (b < 1 || b > (int64_t(1) << 20)) value_error("bits: expected 1 <= bits <= 2^20, got " + std::to_string(b));
  if (!a.tokens) value_error("tokens: required, got None");
  const int64_t N = a.tokens->numel;
  if (N > bcc::kMaxTokens) value_error("tokens: expected < 2^31 tokens a chunk, got " + std::to_string(N));
  p.tokens = checked_ptr<const int32_t>(a.tokens, "tokens", N, "N");
  p.num_tokens = N;
  auto oh = req<int64_t>(a.doc_offsets_host, "doc_offsets_host", 1);
  if (oh.size(0) < 1) value_error("doc_offsets_host: expected (n_docs + 1,) offsets, got (0,)");
  p.num_docs = oh.size(0) - 1;
  check_csr_offsets(oh.data, p.num_docs, N, "doc_offsets", "len(tokens)");
  p.doc_offsets = checked_ptr<const int64_t>(a.doc_offsets, "doc_offsets", p.num_docs + 1, "n_docs + 1");
  auto dh = req<int64_t>(a.deltas_host, "deltas_host", 1);
  const int64_t n_off = dh.size(0);
  if (n_off < 1) value_error("deltas: expected at least one offset");
  for (int64_t o = 0; o < n_off; ++o)
    if (dh.data[o] <= -(int64_t(1) << 40) || dh.data[o] >= (int64_t(1) << 40))
      value_error("deltas: expected |delta| < 2^40, got " + std::to_string(dh.data[o]));
  p.deltas = checked_ptr<const int64_t>(a.deltas, "deltas", n_off, "n_off");
  p.num_offsets = n_off;
  p.mask_words = (b + 63) / 64;
  p.code_mask = checked_ptr<const uint64_t>(a.code_mask, "code_mask", sat_mul(V, p.mask_words), "V * ceil(b / 64)");
  // Quantised tables (int64 in [0, 2^62], made by CooccurrenceCounts; a larger
  // value would change sums, never memory safety: the adds are unsigned).
  p.wa = reinterpret_cast<const uint64_t*>(checked_ptr<const int64_t>(a.wa, "wa", sat_mul(n_off, V), "n_off * V"));
  p.ws = a.ws ? reinterpret_cast<const uint64_t*>(checked_ptr<const int64_t>(a.ws, "ws", sat_mul(n_off, V),
                                                                             "n_off * V"))
              : nullptr;
  p.wpad = reinterpret_cast<const uint64_t*>(checked_ptr<const int64_t>(a.wpad, "wpad", n_off, "n_off"));
  p.concat = a.concat;
  p.vocab_size = V;
  p.bits = b;
  p.A = reinterpret_cast<uint64_t*>(checked_ptr<int64_t>(
      a.A, "A", sat_mul(sat_mul(sat_mul(V, a.concat ? n_off : 1), b + 2), 2), "V * nb * (b + 2) * 2"));
  return p;
}

// The size arguments of workspace_bytes / workspace_layout (before any CUDA call).
void check_workspace_sizes(int64_t num_tokens, int64_t vocab_size) {
  if (num_tokens < 0 || num_tokens > bcc::kMaxTokens)
    value_error("num_tokens: expected 0 <= N < 2^31, got " + std::to_string(num_tokens));
  if (vocab_size < 1 || vocab_size > 0x7fffffffLL)
    value_error("vocab_size: expected 1 <= V < 2^31, got " + std::to_string(vocab_size));
}

}  // namespace

void register_bit_cipher_cuda(py::module_& m) {
  py::class_<Problem>(m, "Problem", "One chunk: device buffers as ArrayView, host copies of the two offset arrays")
      .def(py::init([](std::optional<ArrayView> tokens, std::optional<ArrayView> doc_offsets,
                       py::object doc_offsets_host, std::optional<ArrayView> code_mask, std::optional<ArrayView> wa,
                       std::optional<ArrayView> ws, std::optional<ArrayView> wpad, std::optional<ArrayView> deltas,
                       py::object deltas_host, bool concat, int64_t vocab_size, int64_t bits,
                       std::optional<ArrayView> A) {
             return Problem{tokens, doc_offsets, std::move(doc_offsets_host), code_mask, wa, ws, wpad, deltas,
                            std::move(deltas_host), concat, vocab_size, bits, A};
           }),
           py::kw_only(), py::arg("tokens"), py::arg("doc_offsets"), py::arg("doc_offsets_host"),
           py::arg("code_mask"), py::arg("wa"), py::arg("ws"), py::arg("wpad"), py::arg("deltas"),
           py::arg("deltas_host"), py::arg("concat"), py::arg("vocab_size"), py::arg("bits"), py::arg("A"));
  m.def(
      "workspace_bytes",
      [](int64_t num_tokens, int64_t vocab_size, int device) {
        check_workspace_sizes(num_tokens, vocab_size);
        std::string err;
        const int64_t n = bcc::workspace_bytes(num_tokens, vocab_size, device, &err);
        if (n < 0) throw std::runtime_error(err);
        return n;
      },
      py::arg("num_tokens"), py::arg("vocab_size"), py::arg("device"),
      "Bytes of device workspace count() needs for N tokens and V types");
  m.def(
      "workspace_layout",
      [](int64_t num_tokens, int64_t vocab_size, int device) {
        check_workspace_sizes(num_tokens, vocab_size);
        bcc::WorkspaceLayout L;
        std::string err;
        if (!bcc::workspace_layout(num_tokens, vocab_size, device, &L, &err)) throw std::runtime_error(err);
        py::dict d;
        d["pos"] = L.pos;
        d["keys"] = L.keys;
        d["spos"] = L.spos;
        d["doc_of"] = L.doc_of;
        d["start"] = L.start;
        d["end"] = L.end;
        d["cub"] = L.cub;
        d["cub_bytes"] = L.cub_bytes;
        d["total"] = L.total;
        return d;
      },
      py::arg("num_tokens"), py::arg("vocab_size"), py::arg("device"),
      "Byte offsets in count()'s workspace for N tokens and V types: pos, keys, spos, doc_of (N int32 each), "
      "start, end (V int32 each), cub (the sort's temporary storage, cub_bytes long), and total "
      "(= workspace_bytes)");
  m.def(
      "count",
      // Every argument is converted while the GIL is held: nothing of the Python API may run inside the
      // release (pybind11 3's integer cast calls PyErr_Occurred, which crashed with no thread state).
      [](const Problem& a, uintptr_t workspace_ptr, int64_t workspace_bytes, int device, uintptr_t stream) {
        const bcc::Problem p = make_problem(a);
        std::string err;
        bcc::Status st;
        {
          py::gil_scoped_release nogil;
          st = bcc::count(p, reinterpret_cast<void*>(workspace_ptr), workspace_bytes, device,
                          reinterpret_cast<void*>(stream), &err);
        }
        if (st != bcc::Status::Ok) throw std::runtime_error(err);
      },
      py::arg("problem"), py::kw_only(), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("device"),
      py::arg("stream"),
      "Enqueue the counting of one chunk into A on `stream` (cudaStream_t as int); asynchronous");
}

}  // namespace embkern
