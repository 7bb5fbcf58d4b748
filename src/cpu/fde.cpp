// MUVERA FDE CPU kernel. Built with -ffp-contract=off: every x*g is rounded
// before it is added, as in the SSE2 reference (see fde.h for the order).
#include "embkern/fde.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace embkern {
namespace fde {
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
  void twist() {
    for (int i = 0; i < 624; ++i) {
      uint32_t y = (mt_[i] & 0x80000000u) | (mt_[(i + 1) % 624] & 0x7fffffffu);
      mt_[i] = mt_[(i + 397) % 624] ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
    }
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
    // glibc logf (not correctly rounded; the spec pins it).
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
// registers + 2 loads + 1 broadcast of the 16 ymm).
constexpr int64_t kColTile = 16;
constexpr int kRowTile = 6;

// acc[p][c] (+)= sum_{i in [i0, i1)} x_p[i] * gt[i][c] for kRowTile rows at
// once, c in one 16-column tile; each element is one ordered chain.
template <int PR>
inline void seq_tile(const float* const* xs, const float* __restrict gt, int64_t ld, int64_t i0, int64_t i1,
                     float (*acc)[kColTile]) {
  // Local accumulators: the compiler keeps them in registers (PR x 2 AVX2
  // vectors) only when they cannot alias gt / xs.
  float a[PR][kColTile];
  for (int p = 0; p < PR; ++p)
    for (int c = 0; c < kColTile; ++c) a[p][c] = acc[p][c];
  const float* x[PR];
  for (int p = 0; p < PR; ++p) x[p] = xs[p];
  for (int64_t i = i0; i < i1; ++i) {
    const float* __restrict g = gt + i * ld;
    for (int p = 0; p < PR; ++p) {
      const float xv = x[p][i];
      for (int c = 0; c < kColTile; ++c) a[p][c] = a[p][c] + xv * g[c];
    }
  }
  for (int p = 0; p < PR; ++p)
    for (int c = 0; c < kColTile; ++c) acc[p][c] = a[p][c];
}

// Sequential-by-depth-block dot products of PR rows against all rk_pad
// columns: out[p][col] = sum over blocks (block + out), each block in order.
template <int PR>
void dots_seq(const float* const* xs, const float* gt, int64_t d, int64_t ld, int64_t kc, float* const* out) {
  for (int64_t c0 = 0; c0 < ld; c0 += kColTile) {
    float tot[PR][kColTile];
    for (int p = 0; p < PR; ++p)
      for (int c = 0; c < kColTile; ++c) tot[p][c] = 0.0f;
    for (int64_t k2 = 0; k2 < d; k2 += kc) {
      const int64_t k3 = std::min(k2 + kc, d);
      float blk[PR][kColTile];
      for (int p = 0; p < PR; ++p)
        for (int c = 0; c < kColTile; ++c) blk[p][c] = 0.0f;
      seq_tile<PR>(xs, gt + c0, ld, k2, k3, blk);
      for (int p = 0; p < PR; ++p)
        for (int c = 0; c < kColTile; ++c) tot[p][c] = blk[p][c] + tot[p][c];
    }
    for (int p = 0; p < PR; ++p) std::memcpy(out[p] + c0, tot[p], sizeof(float) * kColTile);
  }
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

struct Scratch {
  std::vector<float> dots;      // (n, rk_pad)
  std::vector<float> grouped;   // (rk_pad)
  std::vector<float> tmp;       // dots_grouped scratch
  std::vector<int32_t> part;    // (R, n) partition per point
  std::vector<uint32_t> code;   // (R, n) sign pattern, hyperplane 0 = MSB
  std::vector<float> y;         // (n, dp) AMS-projected points of one repetition
  std::vector<float> counts;    // (NP)
  std::vector<float> raw;       // (L) row before the final projection
};

void encode_doc(const Prepared& P, const float* X, int64_t n, float* out_row, Scratch& s) {
  const int64_t d = P.d, R = P.R, dp = P.dp, ld = P.rk_pad;
  const int k = P.k;
  const int64_t NP = int64_t(1) << k;
  const int64_t L = R * NP * dp;
  float* fde = P.final_dim > 0 ? (s.raw.resize(size_t(L)), s.raw.data()) : out_row;
  std::fill(fde, fde + L, 0.0f);

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
      const float* xs[kRowTile];
      float* os[kRowTile];
      for (int q = 0; q < kRowTile; ++q) {
        xs[q] = X + (p + q) * d;
        os[q] = s.dots.data() + (p + q) * ld;
      }
      dots_seq<kRowTile>(xs, P.gt, d, ld, kc, os);
    }
    for (; p < n; ++p) {
      const float* xs[1] = {X + p * d};
      float* os[1] = {s.dots.data() + p * ld};
      dots_seq<1>(xs, P.gt, d, ld, kc, os);
    }
    // rows whose Eigen order is not sequential (<= 7 per row block, or n == 1)
    for (p = 0; p < n; ++p) {
      const DotOrder o = dot_order(n, d, k, p);
      if (o.cls == kPlain || o.cls == kGemmSeq || o.panel_cols == 0) continue;
      s.grouped.resize(size_t(ld));
      dots_grouped(X + p * d, P.gt, d, ld, o, s.grouped.data(), s.tmp);
      float* row = s.dots.data() + p * ld;
      for (int64_t r = 0; r < R; ++r)
        for (int64_t j = 0; j < o.panel_cols; ++j) row[r * k + j] = s.grouped[size_t(r * k + j)];
    }
    for (int64_t r = 0; r < R; ++r) {
      for (p = 0; p < n; ++p) {
        const float* dv = s.dots.data() + p * ld + r * k;
        uint32_t part = 0, code = 0;
        for (int j = 0; j < k; ++j) {
          const uint32_t b = dv[j] > 0.0f ? 1u : 0u;  // NaN, +-0 -> 0
          part = (part << 1) | (b ^ (part & 1u));
          code = (code << 1) | b;
        }
        s.part[size_t(r * n + p)] = int32_t(part);
        s.code[size_t(r * n + p)] = code;
      }
    }
  }

  // 2. per-repetition sums in input order, averages, fill
  if (P.is_document) s.counts.resize(size_t(NP));
  for (int64_t r = 0; r < R; ++r) {
    const float* Y = X;  // identity: the points themselves
    if (P.ams) {
      s.y.resize(size_t(n * dp));
      const int32_t* off = P.ams_col_off + r * (dp + 1);
      const int32_t* ti = P.ams_term_i + r * d;
      const float* ts = P.ams_term_s + r * d;
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
    float* blocks = fde + r * NP * dp;
    const int32_t* part = s.part.data() + r * n;
    if (P.is_document) std::fill(s.counts.begin(), s.counts.end(), 0.0f);
    for (int64_t p = 0; p < n; ++p) {
      float* b = blocks + int64_t(part[p]) * dp;
      const float* y = Y + p * dp;
      for (int64_t c = 0; c < dp; ++c) b[c] = b[c] + y[c];
      if (P.is_document) s.counts[size_t(part[p])] += 1.0f;
    }
    if (!P.is_document) continue;
    const uint32_t* code = s.code.data() + r * n;
    for (int64_t q = 0; q < NP; ++q) {
      float* b = blocks + q * dp;
      const float cnt = s.counts[size_t(q)];
      if (cnt == 0.0f) {
        // empty partition; k == 0 with no points stays zero (the reference gives 0/0)
        if (k > 0 && P.fill && n > 0) {
          const uint32_t target = uint32_t(q) ^ (uint32_t(q) >> 1);
          int best = 99;
          int64_t arg = 0;
          for (int64_t p = 0; p < n; ++p) {
            const int dist = popcount64(uint64_t(code[p] ^ target));
            if (dist < best) {  // strict: ties keep the lowest index
              best = dist;
              arg = p;
            }
          }
          std::memcpy(b, Y + arg * dp, sizeof(float) * size_t(dp));
        }
        continue;
      }
      for (int64_t c = 0; c < dp; ++c) b[c] = b[c] / cnt;  // IEEE division, not a reciprocal
    }
  }

  // 3. count sketch: scattering in increasing input index adds every bucket's
  //    members in ascending order, the reference's order (its own loop).
  if (P.final_dim > 0) {
    std::fill(out_row, out_row + P.final_dim, 0.0f);
    const int32_t* bk = P.cs_bucket;
    const float* sg = P.cs_sign;
    for (int64_t i = 0; i < L; ++i) out_row[bk[i]] = out_row[bk[i]] + sg[i] * fde[i];
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

bool prepare(Prepared* P, const float* simhash, const int32_t* ams_index, const float* ams_sign,
             const int32_t* cs_bucket, const float* cs_sign, std::string* error) {
  if (P->d <= 0 || P->R <= 0 || P->k < 0 || P->k > 30 || P->dp <= 0) {
    *error = "invalid FDE sizes";
    return false;
  }
  P->rk = P->R * P->k;
  P->rk_pad = std::max<int64_t>(kColTile, ((P->rk + kColTile - 1) / kColTile) * kColTile);
  P->gt = new float[size_t(P->d * P->rk_pad)]();
  for (int64_t r = 0; r < P->R; ++r)
    for (int64_t i = 0; i < P->d; ++i)
      for (int j = 0; j < P->k; ++j) P->gt[i * P->rk_pad + r * P->k + j] = simhash[(r * P->d + i) * P->k + j];
  P->ams = ams_index != nullptr;
  if (P->ams) {
    P->ams_col_off = new int32_t[size_t(P->R * (P->dp + 1))]();
    P->ams_term_i = new int32_t[size_t(P->R * P->d)];
    P->ams_term_s = new float[size_t(P->R * P->d)];
    for (int64_t r = 0; r < P->R; ++r) {
      int32_t* off = P->ams_col_off + r * (P->dp + 1);
      const int32_t* idx = ams_index + r * P->d;
      for (int64_t i = 0; i < P->d; ++i) {
        if (idx[i] < 0 || idx[i] >= P->dp) {
          *error = "ams_index out of range";
          return false;
        }
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
  P->cs_bucket = cs_bucket;
  P->cs_sign = cs_sign;
  if (P->final_dim > 0 && (cs_bucket == nullptr || cs_sign == nullptr)) {
    *error = "final projection without count-sketch tables";
    return false;
  }
  return true;
}

void release(Prepared* P) {
  delete[] P->gt;
  delete[] P->ams_col_off;
  delete[] P->ams_term_i;
  delete[] P->ams_term_s;
  P->gt = nullptr;
  P->ams_col_off = P->ams_term_i = nullptr;
  P->ams_term_s = nullptr;
}

void encode(const Prepared& P, const float* points, const int64_t* offsets, int64_t B, float* out) {
  const int64_t D = output_length(P);
#pragma omp parallel
  {
    Scratch s;
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b) {
      encode_doc(P, points + offsets[b] * P.d, offsets[b + 1] - offsets[b], out + b * D, s);
    }
  }
}

}  // namespace fde
}  // namespace embkern
