// Bindings for src/cuda/fde.cu: embkern._C_cuda.fde.
//
// Device buffers arrive as (integer data pointer, element count) pairs taken
// from torch tensors by python/embkern/ops/_fde_cuda.py; the only host buffer
// is a copy of the document offsets (the chunk planner and the checks below
// read it). Every size is re-checked here and named in the ValueError; CUDA
// failures become RuntimeError with cudaGetErrorString text. No math here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>

#include "common.h"
#include "embkern/fde.h"
#include "embkern/fde_cuda.h"

namespace embkern {
namespace {

using fde_cuda::Problem;

template <typename T>
T* as_ptr(uintptr_t v) {
  return reinterpret_cast<T*>(v);
}

void expect_numel(const char* name, int64_t got, int64_t want, const std::string& what) {
  if (got != want) {
    value_error(std::string(name) + ": expected " + std::to_string(want) + " elements (" + what + "), got " +
                std::to_string(got));
  }
}

void expect_ptr(const char* name, uintptr_t ptr, int64_t numel) {
  if (numel > 0 && ptr == 0) value_error(std::string(name) + ": null data pointer for a non-empty buffer");
}

// Builds and checks the problem; `offsets_host` must outlive its use.
Problem make_problem(uintptr_t points, int64_t num_points, int64_t dimension, uintptr_t offsets,
                     const View<int64_t>& offsets_host, int64_t num_repetitions, int num_simhash_projections,
                     int64_t projection_dim, bool is_document, bool fill_empty_partitions,
                     std::optional<int64_t> final_projection_dimension, uintptr_t simhash, int64_t simhash_numel,
                     uintptr_t ams_index, int64_t ams_index_numel, uintptr_t ams_sign, int64_t ams_sign_numel,
                     uintptr_t cs_offsets, int64_t cs_offsets_numel, uintptr_t cs_members,
                     int64_t cs_members_numel, uintptr_t cs_signs, int64_t cs_signs_numel,
                     int64_t chunk_budget_bytes) {
  if (dimension <= 0) value_error("dimension: expected > 0, got " + std::to_string(dimension));
  if (num_points < 0) value_error("points: expected >= 0 rows, got " + std::to_string(num_points));
  if (offsets_host.shape.size() != 1 || offsets_host.size(0) < 1)
    value_error("offsets: expected a 1-d buffer of B+1 >= 1 values");
  if (num_repetitions < 1) value_error("num_repetitions: expected >= 1, got " + std::to_string(num_repetitions));
  if (num_simhash_projections < 0 || num_simhash_projections > fde::kMaxSimhash)
    value_error("num_simhash_projections: expected 0 <= k <= " + std::to_string(fde::kMaxSimhash) + ", got " +
                std::to_string(num_simhash_projections));
  if (projection_dim < 1) value_error("projection_dim: expected >= 1, got " + std::to_string(projection_dim));
  if (fill_empty_partitions && !is_document)
    value_error("fill_empty_partitions: queries cannot fill empty partitions (documents only)");
  if (final_projection_dimension && *final_projection_dimension <= 0)
    value_error("final_projection_dimension: expected > 0 or None, got " +
                std::to_string(*final_projection_dimension));
  if (chunk_budget_bytes <= 0)
    value_error("chunk_budget_bytes: expected > 0, got " + std::to_string(chunk_budget_bytes));
  expect_ptr("points", points, num_points * dimension);
  expect_ptr("offsets", offsets, offsets_host.size(0));

  std::string err;
  const int64_t row_len = fde_cuda::fde_row_length(num_repetitions, num_simhash_projections, projection_dim, &err);
  if (row_len < 0) value_error(err);

  const int64_t R = num_repetitions, d = dimension, k = num_simhash_projections;
  expect_numel("simhash", simhash_numel, R * d * k, "R * d * k");
  expect_ptr("simhash", simhash, simhash_numel);
  const bool ams = ams_index != 0 || ams_index_numel != 0 || ams_sign != 0 || ams_sign_numel != 0;
  if (ams) {
    expect_numel("ams_index", ams_index_numel, R * d, "R * d");
    expect_numel("ams_sign", ams_sign_numel, R * d, "R * d");
    expect_ptr("ams_index", ams_index, ams_index_numel);
    expect_ptr("ams_sign", ams_sign, ams_sign_numel);
  } else if (projection_dim != dimension) {
    value_error("projection_dim: the identity projection needs projection_dim == dimension (" +
                std::to_string(dimension) + "), got " + std::to_string(projection_dim));
  }
  const int64_t D = final_projection_dimension.value_or(0);
  if (D > 0) {
    expect_numel("cs_bucket_offsets", cs_offsets_numel, D + 1, "final_projection_dimension + 1");
    expect_numel("cs_bucket_members", cs_members_numel, row_len, "R * 2^k * projection_dim");
    expect_numel("cs_bucket_signs", cs_signs_numel, row_len, "R * 2^k * projection_dim");
    expect_ptr("cs_bucket_offsets", cs_offsets, cs_offsets_numel);
    expect_ptr("cs_bucket_members", cs_members, cs_members_numel);
    expect_ptr("cs_bucket_signs", cs_signs, cs_signs_numel);
  }

  Problem p;
  p.points = as_ptr<const float>(points);
  p.num_points = num_points;
  p.dim = dimension;
  p.offsets = as_ptr<const int64_t>(offsets);
  p.offsets_host = offsets_host.data;
  p.num_docs = offsets_host.size(0) - 1;
  p.num_repetitions = R;
  p.num_simhash = num_simhash_projections;
  p.projection_dim = projection_dim;
  p.is_document = is_document;
  p.fill_empty = fill_empty_partitions;
  p.final_dim = D;
  p.simhash = as_ptr<const float>(simhash);
  p.ams_index = ams ? as_ptr<const int32_t>(ams_index) : nullptr;
  p.ams_sign = ams ? as_ptr<const float>(ams_sign) : nullptr;
  if (D > 0) {
    p.cs_offsets = as_ptr<const int64_t>(cs_offsets);
    p.cs_members = as_ptr<const int64_t>(cs_members);
    p.cs_signs = as_ptr<const float>(cs_signs);
    p.cs_len = cs_members_numel;
  }
  p.chunk_budget_bytes = chunk_budget_bytes;
  return p;
}

#define EMBKERN_FDE_PROBLEM_ARGS                                                                               \
  py::kw_only(), py::arg("points"), py::arg("num_points"), py::arg("dimension"), py::arg("offsets"),           \
      py::arg("offsets_host"), py::arg("num_repetitions"), py::arg("num_simhash_projections"),                 \
      py::arg("projection_dim"), py::arg("is_document"), py::arg("fill_empty_partitions"),                      \
      py::arg("final_projection_dimension") = py::none(), py::arg("simhash") = 0, py::arg("simhash_numel") = 0, \
      py::arg("ams_index") = 0, py::arg("ams_index_numel") = 0, py::arg("ams_sign") = 0,                       \
      py::arg("ams_sign_numel") = 0, py::arg("cs_bucket_offsets") = 0, py::arg("cs_bucket_offsets_numel") = 0, \
      py::arg("cs_bucket_members") = 0, py::arg("cs_bucket_members_numel") = 0,                                \
      py::arg("cs_bucket_signs") = 0, py::arg("cs_bucket_signs_numel") = 0,                                    \
      py::arg("chunk_budget_bytes") = int64_t(128) << 20

}  // namespace

void register_fde_cuda(py::module_& m) {
  m.def(
      "row_length",
      [](int64_t num_repetitions, int num_simhash_projections, int64_t projection_dim) {
        std::string err;
        const int64_t n = fde_cuda::fde_row_length(num_repetitions, num_simhash_projections, projection_dim, &err);
        if (n < 0) value_error(err);
        return n;
      },
      py::arg("num_repetitions"), py::arg("num_simhash_projections"), py::arg("projection_dim"),
      "R * 2^k * projection_dim: the FDE length before the final projection");

  m.def(
      "workspace_size",
      [](uintptr_t points, int64_t num_points, int64_t dimension, uintptr_t offsets, py::buffer offsets_host,
         int64_t num_repetitions, int num_simhash_projections, int64_t projection_dim, bool is_document,
         bool fill_empty_partitions, std::optional<int64_t> final_projection_dimension, uintptr_t simhash,
         int64_t simhash_numel, uintptr_t ams_index, int64_t ams_index_numel, uintptr_t ams_sign,
         int64_t ams_sign_numel, uintptr_t cs_offsets, int64_t cs_offsets_numel, uintptr_t cs_members,
         int64_t cs_members_numel, uintptr_t cs_signs, int64_t cs_signs_numel, int64_t chunk_budget_bytes) {
        View<int64_t> oh = view<int64_t>(offsets_host, "offsets_host", 1);
        Problem p = make_problem(points, num_points, dimension, offsets, oh, num_repetitions,
                                 num_simhash_projections, projection_dim, is_document, fill_empty_partitions,
                                 final_projection_dimension, simhash, simhash_numel, ams_index, ams_index_numel,
                                 ams_sign, ams_sign_numel, cs_offsets, cs_offsets_numel, cs_members,
                                 cs_members_numel, cs_signs, cs_signs_numel, chunk_budget_bytes);
        std::string err;
        const int64_t bytes = fde_cuda::fde_workspace_bytes(p, &err);
        if (bytes < 0) value_error(err);
        return bytes;
      },
      EMBKERN_FDE_PROBLEM_ARGS,
      "Bytes of device workspace `encode` needs for these arguments (host work only)");

  m.def(
      "encode",
      [](uintptr_t points, int64_t num_points, int64_t dimension, uintptr_t offsets, py::buffer offsets_host,
         int64_t num_repetitions, int num_simhash_projections, int64_t projection_dim, bool is_document,
         bool fill_empty_partitions, std::optional<int64_t> final_projection_dimension, uintptr_t simhash,
         int64_t simhash_numel, uintptr_t ams_index, int64_t ams_index_numel, uintptr_t ams_sign,
         int64_t ams_sign_numel, uintptr_t cs_offsets, int64_t cs_offsets_numel, uintptr_t cs_members,
         int64_t cs_members_numel, uintptr_t cs_signs, int64_t cs_signs_numel, int64_t chunk_budget_bytes,
         uintptr_t out, int64_t out_numel, uintptr_t workspace, int64_t workspace_bytes, int device,
         uintptr_t stream) {
        View<int64_t> oh = view<int64_t>(offsets_host, "offsets_host", 1);
        Problem p = make_problem(points, num_points, dimension, offsets, oh, num_repetitions,
                                 num_simhash_projections, projection_dim, is_document, fill_empty_partitions,
                                 final_projection_dimension, simhash, simhash_numel, ams_index, ams_index_numel,
                                 ams_sign, ams_sign_numel, cs_offsets, cs_offsets_numel, cs_members,
                                 cs_members_numel, cs_signs, cs_signs_numel, chunk_budget_bytes);
        if (device < 0) value_error("device: expected a CUDA device index >= 0, got " + std::to_string(device));
        std::string err;
        const int64_t row_len =
            fde_cuda::fde_row_length(num_repetitions, num_simhash_projections, projection_dim, &err);
        const int64_t width = p.final_dim > 0 ? p.final_dim : row_len;
        expect_numel("out", out_numel, p.num_docs * width, "B * output length");
        expect_ptr("out", out, out_numel);
        if (workspace_bytes < 0) value_error("workspace_bytes: expected >= 0");
        p.out = as_ptr<float>(out);
        fde_cuda::Status st;
        {
          py::gil_scoped_release release;
          st = fde_cuda::fde_encode(p, as_ptr<void>(workspace), workspace_bytes, device, as_ptr<void>(stream), &err);
        }
        if (st == fde_cuda::Status::InvalidArgument) value_error(err);
        if (st == fde_cuda::Status::CudaError) throw std::runtime_error(err);
      },
      EMBKERN_FDE_PROBLEM_ARGS, py::arg("out"), py::arg("out_numel"), py::arg("workspace"),
      py::arg("workspace_bytes"), py::arg("device"), py::arg("stream"),
      "Enqueue the FDE encoder on `stream` (cudaStream_t as int). Buffers are device pointers + element counts.");
}

}  // namespace embkern
