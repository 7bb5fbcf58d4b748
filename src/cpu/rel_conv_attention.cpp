// CPU kernels of relative convolutional attention (docs/ops/rel_conv_attention.md):
// Transformer-XL learned relative attention, fused, and the causal depthwise
// convolution. Built from the selective-attention kernel's blocks
// (src/cpu/flash_tiles.h: Vec, vexp, the tile()/gemm() micro-kernel).
//
// The relative term without an L x L tensor. Number the diagonals of the
// score matrix t = j - i + (Lq - 1), so the table row of (i, j) is
// r = rbase + t with rbase = P - q_offset - (Lq - 1). A tile of kBQ queries
// [i0, i0 + kBQ) and kBK keys [j0, j0 + kBK) touches kWin = kBQ + kBK - 1
// consecutive diagonals, t0 .. t0 + kWin - 1 with t0 = j0 - i0 - kBQ + Lq. So
//   Y = Q_tile R_win^T   (kBQ x kWin: every query against the window's rows)
// holds q_i . R[r_ij] at Y[i][j + kBQ - 1 - i]: for a fixed query the keys of
// the tile read a contiguous run of Y's row, starting kBQ - 1 - i columns in.
// The band is read with unaligned vector loads, in the keys-along-lanes
// orientation (S = Q K^T row-major). The content term uses (q_i + u) as the
// query of the Q K^T product (one FMA chain per score), S[r] is a window
// vector read the same way as Y.
//
// Cost (why 32 x 128 tiles). Per tile plain attention costs Q K^T + P V = 2
// units of kBQ * kBK * d multiply-adds; the window product adds
// kWinP / kBK = 160 / 128 = 1.25 units (kWin = 159 padded to 160, a multiple
// of every register tile width). Forward: 3.25 / 2 = 1.63x plain attention.
// Backward (one pass, below): S, Y, dP, dV, dK, dQ (content), dQ += G_band
// R_win, dR += G_band^T Q = 5 + 3 * 1.25 = 8.75 units against flash
// backward's 5; forward + backward 12 / 7 = 1.71x. Square tiles would cost
// 2x on the window products (2 * kB - 1 rows for kB keys).
//
// Forward, one task per (batch, head, query block): online softmax along the
// keys; the row max and the row sum of a key block are reduced with a fixed
// 16-way split (kSplit partial accumulators, combined in order), the same at
// every ISA level, so the vector width never changes a rounding.
//
// Backward, one task per (batch, head), in one pass: for each query block
// (ascending) and each key block it sees (ascending), recompute P from the
// forward's lse, dP = dO V^T, G = P (dP - D) / sqrt(d), then
//   dV^T += dO^T P, dK^T += (Q + u)^T G (head-long accumulators, per thread),
//   dQ += G K + G_band R_win   (G_band[i][w]: G[i][j] at w = j + kBQ - 1 - i),
//   dR_h[t0 + w] += (G_band^T Q)[w],  dS_h[t0 + w] += sum_i G_band[i][w],
//   g_j += sum_i G[i][j]  (then du_h = sum_j g_j k_j).
// dR_h, dS_h, du_h are per-(batch, head) partial sums indexed by diagonal
// (O((Lq + Lk) d) each); after the pass they are reduced over the batch in
// ascending order into dR[r], dS[r], du. Because one thread owns a whole
// (batch, head), every accumulation happens in the same order for any thread
// count, and no two threads write the same element (no atomics).
// Memory: per thread a few tiles plus d x Lk accumulators; shared: the
// per-(batch, head) diagonal partials, B H (Lq + Lk + 192) (d + 1) values.
//
// Conv: y[t] is one FMA chain over the taps, oldest first, then + bias;
// dx likewise; dweight and dbias sum over fixed 256-row chunks of the
// flattened (n, t) rows, chunk partials reduced in chunk order.
#include "embkern/rel_conv_attention.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "flash_tiles.h"
#include "embkern/saturating.h"

namespace embkern {
namespace rca {
EMBKERN_ISA_BEGIN
namespace {

using namespace ::embkern::flash::EMBKERN_ISA_NS;

// Tile sizes: the same at every ISA level (they fix where the online softmax
// rescales and how the sums are split). kBK and kWinP are multiples of every
// level's register tile width NR (4, 8, 16 or 32 lanes) and of kSplit.
constexpr int64_t kBQ = 32;                // queries per block
constexpr int64_t kBK = 128;               // keys per block
constexpr int64_t kWin = kBQ + kBK - 1;    // diagonals a tile touches (159)
constexpr int64_t kWinP = kWin + 1;        // padded window (160)
constexpr int64_t kSplit = 16;             // partial accumulators of a row sum
constexpr int64_t kConvRows = 256;         // rows of a dweight / dbias chunk

template <typename T>
struct Problem {
  int64_t B, H, Lq, Lk, d, dv, P;
  bool causal;
  T scale;
  int64_t off;    // q_offset (clamped below when causal: see make_problem)
  int64_t rbase;  // table row of diagonal t = 0
  int64_t key_end(int64_t i0, int64_t mb) const {
    if (!causal) return Lk;
    return std::max<int64_t>(0, std::min<int64_t>(Lk, i0 + mb + off));
  }
  // Visible keys of query i in the block [j0, j0 + nb): j < lim.
  int64_t lim(int64_t i, int64_t j0, int64_t nb) const {
    return causal ? std::max<int64_t>(0, std::min<int64_t>(nb, i + off - j0 + 1)) : nb;
  }
};

template <typename T>
Problem<T> make_problem(int64_t B, int64_t H, int64_t Lq, int64_t Lk, int64_t d, int64_t dv, int64_t P, bool causal,
                        int64_t q_offset) {
  // Under the mask a q_offset below -Lq sees no key at all, like -Lq - 1;
  // clamping keeps every index arithmetic in range and changes no result
  // (all rows masked). Without the mask the csrc/ table check bounds it.
  const int64_t off = causal ? std::max<int64_t>(-Lq - 1, q_offset) : q_offset;
  return Problem<T>{B, H, Lq, Lk, d, dv, P, causal, T(1) / std::sqrt(T(d > 0 ? d : 1)), off,
                    P - off - (Lq - 1)};
}

template <typename T>
T exp1(T x) {
  T buf[Vec<T>::W];
  Vec<T>::store(buf, vexp<T>(Vec<T>::set1(x)));
  return buf[0];
}

// Max and sum of row[0, n), n a multiple of kSplit: kSplit interleaved
// partials combined in ascending order (a fixed tree at every level).
template <typename T>
T row_max(const T* row, int64_t n) {
  T acc[kSplit];
  for (int64_t l = 0; l < kSplit; ++l) acc[l] = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < n; j += kSplit)
    for (int64_t l = 0; l < kSplit; ++l) acc[l] = acc[l] > row[j + l] ? acc[l] : row[j + l];
  T m = acc[0];
  for (int64_t l = 1; l < kSplit; ++l) m = m > acc[l] ? m : acc[l];
  return m;
}
template <typename T>
T row_sum(const T* row, int64_t n) {
  T acc[kSplit];
  for (int64_t l = 0; l < kSplit; ++l) acc[l] = T(0);
  for (int64_t j = 0; j < n; j += kSplit)
    for (int64_t l = 0; l < kSplit; ++l) acc[l] = acc[l] + row[j + l];
  T s = acc[0];
  for (int64_t l = 1; l < kSplit; ++l) s = s + acc[l];
  return s;
}

// The window of tile (i0, j0) for head h: Rt[c][w] = R[r][h][c] (d x kWinP,
// transposed for Y = Q Rt), optionally Rp[w][c] (kWin x dp, rows for dQ +=
// G_band Rp) and Sw[w] = S[r][h]; rows r outside the table (they only meet
// masked pairs) read as zero, and so does the pad column w = kWin.
template <typename T>
void pack_window(const Problem<T>& P, const T* R, const T* S, int64_t h, int64_t t0, T* Rt, T* Rp, int64_t dp,
                 T* Sw, int64_t c_lo = 0, int64_t c_hi = kWinP) {
  // Only columns [c_lo, c_hi) of Rt are read by the caller (Rp and Sw: all of them).
  const int64_t d = P.d, H = P.H;
  // Window columns [w_lo, w_hi) are table rows; the rest (and the pad column) are zero. The in-table
  // run goes through the square transposes: the scalar transposed stores (d stores kWinP apart per
  // row) took longer than the tile's content product at decode (one query against the keys).
  const int64_t r0 = P.rbase + t0;
  const int64_t w_lo = std::min<int64_t>(kWin, std::max<int64_t>(0, -r0));
  const int64_t w_hi = std::max<int64_t>(w_lo, std::min<int64_t>(kWin, 2 * P.P - r0));
  for (int64_t c = 0; c < d; ++c) {
    T* o = Rt + c * kWinP;
    for (int64_t w = 0; w < w_lo; ++w) o[w] = T(0);
    for (int64_t w = w_hi; w < kWinP; ++w) o[w] = T(0);
  }
  const int64_t p_lo = std::max(w_lo, c_lo), p_hi = std::min(w_hi, c_hi);
  if (p_hi > p_lo)
    pack_transposed_strided(R + ((r0 + p_lo) * H + h) * d, H * d, p_hi - p_lo, p_hi - p_lo, d,
                            static_cast<const T*>(nullptr), Rt + p_lo, kWinP);
  for (int64_t w = 0; w < kWinP; ++w) {
    const bool in = w >= w_lo && w < w_hi;
    Sw[w] = in ? S[(r0 + w) * H + h] : T(0);
    if (Rp && w < kWin) {
      T* dst = Rp + w * dp;
      const T* src = in ? R + ((r0 + w) * H + h) * d : nullptr;
      for (int64_t c = 0; c < d; ++c) dst[c] = in ? src[c] : T(0);
      for (int64_t c = d; c < dp; ++c) dst[c] = T(0);
    }
  }
}

// Rows [0, rows) of X (width w) into dst (row-major, width wp >= w, zero-padded).
template <typename T>
void pack_rows(const T* X, int64_t rows, int64_t w, int64_t wp, T* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(dst + r * wp, X + r * w, sizeof(T) * size_t(w));
    for (int64_t c = w; c < wp; ++c) dst[r * wp + c] = T(0);
  }
}

// Scores of one tile, row i of Sm (keys along the lanes): s = ((q_i + u) . k_j
// + Y[i][kBQ - 1 - i + j] + Sw[kBQ - 1 - i + j]) * scale for j < Nb. The same
// function in the forward and the backward, so both see the same bits.
template <typename T>
inline void tile_scores(const Problem<T>& P, T* row, const T* yrow, const T* Sw, int64_t i, int64_t Nb) {
  using V = Vec<T>;
  constexpr int64_t W = V::W;
  const T* y = yrow + (kBQ - 1 - i);
  const T* sw = Sw + (kBQ - 1 - i);
  const typename V::R sc = V::set1(P.scale);
  for (int64_t j = 0; j < Nb; j += W)
    V::store(row + j, V::mul(V::add(V::add(V::load(row + j), V::load(y + j)), V::load(sw + j)), sc));
}

// Per-thread scratch, in elements.
inline int64_t forward_tile_elems(int64_t d, int64_t dv) {
  const int64_t dp = round_up(std::max<int64_t>(d, 1), 32), dvp = round_up(std::max<int64_t>(dv, 1), 32);
  return kBQ * d + d * kBK + d * kWinP + kBQ * kBK + kBQ * kWinP + kWinP + kBK * dvp + kBQ * dvp + 2 * kBQ + dp;
}
inline int64_t backward_tile_elems(int64_t Lq, int64_t Lk, int64_t d, int64_t dv) {
  const int64_t dp = round_up(std::max<int64_t>(d, 1), 32);
  const int64_t LkP = round_up(std::max<int64_t>(Lk, 1), kBK);
  const int64_t tiles = kBQ * d + kBQ * dp + d * kBK + dv * kBK + kBK * dp + d * kWinP + kWin * dp + kWinP +
                        2 * kBQ * kBK + 2 * kBQ * kWinP + kBQ * dp;
  const int64_t head = (d + dv + 1) * LkP + std::max<int64_t>(Lq, 1);
  return tiles + head;
}
// Diagonal partials of one (batch, head): rows t + kBQ for t in [-kBQ, Lq + Lk + kWinP).
inline int64_t diag_rows(int64_t Lq, int64_t Lk) { return Lq + Lk + kBQ + kWinP; }

// ---------------------------------------------------------------------------
// Forward: one query block [i0, i0 + mb) of one (batch, head).

template <typename T>
void forward_block(const Problem<T>& P, const T* q, const T* k, const T* v, const T* R, const T* S, const T* u,
                   int64_t h, T* out, T* lse, int64_t i0, T* s) {
  using V = Vec<T>;
  constexpr int64_t W = V::W;
  const int64_t d = P.d, dv = P.dv;
  const int64_t mb = std::min(kBQ, P.Lq - i0), dvp = round_up(std::max<int64_t>(dv, 1), kNR<T>);
  T* Qu = s;                   // kBQ x d: q_i + u
  T* Kt = Qu + kBQ * d;        // d x kBK
  T* Rt = Kt + d * kBK;        // d x kWinP
  T* Sm = Rt + d * kWinP;      // kBQ x kBK: scores, then P
  T* Y = Sm + kBQ * kBK;       // kBQ x kWinP
  T* Sw = Y + kBQ * kWinP;     // kWinP
  T* Vp = Sw + kWinP;          // kBK x dvp
  T* O = Vp + kBK * dvp;       // kBQ x dvp
  T* m = O + kBQ * dvp;
  T* l = m + kBQ;
  const T lowest = std::numeric_limits<T>::lowest(), ninf = -std::numeric_limits<T>::infinity();
  const T* uh = u + h * d;
  for (int64_t i = 0; i < mb; ++i) {
    for (int64_t c = 0; c < d; ++c) Qu[i * d + c] = q[(i0 + i) * d + c] + uh[c];
    m[i] = lowest;
    l[i] = T(0);
    std::fill(O + i * dvp, O + (i + 1) * dvp, T(0));
  }
  const int64_t j_end = P.key_end(i0, mb);
  for (int64_t j0 = 0; j0 < j_end; j0 += kBK) {
    const int64_t nb = std::min(kBK, j_end - j0), Nb = round_up(nb, kNR<T>), N16 = round_up(nb, kSplit);
    const int64_t t0 = j0 - i0 - kBQ + P.Lq;
    // Row i reads window columns kBQ - 1 - i + j, j < Nb: a block of mb < kBQ queries (the last one; one
    // query at decode) reads [kBQ - mb, kBQ - 1 + Nb) only, so only those R rows are packed and multiplied
    // (the same products: each Y column's dot product does not depend on which others are computed).
    // At decode that is 128 of 160 columns.
    const int64_t c_lo = (kBQ - mb) / kNR<T> * kNR<T>, c_hi = std::min(kWinP, round_up(kBQ - 1 + Nb, kNR<T>));
    pack_transposed(k + j0 * d, nb, Nb, d, static_cast<const T*>(nullptr), Kt, kBK);
    pack_window(P, R, S, h, t0, Rt, static_cast<T*>(nullptr), 0, Sw, c_lo, c_hi);
    gemm<T>(mb, Nb, d, Qu, d, 1, Kt, kBK, Sm, kBK, false);
    gemm<T>(mb, c_hi - c_lo, d, q + i0 * d, d, 1, Rt + c_lo, kWinP, Y + c_lo, kWinP, false);
    for (int64_t i = 0; i < mb; ++i) {
      T* row = Sm + i * kBK;
      tile_scores(P, row, Y + i * kWinP, Sw, i, Nb);
      for (int64_t j = P.lim(i0 + i, j0, nb); j < std::max(Nb, N16); ++j) row[j] = ninf;
      const T bm = row_max(row, N16);
      const T mo = m[i], mn = mo > bm ? mo : bm;
      const T alpha = exp1<T>(mo - mn);
      m[i] = mn;
      const typename V::R vm = V::set1(mn);
      for (int64_t j = 0; j < N16; j += W) V::store(row + j, vexp<T>(V::sub(V::load(row + j), vm)));
      l[i] = l[i] * alpha + row_sum(row, N16);
      T* o = O + i * dvp;
      const typename V::R va = V::set1(alpha);
      for (int64_t c = 0; c < dvp; c += W) V::store(o + c, V::mul(V::load(o + c), va));
    }
    const T* vr = v + j0 * dv;
    if (dvp != dv) {
      pack_rows(vr, nb, dv, dvp, Vp);
      vr = Vp;
    }
    // O[i][c] += sum_j P[i][j] v[j][c]
    gemm<T>(mb, dvp, nb, Sm, kBK, 1, vr, dvp, O, dvp, true);
  }
  for (int64_t i = 0; i < mb; ++i) {
    T* o = out + (i0 + i) * dv;
    if (!(l[i] == T(0))) {  // l = 0: saw no key; NaN (a NaN score) goes on into out and lse
      for (int64_t c = 0; c < dv; ++c) o[c] = O[i * dvp + c] / l[i];
      lse[i0 + i] = m[i] + std::log(l[i]);
    } else {  // sees no key
      for (int64_t c = 0; c < dv; ++c) o[c] = T(0);
      lse[i0 + i] = ninf;
    }
  }
}

// ---------------------------------------------------------------------------
// Backward of one (batch, head). dRh ((diag_rows) x dp), dSh (diag_rows) and
// duh (d) receive this head's diagonal partials (zero on entry).

template <typename T>
void backward_head(const Problem<T>& P, const T* go, const T* q, const T* k, const T* v, const T* R, const T* S,
                   const T* u, const T* out, const T* lse, int64_t h, T* dq, T* dk, T* dvo, T* dRh, T* dSh, T* duh,
                   T* s) {
  using V = Vec<T>;
  using Rg = typename V::R;
  constexpr int64_t W = V::W;
  const int64_t d = P.d, dv = P.dv, Lq = P.Lq, Lk = P.Lk;
  const int64_t dp = round_up(std::max<int64_t>(d, 1), kNR<T>);
  const int64_t LkP = round_up(std::max<int64_t>(Lk, 1), kBK);
  T* Qu = s;                   // kBQ x d: q + u
  T* Qp = Qu + kBQ * d;        // kBQ x dp: q rows, padded
  T* Kt = Qp + kBQ * dp;       // d x kBK
  T* Vt = Kt + d * kBK;        // dv x kBK
  T* Kp = Vt + dv * kBK;       // kBK x dp: k rows, padded
  T* Rt = Kp + kBK * dp;       // d x kWinP
  T* Rp = Rt + d * kWinP;      // kWin x dp
  T* Sw = Rp + kWin * dp;      // kWinP
  T* Sm = Sw + kWinP;          // kBQ x kBK: scores, then P
  T* G = Sm + kBQ * kBK;       // kBQ x kBK: dP, then G
  T* Y = G + kBQ * kBK;        // kBQ x kWinP
  T* Gb = Y + kBQ * kWinP;     // kBQ x kWinP: G along the diagonals
  T* dQ = Gb + kBQ * kWinP;    // kBQ x dp
  T* dKt = dQ + kBQ * dp;      // d x LkP
  T* dVt = dKt + d * LkP;      // dv x LkP
  T* gs = dVt + dv * LkP;      // LkP: column sums of G
  T* D = gs + LkP;             // Lq: dO_i . O_i
  std::fill(dKt, dKt + (d + dv + 1) * LkP, T(0));
  for (int64_t i = 0; i < Lq; ++i) {
    T acc = T(0);
    for (int64_t c = 0; c < dv; ++c) acc = std::fma(go[i * dv + c], out[i * dv + c], acc);
    D[i] = acc;
  }
  const T inf = std::numeric_limits<T>::infinity();
  const T* uh = u + h * d;
  for (int64_t i0 = 0; i0 < Lq; i0 += kBQ) {
    const int64_t mb = std::min(kBQ, Lq - i0);
    const int64_t j_end = P.key_end(i0, mb);
    if (j_end == 0) {  // the block sees no key
      for (int64_t x = i0 * d; x < (i0 + mb) * d; ++x) dq[x] = T(0);
      continue;
    }
    for (int64_t i = 0; i < mb; ++i)
      for (int64_t c = 0; c < d; ++c) Qu[i * d + c] = q[(i0 + i) * d + c] + uh[c];
    const T* qrows = q + i0 * d;
    if (dp != d) {
      pack_rows(qrows, mb, d, dp, Qp);
      qrows = Qp;
    }
    std::fill(dQ, dQ + kBQ * dp, T(0));
    const T* gob = go + i0 * dv;
    for (int64_t j0 = 0; j0 < j_end; j0 += kBK) {
      const int64_t nb = std::min(kBK, j_end - j0), Nb = round_up(nb, kNR<T>);
      const int64_t t0 = j0 - i0 - kBQ + Lq;
      pack_transposed(k + j0 * d, nb, Nb, d, static_cast<const T*>(nullptr), Kt, kBK);
      pack_transposed(v + j0 * dv, nb, Nb, dv, static_cast<const T*>(nullptr), Vt, kBK);
      const T* krows = k + j0 * d;
      if (dp != d) {
        pack_rows(krows, nb, d, dp, Kp);
        krows = Kp;
      }
      pack_window(P, R, S, h, t0, Rt, Rp, dp, Sw);
      gemm<T>(mb, Nb, d, Qu, d, 1, Kt, kBK, Sm, kBK, false);
      gemm<T>(mb, kWinP, d, q + i0 * d, d, 1, Rt, kWinP, Y, kWinP, false);
      gemm<T>(mb, Nb, dv, gob, dv, 1, Vt, kBK, G, kBK, false);
      std::fill(Gb, Gb + kBQ * kWinP, T(0));
      for (int64_t i = 0; i < mb; ++i) {
        T* srow = Sm + i * kBK;
        T* grow = G + i * kBK;
        tile_scores(P, srow, Y + i * kWinP, Sw, i, Nb);
        const T li = lse[i0 + i] == -inf ? inf : lse[i0 + i];
        const Rg vl = V::set1(li), vd = V::set1(D[i0 + i]), sc = V::set1(P.scale);
        for (int64_t j = 0; j < Nb; j += W) V::store(srow + j, vexp<T>(V::sub(V::load(srow + j), vl)));
        for (int64_t j = P.lim(i0 + i, j0, nb); j < Nb; ++j) srow[j] = T(0);
        for (int64_t j = 0; j < Nb; j += W)
          V::store(grow + j, V::mul(V::mul(V::load(srow + j), V::sub(V::load(grow + j), vd)), sc));
        std::memcpy(Gb + i * kWinP + (kBQ - 1 - i), grow, sizeof(T) * size_t(nb));
        // g_j += G[i][j], queries in ascending order
        T* g = gs + j0;
        for (int64_t j = 0; j < Nb; j += W) V::store(g + j, V::add(V::load(g + j), V::load(grow + j)));
      }
      // dV^T[c][j] += sum_i dO[i][c] P[i][j];  dK^T[c][j] += sum_i (q + u)[i][c] G[i][j]
      gemm<T>(dv, Nb, mb, gob, 1, dv, Sm, kBK, dVt + j0, LkP, true);
      gemm<T>(d, Nb, mb, Qu, 1, d, G, kBK, dKt + j0, LkP, true);
      // dQ += G K + G_band R_win
      gemm<T>(mb, dp, nb, G, kBK, 1, krows, dp, dQ, dp, true);
      gemm<T>(mb, dp, kWin, Gb, kWinP, 1, Rp, dp, dQ, dp, true);
      // dR_h[t0 + w] += sum_i G_band[i][w] q_i;  dS_h[t0 + w] += sum_i G_band[i][w]
      T* dRt = dRh + (t0 + kBQ) * dp;
      gemm<T>(kWin, dp, mb, Gb, 1, kWinP, qrows, dp, dRt, dp, true);
      T* dSt = dSh + (t0 + kBQ);
      for (int64_t i = 0; i < mb; ++i) {
        const T* gb = Gb + i * kWinP;
        for (int64_t w = 0; w < kWinP; w += W) V::store(dSt + w, V::add(V::load(dSt + w), V::load(gb + w)));
      }
    }
    for (int64_t i = 0; i < mb; ++i)
      for (int64_t c = 0; c < d; ++c) dq[(i0 + i) * d + c] = dQ[i * dp + c];
  }
  for (int64_t j = 0; j < Lk; ++j) {
    for (int64_t c = 0; c < d; ++c) dk[j * d + c] = dKt[c * LkP + j];
    for (int64_t c = 0; c < dv; ++c) dvo[j * dv + c] = dVt[c * LkP + j];
  }
  // du_h = sum_j g_j k_j, keys in ascending order
  for (int64_t c = 0; c < d; ++c) duh[c] = T(0);
  for (int64_t j = 0; j < Lk; ++j)
    for (int64_t c = 0; c < d; ++c) duh[c] = std::fma(gs[j], k[j * d + c], duh[c]);
}

}  // namespace

// ---------------------------------------------------------------------------

template <typename T>
void forward(const T* q, const T* k, const T* v, const T* R, const T* S, const T* u, T* out, T* lse, int64_t B,
             int64_t H, int64_t Lq, int64_t Lk, int64_t d, int64_t dv, int64_t P_, bool causal, int64_t q_offset,
             int64_t k_stride, int64_t v_stride) {
  const Problem<T> P = make_problem<T>(B, H, Lq, Lk, d, dv, P_, causal, q_offset);
  const int64_t nqb = (Lq + kBQ - 1) / kBQ, tasks = B * H * nqb;
  if (tasks == 0) return;
  const int64_t per = forward_tile_elems(d, dv);
  const int nt = omp_get_max_threads();
  std::vector<T> scratch(static_cast<size_t>(per) * static_cast<size_t>(nt));
  const bool par = worth_threads(tasks, B * H * Lq * std::max<int64_t>(1, Lk) * (2 * d + dv));
#pragma omp parallel if (par)
  {
    T* s = scratch.data() + static_cast<size_t>(omp_get_thread_num()) * static_cast<size_t>(per);
    // Latest query blocks first: under the causal mask they see the most keys. The batch index varies
    // fastest after the query block: tasks that run together read one head's R rows, the same rows for
    // every batch element, while they are in cache.
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t hb = t / nqb, qb = nqb - 1 - t % nqb, h = hb / B, bh = (hb % B) * H + h;
      forward_block<T>(P, q + bh * Lq * d, k + bh * k_stride, v + bh * v_stride, R, S, u, h, out + bh * Lq * dv,
                       lse + bh * Lq, qb * kBQ, s);
    }
  }
}

template <typename T>
void backward(const T* grad_out, const T* q, const T* k, const T* v, const T* R, const T* S, const T* u, const T* out,
              const T* lse, T* dq, T* dk, T* dv, T* dR, T* dS, T* du, int64_t B, int64_t H, int64_t Lq, int64_t Lk,
              int64_t d, int64_t dv_dim, int64_t P_, bool causal, int64_t q_offset) {
  const Problem<T> P = make_problem<T>(B, H, Lq, Lk, d, dv_dim, P_, causal, q_offset);
  const int64_t dvd = dv_dim, tasks = B * H;
  const int64_t dp = round_up(std::max<int64_t>(d, 1), kNR<T>);
  const int64_t nT = diag_rows(Lq, Lk), rows2P = 2 * P_;
  const int64_t per = backward_tile_elems(Lq, Lk, d, dvd);
  const int nt = omp_get_max_threads();
  std::vector<T> scratch(static_cast<size_t>(per) * static_cast<size_t>(nt));
  std::vector<T> dRh(static_cast<size_t>(std::max<int64_t>(tasks, 1) * nT * dp));
  std::vector<T> dSh(static_cast<size_t>(std::max<int64_t>(tasks, 1) * nT));
  std::vector<T> duh(static_cast<size_t>(std::max<int64_t>(tasks, 1) * std::max<int64_t>(d, 1)));
  const int64_t work = B * H * Lq * std::max<int64_t>(1, Lk) * (3 * d + 2 * dvd);
  const bool par = worth_threads(std::max(tasks, rows2P), work);
#pragma omp parallel if (par)
  {
    T* s = scratch.data() + static_cast<size_t>(omp_get_thread_num()) * static_cast<size_t>(per);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t h = t % H;
      backward_head<T>(P, grad_out + t * Lq * dvd, q + t * Lq * d, k + t * Lk * d, v + t * Lk * dvd, R, S, u,
                       out + t * Lq * dvd, lse + t * Lq, h, dq + t * Lq * d, dk + t * Lk * d, dv + t * Lk * dvd,
                       dRh.data() + t * nT * dp, dSh.data() + t * nT, duh.data() + t * d, s);
    }
    // dR[r][h], dS[r][h]: the batch's diagonal partials in ascending b; rows no pair reads are 0.
#pragma omp for schedule(static)
    for (int64_t x = 0; x < rows2P * H; ++x) {
      const int64_t r = x / H, h = x % H;
      const int64_t tb = r - P.rbase + kBQ;
      T* o = dR + x * d;
      T sacc = T(0);
      for (int64_t c = 0; c < d; ++c) o[c] = T(0);
      if (tb >= 0 && tb < nT) {
        for (int64_t b = 0; b < B; ++b) {
          const int64_t bh = b * H + h;
          const T* src = dRh.data() + (bh * nT + tb) * dp;
          for (int64_t c = 0; c < d; ++c) o[c] = o[c] + src[c];
          sacc = sacc + dSh[static_cast<size_t>(bh * nT + tb)];
        }
      }
      dS[x] = sacc;
    }
#pragma omp for schedule(static)
    for (int64_t x = 0; x < H * d; ++x) {
      const int64_t h = x / d, c = x % d;
      T acc = T(0);
      for (int64_t b = 0; b < B; ++b) acc = acc + duh[static_cast<size_t>((b * H + h) * d + c)];
      du[x] = acc;
    }
  }
}

// ---------------------------------------------------------------------------
// Causal depthwise convolution.

template <typename T>
void conv_forward(const T* x, const T* weight, const T* bias, T* y, int64_t N, int64_t T_len, int64_t C, int64_t K) {
  const int64_t rows = N * T_len;
  if (rows == 0 || C == 0) return;
  std::vector<T> wt(static_cast<size_t>(K * C));  // taps-major: wt[k][c] = weight[c][k]
  for (int64_t c = 0; c < C; ++c)
    for (int64_t kk = 0; kk < K; ++kk) wt[static_cast<size_t>(kk * C + c)] = weight[c * K + kk];
#pragma omp parallel for schedule(static) if (worth_threads(rows, rows * C * K))
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t t = row % T_len;
    T* o = y + row * C;
    for (int64_t c = 0; c < C; ++c) o[c] = T(0);
    for (int64_t kk = 0; kk < K; ++kk) {
      const int64_t sh = K - 1 - kk;  // tap kk reads x[t - sh]
      if (sh > t) continue;
      const T* xs = x + (row - sh) * C;
      const T* w = wt.data() + kk * C;
      for (int64_t c = 0; c < C; ++c) o[c] = std::fma(w[c], xs[c], o[c]);
    }
    if (bias)
      for (int64_t c = 0; c < C; ++c) o[c] = o[c] + bias[c];
  }
}

template <typename T>
void conv_backward(const T* grad_y, const T* x, const T* weight, T* dx, T* dweight, T* dbias, int64_t N,
                   int64_t T_len, int64_t C, int64_t K) {
  const int64_t rows = N * T_len;
  const int64_t nch = (rows + kConvRows - 1) / kConvRows;
  std::vector<T> wt(static_cast<size_t>(std::max<int64_t>(K * C, 1)));
  for (int64_t c = 0; c < C; ++c)
    for (int64_t kk = 0; kk < K; ++kk) wt[static_cast<size_t>(kk * C + c)] = weight[c * K + kk];
  // chunk partials: (K + 1) x C per chunk (taps, then the bias row)
  std::vector<T> part(static_cast<size_t>(std::max<int64_t>(nch, 1) * (K + 1) * C));
  const bool par = worth_threads(std::max(rows, nch), rows * C * K);
#pragma omp parallel if (par)
  {
    // dx[t] = sum_k w[k] g[t + K - 1 - k], taps in ascending order
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t t = row % T_len;
      T* o = dx + row * C;
      for (int64_t c = 0; c < C; ++c) o[c] = T(0);
      for (int64_t kk = 0; kk < K; ++kk) {
        const int64_t sh = K - 1 - kk;
        if (t + sh >= T_len) continue;
        const T* g = grad_y + (row + sh) * C;
        const T* w = wt.data() + kk * C;
        for (int64_t c = 0; c < C; ++c) o[c] = std::fma(w[c], g[c], o[c]);
      }
    }
#pragma omp for schedule(static)
    for (int64_t ch = 0; ch < nch; ++ch) {
      T* pw = part.data() + ch * (K + 1) * C;
      T* pb = pw + K * C;
      const int64_t r1 = std::min(rows, (ch + 1) * kConvRows);
      for (int64_t row = ch * kConvRows; row < r1; ++row) {
        const int64_t t = row % T_len;
        const T* g = grad_y + row * C;
        for (int64_t kk = 0; kk < K; ++kk) {
          const int64_t sh = K - 1 - kk;
          if (sh > t) continue;
          const T* xs = x + (row - sh) * C;
          T* p = pw + kk * C;
          for (int64_t c = 0; c < C; ++c) p[c] = std::fma(g[c], xs[c], p[c]);
        }
        for (int64_t c = 0; c < C; ++c) pb[c] = pb[c] + g[c];
      }
    }
#pragma omp for schedule(static)
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t kk = 0; kk <= K; ++kk) {
        T acc = T(0);
        for (int64_t ch = 0; ch < nch; ++ch) acc = acc + part[static_cast<size_t>((ch * (K + 1) + kk) * C + c)];
        if (kk < K)
          dweight[c * K + kk] = acc;
        else if (dbias)
          dbias[c] = acc;
      }
    }
  }
}

int64_t scratch_bytes(bool backward, int64_t B, int64_t H, int64_t Lq, int64_t Lk, int64_t d, int64_t dv,
                      int elem_size) {
  const int64_t nt = omp_get_max_threads();
  const int64_t per = backward ? backward_tile_elems(Lq, Lk, d, dv) : forward_tile_elems(d, dv);
  int64_t b = sat_mul(sat_mul(per, nt), elem_size);
  if (backward) {
    const int64_t dp = round_up(std::max<int64_t>(d, 1), 32);
    const int64_t diag = sat_mul(sat_mul(B, H), sat_add(sat_mul(diag_rows(Lq, Lk), dp + 1), d));
    b = sat_add(b, sat_mul(diag, elem_size));
  }
  return b;
}

int64_t conv_scratch_bytes(bool backward, int64_t N, int64_t T_len, int64_t C, int64_t K, int elem_size) {
  int64_t e = sat_mul(K, C);
  if (backward) {
    const int64_t rows = sat_mul(N, T_len);
    e = sat_add(e, sat_mul(sat_mul(rows / kConvRows + 1, K + 1), C));
  }
  return sat_mul(e, elem_size);
}

EMBKERN_RCA_INSTANTIATE(float)
EMBKERN_RCA_INSTANTIATE(double)

EMBKERN_ISA_END
}  // namespace rca
}  // namespace embkern
