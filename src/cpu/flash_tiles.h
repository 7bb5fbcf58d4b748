// Shared building blocks of the flash-style CPU attention kernels
// (src/cpu/selective_attention.cpp, src/cpu/rel_conv_attention.cpp): the
// vector descriptor Vec<T>, the fixed exp polynomial vexp, the register-tiled
// micro-kernel tile() / gemm(), and pack_transposed (with its in-register
// square transposes Tr<T>), and worth_threads (when an OpenMP team pays). Included by a kernel
// object compiled once per ISA level: everything lives in the per-level
// namespace embkern::flash::<level> (an anonymous namespace inside it, so
// each object keeps its own copy at its own -march).
//
// Bit-exactness contract (why two kernels can share this): every function
// here computes each output element with the same IEEE operations in the
// same order at every ISA level -- lanes only vectorise independent outputs,
// the generic level's std::fma is the correctly rounded fma. Moving code here
// from the selective-attention kernel changed none of its results.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "embkern/cpu_isa.h"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace embkern {
namespace flash {
EMBKERN_ISA_BEGIN
namespace {

// ---------------------------------------------------------------------------
// Vector descriptor: W lanes, and the register tile MR rows x NV vectors of
// the micro-kernel. Only operations whose IEEE result is defined lane by
// lane (no horizontal ones), so any W gives the same bits.

template <typename T>
struct Vec;

#if defined(__AVX512F__)
template <>
struct Vec<float> {
  using R = __m512;
  static constexpr int W = 16, MR = 8, NV = 2;
  static R load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, R x) { _mm512_storeu_ps(p, x); }
  static R set1(float x) { return _mm512_set1_ps(x); }
  static R zero() { return _mm512_setzero_ps(); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static R max(R a, R b) { return _mm512_max_ps(a, b); }  // a > b ? a : b
  static R keep_unless_below(R x, R lo, R y) {            // x < lo ? 0 : y
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, lo, _CMP_NLT_UQ), y);
  }
  static R pow2_shifted(R t) {  // 2^n from the bits of t = 1.5 * 2^23 + n
    __m512i i = _mm512_add_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(127 - 0x4B400000));
    return _mm512_castsi512_ps(_mm512_slli_epi32(i, 23));
  }
};
template <>
struct Vec<double> {
  using R = __m512d;
  static constexpr int W = 8, MR = 8, NV = 2;
  static R load(const double* p) { return _mm512_loadu_pd(p); }
  static void store(double* p, R x) { _mm512_storeu_pd(p, x); }
  static R set1(double x) { return _mm512_set1_pd(x); }
  static R zero() { return _mm512_setzero_pd(); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_pd(a, b, c); }
  static R mul(R a, R b) { return _mm512_mul_pd(a, b); }
  static R add(R a, R b) { return _mm512_add_pd(a, b); }
  static R sub(R a, R b) { return _mm512_sub_pd(a, b); }
  static R max(R a, R b) { return _mm512_max_pd(a, b); }
  static R keep_unless_below(R x, R lo, R y) {
    return _mm512_maskz_mov_pd(_mm512_cmp_pd_mask(x, lo, _CMP_NLT_UQ), y);
  }
  static R pow2_shifted(R t) {  // t = 1.5 * 2^52 + n
    __m512i i = _mm512_add_epi64(_mm512_castpd_si512(t), _mm512_set1_epi64(1023 - 0x4338000000000000LL));
    return _mm512_castsi512_pd(_mm512_slli_epi64(i, 52));
  }
};
#elif defined(__AVX2__) && defined(__FMA__)
template <>
struct Vec<float> {
  using R = __m256;
  static constexpr int W = 8, MR = 6, NV = 2;
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, R x) { _mm256_storeu_ps(p, x); }
  static R set1(float x) { return _mm256_set1_ps(x); }
  static R zero() { return _mm256_setzero_ps(); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  static R max(R a, R b) { return _mm256_max_ps(a, b); }
  static R keep_unless_below(R x, R lo, R y) { return _mm256_and_ps(_mm256_cmp_ps(x, lo, _CMP_NLT_UQ), y); }
  static R pow2_shifted(R t) {
    __m256i i = _mm256_add_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(127 - 0x4B400000));
    return _mm256_castsi256_ps(_mm256_slli_epi32(i, 23));
  }
};
template <>
struct Vec<double> {
  using R = __m256d;
  static constexpr int W = 4, MR = 6, NV = 2;
  static R load(const double* p) { return _mm256_loadu_pd(p); }
  static void store(double* p, R x) { _mm256_storeu_pd(p, x); }
  static R set1(double x) { return _mm256_set1_pd(x); }
  static R zero() { return _mm256_setzero_pd(); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_pd(a, b, c); }
  static R mul(R a, R b) { return _mm256_mul_pd(a, b); }
  static R add(R a, R b) { return _mm256_add_pd(a, b); }
  static R sub(R a, R b) { return _mm256_sub_pd(a, b); }
  static R max(R a, R b) { return _mm256_max_pd(a, b); }
  static R keep_unless_below(R x, R lo, R y) { return _mm256_and_pd(_mm256_cmp_pd(x, lo, _CMP_NLT_UQ), y); }
  static R pow2_shifted(R t) {
    __m256i i = _mm256_add_epi64(_mm256_castpd_si256(t), _mm256_set1_epi64x(1023 - 0x4338000000000000LL));
    return _mm256_castsi256_pd(_mm256_slli_epi64(i, 52));
  }
};
#else
// Scalar lanes: the same operations one element at a time. max and the
// comparison follow the x86 vector instructions' NaN / signed-zero rules.
template <typename T, typename U, U kBias, int kShift>
struct ScalarVec {
  using R = T;
  static constexpr int W = 1, MR = 4, NV = 4;
  static R load(const T* p) { return *p; }
  static void store(T* p, R x) { *p = x; }
  static R set1(T x) { return x; }
  static R zero() { return T(0); }
  static R fma(R a, R b, R c) { return std::fma(a, b, c); }
  static R mul(R a, R b) { return a * b; }
  static R add(R a, R b) { return a + b; }
  static R sub(R a, R b) { return a - b; }
  static R max(R a, R b) { return a > b ? a : b; }
  static R keep_unless_below(R x, R lo, R y) { return x < lo ? T(0) : y; }
  static R pow2_shifted(R t) {
    U i;
    std::memcpy(&i, &t, sizeof(U));
    i = (i + kBias) << kShift;
    T r;
    std::memcpy(&r, &i, sizeof(U));
    return r;
  }
};
template <>
struct Vec<float> : ScalarVec<float, uint32_t, uint32_t(127 - 0x4B400000), 23> {};
template <>
struct Vec<double> : ScalarVec<double, uint64_t, uint64_t(1023 - 0x4338000000000000LL), 52> {};
#endif

template <typename T>
constexpr int64_t kNR = int64_t(Vec<T>::W) * Vec<T>::NV;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---------------------------------------------------------------------------
// exp(x) for x <= 0 (every argument here is a score minus its row max or
// log-sum-exp): n = round(x / ln 2) by the shifter trick, r = x - n ln 2 in
// two fused steps, a Taylor polynomial in Horner form, times 2^n built from
// the shifter's bits. Below ln(smallest normal) it returns 0 (so -inf and the
// masked scores give exactly 0). About 1 ulp for float (degree 7) and a few
// ulp for double (degree 13).

template <typename T>
struct ExpConst;
template <>
struct ExpConst<float> {
  static constexpr float lo = -87.33654f;  // ln(2^-126)
  static constexpr float log2e = 1.44269504088896341f;
  static constexpr float shifter = 12582912.0f;  // 1.5 * 2^23
  static constexpr float ln2_hi = 0.693359375f;
  static constexpr float ln2_lo = -2.12194440e-4f;
  static constexpr int degree = 7;
};
template <>
struct ExpConst<double> {
  static constexpr double lo = -708.3964185322641;  // ln(2^-1022)
  static constexpr double log2e = 1.4426950408889634074;
  static constexpr double shifter = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr double ln2_hi = 6.93147180369123816490e-01;
  static constexpr double ln2_lo = 1.90821492927058770002e-10;
  static constexpr int degree = 13;
};

template <typename T>
inline typename Vec<T>::R vexp(typename Vec<T>::R x) {
  using V = Vec<T>;
  using C = ExpConst<T>;
  using R = typename V::R;
  const R lo = V::set1(C::lo);
  // max(lo, x), not max(x, lo): max is `a > b ? a : b` at every level, so a NaN
  // x comes through (and the result is NaN, as std::exp's) instead of being
  // clamped to lo and returning 0 -- which silently dropped a key with a NaN
  // score from its row. Finite x: the same value either way.
  const R xc = V::max(lo, x);
  const R t = V::fma(xc, V::set1(C::log2e), V::set1(C::shifter));
  const R n = V::sub(t, V::set1(C::shifter));
  R r = V::fma(n, V::set1(-C::ln2_hi), xc);
  r = V::fma(n, V::set1(-C::ln2_lo), r);
  // 1/k!, k = degree .. 0
  T inv_fact[C::degree + 1];
  inv_fact[0] = T(1);
  for (int k = 1; k <= C::degree; ++k) inv_fact[k] = inv_fact[k - 1] / T(k);
  R p = V::set1(inv_fact[C::degree]);
  for (int k = C::degree - 1; k >= 0; --k) p = V::fma(p, r, V::set1(inv_fact[k]));
  return V::keep_unless_below(x, lo, V::mul(p, V::pow2_shifted(t)));
}

// ---------------------------------------------------------------------------
// The micro-kernel: C[r][0..NR) (+)= sum_{k < K} A(r, k) * B[k][0..NR) for
// rows r < ROWS, with A(r, k) = A[r*sr + k*sk] (any orientation, read in
// place) and B row-major with stride ldb. Each C element is one FMA chain
// over k = 0..K-1, from +0 or from the value already in C.

template <typename T, int ROWS>
inline void tile(int64_t K, const T* A, int64_t sr, int64_t sk, const T* B, int64_t ldb, T* C, int64_t ldc,
                 bool accumulate) {
  using V = Vec<T>;
  constexpr int NV = V::NV, W = V::W;
  typename V::R c[ROWS][NV];
#pragma GCC unroll 16
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
    for (int u = 0; u < NV; ++u) c[r][u] = accumulate ? V::load(C + r * ldc + u * W) : V::zero();
  for (int64_t k = 0; k < K; ++k) {
    typename V::R b[NV];
#pragma GCC unroll 4
    for (int u = 0; u < NV; ++u) b[u] = V::load(B + k * ldb + u * W);
    const T* a = A + k * sk;
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; ++r) {
      const typename V::R ar = V::set1(a[r * sr]);
#pragma GCC unroll 4
      for (int u = 0; u < NV; ++u) c[r][u] = V::fma(ar, b[u], c[r][u]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
    for (int u = 0; u < NV; ++u) V::store(C + r * ldc + u * W, c[r][u]);
}

template <typename T, int ROWS>
inline void tile_rows(int rows, int64_t K, const T* A, int64_t sr, int64_t sk, const T* B, int64_t ldb, T* C,
                      int64_t ldc, bool accumulate) {
  if (rows == ROWS) {
    tile<T, ROWS>(K, A, sr, sk, B, ldb, C, ldc, accumulate);
  } else if constexpr (ROWS > 1) {
    tile_rows<T, ROWS - 1>(rows, K, A, sr, sk, B, ldb, C, ldc, accumulate);
  }
}

// One row of C over NG register tiles (NG * NR columns): the same FMA chain per element as tile<T, 1>,
// with NG times its independent accumulators. A one-row product (a decode step's scores and P V) through
// tile<T, 1> ran NV chains (2 at avx512) back to back, bound by the FMA latency, not its throughput.
template <typename T, int NG>
inline void row_tile(int64_t K, const T* A, int64_t sk, const T* B, int64_t ldb, T* C, bool accumulate) {
  using V = Vec<T>;
  constexpr int N = NG * V::NV, W = V::W;
  typename V::R c[N];
#pragma GCC unroll 16
  for (int u = 0; u < N; ++u) c[u] = accumulate ? V::load(C + u * W) : V::zero();
  for (int64_t k = 0; k < K; ++k) {
    const typename V::R ar = V::set1(A[k * sk]);
#pragma GCC unroll 16
    for (int u = 0; u < N; ++u) c[u] = V::fma(ar, V::load(B + k * ldb + u * W), c[u]);
  }
#pragma GCC unroll 16
  for (int u = 0; u < N; ++u) V::store(C + u * W, c[u]);
}

// C (M x N) (+)= A (M x K) B (K x N), N a multiple of NR; A(m, k) = A[m*sr + k*sk].
template <typename T>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t sr, int64_t sk, const T* B, int64_t ldb, T* C,
          int64_t ldc, bool accumulate) {
  constexpr int MR = Vec<T>::MR;
  constexpr int64_t NR = kNR<T>;
  if (M == 1) {
    int64_t n0 = 0;
    for (; n0 + 4 * NR <= N; n0 += 4 * NR) row_tile<T, 4>(K, A, sk, B + n0, ldb, C + n0, accumulate);
    const int64_t left = (N - n0) / NR;
    if (left == 3) row_tile<T, 3>(K, A, sk, B + n0, ldb, C + n0, accumulate);
    if (left == 2) row_tile<T, 2>(K, A, sk, B + n0, ldb, C + n0, accumulate);
    if (left == 1) row_tile<T, 1>(K, A, sk, B + n0, ldb, C + n0, accumulate);
    return;
  }
  for (int64_t n0 = 0; n0 < N; n0 += NR)
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
      const int rows = static_cast<int>(std::min<int64_t>(MR, M - m0));
      tile_rows<T, MR>(rows, K, A + m0 * sr, sr, sk, B + n0, ldb, C + m0 * ldc + n0, ldc, accumulate);
    }
}

// In-register transposes of one square tile (Tr<T>::N rows of N values):
// dst[c*ld + r] = (scale ? scale[r] : 1) * src[r*ls + c]. Pure data movement
// plus at most the one multiply the scalar loop does, so the packed values are
// the same bits at every level; they exist because packing a 64 x 64 K block
// one element at a time cost ~10x the FMAs of the decode product it feeds.
template <typename T>
struct Tr {
  static constexpr int N = 1;  // generic level: no tile, the scalar loop does it all
  static void tile(const T*, int64_t, const T*, T*, int64_t) {}
};

#if defined(__AVX512F__)
template <>
struct Tr<float> {
  static constexpr int N = 16;
  static void tile(const float* src, int64_t ls, const float* scale, float* dst, int64_t ld) {
    __m512 r[16], t[16];
    for (int i = 0; i < 16; ++i) {
      r[i] = _mm512_loadu_ps(src + i * ls);
      if (scale) r[i] = _mm512_mul_ps(_mm512_set1_ps(scale[i]), r[i]);
    }
    // rows (2i, 2i+1) interleaved: per 128-bit lane L, t[2i] = a0 b0 a1 b1 of columns 4L..4L+3
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // r[4g+k], lane L: column 4L+k of rows 4g..4g+3
    for (int g = 0; g < 4; ++g) {
      r[4 * g + 0] = _mm512_shuffle_ps(t[4 * g + 0], t[4 * g + 2], _MM_SHUFFLE(1, 0, 1, 0));
      r[4 * g + 1] = _mm512_shuffle_ps(t[4 * g + 0], t[4 * g + 2], _MM_SHUFFLE(3, 2, 3, 2));
      r[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], _MM_SHUFFLE(1, 0, 1, 0));
      r[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    // column 4L+k = lane L of r[k], r[4+k], r[8+k], r[12+k]: a 4 x 4 transpose of 128-bit lanes
    for (int k = 0; k < 4; ++k) {
      const __m512 u0 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x88), u1 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xDD);
      const __m512 u2 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x88);
      const __m512 u3 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xDD);
      _mm512_storeu_ps(dst + (0 + k) * ld, _mm512_shuffle_f32x4(u0, u2, 0x88));
      _mm512_storeu_ps(dst + (8 + k) * ld, _mm512_shuffle_f32x4(u0, u2, 0xDD));
      _mm512_storeu_ps(dst + (4 + k) * ld, _mm512_shuffle_f32x4(u1, u3, 0x88));
      _mm512_storeu_ps(dst + (12 + k) * ld, _mm512_shuffle_f32x4(u1, u3, 0xDD));
    }
  }
};
template <>
struct Tr<double> {
  static constexpr int N = 8;
  static void tile(const double* src, int64_t ls, const double* scale, double* dst, int64_t ld) {
    __m512d r[8], t[8];
    for (int i = 0; i < 8; ++i) {
      r[i] = _mm512_loadu_pd(src + i * ls);
      if (scale) r[i] = _mm512_mul_pd(_mm512_set1_pd(scale[i]), r[i]);
    }
    // t[2i+k], lane L: column 2L+k of rows 2i, 2i+1
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = _mm512_unpacklo_pd(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_pd(r[2 * i], r[2 * i + 1]);
    }
    for (int k = 0; k < 2; ++k) {
      const __m512d u0 = _mm512_shuffle_f64x2(t[k], t[2 + k], 0x88), u1 = _mm512_shuffle_f64x2(t[k], t[2 + k], 0xDD);
      const __m512d u2 = _mm512_shuffle_f64x2(t[4 + k], t[6 + k], 0x88);
      const __m512d u3 = _mm512_shuffle_f64x2(t[4 + k], t[6 + k], 0xDD);
      _mm512_storeu_pd(dst + (0 + k) * ld, _mm512_shuffle_f64x2(u0, u2, 0x88));
      _mm512_storeu_pd(dst + (4 + k) * ld, _mm512_shuffle_f64x2(u0, u2, 0xDD));
      _mm512_storeu_pd(dst + (2 + k) * ld, _mm512_shuffle_f64x2(u1, u3, 0x88));
      _mm512_storeu_pd(dst + (6 + k) * ld, _mm512_shuffle_f64x2(u1, u3, 0xDD));
    }
  }
};
#elif defined(__AVX2__) && defined(__FMA__)
template <>
struct Tr<float> {
  static constexpr int N = 8;
  static void tile(const float* src, int64_t ls, const float* scale, float* dst, int64_t ld) {
    __m256 r[8], t[8];
    for (int i = 0; i < 8; ++i) {
      r[i] = _mm256_loadu_ps(src + i * ls);
      if (scale) r[i] = _mm256_mul_ps(_mm256_set1_ps(scale[i]), r[i]);
    }
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int g = 0; g < 2; ++g) {
      r[4 * g + 0] = _mm256_shuffle_ps(t[4 * g + 0], t[4 * g + 2], _MM_SHUFFLE(1, 0, 1, 0));
      r[4 * g + 1] = _mm256_shuffle_ps(t[4 * g + 0], t[4 * g + 2], _MM_SHUFFLE(3, 2, 3, 2));
      r[4 * g + 2] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], _MM_SHUFFLE(1, 0, 1, 0));
      r[4 * g + 3] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    // column 4L+k = [lane L of r[k], lane L of r[4+k]]
    for (int k = 0; k < 4; ++k) {
      _mm256_storeu_ps(dst + k * ld, _mm256_permute2f128_ps(r[k], r[4 + k], 0x20));
      _mm256_storeu_ps(dst + (4 + k) * ld, _mm256_permute2f128_ps(r[k], r[4 + k], 0x31));
    }
  }
};
template <>
struct Tr<double> {
  static constexpr int N = 4;
  static void tile(const double* src, int64_t ls, const double* scale, double* dst, int64_t ld) {
    __m256d r[4];
    for (int i = 0; i < 4; ++i) {
      r[i] = _mm256_loadu_pd(src + i * ls);
      if (scale) r[i] = _mm256_mul_pd(_mm256_set1_pd(scale[i]), r[i]);
    }
    const __m256d t0 = _mm256_unpacklo_pd(r[0], r[1]), t1 = _mm256_unpackhi_pd(r[0], r[1]);
    const __m256d t2 = _mm256_unpacklo_pd(r[2], r[3]), t3 = _mm256_unpackhi_pd(r[2], r[3]);
    _mm256_storeu_pd(dst + 0 * ld, _mm256_permute2f128_pd(t0, t2, 0x20));
    _mm256_storeu_pd(dst + 2 * ld, _mm256_permute2f128_pd(t0, t2, 0x31));
    _mm256_storeu_pd(dst + 1 * ld, _mm256_permute2f128_pd(t1, t3, 0x20));
    _mm256_storeu_pd(dst + 3 * ld, _mm256_permute2f128_pd(t1, t3, 0x31));
  }
};
#endif

// Transpose rows [0, rows) of X (width w, rows ls elements apart) into
// dst[c*ld + r], zero-padding r in [rows, rows_pad); `scale` (may be null)
// multiplies row r. Whole N x N squares go through Tr<T>::tile, the edges
// through the scalar loop. Copies (and one product per element with `scale`),
// so the same bits at every level.
template <typename T>
void pack_transposed_strided(const T* X, int64_t ls, int64_t rows, int64_t rows_pad, int64_t w, const T* scale,
                             T* dst, int64_t ld) {
  constexpr int64_t N = Tr<T>::N;
  const int64_t rt = N > 1 ? rows / N * N : 0, ct = N > 1 ? w / N * N : 0;
  for (int64_t r0 = 0; r0 < rt; r0 += N)
    for (int64_t c0 = 0; c0 < ct; c0 += N)
      Tr<T>::tile(X + r0 * ls + c0, ls, scale ? scale + r0 : nullptr, dst + c0 * ld + r0, ld);
  for (int64_t c = 0; c < w; ++c) {
    T* o = dst + c * ld;
    const int64_t r_from = c < ct ? rt : 0;  // columns of whole squares only miss their bottom rows
    if (scale) {
      for (int64_t r = r_from; r < rows; ++r) o[r] = scale[r] * X[r * ls + c];
    } else {
      for (int64_t r = r_from; r < rows; ++r) o[r] = X[r * ls + c];
    }
    for (int64_t r = rows; r < rows_pad; ++r) o[r] = T(0);
  }
}

// The same for packed rows (ls = w).
template <typename T>
void pack_transposed(const T* X, int64_t rows, int64_t rows_pad, int64_t w, const T* scale, T* dst, int64_t ld) {
  pack_transposed_strided(X, w, rows, rows_pad, w, scale, dst, ld);
}

// Below ~256 K multiply-adds an OpenMP team costs more than it saves.
inline bool worth_threads(int64_t tasks, int64_t work) { return tasks > 1 && work > (int64_t(1) << 18); }

}  // namespace
EMBKERN_ISA_END
}  // namespace flash
}  // namespace embkern
