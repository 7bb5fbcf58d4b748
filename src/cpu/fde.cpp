// MUVERA FDE CPU kernel. Built with -ffp-contract=off: every x*g is rounded
// before it is added, as in the SSE2 reference (see fde.h for the order).
#include "embkern/fde.h"

#include <omp.h>
#if defined(__SSE__)
#include <immintrin.h>
#endif

#include <atomic>
#include <cassert>
#include <climits>
#include <new>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "embkern/saturating.h"

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace embkern {
namespace fde {
EMBKERN_ISA_BEGIN
namespace {

// ---- mt19937 (the standard engine; written out so no <random> is involved)
class MT19937 {
 public:
  explicit MT19937(uint32_t seed) {
    mt_[0] = seed;
    for (int i = 1; i < 624; ++i) mt_[i] = 1812433253u * (mt_[i - 1] ^ (mt_[i - 1] >> 30)) + uint32_t(i);
    idx_ = 624;
  }
  uint32_t operator()() {
    if (idx_ >= 624) twist();
    uint32_t y = mt_[idx_++];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= y >> 18;
    return y;
  }

 private:
  // The standard in-place twist, split where (i + 1) and (i + 397) wrap so
  // the loops carry no % 624 (a count-sketch table of 2^26 entries, 3 draws
  // each, is bound by this).
  static uint32_t step(uint32_t a, uint32_t b, uint32_t m) {
    const uint32_t y = (a & 0x80000000u) | (b & 0x7fffffffu);
    return m ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
  }
  void twist() {
    int i = 0;
    for (; i < 624 - 397; ++i) mt_[i] = step(mt_[i], mt_[i + 1], mt_[i + 397]);
    for (; i < 623; ++i) mt_[i] = step(mt_[i], mt_[i + 1], mt_[i + 397 - 624]);
    mt_[623] = step(mt_[623], mt_[0], mt_[396]);
    idx_ = 0;
  }
  uint32_t mt_[624];
  int idx_;
};

// generate_canonical<float, 24>: one draw.
inline float u01_f32(MT19937& g) {
  float u = float(g()) / 4294967296.0f;
  return u >= 1.0f ? std::nextafter(1.0f, 0.0f) : u;
}

// generate_canonical<double, 53>: two draws, low word first.
inline double u01_f64(MT19937& g) {
  double s = double(g());
  s += double(g()) * 4294967296.0;
  double u = s / 18446744073709551616.0;
  return u >= 1.0 ? std::nextafter(1.0, 0.0) : u;
}

inline float bernoulli_sign(MT19937& g) { return u01_f64(g) < 0.5 ? 1.0f : -1.0f; }

// Lemire's nearly divisionless bounded draw (libstdc++ _S_nd with a 64-bit product).
inline uint32_t uniform_int(MT19937& g, uint32_t range) {
  uint64_t prod = uint64_t(g()) * uint64_t(range);
  uint32_t low = uint32_t(prod);
  if (low < range) {
    const uint32_t thr = uint32_t(-range) % range;
    while (low < thr) {
      prod = uint64_t(g()) * uint64_t(range);
      low = uint32_t(prod);
    }
  }
  return uint32_t(prod >> 32);
}

// libstdc++ normal_distribution<float>: Marsaglia polar, second value cached.
class Normal {
 public:
  float operator()(MT19937& g) {
    if (saved_ok_) {
      saved_ok_ = false;
      return saved_;
    }
    float x, y, r2;
    do {
      x = float(double(2.0f * u01_f32(g)) - 1.0);
      y = float(double(2.0f * u01_f32(g)) - 1.0);
      const float xx = x * x;
      const float yy = y * y;
      r2 = xx + yy;
    } while (r2 > 1.0f || r2 == 0.0f);
    // glibc logf (not correctly rounded; docs/ops/fde.md pins it).
    const float mult = std::sqrt(-2.0f * ::logf(r2) / r2);
    saved_ = x * mult;
    saved_ok_ = true;
    return y * mult;
  }

 private:
  float saved_ = 0.0f;
  bool saved_ok_ = false;
};

// ---- ordered dot products ---------------------------------------------------

// Columns per register tile of the dense sign-bit product: 16 floats = two
// AVX2 vectors per point row; 6 point rows share each G load (12 accumulator
// registers + 2 loads + 1 broadcast of the 16 ymm). A last 8-column tile
// covers rk_pad % 16.
constexpr int64_t kColTile = 16;
constexpr int kRowTile = 6;

// Eight floats in one value; GCC lowers it to one AVX2 register (two SSE
// registers on baseline x86-64). With -ffp-contract=off `a + x * g` stays a
// rounded multiply then an add, lane by lane, exactly the scalar chain.
typedef float v8f __attribute__((vector_size(32)));
// The portable (baseline x86-64) build warns that passing v8f by value has an
// AVX-dependent ABI; every user is an inline function of this file.
#pragma GCC diagnostic ignored "-Wpsabi"
// Unaligned, may-alias view for loads / stores (memcpy into v8f made GCC
// bounce every G row through the stack: a store-forwarding stall per term).
typedef float v8u __attribute__((vector_size(32), aligned(4), may_alias));

inline v8f load8(const float* p) { return *reinterpret_cast<const v8u*>(p); }
inline void store8(float* p, v8f v) { *reinterpret_cast<v8u*>(p) = v; }

// Output stores: the encoder writes each output block once and never reads it
// back, and a batch's output (R20 k5: 327 KB a document) is far larger than
// the caches. Streaming (non-temporal) stores skip the read-for-ownership of
// every line, halving the memory traffic of the write, which is what bounds
// two threads on a 2-core VM (queries, out= reused: 1 -> 2 threads 1.24x).
// Used only on 32-byte aligned blocks; each thread fences before it leaves.
inline void store8_out(float* p, v8f v, bool nt) {
#if defined(__AVX__)
  if (nt) {
    _mm256_stream_ps(p, reinterpret_cast<__m256&>(v));
    return;
  }
#endif
  (void)nt;
  store8(p, v);
}

inline void fence_streaming_stores() {
#if defined(__SSE__)
  _mm_sfence();
#endif
}

// dst[0..n) = src[0..n) (src null: zeros), streaming when nt (dst 32-byte aligned, n % 8 == 0).
inline void copy_out(float* dst, const float* src, int64_t n, bool nt) {
  if (!nt) {
    if (src) std::memcpy(dst, src, sizeof(float) * size_t(n));
    else std::fill(dst, dst + n, 0.0f);
    return;
  }
  for (int64_t c = 0; c < n; c += 8) store8_out(dst + c, src ? load8(src + c) : v8f{}, true);
}

// acc[p][c] (+)= sum_{i in [i0, i1)} x_p[i] * gt[i][c] for PR rows (x_p =
// x + p * xs) at once, c in one tile of 8*NV columns; each element is one
// ordered chain. Kept out of line with one row pointer: inlined into
// encode_doc (or with a pointer per row) GCC spilled 10 of the 12
// accumulators to the stack, a load + store per term.
template <int PR, int NV>
__attribute__((noinline)) void seq_tile(const float* __restrict x, int64_t xs, const float* __restrict gt,
                                        int64_t ld, int64_t i0, int64_t i1, float* __restrict acc) {
  constexpr int W = 8 * NV;
  v8f a[PR][NV];
#pragma GCC unroll 8
  for (int p = 0; p < PR; ++p)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) a[p][v] = load8(acc + p * W + 8 * v);
  for (int64_t i = i0; i < i1; ++i) {
    const float* __restrict g = gt + i * ld;
    v8f gv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) gv[v] = load8(g + 8 * v);
#pragma GCC unroll 8
    for (int p = 0; p < PR; ++p) {
      const float xv = x[p * xs + i];
      const v8f xb = {xv, xv, xv, xv, xv, xv, xv, xv};
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) a[p][v] = a[p][v] + xb * gv[v];
    }
  }
#pragma GCC unroll 8
  for (int p = 0; p < PR; ++p)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) store8(acc + p * W + 8 * v, a[p][v]);
}

// One column tile of 8*NV columns at c0: out[p * ld + c0 + c] = sum over
// depth blocks (block + out), each block in order.
template <int PR, int NV>
inline void dots_tile(const float* x, const float* gt, int64_t d, int64_t ld, int64_t kc, int64_t c0, float* out) {
  constexpr int W = 8 * NV;
  float tot[PR * W];
  for (int q = 0; q < PR * W; ++q) tot[q] = 0.0f;
  for (int64_t k2 = 0; k2 < d; k2 += kc) {
    const int64_t k3 = std::min(k2 + kc, d);
    float blk[PR * W];
    for (int q = 0; q < PR * W; ++q) blk[q] = 0.0f;
    seq_tile<PR, NV>(x, d, gt + c0, ld, k2, k3, blk);
    for (int q = 0; q < PR * W; ++q) tot[q] = blk[q] + tot[q];
  }
  for (int p = 0; p < PR; ++p) std::memcpy(out + p * ld + c0, tot + p * W, sizeof(float) * W);
}

// Sequential-by-depth-block dot products of PR rows (x + p * d) against all
// ld columns (ld a multiple of 8): 16-column tiles, then one 8-column tile.
template <int PR>
void dots_seq(const float* x, const float* gt, int64_t d, int64_t ld, int64_t kc, float* out) {
  int64_t c0 = 0;
  for (; c0 + kColTile <= ld; c0 += kColTile) dots_tile<PR, 2>(x, gt, d, ld, kc, c0, out);
  if (c0 < ld) dots_tile<PR, 1>(x, gt, d, ld, kc, c0, out);
}

// One row in a non-sequential class (kLanes4 / kEvenOdd / kMod4), all columns.
void dots_grouped(const float* x, const float* gt, int64_t d, int64_t ld, const DotOrder& o, float* out,
                  std::vector<float>& scratch) {
  scratch.assign(size_t(5 * ld), 0.0f);
  float* C[4] = {scratch.data(), scratch.data() + ld, scratch.data() + 2 * ld, scratch.data() + 3 * ld};
  float* tot = scratch.data() + 4 * ld;
  const int64_t kc = o.cls == kLanes4 ? d : o.kc;
  for (int64_t k2 = 0; k2 < d; k2 += kc) {
    const int64_t akc = std::min(k2 + kc, d) - k2;
    for (int a = 0; a < 4; ++a) std::fill(C[a], C[a] + ld, 0.0f);
    int64_t head;  // local depth handled by the split accumulators
    int groups;
    if (o.cls == kEvenOdd) {
      head = akc & ~int64_t(7);
      groups = 2;
    } else {
      head = (akc / 4) * 4;
      groups = 4;
    }
    for (int64_t l = 0; l < head; ++l) {
      float* acc = C[l % groups];
      const float xv = x[k2 + l];
      const float* g = gt + (k2 + l) * ld;
      for (int64_t c = 0; c < ld; ++c) acc[c] = acc[c] + xv * g[c];
    }
    for (int64_t c = 0; c < ld; ++c) {
      if (o.cls == kEvenOdd) C[0][c] = C[0][c] + C[1][c];
      else if (o.cls == kMod4) C[0][c] = (C[0][c] + C[1][c]) + (C[2][c] + C[3][c]);
      else C[0][c] = (C[0][c] + C[2][c]) + (C[1][c] + C[3][c]);
    }
    for (int64_t l = head; l < akc; ++l) {
      const float xv = x[k2 + l];
      const float* g = gt + (k2 + l) * ld;
      for (int64_t c = 0; c < ld; ++c) C[0][c] = C[0][c] + xv * g[c];
    }
    for (int64_t c = 0; c < ld; ++c) tot[c] = C[0][c] + tot[c];
  }
  std::memcpy(out, tot, sizeof(float) * size_t(ld));
}

// AMS value of one (row, column): terms v (= sign * x_i, exact) at inputs i
// ascending, summed in the row's Eigen order. Zero terms that Eigen adds in
// between cannot change a +0-initialised float sum, so only these count.
inline float ams_value(const int32_t* ti, const float* ts, int32_t m, const float* x, int cls, int64_t kc,
                       int64_t d) {
  if (cls == kPlain) {
    float s = 0.0f;
    for (int32_t t = 0; t < m; ++t) s = s + ts[t] * x[ti[t]];
    return s;
  }
  if (cls == kLanes4) kc = d;
  float tot = 0.0f;
  int32_t t = 0;
  for (int64_t k2 = 0; k2 < d; k2 += kc) {
    const int64_t k3 = std::min(k2 + kc, d), akc = k3 - k2;
    float C[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int64_t head = akc;
    int groups = 1;
    if (cls == kEvenOdd) {
      head = akc & ~int64_t(7);
      groups = 2;
    } else if (cls == kMod4 || cls == kLanes4) {
      head = (akc / 4) * 4;
      groups = 4;
    }
    for (; t < m && ti[t] < k2 + head; ++t) {
      const int64_t l = ti[t] - k2;
      C[l % groups] = C[l % groups] + ts[t] * x[ti[t]];
    }
    float s;
    if (cls == kEvenOdd) s = C[0] + C[1];
    else if (cls == kMod4) s = (C[0] + C[1]) + (C[2] + C[3]);
    else if (cls == kLanes4) s = (C[0] + C[2]) + (C[1] + C[3]);
    else s = C[0];
    for (; t < m && ti[t] < k3; ++t) s = s + ts[t] * x[ti[t]];
    tot = s + tot;
  }
  return tot;
}

inline int popcount64(uint64_t v) { return __builtin_popcountll(v); }

// b[c] = (((+0 + Y[m0][c]) + Y[m1][c]) + ...) [/ cnt] for the m member rows,
// c in [c0, c0 + 8W): W accumulator vectors stay in registers across members.
// A power-of-two count divides by multiplying with its exact reciprocal: both
// are one correctly rounded operation on the same real value, so the bits are
// those of the IEEE division (subnormals included), and a vmulps costs a
// fraction of a vdivps (with tens of points a document, most non-empty
// blocks hold 1, 2, 4 or 8 points).
enum class Scale { kNone, kDivide, kMulExact };

template <int W, Scale S>
inline void sum_chunk(const float* Y, int64_t dp, const int64_t* mem, int64_t m, float cnt, int64_t c0,
                      float* b, bool nt) {
  v8f acc[W];
#pragma GCC unroll 16
  for (int w = 0; w < W; ++w) acc[w] = v8f{};
  for (int64_t t = 0; t < m; ++t) {
    const float* y = Y + mem[t] * dp + c0;
#pragma GCC unroll 16
    for (int w = 0; w < W; ++w) acc[w] = acc[w] + load8(y + 8 * w);
  }
  if (S == Scale::kDivide) {
    const v8f cv = {cnt, cnt, cnt, cnt, cnt, cnt, cnt, cnt};
#pragma GCC unroll 16
    for (int w = 0; w < W; ++w) acc[w] = acc[w] / cv;  // IEEE division, not a reciprocal
  } else if (S == Scale::kMulExact) {
    const float inv = 1.0f / cnt;  // exact: cnt = 2^j, j <= 24
    const v8f iv = {inv, inv, inv, inv, inv, inv, inv, inv};
#pragma GCC unroll 16
    for (int w = 0; w < W; ++w) acc[w] = acc[w] * iv;
  }
#pragma GCC unroll 16
  for (int w = 0; w < W; ++w) store8_out(b + c0 + 8 * w, acc[w], nt);
}

template <Scale S>
void sum_block_s(const float* Y, int64_t dp, const int64_t* mem, int64_t m, float cnt, float* b, bool nt) {
  int64_t c0 = 0;
  for (; c0 + 64 <= dp; c0 += 64) sum_chunk<8, S>(Y, dp, mem, m, cnt, c0, b, nt);
  for (; c0 + 8 <= dp; c0 += 8) sum_chunk<1, S>(Y, dp, mem, m, cnt, c0, b, nt);
  for (; c0 < dp; ++c0) {
    float a = 0.0f;
    for (int64_t t = 0; t < m; ++t) a = a + Y[mem[t] * dp + c0];
    if (S == Scale::kDivide) a = a / cnt;
    else if (S == Scale::kMulExact) a = a * (1.0f / cnt);
    b[c0] = a;
  }
}

// Sum of the m member rows (in order, from +0), divided by cnt for documents.
void sum_block(const float* Y, int64_t dp, const int64_t* mem, int64_t m, bool divide, float cnt, float* b,
               bool nt) {
  if (!divide) sum_block_s<Scale::kNone>(Y, dp, mem, m, cnt, b, nt);
  else if ((m & (m - 1)) == 0 && m <= (1 << 24)) sum_block_s<Scale::kMulExact>(Y, dp, mem, m, cnt, b, nt);
  else sum_block_s<Scale::kDivide>(Y, dp, mem, m, cnt, b, nt);
}

// Sign pattern (hyperplane 0 = MSB) and partition of every (repetition, point).
// The Gray decode of docs/ops/fde.md, P = (P << 1) | (b_j ^ (P & 1)), sets bit k-1-j of P to
// b_0 ^ ... ^ b_j, i.e. P = code ^ (code >> 1) ^ (code >> 2) ^ ..., done here
// with 5 shift-xors instead of a serial chain per bit. Out of line: inlined,
// GCC kept k and the loop bounds on the stack.
__attribute__((noinline)) void sign_codes(const float* dots, int64_t n, int64_t ld, int64_t R, int k,
                                          int32_t* part, uint32_t* code) {
  for (int64_t p = 0; p < n; ++p) {
    const float* row = dots + p * ld;
    for (int64_t r = 0; r < R; ++r) {
      const float* dv = row + r * k;
      uint32_t c = 0;
      for (int j = 0; j < k; ++j) c = (c << 1) | uint32_t(dv[j] > 0.0f);  // NaN, +-0 -> 0
      uint32_t g = c;
      g ^= g >> 1;
      g ^= g >> 2;
      g ^= g >> 4;
      g ^= g >> 8;
      g ^= g >> 16;
      part[r * n + p] = int32_t(g);
      code[r * n + p] = c;
    }
  }
}

struct Scratch {
  std::vector<float> dots;      // (n, rk_pad)
  std::vector<float> grouped;   // (rk_pad)
  std::vector<float> tmp;       // dots_grouped scratch (5 rk_pad)
  std::vector<int32_t> part;    // (R, n) partition per point
  std::vector<uint32_t> code;   // (R, n) sign pattern, hyperplane 0 = MSB
  std::vector<float> y;         // (n, dp) AMS-projected points of one repetition
  std::vector<int64_t> start;   // (NP+1) partition -> range in members (dense path)
  std::vector<int64_t> pos;     // (NP) fill cursor of the counting sort (dense path)
  std::vector<int64_t> members; // (n) points grouped by partition, input order
  std::vector<uint64_t> keys;   // (n) partition << 32 | point, sorted (sparse path)
  std::vector<float> raw;       // (dp) one block on its way into the count sketch
};

// Partitions are bucketed by a counting sort over all NP = 2^k of them while
// NP <= kDenseRatio * n, else by sorting the n (partition, point) keys and
// walking the occupied partitions only: the counting sort's two NP-long
// int64 arrays cost 16 * 2^k bytes a thread (k = 26: 1 GiB, for one-point
// documents) and O(2^k) time per repetition even where the output is 8
// floats. At 4 the dense path keeps every benchmarked config (n = 32..80,
// k <= 6: NP <= 64) and bounds its arrays by 64 bytes a point.
constexpr int64_t kDenseRatio = 4;
inline bool dense_buckets(int64_t NP, int64_t n) { return NP <= kDenseRatio * n; }

// Byte counts: the saturating sat_mul / sat_add of embkern/saturating.h (INT64_MAX = "too big").

// Elements of each Scratch vector for documents of up to n points (bytes() /
// reserve() below agree on them, so the size check and the reservation do).
struct ScratchSizes {
  int64_t dots = 0, grouped = 0, tmp = 0, part = 0, y = 0, start = 0, pos = 0, members = 0, keys = 0, raw = 0;
  ScratchSizes(const Prepared& P, int64_t n) {
    const int64_t NP = int64_t(1) << P.k;
    if (P.k > 0) {
      dots = sat_mul(n, P.rk_pad);
      grouped = P.rk_pad;
      tmp = sat_mul(5, P.rk_pad);
    }
    part = sat_mul(P.R, n);
    if (P.ams) y = sat_mul(n, P.dp);
    if (dense_buckets(NP, n)) {
      start = NP + 1;
      pos = NP;
    }
    members = n;
    keys = n;
    if (P.final_dim > 0) raw = P.dp;
  }
  int64_t bytes() const {
    int64_t b = 0;
    for (int64_t f : {dots, grouped, tmp, y, raw}) b = sat_add(b, sat_mul(f, int64_t(sizeof(float))));
    b = sat_add(b, sat_mul(part, int64_t(sizeof(int32_t) + sizeof(uint32_t))));  // part + code
    for (int64_t i : {start, pos, members, keys}) b = sat_add(b, sat_mul(i, int64_t(sizeof(int64_t))));
    return b;
  }
  void reserve(Scratch& s) const {
    s.dots.reserve(size_t(dots));
    s.grouped.reserve(size_t(grouped));
    s.tmp.reserve(size_t(tmp));
    s.part.reserve(size_t(part));
    s.code.reserve(size_t(part));
    s.y.reserve(size_t(y));
    s.start.reserve(size_t(start));
    s.pos.reserve(size_t(pos));
    s.members.reserve(size_t(members));
    s.keys.reserve(size_t(keys));
    s.raw.reserve(size_t(raw));
  }
};

// Closest point to sign pattern `target` (fewest differing bits; strict <,
// so ties keep the lowest index), the reference's fill rule.
inline int64_t nearest_point(const uint32_t* code, int64_t n, uint32_t target) {
  int best = 99;
  int64_t arg = 0;
  for (int64_t p = 0; p < n; ++p) {
    const int dist = popcount64(uint64_t(code[p] ^ target));
    if (dist < best) {
      best = dist;
      arg = p;
    }
  }
  return arg;
}

// The sign of a packed count-sketch entry as the float the reference multiplies
// by: s * v is then the reference's own operation (NaN operands included).
// Cheaper than flipping v's sign bit in an integer register: no moves between
// integer and vector registers.
constexpr float kSketchSign[2] = {1.0f, -1.0f};

// out[bucket(t[c])] += sign(t[c]) * b[c] for c < dp, t packed bucket | sign in the top bit.
template <class T>
inline void sketch_block(const T* t, const float* b, int64_t dp, float* out) {
  constexpr int kTop = 8 * int(sizeof(T)) - 1;
  constexpr T kBucket = T(~T(0)) >> 1;
  for (int64_t c = 0; c < dp; ++c) out[t[c] & kBucket] = out[t[c] & kBucket] + kSketchSign[t[c] >> kTop] * b[c];
}

void encode_doc(const Prepared& P, const float* X, int64_t n, float* out_row, Scratch& s) {
  const int64_t d = P.d, R = P.R, dp = P.dp, ld = P.rk_pad;
  const int k = P.k;
  const int64_t NP = int64_t(1) << k;
  // Every block of every repetition is written in step 2: no zero pass. With a
  // final projection each block goes through one dp-float buffer straight
  // into the count sketch (step 3 below) instead of a scratch row of L floats
  // written and then read back (megabytes a document at large R and k).
  const bool sketch = P.final_dim > 0;
  float* fde = sketch ? (s.raw.resize(size_t(dp)), s.raw.data()) : out_row;
  // streaming stores into the output row when every block is 32-byte aligned
  const bool nt = !sketch && dp % 8 == 0 && (reinterpret_cast<uintptr_t>(out_row) & 31) == 0;
  if (sketch) std::fill(out_row, out_row + P.final_dim, 0.0f);
  // 3. count sketch of block (r, q): blocks are emitted in increasing (r, q),
  //    so every bucket's members are added in ascending input index, the
  //    reference's order (its own loop over the whole row).
  auto emit = [&](int64_t r, int64_t q, const float* b) {
    if (!sketch) return;
    const int64_t i0 = (r * NP + q) * dp;
    if (P.cs16 != nullptr) {
      sketch_block(P.cs16.get() + i0, b, dp, out_row);
    } else if (P.cs32 != nullptr) {
      sketch_block(P.cs32.get() + i0, b, dp, out_row);
    } else {
      const int32_t* bk = P.cs_bucket.get() + i0;
      const float* sg = P.cs_sign.get() + i0;
      for (int64_t c = 0; c < dp; ++c) out_row[bk[c]] = out_row[bk[c]] + sg[c] * b[c];
    }
  };

  // 1. sign bits -> partitions (all repetitions at once: one pass over G)
  s.part.assign(size_t(R * n), 0);
  s.code.assign(size_t(R * n), 0u);
  if (k > 0 && n > 0) {
    s.dots.resize(size_t(n * ld));
    int64_t kc, mc;
    const DotOrder o0 = dot_order(n, d, k, 0);
    kc = o0.cls == kPlain ? d : o0.kc;
    (void)mc;
    int64_t p = 0;
    for (; p + kRowTile <= n; p += kRowTile) {
      dots_seq<kRowTile>(X + p * d, P.gt.get(), d, ld, kc, s.dots.data() + p * ld);
    }
    // the last n % 6 rows in one tile too (row by row, each add waits for the
    // previous one: latency-bound)
    switch (n - p) {
      case 1: dots_seq<1>(X + p * d, P.gt.get(), d, ld, kc, s.dots.data() + p * ld); break;
      case 2: dots_seq<2>(X + p * d, P.gt.get(), d, ld, kc, s.dots.data() + p * ld); break;
      case 3: dots_seq<3>(X + p * d, P.gt.get(), d, ld, kc, s.dots.data() + p * ld); break;
      case 4: dots_seq<4>(X + p * d, P.gt.get(), d, ld, kc, s.dots.data() + p * ld); break;
      case 5: dots_seq<5>(X + p * d, P.gt.get(), d, ld, kc, s.dots.data() + p * ld); break;
      default: break;
    }
    // rows whose Eigen order is not sequential (<= 7 per row block, or n == 1)
    for (p = 0; p < n; ++p) {
      const DotOrder o = dot_order(n, d, k, p);
      if (o.cls == kPlain || o.cls == kGemmSeq || o.panel_cols == 0) continue;
      s.grouped.resize(size_t(ld));
      dots_grouped(X + p * d, P.gt.get(), d, ld, o, s.grouped.data(), s.tmp);
      float* row = s.dots.data() + p * ld;
      for (int64_t r = 0; r < R; ++r)
        for (int64_t j = 0; j < o.panel_cols; ++j) row[r * k + j] = s.grouped[size_t(r * k + j)];
    }
    sign_codes(s.dots.data(), n, ld, R, k, s.part.data(), s.code.data());
  }

  // 2. per-repetition sums in input order, averages, fill
  const bool dense = dense_buckets(NP, n);
  const bool filled = P.is_document && k > 0 && P.fill && n > 0;
  if (dense) {
    s.start.resize(size_t(NP + 1));
    s.pos.resize(size_t(NP));
  } else {
    s.keys.resize(size_t(n));
  }
  s.members.resize(size_t(n));
  for (int64_t r = 0; r < R; ++r) {
    const float* Y = X;  // identity: the points themselves
    if (P.ams) {
      s.y.resize(size_t(n * dp));
      const int32_t* off = P.ams_col_off.get() + r * (dp + 1);
      const int32_t* ti = P.ams_term_i.get() + r * d;
      const float* ts = P.ams_term_s.get() + r * d;
      for (int64_t p = 0; p < n; ++p) {
        const DotOrder o = n > 0 ? dot_order(n, d, dp, p) : DotOrder{kPlain, d, 0};
        const float* x = X + p * d;
        float* y = s.y.data() + p * dp;
        for (int64_t c = 0; c < dp; ++c) {
          int cls = o.cls;
          if ((cls == kEvenOdd || cls == kMod4) && c >= o.panel_cols) cls = kGemmSeq;
          y[c] = ams_value(ti + off[c], ts + off[c], off[c + 1] - off[c], x, cls, o.kc, d);
        }
      }
      Y = s.y.data();
    }
    // Bucket the points by partition (stable: each bucket lists its points in
    // input order), then write every block exactly once: the in-order sum
    // from +0 (divided by the count for documents), the fill copy, or zeros.
    // Same arithmetic as scattering each point into a zeroed row, without the
    // zero pass and the read-modify-write of the whole row (R * 2^k * d_p
    // floats) per point.
    float* blocks = sketch ? fde : fde + r * NP * dp;
    const int32_t* part = s.part.data() + r * n;
    const uint32_t* code = s.code.data() + r * n;
    // partitions [q0, q1) hold no point
    auto empty_run = [&](int64_t q0, int64_t q1) {
      if (q0 >= q1) return;
      if (filled) {
        for (int64_t q = q0; q < q1; ++q) {
          float* b = sketch ? blocks : blocks + q * dp;
          const int64_t arg = nearest_point(code, n, uint32_t(q) ^ (uint32_t(q) >> 1));
          copy_out(b, Y + arg * dp, dp, nt);
          emit(r, q, b);
        }
        return;
      }
      // zeros; k == 0 with no points stays zero (the reference gives 0/0)
      if (!sketch) {
        copy_out(blocks + q0 * dp, nullptr, (q1 - q0) * dp, nt);  // blocks are contiguous
        return;
      }
      if (P.cs_finite) return;  // adds +-0 to buckets that are never -0: no-op (Prepared::cs_finite)
      copy_out(blocks, nullptr, dp, false);
      for (int64_t q = q0; q < q1; ++q) emit(r, q, blocks);
    };
    auto full_block = [&](int64_t q, const int64_t* mem, int64_t m) {
      float* b = sketch ? blocks : blocks + q * dp;
      // The reference counts with float += 1, which stops at 2^24.
      const float cnt = m <= (1 << 24) ? float(m) : 16777216.0f;
      sum_block(Y, dp, mem, m, P.is_document, cnt, b, nt);
      emit(r, q, b);
    };
    if (dense) {
      int64_t* start = s.start.data();
      std::fill(start, start + NP + 1, int64_t(0));
      for (int64_t p = 0; p < n; ++p) ++start[part[p] + 1];
      for (int64_t q = 0; q < NP; ++q) start[q + 1] += start[q];
      std::copy(start, start + NP, s.pos.begin());
      for (int64_t p = 0; p < n; ++p) s.members[size_t(s.pos[size_t(part[p])]++)] = p;
      for (int64_t q = 0; q < NP; ++q) {
        const int64_t m = start[q + 1] - start[q];
        if (m == 0) empty_run(q, q + 1);
        else full_block(q, s.members.data() + start[q], m);
      }
    } else {
      // n < NP / 4 <= 2^28 here, so the point index fits the low 32 bits and
      // sorting the keys orders by partition, then input order (stable).
      uint64_t* keys = s.keys.data();
      for (int64_t p = 0; p < n; ++p) keys[p] = (uint64_t(uint32_t(part[p])) << 32) | uint64_t(p);
      std::sort(keys, keys + n);
      for (int64_t t = 0; t < n; ++t) s.members[size_t(t)] = int64_t(keys[t] & 0xffffffffu);
      int64_t q = 0;  // next partition not yet written
      for (int64_t t = 0; t < n;) {
        const int64_t qo = int64_t(keys[t] >> 32);
        int64_t t1 = t + 1;
        while (t1 < n && int64_t(keys[t1] >> 32) == qo) ++t1;
        empty_run(q, qo);
        full_block(qo, s.members.data() + t, t1 - t);
        q = qo + 1;
        t = t1;
      }
      empty_run(q, NP);
    }
  }
}

}  // namespace

// ---- tables -----------------------------------------------------------------

void simhash_table(uint32_t seed, int64_t d, int k, int64_t R, float* out) {
  for (int64_t r = 0; r < R; ++r) {
    MT19937 g(uint32_t(seed + uint32_t(r)));
    Normal normal;
    float* G = out + r * d * k;
    for (int j = 0; j < k; ++j)  // column by column: G[i][j] = draw j*d + i
      for (int64_t i = 0; i < d; ++i) G[i * k + j] = normal(g);
  }
}

void ams_table(uint32_t seed, int64_t d, int64_t dp, int64_t R, int32_t* index, float* sign) {
  for (int64_t r = 0; r < R; ++r) {
    MT19937 g(uint32_t(seed + uint32_t(r)));
    for (int64_t i = 0; i < d; ++i) {
      index[r * d + i] = int32_t(uniform_int(g, uint32_t(dp)));
      sign[r * d + i] = bernoulli_sign(g);
    }
  }
}

void count_sketch_table(uint32_t seed, int64_t length, int64_t D, int32_t* bucket, float* sign) {
  MT19937 g(seed);
  for (int64_t i = 0; i < length; ++i) {
    bucket[i] = int32_t(uniform_int(g, uint32_t(D)));
    sign[i] = bernoulli_sign(g);
  }
}

void count_sketch_csr(const int32_t* bucket, int64_t length, int64_t D, int64_t* offsets, int64_t* members) {
  std::fill(offsets, offsets + D + 1, int64_t(0));
  for (int64_t i = 0; i < length; ++i) ++offsets[bucket[i] + 1];
  for (int64_t j = 0; j < D; ++j) offsets[j + 1] += offsets[j];
  std::vector<int64_t> pos(offsets, offsets + D);
  for (int64_t i = 0; i < length; ++i) members[pos[size_t(bucket[i])]++] = i;
}

// ---- encoder ------------------------------------------------------------------

int64_t row_length(const Prepared& p) { return p.R * (int64_t(1) << p.k) * p.dp; }
int64_t output_length(const Prepared& p) { return p.final_dim > 0 ? p.final_dim : row_length(p); }

void prepare(Prepared* P, const float* simhash, const int32_t* ams_index, const float* ams_sign,
             const int32_t* cs_bucket, const float* cs_sign) {
  assert(P->d > 0 && P->d <= kMaxProjection && P->R > 0 && P->k >= 0 && P->k <= kMaxSimhash && P->dp > 0 &&
         P->dp <= kMaxProjection && P->final_dim >= 0 && P->final_dim <= kMaxProjection);
  assert((ams_index == nullptr) == (ams_sign == nullptr) && (ams_index != nullptr || P->dp == P->d));
  assert(P->final_dim == 0 || (cs_bucket != nullptr && cs_sign != nullptr));
  P->rk = P->R * P->k;
  // padded to 8 (one vector), not 16: R20 k5 gives 104 columns instead of 112
  P->rk_pad = std::max<int64_t>(8, ((P->rk + 7) / 8) * 8);
  P->gt = std::make_unique<float[]>(size_t(P->d * P->rk_pad));  // zeroed: the padding
  for (int64_t r = 0; r < P->R; ++r)
    for (int64_t i = 0; i < P->d; ++i)
      for (int j = 0; j < P->k; ++j) P->gt[i * P->rk_pad + r * P->k + j] = simhash[(r * P->d + i) * P->k + j];
  P->ams = ams_index != nullptr;
  if (P->ams) {
    P->ams_col_off = std::make_unique<int32_t[]>(size_t(P->R * (P->dp + 1)));  // zeroed: the counts
    P->ams_term_i = std::make_unique<int32_t[]>(size_t(P->R * P->d));
    P->ams_term_s = std::make_unique<float[]>(size_t(P->R * P->d));
    for (int64_t r = 0; r < P->R; ++r) {
      int32_t* off = P->ams_col_off.get() + r * (P->dp + 1);
      const int32_t* idx = ams_index + r * P->d;
      for (int64_t i = 0; i < P->d; ++i) {
        assert(idx[i] >= 0 && idx[i] < P->dp);
        ++off[idx[i] + 1];
      }
      for (int64_t c = 0; c < P->dp; ++c) off[c + 1] += off[c];
      std::vector<int32_t> pos(off, off + P->dp);
      for (int64_t i = 0; i < P->d; ++i) {
        const int32_t at = pos[size_t(idx[i])]++;
        P->ams_term_i[r * P->d + at] = int32_t(i);
        P->ams_term_s[r * P->d + at] = ams_sign[r * P->d + i];
      }
    }
  }
  if (P->final_dim > 0) {
    const int64_t L = row_length(*P);
    bool unit = true, finite = true;
    for (int64_t i = 0; i < L; ++i) {
      unit = unit && (cs_sign[i] == 1.0f || cs_sign[i] == -1.0f) && cs_bucket[i] >= 0 && cs_bucket[i] < P->final_dim;
      finite = finite && std::isfinite(cs_sign[i]);
    }
    P->cs_finite = finite;
    if (unit && P->final_dim <= (int64_t(1) << 15)) {
      P->cs16 = std::make_unique<uint16_t[]>(size_t(L));
      for (int64_t i = 0; i < L; ++i)
        P->cs16[i] = uint16_t(uint32_t(cs_bucket[i]) | (cs_sign[i] < 0.0f ? 0x8000u : 0u));
    } else if (unit) {  // final_dim <= kMaxProjection < 2^31: the bucket fits 31 bits
      P->cs32 = std::make_unique<uint32_t[]>(size_t(L));
      for (int64_t i = 0; i < L; ++i)
        P->cs32[i] = uint32_t(cs_bucket[i]) | (cs_sign[i] < 0.0f ? 0x80000000u : 0u);
    } else {
      // Some sign is not +-1 (the buckets are in range: a precondition): keep the tables as given, in a copy of our own (a pointer
      // into the caller's arrays dangled once they were resized or freed).
      P->cs_bucket = std::make_unique<int32_t[]>(size_t(L));
      P->cs_sign = std::make_unique<float[]>(size_t(L));
      std::memcpy(P->cs_bucket.get(), cs_bucket, sizeof(int32_t) * size_t(L));
      std::memcpy(P->cs_sign.get(), cs_sign, sizeof(float) * size_t(L));
    }
  }
}

int64_t prepare_bytes(const Prepared& P) {
  const int64_t rk_pad = std::max<int64_t>(8, ((sat_mul(P.R, P.k) + 7) / 8) * 8);
  int64_t b = sat_mul(sat_mul(P.d, rk_pad), int64_t(sizeof(float)));  // gt
  // AMS: column offsets, term index and sign, the counting sort's cursor
  const int64_t ams = sat_add(sat_add(sat_mul(P.R, P.dp + 1), sat_mul(2, sat_mul(P.R, P.d))), P.dp);
  b = sat_add(b, sat_mul(ams, 4));
  if (P.final_dim > 0) {
    const int64_t L = sat_mul(sat_mul(P.R, int64_t(1) << P.k), P.dp);
    b = sat_add(b, sat_mul(L, int64_t(sizeof(int32_t) + sizeof(float))));  // the unpacked copy, the largest
  }
  return b;
}

// Index of the first NaN / inf among x[0..count), or -1. Integer exponent test
// (vectorises without -ffast-math), one 2 KiB block at a time; the points it
// reads are the ones the encoder reads next (still in cache), unlike a
// separate torch.isfinite pass over the whole batch.
int64_t first_nonfinite(const float* x, int64_t count) {
  constexpr int64_t kBlock = 512;
  for (int64_t i0 = 0; i0 < count; i0 += kBlock) {
    const int64_t i1 = std::min(count, i0 + kBlock);
    uint32_t any = 0;
    for (int64_t i = i0; i < i1; ++i) {
      uint32_t u;
      std::memcpy(&u, x + i, sizeof(u));
      any |= uint32_t((u & 0x7f800000u) == 0x7f800000u);
    }
    if (any)
      for (int64_t i = i0; i < i1; ++i) {
        uint32_t u;
        std::memcpy(&u, x + i, sizeof(u));
        if ((u & 0x7f800000u) == 0x7f800000u) return i;
      }
  }
  return -1;
}

namespace {
int64_t max_points(const int64_t* offsets, int64_t B) {
  int64_t m = 0;
  for (int64_t b = 0; b < B; ++b) m = std::max(m, offsets[b + 1] - offsets[b]);
  return m;
}
int encode_threads(int64_t B) { return int(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), B))); }
}  // namespace

int64_t encode(const Prepared& P, const float* points, const int64_t* offsets, int64_t B, float* out) {
  assert(B >= 0 && offsets[0] == 0 && std::is_sorted(offsets, offsets + B + 1));  // checked by the binding
  const int64_t D = output_length(P);
#ifdef __linux__
  // A fresh output faults in one 4 KiB page per 1024 floats written; asking
  // for transparent huge pages on its 2 MiB-aligned interior makes that one
  // fault per 2 MiB (numpy already advises its own large allocations). Advisory only (THP "madvise" mode; ignored for file
  // mappings or when THP is off); contents unchanged.
  {
    const uintptr_t huge = uintptr_t(1) << 21;
    const uintptr_t lo = (reinterpret_cast<uintptr_t>(out) + huge - 1) & ~(huge - 1);
    const uintptr_t hi = (reinterpret_cast<uintptr_t>(out + B * D)) & ~(huge - 1);
    if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), size_t(hi - lo), MADV_HUGEPAGE);
  }
#endif
  // Scratch for the largest document, one per thread, reserved here: an
  // allocation failure is a std::bad_alloc to the caller, not a throw out of
  // the parallel region (std::terminate). No thread count above B: idle
  // threads would only hold scratch.
  const int team = encode_threads(B);
  const ScratchSizes sizes(P, max_points(offsets, B));
  std::vector<Scratch> pool(static_cast<size_t>(team));
  for (Scratch& s : pool) sizes.reserve(s);
  // Every document is checked, so the row reported is the lowest bad one
  // whatever the thread count; once one is found the rest are only checked.
  int64_t bad = INT64_MAX;
  std::atomic<bool> failed{false}, oom{false};
#pragma omp parallel num_threads(team)
  {
    Scratch& s = pool[size_t(omp_get_thread_num())];
    int64_t my_bad = INT64_MAX;
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b) {
      const float* x = points + offsets[b] * P.d;
      const int64_t n = offsets[b + 1] - offsets[b];
      const int64_t f = first_nonfinite(x, n * P.d);
      if (f >= 0) {
        my_bad = std::min(my_bad, offsets[b] + f / P.d);
        failed.store(true, std::memory_order_relaxed);
        continue;
      }
      if (failed.load(std::memory_order_relaxed) || oom.load(std::memory_order_relaxed)) continue;
      // Nothing here should allocate past the reservation; should it all the
      // same, the failure is recorded and rethrown after the region.
      try {
        encode_doc(P, x, n, out + b * D, s);
      } catch (const std::bad_alloc&) {
        oom.store(true, std::memory_order_relaxed);
      }
    }
    fence_streaming_stores();  // this thread's rows are complete before anyone reads them
#pragma omp critical(embkern_fde_bad_row)
    bad = std::min(bad, my_bad);
  }
  if (oom.load()) throw std::bad_alloc();
  return bad == INT64_MAX ? -1 : bad;
}

int64_t scratch_bytes(const Prepared& P, int64_t n) { return ScratchSizes(P, n).bytes(); }

int64_t encode_scratch_bytes(const Prepared& P, const int64_t* offsets, int64_t B) {
  return sat_mul(encode_threads(B), scratch_bytes(P, max_points(offsets, B)));
}

EMBKERN_ISA_END
}  // namespace fde
}  // namespace embkern
