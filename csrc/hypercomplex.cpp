// Bindings for src/cpu/hypercomplex.cpp: embkern._C.hypercomplex.*
//
// Every function takes numpy arrays (zero-copy views of torch CPU tensors),
// float32 or float64 throughout (the dtype of the first array decides; every
// other float array must match), int64 index arrays, None for absent optional
// arrays, and ints for the enums. Outputs are written in place. Everything is
// checked here -- shapes, D % 4 == 0, index ranges, CSR structure, enum
// ranges -- and reported as ValueError / TypeError naming the argument, before
// the GIL is released and the kernel runs.
#include "embkern/hypercomplex.h"

#include <algorithm>
#include <vector>

#include "common.h"

namespace embkern {
namespace {

namespace hc = embkern::hc;

// An optional input: None -> null data pointer.
template <typename T>
View<T> opt(const py::object& obj, const char* name, int ndim) {
  if (obj.is_none()) return View<T>{};
  return req<T>(obj, name, ndim);
}

int enum_arg(int v, const char* name, int n, const char* names) {
  if (v < 0 || v >= n) {
    value_error(std::string(name) + ": expected an int in [0, " + std::to_string(n) + ") (" + names + "), got " +
                std::to_string(v));
  }
  return v;
}

void check_width(int64_t D, const char* name) {
  if (D % 4 != 0) {
    value_error(std::string(name) + ": expected last dimension 4*d (quaternion components), got " +
                std::to_string(D));
  }
}

void check_targets(const View<int64_t>& t, int64_t N) { check_indices(t.data, t.size(0), N, "targets", "indices"); }

// Returns the largest number of distinct ids in one row of a valid CSR filter
// (duplicates skip nothing extra, so they must not shrink the allowed k).
int64_t check_filter(const View<int64_t>& fo, const View<int64_t>& fi, bool has_fo, bool has_fi, int64_t B,
                     int64_t N) {
  if (has_fo != has_fi) {
    value_error(std::string("filter_offsets / filter_index: expected both or neither, got ") +
                (has_fo ? "offsets without index" : "index without offsets"));
  }
  if (!has_fo) return 0;
  expect_shape(fo, "filter_offsets", {B + 1});
  const int64_t nnz = fi.size(0);
  check_csr_offsets(fo.data, B, nnz, "filter_offsets", "len(filter_index)");
  check_indices(fi.data, nnz, N, "filter_index", "entity ids");
  int64_t widest = 0;
  std::vector<int64_t> row;
  for (int64_t b = 0; b < B; ++b) {
    row.assign(fi.data + fo.data[b], fi.data + fo.data[b + 1]);
    std::sort(row.begin(), row.end());
    widest = std::max<int64_t>(widest, std::unique(row.begin(), row.end()) - row.begin());
  }
  return widest;
}

// Shapes common to the scoring kernels: q (B, K), E (N, K), biases.
template <typename T>
struct ScoreArgs {
  View<T> q, E, bh, bt;
  int64_t B, N, K;
  hc::Score score;
  ScoreArgs(const py::object& q_, const py::object& E_, const py::object& bh_, const py::object& bt_, int score_) {
    q = req<T>(q_, "q", 2);
    E = req<T>(E_, "E", 2);
    B = q.size(0);
    K = q.size(1);
    N = E.size(0);
    check_width(K, "q");
    expect_shape(E, "E", {-1, K});
    bh = opt<T>(bh_, "bias_h", 1);
    bt = opt<T>(bt_, "bias_t", 1);
    score = static_cast<hc::Score>(enum_arg(score_, "score", 2, "0 inner, 1 distance"));
    if (bh.data) expect_shape(bh, "bias_h", {B});
    if (bt.data) expect_shape(bt, "bias_t", {N});
    if (score == hc::Score::Inner && (bh.data || bt.data)) {
      value_error(std::string(bh.data ? "bias_h" : "bias_t") +
                  ": biases apply to the distance score (1) only, got score = 0 (inner)");
    }
  }
};

// Sizes up front, then the kernel without the GIL: its scratch
// (hc::scratch_bytes) beyond what the process can allocate is a MemoryError
// naming the call and the size, and so is a std::bad_alloc from the kernel.
template <typename T, class F>
void run_scoring(hc::Kernel kernel, const char* name, int64_t B, int64_t N, int64_t K, int64_t k, int64_t nnz,
                 F&& fn) {
  const int64_t bytes = hc::scratch_bytes(kernel, B, N, K, k, nnz, int(sizeof(T)));
  const std::string what = std::string(name) + " scratch (B " + std::to_string(B) + ", N " + std::to_string(N) +
                           ", K " + std::to_string(K) + (kernel == hc::Kernel::Topk ? ", k " + std::to_string(k) : "") +
                           ", " + dtype_name<T>() + ")";
  check_memory(bytes, what);
  run_nogil(bytes, what, fn);
}

// ---------------------------------------------------------------------------

template <typename T>
void query_forward_t(py::object h_, py::object r_, py::object q_, int algebra, int layout, bool normalize) {
  auto h = req<T>(h_, "h", 2);
  const int64_t B = h.size(0), D = h.size(1);
  check_width(D, "h");
  auto r = req<T>(r_, "r", 2);
  expect_shape(r, "r", {B, D});
  auto q = req<T>(q_, "q_out", 2, true);
  expect_shape(q, "q_out", {B, D});
  auto alg = static_cast<hc::Algebra>(enum_arg(algebra, "algebra", 2, "0 quaternion, 1 dihedron"));
  auto lay = static_cast<hc::Layout>(enum_arg(layout, "layout", 2, "0 component, 1 interleaved"));
  py::gil_scoped_release nogil;
  hc::query_forward<T>(h.data, r.data, q.data, B, D / 4, alg, lay, normalize);
}

template <typename T>
void query_backward_t(py::object g_, py::object h_, py::object r_, py::object gh_, py::object gr_, int algebra,
                      int layout, bool normalize) {
  auto g = req<T>(g_, "grad_q", 2);
  const int64_t B = g.size(0), D = g.size(1);
  check_width(D, "grad_q");
  auto h = req<T>(h_, "h", 2);
  expect_shape(h, "h", {B, D});
  auto r = req<T>(r_, "r", 2);
  expect_shape(r, "r", {B, D});
  auto gh = req<T>(gh_, "grad_h_out", 2, true);
  expect_shape(gh, "grad_h_out", {B, D});
  auto gr = req<T>(gr_, "grad_r_out", 2, true);
  expect_shape(gr, "grad_r_out", {B, D});
  auto alg = static_cast<hc::Algebra>(enum_arg(algebra, "algebra", 2, "0 quaternion, 1 dihedron"));
  auto lay = static_cast<hc::Layout>(enum_arg(layout, "layout", 2, "0 component, 1 interleaved"));
  py::gil_scoped_release nogil;
  hc::query_backward<T>(g.data, h.data, r.data, gh.data, gr.data, B, D / 4, alg, lay, normalize);
}

template <typename T>
void score_forward_t(py::object q_, py::object E_, py::object bh_, py::object bt_, py::object S_, int score) {
  ScoreArgs<T> a(q_, E_, bh_, bt_, score);
  auto S = req<T>(S_, "S_out", 2, true);
  expect_shape(S, "S_out", {a.B, a.N});
  run_scoring<T>(hc::Kernel::Score, "score_forward", a.B, a.N, a.K, 0, 0, [&] {
    hc::score_forward<T>(a.q.data, a.E.data, a.bh.data, a.bt.data, S.data, a.B, a.N, a.K, a.score);
  });
}

template <typename T>
void rank_t(py::object q_, py::object E_, py::object bh_, py::object bt_, py::object t_, py::object fo_,
            py::object fi_, py::object out_, int score, int ties) {
  ScoreArgs<T> a(q_, E_, bh_, bt_, score);
  auto t = req<int64_t>(t_, "targets", 1);
  expect_shape(t, "targets", {a.B});
  auto fo = opt<int64_t>(fo_, "filter_offsets", 1);
  auto fi = opt<int64_t>(fi_, "filter_index", 1);
  auto out = req<double>(out_, "ranks_out", 1, true);
  expect_shape(out, "ranks_out", {a.B});
  auto tie = static_cast<hc::Ties>(enum_arg(ties, "ties", 3, "0 realistic, 1 optimistic, 2 pessimistic"));
  check_targets(t, a.N);
  check_filter(fo, fi, !fo_.is_none(), !fi_.is_none(), a.B, a.N);
  run_scoring<T>(hc::Kernel::Rank, "rank", a.B, a.N, a.K, 0, fi.data ? fi.size(0) : 0, [&] {
    hc::rank<T>(a.q.data, a.E.data, a.bh.data, a.bt.data, t.data, fo.data, fi.data, out.data, a.B, a.N, a.K, a.score,
                tie);
  });
}

template <typename T>
void topk_t(py::object q_, py::object E_, py::object bh_, py::object bt_, py::object fo_, py::object fi_,
            py::object v_, py::object i_, int score) {
  ScoreArgs<T> a(q_, E_, bh_, bt_, score);
  auto fo = opt<int64_t>(fo_, "filter_offsets", 1);
  auto fi = opt<int64_t>(fi_, "filter_index", 1);
  auto v = req<T>(v_, "values_out", 2, true);
  if (v.size(0) != a.B) expect_shape(v, "values_out", {a.B, -1});
  const int64_t k = v.size(1);
  auto idx = req<int64_t>(i_, "indices_out", 2, true);
  expect_shape(idx, "indices_out", {a.B, k});
  const int64_t widest = check_filter(fo, fi, !fo_.is_none(), !fi_.is_none(), a.B, a.N);
  if (k > a.N - widest) {
    value_error("values_out: expected k = values_out.shape[1] <= " + std::to_string(a.N - widest) +
                " (entities minus the most filtered in a row), got " + std::to_string(k));
  }
  run_scoring<T>(hc::Kernel::Topk, "topk", a.B, a.N, a.K, k, fi.data ? fi.size(0) : 0, [&] {
    hc::topk<T>(a.q.data, a.E.data, a.bh.data, a.bt.data, fo.data, fi.data, v.data, idx.data, a.B, a.N, a.K, k,
                a.score);
  });
}

template <typename T>
void ce_forward_t(py::object q_, py::object E_, py::object bh_, py::object bt_, py::object t_, py::object loss_,
                  py::object lse_, int score) {
  ScoreArgs<T> a(q_, E_, bh_, bt_, score);
  auto t = req<int64_t>(t_, "targets", 1);
  expect_shape(t, "targets", {a.B});
  auto loss = req<T>(loss_, "loss_out", 1, true);
  expect_shape(loss, "loss_out", {a.B});
  auto lse = req<T>(lse_, "lse_out", 1, true);
  expect_shape(lse, "lse_out", {a.B});
  check_targets(t, a.N);
  run_scoring<T>(hc::Kernel::CeForward, "ce_forward", a.B, a.N, a.K, 0, 0, [&] {
    hc::ce_forward<T>(a.q.data, a.E.data, a.bh.data, a.bt.data, t.data, loss.data, lse.data, a.B, a.N, a.K, a.score);
  });
}

template <typename T>
void ce_backward_t(py::object gl_, py::object q_, py::object E_, py::object bh_, py::object bt_, py::object t_,
                   py::object lse_, py::object gq_, py::object gE_, py::object gbh_, py::object gbt_, int score) {
  ScoreArgs<T> a(q_, E_, bh_, bt_, score);
  auto gl = req<T>(gl_, "grad_loss", 1);
  expect_shape(gl, "grad_loss", {a.B});
  auto t = req<int64_t>(t_, "targets", 1);
  expect_shape(t, "targets", {a.B});
  auto lse = req<T>(lse_, "lse", 1);
  expect_shape(lse, "lse", {a.B});
  auto gq = req<T>(gq_, "grad_q_out", 2, true);
  expect_shape(gq, "grad_q_out", {a.B, a.K});
  auto gE = req<T>(gE_, "grad_E_out", 2, true);
  expect_shape(gE, "grad_E_out", {a.N, a.K});
  auto gbh = req<T>(gbh_, "grad_bias_h_out", 1, true);
  expect_shape(gbh, "grad_bias_h_out", {a.B});
  auto gbt = req<T>(gbt_, "grad_bias_t_out", 1, true);
  expect_shape(gbt, "grad_bias_t_out", {a.N});
  check_targets(t, a.N);
  run_scoring<T>(hc::Kernel::CeBackward, "ce_backward", a.B, a.N, a.K, 0, 0, [&] {
    hc::ce_backward<T>(gl.data, a.q.data, a.E.data, a.bh.data, a.bt.data, t.data, lse.data, gq.data, gE.data,
                       gbh.data, gbt.data, a.B, a.N, a.K, a.score);
  });
}

// Dispatch on the dtype of the first float array.
#define EMBKERN_BY_FLOAT(first, name, fn, ...)                          \
  do {                                                                  \
    if (float_kind(first, name) == FloatKind::F32) return fn<float>(__VA_ARGS__); \
    return fn<double>(__VA_ARGS__);                                     \
  } while (0)

}  // namespace

void register_hypercomplex(py::module_& m) {
  using py::arg;
  m.def(
      "query_forward",
      [](py::object h, py::object r, py::object q_out, int algebra, int layout, bool normalize) {
        EMBKERN_BY_FLOAT(h, "h", query_forward_t, h, r, q_out, algebra, layout, normalize);
      },
      arg("h"), arg("r"), arg("q_out"), arg("algebra"), arg("layout"), arg("normalize"),
      "q_out (B, 4d) = h (x) r_hat; algebra 0 quaternion / 1 dihedron, layout 0 [a|b|c|d] / 1 (d, 4).");
  m.def(
      "query_backward",
      [](py::object grad_q, py::object h, py::object r, py::object grad_h_out, py::object grad_r_out, int algebra,
         int layout, bool normalize) {
        EMBKERN_BY_FLOAT(grad_q, "grad_q", query_backward_t, grad_q, h, r, grad_h_out, grad_r_out, algebra, layout,
                         normalize);
      },
      arg("grad_q"), arg("h"), arg("r"), arg("grad_h_out"), arg("grad_r_out"), arg("algebra"), arg("layout"),
      arg("normalize"), "Backward of query_forward: grad_h_out, grad_r_out (B, 4d).");
  m.def(
      "score_forward",
      [](py::object q, py::object E, py::object bh, py::object bt, py::object S_out, int score) {
        EMBKERN_BY_FLOAT(q, "q", score_forward_t, q, E, bh, bt, S_out, score);
      },
      arg("q"), arg("E"), arg("bias_h"), arg("bias_t"), arg("S_out"), arg("score"),
      "S_out (B, N) = epilogue(q E^T); score 0 inner, 1 distance (bias_h (B,), bias_t (N,) optional).");
  m.def(
      "rank",
      [](py::object q, py::object E, py::object bh, py::object bt, py::object targets, py::object fo, py::object fi,
         py::object ranks_out, int score, int ties) {
        EMBKERN_BY_FLOAT(q, "q", rank_t, q, E, bh, bt, targets, fo, fi, ranks_out, score, ties);
      },
      arg("q"), arg("E"), arg("bias_h"), arg("bias_t"), arg("targets"), arg("filter_offsets"), arg("filter_index"),
      arg("ranks_out"), arg("score"), arg("ties"),
      "Filtered ranks (B,) float64 of targets (B,) int64; CSR filter (B+1,), (nnz,) or None; "
      "ties 0 realistic, 1 optimistic, 2 pessimistic.");
  m.def(
      "topk",
      [](py::object q, py::object E, py::object bh, py::object bt, py::object fo, py::object fi,
         py::object values_out, py::object indices_out, int score) {
        EMBKERN_BY_FLOAT(q, "q", topk_t, q, E, bh, bt, fo, fi, values_out, indices_out, score);
      },
      arg("q"), arg("E"), arg("bias_h"), arg("bias_t"), arg("filter_offsets"), arg("filter_index"),
      arg("values_out"), arg("indices_out"), arg("score"),
      "Top-k per row into values_out (B, k), indices_out (B, k) int64; descending, ties by lower id.");
  m.def(
      "ce_forward",
      [](py::object q, py::object E, py::object bh, py::object bt, py::object targets, py::object loss_out,
         py::object lse_out, int score) {
        EMBKERN_BY_FLOAT(q, "q", ce_forward_t, q, E, bh, bt, targets, loss_out, lse_out, score);
      },
      arg("q"), arg("E"), arg("bias_h"), arg("bias_t"), arg("targets"), arg("loss_out"), arg("lse_out"),
      arg("score"), "1-N cross-entropy: loss_out (B,) = lse - S[b, t], lse_out (B,).");
  m.def(
      "ce_backward",
      [](py::object grad_loss, py::object q, py::object E, py::object bh, py::object bt, py::object targets,
         py::object lse, py::object gq, py::object gE, py::object gbh, py::object gbt, int score) {
        EMBKERN_BY_FLOAT(q, "q", ce_backward_t, grad_loss, q, E, bh, bt, targets, lse, gq, gE, gbh, gbt, score);
      },
      arg("grad_loss"), arg("q"), arg("E"), arg("bias_h"), arg("bias_t"), arg("targets"), arg("lse"),
      arg("grad_q_out"), arg("grad_E_out"), arg("grad_bias_h_out"), arg("grad_bias_t_out"), arg("score"),
      "Backward of ce_forward: grad_q_out (B, K), grad_E_out (N, K), grad_bias_h_out (B,), grad_bias_t_out (N,).");
}

}  // namespace embkern
