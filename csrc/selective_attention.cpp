// Bindings for src/cpu/selective_attention.cpp: embkern._C.selective_attention.*
//
// Every function takes numpy arrays (zero-copy views of torch CPU tensors),
// all float32 or all float64 (q's dtype decides; every other array must
// match), None for an absent tau_v (and its gradient), and writes its outputs
// in place. Everything src/ relies on is checked here -- dtypes, ranks, every
// shape against q / k / v, C-contiguity (the forward's k, v, tau_v: within each
// kv head), writable outputs, Hq a multiple of
// Hkv, a finite scale -- and reported as ValueError / TypeError naming the
// argument, before the GIL is released and the kernel runs.
#include "embkern/selective_attention.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "common.h"

namespace embkern {
namespace {

namespace ssa = embkern::ssa;

// The shapes every call shares, from q (B, Hq, Lq, d), k (B, Hkv, Lk, d),
// v (B, Hkv, Lk, dv), tau_q (B, Hq, Lq) and tau_v (B, Hkv, Lk) or None.
// kv_rows (the forward): k, v and tau_v need only be packed within each kv
// head (view()'s `lead` = 2), so a slice of a larger cache buffer is read in place.
template <typename T>
struct Args {
  View<T> q, k, v, tq, tv;
  int64_t B, Hq, Hkv, Lq, Lk, d, dv;
  Args(const py::object& q_, const py::object& k_, const py::object& v_, const py::object& tq_,
       const py::object& tv_, double scale, bool kv_rows = false) {
    const int lead = kv_rows ? 2 : 0;
    q = req<T>(q_, "q", 4);
    B = q.size(0);
    Hq = q.size(1);
    Lq = q.size(2);
    d = q.size(3);
    k = req<T>(k_, "k", 4, false, lead);
    Hkv = k.size(1);
    Lk = k.size(2);
    expect_shape(k, "k", {B, -1, -1, d});
    if (Hkv <= 0 || Hq % Hkv != 0) {
      value_error("k: expected Hkv = k.shape[1] > 0 dividing Hq = q.shape[1] = " + std::to_string(Hq) +
                  " (grouped-query attention), got Hkv = " + std::to_string(Hkv));
    }
    v = req<T>(v_, "v", 4, false, lead);
    expect_shape(v, "v", {B, Hkv, Lk, -1});
    dv = v.size(3);
    tq = req<T>(tq_, "tau_q", 3);
    expect_shape(tq, "tau_q", {B, Hq, Lq});
    if (!tv_.is_none()) {
      tv = req<T>(tv_, "tau_v", 3, false, lead);
      expect_shape(tv, "tau_v", {B, Hkv, Lk});
    }
    if (!std::isfinite(scale)) value_error("scale: expected a finite float, got " + std::to_string(scale));
  }
  std::string what(const char* kernel) const {
    return std::string("selective_attention.") + kernel + " scratch (B " + std::to_string(B) + ", Hq " +
           std::to_string(Hq) + ", Lq " + std::to_string(Lq) + ", d " + std::to_string(d) + ", dv " +
           std::to_string(dv) + ", " + dtype_name<T>() + ")";
  }
};

// Any q_offset >= Lk shows every key to every query and any q_offset <= -Lq none, so clamping to
// [-Lq, Lk] changes no value; it keeps i + q_offset and j - q_offset inside int64 in the kernels
// (q_offset = 2^63 - 1 overflowed there, undefined behaviour).
int64_t clamp_offset(int64_t q_offset, int64_t Lq, int64_t Lk) { return std::max(-Lq, std::min(Lk, q_offset)); }

template <typename T>
void forward_t(py::object q_, py::object k_, py::object v_, py::object tq_, py::object tv_, py::object out_,
               py::object lse_, bool causal, double scale, int64_t q_offset) {
  Args<T> a(q_, k_, v_, tq_, tv_, scale, true);
  auto out = req<T>(out_, "out", 4, true);
  expect_shape(out, "out", {a.B, a.Hq, a.Lq, a.dv});
  auto lse = req<T>(lse_, "lse_out", 3, true);
  expect_shape(lse, "lse_out", {a.B, a.Hq, a.Lq});
  const int64_t bytes = ssa::scratch_bytes(false, a.B, a.Hq, a.Lq, a.d, a.dv, int(sizeof(T)));
  const std::string what = a.what("forward");
  check_memory(bytes, what);
  run_nogil(bytes, what, [&] {
    ssa::forward<T>(a.q.data, a.k.data, a.v.data, a.tq.data, a.tv.data, out.data, lse.data, a.B, a.Hq, a.Hkv, a.Lq,
                    a.Lk, a.d, a.dv, causal, scale, clamp_offset(q_offset, a.Lq, a.Lk), a.k.lead_stride,
                    a.v.lead_stride, a.tv.lead_stride);
  });
}

template <typename T>
void backward_t(py::object go_, py::object q_, py::object k_, py::object v_, py::object tq_, py::object tv_,
                py::object out_, py::object lse_, py::object dq_, py::object dk_, py::object dv_, py::object dtq_,
                py::object dtv_, bool causal, double scale, int64_t q_offset) {
  Args<T> a(q_, k_, v_, tq_, tv_, scale);
  auto go = req<T>(go_, "grad_out", 4);
  expect_shape(go, "grad_out", {a.B, a.Hq, a.Lq, a.dv});
  auto out = req<T>(out_, "out", 4);
  expect_shape(out, "out", {a.B, a.Hq, a.Lq, a.dv});
  auto lse = req<T>(lse_, "lse", 3);
  expect_shape(lse, "lse", {a.B, a.Hq, a.Lq});
  auto dq = req<T>(dq_, "dq_out", 4, true);
  expect_shape(dq, "dq_out", {a.B, a.Hq, a.Lq, a.d});
  auto dk = req<T>(dk_, "dk_out", 4, true);
  expect_shape(dk, "dk_out", {a.B, a.Hkv, a.Lk, a.d});
  auto dv = req<T>(dv_, "dv_out", 4, true);
  expect_shape(dv, "dv_out", {a.B, a.Hkv, a.Lk, a.dv});
  auto dtq = req<T>(dtq_, "dtau_q_out", 3, true);
  expect_shape(dtq, "dtau_q_out", {a.B, a.Hq, a.Lq});
  View<T> dtv;
  if (!tv_.is_none()) {
    if (dtv_.is_none()) value_error("dtau_v_out: expected an array when tau_v is given, got None");
    dtv = req<T>(dtv_, "dtau_v_out", 3, true);
    expect_shape(dtv, "dtau_v_out", {a.B, a.Hkv, a.Lk});
  } else if (!dtv_.is_none()) {
    value_error("dtau_v_out: expected None when tau_v is None");
  }
  const int64_t bytes = ssa::scratch_bytes(true, a.B, a.Hq, a.Lq, a.d, a.dv, int(sizeof(T)));
  const std::string what = a.what("backward");
  check_memory(bytes, what);
  run_nogil(bytes, what, [&] {
    ssa::backward<T>(go.data, a.q.data, a.k.data, a.v.data, a.tq.data, a.tv.data, out.data, lse.data, dq.data,
                     dk.data, dv.data, dtq.data, dtv.data, a.B, a.Hq, a.Hkv, a.Lq, a.Lk, a.d, a.dv, causal, scale,
                     clamp_offset(q_offset, a.Lq, a.Lk));
  });
}

}  // namespace

void register_selective_attention(py::module_& m) {
  using py::arg;
  m.def(
      "forward",
      [](py::object q, py::object k, py::object v, py::object tau_q, py::object tau_v, py::object out,
         py::object lse_out, bool causal, double scale, int64_t q_offset) {
        if (float_kind(q, "q") == FloatKind::F32)
          return forward_t<float>(q, k, v, tau_q, tau_v, out, lse_out, causal, scale, q_offset);
        return forward_t<double>(q, k, v, tau_q, tau_v, out, lse_out, causal, scale, q_offset);
      },
      arg("q"), arg("k"), arg("v"), arg("tau_q"), arg("tau_v"), arg("out"), arg("lse_out"), arg("causal"),
      arg("scale"), arg("q_offset"),
      "out (B, Hq, Lq, dv), lse_out (B, Hq, Lq) of selective attention; q (B, Hq, Lq, d), k (B, Hkv, Lk, d), "
      "v (B, Hkv, Lk, dv), tau_q (B, Hq, Lq), tau_v (B, Hkv, Lk) or None; key j visible to query i iff "
      "not causal or j <= i + q_offset. All float32 or all float64, C-contiguous; k, v and tau_v may also be "
      "slices along Lk of larger C-contiguous buffers (read in place).");
  m.def(
      "backward",
      [](py::object grad_out, py::object q, py::object k, py::object v, py::object tau_q, py::object tau_v,
         py::object out, py::object lse, py::object dq, py::object dk, py::object dv, py::object dtau_q,
         py::object dtau_v, bool causal, double scale, int64_t q_offset) {
        if (float_kind(q, "q") == FloatKind::F32)
          return backward_t<float>(grad_out, q, k, v, tau_q, tau_v, out, lse, dq, dk, dv, dtau_q, dtau_v, causal,
                                   scale, q_offset);
        return backward_t<double>(grad_out, q, k, v, tau_q, tau_v, out, lse, dq, dk, dv, dtau_q, dtau_v, causal,
                                  scale, q_offset);
      },
      arg("grad_out"), arg("q"), arg("k"), arg("v"), arg("tau_q"), arg("tau_v"), arg("out"), arg("lse"),
      arg("dq_out"), arg("dk_out"), arg("dv_out"), arg("dtau_q_out"), arg("dtau_v_out"), arg("causal"),
      arg("scale"), arg("q_offset"),
      "Gradients of sum(grad_out * out) into dq_out, dk_out, dv_out (shapes of q, k, v), dtau_q_out (B, Hq, Lq) "
      "and dtau_v_out (B, Hkv, Lk; None when tau_v is None), from forward's out and lse.");
}

}  // namespace embkern
