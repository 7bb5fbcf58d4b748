// MUVERA fixed dimensional encodings on the GPU (docs/ops/fde.md).
//
// Pipeline per chunk of documents (chunks bound the scratch memory):
//   1. simhash_codes_kernel: one thread per (point, repetition) computes the
//      k sign bits and stores the Gray-decoded partition index (int32).
//   2. fde_write_kernel: one warp per (document, repetition, partition) owns
//      the d_p output values of that partition; lane l owns coordinates
//      l, l+32, ... and adds the member points in input order (found with a
//      warp ballot over the partition codes, lowest point first), then
//      divides by the count (documents), or copies the nearest point (fill),
//      or writes zeros. Every output element is written exactly once.
//   3. count_sketch_kernel (final projection only): one thread per
//      (document, output bucket) sums s_i * v[i] over the bucket's members in
//      ascending i, reading the unprojected FDE rows from scratch.
// The AMS projection is evaluated on the fly from a per-repetition inverse
// table (coordinate c -> input dims i with idx_i == c, ascending i) built by
// ams_inverse_kernel at the start of each call.
//
// Bit-exactness with src/cpu/fde.cpp and the reference: every float
// operation that feeds the output is an explicit round-to-nearest intrinsic
// (__fmul_rn, __fadd_rn, __fdiv_rn), which nvcc never contracts into an FMA,
// applied in the CPU kernel's order:
//   * dot products x_p . G_r[:, j] and AMS values follow Eigen's summation
//     order for row p of an (n x d) by (d x c) product, as fde::dot_order()
//     in embkern/fde.h defines it (plain sequential for most rows; 2 or 4
//     interleaved accumulators for the last rows of a row block, n == 1
//     rows, and depth blocks of kc when d > 680);
//   * partition sums start at +0 and add points in input order; the
//     document count is the reference's float counter;
//   * the count sketch adds s_i * v_i per bucket in ascending i from +0.
#include <cuda_runtime.h>

#include <algorithm>
#include <cassert>
#include <cstdint>
#include <string>
#include <vector>

#include "embkern/fde.h"
#include "embkern/fde_cuda.h"

namespace embkern {
namespace fde_cuda {
namespace {

using fde::DotOrder;

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxSimhash = fde::kMaxSimhash;  // one bound with the CPU encoder

// ---------------------------------------------------------------------------
// Eigen's summation order (fde.h): one (row, column) sum at a time.

// Effective class of column `col` of a row with order `o`: the interleaved
// classes only cover the full 4-column panels.
__device__ __forceinline__ int column_class(const DotOrder& o, int64_t col) {
  if ((o.cls == fde::kEvenOdd || o.cls == fde::kMod4) && col >= o.panel_cols) return fde::kGemmSeq;
  return o.cls;
}

__device__ __forceinline__ int64_t depth_block(int cls, int64_t kc, int64_t d) {
  return (cls == fde::kPlain || cls == fde::kLanes4) ? d : kc;
}

// Terms handled by the interleaved accumulators in a depth block of akc
// terms, and how many accumulators.
__device__ __forceinline__ void split_of(int cls, int64_t akc, int64_t* head, int* groups) {
  if (cls == fde::kEvenOdd) {
    *head = akc & ~int64_t(7);
    *groups = 2;
  } else if (cls == fde::kMod4 || cls == fde::kLanes4) {
    *head = (akc / 4) * 4;
    *groups = 4;
  } else {
    *head = akc;
    *groups = 1;
  }
}

__device__ __forceinline__ float combine(int cls, float c0, float c1, float c2, float c3) {
  if (cls == fde::kEvenOdd) return __fadd_rn(c0, c1);
  if (cls == fde::kMod4) return __fadd_rn(__fadd_rn(c0, c1), __fadd_rn(c2, c3));
  if (cls == fde::kLanes4) return __fadd_rn(__fadd_rn(c0, c2), __fadd_rn(c1, c3));
  return c0;
}

// Dense dot product sum_i x[i] * g[i * g_stride] in the order of class `cls`.
__device__ float ordered_dot(const float* __restrict__ x, const float* __restrict__ g, int64_t g_stride, int64_t d,
                             int cls, int64_t kc) {
  const int64_t blk = depth_block(cls, kc, d);
  float tot = 0.0f;
  for (int64_t k2 = 0; k2 < d; k2 += blk) {
    const int64_t akc = min(k2 + blk, d) - k2;
    int64_t head;
    int groups;
    split_of(cls, akc, &head, &groups);
    const float* xb = x + k2;
    const float* gb = g + k2 * g_stride;
    float c0 = 0.0f, c1 = 0.0f, c2 = 0.0f, c3 = 0.0f;
    int64_t l = 0;
    if (groups == 4) {
      for (; l < head; l += 4) {
        c0 = __fadd_rn(c0, __fmul_rn(__ldg(xb + l), __ldg(gb + l * g_stride)));
        c1 = __fadd_rn(c1, __fmul_rn(__ldg(xb + l + 1), __ldg(gb + (l + 1) * g_stride)));
        c2 = __fadd_rn(c2, __fmul_rn(__ldg(xb + l + 2), __ldg(gb + (l + 2) * g_stride)));
        c3 = __fadd_rn(c3, __fmul_rn(__ldg(xb + l + 3), __ldg(gb + (l + 3) * g_stride)));
      }
    } else if (groups == 2) {
      for (; l < head; l += 2) {
        c0 = __fadd_rn(c0, __fmul_rn(__ldg(xb + l), __ldg(gb + l * g_stride)));
        c1 = __fadd_rn(c1, __fmul_rn(__ldg(xb + l + 1), __ldg(gb + (l + 1) * g_stride)));
      }
    } else {
      for (; l < head; ++l) c0 = __fadd_rn(c0, __fmul_rn(__ldg(xb + l), __ldg(gb + l * g_stride)));
    }
    float sblk = combine(cls, c0, c1, c2, c3);
    for (; l < akc; ++l) sblk = __fadd_rn(sblk, __fmul_rn(__ldg(xb + l), __ldg(gb + l * g_stride)));
    tot = __fadd_rn(sblk, tot);
  }
  return tot;
}

// Sparse sum over terms sgn[t] * x[idx[t]], t in [b, e), idx ascending, in
// the order of class `cls`: Eigen's dense product also adds the x_i * 0
// terms in between, but a +0-initialised accumulator that only ever adds
// +-0 stays +0 and x + (+-0) = x otherwise, so they never change the result
// (the same argument as ams_value() in src/cpu/fde.cpp).
__device__ float ordered_sparse(const int32_t* __restrict__ idx, const float* __restrict__ sgn, int32_t b, int32_t e,
                                const float* __restrict__ x, int64_t d, int cls, int64_t kc) {
  const int64_t blk = depth_block(cls, kc, d);
  float tot = 0.0f;
  int32_t t = b;
  for (int64_t k2 = 0; k2 < d && t < e; k2 += blk) {
    const int64_t k3 = min(k2 + blk, d);
    int64_t head;
    int groups;
    split_of(cls, k3 - k2, &head, &groups);
    float c0 = 0.0f, c1 = 0.0f, c2 = 0.0f, c3 = 0.0f;
    for (; t < e; ++t) {
      const int64_t i = __ldg(idx + t);
      if (i >= k2 + head) break;
      const float v = __fmul_rn(__ldg(sgn + t), __ldg(x + i));
      const int lane = static_cast<int>((i - k2) & (groups - 1));
      if (lane == 0) {
        c0 = __fadd_rn(c0, v);
      } else if (lane == 1) {
        c1 = __fadd_rn(c1, v);
      } else if (lane == 2) {
        c2 = __fadd_rn(c2, v);
      } else {
        c3 = __fadd_rn(c3, v);
      }
    }
    float sblk = combine(cls, c0, c1, c2, c3);
    for (; t < e; ++t) {
      const int64_t i = __ldg(idx + t);
      if (i >= k3) break;
      sblk = __fadd_rn(sblk, __fmul_rn(__ldg(sgn + t), __ldg(x + i)));
    }
    tot = __fadd_rn(sblk, tot);
  }
  return tot;
}

// Row classification of fde::dot_order() given the row-independent blocking
// (kc, mc) of the document, so the per-row cost is a few integer ops.
__device__ __forceinline__ DotOrder row_order(int64_t n, int64_t d, int64_t c, int64_t p, int64_t kc, int64_t mc) {
  DotOrder o{fde::kPlain, d, 0};
  if (d + n + c < 20 || c == 1) return o;
  if (n == 1) {
    o.cls = fde::kLanes4;
    o.panel_cols = c;
    return o;
  }
  o.kc = kc;
  o.panel_cols = (c / 4) * 4;
  const int64_t i2 = (p / mc) * mc;
  const int64_t rows = min(i2 + mc, n) - i2;
  const int64_t r = p - i2;
  const int64_t m2 = (rows / 8) * 8;
  const int64_t m1 = m2 + ((rows - m2) / 4) * 4;
  o.cls = r < m2 ? fde::kGemmSeq : (r < m1 ? fde::kEvenOdd : fde::kMod4);
  return o;
}

// ---------------------------------------------------------------------------
// 1. Sign codes

// A block is 32 points (lanes) x 8 repetitions (warps); the 1-d grid runs
// the repetition groups of a point tile back to back so the tile's rows are
// still in L2 when the next group stages them. Points and the hyperplane
// columns are staged through shared memory 32 coordinates at a time: the x
// tile row stride is 33 floats so lane l reading xs[l][i] hits bank
// (33 l + i) mod 32 = (l + i) mod 32 -- conflict-free -- and every lane of a
// warp reads the same hyperplane values, as float4 broadcasts (one shared
// memory wavefront per 4 columns instead of 4: with k = 5 the loads, not the
// 2k rounded multiply/adds, would otherwise bound the loop). The tiled loop
// sums sequentially within depth blocks of kc, which is the order of every
// row except the last <= 7 rows of an Eigen row block, single-point clouds
// and k >= 4 panels of those rows; such points redo their k sums afterwards
// with ordered_dot() straight from global memory (about 1 point in 10 for
// ragged 80-point documents, none when every length is a multiple of 8).
constexpr int kCodePoints = 32;
constexpr int kCodeReps = 8;
constexpr int kCodeTile = 32;

template <int KMAX, bool EXACT>
__global__ void __launch_bounds__(kCodePoints* kCodeReps)
    simhash_codes_kernel(const float* __restrict__ x, int64_t n, int64_t d, const int64_t* __restrict__ offsets,
                         int64_t docs, int64_t p0, const float* __restrict__ G, int64_t R, int k,
                         int32_t* __restrict__ codes) {
  constexpr int KQ = (KMAX + 3) / 4;  // float4 groups of hyperplane columns
  __shared__ float xs[kCodePoints][kCodeTile + 1];
  __shared__ float4 gs[kCodeReps][kCodeTile][KQ];
  __shared__ DotOrder order[kCodePoints];
  __shared__ int64_t kc_of[kCodePoints];
  __shared__ bool tiled_ok[kCodePoints];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t rep_groups = (R + kCodeReps - 1) / kCodeReps;
  const int64_t p_block = int64_t(blockIdx.x) / rep_groups * kCodePoints;
  const int64_t r_block = int64_t(blockIdx.x) % rep_groups * kCodeReps;
  const int64_t p = p_block + lane;
  const int64_t r = r_block + warp;
  const bool active = p < n && r < R;

  if (warp == 0 && p < n) {
    // `offsets` are the chunk's docs+1 (global) offsets and point p is
    // global point p0 + p: find the last document b with offsets[b] <= p0 + p
    // (that skips empty documents).
    const int64_t gp = p0 + p;
    int64_t lo = 0, hi = docs;  // offsets[lo] <= gp < offsets[hi]
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (__ldg(offsets + mid) <= gp) {
        lo = mid;
      } else {
        hi = mid;
      }
    }
    const int64_t start = __ldg(offsets + lo);
    const int64_t len = __ldg(offsets + lo + 1) - start;
    const DotOrder o = fde::dot_order(len, d, k, gp - start);
    order[lane] = o;
    kc_of[lane] = depth_block(o.cls, o.kc, d);
    tiled_ok[lane] = o.cls == fde::kPlain || o.cls == fde::kGemmSeq || o.panel_cols == 0;
  }
  __syncthreads();

  float tot[KMAX], blk[KMAX];
#pragma unroll
  for (int j = 0; j < KMAX; ++j) tot[j] = blk[j] = 0.0f;
  const int64_t kc = active ? kc_of[lane] : d;
  int64_t next_block = kc;

  for (int64_t i0 = 0; i0 < d; i0 += kCodeTile) {
    const int cols = static_cast<int>(d - i0 < kCodeTile ? d - i0 : kCodeTile);
    for (int t = threadIdx.x; t < kCodePoints * kCodeTile; t += blockDim.x) {
      const int row = t / kCodeTile, col = t % kCodeTile;
      const int64_t pp = p_block + row;
      xs[row][col] = (pp < n && col < cols) ? __ldg(x + pp * d + i0 + col) : 0.0f;
    }
    for (int t = threadIdx.x; t < kCodeReps * kCodeTile * KQ * 4; t += blockDim.x) {
      const int w = t / (kCodeTile * KQ * 4);
      const int rem = t % (kCodeTile * KQ * 4);
      const int ii = rem / (KQ * 4), j = rem % (KQ * 4);
      const int64_t rr = r_block + w;
      reinterpret_cast<float*>(&gs[w][ii][0])[j] =
          (rr < R && ii < cols && j < k) ? __ldg(G + (rr * d + i0 + ii) * k + j) : 0.0f;
    }
    __syncthreads();
    if (active) {
      for (int ii = 0; ii < cols; ++ii) {
        if (i0 + ii == next_block) {  // Eigen depth block boundary: out = block + out
#pragma unroll
          for (int j = 0; j < KMAX; ++j) {
            tot[j] = __fadd_rn(blk[j], tot[j]);
            blk[j] = 0.0f;
          }
          next_block += kc;
        }
        const float xv = xs[lane][ii];
#pragma unroll
        for (int q = 0; q < KQ; ++q) {
          const float4 g4 = gs[warp][ii][q];
          const float gv[4] = {g4.x, g4.y, g4.z, g4.w};
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int j = 4 * q + e;
            if (j < KMAX && (EXACT || j < k)) blk[j] = __fadd_rn(blk[j], __fmul_rn(xv, gv[e]));
          }
        }
      }
    }
    __syncthreads();
  }
  if (!active) return;
  uint32_t part = 0;
  if (tiled_ok[lane]) {
    // Gray decoding, hyperplane 0 most significant; `> 0.0f` is false for
    // +0, -0 and NaN (docs/ops/fde.md, Algorithm step 1).
#pragma unroll
    for (int j = 0; j < KMAX; ++j) {
      if (EXACT || j < k) {
        const uint32_t bit = __fadd_rn(blk[j], tot[j]) > 0.0f ? 1u : 0u;
        part = (part << 1) | (bit ^ (part & 1u));
      }
    }
  } else {
    const DotOrder o = order[lane];
    const float* xp = x + p * d;
    const float* g = G + r * d * k;
    for (int j = 0; j < k; ++j) {
      const float v = ordered_dot(xp, g + j, k, d, column_class(o, j), o.kc);
      const uint32_t bit = v > 0.0f ? 1u : 0u;
      part = (part << 1) | (bit ^ (part & 1u));
    }
  }
  codes[r * n + p] = static_cast<int32_t>(part);
}

template <int KMAX, bool EXACT>
void launch_codes(dim3 grid, cudaStream_t s, const float* x, int64_t n, int64_t d, const int64_t* offsets,
                  int64_t docs, int64_t p0, const float* G, int64_t R, int k, int32_t* codes) {
  simhash_codes_kernel<KMAX, EXACT>
      <<<grid, kCodePoints * kCodeReps, 0, s>>>(x, n, d, offsets, docs, p0, G, R, k, codes);
}

void dispatch_codes(dim3 grid, cudaStream_t s, const float* x, int64_t n, int64_t d, const int64_t* offsets,
                    int64_t docs, int64_t p0, const float* G, int64_t R, int k, int32_t* codes) {
  // Exact instantiations for the paper's k range (3..6 and neighbours); the
  // rest run a predicated loop over 16 or 30 accumulators.
#define EMBKERN_CODES(KM, EX) return launch_codes<KM, EX>(grid, s, x, n, d, offsets, docs, p0, G, R, k, codes)
  switch (k) {
    case 1: EMBKERN_CODES(1, true);
    case 2: EMBKERN_CODES(2, true);
    case 3: EMBKERN_CODES(3, true);
    case 4: EMBKERN_CODES(4, true);
    case 5: EMBKERN_CODES(5, true);
    case 6: EMBKERN_CODES(6, true);
    case 7: EMBKERN_CODES(7, true);
    case 8: EMBKERN_CODES(8, true);
    default: break;
  }
  if (k <= 16) EMBKERN_CODES(16, false);
  EMBKERN_CODES(kMaxSimhash, false);
#undef EMBKERN_CODES
}

// ---------------------------------------------------------------------------
// AMS inverse table: for repetition r and output coordinate c, the input
// dims i (ascending) with idx_i == c. One thread per (r, c) scans the d
// indices twice, so the table needs no sort and no atomics; d x d_p = 2048
// compares per repetition for the paper's (d=128, d_p=16).

__global__ void ams_inverse_kernel(const int32_t* __restrict__ idx, const float* __restrict__ sgn,
                                   int64_t R, int64_t d, int64_t dp, int32_t* __restrict__ inv_off,
                                   int32_t* __restrict__ inv_idx, float* __restrict__ inv_sgn) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= dp) return;
  for (int64_t r = blockIdx.y; r < R; r += gridDim.y) {
    const int32_t* ir = idx + r * d;
    int32_t less = 0, eq = 0;
    for (int64_t i = 0; i < d; ++i) {
      const int32_t v = __ldg(ir + i);
      less += (v >= 0 && v < c) ? 1 : 0;
      eq += (v == c) ? 1 : 0;
    }
    int32_t* off = inv_off + r * (dp + 1);
    off[c] = less;
    if (c == dp - 1) off[dp] = less + eq;
    int32_t t = less;
    for (int64_t i = 0; i < d && t < less + eq; ++i) {
      if (__ldg(ir + i) == c) {
        inv_idx[r * d + t] = static_cast<int32_t>(i);
        inv_sgn[r * d + t] = __ldg(sgn + r * d + i);
        ++t;
      }
    }
  }
}

// ---------------------------------------------------------------------------
// 2. Partition sums, averages, fill

constexpr int kWriteWarps = 4;

struct WriteArgs {
  const float* x;
  int64_t d;
  const int64_t* offsets;  // device, global
  int64_t doc0;            // first document of the chunk
  int64_t p0;              // first point of the chunk
  const int32_t* codes;    // [R][n_chunk]
  int64_t n_chunk;
  int64_t R;
  int k;
  int64_t dp;
  const int32_t* inv_off;  // AMS only: [R][dp+1]
  const int32_t* inv_idx;  // [R][d]
  const float* inv_sgn;    // [R][d]
  float* out;              // row 0 = first document of the chunk
  int64_t out_stride;      // floats between document rows
  int64_t reps_per_block;
  int64_t parts_per_block;
  bool average;
  bool fill;
  bool streaming;  // final output (evict-first stores) vs scratch read back soon
  bool staged;     // identity projection, every document of the chunk fits kStageFloats
};

// Identity projection: a block copies its document's points into shared
// memory once (n * d <= 12288 floats, 48 KB: 96 tokens at d = 128) and every
// warp reads the member rows from there. Unstaged, each of the R / rep_groups
// repetitions a block handles re-reads all n rows through L1/L2: more bytes
// of row reads per document than the bytes it writes.
constexpr int kStageFloats = 12288;
constexpr int kStagedWarps = 8;  // 48 KB a block: 4 blocks, 32 warps per SM

template <bool SMEM>
__device__ __forceinline__ float load_x(const float* p) {
  if (SMEM) return *p;  // generic load: shared memory must not go through ld.global.nc
  return __ldg(p);
}

// Y[p][c] of the (identity or AMS) projection for one point row with Eigen
// order `o` (AMS only); `off`, `ii`, `ss` are repetition r's rows of the AMS
// inverse table.
template <bool AMS, bool SMEM = false>
__device__ __forceinline__ float project(const float* row, int64_t c, int64_t d, const DotOrder& o,
                                         const int32_t* off, const int32_t* ii, const float* ss) {
  if (!AMS) return load_x<SMEM>(row + c);
  return ordered_sparse(ii, ss, __ldg(off + c), __ldg(off + c + 1), row, d, column_class(o, c), o.kc);
}

__device__ __forceinline__ void store(bool streaming, float* p, float v) {
  if (streaming) {
    __stcs(p, v);
  } else {
    *p = v;
  }
}

// The reference counts points in a float that it increments by 1.0f; that
// counter is exact up to 2^24 and then stays at 2^24 (2^24 + 1 rounds to
// even), so a partition with more points divides by 2^24.
__device__ __forceinline__ float reference_count(int64_t count) {
  return count >= (int64_t(1) << 24) ? 16777216.0f : static_cast<float>(count);
}

// Codes of the first kCachedChunks * 32 points of a document are held in
// registers (lane l: points l, l+32, ...; -1 past the end), so finding a
// partition's members is 4 ballots on registers; longer documents read the
// codes from global memory (L1-resident) on every scan.
constexpr int kCachedChunks = 4;

template <bool AMS, int M, bool STAGED = false>
__global__ void __launch_bounds__((STAGED ? kStagedWarps : kWriteWarps) * 32) fde_write_kernel(WriteArgs a) {
  constexpr int kWarps = STAGED ? kStagedWarps : kWriteWarps;
  static_assert(!(AMS && STAGED), "only the identity projection is staged");
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t doc = blockIdx.x;
  const int64_t start = a.offsets[a.doc0 + doc];
  const int64_t n = a.offsets[a.doc0 + doc + 1] - start;
  const int64_t num_parts = int64_t(1) << a.k;
  const int64_t r_begin = int64_t(blockIdx.y) * a.reps_per_block;
  const int64_t r_end = min(a.R, r_begin + a.reps_per_block);
  const int64_t P_begin = int64_t(blockIdx.z) * a.parts_per_block;
  const int64_t P_end = min(num_parts, P_begin + a.parts_per_block);
  const float* xdoc = a.x + start * a.d;
  if constexpr (STAGED) {
    // the host stages a chunk only when n * d <= kStageFloats for all its documents
    __shared__ float xs[kStageFloats];
    for (int64_t t = threadIdx.x; t < n * a.d; t += kWarps * 32) xs[t] = __ldg(xdoc + t);
    __syncthreads();
    xdoc = xs;
  }
  float* orow = a.out + doc * a.out_stride;
  const bool cached = n <= kCachedChunks * 32;
  // Eigen's blocking of this document's (n x d) by (d x d_p) AMS product
  // depends on n only, so it is computed once; each row's order is then a
  // few integer ops (row_order).
  int64_t kc = a.d, mc = n;
  if (AMS && n > 1) fde::eigen_blocking(n, a.d, a.dp, &kc, &mc);

  for (int64_t r = r_begin; r < r_end; ++r) {
    const int32_t* code = a.codes + r * a.n_chunk + (start - a.p0);
    float* orep = orow + r * num_parts * a.dp;
    const int32_t* aoff = AMS ? a.inv_off + r * (a.dp + 1) : nullptr;
    const int32_t* aidx = AMS ? a.inv_idx + r * a.d : nullptr;
    const float* asgn = AMS ? a.inv_sgn + r * a.d : nullptr;
    int32_t cc[kCachedChunks];
#pragma unroll
    for (int t = 0; t < kCachedChunks; ++t) {
      const int64_t q = 32 * t + lane;
      cc[t] = (cached && q < n) ? __ldg(code + q) : -1;
    }

    for (int64_t P = P_begin + warp; P < P_end; P += kWarps) {
      const int32_t want = static_cast<int32_t>(P);
      float* op = orep + P * a.dp;
      unsigned cmask[kCachedChunks];
      int64_t count = 0;
      if (cached) {
#pragma unroll
        for (int t = 0; t < kCachedChunks; ++t) {
          cmask[t] = __ballot_sync(kFullMask, cc[t] == want);
          count += __popc(cmask[t]);
        }
      } else {
        for (int64_t base = 0; base < n; base += 32) {
          const int64_t q = base + lane;
          count += __popc(__ballot_sync(kFullMask, q < n && __ldg(code + q) == want));
        }
      }
      if (count > 0) {
        const float denom = reference_count(count);
        for (int64_t c0 = 0; c0 < a.dp; c0 += 32 * M) {
          float acc[M];
#pragma unroll
          for (int m = 0; m < M; ++m) acc[m] = 0.0f;
          // Adds the members in `mask` (points base + bit, low bits first =
          // input order) to acc. Identity rows are fetched up to 4 members at
          // a time before the (still strictly ordered) adds, so their loads
          // overlap instead of serialising on the accumulator chain.
          auto add_members = [&](unsigned mask, int64_t base) {
            while (mask) {
              if (AMS) {
                const int b = __ffs(mask) - 1;
                mask &= mask - 1;
                const float* row = xdoc + (base + b) * a.d;
                const DotOrder o = row_order(n, a.d, a.dp, base + b, kc, mc);
#pragma unroll
                for (int m = 0; m < M; ++m) {
                  const int64_t c = c0 + lane + 32 * m;
                  if (c < a.dp) acc[m] = __fadd_rn(acc[m], project<AMS>(row, c, a.d, o, aoff, aidx, asgn));
                }
              } else {
                int bs[4];
                int got = 0;
#pragma unroll
                for (int u = 0; u < 4; ++u) {
                  bs[u] = mask ? __ffs(mask) - 1 : 0;
                  got += mask ? 1 : 0;
                  mask &= mask - 1;
                }
                float v[4][M];
#pragma unroll
                for (int u = 0; u < 4; ++u) {
                  const float* row = xdoc + (base + bs[u]) * a.d;
#pragma unroll
                  for (int m = 0; m < M; ++m) {
                    const int64_t c = c0 + lane + 32 * m;
                    v[u][m] = (u < got && c < a.dp) ? load_x<STAGED>(row + c) : 0.0f;
                  }
                }
#pragma unroll
                for (int u = 0; u < 4; ++u) {
                  if (u < got) {
#pragma unroll
                    for (int m = 0; m < M; ++m) acc[m] = __fadd_rn(acc[m], v[u][m]);
                  }
                }
              }
            }
          };
          if (cached) {
#pragma unroll
            for (int t = 0; t < kCachedChunks; ++t) add_members(cmask[t], 32 * t);
          } else {
            for (int64_t base = 0; base < n; base += 32) {
              const int64_t q = base + lane;
              add_members(__ballot_sync(kFullMask, q < n && __ldg(code + q) == want), base);
            }
          }
#pragma unroll
          for (int m = 0; m < M; ++m) {
            const int64_t c = c0 + lane + 32 * m;
            if (c < a.dp) store(a.streaming, op + c, a.average ? __fdiv_rn(acc[m], denom) : acc[m]);
          }
        }
      } else if (a.fill && a.k > 0 && n > 0) {
        // Nearest point by Hamming distance between its sign bits and the
        // partition's sign pattern P ^ (P >> 1); ties to the lowest index:
        // the (distance, index) pair packed into 64 bits orders exactly so.
        const uint32_t target = static_cast<uint32_t>(P) ^ (static_cast<uint32_t>(P) >> 1);
        unsigned long long best = ~0ull;
        auto consider = [&](int64_t q, int32_t c) {
          const uint32_t part = static_cast<uint32_t>(c);
          const uint32_t bits = part ^ (part >> 1);
          const unsigned long long key =
              (static_cast<unsigned long long>(__popc(bits ^ target)) << 32) | static_cast<unsigned long long>(q);
          best = key < best ? key : best;
        };
        if (cached) {
#pragma unroll
          for (int t = 0; t < kCachedChunks; ++t) {
            if (32 * t + lane < n) consider(32 * t + lane, cc[t]);
          }
        } else {
          for (int64_t q = lane; q < n; q += 32) consider(q, __ldg(code + q));
        }
#pragma unroll
        for (int s = 16; s > 0; s >>= 1) {
          const unsigned long long other = __shfl_xor_sync(kFullMask, best, s);
          best = other < best ? other : best;
        }
        const int64_t q = static_cast<int64_t>(best & 0xffffffffull);
        const float* row = xdoc + q * a.d;
        const DotOrder o = AMS ? row_order(n, a.d, a.dp, q, kc, mc) : DotOrder{fde::kPlain, a.d, 0};
        for (int64_t c = lane; c < a.dp; c += 32)
          store(a.streaming, op + c, project<AMS, STAGED>(row, c, a.d, o, aoff, aidx, asgn));
      } else {
        for (int64_t c = lane; c < a.dp; c += 32) store(a.streaming, op + c, 0.0f);
      }
    }
  }
}

template <bool AMS>
void dispatch_write(dim3 grid, cudaStream_t s, const WriteArgs& a) {
  // Lane l owns coordinates l + 32 m, m < M, per pass: one pass covers
  // d_p <= 128 (ColBERT d = 128) with 4 accumulators per lane.
  if (!AMS && a.staged) {
    if (a.dp <= 32) {
      fde_write_kernel<false, 1, true><<<grid, kStagedWarps * 32, 0, s>>>(a);
    } else if (a.dp <= 64) {
      fde_write_kernel<false, 2, true><<<grid, kStagedWarps * 32, 0, s>>>(a);
    } else {
      fde_write_kernel<false, 4, true><<<grid, kStagedWarps * 32, 0, s>>>(a);
    }
    return;
  }
  if (a.dp <= 32) {
    fde_write_kernel<AMS, 1><<<grid, kWriteWarps * 32, 0, s>>>(a);
  } else if (a.dp <= 64) {
    fde_write_kernel<AMS, 2><<<grid, kWriteWarps * 32, 0, s>>>(a);
  } else {
    fde_write_kernel<AMS, 4><<<grid, kWriteWarps * 32, 0, s>>>(a);
  }
}

// ---------------------------------------------------------------------------
// 3. Count sketch: a warp is 32 documents (lanes) of one bucket, so the
// bucket's member indices and signs are warp-uniform loads; 8 buckets per block.
constexpr int kSketchBuckets = 8;

__global__ void __launch_bounds__(kSketchBuckets * 32)
    count_sketch_kernel(const float* __restrict__ v, int64_t L, int64_t docs,
                        const int64_t* __restrict__ cs_off, const int64_t* __restrict__ cs_mem,
                        const float* __restrict__ cs_sgn, int64_t cs_len, int64_t D,
                        float* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t j = int64_t(blockIdx.x) * kSketchBuckets + warp;
  const int64_t doc = int64_t(blockIdx.y) * 32 + lane;
  if (j >= D || doc >= docs) return;
  int64_t b = __ldg(cs_off + j), e = __ldg(cs_off + j + 1);
  b = b < 0 ? 0 : b;
  e = e > cs_len ? cs_len : e;
  const float* vd = v + doc * L;
  float acc = 0.0f;
  for (int64_t t = b; t < e; ++t) {
    const int64_t i = __ldg(cs_mem + t);
    if (i >= 0 && i < L) acc = __fadd_rn(acc, __fmul_rn(__ldg(cs_sgn + t), vd[i]));
  }
  __stcs(out + doc * D + j, acc);
}

// ---------------------------------------------------------------------------
// Host side: validation, chunk planning, launches

struct Chunk {
  int64_t b0, b1;  // documents [b0, b1)
  int64_t p0, p1;  // points [p0, p1)
};

constexpr int64_t kAlign = 256;
inline int64_t align_up(int64_t v) { return (v + kAlign - 1) / kAlign * kAlign; }

// Documents per chunk for the count-sketch grid (y = ceil(docs/32) <= 65535).
constexpr int64_t kMaxChunkDocs = int64_t(65535) * 32;
static_assert(kMaxRepetitions == int64_t(65535) * kCodeReps, "R is split over gridDim.y in groups of kCodeReps");

// The preconditions fde_cuda.h lists (the csrc/ boundary checks them, with
// messages); debug builds assert them.
[[maybe_unused]] bool preconditions(const Problem& p) {
  const bool ok =
      p.dim >= 1 && p.dim <= kMaxDimension && p.num_points >= 0 && p.num_docs >= 0 && p.num_repetitions >= 1 &&
      p.num_repetitions <= kMaxRepetitions && p.num_simhash >= 0 && p.num_simhash <= kMaxSimhash &&
      p.projection_dim >= 1 && p.projection_dim <= kMaxProjectionDim &&
      (p.ams_index == nullptr) == (p.ams_sign == nullptr) && (p.ams_index != nullptr || p.projection_dim == p.dim) &&
      (!p.fill_empty || p.is_document) && (p.num_simhash == 0 || p.simhash != nullptr) && p.final_dim >= 0 &&
      p.chunk_budget_bytes > 0 && (p.num_points == 0 || p.points != nullptr) &&
      fde_fits_one_launch(p.num_points, p.num_repetitions);
  if (!ok) return false;
  const int64_t row_len = fde_row_length(p.num_repetitions, p.num_simhash, p.projection_dim, nullptr);
  if (row_len < 0) return false;
  if (p.final_dim > 0 && (p.cs_offsets == nullptr || p.cs_len != row_len ||
                          (p.cs_len > 0 && (p.cs_members == nullptr || p.cs_signs == nullptr))))
    return false;
  if (p.num_docs == 0) return p.num_points == 0;
  const int64_t* o = p.offsets_host;
  if (o == nullptr || o[0] != 0 || o[p.num_docs] != p.num_points) return false;
  for (int64_t b = 0; b < p.num_docs; ++b)
    if (o[b + 1] < o[b] || o[b + 1] - o[b] > kMaxDocPoints) return false;
  return true;
}

// Greedy chunks: each adds documents while codes + count-sketch scratch stay
// within the budget (always >= 1 document).
std::vector<Chunk> plan(const Problem& p, int64_t row_len, int64_t* max_scratch) {
  std::vector<Chunk> chunks;
  *max_scratch = 0;
  const int64_t* o = p.offsets_host;
  const int64_t R = p.num_repetitions;
  const int64_t v_per_doc = p.final_dim > 0 ? row_len * int64_t(sizeof(float)) : 0;
  int64_t b = 0;
  while (b < p.num_docs) {
    Chunk c{b, b, o[b], o[b]};
    int64_t bytes = 0;
    while (c.b1 < p.num_docs && c.b1 - c.b0 < kMaxChunkDocs) {
      const int64_t n_next = o[c.b1 + 1] - c.p0;
      const int64_t nb = align_up(n_next * R * int64_t(sizeof(int32_t))) + (c.b1 + 1 - c.b0) * v_per_doc;
      if (c.b1 > c.b0 && nb > p.chunk_budget_bytes) break;
      bytes = nb;
      ++c.b1;
    }
    c.p1 = o[c.b1];
    chunks.push_back(c);
    *max_scratch = std::max(*max_scratch, bytes);
    b = c.b1;
  }
  return chunks;
}

int64_t ams_bytes(const Problem& p) {
  if (p.ams_index == nullptr) return 0;
  const int64_t R = p.num_repetitions;
  return align_up(R * (p.projection_dim + 1) * 4) + align_up(R * p.dim * 4) + align_up(R * p.dim * 4);
}

struct DeviceGuard {
  int prev = -1;
  bool switched = false;
  cudaError_t enter(int device) {
    cudaError_t st = cudaGetDevice(&prev);
    if (st != cudaSuccess) return st;
    if (prev != device) {
      st = cudaSetDevice(device);
      if (st != cudaSuccess) return st;
      switched = true;
    }
    return cudaSuccess;
  }
  ~DeviceGuard() {
    if (switched) cudaSetDevice(prev);
  }
};

Status cuda_fail(std::string* error, const char* what, cudaError_t st) {
  if (error) *error = std::string("embkern fde (CUDA): ") + what + ": " + cudaGetErrorString(st);
  cudaGetLastError();  // clear a non-sticky error so the next call starts clean
  return Status::CudaError;
}

}  // namespace

bool fde_fits_one_launch(int64_t num_points, int64_t num_repetitions) {
  // the codes kernel's 1-d grid: point tiles x repetition groups < 2^31
  return num_points >= 0 && num_repetitions >= 1 &&
         (num_points / kCodePoints + 1) <= INT32_MAX / ((num_repetitions + kCodeReps - 1) / kCodeReps);
}

int64_t fde_row_length(int64_t num_repetitions, int num_simhash, int64_t projection_dim, std::string* error) {
  assert(num_repetitions >= 1 && num_simhash >= 0 && num_simhash <= kMaxSimhash && projection_dim >= 1);
  // R * 2^k * d_p must fit in int64 with room for a document-row offset.
  const int64_t limit = int64_t(1) << 62;
  const int64_t parts = int64_t(1) << num_simhash;
  if (projection_dim > limit / parts || num_repetitions > limit / (parts * projection_dim)) {
    if (error)
      *error = "output: R * 2^k * projection_dim = " + std::to_string(num_repetitions) + " * 2^" +
               std::to_string(num_simhash) + " * " + std::to_string(projection_dim) + " overflows int64";
    return -1;
  }
  return num_repetitions * parts * projection_dim;
}

int64_t fde_workspace_bytes(const Problem& p, std::string* error) {
  assert(preconditions(p));
  const int64_t row_len = fde_row_length(p.num_repetitions, p.num_simhash, p.projection_dim, error);
  int64_t scratch = 0;
  plan(p, row_len, &scratch);
  return ams_bytes(p) + scratch;
}

Status fde_encode(const Problem& p, void* workspace, int64_t workspace_bytes, int device, void* stream_ptr,
                  std::string* error) {
  [[maybe_unused]] const int64_t need = fde_workspace_bytes(p, error);
  assert(workspace_bytes >= need && (need == 0 || workspace != nullptr));
  if (p.num_docs == 0) return Status::Ok;
  assert(p.out != nullptr);

  DeviceGuard guard;
  cudaError_t st = guard.enter(device);
  if (st != cudaSuccess) return cuda_fail(error, "selecting the device", st);
  cudaStream_t s = static_cast<cudaStream_t>(stream_ptr);

  int sms = 0;
  st = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (st != cudaSuccess) return cuda_fail(error, "querying the SM count", st);

  const int64_t R = p.num_repetitions;
  const int64_t d = p.dim;
  const int64_t dp = p.projection_dim;
  const int k = p.num_simhash;
  const int64_t num_parts = int64_t(1) << k;
  const int64_t row_len = R * num_parts * dp;
  const bool ams = p.ams_index != nullptr;

  char* ws = static_cast<char*>(workspace);
  WriteArgs a{};
  if (ams) {
    a.inv_off = reinterpret_cast<int32_t*>(ws);
    ws += align_up(R * (dp + 1) * 4);
    a.inv_idx = reinterpret_cast<int32_t*>(ws);
    ws += align_up(R * d * 4);
    a.inv_sgn = reinterpret_cast<float*>(ws);
    ws += align_up(R * d * 4);
    dim3 grid(static_cast<unsigned>((dp + 127) / 128), static_cast<unsigned>(std::min<int64_t>(R, 65535)));
    ams_inverse_kernel<<<grid, 128, 0, s>>>(p.ams_index, p.ams_sign, R, d, dp, const_cast<int32_t*>(a.inv_off),
                                           const_cast<int32_t*>(a.inv_idx), const_cast<float*>(a.inv_sgn));
    st = cudaGetLastError();
    if (st != cudaSuccess) return cuda_fail(error, "ams_inverse_kernel launch", st);
  }

  int64_t max_scratch = 0;
  const std::vector<Chunk> chunks = plan(p, row_len, &max_scratch);
  int32_t* codes = reinterpret_cast<int32_t*>(ws);

  a.x = p.points;
  a.d = d;
  a.offsets = p.offsets;
  a.R = R;
  a.k = k;
  a.dp = dp;
  a.average = p.is_document;
  a.fill = p.fill_empty && p.is_document;

  // About 32 resident 128-thread blocks per SM keep the stores flowing; split
  // the repetitions, then the partitions, across blocks only when there are
  // too few documents to fill the GPU (large batches keep all R repetitions
  // of a document in one block so its points stay in L1).
  const int64_t target_all = int64_t(32) * std::max(sms, 1);

  for (const Chunk& c : chunks) {
    const int64_t docs = c.b1 - c.b0;
    const int64_t n_c = c.p1 - c.p0;
    float* v = nullptr;
    if (p.final_dim > 0) v = reinterpret_cast<float*>(ws + align_up(n_c * R * 4));

    if (n_c > 0) {
      if (k > 0) {
        dim3 grid(static_cast<unsigned>((n_c + kCodePoints - 1) / kCodePoints * ((R + kCodeReps - 1) / kCodeReps)));
        dispatch_codes(grid, s, p.points + c.p0 * d, n_c, d, p.offsets + c.b0, docs, c.p0, p.simhash, R, k, codes);
        st = cudaGetLastError();
        if (st != cudaSuccess) return cuda_fail(error, "simhash_codes_kernel launch", st);
      } else {
        st = cudaMemsetAsync(codes, 0, static_cast<size_t>(n_c * R) * sizeof(int32_t), s);
        if (st != cudaSuccess) return cuda_fail(error, "clearing the partition codes", st);
      }
    }

    int64_t max_len = 0;
    for (int64_t b = c.b0; b < c.b1; ++b) max_len = std::max(max_len, p.offsets_host[b + 1] - p.offsets_host[b]);
    a.staged = !ams && max_len * d <= kStageFloats;
    const int64_t warps = a.staged ? kStagedWarps : kWriteWarps;
    // A staged block re-reads nothing, so it keeps as many repetitions as it can:
    // two waves of the 4 resident 48 KB blocks per SM before splitting them.
    const int64_t target_blocks = a.staged ? int64_t(8) * std::max(sms, 1) : target_all;

    int64_t rep_groups = 1;
    if (docs < target_blocks) rep_groups = std::min<int64_t>(R, (target_blocks + docs - 1) / docs);
    rep_groups = std::min<int64_t>(rep_groups, 65535);
    const int64_t reps_per_block = (R + rep_groups - 1) / rep_groups;
    rep_groups = (R + reps_per_block - 1) / reps_per_block;
    int64_t part_tiles = 1;
    if (docs * rep_groups < target_blocks)
      part_tiles = std::min<int64_t>((num_parts + warps - 1) / warps,
                                     (target_blocks + docs * rep_groups - 1) / (docs * rep_groups));
    part_tiles = std::max<int64_t>(part_tiles, (num_parts + int64_t(65535) * warps - 1) /
                                                   (int64_t(65535) * warps));
    part_tiles = std::min<int64_t>(part_tiles, 65535);
    const int64_t parts_per_block = (num_parts + part_tiles - 1) / part_tiles;
    part_tiles = (num_parts + parts_per_block - 1) / parts_per_block;

    a.doc0 = c.b0;
    a.p0 = c.p0;
    a.codes = codes;
    a.n_chunk = n_c;
    a.reps_per_block = reps_per_block;
    a.parts_per_block = parts_per_block;
    if (p.final_dim > 0) {
      a.out = v;
      a.out_stride = row_len;
      a.streaming = false;
    } else {
      a.out = p.out + c.b0 * row_len;
      a.out_stride = row_len;
      a.streaming = true;
    }
    dim3 grid(static_cast<unsigned>(docs), static_cast<unsigned>(rep_groups), static_cast<unsigned>(part_tiles));
    if (ams) {
      dispatch_write<true>(grid, s, a);
    } else {
      dispatch_write<false>(grid, s, a);
    }
    st = cudaGetLastError();
    if (st != cudaSuccess) return cuda_fail(error, "fde_write_kernel launch", st);

    if (p.final_dim > 0) {
      dim3 g2(static_cast<unsigned>((p.final_dim + kSketchBuckets - 1) / kSketchBuckets),
              static_cast<unsigned>((docs + 31) / 32));
      count_sketch_kernel<<<g2, kSketchBuckets * 32, 0, s>>>(v, row_len, docs, p.cs_offsets, p.cs_members,
                                                             p.cs_signs, p.cs_len, p.final_dim,
                                                             p.out + c.b0 * p.final_dim);
      st = cudaGetLastError();
      if (st != cudaSuccess) return cuda_fail(error, "count_sketch_kernel launch", st);
    }
  }
  return Status::Ok;
}

}  // namespace fde_cuda
}  // namespace embkern
