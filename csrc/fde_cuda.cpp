// Bindings for src/cuda/fde.cu: embkern._C_cuda.fde.
//
// Python (python/embkern/ops/_fde_cuda.py) describes one encode call as one
// Problem object with named fields: each device buffer an ArrayView (data
// pointer, element count, dtype name) taken from a torch tensor, the config
// sizes, and a host copy of the document offsets (the chunk planner and the
// checks below read it). Everything fde_cuda.h lists as a precondition is
// checked here and named in the ValueError / TypeError; CUDA failures become
// RuntimeError with cudaGetErrorString text. No math here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>

#include "common.h"
#include "cuda_args.h"
#include "embkern/fde.h"
#include "embkern/fde_cuda.h"
#include "fde_checks.h"

namespace embkern {
namespace {

using cuda_args::ArrayView;
using cuda_args::checked_ptr;

// The arguments of one encode call, by name.
struct Problem {
  std::optional<ArrayView> points;   // float32 (N, d)
  int64_t num_points = 0;            // N
  int64_t dimension = 0;             // d
  std::optional<ArrayView> offsets;  // int64 (B+1,)
  py::object offsets_host;           // int64 (B+1,) host buffer, the same values
  int64_t num_repetitions = 0;
  int64_t num_simhash_projections = 0;
  int64_t projection_dim = 0;
  bool is_document = false;
  bool fill_empty_partitions = false;
  std::optional<int64_t> final_projection_dimension;
  std::optional<ArrayView> simhash;            // float32 (R, d, k)
  std::optional<ArrayView> ams_index;          // int32 (R, d), or None (identity)
  std::optional<ArrayView> ams_sign;           // float32 (R, d), or None
  std::optional<ArrayView> cs_bucket_offsets;  // int64 (D+1,), with a final projection
  std::optional<ArrayView> cs_bucket_members;  // int64 (L,)
  std::optional<ArrayView> cs_bucket_signs;    // float32 (L,)
  int64_t chunk_budget_bytes = int64_t(128) << 20;
};

// Builds fde_cuda::Problem from the arguments, checking every precondition of
// fde_cuda.h; `offsets_host` (a view of a.offsets_host) must outlive its use.
fde_cuda::Problem make_problem(const Problem& a, View<int64_t>* offsets_host) {
  const int64_t d = a.dimension, N = a.num_points, R = a.num_repetitions, k = a.num_simhash_projections,
                dp = a.projection_dim;
  fde_checks::check_dimension(d, fde_cuda::kMaxDimension);
  if (N < 0) value_error("num_points: expected >= 0, got " + std::to_string(N));
  fde_checks::check_repetitions(R, fde_cuda::kMaxRepetitions);
  fde_checks::check_simhash_k(k);
  fde_checks::check_projection(dp, "projection_dim", fde_cuda::kMaxProjectionDim);
  fde_checks::check_fill(a.fill_empty_partitions, a.is_document);
  const int64_t D = a.final_projection_dimension.value_or(0);
  if (a.final_projection_dimension && D <= 0)
    value_error("final_projection_dimension: expected > 0 or None, got " + std::to_string(D));
  if (a.chunk_budget_bytes <= 0)
    value_error("chunk_budget_bytes: expected > 0, got " + std::to_string(a.chunk_budget_bytes));

  fde_cuda::Problem p;
  p.points = checked_ptr<const float>(a.points, "points", sat_mul(N, d), "num_points * dimension");
  if (a.offsets_host.is_none()) value_error("offsets_host: required, got None");
  *offsets_host = req<int64_t>(a.offsets_host, "offsets_host", 1);
  const int64_t B = offsets_host->size(0) - 1;
  if (B < 0) value_error("offsets_host: expected B+1 >= 1 entries, got 0");
  p.offsets = checked_ptr<const int64_t>(a.offsets, "offsets", B + 1, "B + 1, the length of offsets_host");
  check_csr_offsets(offsets_host->data, B, N, "offsets", "N_total", fde_cuda::kMaxDocPoints);
  if (!fde_cuda::fde_fits_one_launch(N, R))
    value_error("points: " + std::to_string(N) + " points x " + std::to_string(R) +
                " repetitions exceed one launch; encode in smaller batches");
  std::string err;
  const int64_t L = fde_cuda::fde_row_length(R, int(k), dp, &err);
  if (L < 0) value_error(err);

  if (k > 0 || a.simhash) p.simhash = checked_ptr<const float>(a.simhash, "simhash", sat_mul(sat_mul(R, d), k), "R * d * k");
  if (a.ams_index || a.ams_sign) {
    p.ams_index = checked_ptr<const int32_t>(a.ams_index, "ams_index", sat_mul(R, d), "R * d");
    p.ams_sign = checked_ptr<const float>(a.ams_sign, "ams_sign", sat_mul(R, d), "R * d");  // R * d >= 1: set
  } else {
    fde_checks::check_identity(dp, d, "projection_dim");
  }
  if (D > 0) {
    p.cs_offsets = checked_ptr<const int64_t>(a.cs_bucket_offsets, "cs_bucket_offsets", D + 1,
                                              "final_projection_dimension + 1");
    p.cs_members = checked_ptr<const int64_t>(a.cs_bucket_members, "cs_bucket_members", L, "R * 2^k * projection_dim");
    p.cs_signs = checked_ptr<const float>(a.cs_bucket_signs, "cs_bucket_signs", L, "R * 2^k * projection_dim");
    p.cs_len = L;
  }
  p.num_points = N;
  p.dim = d;
  p.offsets_host = offsets_host->data;
  p.num_docs = B;
  p.num_repetitions = R;
  p.num_simhash = int(k);
  p.projection_dim = dp;
  p.is_document = a.is_document;
  p.fill_empty = a.fill_empty_partitions;
  p.final_dim = D;
  p.chunk_budget_bytes = a.chunk_budget_bytes;
  return p;
}

int64_t workspace_bytes(const fde_cuda::Problem& p) {
  std::string err;
  const int64_t bytes = fde_cuda::fde_workspace_bytes(p, &err);
  if (bytes < 0) value_error(err);
  return bytes;
}

}  // namespace

void register_fde_cuda(py::module_& m) {
  py::class_<Problem>(m, "Problem",
                      "The arguments of one encode call: device buffers as ArrayView (None when absent), the "
                      "config, and the document offsets on the host (offsets_host, a 1-d int64 buffer)")
      .def(py::init([](std::optional<ArrayView> points, int64_t num_points, int64_t dimension,
                       std::optional<ArrayView> offsets, py::object offsets_host, int64_t num_repetitions,
                       int64_t num_simhash_projections, int64_t projection_dim, bool is_document,
                       bool fill_empty_partitions, std::optional<int64_t> final_projection_dimension,
                       std::optional<ArrayView> simhash, std::optional<ArrayView> ams_index,
                       std::optional<ArrayView> ams_sign, std::optional<ArrayView> cs_bucket_offsets,
                       std::optional<ArrayView> cs_bucket_members, std::optional<ArrayView> cs_bucket_signs,
                       int64_t chunk_budget_bytes) {
             return Problem{points, num_points, dimension, offsets, std::move(offsets_host), num_repetitions,
                            num_simhash_projections, projection_dim, is_document, fill_empty_partitions,
                            final_projection_dimension, simhash, ams_index, ams_sign, cs_bucket_offsets,
                            cs_bucket_members, cs_bucket_signs, chunk_budget_bytes};
           }),
           py::kw_only(), py::arg("points"), py::arg("num_points"), py::arg("dimension"), py::arg("offsets"),
           py::arg("offsets_host"), py::arg("num_repetitions"), py::arg("num_simhash_projections"),
           py::arg("projection_dim"), py::arg("is_document"), py::arg("fill_empty_partitions"),
           py::arg("final_projection_dimension") = py::none(), py::arg("simhash") = py::none(),
           py::arg("ams_index") = py::none(), py::arg("ams_sign") = py::none(),
           py::arg("cs_bucket_offsets") = py::none(), py::arg("cs_bucket_members") = py::none(),
           py::arg("cs_bucket_signs") = py::none(), py::arg("chunk_budget_bytes") = int64_t(128) << 20)
      .def_readonly("points", &Problem::points)
      .def_readonly("num_points", &Problem::num_points)
      .def_readonly("dimension", &Problem::dimension)
      .def_readonly("offsets", &Problem::offsets)
      .def_readonly("offsets_host", &Problem::offsets_host)
      .def_readonly("num_repetitions", &Problem::num_repetitions)
      .def_readonly("num_simhash_projections", &Problem::num_simhash_projections)
      .def_readonly("projection_dim", &Problem::projection_dim)
      .def_readonly("is_document", &Problem::is_document)
      .def_readonly("fill_empty_partitions", &Problem::fill_empty_partitions)
      .def_readonly("final_projection_dimension", &Problem::final_projection_dimension)
      .def_readonly("simhash", &Problem::simhash)
      .def_readonly("ams_index", &Problem::ams_index)
      .def_readonly("ams_sign", &Problem::ams_sign)
      .def_readonly("cs_bucket_offsets", &Problem::cs_bucket_offsets)
      .def_readonly("cs_bucket_members", &Problem::cs_bucket_members)
      .def_readonly("cs_bucket_signs", &Problem::cs_bucket_signs)
      .def_readonly("chunk_budget_bytes", &Problem::chunk_budget_bytes);

  m.def(
      "row_length",
      [](int64_t num_repetitions, int64_t num_simhash_projections, int64_t projection_dim) {
        fde_checks::check_repetitions(num_repetitions, fde_cuda::kMaxRepetitions);
        fde_checks::check_simhash_k(num_simhash_projections);
        fde_checks::check_projection(projection_dim, "projection_dim", fde_cuda::kMaxProjectionDim);
        std::string err;
        const int64_t n =
            fde_cuda::fde_row_length(num_repetitions, int(num_simhash_projections), projection_dim, &err);
        if (n < 0) value_error(err);
        return n;
      },
      py::arg("num_repetitions"), py::arg("num_simhash_projections"), py::arg("projection_dim"),
      "R * 2^k * projection_dim: the FDE length before the final projection");

  m.def(
      "workspace_size",
      [](const Problem& a) {
        View<int64_t> oh;
        return workspace_bytes(make_problem(a, &oh));
      },
      py::arg("problem"), "Bytes of device workspace `encode` needs for this problem (host work only)");

  m.def(
      "encode",
      [](const Problem& a, std::optional<ArrayView> out, std::optional<ArrayView> workspace, int device,
         uintptr_t stream) {
        View<int64_t> oh;
        fde_cuda::Problem p = make_problem(a, &oh);
        if (device < 0) value_error("device: expected a CUDA device index >= 0, got " + std::to_string(device));
        const int64_t width = p.final_dim > 0 ? p.final_dim : fde_cuda::fde_row_length(p.num_repetitions,
                                                                                       p.num_simhash,
                                                                                       p.projection_dim, nullptr);
        p.out = checked_ptr<float>(out, "out", sat_mul(p.num_docs, width), "B * output length");
        const int64_t need = workspace_bytes(p);
        if (!workspace) value_error("workspace: required, got None");
        if (workspace->dtype != "uint8") type_error("workspace: expected dtype uint8, got " + workspace->dtype);
        if (workspace->numel < need)
          value_error("workspace: expected >= " + std::to_string(need) + " bytes, got " +
                      std::to_string(workspace->numel));
        if (workspace->numel > 0 && workspace->ptr == 0)
          value_error("workspace: null data pointer for a non-empty buffer");
        std::string err;
        fde_cuda::Status st;
        {
          py::gil_scoped_release release;
          st = fde_cuda::fde_encode(p, reinterpret_cast<void*>(workspace->ptr), workspace->numel, device,
                                    reinterpret_cast<void*>(stream), &err);
        }
        if (st == fde_cuda::Status::CudaError) throw std::runtime_error(err);
      },
      py::arg("problem"), py::kw_only(), py::arg("out"), py::arg("workspace"), py::arg("device"), py::arg("stream"),
      "Enqueue the FDE encoder on `stream` (cudaStream_t as int): out float32 (B, D_out) and workspace uint8 "
      "(>= workspace_size(problem) bytes) as ArrayView.");
}

}  // namespace embkern
