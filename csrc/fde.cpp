// Bindings for src/cpu/fde.cpp: table generators and the CPU encoder.
// Buffers come in through the buffer protocol (numpy, or torch CPU tensors via
// .numpy()); every size and range is re-checked here before src/ runs.
#include "embkern/fde.h"

#include <memory>
#include <string>

#include "common.h"
#include "fde_checks.h"

namespace embkern {
namespace {

using fde_checks::check_projection;

// The one check of each FDE size at this boundary (tables and plans alike).
void check_sizes(int64_t d, int64_t R, int64_t k, int64_t dp) {
  fde_checks::check_dimension(d);
  fde_checks::check_repetitions(R);
  fde_checks::check_simhash_k(k);
  check_projection(dp, "projection_dimension");
}

std::string config_str(int64_t d, int64_t R, int64_t k, int64_t dp, int64_t final_dim) {
  return "FDE config (dimension " + std::to_string(d) + ", num_repetitions " + std::to_string(R) +
         ", num_simhash_projections " + std::to_string(k) + ", projection_dimension " + std::to_string(dp) +
         (final_dim > 0 ? ", final_projection_dimension " + std::to_string(final_dim) : std::string()) + ")";
}

// L = R * 2^k * d_p, checked to stay below fde::kMaxRowLength (2^61).
int64_t checked_row_length(int64_t d, int64_t R, int64_t k, int64_t dp, int64_t final_dim) {
  int64_t L;
  if (__builtin_mul_overflow(R, int64_t(1) << k, &L) || __builtin_mul_overflow(L, dp, &L) || L >= fde::kMaxRowLength)
    value_error(config_str(d, R, k, dp, final_dim) + ": R * 2^k * d_p values per row is 2^61 or more");
  return L;
}

uint32_t as_seed(int64_t seed) {
  if (seed < -(int64_t(1) << 31) || seed >= (int64_t(1) << 32))
    value_error("seed: expected an int in [-2^31, 2^32), got " + std::to_string(seed));
  return uint32_t(seed);
}

py::array_t<float> simhash_table(int64_t seed, int64_t d, int64_t k, int64_t R) {
  check_sizes(d, R, k, 1);
  checked_bytes({R, d, k}, 4, "simhash table float32 (R, d, k) = (" + std::to_string(R) + ", " + std::to_string(d) +
                                ", " + std::to_string(k) + ")");
  py::array_t<float> out({R, d, k});
  float* p = out.mutable_data();
  const uint32_t s = as_seed(seed);
  {
    py::gil_scoped_release nogil;
    fde::simhash_table(s, d, int(k), R, p);
  }
  return out;
}

py::tuple ams_table(int64_t seed, int64_t d, int64_t dp, int64_t R) {
  check_sizes(d, R, 0, dp);
  checked_bytes({R, d}, 8, "AMS table int32 + float32 (R, d) = (" + std::to_string(R) + ", " + std::to_string(d) + ")");
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
  check_projection(D, "final_projection_dimension");
  checked_bytes({length}, 8, "count-sketch table int32 + float32 of length " + std::to_string(length));
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
  check_projection(D, "final_projection_dimension");
  const int64_t L = bucket.size(0);
  check_indices(bucket.data, L, D, "bucket", "values");
  const int64_t bytes = checked_bytes({D + 1 + L}, 8, "count-sketch CSR int64 (D+1 + L = " + std::to_string(D + 1 + L) + ")");
  py::array_t<int64_t> off(D + 1);
  py::array_t<int64_t> mem(L);
  int64_t* po = off.mutable_data();
  int64_t* pm = mem.mutable_data();
  run_nogil(bytes, "count_sketch_csr", [&] { fde::count_sketch_csr(bucket.data, L, D, po, pm); });
  return py::make_tuple(off, mem);
}

// Prepared tables of one config, owned by its fde::Prepared. prepare() copies
// all it keeps, so nothing of the caller's arrays is referenced after the
// constructor returns.
struct Plan {
  fde::Prepared prep;
};

std::unique_ptr<Plan> make_plan(int64_t d, int64_t R, int64_t k, int64_t dp, bool is_document, bool fill,
                                int64_t final_dim, py::buffer simhash, py::object ams_index, py::object ams_sign,
                                py::object cs_bucket, py::object cs_sign) {
  check_sizes(d, R, k, dp);
  fde_checks::check_fill(fill, is_document);
  if (final_dim != 0) check_projection(final_dim, "final_projection_dimension (0 for none)");
  const int64_t L = checked_row_length(d, R, k, dp, final_dim);
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
    check_indices(I.data, R * d, dp, "ams_index", "values");
    ai = I.data;
    as = S.data;
  } else {
    fde_checks::check_identity(dp, d, "projection_dimension");
  }
  auto plan = std::make_unique<Plan>();
  plan->prep.d = d;
  plan->prep.R = R;
  plan->prep.k = int(k);
  plan->prep.dp = dp;
  plan->prep.is_document = is_document;
  plan->prep.fill = fill;
  plan->prep.final_dim = final_dim;
  const int32_t* cb = nullptr;
  const float* cs = nullptr;
  if (final_dim > 0) {
    if (cs_bucket.is_none() || cs_sign.is_none()) value_error("cs_bucket, cs_sign: required with a final projection");
    auto CB = view<int32_t>(cs_bucket.cast<py::buffer>(), "cs_bucket", 1);
    auto CS = view<float>(cs_sign.cast<py::buffer>(), "cs_sign", 1);
    expect_shape(CB, "cs_bucket", {L});
    expect_shape(CS, "cs_sign", {L});
    check_indices(CB.data, L, final_dim, "cs_bucket", "values");
    cb = CB.data;
    cs = CS.data;
  }
  const int64_t bytes = fde::prepare_bytes(plan->prep);
  const std::string what = config_str(d, R, k, dp, final_dim) + ": prepared tables";
  check_memory(bytes, what);
  // With the GIL held: prepare reads the caller's arrays, which another
  // Python thread could otherwise resize while it copies them.
  try {
    fde::prepare(&plan->prep, G.data, ai, as, cb, cs);
  } catch (const std::bad_alloc&) {
    memory_error(what + ": allocating " + gb(bytes) + " failed (out of memory)");
  }
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
  check_csr_offsets(off.data, B, N, "offsets", "N_total");
  expect_shape(out, "out", {B, fde::output_length(P)});
  const int64_t bytes = fde::encode_scratch_bytes(P, off.data, B);
  const std::string what = config_str(P.d, P.R, P.k, P.dp, P.final_dim) + ": encode scratch for " +
                           std::to_string(B) + " documents";
  check_memory(bytes, what);
  int64_t bad = -1;
  run_nogil(bytes, what, [&] { bad = fde::encode(P, X.data, off.data, B, out.data); });
  // "the output buffer": it may be the caller's `out` or one the Python layer allocated
  if (bad >= 0)
    value_error("points: expected finite values, found NaN or inf in row " + std::to_string(bad) +
                " (NaN would hash to bit 0 and propagate into its partition); the output buffer is left "
                "partly written");
}

}  // namespace

void register_fde(py::module_& m) {
  m.def("simhash_table", &simhash_table, py::arg("seed"), py::arg("dimension"), py::arg("num_simhash"),
        py::arg("num_repetitions"), "SimHash Gaussians float32 (R, d, k) (the RNG of docs/ops/fde.md, bit-exact)");
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
