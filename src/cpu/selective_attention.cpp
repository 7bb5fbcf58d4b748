// CPU kernels of selective self-attention (docs/ops/selective_attention.md).
//
// Flash-style: the (Lq, Lk) score matrix is never formed. Queries are cut in
// blocks of kBM rows and keys in blocks of kBN; every product is a small GEMM
// on a block pair, done by one register-tiled micro-kernel (tile() below).
//
// Temperatures ("Why pre-scaling is exact"): tau_q[i] * scale is the row
// scale of the scores (rs_i), applied to q_i . k_j; tau_v is folded into the
// V tile load (v'_j = tau_v[j] v_j is what the products read).
//
// Forward, one task per (batch, query head, query block), in the transposed
// orientation S^T[j][i] (queries along the vector lanes), so that the row
// max, the row sum and the rescale of the output are lane-wise, with no
// horizontal reduction:
//   S^T = K Q^T, x = rs_i S^T, online softmax (m_i, l_i), O^T += V'^T P^T,
//   out_i = O_i / l_i, lse_i = m_i + log l_i.
// Under the causal mask only the key blocks [0, last query + q_offset] are
// visited, and only blocks crossing the diagonal are masked element-wise.
//
// Backward (standard flash backward on q' = tau_q q, k, v' = tau_v v, with
// D_i = dO_i . O_i computed first), in two passes that partition the outputs
// by ownership, so no two threads ever add into the same element:
//   pass 1, one task per (batch, kv head, key block): for every query head of
//     the group and every query block that sees the keys, in a fixed order,
//     S = Q K^T, P = exp(rs S - lse), dP = dO V'^T, dS = P (dP - D),
//     dV'^T += dO^T P, dK^T += Q^T (rs dS); then dk, dv = tau_v dv',
//     dtau_v_j = dv'_j . v_j.
//   pass 2, one task per (batch, query head, query block): P^T and dS^T
//     recomputed (the same operations in the same order, so the same bits as
//     in pass 1), dQ^T += K^T dS^T; then dq = rs dq~, dtau_q = scale dq~ . q.
// Scratch is a few tiles per thread (O(block * d)) plus D, one value per
// query row.
//
// Determinism: every product element is one chain of fused multiply-adds in
// a fixed order (over d, or over the keys / queries of a block, blocks in
// ascending order), vectorised across independent outputs only; exp is the
// fixed polynomial vexp() below, made of the same IEEE operations at every
// level (the generic level's std::fma is the correctly rounded fma). Block
// sizes do not depend on the ISA level, only the register tile does, and a
// tile's shape changes which outputs are computed together, never the chain
// of any one of them. So results are the same bits at every ISA level and
// every thread count. log (once per row) is the one libm call.
#include "embkern/selective_attention.h"

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
namespace ssa {
EMBKERN_ISA_BEGIN
namespace {

// Block sizes: the same at every ISA level (they fix where the online
// softmax rescales, hence the rounding). Multiples of every level's tile
// width NR (4, 16 or 32 lanes).
constexpr int64_t kBM = 64;  // queries per block
constexpr int64_t kBN = 64;  // keys per block
constexpr int64_t kMaxNR = 32;

// Vec, vexp, tile / gemm and pack_transposed: src/cpu/flash_tiles.h.
using namespace ::embkern::flash::EMBKERN_ISA_NS;

// ---------------------------------------------------------------------------

template <typename T>
struct Problem {
  int64_t B, Hq, Hkv, G, Lq, Lk, d, dv;
  bool causal;
  T scale;
  int64_t off;  // clamped q_offset
  // Last key (exclusive) any of the queries [i0, i0 + mb) sees.
  int64_t key_end(int64_t i0, int64_t mb) const {
    if (!causal) return Lk;
    return std::max<int64_t>(0, std::min<int64_t>(Lk, i0 + mb + off));
  }
};

template <typename T>
Problem<T> make_problem(int64_t B, int64_t Hq, int64_t Hkv, int64_t Lq, int64_t Lk, int64_t d, int64_t dv,
                        bool causal, double scale, int64_t q_offset) {
  Problem<T> p{B, Hq, Hkv, Hkv > 0 ? Hq / Hkv : 0, Lq, Lk, d, dv, causal, T(scale), 0};
  // j <= i + off for 0 <= i < Lq, 0 <= j < Lk: off >= Lk sees every key,
  // off < -Lq none; clamping keeps every mask and every i + off in range.
  p.off = std::max<int64_t>(-Lq - 1, std::min<int64_t>(Lk, q_offset));
  return p;
}

// Per-thread scratch, in elements (the larger of the two forward layouts).
template <typename T>
int64_t forward_tile_elems(int64_t d, int64_t dv) {
  const int64_t lanes = (d + kBN + dv) * kBM + kBN * dv + 3 * kBM;
  const int64_t rows = d * kBN + kBM * kBN + (kBN + kBM) * (dv + kMaxNR) + 3 * kBM;
  return std::max(lanes, rows);
}
template <typename T>
int64_t backward_tile_elems(int64_t d, int64_t dv) {
  const int64_t pass1 = (2 * d + 2 * dv) * kBN + 2 * kBM * kBN;
  const int64_t pass2 = (2 * d + dv) * kBM + 2 * kBN * kBM + kBN * dv + 3 * kBM;
  return std::max(pass1, pass2);
}

// v'_j = tau_v[j] v_j for rows [0, rows) into dst (row-major, width w); or v itself without tau_v.
template <typename T>
const T* scaled_rows(const T* X, int64_t rows, int64_t w, const T* scale, T* dst) {
  if (!scale) return X;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < w; ++c) dst[r * w + c] = scale[r] * X[r * w + c];
  return dst;
}

// ---------------------------------------------------------------------------
// Forward: one query block [i0, i0 + mb) of one (batch, query head).

template <typename T>
void forward_block(const Problem<T>& P, const T* q, const T* k, const T* v, const T* tq, const T* tv, T* out,
                   T* lse, int64_t i0, T* s) {
  using V = Vec<T>;
  using R = typename V::R;
  constexpr int64_t W = V::W;
  const int64_t d = P.d, dv = P.dv;
  const int64_t mb = std::min(kBM, P.Lq - i0), Np = round_up(mb, kNR<T>);
  T* Qt = s;                 // d x kBM: Qt[c][i] = q[i0 + i][c]
  T* St = Qt + d * kBM;      // kBN x kBM: S^T, then P^T
  T* Ot = St + kBN * kBM;    // dv x kBM: unnormalised O^T
  T* Vs = Ot + dv * kBM;     // kBN x dv: v' rows of the key block
  T* m = Vs + kBN * dv;      // running max (never -inf: starts at the lowest finite value)
  T* l = m + kBM;            // running sum
  T* rs = l + kBM;           // row scale tau_q[i] * scale (0 on padding)
  const T lowest = std::numeric_limits<T>::lowest();

  pack_transposed(q + i0 * d, mb, Np, d, static_cast<const T*>(nullptr), Qt, kBM);
  for (int64_t i = 0; i < Np; ++i) {
    rs[i] = i < mb ? tq[i0 + i] * P.scale : T(0);
    m[i] = lowest;
    l[i] = T(0);
  }
  for (int64_t c = 0; c < dv; ++c) std::fill(Ot + c * kBM, Ot + c * kBM + Np, T(0));

  const int64_t j_end = P.key_end(i0, mb);
  for (int64_t j0 = 0; j0 < j_end; j0 += kBN) {
    const int64_t nb = std::min(kBN, j_end - j0);
    gemm<T>(nb, Np, d, k + j0 * d, d, 1, Qt, kBM, St, kBM, false);
    // Key j0 + j is masked for the queries i < j0 + j - off - i0 (a prefix of row j).
    const bool partial = P.causal && j0 + nb - 1 > i0 + P.off;
    T bm[kBM];
    for (int64_t i = 0; i < Np; i += W) V::store(bm + i, V::set1(-std::numeric_limits<T>::infinity()));
    for (int64_t j = 0; j < nb; ++j) {
      T* row = St + j * kBM;
      for (int64_t i = 0; i < Np; i += W) V::store(row + i, V::mul(V::load(row + i), V::load(rs + i)));
      if (partial) {
        const int64_t thr = std::max<int64_t>(0, std::min<int64_t>(Np, j0 + j - P.off - i0));
        for (int64_t i = 0; i < thr; ++i) row[i] = -std::numeric_limits<T>::infinity();
      }
      for (int64_t i = 0; i < Np; i += W) V::store(bm + i, V::max(V::load(bm + i), V::load(row + i)));
    }
    T alpha[kBM];
    for (int64_t i = 0; i < Np; i += W) {
      const R mo = V::load(m + i), mn = V::max(mo, V::load(bm + i));
      V::store(alpha + i, vexp<T>(V::sub(mo, mn)));
      V::store(m + i, mn);
      V::store(l + i, V::mul(V::load(l + i), V::load(alpha + i)));
    }
    for (int64_t j = 0; j < nb; ++j) {
      T* row = St + j * kBM;
      for (int64_t i = 0; i < Np; i += W) {
        const R p = vexp<T>(V::sub(V::load(row + i), V::load(m + i)));
        V::store(row + i, p);
        V::store(l + i, V::add(V::load(l + i), p));
      }
    }
    for (int64_t c = 0; c < dv; ++c) {
      T* o = Ot + c * kBM;
      for (int64_t i = 0; i < Np; i += W) V::store(o + i, V::mul(V::load(o + i), V::load(alpha + i)));
    }
    const T* vr = scaled_rows(v + j0 * dv, nb, dv, tv ? tv + j0 : nullptr, Vs);
    // O^T[c][i] += sum_j v'[j][c] P^T[j][i]
    gemm<T>(dv, Np, nb, vr, 1, dv, St, kBM, Ot, kBM, true);
  }
  for (int64_t i = 0; i < mb; ++i) {
    T* o = out + (i0 + i) * dv;
    if (!(l[i] == T(0))) {  // l = 0: saw no key; NaN (a NaN score) goes on into out and lse
      for (int64_t c = 0; c < dv; ++c) o[c] = Ot[c * kBM + i] / l[i];
      lse[i0 + i] = m[i] + std::log(l[i]);
    } else {  // sees no key
      for (int64_t c = 0; c < dv; ++c) o[c] = T(0);
      lse[i0 + i] = -std::numeric_limits<T>::infinity();
    }
  }
}

// The same forward for a query block of a few rows (decoding: Lq = 1), which
// would fill only mb of the NR lanes of forward_block: here the keys run
// along the lanes (S = Q K^T against a transposed K block, O = P V' against
// padded V' rows). It computes every value with the same operations in the
// same order as forward_block -- each score and output element is the same
// FMA chain, the block max the same sequence of max, the row sum the same
// sequence of additions over the keys -- so the two give the same bits and
// the choice between them (by mb and the level's NR) changes no result.

template <typename T>
T exp1(T x) {  // vexp of one value (lane 0)
  T buf[Vec<T>::W];
  Vec<T>::store(buf, vexp<T>(Vec<T>::set1(x)));
  return buf[0];
}

template <typename T>
void forward_block_rows(const Problem<T>& P, const T* q, const T* k, const T* v, const T* tq, const T* tv, T* out,
                        T* lse, int64_t i0, T* s) {
  using V = Vec<T>;
  using R = typename V::R;
  constexpr int64_t W = V::W;
  const int64_t d = P.d, dv = P.dv;
  const int64_t mb = std::min(kBM, P.Lq - i0), dvp = round_up(dv, kNR<T>);
  T* Kt = s;               // d x kBN: Kt[c][j] = k[j0 + j][c]
  T* Sm = Kt + d * kBN;    // mb x kBN: S, then P
  T* Vp = Sm + kBM * kBN;  // kBN x dvp: v' rows, zero-padded
  T* O = Vp + kBN * dvp;   // mb x dvp: unnormalised O
  T* m = O + kBM * dvp;
  T* l = m + kBM;
  T* rs = l + kBM;
  const T lowest = std::numeric_limits<T>::lowest(), ninf = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < mb; ++i) {
    rs[i] = tq[i0 + i] * P.scale;
    m[i] = lowest;
    l[i] = T(0);
    std::fill(O + i * dvp, O + (i + 1) * dvp, T(0));
  }
  const int64_t j_end = P.key_end(i0, mb);
  for (int64_t j0 = 0; j0 < j_end; j0 += kBN) {
    const int64_t nb = std::min(kBN, j_end - j0), Nb = round_up(nb, kNR<T>);
    // A decode step streams the whole cache once and computes little on it
    // (4 flops per value read): while V' is built below, ask for the next key
    // block's K and V rows, one row of each per copied row, into L2 (no effect
    // on any value). Spread out and into L2, not all 512 lines at the block's
    // start into L1 (which evicted this block's packed tiles and stalled on the
    // miss queue): B=4 H=8 L=4096 d=64, 2 threads, AMD EPYC at avx512, one step
    // went from 3.8-4.4 ms to 2.9-3.3 ms (1 thread 7.5-8.0 -> 5.7-6.2 ms).
    const int64_t nn = j0 + kBN < j_end ? std::min(kBN, j_end - j0 - kBN) : 0;
    const char* kn = nn ? reinterpret_cast<const char*>(k + (j0 + kBN) * d) : nullptr;
    const char* vn = nn ? reinterpret_cast<const char*>(v + (j0 + kBN) * dv) : nullptr;
    pack_transposed(k + j0 * d, nb, Nb, d, static_cast<const T*>(nullptr), Kt, kBN);
    gemm<T>(mb, Nb, d, q + i0 * d, d, 1, Kt, kBN, Sm, kBN, false);
    for (int64_t i = 0; i < mb; ++i) {
      T* row = Sm + i * kBN;
      const R vr = V::set1(rs[i]);
      for (int64_t j = 0; j < Nb; j += W) V::store(row + j, V::mul(V::load(row + j), vr));
      const int64_t lim = P.causal ? std::max<int64_t>(0, std::min<int64_t>(nb, i0 + i + P.off - j0 + 1)) : nb;
      for (int64_t j = lim; j < Nb; ++j) row[j] = ninf;
      T bm = ninf;
      for (int64_t j = 0; j < nb; ++j) bm = bm > row[j] ? bm : row[j];  // V::max, one key at a time
      const T mo = m[i], mn = mo > bm ? mo : bm;
      const T alpha = exp1<T>(mo - mn);
      m[i] = mn;
      T li = l[i] * alpha;
      const R vm = V::set1(mn);
      for (int64_t j = 0; j < Nb; j += W) V::store(row + j, vexp<T>(V::sub(V::load(row + j), vm)));
      for (int64_t j = 0; j < nb; ++j) li = li + row[j];
      l[i] = li;
      T* o = O + i * dvp;
      const R va = V::set1(alpha);
      for (int64_t c = 0; c < dvp; c += W) V::store(o + c, V::mul(V::load(o + c), va));
    }
    for (int64_t j = 0; j < nb; ++j) {
      if (j < nn) {
        const char* kpf = kn + j * d * int64_t(sizeof(T));
        const char* vpf = vn + j * dv * int64_t(sizeof(T));
        for (int64_t b = 0; b < d * int64_t(sizeof(T)); b += 64) __builtin_prefetch(kpf + b, 0, 2);
        for (int64_t b = 0; b < dv * int64_t(sizeof(T)); b += 64) __builtin_prefetch(vpf + b, 0, 2);
      }
      T* dst = Vp + j * dvp;
      const T* src = v + (j0 + j) * dv;
      if (tv) {
        for (int64_t c = 0; c < dv; ++c) dst[c] = tv[j0 + j] * src[c];
      } else {
        for (int64_t c = 0; c < dv; ++c) dst[c] = src[c];
      }
      for (int64_t c = dv; c < dvp; ++c) dst[c] = T(0);
    }
    // O[i][c] += sum_j P[i][j] v'[j][c]
    gemm<T>(mb, dvp, nb, Sm, kBN, 1, Vp, dvp, O, dvp, true);
  }
  for (int64_t i = 0; i < mb; ++i) {
    T* o = out + (i0 + i) * dv;
    if (!(l[i] == T(0))) {  // l = 0: saw no key; NaN (a NaN score) goes on into out and lse
      for (int64_t c = 0; c < dv; ++c) o[c] = O[i * dvp + c] / l[i];
      lse[i0 + i] = m[i] + std::log(l[i]);
    } else {
      for (int64_t c = 0; c < dv; ++c) o[c] = T(0);
      lse[i0 + i] = ninf;
    }
  }
}

// ---------------------------------------------------------------------------
// Backward pass 1: dk, dv (and dtau_v) of one key block [j0, j0 + nb) of one
// (batch, kv head), summed over the group's query heads.

template <typename T>
void backward_key_block(const Problem<T>& P, const T* go, const T* q, const T* k, const T* v, const T* tq,
                        const T* tv, const T* lse, const T* Drow, T* dk, T* dvo, T* dtv, int64_t j0, T* s) {
  using V = Vec<T>;
  using R = typename V::R;
  constexpr int64_t W = V::W;
  const int64_t d = P.d, dv = P.dv, Lq = P.Lq;
  const int64_t nb = std::min(kBN, P.Lk - j0), Np = round_up(nb, kNR<T>);
  T* Kt = s;               // d x kBN: Kt[c][j] = k[j0 + j][c]
  T* Vt = Kt + d * kBN;    // dv x kBN: v'^T
  T* dKt = Vt + dv * kBN;  // d x kBN
  T* dVt = dKt + d * kBN;  // dv x kBN: dv'^T
  T* Sm = dVt + dv * kBN;  // kBM x kBN: S, then P
  T* dP = Sm + kBM * kBN;  // kBM x kBN: dP, then rs * dS
  pack_transposed(k + j0 * d, nb, Np, d, static_cast<const T*>(nullptr), Kt, kBN);
  pack_transposed(v + j0 * dv, nb, Np, dv, tv ? tv + j0 : nullptr, Vt, kBN);
  for (int64_t c = 0; c < d; ++c) std::fill(dKt + c * kBN, dKt + c * kBN + Np, T(0));
  for (int64_t c = 0; c < dv; ++c) std::fill(dVt + c * kBN, dVt + c * kBN + Np, T(0));

  // Query i sees key j0 iff j0 <= i + off.
  const int64_t i_lo = P.causal ? std::max<int64_t>(0, j0 - P.off) : 0;
  const T inf = std::numeric_limits<T>::infinity();
  for (int64_t g = 0; g < P.G; ++g) {
    const int64_t hq = g * Lq;  // row offset of the group's g-th query head
    const T* qh = q + hq * d;
    const T* goh = go + hq * dv;
    for (int64_t i0 = i_lo / kBM * kBM; i0 < Lq; i0 += kBM) {
      const int64_t mb = std::min(kBM, Lq - i0);
      gemm<T>(mb, Np, d, qh + i0 * d, d, 1, Kt, kBN, Sm, kBN, false);
      gemm<T>(mb, Np, dv, goh + i0 * dv, dv, 1, Vt, kBN, dP, kBN, false);
      for (int64_t i = 0; i < mb; ++i) {
        const int64_t r = hq + i0 + i;
        const T rsi = tq[r] * P.scale;
        const T li = lse[r] == -inf ? inf : lse[r];
        const int64_t lim = P.causal ? std::max<int64_t>(0, std::min<int64_t>(nb, i0 + i + P.off - j0 + 1)) : nb;
        T* srow = Sm + i * kBN;
        T* drow = dP + i * kBN;
        const R vr = V::set1(rsi), vl = V::set1(li), vd = V::set1(Drow[r]);
        for (int64_t j = 0; j < Np; j += W) {
          const R p = vexp<T>(V::sub(V::mul(V::load(srow + j), vr), vl));
          V::store(srow + j, p);
        }
        for (int64_t j = lim; j < Np; ++j) srow[j] = T(0);
        for (int64_t j = 0; j < Np; j += W) {
          const R p = V::load(srow + j);
          const R ds = V::mul(p, V::sub(V::load(drow + j), vd));
          V::store(drow + j, V::mul(ds, vr));
        }
      }
      // dv'^T[c][j] += sum_i dO[i][c] P[i][j];  dK^T[c][j] += sum_i q[i][c] (rs dS)[i][j]
      gemm<T>(dv, Np, mb, goh + i0 * dv, 1, dv, Sm, kBN, dVt, kBN, true);
      gemm<T>(d, Np, mb, qh + i0 * d, 1, d, dP, kBN, dKt, kBN, true);
    }
  }
  for (int64_t j = 0; j < nb; ++j) {
    const int64_t jj = j0 + j;
    for (int64_t c = 0; c < d; ++c) dk[jj * d + c] = dKt[c * kBN + j];
    if (tv) {
      T acc = T(0);
      for (int64_t c = 0; c < dv; ++c) {
        const T gvp = dVt[c * kBN + j];
        dvo[jj * dv + c] = tv[jj] * gvp;
        acc = std::fma(gvp, v[jj * dv + c], acc);
      }
      dtv[jj] = acc;
    } else {
      for (int64_t c = 0; c < dv; ++c) dvo[jj * dv + c] = dVt[c * kBN + j];
    }
  }
}

// Backward pass 2: dq and dtau_q of one query block [i0, i0 + mb) of one
// (batch, query head).

template <typename T>
void backward_query_block(const Problem<T>& P, const T* go, const T* q, const T* k, const T* v, const T* tq,
                          const T* tv, const T* lse, const T* Drow, T* dq, T* dtq, int64_t i0, T* s) {
  using V = Vec<T>;
  using R = typename V::R;
  constexpr int64_t W = V::W;
  const int64_t d = P.d, dv = P.dv;
  const int64_t mb = std::min(kBM, P.Lq - i0), Np = round_up(mb, kNR<T>);
  T* Qt = s;                  // d x kBM
  T* dOt = Qt + d * kBM;      // dv x kBM
  T* dQt = dOt + dv * kBM;    // d x kBM: dq~^T = sum_j dS_ij k_j
  T* St = dQt + d * kBM;      // kBN x kBM: S^T, then P^T
  T* dPt = St + kBN * kBM;    // kBN x kBM: dP^T, then dS^T
  T* Vs = dPt + kBN * kBM;    // kBN x dv
  T* rs = Vs + kBN * dv;      // kBM each: row scale, lse (+inf: P = 0), D
  T* ls = rs + kBM;
  T* Dv = ls + kBM;
  const T inf = std::numeric_limits<T>::infinity();
  pack_transposed(q + i0 * d, mb, Np, d, static_cast<const T*>(nullptr), Qt, kBM);
  pack_transposed(go + i0 * dv, mb, Np, dv, static_cast<const T*>(nullptr), dOt, kBM);
  for (int64_t i = 0; i < Np; ++i) {
    rs[i] = i < mb ? tq[i0 + i] * P.scale : T(0);
    ls[i] = i < mb && lse[i0 + i] != -inf ? lse[i0 + i] : inf;
    Dv[i] = i < mb ? Drow[i0 + i] : T(0);
  }
  for (int64_t c = 0; c < d; ++c) std::fill(dQt + c * kBM, dQt + c * kBM + Np, T(0));

  const int64_t j_end = P.key_end(i0, mb);
  for (int64_t j0 = 0; j0 < j_end; j0 += kBN) {
    const int64_t nb = std::min(kBN, j_end - j0);
    const bool partial = P.causal && j0 + nb - 1 > i0 + P.off;
    gemm<T>(nb, Np, d, k + j0 * d, d, 1, Qt, kBM, St, kBM, false);
    const T* vr = scaled_rows(v + j0 * dv, nb, dv, tv ? tv + j0 : nullptr, Vs);
    gemm<T>(nb, Np, dv, vr, dv, 1, dOt, kBM, dPt, kBM, false);
    for (int64_t j = 0; j < nb; ++j) {
      T* srow = St + j * kBM;
      T* drow = dPt + j * kBM;
      for (int64_t i = 0; i < Np; i += W) {
        const R p = vexp<T>(V::sub(V::mul(V::load(srow + i), V::load(rs + i)), V::load(ls + i)));
        V::store(srow + i, p);
      }
      if (partial) {
        const int64_t thr = std::max<int64_t>(0, std::min<int64_t>(Np, j0 + j - P.off - i0));
        for (int64_t i = 0; i < thr; ++i) srow[i] = T(0);
      }
      for (int64_t i = 0; i < Np; i += W)
        V::store(drow + i, V::mul(V::load(srow + i), V::sub(V::load(drow + i), V::load(Dv + i))));
    }
    // dq~^T[c][i] += sum_j k[j][c] dS^T[j][i]
    gemm<T>(d, Np, nb, k + j0 * d, 1, d, dPt, kBM, dQt, kBM, true);
  }
  for (int64_t i = 0; i < mb; ++i) {
    const int64_t ii = i0 + i;
    T acc = T(0);
    for (int64_t c = 0; c < d; ++c) {
      const T g = dQt[c * kBM + i];
      dq[ii * d + c] = rs[i] * g;
      acc = std::fma(g, q[ii * d + c], acc);
    }
    dtq[ii] = P.scale * acc;
  }
}

}  // namespace

// ---------------------------------------------------------------------------

template <typename T>
void forward(const T* q, const T* k, const T* v, const T* tau_q, const T* tau_v, T* out, T* lse, int64_t B,
             int64_t Hq, int64_t Hkv, int64_t Lq, int64_t Lk, int64_t d, int64_t dv, bool causal, double scale,
             int64_t q_offset, int64_t k_hs, int64_t v_hs, int64_t tv_hs) {
  const Problem<T> P = make_problem<T>(B, Hq, Hkv, Lq, Lk, d, dv, causal, scale, q_offset);
  const int64_t nqb = (Lq + kBM - 1) / kBM, tasks = B * Hq * nqb;
  if (tasks == 0) return;
  const int64_t per = forward_tile_elems<T>(d, dv);
  const int nt = omp_get_max_threads();
  std::vector<T> scratch(static_cast<size_t>(per) * static_cast<size_t>(nt));
  const bool par = worth_threads(tasks, B * Hq * Lq * std::max<int64_t>(1, Lk) * (d + dv));
#pragma omp parallel if (par)
  {
    T* s = scratch.data() + static_cast<size_t>(omp_get_thread_num()) * static_cast<size_t>(per);
    // Latest query blocks first: under the causal mask they see the most keys.
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t bh = t / nqb, qb = nqb - 1 - t % nqb;
      const int64_t b = bh / Hq, h = bh % Hq, kvh = b * Hkv + h / P.G;
      const int64_t i0 = qb * kBM, mb = std::min(kBM, Lq - i0);
      // Keys along the lanes when the block fills at most a quarter of them.
      auto block = 4 * mb <= kNR<T> ? forward_block_rows<T> : forward_block<T>;
      block(P, q + bh * Lq * d, k + kvh * k_hs, v + kvh * v_hs, tau_q + bh * Lq,
            tau_v ? tau_v + kvh * tv_hs : nullptr, out + bh * Lq * dv, lse + bh * Lq, i0, s);
    }
  }
}

template <typename T>
void backward(const T* grad_out, const T* q, const T* k, const T* v, const T* tau_q, const T* tau_v, const T* out,
              const T* lse, T* dq, T* dk, T* dv, T* dtau_q, T* dtau_v, int64_t B, int64_t Hq, int64_t Hkv, int64_t Lq,
              int64_t Lk, int64_t d, int64_t dv_dim, bool causal, double scale, int64_t q_offset) {
  const Problem<T> P = make_problem<T>(B, Hq, Hkv, Lq, Lk, d, dv_dim, causal, scale, q_offset);
  const int64_t dvd = dv_dim;
  const int64_t rows = B * Hq * Lq;
  const int64_t nqb = (Lq + kBM - 1) / kBM, nkb = (Lk + kBN - 1) / kBN;
  const int64_t tasks1 = B * Hkv * nkb, tasks2 = B * Hq * nqb;
  const int64_t per = backward_tile_elems<T>(d, dvd);
  const int nt = omp_get_max_threads();
  std::vector<T> D(static_cast<size_t>(std::max<int64_t>(1, rows)));
  std::vector<T> scratch(static_cast<size_t>(per) * static_cast<size_t>(nt));
  const int64_t work = B * Hq * Lq * std::max<int64_t>(1, Lk) * (d + dvd);
#pragma omp parallel if (worth_threads(std::max(rows, tasks1), work))
  {
    T* s = scratch.data() + static_cast<size_t>(omp_get_thread_num()) * static_cast<size_t>(per);
    // D_i = dO_i . O_i, one FMA chain per row.
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const T* g = grad_out + r * dvd;
      const T* o = out + r * dvd;
      T acc = T(0);
      for (int64_t c = 0; c < dvd; ++c) acc = std::fma(g[c], o[c], acc);
      D[r] = acc;
    }
    // Pass 1: dk, dv, dtau_v by key block. Earliest key blocks first (most queries see them).
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks1; ++t) {
      const int64_t bk = t / nkb, kb = t % nkb;
      const int64_t b = bk / Hkv, h = bk % Hkv, hq0 = b * Hq + h * P.G;  // first query head of the group
      backward_key_block<T>(P, grad_out + hq0 * Lq * dvd, q + hq0 * Lq * d, k + bk * Lk * d, v + bk * Lk * dvd,
                            tau_q + hq0 * Lq, tau_v ? tau_v + bk * Lk : nullptr, lse + hq0 * Lq, D.data() + hq0 * Lq,
                            dk + bk * Lk * d, dv + bk * Lk * dvd, tau_v ? dtau_v + bk * Lk : nullptr, kb * kBN, s);
    }
    // Pass 2: dq, dtau_q by query block. Latest query blocks first.
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks2; ++t) {
      const int64_t bh = t / nqb, qb = nqb - 1 - t % nqb;
      const int64_t b = bh / Hq, h = bh % Hq, kvh = b * Hkv + h / P.G;
      backward_query_block<T>(P, grad_out + bh * Lq * dvd, q + bh * Lq * d, k + kvh * Lk * d, v + kvh * Lk * dvd,
                              tau_q + bh * Lq, tau_v ? tau_v + kvh * Lk : nullptr, lse + bh * Lq, D.data() + bh * Lq,
                              dq + bh * Lq * d, dtau_q + bh * Lq, qb * kBM, s);
    }
  }
}

int64_t scratch_bytes(bool backward, int64_t B, int64_t Hq, int64_t Lq, int64_t d, int64_t dv, int elem_size) {
  const int64_t nt = omp_get_max_threads();
  const int64_t per = backward ? backward_tile_elems<float>(d, dv) : forward_tile_elems<float>(d, dv);
  int64_t b = sat_mul(sat_mul(per, nt), elem_size);
  if (backward) b = sat_add(b, sat_mul(sat_mul(sat_mul(B, Hq), std::max<int64_t>(1, Lq)), elem_size));
  return b;
}

EMBKERN_SSA_INSTANTIATE(float)
EMBKERN_SSA_INSTANTIATE(double)

EMBKERN_ISA_END
}  // namespace ssa
}  // namespace embkern
