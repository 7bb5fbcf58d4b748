// MUVERA fixed dimensional encodings (FDE), CPU. Torch-free: raw pointers to
// C-contiguous buffers, sizes as int64_t. Semantics: docs/ops/fde.md; numerics
// contract: python/embkern/reference/fde.py.
//
// Shapes (N = total points, B = documents, d = point dimension, R
// repetitions, k hyperplanes, NP = 2^k partitions, d_p = projected dimension,
// L = R*NP*d_p values before the final projection, D = final dimension):
//   points   float32 (N, d);  offsets int64 (B+1,), offsets[0] = 0, offsets[B] = N
//   simhash  float32 (R, d, k)       G_r[i][j]
//   ams      int32 (R, d) index in [0, d_p), float32 (R, d) sign in {+1, -1}
//   cs       int32 (L,) bucket in [0, D), float32 (L,) sign
//   out      float32 (B, D) with a final projection, else (B, L)
//
// Bit-exactness with the reference (muvfde 0.0.9 x86-64 wheel: Eigen 3.4-pre,
// SSE2, no FMA). Eigen evaluates the sign-bit product X*G (and the AMS product
// X*A) of one point cloud with a per-element float32 summation order that
// depends on (n points, d, columns, row p). `DotOrder` / `dot_order()` below
// reproduce it; every term is a rounded product added to a +0-initialised
// accumulator (this file's .cpp is built with -ffp-contract=off):
//   kPlain    sum over i = 0..d-1 in order (lazy product: d+n+c < 20; or c == 1)
//   kLanes4   n == 1 (row GEMV): acc[i % 4] for i < 4*floor(d/4),
//             (acc0 + acc2) + (acc1 + acc3), then the tail in order
//   kGemmSeq  depth blocks of kc: block sum in order; out = block + out
//   kEvenOdd  per depth block (pk = akc & ~7): C (even local i < pk), D (odd),
//             C + D, then local i >= pk into C; out = block + out
//   kMod4     per depth block (e4 = 4*floor(akc/4)): C[i % 4] for i < e4,
//             (C0 + C1) + (C2 + C3), then the tail; out = block + out
// kEvenOdd / kMod4 apply to columns j < 4*floor(c/4) of the row; other
// columns of that row use kGemmSeq. The CUDA kernel must use the same rule
// for its identity output to match bit for bit.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "embkern/cpu_isa.h"

#if defined(__CUDACC__)
#define EMBKERN_HD __host__ __device__
#else
#define EMBKERN_HD
#endif

namespace embkern {
namespace fde {

// ---- Eigen's summation order ------------------------------------------------

// Cache sizes Eigen's blocking heuristic reads (reference/fde.py EIGEN_L1/L2/L3).
constexpr int64_t kEigenL1 = 32 * 1024;
constexpr int64_t kEigenL2 = 512 * 1024;
constexpr int64_t kEigenL3 = 32 * 1024 * 1024;

enum DotClass : int { kPlain = 0, kLanes4 = 1, kGemmSeq = 2, kEvenOdd = 3, kMod4 = 4 };

struct DotOrder {
  int cls;     // DotClass of this row (columns j < panel_cols)
  int64_t kc;  // depth block (== d when not blocked)
  int64_t panel_cols;  // 4*floor(c/4): columns that follow cls; the rest use kGemmSeq
};

// Eigen's evaluateProductBlockingSizesHeuristic (float, mr = 8, nr = 4, one
// thread) for an m x k by k x n product: returns kc and mc.
EMBKERN_HD inline void eigen_blocking(int64_t m, int64_t k, int64_t n, int64_t* kc_out, int64_t* mc_out) {
  *kc_out = k;
  *mc_out = m;
  const int64_t mr = 8, nr = 4;
  int64_t mx = k > m ? k : m;
  mx = mx > n ? mx : n;
  if (mx < 48) return;
  const int64_t k_sub = mr * nr * 4, k_div = mr * 4 + nr * 4;
  int64_t max_kc = ((kEigenL1 - k_sub) / k_div) & ~int64_t(7);
  if (max_kc < 1) max_kc = 1;
  const int64_t old_k = k;
  if (k > max_kc) {
    k = (k % max_kc) == 0 ? max_kc : max_kc - 8 * ((max_kc - 1 - (k % max_kc)) / (8 * (k / max_kc + 1)));
  }
  *kc_out = k;
  const int64_t actual_l2 = 1572864;
  const int64_t remaining_l1 = kEigenL1 - k_sub - m * k * 4;
  int64_t max_nc = remaining_l1 >= nr * 4 * k ? remaining_l1 / (k * 4) : (3 * actual_l2) / (2 * 2 * max_kc * 4);
  int64_t nc = actual_l2 / (2 * k * 4);
  nc = (nc < max_nc ? nc : max_nc) & ~(nr - 1);
  if (n > nc || old_k != k) return;  // column blocking never changes a row's order
  const int64_t problem_size = k * n * 4;
  int64_t actual_lm = actual_l2, max_mc = m;
  if (problem_size <= 1024) {
    actual_lm = kEigenL1;
  } else if (kEigenL3 != 0 && problem_size <= 32768) {
    actual_lm = kEigenL2;
    max_mc = max_mc < 576 ? max_mc : 576;
  }
  int64_t mc = actual_lm / (3 * k * 4);
  mc = mc < max_mc ? mc : max_mc;
  if (mc > mr) {
    mc -= mc % mr;
  } else if (mc == 0) {
    return;
  }
  *mc_out = (m % mc) == 0 ? mc : mc - mr * ((mc - (m % mc)) / (mr * (m / mc + 1)));
}

// Order of row p of an (n x d) by (d x c) product, n >= 1, c >= 1.
EMBKERN_HD inline DotOrder dot_order(int64_t n, int64_t d, int64_t c, int64_t p) {
  DotOrder o{kPlain, d, 0};
  if (d + n + c < 20 || c == 1) return o;
  if (n == 1) {
    o.cls = kLanes4;
    o.panel_cols = c;
    return o;
  }
  int64_t kc, mc;
  eigen_blocking(n, d, c, &kc, &mc);
  o.kc = kc;
  o.panel_cols = (c / 4) * 4;
  const int64_t i2 = (p / mc) * mc;
  const int64_t rows = (i2 + mc < n ? i2 + mc : n) - i2;
  const int64_t r = p - i2;
  const int64_t m2 = (rows / 8) * 8;
  const int64_t m1 = m2 + ((rows - m2) / 4) * 4;
  o.cls = r < m2 ? kGemmSeq : (r < m1 ? kEvenOdd : kMod4);
  return o;
}

// ---- limits ------------------------------------------------------------------

// The reference's own bound on k (config proto check), B = 2^k partitions.
constexpr int kMaxSimhash = 30;
// Projection dimension d_p (identity: d_p = d) and final dimension D: the
// AMS and count-sketch tables store indices in [0, d_p) / [0, D) as int32,
// so both are < 2^31 (2^31 - 1 at most). One bound for both, checked once
// at the csrc boundary.
constexpr int64_t kMaxProjection = 0x7fffffffLL;
// R * 2^k * d_p (values per row before the final projection) is kept below
// 2^61 so that its byte size (x 4) and every offset into it fit in int64.
constexpr int64_t kMaxRowLength = int64_t(1) << 61;

// ---- encoder ---------------------------------------------------------------

// Tables in the layout the kernel reads, built once per config (Prepared).
// Everything the encoder reads is owned here (copied by prepare, freed with
// the Prepared), so the caller may change or free its arrays once prepare
// returned. Unset tables are null.
struct Prepared {
  template <typename T>
  using Table = std::unique_ptr<T[]>;
  int64_t d = 0, R = 0, dp = 0, final_dim = 0, rk = 0, rk_pad = 0;
  int k = 0;
  bool is_document = false, fill = false, ams = false;
  Table<float> gt;             // (d, rk_pad): gt[i*rk_pad + r*k + j] = G_r[i][j], zero padded
  Table<int32_t> ams_col_off;  // (R, dp+1): per repetition, column -> range in ams_terms
  Table<int32_t> ams_term_i;   // (R, d): inputs i grouped by column, ascending i
  Table<float> ams_term_s;     // (R, d): their signs
  // The count sketch packed into one integer per input: bucket | (sign < 0) in
  // the top bit (16-bit when final_dim <= 2^15, else 32-bit), built when every
  // sign is +-1 (the encoder multiplies by the +-1.0f it encodes, so the
  // arithmetic is the reference's). Half or a quarter of the 8 bytes per input
  // that the encoder streams per document.
  Table<uint16_t> cs16;
  Table<uint32_t> cs32;
  // Otherwise (some sign is not +-1) an owned copy of the tables, (L,) each.
  Table<int32_t> cs_bucket;
  Table<float> cs_sign;
  // Every sign is finite: s * (+-0) is +-0, and adding +-0 to a bucket that
  // starts at +0 never changes it (x + -0 = x; +0 + -0 = +0, so no bucket is
  // ever -0), so all-zero blocks may be skipped. An inf or NaN sign turns a
  // zero block into NaN, so then every block is added, as the reference does.
  bool cs_finite = true;
};

EMBKERN_ISA_BEGIN
#include "embkern/fde_api.inc"
EMBKERN_ISA_END

}  // namespace fde
}  // namespace embkern
