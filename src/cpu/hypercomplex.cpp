// CPU kernels of the hypercomplex (quaternion / dihedron) KG scoring op.
//
// 1-vs-all scoring S = epilogue(q E^T) with q (B, K), E (N, K), K = 4d, is one
// NT GEMM. The micro-kernel broadcasts entity values and keeps the query side
// in vectors: 6 entities x 16 queries (fp32) per register tile, queries packed
// once per call into 16-wide k-major panels (B*K, a few hundred KB), entity
// rows read in place. So the 23 MB FB15k-237 table (N = 14,505, K = 400) is
// never copied or repacked: each thread streams its own entity blocks once.
//
// Blocking: an entity block of NB = 96 rows (154 KB at K = 400, L2-resident)
// against a query block of MB = 64 rows gives a 96 x 64 score block C, stored
// entity-major (C[n*MB + b], query lanes contiguous) in a 24 KB per-thread
// buffer; the op's epilogue consumes C while it is hot. Packing E into 6-row
// panels, K-blocking and software prefetch did not pay for themselves here
// (benchmarks/results has the numbers).
// Work is partitioned by entity block, i.e. by output ownership:
//   score   each block writes its own columns of S;
//   rank    per-thread integer counts (exact, so summing them in any order is
//           deterministic); filtered ids are un-counted from the tile itself;
//   topk    per-thread bounded heaps under a strict total order, merged at
//           the end (the top-k set of a total order does not depend on the
//           partition);
//   ce      online-logsumexp partials per fixed entity chunk (the chunking
//           depends on N only, never on the thread count), merged in order;
//   ce bwd  one pass, three GEMM-sized products per block (S, G.E, G^T.q):
//           grad_E / grad_bias_t by block owner, grad_q / grad_bias_h as
//           per-chunk partials reduced in chunk order.
// Every S[b, n] any of these sees comes from gemm::tile_nt (one FMA chain
// over k), so a target's score recomputed with gemm::dot_chain is
// bit-identical to the value in the tile, and 1 thread == 2 threads bit for bit.
#include "embkern/hypercomplex.h"

#include <omp.h>

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <utility>
#include <vector>

#include "gemm_kernel.h"
#include "embkern/saturating.h"

namespace embkern {
namespace hc {
EMBKERN_ISA_BEGIN
namespace gemm = ::embkern::gemm::EMBKERN_ISA_NS;
namespace {

using gemm::Buffer;
using gemm::Tile;

// Block sizes: NB multiple of MR = 6, MB multiple of NR = 16 (fp32) and 8
// (fp64). The time is flat over a wide range of both; 96 x 64 keeps C at
// 24 KB and the E block in L2.
constexpr int64_t kNB = 96;
constexpr int64_t kMB = 64;
// ce partials live per fixed entity chunk (a function of N only, so the
// merge order never depends on the thread count). 8 chunks give a few cores
// dynamic load balance at a grad_q partial cost of 8*B*K values.
constexpr int64_t kMaxChunks = 8;

// Below ~256 K multiply-adds an OpenMP team costs more than it saves.
inline bool worth_threads(int64_t work) { return work > (int64_t(1) << 18); }

// ---------------------------------------------------------------------------
// Products. Multiplication table of the basis {1, i, j, k} = {0, 1, 2, 3}:
// e_i e_j = sign[i][j] e_{i^j} for both algebras (only the signs differ).
constexpr int kSign[2][4][4] = {
    // quaternion: i^2 = j^2 = k^2 = -1, ij = k, jk = i, ki = j
    {{1, 1, 1, 1}, {1, -1, 1, -1}, {1, -1, -1, 1}, {1, 1, -1, -1}},
    // dihedron: i^2 = -1, j^2 = k^2 = +1, ij = k, jk = -i, ki = j
    {{1, 1, 1, 1}, {1, -1, 1, -1}, {1, -1, 1, -1}, {1, 1, 1, 1}},
};

// The products are O(B d), nothing next to the GEMM, and are kept bit-identical
// to the reference's separately rounded torch ops (a1*a2 - b1*b2 - ...) at
// every ISA level. -ffp-contract=off (this file's build flag) is not enough:
// GCC 12's SLP vectoriser turns the interleaved layout's mixed lanes
// (x*y - z in some lanes, x*y + z in others) into vfmaddsub231ps even then,
// at -march=x86-64-v3 and above, so some values came out fused (and a
// `#pragma GCC optimize("fp-contract=off")` makes no difference). So every
// product goes through rounded(): an empty asm that makes the rounded product
// opaque, which no pass can fuse with the add that follows. Cost: the product
// loop stays scalar, O(B d), small next to the O(B N d) scores that follow.
template <typename T>
inline T rounded(T p) {
#if defined(__x86_64__) || defined(__i386__)
  __asm__("" : "+x"(p));
#elif defined(__aarch64__)
  __asm__("" : "+w"(p));
#else
  volatile T v = p;
  p = v;
#endif
  return p;
}

template <int LAY>
inline int64_t at(int c, int64_t j, int64_t d) {
  return LAY == 0 ? c * d + j : 4 * j + c;
}

template <typename T, int ALG, int LAY>
void query_forward_impl(const T* h, const T* r, T* q, int64_t B, int64_t d, bool normalize) {
  const int64_t D = 4 * d;
#pragma omp parallel for schedule(static) if (worth_threads(B * D * 4))
  for (int64_t b = 0; b < B; ++b) {
    const T* hb = h + b * D;
    const T* rb = r + b * D;
    T* qb = q + b * D;
    for (int64_t j = 0; j < d; ++j) {
      T x[4], y[4];
      for (int c = 0; c < 4; ++c) {
        x[c] = hb[at<LAY>(c, j, d)];
        y[c] = rb[at<LAY>(c, j, d)];
      }
      if (normalize) {
        const T inv = T(1) / std::sqrt(rounded(y[0] * y[0]) + rounded(y[1] * y[1]) + rounded(y[2] * y[2]) +
                                       rounded(y[3] * y[3]));
        for (int c = 0; c < 4; ++c) y[c] *= inv;
      }
      const T a1 = x[0], b1 = x[1], c1 = x[2], d1 = x[3];
      const T a2 = y[0], b2 = y[1], c2 = y[2], d2 = y[3];
      T o[4];
      // docs/ops/hypercomplex.md's formulas term for term, left to right (reference order).
      if (ALG == 0) {
        o[0] = rounded(a1 * a2) - rounded(b1 * b2) - rounded(c1 * c2) - rounded(d1 * d2);
        o[1] = rounded(a1 * b2) + rounded(b1 * a2) + rounded(c1 * d2) - rounded(d1 * c2);
        o[2] = rounded(a1 * c2) - rounded(b1 * d2) + rounded(c1 * a2) + rounded(d1 * b2);
        o[3] = rounded(a1 * d2) + rounded(b1 * c2) - rounded(c1 * b2) + rounded(d1 * a2);
      } else {
        o[0] = rounded(a1 * a2) - rounded(b1 * b2) + rounded(c1 * c2) + rounded(d1 * d2);
        o[1] = rounded(a1 * b2) + rounded(b1 * a2) - rounded(c1 * d2) + rounded(d1 * c2);
        o[2] = rounded(a1 * c2) + rounded(c1 * a2) + rounded(d1 * b2) - rounded(b1 * d2);
        o[3] = rounded(a1 * d2) + rounded(d1 * a2) + rounded(b1 * c2) - rounded(c1 * b2);
      }
      for (int c = 0; c < 4; ++c) qb[at<LAY>(c, j, d)] = o[c];
    }
  }
}

template <typename T, int ALG, int LAY>
void query_backward_impl(const T* g, const T* h, const T* r, T* gh, T* gr, int64_t B, int64_t d, bool normalize) {
  const int64_t D = 4 * d;
#pragma omp parallel for schedule(static) if (worth_threads(B * D * 8))
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < d; ++j) {
      T gv[4], x[4], y[4];
      for (int c = 0; c < 4; ++c) {
        gv[c] = g[b * D + at<LAY>(c, j, d)];
        x[c] = h[b * D + at<LAY>(c, j, d)];
        y[c] = r[b * D + at<LAY>(c, j, d)];
      }
      T inv = T(1);
      if (normalize) {
        inv = T(1) / std::sqrt(y[0] * y[0] + y[1] * y[1] + y[2] * y[2] + y[3] * y[3]);
        for (int c = 0; c < 4; ++c) y[c] *= inv;
      }
      // grad_h_i = sum_j sign[i][j] g_{i^j} y_j ; grad_y_j = sum_i sign[i][j] g_{i^j} x_i
      T dx[4] = {T(0), T(0), T(0), T(0)}, dy[4] = {T(0), T(0), T(0), T(0)};
      for (int i = 0; i < 4; ++i)
        for (int jj = 0; jj < 4; ++jj) {
          const T s = kSign[ALG][i][jj] > 0 ? gv[i ^ jj] : -gv[i ^ jj];
          dx[i] += s * y[jj];
          dy[jj] += s * x[i];
        }
      if (normalize) {
        // r_hat = r / |r|: grad_r = (grad_r_hat - r_hat <grad_r_hat, r_hat>) / |r|
        const T p = dy[0] * y[0] + dy[1] * y[1] + dy[2] * y[2] + dy[3] * y[3];
        for (int c = 0; c < 4; ++c) dy[c] = (dy[c] - y[c] * p) * inv;
      }
      for (int c = 0; c < 4; ++c) {
        gh[b * D + at<LAY>(c, j, d)] = dx[c];
        gr[b * D + at<LAY>(c, j, d)] = dy[c];
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Shared state of one scoring call: packed query panels and the norms.

template <typename T>
struct Scorer {
  static constexpr int NR = Tile<T>::NR;
  static constexpr int MR = Tile<T>::MR;
  const T* q;
  const T* E;
  const T* bh;
  const T* bt;
  int64_t B, N, K, Bpad;
  bool dist;
  Buffer<T> qp;          // ceil(B/NR) panels of NR x K, k-major
  std::vector<T> qn;  // |q_b|^2 (padded to Bpad), distance only

  Scorer(const T* q_, const T* E_, const T* bh_, const T* bt_, int64_t B_, int64_t N_, int64_t K_, Score s)
      : q(q_), E(E_), bh(bh_), bt(bt_), B(B_), N(N_), K(K_), dist(s == Score::Distance) {
    assert(B >= 0 && N >= 0 && K >= 0 && (dist || (!bh && !bt)));
    Bpad = (B + NR - 1) / NR * NR;
    const int64_t panels = Bpad / NR;
    qp.resize(static_cast<size_t>(std::max<int64_t>(1, Bpad * K)));
    if (dist) {
      qn.assign(static_cast<size_t>(Bpad), T(0));
    }
    const bool par = worth_threads((B + N) * K);
#pragma omp parallel if (par)
    {
#pragma omp for schedule(static) nowait
      for (int64_t p = 0; p < panels; ++p)
        gemm::pack_panel(q + p * NR * K, std::min<int64_t>(NR, B - p * NR), K, K, qp.data() + p * NR * K);
      if (dist) {
#pragma omp for schedule(static) nowait
        for (int64_t b = 0; b < B; ++b) qn[b] = gemm::sqnorm(q + b * K, K);
      }
    }
  }

  // The distance epilogue, one definition for tiles and lone scores alike:
  // only additions, subtractions and an exact doubling, so vectorised and
  // scalar evaluation round identically.
  inline T epi(T dot, int64_t b, int64_t n) const {
    if (!dist) return dot;
    T s = T(2) * dot - qn[b] - gemm::sqnorm(E + n * K, K);
    if (bh) s += bh[b];
    if (bt) s += bt[n];
    return s;
  }

  // S[b, n] alone, bit-identical to the tile's value (|E_n|^2 recomputed by
  // the same function: O(K) per call, the callers make B of them).
  inline T one(int64_t b, int64_t n) const { return epi(gemm::dot_chain(q + b * K, E + n * K, K), b, n); }


  // Scores of queries [b0, b0+mb) (b0 a multiple of NR) x entities [n0, n0+nb)
  // into C[n*MB + b] (entity-major). Query lanes up to the panel end are
  // written too (padding, finite); entity rows beyond nb are not. e2[n] is
  // |E_{n0+n}|^2 (distance only), filled by sweep() for this block.
  void block(int64_t b0, int64_t mb, int64_t n0, int64_t nb, const T* e2, T* C) const {
    const int64_t p0 = b0 / NR, np = (mb + NR - 1) / NR;
    for (int64_t e = 0; e < nb; e += MR) {
      const int rows = static_cast<int>(std::min<int64_t>(MR, nb - e));
      const T* Ae = E + (n0 + e) * K;
      gemm::tile_nt_panels(rows, K, Ae, K, qp.data() + p0 * NR * K, np, C + e * kMB, kMB);
    }
    if (dist) {
      const int64_t lanes = np * NR;
      const T* qnb = qn.data() + b0;
      for (int64_t n = 0; n < nb; ++n) {
        T* c = C + n * kMB;
        const T en = e2[n];
        for (int64_t b = 0; b < lanes; ++b) c[b] = T(2) * c[b] - qnb[b] - en;
        if (bh) {
          const int64_t m = std::min<int64_t>(lanes, B - b0);
          for (int64_t b = 0; b < m; ++b) c[b] += bh[b0 + b];
        }
        if (bt) {
          const T t = bt[n0 + n];
          for (int64_t b = 0; b < lanes; ++b) c[b] += t;
        }
      }
    }
  }

  // The block sweep every scoring kernel runs: entity block jb against each
  // query block in turn, in order. block() fills C with the score block of
  // queries [b0, b0+mb) x entities [n0, n0+nb), then tile(b0, mb, n0, nb)
  // consumes it while it is hot.
  template <class Tile>
  void sweep(int64_t jb, T* C, Tile&& tile) const {
    const int64_t n0 = jb * kNB, nb = std::min(kNB, N - n0);
    const int64_t mbl = mblocks();
    // |E_n|^2 of this block only, by the thread that owns it, just before
    // its tiles read the same rows (then in L2). Before, it was a separate
    // pass over all N rows ahead of the sweep: the 23 MB FB15k-237 table read
    // once more.
    // A local array: the block's norms are read only by this thread's
    // block() calls below (kNB = 96 values, 768 B in fp64).
    T e2[kNB];
    if (dist)
      for (int64_t n = 0; n < nb; ++n) e2[n] = gemm::sqnorm(E + (n0 + n) * K, K);
    for (int64_t ib = 0; ib < mbl; ++ib) {
      const int64_t b0 = ib * kMB, mb = std::min(kMB, B - b0);
      block(b0, mb, n0, nb, e2, C);
      tile(b0, mb, n0, nb);
    }
  }

  int64_t nblocks() const { return (N + kNB - 1) / kNB; }
  int64_t mblocks() const { return (B + kMB - 1) / kMB; }
  // Per-row arrays read with whole-block trip counts are padded to this.
  size_t rows_padded() const { return static_cast<size_t>(mblocks() * kMB); }
};

// Entity chunks for partials: a function of N only.
struct Chunks {
  int64_t nblk, nch;
  explicit Chunks(int64_t nblocks) : nblk(nblocks), nch(std::min<int64_t>(nblocks, kMaxChunks)) {}
  int64_t begin(int64_t c) const { return c * nblk / nch; }
  int64_t end(int64_t c) const { return (c + 1) * nblk / nch; }
};

// Per-thread score blocks C (kNB x kMB, 24 KB fp32 / 48 KB fp64), allocated
// and zeroed before the parallel region that uses them: a std::bad_alloc
// thrown inside an OpenMP region cannot leave it (std::terminate), one thrown
// here reaches the caller (MemoryError at the boundary). A team is never
// larger than omp_get_max_threads(), nor than 1 when `par` is false.
template <typename T>
struct BlockPool {
  std::vector<Buffer<T>> bufs;
  explicit BlockPool(bool par) : bufs(static_cast<size_t>(par ? omp_get_max_threads() : 1)) {
    for (Buffer<T>& b : bufs) {
      b.resize(static_cast<size_t>(kNB * kMB));
      b.zero(static_cast<size_t>(kNB * kMB));
    }
  }
  Buffer<T>& mine() { return bufs[static_cast<size_t>(omp_get_thread_num())]; }
};

// ---------------------------------------------------------------------------
// Filters: a sorted, de-duplicated copy of each row's CSR segment.

struct Filter {
  std::vector<int64_t> off, idx;
  bool active = false;
  Filter(const int64_t* fo, const int64_t* fi, int64_t B) {
    if (!fo || !fi) return;
    assert(fo[0] == 0 && std::is_sorted(fo, fo + B + 1));  // a valid CSR (the binding checks it)
    active = true;
    off.assign(static_cast<size_t>(B + 1), 0);
    idx.reserve(static_cast<size_t>(fo[B]));
    std::vector<int64_t> row;
    for (int64_t b = 0; b < B; ++b) {
      row.assign(fi + fo[b], fi + fo[b + 1]);
      std::sort(row.begin(), row.end());
      row.erase(std::unique(row.begin(), row.end()), row.end());
      idx.insert(idx.end(), row.begin(), row.end());
      off[b + 1] = static_cast<int64_t>(idx.size());
    }
  }
  int64_t begin(int64_t b) const { return off[b]; }
  int64_t end(int64_t b) const { return off[b + 1]; }
  bool has(int64_t b, int64_t n) const {
    if (!active) return false;
    return std::binary_search(idx.begin() + off[b], idx.begin() + off[b + 1], n);
  }
};

// ---------------------------------------------------------------------------
// score_forward

template <typename T>
void score_impl(const Scorer<T>& sc, T* S) {
  const int64_t B = sc.B, N = sc.N;
  const int64_t nbl = sc.nblocks();
  const bool par = worth_threads(B * N * sc.K);
  BlockPool<T> pool(par);
#pragma omp parallel if (par)
  {
    Buffer<T>& C = pool.mine();
#pragma omp for schedule(dynamic, 1)
    for (int64_t jb = 0; jb < nbl; ++jb)
      sc.sweep(jb, C.data(), [&](int64_t b0, int64_t mb, int64_t n0, int64_t nb) {
        gemm::transpose_copy(C.data(), kMB, nb, mb, S + b0 * N + n0, N);
      });
  }
}

// ---------------------------------------------------------------------------
// rank

template <typename T>
void rank_impl(const Scorer<T>& sc, const int64_t* targets, const Filter& flt, double* ranks, Ties ties) {
  const int64_t B = sc.B, N = sc.N;
  const int64_t nbl = sc.nblocks();
  std::vector<T> st(sc.rows_padded(), T(0));
  const bool par = worth_threads(B * N * sc.K);
  const int nt = par ? omp_get_max_threads() : 1;
  std::vector<int64_t> gt(static_cast<size_t>(nt * B), 0), ge(static_cast<size_t>(nt * B), 0);
  BlockPool<T> pool(par);
#pragma omp parallel if (par)
  {
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) st[b] = sc.one(b, targets[b]);
    const int tid = omp_get_thread_num();
    int64_t* my_gt = gt.data() + tid * B;
    int64_t* my_ge = ge.data() + tid * B;
    Buffer<T>& C = pool.mine();
    int32_t cg[kMB], ce[kMB];
#pragma omp for schedule(dynamic, 1)
    for (int64_t jb = 0; jb < nbl; ++jb)
      sc.sweep(jb, C.data(), [&](int64_t b0, int64_t mb, int64_t n0, int64_t nb) {
        const T* s = st.data() + b0;
        for (int64_t b = 0; b < kMB; ++b) cg[b] = ce[b] = 0;
        for (int64_t n = 0; n < nb; ++n) {
          const T* c = C.data() + n * kMB;
          for (int64_t b = 0; b < kMB; ++b) {
            cg[b] += c[b] > s[b];
            ce[b] += c[b] >= s[b];
          }
        }
        if (flt.active) {
          // Un-count the row's filtered ids in this block, read from the tile
          // itself: no recompute, no gather of E rows, whose cost would grow
          // with the number of filtered ids per row.
          for (int64_t b = 0; b < mb; ++b) {
            const int64_t row = b0 + b, t = targets[row];
            const int64_t* end = flt.idx.data() + flt.end(row);
            for (const int64_t* p = std::lower_bound(flt.idx.data() + flt.begin(row), end, n0);
                 p < end && *p < n0 + nb; ++p) {
              if (*p == t) continue;  // the target never counts against itself
              const T v = C[(*p - n0) * kMB + b];
              cg[b] -= v > s[b];
              ce[b] -= v >= s[b];
            }
          }
        }
        for (int64_t b = 0; b < mb; ++b) {
          my_gt[b0 + b] += cg[b];
          my_ge[b0 + b] += ce[b];
        }
      });
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      int64_t g = 0, e = 0;
      for (int t = 0; t < nt; ++t) {
        g += gt[t * B + b];
        e += ge[t * B + b];
      }
      const T s = st[b];
      // The target itself was counted in ">=" (its tile value is s exactly).
      e -= (s >= s);
      const double opt = 1.0 + static_cast<double>(g), pes = 1.0 + static_cast<double>(e);
      ranks[b] = ties == Ties::Optimistic ? opt : ties == Ties::Pessimistic ? pes : 0.5 * (opt + pes);
    }
  }
}

// ---------------------------------------------------------------------------
// topk: bounded min-heaps (root = worst kept) under the order of
// torch.sort(descending=True, stable=True): NaN first, then value descending,
// then lower index first.

template <typename T>
inline bool better(T va, int64_t ia, T vb, int64_t ib) {
  const bool na = va != va, nb = vb != vb;
  if (na || nb) return na && nb ? ia < ib : na;
  if (va != vb) return va > vb;
  return ia < ib;
}

template <typename T>
struct Heap {
  T* v;
  int64_t* i;
  int64_t n = 0, k;
  // Sift the new root down (root = worst).
  void down(int64_t p) {
    for (;;) {
      int64_t l = 2 * p + 1, w = p;
      if (l < n && better(v[w], i[w], v[l], i[l])) w = l;
      if (l + 1 < n && better(v[w], i[w], v[l + 1], i[l + 1])) w = l + 1;
      if (w == p) return;
      std::swap(v[p], v[w]);
      std::swap(i[p], i[w]);
      p = w;
    }
  }
  void up(int64_t p) {
    while (p > 0) {
      const int64_t par = (p - 1) / 2;
      if (!better(v[par], i[par], v[p], i[p])) return;
      std::swap(v[p], v[par]);
      std::swap(i[p], i[par]);
      p = par;
    }
  }
  // Returns true when the root changed.
  bool offer(T x, int64_t id) {
    if (n < k) {
      v[n] = x;
      i[n] = id;
      up(n++);
      return true;
    }
    if (!better(x, id, v[0], i[0])) return false;
    v[0] = x;
    i[0] = id;
    down(0);
    return true;
  }
};

template <typename T>
void topk_impl(const Scorer<T>& sc, const Filter& flt, T* values, int64_t* indices, int64_t k) {
  const int64_t B = sc.B, N = sc.N;
  if (B == 0 || k == 0) return;
  const int64_t nbl = sc.nblocks();
  const bool par = worth_threads(B * N * sc.K);
  const int nt = par ? omp_get_max_threads() : 1;
  const size_t slots = static_cast<size_t>(nt) * static_cast<size_t>(B) * static_cast<size_t>(k);
  std::vector<T> hv(slots);
  std::vector<int64_t> hi(slots), hn(static_cast<size_t>(nt * B), 0);
  const T ninf = -std::numeric_limits<T>::infinity();
  BlockPool<T> pool(par);
  // Merge candidates of one row, per thread: at most nt * k (the per-thread heaps).
  std::vector<std::vector<std::pair<T, int64_t>>> cands(static_cast<size_t>(nt));
  for (auto& c : cands) c.reserve(static_cast<size_t>(nt) * static_cast<size_t>(k));
#pragma omp parallel if (par)
  {
    const int tid = omp_get_thread_num();
    Buffer<T>& C = pool.mine();
    // thr[b]: scores below it cannot enter row b's heap (-inf while not full,
    // so everything, NaN included, takes the slow path).
    T thr[kMB];
#pragma omp for schedule(dynamic, 1)
    for (int64_t jb = 0; jb < nbl; ++jb)
      sc.sweep(jb, C.data(), [&](int64_t b0, int64_t mb, int64_t n0, int64_t nb) {
        const size_t base = (static_cast<size_t>(tid) * B + b0);
        for (int64_t b = 0; b < mb; ++b) {
          const int64_t cnt = hn[base + b];
          thr[b] = cnt < k ? ninf : hv[(base + b) * k];
        }
        for (int64_t b = mb; b < kMB; ++b) thr[b] = std::numeric_limits<T>::infinity();
        for (int64_t n = 0; n < nb; ++n) {
          const T* c = C.data() + n * kMB;
          for (int64_t b = 0; b < mb; ++b) {
            if (c[b] < thr[b]) continue;
            const int64_t id = n0 + n;
            if (flt.has(b0 + b, id)) continue;
            Heap<T> h{hv.data() + (base + b) * k, hi.data() + (base + b) * k, hn[base + b], k};
            if (h.offer(c[b], id)) {
              hn[base + b] = h.n;
              if (h.n == k) thr[b] = h.v[0];
            }
          }
        }
      });
    // Merge the per-thread heaps of each row (into reserved room: no allocation here).
    std::vector<std::pair<T, int64_t>>& cand = cands[static_cast<size_t>(tid)];
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      cand.clear();
      for (int t = 0; t < nt; ++t) {
        const size_t base = static_cast<size_t>(t) * B + b;
        for (int64_t j = 0; j < hn[base]; ++j) cand.emplace_back(hv[base * k + j], hi[base * k + j]);
      }
      const size_t take = std::min<size_t>(cand.size(), static_cast<size_t>(k));
      std::partial_sort(cand.begin(), cand.begin() + take, cand.end(),
                        [](const std::pair<T, int64_t>& a, const std::pair<T, int64_t>& c) {
                          return better(a.first, a.second, c.first, c.second);
                        });
      for (int64_t j = 0; j < k; ++j) {
        if (static_cast<size_t>(j) < take) {
          values[b * k + j] = cand[j].first;
          indices[b * k + j] = cand[j].second;
        } else {  // unreachable when k <= N - (filtered in row b), which the binding checks
          values[b * k + j] = ninf;
          indices[b * k + j] = -1;
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// 1-N cross-entropy. Online logsumexp state per (chunk, row): running max m
// and s = sum exp(S - shift(m)), shift(m) = m for finite m, 0 for +-inf (as
// torch.logsumexp), so an all -inf row gives -inf and +inf gives +inf.

template <typename T>
inline T lse_shift(T m) {
  return std::isinf(m) ? T(0) : m;
}

template <typename T>
void ce_forward_impl(const Scorer<T>& sc, const int64_t* targets, T* loss, T* lse) {
  const int64_t B = sc.B, N = sc.N;
  if (B == 0) return;
  const Chunks ch(sc.nblocks());
  const int64_t nch = ch.nch;
  const T ninf = -std::numeric_limits<T>::infinity();
  std::vector<T> pm(static_cast<size_t>(std::max<int64_t>(nch, 1) * B), ninf),
      ps(static_cast<size_t>(std::max<int64_t>(nch, 1) * B), T(0));
  const bool par = worth_threads(B * N * sc.K);
  BlockPool<T> pool(par);
#pragma omp parallel if (par)
  {
    Buffer<T>& C = pool.mine();
    T mx[kMB], sh[kMB], acc[kMB];
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < nch; ++c) {
      T* m = pm.data() + c * B;
      T* s = ps.data() + c * B;
      for (int64_t jb = ch.begin(c); jb < ch.end(c); ++jb)
        sc.sweep(jb, C.data(), [&](int64_t b0, int64_t mb, int64_t, int64_t nb) {
          for (int64_t b = 0; b < kMB; ++b) mx[b] = ninf;
          for (int64_t n = 0; n < nb; ++n) {
            const T* cr = C.data() + n * kMB;
            for (int64_t b = 0; b < kMB; ++b) mx[b] = cr[b] > mx[b] ? cr[b] : mx[b];
          }
          for (int64_t b = 0; b < mb; ++b) {
            const T old = m[b0 + b];
            const T nm = mx[b] > old ? mx[b] : old;
            sh[b] = lse_shift(nm);
            // Rescale the old sum to the new shift; an empty (0) sum stays 0.
            const T so = s[b0 + b];
            acc[b] = so == T(0) ? T(0) : so * std::exp(lse_shift(old) - sh[b]);
            m[b0 + b] = nm;
          }
          for (int64_t b = mb; b < kMB; ++b) {
            sh[b] = T(0);
            acc[b] = T(0);
          }
          for (int64_t n = 0; n < nb; ++n) {
            T* cr = C.data() + n * kMB;
            for (int64_t b = 0; b < kMB; ++b) cr[b] -= sh[b];
            gemm::exp_inplace(cr, kMB);
            for (int64_t b = 0; b < kMB; ++b) acc[b] += cr[b];
          }
          for (int64_t b = 0; b < mb; ++b) s[b0 + b] = acc[b];
        });
    }
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      T M = ninf;
      for (int64_t c = 0; c < nch; ++c) M = pm[c * B + b] > M ? pm[c * B + b] : M;
      const T shM = lse_shift(M);
      T tot = T(0);
      for (int64_t c = 0; c < nch; ++c) {
        const T sc_ = ps[c * B + b];
        if (sc_ != T(0)) tot += sc_ * std::exp(lse_shift(pm[c * B + b]) - shM);
      }
      const T l = std::log(tot) + shM;
      lse[b] = l;
      loss[b] = l - sc.one(b, targets[b]);
    }
  }
}

template <typename T>
void ce_backward_impl(const Scorer<T>& sc, const T* grad_loss, const int64_t* targets, const T* lse, T* grad_q,
                      T* grad_E, T* grad_bh, T* grad_bt) {
  const int64_t B = sc.B, N = sc.N, K = sc.K;
  const Chunks ch(sc.nblocks());
  const int64_t nch = ch.nch;
  const T* q = sc.q;
  const T* E = sc.E;
  // grad_q partials per chunk (nch x B x K) and row sums of G per chunk.
  Buffer<T> gqp(static_cast<size_t>(std::max<int64_t>(1, nch * B * K)));
  std::vector<T> rsp(static_cast<size_t>(nch * B), T(0));
  std::vector<T> lsep(sc.rows_padded(), T(0)), glp(sc.rows_padded(), T(0));
  for (int64_t b = 0; b < B; ++b) {
    lsep[b] = lse[b];
    glp[b] = grad_loss[b];
  }
  const bool par = worth_threads(B * N * K);
  BlockPool<T> pool(par);
#pragma omp parallel if (par)
  {
#pragma omp for schedule(static)
    for (int64_t c = 0; c < nch; ++c) std::memset(gqp.data() + c * B * K, 0, sizeof(T) * static_cast<size_t>(B * K));
    Buffer<T>& C = pool.mine();
    T colsum[kNB];
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < nch; ++c) {
      T* gq = gqp.data() + c * B * K;
      T* rs = rsp.data() + c * B;
      for (int64_t jb = ch.begin(c); jb < ch.end(c); ++jb) {
        const int64_t n0 = jb * kNB, nb = std::min(kNB, N - n0);
        T* gE = grad_E + n0 * K;
        std::memset(gE, 0, sizeof(T) * static_cast<size_t>(nb * K));
        for (int64_t n = 0; n < nb; ++n) colsum[n] = T(0);
        sc.sweep(jb, C.data(), [&](int64_t b0, int64_t mb, int64_t, int64_t) {
          const T* l = lsep.data() + b0;
          const T* gl = glp.data() + b0;
          for (int64_t n = 0; n < nb; ++n) {
            T* cr = C.data() + n * kMB;
            for (int64_t b = 0; b < kMB; ++b) cr[b] -= l[b];
            gemm::exp_inplace(cr, kMB);
          }
          for (int64_t b = 0; b < mb; ++b) {
            const int64_t t = targets[b0 + b] - n0;
            if (t >= 0 && t < nb) C[t * kMB + b] -= T(1);
          }
          T* r = rs + b0;
          for (int64_t n = 0; n < nb; ++n) {
            T* cr = C.data() + n * kMB;
            for (int64_t b = 0; b < kMB; ++b) cr[b] *= gl[b];
            colsum[n] += gemm::fixed_sum(cr, mb);
            for (int64_t b = 0; b < mb; ++b) r[b] += cr[b];
          }
          // grad_q[b0.., :] += G (mb x nb) . E[n0.., :];  G[b, n] = C[n*MB + b]
          gemm::gemm_ax(mb, nb, K, C.data(), 1, kMB, E + n0 * K, K, gq + b0 * K, K);
          // grad_E[n0.., :] += G^T (nb x mb) . q[b0.., :]
          gemm::gemm_ax(nb, mb, K, C.data(), kMB, 1, q + b0 * K, K, gE, K);
        });
        for (int64_t n = 0; n < nb; ++n) {
          grad_bt[n0 + n] = colsum[n];
          if (sc.dist) {
            // S = 2 q.e - |q|^2 - |e|^2 + biases: d/de = 2 G^T q - 2 e colsum(G)
            T* g = gE + n * K;
            const T* e = E + (n0 + n) * K;
            const T cs2 = T(2) * colsum[n];
            for (int64_t k = 0; k < K; ++k) g[k] = T(2) * g[k] - e[k] * cs2;
          }
        }
      }
    }
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      T* g = grad_q + b * K;
      std::memcpy(g, gqp.data() + b * K, sizeof(T) * static_cast<size_t>(K));
      T rsum = rsp[b];  // nch >= 1: B, N > 0 here
      for (int64_t c = 1; c < nch; ++c) {
        const T* p = gqp.data() + (c * B + b) * K;
        for (int64_t k = 0; k < K; ++k) g[k] += p[k];
        rsum += rsp[c * B + b];
      }
      grad_bh[b] = rsum;
      if (sc.dist) {
        const T* qb = q + b * K;
        const T rs2 = T(2) * rsum;
        for (int64_t k = 0; k < K; ++k) g[k] = T(2) * g[k] - qb[k] * rs2;
      }
    }
  }
}

}  // namespace

// ---------------------------------------------------------------------------
// Public entry points.

template <typename T>
void query_forward(const T* h, const T* r, T* q, int64_t B, int64_t d, Algebra alg, Layout layout, bool normalize) {
  const int a = alg == Algebra::Dihedron, l = layout == Layout::Interleaved;
  if (a == 0 && l == 0) query_forward_impl<T, 0, 0>(h, r, q, B, d, normalize);
  if (a == 0 && l == 1) query_forward_impl<T, 0, 1>(h, r, q, B, d, normalize);
  if (a == 1 && l == 0) query_forward_impl<T, 1, 0>(h, r, q, B, d, normalize);
  if (a == 1 && l == 1) query_forward_impl<T, 1, 1>(h, r, q, B, d, normalize);
}

template <typename T>
void query_backward(const T* grad_q, const T* h, const T* r, T* grad_h, T* grad_r, int64_t B, int64_t d,
                    Algebra alg, Layout layout, bool normalize) {
  const int a = alg == Algebra::Dihedron, l = layout == Layout::Interleaved;
  if (a == 0 && l == 0) query_backward_impl<T, 0, 0>(grad_q, h, r, grad_h, grad_r, B, d, normalize);
  if (a == 0 && l == 1) query_backward_impl<T, 0, 1>(grad_q, h, r, grad_h, grad_r, B, d, normalize);
  if (a == 1 && l == 0) query_backward_impl<T, 1, 0>(grad_q, h, r, grad_h, grad_r, B, d, normalize);
  if (a == 1 && l == 1) query_backward_impl<T, 1, 1>(grad_q, h, r, grad_h, grad_r, B, d, normalize);
}

template <typename T>
void score_forward(const T* q, const T* E, const T* bias_h, const T* bias_t, T* S, int64_t B, int64_t N, int64_t K,
                   Score score) {
  if (B == 0 || N == 0) return;
  Scorer<T> sc(q, E, bias_h, bias_t, B, N, K, score);
  score_impl(sc, S);
}

template <typename T>
void rank(const T* q, const T* E, const T* bias_h, const T* bias_t, const int64_t* targets,
          const int64_t* filter_offsets, const int64_t* filter_index, double* ranks, int64_t B, int64_t N, int64_t K,
          Score score, Ties ties) {
  if (B == 0) return;
  assert(N > 0 && std::all_of(targets, targets + B, [N](int64_t t) { return t >= 0 && t < N; }));
  Scorer<T> sc(q, E, bias_h, bias_t, B, N, K, score);
  Filter flt(filter_offsets, filter_index, B);
  rank_impl(sc, targets, flt, ranks, ties);
}

template <typename T>
void topk(const T* q, const T* E, const T* bias_h, const T* bias_t, const int64_t* filter_offsets,
          const int64_t* filter_index, T* values, int64_t* indices, int64_t B, int64_t N, int64_t K, int64_t k,
          Score score) {
  if (B == 0 || k == 0) return;
  assert(k <= N);
  Scorer<T> sc(q, E, bias_h, bias_t, B, N, K, score);
  Filter flt(filter_offsets, filter_index, B);
  topk_impl(sc, flt, values, indices, k);
}

template <typename T>
void ce_forward(const T* q, const T* E, const T* bias_h, const T* bias_t, const int64_t* targets, T* loss, T* lse,
                int64_t B, int64_t N, int64_t K, Score score) {
  if (B == 0) return;
  Scorer<T> sc(q, E, bias_h, bias_t, B, N, K, score);
  ce_forward_impl(sc, targets, loss, lse);
}

template <typename T>
void ce_backward(const T* grad_loss, const T* q, const T* E, const T* bias_h, const T* bias_t, const int64_t* targets,
                 const T* lse, T* grad_q, T* grad_E, T* grad_bias_h, T* grad_bias_t, int64_t B, int64_t N, int64_t K,
                 Score score) {
  // Outputs always written, also for empty B or N (gradients of nothing are 0).
  std::vector<T> gbh_tmp, gbt_tmp;
  if (!grad_bias_h) {
    gbh_tmp.assign(static_cast<size_t>(B), T(0));
    grad_bias_h = gbh_tmp.data();
  }
  if (!grad_bias_t) {
    gbt_tmp.assign(static_cast<size_t>(N), T(0));
    grad_bias_t = gbt_tmp.data();
  }
  if (B == 0 || N == 0) {
    std::memset(grad_q, 0, sizeof(T) * static_cast<size_t>(B * K));
    std::memset(grad_E, 0, sizeof(T) * static_cast<size_t>(N * K));
    std::memset(grad_bias_h, 0, sizeof(T) * static_cast<size_t>(B));
    std::memset(grad_bias_t, 0, sizeof(T) * static_cast<size_t>(N));
    return;
  }
  Scorer<T> sc(q, E, bias_h, bias_t, B, N, K, score);
  ce_backward_impl(sc, grad_loss, targets, lse, grad_q, grad_E, grad_bias_h, grad_bias_t);
}

int64_t scratch_bytes(Kernel kernel, int64_t B, int64_t N, int64_t K, int64_t k, int64_t nnz, int elem_size) {
  const int64_t es = elem_size, nt = omp_get_max_threads();
  const int64_t Bpad = (B + 15) / 16 * 16;                                     // NR = 16 (fp32) >= 8 (fp64)
  const int64_t rows = (B + kMB - 1) / kMB * kMB;                              // Scorer::rows_padded
  const int64_t nch = std::min<int64_t>((N + kNB - 1) / kNB, kMaxChunks);     // Chunks
  // Scorer (packed queries, |q|^2, |E|^2) and the per-thread blocks (BlockPool)
  int64_t b = sat_sum({sat_mul(sat_mul(Bpad, K), es), sat_mul(Bpad + N, es), sat_mul(nt * kNB * kMB, es)});
  const int64_t filter = sat_mul(sat_sum({B + 1, nnz, nnz}), 8);  // Filter offsets, ids, and one row's copy
  switch (kernel) {
    case Kernel::Score:
      break;
    case Kernel::Rank:  // target scores, per-thread > / >= counts
      b = sat_sum({b, sat_mul(rows, es), sat_mul(sat_mul(2 * nt, B), 8), filter});
      break;
    case Kernel::Topk: {  // per-thread heaps (value, id), their sizes, the merge candidates
      const int64_t slots = sat_mul(sat_mul(nt, B), k);
      b = sat_sum({b, sat_mul(slots, es + 8), sat_mul(nt * B, 8),
                   sat_mul(sat_mul(nt * nt, k), int64_t(sizeof(std::pair<double, int64_t>))), filter});
      break;
    }
    case Kernel::CeForward:  // per-chunk max and sum
      b = sat_sum({b, sat_mul(sat_mul(2 * std::max<int64_t>(nch, 1), B), es)});
      break;
    case Kernel::CeBackward:  // grad_q partials, row sums, padded lse / grad_loss, bias-gradient stand-ins
      b = sat_sum({b, sat_mul(sat_mul(std::max<int64_t>(1, nch * B), K), es), sat_mul(nch * B, es),
                   sat_mul(2 * rows, es), sat_mul(B + N, es)});
      break;
  }
  return b;
}

EMBKERN_HC_INSTANTIATE(float)
EMBKERN_HC_INSTANTIATE(double)

EMBKERN_ISA_END
}  // namespace hc
}  // namespace embkern
