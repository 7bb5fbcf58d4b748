// MUVERA fixed dimensional encodings on the GPU. Torch-free: every buffer is
// a raw device pointer to a C-contiguous array, sizes are int64_t, and the
// caller owns the stream, the output and the workspace (the Python layer
// allocates both through torch so they live in its caching allocator).
//
// Shapes (N = total points, B = documents, d = point dimension, R
// repetitions, k hyperplanes, d_p = projected dimension, NP = 2^k):
//   points         float32 (N, d)
//   offsets        int64   (B+1,) on the device, and the same values on the
//                  host (offsets_host) for chunk planning
//   simhash        float32 (R, d, k)          G_r[i][j]
//   ams_index      int32   (R, d) or null     identity projection when null
//   ams_sign       float32 (R, d) or null
//   cs_offsets     int64   (D+1,)             count-sketch bucket CSR (final
//   cs_members     int64   (L,)               projection only; L = R*NP*d_p,
//   cs_signs       float32 (L,)               members ascending per bucket)
//   out            float32 (B, D) with final projection, else (B, R*NP*d_p)
//
// Exactness (docs/ops/fde.md, "Numerics contract"): output is bit-identical to the CPU
// kernel (src/cpu/fde.cpp) and the reference for every projection. The sign
// bits and AMS values are fp32 sums in Eigen's order (fde::dot_order() in
// embkern/fde.h), each term a rounded product (explicit __fmul_rn/__fadd_rn,
// never an FMA); the partition sums add points in input order, one thread per
// output element; the document average uses IEEE division; the count sketch
// adds bucket members in ascending input index. No float atomics: the result
// is the same for every launch configuration and chunking.
#pragma once
#include <cstdint>
#include <string>

namespace embkern {
namespace fde_cuda {

// The limits of these kernels (each a precondition below).
// R: repetitions are split over gridDim.y of the codes kernel (<= 65535
// blocks of 8 repetitions).
constexpr int64_t kMaxRepetitions = int64_t(65535) * 8;
// d: dimensions are indexed as int32 (2^31 - 1 at most).
constexpr int64_t kMaxDimension = 0x7fffffffLL;
// d_p: the AMS inverse table holds d_p + 1 int32 offsets per repetition.
constexpr int64_t kMaxProjectionDim = 0x7fffffffLL - 1;
// Points of one document: a warp ballot walks them with an int32 index.
constexpr int64_t kMaxDocPoints = 0x7fffffffLL;

struct Problem {
  // inputs
  const float* points = nullptr;
  int64_t num_points = 0;  // N
  int64_t dim = 0;         // d
  const int64_t* offsets = nullptr;       // device (B+1,)
  const int64_t* offsets_host = nullptr;  // host copy of the same values
  int64_t num_docs = 0;                   // B
  // config
  int64_t num_repetitions = 0;  // R
  int num_simhash = 0;          // k in [0, 30]
  int64_t projection_dim = 0;   // d_p (== d for the identity projection)
  bool is_document = false;     // AVERAGE, else SUM
  bool fill_empty = false;      // documents only
  int64_t final_dim = 0;        // D; 0 = no final projection
  // tables (device)
  const float* simhash = nullptr;
  const int32_t* ams_index = nullptr;
  const float* ams_sign = nullptr;
  const int64_t* cs_offsets = nullptr;
  const int64_t* cs_members = nullptr;
  const float* cs_signs = nullptr;
  int64_t cs_len = 0;  // L
  // output (device)
  float* out = nullptr;
  // Upper bound on the per-chunk scratch (sign codes + the unprojected FDE
  // rows that the count sketch reads); a chunk always holds >= 1 document.
  int64_t chunk_budget_bytes = int64_t(128) << 20;
};

// Preconditions of fde_workspace_bytes and fde_encode, checked by the caller
// (the csrc/ boundary) and asserted in debug builds only:
//   1 <= d <= kMaxDimension, N >= 0, B >= 0, 1 <= R <= kMaxRepetitions,
//   0 <= k <= fde::kMaxSimhash, 1 <= d_p <= kMaxProjectionDim;
//   ams_index and ams_sign both set (d_p any) or both null (d_p == d);
//   fill_empty only for documents; final_dim >= 0, and with final_dim > 0
//   the count-sketch CSR set and cs_len == fde_row_length(R, k, d_p);
//   simhash set when k > 0; points set when N > 0; chunk_budget_bytes > 0;
//   offsets_host a valid CSR (offsets[0] == 0, non-decreasing,
//   offsets[B] == N; empty when B == 0) with at most kMaxDocPoints points a
//   document; fde_fits_one_launch(N, R); fde_row_length(R, k, d_p) >= 0;
//   the device buffers hold the shapes listed above.

// Whether N points x R repetitions fit the codes kernel's 1-d grid (< 2^31
// blocks). Larger batches are encoded in smaller calls.
bool fde_fits_one_launch(int64_t num_points, int64_t num_repetitions);

// Launch failures come back as CudaError with cudaGetErrorString text.
enum class Status : int { Ok = 0, CudaError = 2 };

// Length of one output row before the final projection: R * 2^k * d_p, or
// -1 (with *error) if it overflows the kernels' int64 index range.
// Requires R >= 1, 0 <= k <= fde::kMaxSimhash, d_p >= 1.
int64_t fde_row_length(int64_t num_repetitions, int num_simhash, int64_t projection_dim,
                       std::string* error);

// Bytes of device workspace fde_encode needs for this problem (host work
// only: reads offsets_host).
int64_t fde_workspace_bytes(const Problem& p, std::string* error);

// Enqueue the encoder on `stream` (a cudaStream_t; 0 = legacy default
// stream) on device `device`. Asynchronous: returns after the launches.
// Also requires workspace_bytes >= fde_workspace_bytes(p) (workspace set
// when that is > 0) and, when B > 0, out set. Launch failures come back as
// Status::CudaError with cudaGetErrorString text; nothing aborts.
Status fde_encode(const Problem& p, void* workspace, int64_t workspace_bytes, int device,
                  void* stream, std::string* error);

}  // namespace fde_cuda
}  // namespace embkern
