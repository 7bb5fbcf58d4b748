// CPU kernel of bit-cipher co-occurrence counting (docs/ops/bit_cipher.md,
// "Kernel view").
//
// Work split: row t of S and Q belongs to thread t mod T. Every thread walks
// the whole chunk (reading 4 bytes a token, ~1% of the work of a token it
// owns) and does the scatter-adds of the positions whose target it owns. So
// no element is written by two threads, and each element sees its addends in
// corpus order whatever T is: the float64 sums are the same bits for every
// thread count, and a corpus counted in consecutive chunks gives the same
// bits as one call. Dealing rows by t mod T (rather than in ranges) spreads
// the few very frequent types of a Zipf corpus over the threads.
//
// Per owned position: n_off offsets x (popcount(c) + 1) adds into the one
// row S[t] (b + 1 doubles a block), which stays in L1 for the position;
// interior positions (the whole window inside the document) skip the
// bounds test. The code is scalar: the adds go to popcount(c) <= 3 scattered
// entries (b = 64, V = 50k), nothing to vectorise, and the same scalar
// additions at every ISA level.
#include "embkern/bit_cipher.h"

#include <omp.h>

#include <algorithm>
#include <cstdint>

namespace embkern {
namespace bit_cipher {
EMBKERN_ISA_BEGIN
namespace {

struct Ctx {
  const int32_t* tok;
  const int64_t* boff;
  const int32_t* bidx;
  const double* wa;
  const double* ws;
  const double* wpad;
  const int64_t* deltas;
  int64_t n_off, V, D;
  bool concat;
};

// The adds of position i (document [lo, hi)) into row `srow` / `qrow`.
template <bool kInterior, bool kNoise>
inline void position(const Ctx& c, int64_t i, int64_t lo, int64_t hi, double* srow, double* qrow) {
  for (int64_t o = 0; o < c.n_off; ++o) {
    const int64_t j = i + c.deltas[o];
    double* blk = c.concat ? srow + o * c.D : srow;
    if (!kInterior && (j < lo || j >= hi)) {
      blk[0] += c.wpad[o];
      continue;
    }
    const int64_t w = c.tok[j];
    const double a = c.wa[o * c.V + w];
    for (int64_t k = c.boff[w], e = c.boff[w + 1]; k < e; ++k) blk[1 + c.bidx[k]] += a;
    if (kNoise) (c.concat ? qrow[o] : qrow[0]) += c.ws[o * c.V + w];
  }
}

template <bool kNoise>
void run(const Ctx& c, const int64_t* doc_offsets, int64_t n_docs, int64_t lo_delta, int64_t hi_delta, double* S,
         double* Q) {
  const int64_t nb = c.concat ? c.n_off : 1;
#pragma omp parallel
  {
    const int64_t T = omp_get_num_threads();
    const int64_t me = omp_get_thread_num();
    for (int64_t d = 0; d < n_docs; ++d) {
      const int64_t lo = doc_offsets[d], hi = doc_offsets[d + 1];
      // interior: lo <= i + lo_delta and i + hi_delta < hi
      const int64_t in_lo = std::min(hi, lo - lo_delta), in_hi = std::max(in_lo, hi - hi_delta);
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t t = c.tok[i];
        if (t % T != me) continue;
        double* srow = S + t * nb * c.D;
        double* qrow = kNoise ? Q + t * nb : nullptr;
        if (i >= in_lo && i < in_hi)
          position<true, kNoise>(c, i, lo, hi, srow, qrow);
        else
          position<false, kNoise>(c, i, lo, hi, srow, qrow);
      }
    }
  }
}

}  // namespace

void count(const int32_t* tokens, int64_t n_tokens, const int64_t* doc_offsets, int64_t n_docs,
           const int64_t* bit_offsets, const int32_t* bit_index, const double* wa, const double* ws,
           const double* wpad, const int64_t* deltas, int64_t n_off, bool concat, int64_t V, int64_t bits, double* S,
           double* Q) {
  if (n_tokens == 0 || n_off == 0) return;
  Ctx c{tokens, bit_offsets, bit_index, wa, ws, wpad, deltas, n_off, V, bits + 1, concat};
  int64_t lo_delta = 0, hi_delta = 0;
  for (int64_t o = 0; o < n_off; ++o) {
    lo_delta = std::min(lo_delta, deltas[o]);
    hi_delta = std::max(hi_delta, deltas[o]);
  }
  if (ws != nullptr && Q != nullptr)
    run<true>(c, doc_offsets, n_docs, lo_delta, hi_delta, S, Q);
  else
    run<false>(c, doc_offsets, n_docs, lo_delta, hi_delta, S, Q);
}

EMBKERN_ISA_END
}  // namespace bit_cipher
}  // namespace embkern
