// Private blocked-GEMM building blocks for the CPU kernels (fp32 / fp64).
//
// Two register-tile routines, AVX2+FMA and AVX-512 (zmm tiles at the avx512 level) with a
// portable scalar fallback, written once as templates over a vector
// descriptor (detail::Vec<T, bits>):
//
//   tile_nt   C (rows x NR)  = A (rows x K) . Bp^T      A row-major (any lda), Bp packed
//   tile_ax   O (M x K)     += A (M x R) . X (R x K)   A strided (sm, sr), X row-major
//
// Determinism contract (what the fused epilogues of the callers rely on):
// every output element of tile_nt is ONE fused-multiply-add chain over
// k = 0, 1, ..., K-1 starting from +0, whatever its position in the tile, the
// number of valid rows, or the thread that runs it. dot_chain() is that same
// chain for a single pair of rows, so a lone score recomputed with dot_chain()
// is bit-identical to the value a tile produced. tile_ax accumulates each
// output element as one FMA chain over r = 0..R-1 continuing from the value
// already in O, so splitting R over calls in a fixed order is deterministic.
//
// Register budget (AVX2 has 16 ymm): MR = 6 broadcast rows x 2 vectors of
// accumulators = 12, plus 2 vector loads and 1 broadcast = 15.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define EMBKERN_GEMM_AVX2 1
#endif

#ifndef EMBKERN_ISA_NS
#error "gemm_kernel.h is compiled once per ISA level: build this source through a per-level object library"
#endif

// Inside the level's namespace, so that an inline function compiled for avx2
// is never the copy the linker keeps for a generic caller.
namespace embkern {
namespace gemm {
namespace EMBKERN_ISA_NS {

template <typename T>
struct Tile;
// NR = 2 AVX2 vectors: 16 floats / 8 doubles per packed panel row.
template <>
struct Tile<float> {
  static constexpr int MR = 6;
  static constexpr int NR = 16;
  static constexpr int W = 8;  // lanes per vector
};
template <>
struct Tile<double> {
  static constexpr int MR = 6;
  static constexpr int NR = 8;
  static constexpr int W = 4;
};

// One multiply-add, always fused (one rounding), at every ISA level: the
// vector kernels use FMA instructions, so the scalar tile must too, or ranks
// and top-k indices would depend on the CPU. Without hardware FMA in the
// build flags (the generic level) std::fma is libm's correctly rounded fma:
// exact, but a library call per term, so the generic score tile is far
// slower than the vector levels (every x86-64 CPU since 2013 runs avx2).
inline float mac(float a, float b, float c) { return std::fma(a, b, c); }
inline double mac(double a, double b, double c) { return std::fma(a, b, c); }

// ---------------------------------------------------------------------------
// 64-byte aligned scratch buffer (std::vector cannot promise the alignment).
template <typename T>
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(size_t n) { resize(n); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& o) noexcept : p_(o.p_), n_(o.n_) { o.p_ = nullptr; o.n_ = 0; }
  ~Buffer() { std::free(p_); }
  void resize(size_t n) {
    if (n <= n_) return;
    std::free(p_);
    size_t bytes = ((n * sizeof(T) + 63) / 64) * 64;
    p_ = static_cast<T*>(std::aligned_alloc(64, bytes ? bytes : 64));
    if (!p_) throw std::bad_alloc();
    n_ = n;
  }
  void zero(size_t n) { std::memset(p_, 0, n * sizeof(T)); }
  T* data() { return p_; }
  const T* data() const { return p_; }
  T& operator[](size_t i) { return p_[i]; }
  const T& operator[](size_t i) const { return p_[i]; }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

// ---------------------------------------------------------------------------
// Packing: rows [0, rows) of X (row-major, ld) into one k-major panel
// dst[k*NR + j] = X[j*ld + k], j < NR, zero-padded for j >= rows.
template <typename T>
inline void pack_panel(const T* X, int64_t rows, int64_t K, int64_t ld, T* dst) {
  constexpr int NR = Tile<T>::NR;
  if (rows < NR) std::memset(dst, 0, sizeof(T) * static_cast<size_t>(NR * K));
  for (int64_t j = 0; j < rows; ++j) {
    const T* x = X + j * ld;
    for (int64_t k = 0; k < K; ++k) dst[k * NR + j] = x[k];
  }
}

// The chain one tile_nt lane computes, for one pair of rows.
template <typename T>
inline T dot_chain(const T* a, const T* b, int64_t K) {
  T acc = T(0);
  for (int64_t k = 0; k < K; ++k) acc = mac(a[k], b[k], acc);
  return acc;
}

// Plain sum with the same fixed lane structure: vectorisable (the lanes are
// explicit, no reassociation needed) and identical at every call site. A
// one-accumulator loop is a latency-bound add chain: 4 cycles per element.
template <typename T>
inline T fixed_sum(const T* x, int64_t n) {
  constexpr int L = 8;
  T lane[L] = {};
  int64_t k = 0;
  for (; k + L <= n; k += L)
    for (int l = 0; l < L; ++l) lane[l] += x[k + l];
  T tail = T(0);
  for (; k < n; ++k) tail += x[k];
  return ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7])) + tail;
}

// ---------------------------------------------------------------------------
// Vector descriptors: one struct per (element type, vector width) holding the
// register type and the handful of operations the micro-kernels use. The
// kernels below are templates over a descriptor, so one body serves fp32 and
// fp64 (and 128/256/512-bit vectors) with the same operation order.

namespace detail {

template <typename T, int Bits>
struct Vec;

#ifdef EMBKERN_GEMM_AVX2
template <>
struct Vec<float, 256> {
  using V = __m256;
  static constexpr int kLanes = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_load_ps(p); }  // 32-byte aligned
  static V loadu(const float* p) { return _mm256_loadu_ps(p); }
  static void storeu(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
};
template <>
struct Vec<double, 256> {
  using V = __m256d;
  static constexpr int kLanes = 4;
  static V zero() { return _mm256_setzero_pd(); }
  static V load(const double* p) { return _mm256_load_pd(p); }
  static V loadu(const double* p) { return _mm256_loadu_pd(p); }
  static void storeu(double* p, V v) { _mm256_storeu_pd(p, v); }
  static V bcast(const double* p) { return _mm256_broadcast_sd(p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
};
// The 4-column strip of fp32 tile_ax.
template <>
struct Vec<float, 128> {
  using V = __m128;
  static constexpr int kLanes = 4;
  static V loadu(const float* p) { return _mm_loadu_ps(p); }
  static void storeu(float* p, V v) { _mm_storeu_ps(p, v); }
  static V bcast(const float* p) { return _mm_broadcast_ss(p); }
  static V fma(V a, V b, V c) { return _mm_fmadd_ps(a, b, c); }
};
#endif

#if defined(__AVX512F__)
template <>
struct Vec<float, 512> {
  using V = __m512;
  static constexpr int kLanes = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_load_ps(p); }  // 64-byte aligned
  static V loadu(const float* p) { return _mm512_loadu_ps(p); }
  static void storeu(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V bcast(const float* p) { return _mm512_set1_ps(*p); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
};
template <>
struct Vec<double, 512> {
  using V = __m512d;
  static constexpr int kLanes = 8;
  static V zero() { return _mm512_setzero_pd(); }
  static V load(const double* p) { return _mm512_load_pd(p); }
  static V loadu(const double* p) { return _mm512_loadu_pd(p); }
  static void storeu(double* p, V v) { _mm512_storeu_pd(p, v); }
  static V bcast(const double* p) { return _mm512_set1_pd(*p); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
};
#endif

}  // namespace detail

// Sum of squares with a fixed lane structure (same result at every call site
// and ISA level): lane l is one FMA chain over x[l], x[l + 8], ..., the tail
// past the last whole group of 8 a separate chain, then a fixed tree. The
// vector levels hold the 8 lanes in registers (1 or 2 ymm): GCC 12 did not
// vectorise the scalar loop under -ffp-contract=off, and the |E|^2 pass of a
// distance score ran at one scalar FMA per element, 12% of a B = 128
// FB15k-237 score_all on an AVX-512 Xeon.
template <typename T>
inline T sqnorm(const T* x, int64_t K) {
  constexpr int L = 8;
  alignas(64) T lane[L] = {};
  int64_t k = 0;
#ifdef EMBKERN_GEMM_AVX2
  using D = detail::Vec<T, 256>;
  using V = typename D::V;
  constexpr int NV = L / D::kLanes;  // 1 (fp32) or 2 (fp64)
  V acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = D::zero();
  for (; k + L <= K; k += L)
    for (int v = 0; v < NV; ++v) {
      const V t = D::loadu(x + k + v * D::kLanes);
      acc[v] = D::fma(t, t, acc[v]);
    }
  for (int v = 0; v < NV; ++v) D::storeu(lane + v * D::kLanes, acc[v]);
#else
  for (; k + L <= K; k += L)
    for (int l = 0; l < L; ++l) lane[l] = mac(x[k + l], x[k + l], lane[l]);
#endif
  T tail = T(0);
  for (; k < K; ++k) tail = mac(x[k], x[k], tail);
  return ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7])) + tail;
}

// ---------------------------------------------------------------------------
// tile_nt: C[i*ldc + j] = sum_k A[i*lda + k] * Bp[k*NR + j], i < rows (<= MR), j < NR.

namespace detail {

template <typename T, int R>
inline void tile_nt_scalar(int64_t K, const T* A, int64_t lda, const T* Bp, T* C, int64_t ldc) {
  constexpr int NR = Tile<T>::NR;
  T acc[R][NR];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = T(0);
  for (int64_t k = 0; k < K; ++k) {
    const T* b = Bp + k * NR;
    for (int i = 0; i < R; ++i) {
      const T a = A[i * lda + k];
      for (int j = 0; j < NR; ++j) acc[i][j] = mac(a, b[j], acc[i][j]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NR; ++j) C[i * ldc + j] = acc[i][j];
}

#ifdef EMBKERN_GEMM_AVX2
// One packed panel (NR = 2 vectors of descriptor D) against 6 rows of A.
// Twelve named accumulators: GCC spills an array of 256-bit vectors to the
// stack on every k step here. Rows >= `rows` re-read row 0 and are not
// stored, so every valid lane still sees exactly its own FMA chain.
template <class D, typename T>
inline void tile_nt_2v(int rows, int64_t K, const T* A, int64_t lda, const T* Bp, T* C, int64_t ldc) {
  using V = typename D::V;
  constexpr int64_t H = D::kLanes, NR = 2 * D::kLanes;
  static_assert(NR == Tile<T>::NR, "a packed panel row is two vectors");
  const T* a0 = A;
  const T* a1 = rows > 1 ? A + lda : A;
  const T* a2 = rows > 2 ? A + 2 * lda : A;
  const T* a3 = rows > 3 ? A + 3 * lda : A;
  const T* a4 = rows > 4 ? A + 4 * lda : A;
  const T* a5 = rows > 5 ? A + 5 * lda : A;
  V c00 = D::zero(), c01 = D::zero(), c10 = D::zero(), c11 = D::zero(), c20 = D::zero(), c21 = D::zero();
  V c30 = D::zero(), c31 = D::zero(), c40 = D::zero(), c41 = D::zero(), c50 = D::zero(), c51 = D::zero();
  for (int64_t k = 0; k < K; ++k) {
    const V b0 = D::load(Bp + NR * k);
    const V b1 = D::load(Bp + NR * k + H);
    V t = D::bcast(a0 + k);
    c00 = D::fma(t, b0, c00);
    c01 = D::fma(t, b1, c01);
    t = D::bcast(a1 + k);
    c10 = D::fma(t, b0, c10);
    c11 = D::fma(t, b1, c11);
    t = D::bcast(a2 + k);
    c20 = D::fma(t, b0, c20);
    c21 = D::fma(t, b1, c21);
    t = D::bcast(a3 + k);
    c30 = D::fma(t, b0, c30);
    c31 = D::fma(t, b1, c31);
    t = D::bcast(a4 + k);
    c40 = D::fma(t, b0, c40);
    c41 = D::fma(t, b1, c41);
    t = D::bcast(a5 + k);
    c50 = D::fma(t, b0, c50);
    c51 = D::fma(t, b1, c51);
  }
  D::storeu(C, c00);
  D::storeu(C + H, c01);
  if (rows > 1) { D::storeu(C + ldc, c10); D::storeu(C + ldc + H, c11); }
  if (rows > 2) { D::storeu(C + 2 * ldc, c20); D::storeu(C + 2 * ldc + H, c21); }
  if (rows > 3) { D::storeu(C + 3 * ldc, c30); D::storeu(C + 3 * ldc + H, c31); }
  if (rows > 4) { D::storeu(C + 4 * ldc, c40); D::storeu(C + 4 * ldc + H, c41); }
  if (rows > 5) { D::storeu(C + 5 * ldc, c50); D::storeu(C + 5 * ldc + H, c51); }
}
#endif

}  // namespace detail

// Bp must be 32-byte aligned (pack into a Buffer). 1 <= rows <= MR.
template <typename T>
inline void tile_nt(int rows, int64_t K, const T* A, int64_t lda, const T* Bp, T* C, int64_t ldc) {
#ifdef EMBKERN_GEMM_AVX2
  detail::tile_nt_2v<detail::Vec<T, 256>>(rows, K, A, lda, Bp, C, ldc);
#else
  switch (rows) {
    case 6: detail::tile_nt_scalar<T, 6>(K, A, lda, Bp, C, ldc); break;
    case 5: detail::tile_nt_scalar<T, 5>(K, A, lda, Bp, C, ldc); break;
    case 4: detail::tile_nt_scalar<T, 4>(K, A, lda, Bp, C, ldc); break;
    case 3: detail::tile_nt_scalar<T, 3>(K, A, lda, Bp, C, ldc); break;
    case 2: detail::tile_nt_scalar<T, 2>(K, A, lda, Bp, C, ldc); break;
    case 1: detail::tile_nt_scalar<T, 1>(K, A, lda, Bp, C, ldc); break;
    default: break;
  }
#endif
}

// tile_nt over `np` consecutive packed panels (Bp + p*NR*K): C[i*ldc + p*NR + j].
// At the avx512 level up to four panels go through one 6 x 4-zmm register
// tile (24 accumulators; per k: 4 panel loads + 6 broadcasts for 24 FMAs,
// against 2 + 6 for 12 at 256 bits), same bits: each lane is still one FMA
// chain over k = 0..K-1.
#if defined(__AVX512F__)
namespace detail {
// Rows >= `rows` re-read row 0 and are not stored (as the 256-bit tile).
// The accumulator array is fully unrolled, so it lives in registers.
//
// PF: at each new cache line of the six rows, prefetch the same line of the
// six rows below (rows 6..11 from A; the caller's next tile). The tile
// reads its rows as six strided streams, which the hardware prefetchers
// follow poorly: on an AVX-512 Xeon, 1 thread, B = 128 FB15k-237 inner
// score_all went from 14.6 ms to 10.8 ms (best of 4 alternated runs of 40
// calls) and the same as a separate read pass over each block before its
// tiles (12.5 ms). A prefetch never faults, so the last tile of a table
// prefetching past its end is harmless. Only this 512-bit level has it: a
// software prefetch was measured not to pay on the AVX2 (AMD EPYC) host.
template <typename T, int NP, bool PF = false>
inline void tile_nt_zmm(int rows, int64_t K, const T* A, int64_t lda, const T* Bp, T* C, int64_t ldc) {
  using Z = Vec<T, 512>;
  using V = typename Z::V;
  constexpr int NR = Tile<T>::NR;
  static_assert(NR == Z::kLanes, "one zmm per packed panel row");
  const T* a[6];
  for (int i = 0; i < 6; ++i) a[i] = i < rows ? A + i * lda : A;
  V c[6][NP];
#pragma GCC unroll 6
  for (int i = 0; i < 6; ++i)
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) c[i][p] = Z::zero();
  for (int64_t k = 0; k < K; ++k) {
    if (PF && (k & (64 / sizeof(T) - 1)) == 0) {
#pragma GCC unroll 6
      for (int i = 0; i < 6; ++i) __builtin_prefetch(a[i] + 6 * lda + k, 0, 3);
    }
    V b[NP];
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) b[p] = Z::load(Bp + p * NR * K + NR * k);
#pragma GCC unroll 6
    for (int i = 0; i < 6; ++i) {
      const V t = Z::bcast(a[i] + k);
#pragma GCC unroll 4
      for (int p = 0; p < NP; ++p) c[i][p] = Z::fma(t, b[p], c[i][p]);
    }
  }
  for (int i = 0; i < rows; ++i)
    for (int p = 0; p < NP; ++p) Z::storeu(C + i * ldc + p * NR, c[i][p]);
}

// One group of NP panels, with or without the next-row prefetch.
template <typename T, int NP>
inline void zmm_group(bool pf, int rows, int64_t K, const T* A, int64_t lda, const T* Bp, T* C, int64_t ldc) {
  if (pf) tile_nt_zmm<T, NP, true>(rows, K, A, lda, Bp, C, ldc);
  else tile_nt_zmm<T, NP>(rows, K, A, lda, Bp, C, ldc);
}
}  // namespace detail
#endif

// Bp 64-byte aligned (a Buffer), panels NR*K apart. 1 <= rows <= MR.
template <typename T>
inline void tile_nt_panels(int rows, int64_t K, const T* A, int64_t lda, const T* Bp, int64_t np, T* C,
                           int64_t ldc) {
  constexpr int NR = Tile<T>::NR;
#if defined(__AVX512F__)
  // Only the first group of a full 6-row tile prefetches the next six rows
  // (the following groups read the same rows again).
  const bool pf6 = rows == 6;
  int64_t p = 0;
  for (; p + 4 <= np; p += 4)
    detail::zmm_group<T, 4>(pf6 && p == 0, rows, K, A, lda, Bp + p * NR * K, C + p * NR, ldc);
  const bool pf = pf6 && p == 0;
  const T* Bt = Bp + p * NR * K;
  T* Ct = C + p * NR;
  switch (np - p) {
    case 3: detail::zmm_group<T, 3>(pf, rows, K, A, lda, Bt, Ct, ldc); break;
    case 2: detail::zmm_group<T, 2>(pf, rows, K, A, lda, Bt, Ct, ldc); break;
    case 1: detail::zmm_group<T, 1>(pf, rows, K, A, lda, Bt, Ct, ldc); break;
    default: break;
  }
#else
  for (int64_t p = 0; p < np; ++p) tile_nt(rows, K, A, lda, Bp + p * NR * K, C + p * NR, ldc);
#endif
}

// ---------------------------------------------------------------------------
// tile_ax: O[m*ldo + k] += sum_{r<R} A[m*sm + r*sr] * X[r*ldx + k], m < M (<= MR), k < K.

namespace detail {

template <typename T, int M>
inline void ax_scalar_cols(int64_t R, int64_t k0, int64_t k1, const T* A, int64_t sm, int64_t sr, const T* X,
                           int64_t ldx, T* O, int64_t ldo) {
  for (int64_t k = k0; k < k1; ++k) {
    T acc[M];
    for (int i = 0; i < M; ++i) acc[i] = O[i * ldo + k];
    for (int64_t r = 0; r < R; ++r) {
      const T x = X[r * ldx + k];
      for (int i = 0; i < M; ++i) acc[i] = mac(A[i * sm + r * sr], x, acc[i]);
    }
    for (int i = 0; i < M; ++i) O[i * ldo + k] = acc[i];
  }
}

#ifdef EMBKERN_GEMM_AVX2
// The six rows of one tile_ax call: rows >= M alias row 0 and are not stored.
template <typename T>
struct AxRows {
  const T* a[6];
  T* o[6];
  AxRows(int M, const T* A, int64_t sm, T* O, int64_t ldo) {
    for (int i = 0; i < 6; ++i) {
      a[i] = M > i ? A + i * sm : A;
      o[i] = M > i ? O + i * ldo : O;
    }
  }
};

// One column strip [k0, k0 + 2 lanes) of the six rows (two vectors per row),
// named accumulators as in tile_nt_2v.
template <class D, typename T>
__attribute__((always_inline)) inline void ax_strip2(int M, int64_t R, int64_t k0, const AxRows<T>& rw, int64_t sr,
                                                     const T* X, int64_t ldx) {
  using V = typename D::V;
  constexpr int64_t H = D::kLanes;
  const T *a0 = rw.a[0], *a1 = rw.a[1], *a2 = rw.a[2], *a3 = rw.a[3], *a4 = rw.a[4], *a5 = rw.a[5];
  T *o0 = rw.o[0], *o1 = rw.o[1], *o2 = rw.o[2], *o3 = rw.o[3], *o4 = rw.o[4], *o5 = rw.o[5];
  V c00 = D::loadu(o0 + k0), c01 = D::loadu(o0 + k0 + H), c10 = D::loadu(o1 + k0), c11 = D::loadu(o1 + k0 + H);
  V c20 = D::loadu(o2 + k0), c21 = D::loadu(o2 + k0 + H), c30 = D::loadu(o3 + k0), c31 = D::loadu(o3 + k0 + H);
  V c40 = D::loadu(o4 + k0), c41 = D::loadu(o4 + k0 + H), c50 = D::loadu(o5 + k0), c51 = D::loadu(o5 + k0 + H);
  for (int64_t r = 0; r < R; ++r) {
    const T* x = X + r * ldx + k0;
    const V x0 = D::loadu(x), x1 = D::loadu(x + H);
    const int64_t ar = r * sr;
    V t = D::bcast(a0 + ar);
    c00 = D::fma(t, x0, c00);
    c01 = D::fma(t, x1, c01);
    t = D::bcast(a1 + ar);
    c10 = D::fma(t, x0, c10);
    c11 = D::fma(t, x1, c11);
    t = D::bcast(a2 + ar);
    c20 = D::fma(t, x0, c20);
    c21 = D::fma(t, x1, c21);
    t = D::bcast(a3 + ar);
    c30 = D::fma(t, x0, c30);
    c31 = D::fma(t, x1, c31);
    t = D::bcast(a4 + ar);
    c40 = D::fma(t, x0, c40);
    c41 = D::fma(t, x1, c41);
    t = D::bcast(a5 + ar);
    c50 = D::fma(t, x0, c50);
    c51 = D::fma(t, x1, c51);
  }
  D::storeu(o0 + k0, c00);
  D::storeu(o0 + k0 + H, c01);
  if (M > 1) { D::storeu(o1 + k0, c10); D::storeu(o1 + k0 + H, c11); }
  if (M > 2) { D::storeu(o2 + k0, c20); D::storeu(o2 + k0 + H, c21); }
  if (M > 3) { D::storeu(o3 + k0, c30); D::storeu(o3 + k0 + H, c31); }
  if (M > 4) { D::storeu(o4 + k0, c40); D::storeu(o4 + k0 + H, c41); }
  if (M > 5) { D::storeu(o5 + k0, c50); D::storeu(o5 + k0 + H, c51); }
}

// One column strip of one vector per row.
template <class D, typename T>
__attribute__((always_inline)) inline void ax_strip1(int M, int64_t R, int64_t k0, const AxRows<T>& rw, int64_t sr,
                                                     const T* X, int64_t ldx) {
  using V = typename D::V;
  const T *a0 = rw.a[0], *a1 = rw.a[1], *a2 = rw.a[2], *a3 = rw.a[3], *a4 = rw.a[4], *a5 = rw.a[5];
  T *o0 = rw.o[0], *o1 = rw.o[1], *o2 = rw.o[2], *o3 = rw.o[3], *o4 = rw.o[4], *o5 = rw.o[5];
  V c0 = D::loadu(o0 + k0), c1 = D::loadu(o1 + k0), c2 = D::loadu(o2 + k0);
  V c3 = D::loadu(o3 + k0), c4 = D::loadu(o4 + k0), c5 = D::loadu(o5 + k0);
  for (int64_t r = 0; r < R; ++r) {
    const V x0 = D::loadu(X + r * ldx + k0);
    const int64_t ar = r * sr;
    c0 = D::fma(D::bcast(a0 + ar), x0, c0);
    c1 = D::fma(D::bcast(a1 + ar), x0, c1);
    c2 = D::fma(D::bcast(a2 + ar), x0, c2);
    c3 = D::fma(D::bcast(a3 + ar), x0, c3);
    c4 = D::fma(D::bcast(a4 + ar), x0, c4);
    c5 = D::fma(D::bcast(a5 + ar), x0, c5);
  }
  D::storeu(o0 + k0, c0);
  if (M > 1) D::storeu(o1 + k0, c1);
  if (M > 2) D::storeu(o2 + k0, c2);
  if (M > 3) D::storeu(o3 + k0, c3);
  if (M > 4) D::storeu(o4 + k0, c4);
  if (M > 5) D::storeu(o5 + k0, c5);
}

// Strips of two 256-bit vectors, then one, then (fp32) one 128-bit vector,
// then the remaining columns one at a time.
template <typename T>
inline void tile_ax_avx2(int M, int64_t R, int64_t K, const T* A, int64_t sm, int64_t sr, const T* X, int64_t ldx,
                         T* O, int64_t ldo) {
  using D = Vec<T, 256>;
  constexpr int64_t W = D::kLanes;
  const AxRows<T> rw(M, A, sm, O, ldo);
  int64_t k0 = 0;
  for (; k0 + 2 * W <= K; k0 += 2 * W) ax_strip2<D>(M, R, k0, rw, sr, X, ldx);
  for (; k0 + W <= K; k0 += W) ax_strip1<D>(M, R, k0, rw, sr, X, ldx);
  if constexpr (std::is_same<T, float>::value) {
    for (; k0 + 4 <= K; k0 += 4) ax_strip1<Vec<float, 128>>(M, R, k0, rw, sr, X, ldx);
  }
  for (; k0 < K; ++k0) {
    for (int i = 0; i < M; ++i) {
      T acc = rw.o[i][k0];
      for (int64_t r = 0; r < R; ++r) acc = mac(rw.a[i][r * sr], X[r * ldx + k0], acc);
      rw.o[i][k0] = acc;
    }
  }
}

#if defined(__AVX512F__)
// One column strip [k0, k0 + NV * 16 fp32 / 8 fp64) of the six rows in zmm
// registers: 6 x NV accumulators (24 at NV = 4, plus 4 loads and a
// broadcast: 29 of the 32 zmm). Rows >= M alias row 0 and are not stored.
// Each element is still one FMA chain over r continuing from O, as in the
// 256-bit strips, so the bits do not depend on the width.
template <typename T, int NV>
__attribute__((always_inline)) inline void ax_strip_zmm(int M, int64_t R, int64_t k0, const AxRows<T>& rw,
                                                        int64_t sr, const T* X, int64_t ldx) {
  using Z = Vec<T, 512>;
  using V = typename Z::V;
  constexpr int64_t W = Z::kLanes;
  V c[6][NV];
#pragma GCC unroll 6
  for (int i = 0; i < 6; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) c[i][v] = Z::loadu(rw.o[i] + k0 + v * W);
  for (int64_t r = 0; r < R; ++r) {
    const T* x = X + r * ldx + k0;
    V xv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) xv[v] = Z::loadu(x + v * W);
    const int64_t ar = r * sr;
#pragma GCC unroll 6
    for (int i = 0; i < 6; ++i) {
      const V t = Z::bcast(rw.a[i] + ar);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[i][v] = Z::fma(t, xv[v], c[i][v]);
    }
  }
  for (int i = 0; i < M; ++i)
    for (int v = 0; v < NV; ++v) Z::storeu(rw.o[i] + k0 + v * W, c[i][v]);
}

// Strips of four zmm, then two, then one; the last < 16 (fp32) / 8 (fp64)
// columns through the 256-bit path. The 256-bit strips alone ran the two
// backward products of one_to_n_loss at about half of torch.mm's rate on
// an AVX-512 Xeon (54-58 ms against torch autograd's 29-36 ms, B = 128
// FB15k-237, 1 thread).
template <typename T>
inline void tile_ax_avx512(int M, int64_t R, int64_t K, const T* A, int64_t sm, int64_t sr, const T* X,
                           int64_t ldx, T* O, int64_t ldo) {
  constexpr int64_t W = Vec<T, 512>::kLanes;
  const AxRows<T> rw(M, A, sm, O, ldo);
  int64_t k0 = 0;
  for (; k0 + 4 * W <= K; k0 += 4 * W) ax_strip_zmm<T, 4>(M, R, k0, rw, sr, X, ldx);
  if (k0 + 2 * W <= K) {
    ax_strip_zmm<T, 2>(M, R, k0, rw, sr, X, ldx);
    k0 += 2 * W;
  }
  if (k0 + W <= K) {
    ax_strip_zmm<T, 1>(M, R, k0, rw, sr, X, ldx);
    k0 += W;
  }
  if (k0 < K) tile_ax_avx2(M, R, K - k0, A, sm, sr, X + k0, ldx, O + k0, ldo);
}
#endif
#endif

}  // namespace detail

// 1 <= M <= MR.
template <typename T>
inline void tile_ax(int M, int64_t R, int64_t K, const T* A, int64_t sm, int64_t sr, const T* X, int64_t ldx, T* O,
                    int64_t ldo) {
#if defined(__AVX512F__) && defined(EMBKERN_GEMM_AVX2)
  detail::tile_ax_avx512(M, R, K, A, sm, sr, X, ldx, O, ldo);
#elif defined(EMBKERN_GEMM_AVX2)
  detail::tile_ax_avx2(M, R, K, A, sm, sr, X, ldx, O, ldo);
#else
  switch (M) {
    case 6: detail::ax_scalar_cols<T, 6>(R, 0, K, A, sm, sr, X, ldx, O, ldo); break;
    case 5: detail::ax_scalar_cols<T, 5>(R, 0, K, A, sm, sr, X, ldx, O, ldo); break;
    case 4: detail::ax_scalar_cols<T, 4>(R, 0, K, A, sm, sr, X, ldx, O, ldo); break;
    case 3: detail::ax_scalar_cols<T, 3>(R, 0, K, A, sm, sr, X, ldx, O, ldo); break;
    case 2: detail::ax_scalar_cols<T, 2>(R, 0, K, A, sm, sr, X, ldx, O, ldo); break;
    case 1: detail::ax_scalar_cols<T, 1>(R, 0, K, A, sm, sr, X, ldx, O, ldo); break;
    default: break;
  }
#endif
}

// O (M x K) += A (M x R) . X (R x K), any M, in MR-row strips.
template <typename T>
inline void gemm_ax(int64_t M, int64_t R, int64_t K, const T* A, int64_t sm, int64_t sr, const T* X, int64_t ldx,
                    T* O, int64_t ldo) {
  constexpr int MR = Tile<T>::MR;
  for (int64_t m0 = 0; m0 < M; m0 += MR) {
    const int mr = static_cast<int>(M - m0 < MR ? M - m0 : MR);
    tile_ax(mr, R, K, A + m0 * sm, sm, sr, X, ldx, O + m0 * ldo, ldo);
  }
}

// ---------------------------------------------------------------------------
// Transposed copy: D[j*ldd + i] = C[i*ldc + j], i < rows, j < cols (the
// entity-major score block back to row-major S). 8x8 (fp32) / 4x4 (fp64)
// register transposes: a scalar loop of strided reads is a visible share of
// score_forward.

namespace detail {
template <typename T>
inline void transpose_scalar(const T* C, int64_t ldc, int64_t i0, int64_t i1, int64_t j0, int64_t j1, T* D,
                             int64_t ldd) {
  for (int64_t j = j0; j < j1; ++j)
    for (int64_t i = i0; i < i1; ++i) D[j * ldd + i] = C[i * ldc + j];
}
}  // namespace detail

inline void transpose_copy(const float* C, int64_t ldc, int64_t rows, int64_t cols, float* D, int64_t ldd) {
  int64_t i0 = 0;
#ifdef EMBKERN_GEMM_AVX2
  for (; i0 + 8 <= rows; i0 += 8) {
    int64_t j0 = 0;
    for (; j0 + 8 <= cols; j0 += 8) {
      const float* c = C + i0 * ldc + j0;
      __m256 r0 = _mm256_loadu_ps(c), r1 = _mm256_loadu_ps(c + ldc), r2 = _mm256_loadu_ps(c + 2 * ldc),
             r3 = _mm256_loadu_ps(c + 3 * ldc), r4 = _mm256_loadu_ps(c + 4 * ldc), r5 = _mm256_loadu_ps(c + 5 * ldc),
             r6 = _mm256_loadu_ps(c + 6 * ldc), r7 = _mm256_loadu_ps(c + 7 * ldc);
      __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
      __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
      __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
      __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
      r0 = _mm256_shuffle_ps(t0, t2, 0x44);
      r1 = _mm256_shuffle_ps(t0, t2, 0xEE);
      r2 = _mm256_shuffle_ps(t1, t3, 0x44);
      r3 = _mm256_shuffle_ps(t1, t3, 0xEE);
      r4 = _mm256_shuffle_ps(t4, t6, 0x44);
      r5 = _mm256_shuffle_ps(t4, t6, 0xEE);
      r6 = _mm256_shuffle_ps(t5, t7, 0x44);
      r7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      float* d = D + j0 * ldd + i0;
      _mm256_storeu_ps(d, _mm256_permute2f128_ps(r0, r4, 0x20));
      _mm256_storeu_ps(d + ldd, _mm256_permute2f128_ps(r1, r5, 0x20));
      _mm256_storeu_ps(d + 2 * ldd, _mm256_permute2f128_ps(r2, r6, 0x20));
      _mm256_storeu_ps(d + 3 * ldd, _mm256_permute2f128_ps(r3, r7, 0x20));
      _mm256_storeu_ps(d + 4 * ldd, _mm256_permute2f128_ps(r0, r4, 0x31));
      _mm256_storeu_ps(d + 5 * ldd, _mm256_permute2f128_ps(r1, r5, 0x31));
      _mm256_storeu_ps(d + 6 * ldd, _mm256_permute2f128_ps(r2, r6, 0x31));
      _mm256_storeu_ps(d + 7 * ldd, _mm256_permute2f128_ps(r3, r7, 0x31));
    }
    detail::transpose_scalar(C, ldc, i0, i0 + 8, j0, cols, D, ldd);
  }
#endif
  detail::transpose_scalar(C, ldc, i0, rows, 0, cols, D, ldd);
}

inline void transpose_copy(const double* C, int64_t ldc, int64_t rows, int64_t cols, double* D, int64_t ldd) {
  int64_t i0 = 0;
#ifdef EMBKERN_GEMM_AVX2
  for (; i0 + 4 <= rows; i0 += 4) {
    int64_t j0 = 0;
    for (; j0 + 4 <= cols; j0 += 4) {
      const double* c = C + i0 * ldc + j0;
      const __m256d r0 = _mm256_loadu_pd(c), r1 = _mm256_loadu_pd(c + ldc), r2 = _mm256_loadu_pd(c + 2 * ldc),
                    r3 = _mm256_loadu_pd(c + 3 * ldc);
      const __m256d t0 = _mm256_unpacklo_pd(r0, r1), t1 = _mm256_unpackhi_pd(r0, r1);
      const __m256d t2 = _mm256_unpacklo_pd(r2, r3), t3 = _mm256_unpackhi_pd(r2, r3);
      double* d = D + j0 * ldd + i0;
      _mm256_storeu_pd(d, _mm256_permute2f128_pd(t0, t2, 0x20));
      _mm256_storeu_pd(d + ldd, _mm256_permute2f128_pd(t1, t3, 0x20));
      _mm256_storeu_pd(d + 2 * ldd, _mm256_permute2f128_pd(t0, t2, 0x31));
      _mm256_storeu_pd(d + 3 * ldd, _mm256_permute2f128_pd(t1, t3, 0x31));
    }
    detail::transpose_scalar(C, ldc, i0, i0 + 4, j0, cols, D, ldd);
  }
#endif
  detail::transpose_scalar(C, ldc, i0, rows, 0, cols, D, ldd);
}

// ---------------------------------------------------------------------------
// exp. Vector versions: range reduction x = n ln2 + r, |r| <= ln2/2, then a
// polynomial for e^r (Cephes-style minimax for float, Taylor to r^13 for
// double: 0.347^14/14! ~ 4e-18), scaled by 2^(n-1) * 2 so that n = 128 (x up
// to 88.72, float) or n = 1024 (double) still builds a normal power of two.
// Results below 2^-125 (float) / 2^-1021 (double) flush to 0: they never
// change a sum of exponentials that also holds exp(0) = 1, which is where the
// callers use them. NaN propagates, +inf -> inf, -inf -> 0.

#ifdef EMBKERN_GEMM_AVX2
inline __m256 exp_ps(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.7228393f);
  const __m256 lo = _mm256_set1_ps(-86.6f);  // n >= -125
  const __m256 nan_mask = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  const __m256 over = _mm256_cmp_ps(x, hi, _CMP_GT_OQ);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(126)), 23);
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), _mm256_set1_ps(2.0f));
  y = _mm256_andnot_ps(under, y);
  y = _mm256_blendv_ps(y, _mm256_set1_ps(std::numeric_limits<float>::infinity()), over);
  return _mm256_blendv_ps(y, x, nan_mask);
}

inline __m256d exp_pd(__m256d x) {
  const __m256d hi = _mm256_set1_pd(709.782712893384);
  const __m256d lo = _mm256_set1_pd(-707.0);  // n >= -1020
  const __m256d nan_mask = _mm256_cmp_pd(x, x, _CMP_UNORD_Q);
  const __m256d over = _mm256_cmp_pd(x, hi, _CMP_GT_OQ);
  const __m256d under = _mm256_cmp_pd(x, lo, _CMP_LT_OQ);
  __m256d xc = _mm256_min_pd(_mm256_max_pd(x, lo), hi);
  __m256d n = _mm256_round_pd(_mm256_mul_pd(xc, _mm256_set1_pd(1.4426950408889634074)),
                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256d r = _mm256_fnmadd_pd(n, _mm256_set1_pd(6.93147180369123816490e-01), xc);
  r = _mm256_fnmadd_pd(n, _mm256_set1_pd(1.90821492927058770002e-10), r);
  // Taylor e^r = sum r^i / i!, i <= 13, Horner.
  static const double c[14] = {1.0,
                               1.0,
                               1.0 / 2,
                               1.0 / 6,
                               1.0 / 24,
                               1.0 / 120,
                               1.0 / 720,
                               1.0 / 5040,
                               1.0 / 40320,
                               1.0 / 362880,
                               1.0 / 3628800,
                               1.0 / 39916800,
                               1.0 / 479001600,
                               1.0 / 6227020800.0};
  __m256d p = _mm256_set1_pd(c[13]);
  for (int i = 12; i >= 0; --i) p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(c[i]));
  const __m128i n32 = _mm256_cvtpd_epi32(n);
  const __m256i e =
      _mm256_slli_epi64(_mm256_add_epi64(_mm256_cvtepi32_epi64(n32), _mm256_set1_epi64x(1022)), 52);
  __m256d y = _mm256_mul_pd(_mm256_mul_pd(p, _mm256_castsi256_pd(e)), _mm256_set1_pd(2.0));
  y = _mm256_andnot_pd(under, y);
  y = _mm256_blendv_pd(y, _mm256_set1_pd(std::numeric_limits<double>::infinity()), over);
  return _mm256_blendv_pd(y, x, nan_mask);
}
#endif

// x[i] = exp(x[i]) for i < n.
inline void exp_inplace(float* x, int64_t n) {
  int64_t i = 0;
#ifdef EMBKERN_GEMM_AVX2
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, exp_ps(_mm256_loadu_ps(x + i)));
  const int rem = static_cast<int>(n - i);  // 0..7
  if (rem > 0) {
    alignas(32) float t[8] = {};
    for (int j = 0; j < rem && j < 8; ++j) t[j] = x[i + j];
    _mm256_store_ps(t, exp_ps(_mm256_load_ps(t)));
    for (int j = 0; j < rem && j < 8; ++j) x[i + j] = t[j];
  }
#else
  for (; i < n; ++i) x[i] = std::exp(x[i]);
#endif
}

inline void exp_inplace(double* x, int64_t n) {
  int64_t i = 0;
#ifdef EMBKERN_GEMM_AVX2
  for (; i + 4 <= n; i += 4) _mm256_storeu_pd(x + i, exp_pd(_mm256_loadu_pd(x + i)));
  const int rem = static_cast<int>(n - i);  // 0..3
  if (rem > 0) {
    alignas(32) double t[4] = {};
    for (int j = 0; j < rem && j < 4; ++j) t[j] = x[i + j];
    _mm256_store_pd(t, exp_pd(_mm256_load_pd(t)));
    for (int j = 0; j < rem && j < 4; ++j) x[i + j] = t[j];
  }
#else
  for (; i < n; ++i) x[i] = std::exp(x[i]);
#endif
}

}  // namespace EMBKERN_ISA_NS
}  // namespace gemm
}  // namespace embkern
