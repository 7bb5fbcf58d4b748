// Private blocked-GEMM building blocks for the CPU kernels (fp32 / fp64).
//
// Two register-tile routines, both AVX2+FMA with a portable scalar fallback:
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
// exact, but a call per term (the generic score tile is ~50x slower than
// avx2; every x86-64 CPU since 2013 runs the avx2 level).
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

// Sum of squares with a fixed lane structure (same result at every call site).
template <typename T>
inline T sqnorm(const T* x, int64_t K) {
  constexpr int L = 8;
  T lane[L] = {};
  int64_t k = 0;
  for (; k + L <= K; k += L)
    for (int l = 0; l < L; ++l) lane[l] = mac(x[k + l], x[k + l], lane[l]);
  T tail = T(0);
  for (; k < K; ++k) tail = mac(x[k], x[k], tail);
  return ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7])) + tail;
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
// Twelve named accumulators: GCC spills an array of __m256 to the stack on
// every k step (measured: 3x slower). Rows >= `rows` re-read row 0 and are
// not stored, so every valid lane still sees exactly its own FMA chain.
#define EMBKERN_NT_BODY(V, BCAST, FMA, LOAD, STORE, SET0, STEP, HALF)                                  \
  const auto* a0 = A;                                                                                   \
  const auto* a1 = rows > 1 ? A + lda : A;                                                              \
  const auto* a2 = rows > 2 ? A + 2 * lda : A;                                                          \
  const auto* a3 = rows > 3 ? A + 3 * lda : A;                                                          \
  const auto* a4 = rows > 4 ? A + 4 * lda : A;                                                          \
  const auto* a5 = rows > 5 ? A + 5 * lda : A;                                                          \
  V c00 = SET0(), c01 = SET0(), c10 = SET0(), c11 = SET0(), c20 = SET0(), c21 = SET0();                 \
  V c30 = SET0(), c31 = SET0(), c40 = SET0(), c41 = SET0(), c50 = SET0(), c51 = SET0();                 \
  for (int64_t k = 0; k < K; ++k) {                                                                     \
    const V b0 = LOAD(Bp + STEP * k);                                                                   \
    const V b1 = LOAD(Bp + STEP * k + HALF);                                                            \
    V t = BCAST(a0 + k);                                                                                \
    c00 = FMA(t, b0, c00);                                                                              \
    c01 = FMA(t, b1, c01);                                                                              \
    t = BCAST(a1 + k);                                                                                  \
    c10 = FMA(t, b0, c10);                                                                              \
    c11 = FMA(t, b1, c11);                                                                              \
    t = BCAST(a2 + k);                                                                                  \
    c20 = FMA(t, b0, c20);                                                                              \
    c21 = FMA(t, b1, c21);                                                                              \
    t = BCAST(a3 + k);                                                                                  \
    c30 = FMA(t, b0, c30);                                                                              \
    c31 = FMA(t, b1, c31);                                                                              \
    t = BCAST(a4 + k);                                                                                  \
    c40 = FMA(t, b0, c40);                                                                              \
    c41 = FMA(t, b1, c41);                                                                              \
    t = BCAST(a5 + k);                                                                                  \
    c50 = FMA(t, b0, c50);                                                                              \
    c51 = FMA(t, b1, c51);                                                                              \
  }                                                                                                     \
  STORE(C, c00);                                                                                        \
  STORE(C + HALF, c01);                                                                                 \
  if (rows > 1) { STORE(C + ldc, c10); STORE(C + ldc + HALF, c11); }                                    \
  if (rows > 2) { STORE(C + 2 * ldc, c20); STORE(C + 2 * ldc + HALF, c21); }                            \
  if (rows > 3) { STORE(C + 3 * ldc, c30); STORE(C + 3 * ldc + HALF, c31); }                            \
  if (rows > 4) { STORE(C + 4 * ldc, c40); STORE(C + 4 * ldc + HALF, c41); }                            \
  if (rows > 5) { STORE(C + 5 * ldc, c50); STORE(C + 5 * ldc + HALF, c51); }

inline void tile_nt_avx2(int rows, int64_t K, const float* A, int64_t lda, const float* Bp, float* C, int64_t ldc) {
  EMBKERN_NT_BODY(__m256, _mm256_broadcast_ss, _mm256_fmadd_ps, _mm256_load_ps, _mm256_storeu_ps,
                  _mm256_setzero_ps, 16, 8)
}
inline void tile_nt_avx2(int rows, int64_t K, const double* A, int64_t lda, const double* Bp, double* C,
                         int64_t ldc) {
  EMBKERN_NT_BODY(__m256d, _mm256_broadcast_sd, _mm256_fmadd_pd, _mm256_load_pd, _mm256_storeu_pd,
                  _mm256_setzero_pd, 8, 4)
}
#undef EMBKERN_NT_BODY
#endif

}  // namespace detail

// Bp must be 32-byte aligned (pack into a Buffer). 1 <= rows <= MR.
template <typename T>
inline void tile_nt(int rows, int64_t K, const T* A, int64_t lda, const T* Bp, T* C, int64_t ldc) {
#ifdef EMBKERN_GEMM_AVX2
  detail::tile_nt_avx2(rows, K, A, lda, Bp, C, ldc);
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
// At the avx512 level four panels go through one 6 x 4-zmm register tile (24
// accumulators; per k: 4 panel loads + 6 broadcasts for 24 FMAs, against 2 + 6
// for 12 at 256 bits): 120 vs 65 GFLOP/s on one Xeon core in a 96 x 64 x 400
// block loop, same bits (each lane is still one FMA chain over k = 0..K-1).
#if defined(__AVX512F__)
namespace detail {
template <typename T>
struct Zmm;
template <>
struct Zmm<float> {
  using V = __m512;
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_load_ps(p); }
  static V bcast(const float* p) { return _mm512_set1_ps(*p); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
};
template <>
struct Zmm<double> {
  using V = __m512d;
  static V zero() { return _mm512_setzero_pd(); }
  static V load(const double* p) { return _mm512_load_pd(p); }
  static V bcast(const double* p) { return _mm512_set1_pd(*p); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  static void store(double* p, V v) { _mm512_storeu_pd(p, v); }
};

// Rows >= `rows` re-read row 0 and are not stored (as the 256-bit tile).
template <typename T, int NP>
inline void tile_nt_zmm(int rows, int64_t K, const T* A, int64_t lda, const T* Bp, T* C, int64_t ldc) {
  using Z = Zmm<T>;
  using V = typename Z::V;
  constexpr int NR = Tile<T>::NR;
  static_assert(NR * sizeof(T) == 64, "one zmm per packed panel row");
  const T* a[6];
  for (int i = 0; i < 6; ++i) a[i] = i < rows ? A + i * lda : A;
  V c[6][NP];
#pragma GCC unroll 6
  for (int i = 0; i < 6; ++i)
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) c[i][p] = Z::zero();
  for (int64_t k = 0; k < K; ++k) {
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
    for (int p = 0; p < NP; ++p) Z::store(C + i * ldc + p * NR, c[i][p]);
}
}  // namespace detail
#endif

// Bp 64-byte aligned (a Buffer), panels NR*K apart. 1 <= rows <= MR.
template <typename T>
inline void tile_nt_panels(int rows, int64_t K, const T* A, int64_t lda, const T* Bp, int64_t np, T* C,
                           int64_t ldc) {
  constexpr int NR = Tile<T>::NR;
#if defined(__AVX512F__)
  int64_t p = 0;
  for (; p + 4 <= np; p += 4) detail::tile_nt_zmm<T, 4>(rows, K, A, lda, Bp + p * NR * K, C + p * NR, ldc);
  switch (np - p) {
    case 3: detail::tile_nt_zmm<T, 3>(rows, K, A, lda, Bp + p * NR * K, C + p * NR, ldc); break;
    case 2: detail::tile_nt_zmm<T, 2>(rows, K, A, lda, Bp + p * NR * K, C + p * NR, ldc); break;
    case 1: detail::tile_nt_zmm<T, 1>(rows, K, A, lda, Bp + p * NR * K, C + p * NR, ldc); break;
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
// Named accumulators as in tile_nt; rows >= M alias row 0 and are not stored.
// One column strip of width 2*HALF (two vectors per row).
#define EMBKERN_AX_STRIP2(V, BCAST, FMA, LOADU, STOREU, HALF)                                         \
  {                                                                                                     \
    V c00 = LOADU(o0 + k0), c01 = LOADU(o0 + k0 + HALF), c10 = LOADU(o1 + k0), c11 = LOADU(o1 + k0 + HALF); \
    V c20 = LOADU(o2 + k0), c21 = LOADU(o2 + k0 + HALF), c30 = LOADU(o3 + k0), c31 = LOADU(o3 + k0 + HALF); \
    V c40 = LOADU(o4 + k0), c41 = LOADU(o4 + k0 + HALF), c50 = LOADU(o5 + k0), c51 = LOADU(o5 + k0 + HALF); \
    for (int64_t r = 0; r < R; ++r) {                                                                   \
      const auto* x = X + r * ldx + k0;                                                                 \
      const V x0 = LOADU(x), x1 = LOADU(x + HALF);                                                      \
      const int64_t ar = r * sr;                                                                        \
      V t = BCAST(a0 + ar);                                                                             \
      c00 = FMA(t, x0, c00);                                                                            \
      c01 = FMA(t, x1, c01);                                                                            \
      t = BCAST(a1 + ar);                                                                               \
      c10 = FMA(t, x0, c10);                                                                            \
      c11 = FMA(t, x1, c11);                                                                            \
      t = BCAST(a2 + ar);                                                                               \
      c20 = FMA(t, x0, c20);                                                                            \
      c21 = FMA(t, x1, c21);                                                                            \
      t = BCAST(a3 + ar);                                                                               \
      c30 = FMA(t, x0, c30);                                                                            \
      c31 = FMA(t, x1, c31);                                                                            \
      t = BCAST(a4 + ar);                                                                               \
      c40 = FMA(t, x0, c40);                                                                            \
      c41 = FMA(t, x1, c41);                                                                            \
      t = BCAST(a5 + ar);                                                                               \
      c50 = FMA(t, x0, c50);                                                                            \
      c51 = FMA(t, x1, c51);                                                                            \
    }                                                                                                   \
    STOREU(o0 + k0, c00);                                                                               \
    STOREU(o0 + k0 + HALF, c01);                                                                        \
    if (M > 1) { STOREU(o1 + k0, c10); STOREU(o1 + k0 + HALF, c11); }                                  \
    if (M > 2) { STOREU(o2 + k0, c20); STOREU(o2 + k0 + HALF, c21); }                                  \
    if (M > 3) { STOREU(o3 + k0, c30); STOREU(o3 + k0 + HALF, c31); }                                  \
    if (M > 4) { STOREU(o4 + k0, c40); STOREU(o4 + k0 + HALF, c41); }                                  \
    if (M > 5) { STOREU(o5 + k0, c50); STOREU(o5 + k0 + HALF, c51); }                                  \
  }
// One column strip of one vector per row.
#define EMBKERN_AX_STRIP1(V, BCAST, FMA, LOADU, STOREU)                                                \
  {                                                                                                     \
    V c0 = LOADU(o0 + k0), c1 = LOADU(o1 + k0), c2 = LOADU(o2 + k0);                                    \
    V c3 = LOADU(o3 + k0), c4 = LOADU(o4 + k0), c5 = LOADU(o5 + k0);                                    \
    for (int64_t r = 0; r < R; ++r) {                                                                   \
      const V x0 = LOADU(X + r * ldx + k0);                                                             \
      const int64_t ar = r * sr;                                                                        \
      c0 = FMA(BCAST(a0 + ar), x0, c0);                                                                 \
      c1 = FMA(BCAST(a1 + ar), x0, c1);                                                                 \
      c2 = FMA(BCAST(a2 + ar), x0, c2);                                                                 \
      c3 = FMA(BCAST(a3 + ar), x0, c3);                                                                 \
      c4 = FMA(BCAST(a4 + ar), x0, c4);                                                                 \
      c5 = FMA(BCAST(a5 + ar), x0, c5);                                                                 \
    }                                                                                                   \
    STOREU(o0 + k0, c0);                                                                                \
    if (M > 1) STOREU(o1 + k0, c1);                                                                     \
    if (M > 2) STOREU(o2 + k0, c2);                                                                     \
    if (M > 3) STOREU(o3 + k0, c3);                                                                     \
    if (M > 4) STOREU(o4 + k0, c4);                                                                     \
    if (M > 5) STOREU(o5 + k0, c5);                                                                     \
  }

#define EMBKERN_AX_ROWS(TYPE)                                    \
  const TYPE* a0 = A;                                            \
  const TYPE* a1 = M > 1 ? A + sm : A;                           \
  const TYPE* a2 = M > 2 ? A + 2 * sm : A;                       \
  const TYPE* a3 = M > 3 ? A + 3 * sm : A;                       \
  const TYPE* a4 = M > 4 ? A + 4 * sm : A;                       \
  const TYPE* a5 = M > 5 ? A + 5 * sm : A;                       \
  TYPE* o0 = O;                                                  \
  TYPE* o1 = M > 1 ? O + ldo : O;                                \
  TYPE* o2 = M > 2 ? O + 2 * ldo : O;                            \
  TYPE* o3 = M > 3 ? O + 3 * ldo : O;                            \
  TYPE* o4 = M > 4 ? O + 4 * ldo : O;                            \
  TYPE* o5 = M > 5 ? O + 5 * ldo : O;

inline void tile_ax_avx2(int M, int64_t R, int64_t K, const float* A, int64_t sm, int64_t sr, const float* X,
                         int64_t ldx, float* O, int64_t ldo) {
  EMBKERN_AX_ROWS(float)
  int64_t k0 = 0;
  for (; k0 + 16 <= K; k0 += 16) EMBKERN_AX_STRIP2(__m256, _mm256_broadcast_ss, _mm256_fmadd_ps, _mm256_loadu_ps,
                                                   _mm256_storeu_ps, 8)
  for (; k0 + 8 <= K; k0 += 8)
    EMBKERN_AX_STRIP1(__m256, _mm256_broadcast_ss, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_storeu_ps)
  for (; k0 + 4 <= K; k0 += 4) EMBKERN_AX_STRIP1(__m128, _mm_broadcast_ss, _mm_fmadd_ps, _mm_loadu_ps, _mm_storeu_ps)
  for (; k0 < K; ++k0) {
    float* o[6] = {o0, o1, o2, o3, o4, o5};
    const float* a[6] = {a0, a1, a2, a3, a4, a5};
    for (int i = 0; i < M; ++i) {
      float acc = o[i][k0];
      for (int64_t r = 0; r < R; ++r) acc = mac(a[i][r * sr], X[r * ldx + k0], acc);
      o[i][k0] = acc;
    }
  }
}

inline void tile_ax_avx2(int M, int64_t R, int64_t K, const double* A, int64_t sm, int64_t sr, const double* X,
                         int64_t ldx, double* O, int64_t ldo) {
  EMBKERN_AX_ROWS(double)
  int64_t k0 = 0;
  for (; k0 + 8 <= K; k0 += 8) EMBKERN_AX_STRIP2(__m256d, _mm256_broadcast_sd, _mm256_fmadd_pd, _mm256_loadu_pd,
                                                 _mm256_storeu_pd, 4)
  for (; k0 + 4 <= K; k0 += 4)
    EMBKERN_AX_STRIP1(__m256d, _mm256_broadcast_sd, _mm256_fmadd_pd, _mm256_loadu_pd, _mm256_storeu_pd)
  for (; k0 < K; ++k0) {
    double* o[6] = {o0, o1, o2, o3, o4, o5};
    const double* a[6] = {a0, a1, a2, a3, a4, a5};
    for (int i = 0; i < M; ++i) {
      double acc = o[i][k0];
      for (int64_t r = 0; r < R; ++r) acc = mac(a[i][r * sr], X[r * ldx + k0], acc);
      o[i][k0] = acc;
    }
  }
}
#undef EMBKERN_AX_STRIP2
#undef EMBKERN_AX_STRIP1
#undef EMBKERN_AX_ROWS
#endif

}  // namespace detail

// 1 <= M <= MR.
template <typename T>
inline void tile_ax(int M, int64_t R, int64_t K, const T* A, int64_t sm, int64_t sr, const T* X, int64_t ldx, T* O,
                    int64_t ldo) {
#ifdef EMBKERN_GEMM_AVX2
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
// register transposes; a scalar loop over strided reads cost ~10% of
// score_forward at K = 400.

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
