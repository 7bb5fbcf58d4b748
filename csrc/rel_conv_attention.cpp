// Bindings for src/cpu/rel_conv_attention.cpp: embkern._C.rel_conv_attention.*
//
// Every function takes numpy arrays (zero-copy views of torch CPU tensors),
// all float32 or all float64 (the first array's dtype decides; every other
// must match), and writes its outputs in place. Everything src/ relies on is
// checked here -- dtypes, ranks, every shape against q / k / v (R (2P, H, d),
// S (2P, H), u (H, d), H and d matching q's), C-contiguity, writable
// outputs, Lk <= P and every visible (query, key) pair inside the tables --
// and reported as ValueError / TypeError naming the argument, before the GIL
// is released and the kernel runs.
#include "embkern/rel_conv_attention.h"

#include <string>

#include "common.h"

namespace embkern {
namespace {

namespace rca = embkern::rca;

// Why some visible (i, j) indexes outside the (2P)-row tables (empty: none);
// the same rule as the reference's table_range_error, in 128-bit arithmetic
// so that no q_offset overflows.
std::string table_range_error(int64_t Lq, int64_t Lk, int64_t P, bool causal, int64_t q_offset) {
  if (Lk > P)
    return "Lk = " + std::to_string(Lk) + " keys exceed max_distance = P = " + std::to_string(P) +
           " (the relative tables hold distances -P..P-1)";
  if (Lq == 0 || Lk == 0) return "";
  using I = __int128;
  const I i_max = I(Lq) - 1 + q_offset;
  const I r_min = I(P) - i_max;
  I r_max;
  if (causal) {
    if (i_max < 0) return "";  // no query sees any key
    r_max = std::min<I>(P, I(P) + (Lk - 1) - q_offset);
  } else {
    r_max = I(P) + (Lk - 1) - q_offset;
  }
  if (r_min < 0 || r_max >= I(2) * P)
    return "query positions from q_offset = " + std::to_string(q_offset) + " against " + std::to_string(Lk) +
           " keys reach relative distances outside -P..P-1 (P = " + std::to_string(P) + ")";
  return "";
}

// The shapes every attention call shares.
template <typename T>
struct Args {
  View<T> q, k, v, R, S, u;
  int64_t B, H, Lq, Lk, d, dv, P;
  Args(const py::object& q_, const py::object& k_, const py::object& v_, const py::object& R_,
       const py::object& S_, const py::object& u_, bool causal, int64_t q_offset, bool kv_rows = false) {
    // kv_rows (the forward): k and v need only be packed within each (batch, head) (view()'s lead = 2),
    // so a slice along Lk of a larger decoding-cache buffer is read in place
    const int lead = kv_rows ? 2 : 0;
    q = req<T>(q_, "q", 4);
    B = q.size(0);
    H = q.size(1);
    Lq = q.size(2);
    d = q.size(3);
    k = req<T>(k_, "k", 4, false, lead);
    expect_shape(k, "k", {B, H, -1, d});
    Lk = k.size(2);
    v = req<T>(v_, "v", 4, false, lead);
    expect_shape(v, "v", {B, H, Lk, -1});
    dv = v.size(3);
    R = req<T>(R_, "rel_emb", 3);
    if (R.size(0) <= 0 || R.size(0) % 2 != 0)
      value_error("rel_emb: expected shape (2P, H, d) with an even, positive first dimension, got 2P = " +
                  std::to_string(R.size(0)));
    P = R.size(0) / 2;
    expect_shape(R, "rel_emb", {2 * P, H, d});
    S = req<T>(S_, "rel_bias", 2);
    expect_shape(S, "rel_bias", {2 * P, H});
    u = req<T>(u_, "content_bias", 2);
    expect_shape(u, "content_bias", {H, d});
    const std::string why = table_range_error(Lq, Lk, P, causal, q_offset);
    if (!why.empty()) value_error("max_distance: " + why);
  }
  std::string what(const char* kernel) const {
    return std::string("rel_conv_attention.") + kernel + " scratch (B " + std::to_string(B) + ", H " +
           std::to_string(H) + ", Lq " + std::to_string(Lq) + ", Lk " + std::to_string(Lk) + ", d " +
           std::to_string(d) + ", dv " + std::to_string(dv) + ", " + dtype_name<T>() + ")";
  }
};

template <typename T>
void forward_t(py::object q_, py::object k_, py::object v_, py::object R_, py::object S_, py::object u_,
               py::object out_, py::object lse_, bool causal, int64_t q_offset) {
  Args<T> a(q_, k_, v_, R_, S_, u_, causal, q_offset, true);
  auto out = req<T>(out_, "out", 4, true);
  expect_shape(out, "out", {a.B, a.H, a.Lq, a.dv});
  auto lse = req<T>(lse_, "lse_out", 3, true);
  expect_shape(lse, "lse_out", {a.B, a.H, a.Lq});
  const int64_t bytes = rca::scratch_bytes(false, a.B, a.H, a.Lq, a.Lk, a.d, a.dv, int(sizeof(T)));
  const std::string what = a.what("forward");
  check_memory(bytes, what);
  run_nogil(bytes, what, [&] {
    rca::forward<T>(a.q.data, a.k.data, a.v.data, a.R.data, a.S.data, a.u.data, out.data, lse.data, a.B, a.H, a.Lq,
                    a.Lk, a.d, a.dv, a.P, causal, q_offset, a.k.lead_stride, a.v.lead_stride);
  });
}

template <typename T>
void backward_t(py::object go_, py::object q_, py::object k_, py::object v_, py::object R_, py::object S_,
                py::object u_, py::object out_, py::object lse_, py::object dq_, py::object dk_, py::object dv_,
                py::object dR_, py::object dS_, py::object du_, bool causal, int64_t q_offset) {
  Args<T> a(q_, k_, v_, R_, S_, u_, causal, q_offset);
  auto go = req<T>(go_, "grad_out", 4);
  expect_shape(go, "grad_out", {a.B, a.H, a.Lq, a.dv});
  auto out = req<T>(out_, "out", 4);
  expect_shape(out, "out", {a.B, a.H, a.Lq, a.dv});
  auto lse = req<T>(lse_, "lse", 3);
  expect_shape(lse, "lse", {a.B, a.H, a.Lq});
  auto dq = req<T>(dq_, "dq_out", 4, true);
  expect_shape(dq, "dq_out", {a.B, a.H, a.Lq, a.d});
  auto dk = req<T>(dk_, "dk_out", 4, true);
  expect_shape(dk, "dk_out", {a.B, a.H, a.Lk, a.d});
  auto dv = req<T>(dv_, "dv_out", 4, true);
  expect_shape(dv, "dv_out", {a.B, a.H, a.Lk, a.dv});
  auto dR = req<T>(dR_, "drel_emb_out", 3, true);
  expect_shape(dR, "drel_emb_out", {2 * a.P, a.H, a.d});
  auto dS = req<T>(dS_, "drel_bias_out", 2, true);
  expect_shape(dS, "drel_bias_out", {2 * a.P, a.H});
  auto du = req<T>(du_, "dcontent_bias_out", 2, true);
  expect_shape(du, "dcontent_bias_out", {a.H, a.d});
  const int64_t bytes = rca::scratch_bytes(true, a.B, a.H, a.Lq, a.Lk, a.d, a.dv, int(sizeof(T)));
  const std::string what = a.what("backward");
  check_memory(bytes, what);
  run_nogil(bytes, what, [&] {
    rca::backward<T>(go.data, a.q.data, a.k.data, a.v.data, a.R.data, a.S.data, a.u.data, out.data, lse.data,
                     dq.data, dk.data, dv.data, dR.data, dS.data, du.data, a.B, a.H, a.Lq, a.Lk, a.d, a.dv, a.P,
                     causal, q_offset);
  });
}

// x (N, T, C), weight (C, K >= 1), bias (C) or None.
template <typename T>
struct ConvArgs {
  View<T> x, w, b;
  int64_t N, T_len, C, K;
  ConvArgs(const py::object& x_, const py::object& w_, const py::object& b_) {
    x = req<T>(x_, "x", 3);
    N = x.size(0);
    T_len = x.size(1);
    C = x.size(2);
    w = req<T>(w_, "weight", 2);
    expect_shape(w, "weight", {C, -1});
    K = w.size(1);
    if (K < 1) value_error("weight: expected shape (C, K) with K >= 1 taps, got K = 0");
    if (!b_.is_none()) {
      b = req<T>(b_, "bias", 1);
      expect_shape(b, "bias", {C});
    }
  }
  std::string what(const char* kernel) const {
    return std::string("rel_conv_attention.") + kernel + " scratch (N " + std::to_string(N) + ", T " +
           std::to_string(T_len) + ", C " + std::to_string(C) + ", K " + std::to_string(K) + ")";
  }
};

template <typename T>
void conv_forward_t(py::object x_, py::object w_, py::object b_, py::object y_) {
  ConvArgs<T> a(x_, w_, b_);
  auto y = req<T>(y_, "y_out", 3, true);
  expect_shape(y, "y_out", {a.N, a.T_len, a.C});
  const int64_t bytes = rca::conv_scratch_bytes(false, a.N, a.T_len, a.C, a.K, int(sizeof(T)));
  const std::string what = a.what("conv_forward");
  check_memory(bytes, what);
  run_nogil(bytes, what, [&] { rca::conv_forward<T>(a.x.data, a.w.data, a.b.data, y.data, a.N, a.T_len, a.C, a.K); });
}

template <typename T>
void conv_backward_t(py::object gy_, py::object x_, py::object w_, py::object dx_, py::object dw_, py::object db_) {
  ConvArgs<T> a(x_, w_, py::none());
  auto gy = req<T>(gy_, "grad_y", 3);
  expect_shape(gy, "grad_y", {a.N, a.T_len, a.C});
  auto dx = req<T>(dx_, "dx_out", 3, true);
  expect_shape(dx, "dx_out", {a.N, a.T_len, a.C});
  auto dw = req<T>(dw_, "dweight_out", 2, true);
  expect_shape(dw, "dweight_out", {a.C, a.K});
  View<T> db;
  if (!db_.is_none()) {
    db = req<T>(db_, "dbias_out", 1, true);
    expect_shape(db, "dbias_out", {a.C});
  }
  const int64_t bytes = rca::conv_scratch_bytes(true, a.N, a.T_len, a.C, a.K, int(sizeof(T)));
  const std::string what = a.what("conv_backward");
  check_memory(bytes, what);
  run_nogil(bytes, what, [&] {
    rca::conv_backward<T>(gy.data, a.x.data, a.w.data, dx.data, dw.data, db.data, a.N, a.T_len, a.C, a.K);
  });
}

}  // namespace

void register_rel_conv_attention(py::module_& m) {
  using py::arg;
  m.def(
      "forward",
      [](py::object q, py::object k, py::object v, py::object R, py::object S, py::object u, py::object out,
         py::object lse_out, bool causal, int64_t q_offset) {
        if (float_kind(q, "q") == FloatKind::F32) return forward_t<float>(q, k, v, R, S, u, out, lse_out, causal, q_offset);
        return forward_t<double>(q, k, v, R, S, u, out, lse_out, causal, q_offset);
      },
      arg("q"), arg("k"), arg("v"), arg("rel_emb"), arg("rel_bias"), arg("content_bias"), arg("out"),
      arg("lse_out"), arg("causal"), arg("q_offset"),
      "out (B, H, Lq, dv), lse_out (B, H, Lq) of Transformer-XL relative attention; q (B, H, Lq, d), "
      "k (B, H, Lk, d), v (B, H, Lk, dv), rel_emb (2P, H, d), rel_bias (2P, H), content_bias (H, d); "
      "key j visible to query i iff not causal or j <= i + q_offset. All float32 or all float64, C-contiguous "
      "(k and v: within each (batch, head), so a slice [:, :, a:b] of a (B, H, capacity, d) buffer is read "
      "in place).");
  m.def(
      "backward",
      [](py::object go, py::object q, py::object k, py::object v, py::object R, py::object S, py::object u,
         py::object out, py::object lse, py::object dq, py::object dk, py::object dv, py::object dR, py::object dS,
         py::object du, bool causal, int64_t q_offset) {
        if (float_kind(q, "q") == FloatKind::F32)
          return backward_t<float>(go, q, k, v, R, S, u, out, lse, dq, dk, dv, dR, dS, du, causal, q_offset);
        return backward_t<double>(go, q, k, v, R, S, u, out, lse, dq, dk, dv, dR, dS, du, causal, q_offset);
      },
      arg("grad_out"), arg("q"), arg("k"), arg("v"), arg("rel_emb"), arg("rel_bias"), arg("content_bias"),
      arg("out"), arg("lse"), arg("dq_out"), arg("dk_out"), arg("dv_out"), arg("drel_emb_out"),
      arg("drel_bias_out"), arg("dcontent_bias_out"), arg("causal"), arg("q_offset"),
      "Gradients of sum(grad_out * out) into dq_out, dk_out, dv_out, drel_emb_out, drel_bias_out and "
      "dcontent_bias_out (shapes of q, k, v, rel_emb, rel_bias, content_bias), from forward's out and lse.");
  m.def(
      "conv_forward",
      [](py::object x, py::object w, py::object b, py::object y) {
        if (float_kind(x, "x") == FloatKind::F32) return conv_forward_t<float>(x, w, b, y);
        return conv_forward_t<double>(x, w, b, y);
      },
      arg("x"), arg("weight"), arg("bias"), arg("y_out"),
      "y_out (N, T, C) = causal depthwise convolution of x (N, T, C) with weight (C, K) (taps oldest first) "
      "and bias (C) or None.");
  m.def(
      "conv_backward",
      [](py::object gy, py::object x, py::object w, py::object dx, py::object dw, py::object db) {
        if (float_kind(x, "x") == FloatKind::F32) return conv_backward_t<float>(gy, x, w, dx, dw, db);
        return conv_backward_t<double>(gy, x, w, dx, dw, db);
      },
      arg("grad_y"), arg("x"), arg("weight"), arg("dx_out"), arg("dweight_out"), arg("dbias_out"),
      "dx_out (N, T, C), dweight_out (C, K) and dbias_out (C, or None to skip) of sum(grad_y * y).");
}

}  // namespace embkern
