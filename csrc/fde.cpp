// Bindings for src/cpu/fde.cpp: table generators and the CPU encoder.
// Buffers come in through the buffer protocol (numpy, or torch CPU tensors via
// .numpy()); every size and range is re-checked here before src/ runs.
#include "embkern/fde.h"

#include <memory>
#include <string>

#include "common.h"

namespace embkern {
namespace {

void check_sizes(int64_t d, int64_t R, int k, int64_t dp) {
  if (d <= 0) value_error("dimension: expected > 0, got " + std::to_string(d));
  if (R <= 0) value_error("num_repetitions: expected >= 1, got " + std::to_string(R));
  if (k < 0 || k > 30) value_error("num_simhash_projections: expected 0 <= k <= 30, got " + std::to_string(k));
  if (dp <= 0 || dp > 0xffffffffLL) value_error("projection_dimension: expected in [1, 2^32), got " + std::to_string(dp));
}

uint32_t as_seed(int64_t seed) {
  if (seed < -(int64_t(1) << 31) || seed >= (int64_t(1) << 32))
    value_error("seed: expected an int in [-2^31, 2^32), got " + std::to_string(seed));
  return uint32_t(seed);
}

py::array_t<float> simhash_table(int64_t seed, int64_t d, int k, int64_t R) {
  check_sizes(d, R, k, 1);
  py::array_t<float> out({R, d, int64_t(k)});
  float* p = out.mutable_data();
  const uint32_t s = as_seed(seed);
  {
    py::gil_scoped_release nogil;
    fde::simhash_table(s, d, k, R, p);
  }
  return out;
}

py::tuple ams_table(int64_t seed, int64_t d, int64_t dp, int64_t R) {
  check_sizes(d, R, 0, dp);
  py::array_t<int32_t> idx({R, d});
  py::array_t<float> sgn({R, d});
  int32_t* pi = idx.mutable_data();
  float* ps = sgn.mutable_data();
  const uint32_t s = as_seed(seed);
  {
    py::gil_scoped_release nogil;
    fde::ams_table(s, d, dp, R, pi, ps);
  }
  return py::make_tuple(idx, sgn);
}

py::tuple count_sketch_table(int64_t seed, int64_t length, int64_t D) {
  if (length < 0) value_error("length: expected >= 0, got " + std::to_string(length));
  if (D <= 0 || D > 0x7fffffffLL) value_error("final_projection_dimension: expected in [1, 2^31), got " + std::to_string(D));
  py::array_t<int32_t> idx(length);
  py::array_t<float> sgn(length);
  int32_t* pi = idx.mutable_data();
  float* ps = sgn.mutable_data();
  const uint32_t s = as_seed(seed);
  {
    py::gil_scoped_release nogil;
    fde::count_sketch_table(s, length, D, pi, ps);
  }
  return py::make_tuple(idx, sgn);
}

py::tuple count_sketch_csr(py::buffer bucket_buf, int64_t D) {
  auto bucket = view<int32_t>(bucket_buf, "bucket", 1);
  if (D <= 0) value_error("final_projection_dimension: expected > 0, got " + std::to_string(D));
  const int64_t L = bucket.size(0);
  for (int64_t i = 0; i < L; ++i)
    if (bucket.data[i] < 0 || bucket.data[i] >= D)
      value_error("bucket: expected values in [0, " + std::to_string(D) + "), got " + std::to_string(bucket.data[i]) +
                  " at " + std::to_string(i));
  py::array_t<int64_t> off(D + 1);
  py::array_t<int64_t> mem(L);
  int64_t* po = off.mutable_data();
  int64_t* pm = mem.mutable_data();
  {
    py::gil_scoped_release nogil;
    fde::count_sketch_csr(bucket.data, L, D, po, pm);
  }
  return py::make_tuple(off, mem);
}

// Prepared tables of one config; keeps the borrowed count-sketch arrays alive.
struct Plan {
  fde::Prepared prep;
  py::object keep_bucket, keep_sign;
  ~Plan() { fde::release(&prep); }
};

std::unique_ptr<Plan> make_plan(int64_t d, int64_t R, int k, int64_t dp, bool is_document, bool fill,
                                int64_t final_dim, py::buffer simhash, py::object ams_index, py::object ams_sign,
                                py::object cs_bucket, py::object cs_sign) {
  check_sizes(d, R, k, dp);
  if (fill && !is_document) value_error("fill_empty_partitions: query encodings do not support fill");
  if (final_dim < 0) value_error("final_projection_dimension: expected > 0 (or 0 for none), got " + std::to_string(final_dim));
  auto G = view<float>(simhash, "simhash", 3);
  expect_shape(G, "simhash", {R, d, int64_t(k)});
  const int32_t* ai = nullptr;
  const float* as = nullptr;
  if (!ams_index.is_none() || !ams_sign.is_none()) {
    if (ams_index.is_none() || ams_sign.is_none()) value_error("ams_index, ams_sign: expected both or neither");
    auto I = view<int32_t>(ams_index.cast<py::buffer>(), "ams_index", 2);
    auto S = view<float>(ams_sign.cast<py::buffer>(), "ams_sign", 2);
    expect_shape(I, "ams_index", {R, d});
    expect_shape(S, "ams_sign", {R, d});
    ai = I.data;
    as = S.data;
  } else if (dp != d) {
    value_error("projection_dimension: the identity projection needs d_p == d = " + std::to_string(d) + ", got " +
                std::to_string(dp));
  }
  auto plan = std::make_unique<Plan>();
  plan->prep.d = d;
  plan->prep.R = R;
  plan->prep.k = k;
  plan->prep.dp = dp;
  plan->prep.is_document = is_document;
  plan->prep.fill = fill;
  plan->prep.final_dim = final_dim;
  const int64_t L = fde::row_length(plan->prep);
  const int32_t* cb = nullptr;
  const float* cs = nullptr;
  if (final_dim > 0) {
    if (cs_bucket.is_none() || cs_sign.is_none()) value_error("cs_bucket, cs_sign: required with a final projection");
    auto CB = view<int32_t>(cs_bucket.cast<py::buffer>(), "cs_bucket", 1);
    auto CS = view<float>(cs_sign.cast<py::buffer>(), "cs_sign", 1);
    expect_shape(CB, "cs_bucket", {L});
    expect_shape(CS, "cs_sign", {L});
    for (int64_t i = 0; i < L; ++i)
      if (CB.data[i] < 0 || CB.data[i] >= final_dim)
        value_error("cs_bucket: expected values in [0, " + std::to_string(final_dim) + "), got " +
                    std::to_string(CB.data[i]));
    cb = CB.data;
    cs = CS.data;
    plan->keep_bucket = cs_bucket;
    plan->keep_sign = cs_sign;
  }
  std::string err;
  if (!fde::prepare(&plan->prep, G.data, ai, as, cb, cs, &err)) value_error("fde tables: " + err);
  return plan;
}

void encode(const Plan& plan, py::buffer points_buf, py::buffer offsets_buf, py::buffer out_buf) {
  const fde::Prepared& P = plan.prep;
  auto X = view<float>(points_buf, "points", 2);
  auto off = view<int64_t>(offsets_buf, "offsets", 1);
  auto out = view<float>(out_buf, "out", 2, true);
  if (X.size(1) != P.d)
    value_error("points: expected shape (N, " + std::to_string(P.d) + ") (the config's dimension), got (" +
                std::to_string(X.size(0)) + ", " + std::to_string(X.size(1)) + ")");
  if (off.size(0) < 1) value_error("offsets: expected B+1 >= 1 entries, got 0");
  const int64_t B = off.size(0) - 1, N = X.size(0);
  if (off.data[0] != 0) value_error("offsets: expected offsets[0] == 0, got " + std::to_string(off.data[0]));
  for (int64_t b = 0; b < B; ++b)
    if (off.data[b + 1] < off.data[b])
      value_error("offsets: expected non-decreasing offsets, got offsets[" + std::to_string(b + 1) + "] = " +
                  std::to_string(off.data[b + 1]) + " < offsets[" + std::to_string(b) + "] = " +
                  std::to_string(off.data[b]));
  if (off.data[B] != N)
    value_error("offsets: expected offsets[-1] == N_total = " + std::to_string(N) + ", got " +
                std::to_string(off.data[B]));
  expect_shape(out, "out", {B, fde::output_length(P)});
  int64_t bad;
  {
    py::gil_scoped_release nogil;
    bad = fde::encode(P, X.data, off.data, B, out.data);
  }
  if (bad >= 0)
    value_error("points: expected finite values, found NaN or inf in row " + std::to_string(bad) +
                " (NaN would hash to bit 0 and propagate into its partition); out is left partly written");
}

}  // namespace

void register_fde(py::module_& m) {
  m.def("simhash_table", &simhash_table, py::arg("seed"), py::arg("dimension"), py::arg("num_simhash"),
        py::arg("num_repetitions"), "SimHash Gaussians float32 (R, d, k) (spec RNG, bit-exact)");
  m.def("ams_table", &ams_table, py::arg("seed"), py::arg("dimension"), py::arg("projection_dim"),
        py::arg("num_repetitions"), "AMS sketch (index int32 (R, d), sign float32 (R, d))");
  m.def("count_sketch_table", &count_sketch_table, py::arg("seed"), py::arg("length"), py::arg("final_dim"),
        "count sketch (bucket int32 (L,), sign float32 (L,))");
  m.def("count_sketch_csr", &count_sketch_csr, py::arg("bucket"), py::arg("final_dim"),
        "bucket -> input CSR (offsets int64 (D+1,), members int64 (L,), ascending within a bucket)");
  py::class_<Plan>(m, "Plan", "Prepared tables of one FDE config (built once, reused by encode)")
      .def(py::init(&make_plan), py::arg("dimension"), py::arg("num_repetitions"), py::arg("num_simhash"),
           py::arg("projection_dim"), py::arg("is_document"), py::arg("fill_empty_partitions"),
           py::arg("final_dim"), py::arg("simhash"), py::arg("ams_index") = py::none(),
           py::arg("ams_sign") = py::none(), py::arg("cs_bucket") = py::none(), py::arg("cs_sign") = py::none())
      .def_property_readonly("output_dimension", [](const Plan& p) { return fde::output_length(p.prep); });
  m.def("encode", &encode, py::arg("plan"), py::arg("points"), py::arg("offsets"), py::arg("out"),
        "FDE of B point clouds: points float32 (N, d), offsets int64 (B+1,) -> out float32 (B, D_out)");
}

}  // namespace embkern
