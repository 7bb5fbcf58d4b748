// CPU kernel of bit-cipher co-occurrence counting (docs/ops/bit_cipher.md,
// "Kernel view").
//
// Work split (run() below): the threads form groups, each counting a
// contiguous range of the chunk's positions into its own copy of A (A itself
// or one of the caller's `parts`, summed by fold()); within a group, row t of
// the copy belongs to one thread (deal() below), which walks the group's range
// and does the scatter-adds of the positions whose target it owns. So no
// element is written by two threads. The sums are unsigned 128-bit
// integers of quanta 2^-62 (the tables are quantised once in Python): integer
// addition is associative, so every thread count, ISA level, chunking and
// merge order gives the same bits. Rows are dealt by the cipher's counts (longest
// processing time first), which balances the tokens of a Zipf corpus.
//
// Per owned position: n_off offsets x (popcount(c) + 1) 128-bit adds (add +
// add-with-carry on the two 64-bit words) into the one row A[t] (b + 2
// accumulators of 16 bytes a block: the pad entry, the b bits, and the q
// weight beside them, so that two threads never share the cache line of a
// row's scalar); interior positions (the whole window inside the document)
// skip the bounds test. The code is scalar: the adds go to popcount(c) <= 3
// scattered entries (b = 64, V = 50k), nothing to vectorise, and the same
// scalar additions at every ISA level.
//
// Where the time goes (b = 64, sum, V = 50k Zipf, one core): the adds
// themselves run at ~27M positions/s when A fits in L2 (V = 2000); at V = 50k
// A is 52 MB and the cost is cache misses, on A's rows and on the tables. So
// (1) each call first lays the tables out as one record per word (Record
// below: its bit entries, then the (wa, ws) pair of every offset), so a
// context word costs one or two cache lines instead of a miss in each of
// bit_offsets, bit_index, wa[o] and ws[o] (~4.5 MB apart); 6.4 -> 8.1M
// positions/s. (2) The row of the position kPrefetch owned positions ahead is
// prefetched whole when the row is small next to the entries it will touch;
// 8.1 -> 9.2M. The record pass is V x R words (~1 ms at V = 50k), split
// across the threads. (3) Not only misses: the loop over a context word's
// popcount(c) entries mispredicted its exit about every other word; a fixed
// number of branch-free slots (branch_free_slots()) took one thread on an
// Intel Xeon from 7.9 to 11.9M positions/s (V = 2000: 12.7 -> 17.6M). None of
// the three changes a single addition.
#include "embkern/bit_cipher.h"

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

namespace embkern {
namespace bit_cipher {
EMBKERN_ISA_BEGIN
namespace {

// One record of R uint64 words per word w, built at the start of each call
// from the CSR code and the (n_off, V) tables:
//   words [0, nbw): 32-bit halves (low half first): n = popcount(w), then the
//                   n entry offsets 2 (1 + bit) (uint64 units from a block's start),
//                   then up to the largest popcount, offset 0 (the pad entry: the
//                   branch-free slots past n add 0 there, see position())
//   words [nbw + 2o, nbw + 2o + 2): wa[o][w], ws[o][w] (0 without noise)
struct Ctx {
  const int32_t* tok;
  const uint64_t* rec;
  const uint64_t* wpad;
  const int64_t* deltas;
  int64_t n_off, V, E;  // E = b + 2: the entries of one block of a row
  int64_t nbw, R;       // record: header words, stride
  int64_t F;            // entry slots added branch-free (see position())
  bool prefetch_row;    // prefetch a target row whole (see count())
};

// The 32-bit halves of the record header: bytes [4k, 4k + 4) of the record,
// through memcpy (one 32-bit load; a uint32_t* into the uint64_t buffer would
// break strict aliasing). The shifts it replaced were 12% of the instructions
// at b = 64; paired runs, same bits, one thread, V = 50k: sum at b = 768 +9%
// (where the entries are prefetched one by one), concat b = 64 +4%.
inline uint32_t half(const uint64_t* r, int64_t k) {
  uint32_t v;
  std::memcpy(&v, reinterpret_cast<const unsigned char*>(r) + 4 * k, 4);
  return v;
}
inline void set_half(uint64_t* r, int64_t k, uint32_t v) {
  std::memcpy(reinterpret_cast<unsigned char*>(r) + 4 * k, &v, 4);
}

constexpr int64_t kPrefetch = 4;   // owned positions ahead: 2..16 measure the same (+-3%)
constexpr int64_t kRecAhead = 8;  // owned positions ahead for a context record

// e[0..1] (lo, hi) += x as one unsigned 128-bit integer: add, then add the
// carry (add + adc to memory). A branch on the carry instead is 2x slower at
// b = 64: weights near 1 are ~2^61 quanta, so the low word wraps every few
// adds and the branch mispredicts.
inline void add(uint64_t* __restrict e, uint64_t x) {
  uint64_t s;
  e[1] += __builtin_add_overflow(e[0], x, &s);
  e[0] = s;
}

// e += v, v a 128-bit sum kept in registers.
inline void add(uint64_t* __restrict e, unsigned __int128 v) {
  unsigned __int128 t = (static_cast<unsigned __int128>(e[1]) << 64) | e[0];
  t += v;
  e[0] = static_cast<uint64_t>(t);
  e[1] = static_cast<uint64_t>(t >> 64);
}

// The adds of position i (document [lo, hi)) into row `row` of A. In sum
// mode every offset adds to the same pad and q entries: those sums are kept
// in registers over the offsets and added once (2 memory adds a position
// instead of up to 2 n_off; exact either way, integers).
//
// The sizes and pointers are copied into locals and the row is __restrict: A
// is uint64_t, which may alias the int64_t tables (deltas, offsets, sizes),
// so without them every 128-bit add forces those to be reloaded (~25% of the
// b = 64 time).
template <bool kInterior, bool kNoise, bool kConcat>
inline void position(const Ctx& c, int64_t i, int64_t lo, int64_t hi, uint64_t* __restrict row) {
  const int64_t E = c.E, n_off = c.n_off, q_at = 2 * (E - 1), nbw = c.nbw, R = c.R, F = c.F;
  const int32_t* __restrict tok = c.tok;
  const uint64_t* __restrict rec = c.rec;
  const uint64_t* __restrict wpad = c.wpad;
  const int64_t* __restrict deltas = c.deltas;
  unsigned __int128 pad = 0, q = 0;  // sum mode: <= n_off * 2^62 each
  for (int64_t o = 0; o < n_off; ++o) {
    const int64_t j = i + deltas[o];
    uint64_t* __restrict blk = kConcat ? row + 2 * o * E : row;
    if (!kInterior && (j < lo || j >= hi)) {
      if (kConcat)
        add(blk, wpad[o]);
      else
        pad += wpad[o];
      continue;
    }
    const uint64_t* __restrict r = rec + int64_t(tok[j]) * R;
    const uint64_t a = r[nbw + 2 * o];
    const int64_t n = half(r, 0);
    for (int64_t k = 1; k <= F; ++k) add(blk + half(r, k), a & (uint64_t(0) - uint64_t(k <= n)));
    for (int64_t k = F + 1; k <= n; ++k) add(blk + half(r, k), a);
    if (kNoise) {
      if (kConcat)
        add(blk + q_at, r[nbw + 2 * o + 1]);
      else
        q += r[nbw + 2 * o + 1];
    }
  }
  if (!kConcat) {
    if (!kInterior && pad != 0) add(row, pad);
    if (kNoise) add(row + q_at, q);
  }
}

// The entry slots a context word adds branch-free (position()): the first F
// slots of its record always, the ones past its popcount n adding 0 (a & 0),
// then a loop over slots F + 1 .. n. A loop over exactly n slots mispredicts
// its exit whenever the next context word's popcount differs, which in a Zipf
// corpus is about every other word (b = 64, V = 50k, by tokens: popcount 1
// 55%, 2 27%, 3 17%). F is the smallest count of slots past which at most a
// fifth of the tokens' words go (by the cipher's counts). Paired runs, one
// thread, same bits, 2M Zipf(1.1) tokens against the exact-n loop:
//   b = 64 sum, V = 50k   F = 2: 1.50x (F = 3 1.44x, F = 4 1.21x, F = 1 0.98x)
//   b = 64 sum, V = 2000  F = 2: 1.42x
//   b = 64 concat, V = 50k F = 2: 1.46x (F = 3 1.62x)
//   b = 768 sum, V = 50k  F = 2 (= the largest popcount): 1.23x
//   b = 15 sum, V = 28k   F = 4: 1.43x (F = 3 1.24x, F = 6 1.21x, F = 10 0.76x)
//   b = 15 concat, V = 28k F = 4: 1.41x
// Which slots go branch-free changes no sum: the masked adds add 0.
int64_t branch_free_slots(const int64_t* boff, const int64_t* load, int64_t V, int64_t max_pc) {
  std::vector<double> tail(max_pc + 2, 0.0);  // tail[f]: tokens of words with popcount >= f
  for (int64_t w = 0; w < V; ++w) tail[boff[w + 1] - boff[w]] += static_cast<double>(load[w]);
  for (int64_t f = max_pc; f > 0; --f) tail[f - 1] += tail[f];
  for (int64_t f = 1; f <= max_pc; ++f)
    if (tail[f + 1] <= 0.2 * tail[0]) return f;
  return max_pc;
}

// Words w in [w0, w1) of the records (see Ctx).
void build_records(const int64_t* boff, const int32_t* bidx, const uint64_t* wa, const uint64_t* ws,
                   int64_t n_off, int64_t V, int64_t nbw, int64_t R, int64_t w0, int64_t w1, uint64_t* rec) {
  for (int64_t w = w0; w < w1; ++w) {
    uint64_t* r = rec + w * R;
    for (int64_t k = 0; k < nbw; ++k) r[k] = 0;
    set_half(r, 0, static_cast<uint32_t>(boff[w + 1] - boff[w]));
    for (int64_t k = boff[w]; k < boff[w + 1]; ++k)
      set_half(r, 1 + k - boff[w], static_cast<uint32_t>(2 * (1 + int64_t(bidx[k]))));
    // slots past n keep offset 0, the block's pad entry, where their adds of 0 go. Not a copy of the
    // first offset: adding 0 there chains a second read-modify-write onto the word's own entry
    // (paired runs, one thread, b = 64 sum V = 50k: the pad entry 8/8 pairs faster, +2-4%).
    for (int64_t o = 0; o < n_off; ++o) {
      r[nbw + 2 * o] = wa[o * V + w];
      r[nbw + 2 * o + 1] = ws ? ws[o * V + w] : 0;
    }
  }
}

// Rows dealt to T threads by the longest-processing-time rule on `load`
// (the cipher's counts: a type's share of the work), in groups of g adjacent
// rows whose bytes are a whole number of 64-byte lines (g = 2 at b = 64: a
// row is 1056 bytes, 16.5 lines), so two threads never write one cache line
// (A comes from torch's allocator, 64-byte aligned). Dealing single rows put
// the two heaviest types, ids 0 and 1 of a Zipf corpus, on two threads that
// shared the line between their rows: +7% at 2 threads (V = 2000) once gone.
// For the 256 T heaviest groups: heaviest first, each to the least loaded
// thread, ties to the lower thread and the lower group. The rest follow in
// order, by the same rule; each weighs at most what the 256 T-th heaviest
// does, so they cannot unbalance the threads by more than that (Zipf(1.1),
// V = 50k, 2 threads: max/min load 1.0005 against 1.0000 for a full sort).
// With a Zipf corpus dealing by t mod T leaves the thread of the most
// frequent type ~10% more tokens (a = 1.1). This runs on one thread every
// call, before the counting: selecting the heavy groups (nth_element) instead
// of sorting all takes 0.6 ms instead of 3.1 ms at V = 50k. Which thread owns
// a row changes no result (integer sums).
void deal(const int64_t* load, int64_t V, int64_t g, int T, std::vector<uint16_t>& owner) {
  owner.assign(static_cast<size_t>(V), 0);
  if (T <= 1 || V == 0) return;
  const int64_t G = (V + g - 1) / g;
  std::vector<int64_t> gload(static_cast<size_t>(G), 0);
  for (int64_t t = 0; t < V; ++t) gload[t / g] += load[t] + 1;  // + 1: types of count 0 still spread
  auto heavier = [&](int64_t a, int64_t b) { return gload[a] != gload[b] ? gload[a] > gload[b] : a < b; };
  const int64_t K = std::min<int64_t>(G, 256 * int64_t(T));
  std::vector<int64_t> order(static_cast<size_t>(G));
  for (int64_t k = 0; k < G; ++k) order[k] = k;
  // a strict total order: the K heaviest are one set whatever nth_element's pivots
  std::nth_element(order.begin(), order.begin() + (K - 1), order.end(), heavier);
  std::sort(order.begin(), order.begin() + K, heavier);
  std::vector<char> heavy(static_cast<size_t>(G), 0);
  for (int64_t k = 0; k < K; ++k) heavy[order[k]] = 1;
  int64_t n = K;
  for (int64_t k = 0; k < G; ++k)
    if (!heavy[k]) order[n++] = k;
  std::vector<int64_t> sum(static_cast<size_t>(T), 0);
  std::vector<uint16_t> gowner(static_cast<size_t>(G));
  for (int64_t k : order) {
    int best = 0;
    for (int u = 1; u < T; ++u)
      if (sum[u] < sum[best]) best = u;
    gowner[k] = static_cast<uint16_t>(best);
    sum[best] += gload[k];
  }
  for (int64_t t = 0; t < V; ++t) owner[t] = gowner[t / g];
}

// The positions [p0, p1) of the chunk whose target this thread counts: all of
// them (own == nullptr), or those whose row `own` deals to thread `me` of the
// group. Into A (rows of nb blocks).
template <bool kNoise, bool kConcat>
void walk(const Ctx& c, const int64_t* doc_offsets, int64_t n_docs, int64_t lo_delta, int64_t hi_delta, int64_t p0,
          int64_t p1, const uint16_t* own, int me, uint64_t* A) {
  const int64_t nb = kConcat ? c.n_off : 1;  // rows are nb * E accumulators of two words
  // Positions this thread owns, gathered branch-free a block at a time: a
  // test-and-skip per token mispredicts about half the time with 2 threads
  // (~15 cycles of the ~100 a position costs). kBlock positions (32 KB) keep
  // the scratch independent of the chunk length.
  constexpr int64_t kBlock = 4096;
  int64_t mine[kBlock];
  // the document holding p0: the last d with doc_offsets[d] <= p0
  int64_t d = std::upper_bound(doc_offsets, doc_offsets + n_docs + 1, p0) - doc_offsets - 1;
  for (d = std::max<int64_t>(d, 0); d < n_docs && doc_offsets[d] < p1; ++d) {
    const int64_t lo = doc_offsets[d], hi = doc_offsets[d + 1];
    // interior: lo <= i + lo_delta and i + hi_delta < hi
    const int64_t in_lo = std::min(hi, lo - lo_delta), in_hi = std::max(in_lo, hi - hi_delta);
    const int64_t s0 = std::max(lo, p0), s1 = std::min(hi, p1);
    for (int64_t b0 = s0; b0 < s1; b0 += kBlock) {
      const int64_t b1 = std::min(s1, b0 + kBlock);
      int64_t n = 0;
      if (!own) {
        for (int64_t i = b0; i < b1; ++i) mine[n++] = i;
      } else {
        for (int64_t i = b0; i < b1; ++i) {
          mine[n] = i;
          n += own[c.tok[i]] == me;
        }
      }
      for (int64_t k = 0; k < n; ++k) {
        const int64_t i = mine[k];
        if (c.prefetch_row && k + kPrefetch < n) {
          const uint64_t* ahead = A + 2 * int64_t(c.tok[mine[k + kPrefetch]]) * nb * c.E;
          // Four lines an iteration: the one-line loop (17 trips at b = 64)
          // was 13% of all instructions. Paired runs, same bits, b = 64 sum:
          // one thread V = 2000 +24%, V = 50k +10%; 2 threads V = 50k +10%.
          const int64_t words = 2 * nb * c.E;
          int64_t e = 0;
          for (; e + 32 <= words; e += 32) {
            __builtin_prefetch(ahead + e, 1, 3);
            __builtin_prefetch(ahead + e + 8, 1, 3);
            __builtin_prefetch(ahead + e + 16, 1, 3);
            __builtin_prefetch(ahead + e + 24, 1, 3);
          }
          for (; e < words; e += 8) __builtin_prefetch(ahead + e, 1, 3);
        }
        if (k + kRecAhead < n) {
          // The record of the word that enters the window kRecAhead owned
          // positions ahead: it is the one record a position reads that the
          // position before did not (V = 50k: 9.6 MB of records, a miss to
          // L3 or memory). Zipf(1.1) over 50k types, b = 64 sum: 9.1 ->
          // 10.8M positions/s at 1 thread, 17.0 -> 19.2M at 2; concat
          // +10-15%. Prefetching every word that enters between two owned
          // positions (about 2 at 2 threads) measured no better.
          const int64_t j = std::min(hi - 1, mine[k + kRecAhead] + hi_delta);
          const uint64_t* r = c.rec + int64_t(c.tok[j]) * c.R;
          for (int64_t e = 0; e < c.R; e += 8) __builtin_prefetch(r + e, 0, 3);
        }
        if (!c.prefetch_row && k + kPrefetch < n) {
          // Where the whole row is too many lines to prefetch (concat: 11
          // blocks, 182 lines at b = 64; sum at b = 768: 193 lines), fetch
          // the ~n_off (popcount + 1) entries the position kPrefetch owned
          // positions ahead adds to: per offset the context word's bits (its
          // record was prefetched kRecAhead - kPrefetch positions earlier)
          // and the q weight, or the pad entry outside the document. Paired,
          // 2 threads, same bits: head500 concat b = 64 49 -> 31 ms, sum
          // b = 768 40 -> 29 ms, concat b = 768 65 -> 36 ms; Zipf V = 50k
          // concat b = 64 104 -> 103 ms (1 thread 194 -> 178), sum b = 768
          // 73-92 -> 68-71 ms. For sum at b = 64 the whole row (17 lines) is
          // better: this costs 1.7x there.
          const int64_t ia = mine[k + kPrefetch];
          uint64_t* ra = A + 2 * int64_t(c.tok[ia]) * nb * c.E;
          for (int64_t o = 0; o < c.n_off; ++o) {
            uint64_t* blk = kConcat ? ra + 2 * o * c.E : ra;
            const int64_t j = ia + c.deltas[o];
            if (j < lo || j >= hi) {
              __builtin_prefetch(blk, 1, 3);
              continue;
            }
            const uint64_t* r = c.rec + int64_t(c.tok[j]) * c.R;
            for (int64_t q = 1; q <= c.F; ++q) __builtin_prefetch(blk + half(r, q), 1, 3);
            for (int64_t q = c.F + 1, m = half(r, 0); q <= m; ++q) __builtin_prefetch(blk + half(r, q), 1, 3);
            if (kNoise) __builtin_prefetch(blk + 2 * (c.E - 1), 1, 3);
          }
        }
        uint64_t* row = A + 2 * int64_t(c.tok[i]) * nb * c.E;
        if (i >= in_lo && i < in_hi)
          position<true, kNoise, kConcat>(c, i, lo, hi, row);
        else
          position<false, kNoise, kConcat>(c, i, lo, hi, row);
      }
    }
  }
}

// Threads and copies (P = min(n_parts + 1, T) groups): group g is threads
// [ceil(g T / P), ceil((g + 1) T / P)); it counts the positions
// [N g / P, N (g + 1) / P) of the chunk into copy g (A, then the parts), its
// threads dealing that copy's rows among themselves (deal()). P = 1 is the
// row split alone, P = T the position split alone. Why copies: with the rows
// dealt, every thread still gathers the whole chunk and its positions are
// scattered through it; counting half of the positions of a 2M-token chunk
// (V = 50k, b = 64, sum) that way takes 217 ms against 370 ms for all of
// them on one thread (1.71x), a contiguous half 187 ms (1.97x). The copies
// are summed by fold() when the counts are read; which copy a position went
// to changes no bit (integer sums).
template <bool kNoise, bool kConcat>
void run(const Ctx& c, const int64_t* doc_offsets, int64_t n_docs, int64_t lo_delta, int64_t hi_delta,
         const int64_t* load, const int64_t* boff, const int32_t* bidx, const uint64_t* wa, const uint64_t* ws,
         uint64_t* rec, uint64_t* A, uint64_t* parts, int64_t n_parts) {
  const int64_t nb = kConcat ? c.n_off : 1;
  const int64_t words = 2 * c.V * nb * c.E;  // of one copy
  const int64_t p_begin = doc_offsets[0], N = doc_offsets[n_docs] - p_begin;
  std::vector<uint16_t> owner[2];  // for groups of T / P and T / P + 1 threads
  const int max_threads = std::min(omp_get_max_threads(), 65535);
#pragma omp parallel num_threads(max_threads)
  {
    const int me = omp_get_thread_num(), T = omp_get_num_threads();
    const int P = static_cast<int>(std::min<int64_t>(n_parts + 1, T));
    const int g = static_cast<int>(int64_t(me) * P / T);
    const int first = static_cast<int>((int64_t(g) * T + P - 1) / P);
    const int size = static_cast<int>(((int64_t(g) + 1) * T + P - 1) / P) - first;
    if (me == 0) {
      int64_t rows = 1;  // rows a group: 16 nb E bytes a row, groups of whole 64-byte lines
      while ((rows * 16 * nb * c.E) % 64 != 0) ++rows;
      for (int k = 0; k < 2; ++k)
        if (T / P + k > 1) deal(load, c.V, rows, T / P + k, owner[k]);
    }
    build_records(boff, bidx, wa, ws, c.n_off, c.V, c.nbw, c.R, c.V * me / T, c.V * (me + 1) / T, rec);
#pragma omp barrier
    // (thread 0 and a barrier rather than `omp single`: _C forwards only the
    // OpenMP entry points listed in csrc/omp_runtime.cpp)
    const uint16_t* own = size > 1 ? owner[size - T / P].data() : nullptr;
    uint64_t* copy = g == 0 ? A : parts + (g - 1) * words;
    walk<kNoise, kConcat>(c, doc_offsets, n_docs, lo_delta, hi_delta, p_begin + N * g / P,
                          p_begin + N * (g + 1) / P, own, me - first, copy);
  }
}

}  // namespace

void count(const int32_t* tokens, int64_t n_tokens, const int64_t* doc_offsets, int64_t n_docs,
           const int64_t* bit_offsets, const int32_t* bit_index, const uint64_t* wa, const uint64_t* ws,
           const uint64_t* wpad, const int64_t* deltas, int64_t n_off, bool concat, int64_t V, int64_t bits,
           const int64_t* load, uint64_t* A, uint64_t* parts, int64_t n_parts) {
  if (n_tokens == 0 || n_off == 0) return;
  int64_t max_pc = 0;
  for (int64_t w = 0; w < V; ++w) max_pc = std::max(max_pc, bit_offsets[w + 1] - bit_offsets[w]);
  const int64_t nbw = (max_pc + 2) / 2, R = nbw + 2 * n_off;
  // Whole-row prefetch pays in sum mode when the row's lines are few next to the
  // entries a position touches (n_off (max_pc + 1)): b = 64 (17 lines, 44
  // touches) 8.1 -> 9.2M/s; at b = 768 (193 lines, 33 touches) it costs
  // 7.6 -> 4.8M/s. In concat mode (a row of n_off blocks: 182 lines at b = 64)
  // the whole row costs 4.6 -> 3.8M/s, and a block or the pad/q lines of each
  // block gain < 4%, within noise: no prefetch.
  const int64_t row_lines = ((bits + 2) * 16 + 63) / 64;
  const bool prefetch_row = !concat && row_lines <= 5 * n_off * (max_pc + 1);
  std::unique_ptr<uint64_t[]> rec(new uint64_t[static_cast<size_t>(V * R)]);  // filled by the threads
  Ctx c{tokens, rec.get(), wpad, deltas, n_off, V, bits + 2, nbw, R, branch_free_slots(bit_offsets, load, V, max_pc),
        prefetch_row};
  int64_t lo_delta = 0, hi_delta = 0;
  for (int64_t o = 0; o < n_off; ++o) {
    lo_delta = std::min(lo_delta, deltas[o]);
    hi_delta = std::max(hi_delta, deltas[o]);
  }
  const bool noise = ws != nullptr;
  if (noise && concat)
    run<true, true>(c, doc_offsets, n_docs, lo_delta, hi_delta, load, bit_offsets, bit_index, wa, ws, rec.get(), A, parts, n_parts);
  else if (noise)
    run<true, false>(c, doc_offsets, n_docs, lo_delta, hi_delta, load, bit_offsets, bit_index, wa, ws, rec.get(), A, parts, n_parts);
  else if (concat)
    run<false, true>(c, doc_offsets, n_docs, lo_delta, hi_delta, load, bit_offsets, bit_index, wa, ws, rec.get(), A, parts, n_parts);
  else
    run<false, false>(c, doc_offsets, n_docs, lo_delta, hi_delta, load, bit_offsets, bit_index, wa, ws, rec.get(), A, parts, n_parts);
}

void fold(uint64_t* A, uint64_t* parts, int64_t n_parts, int64_t n) {
  if (n_parts <= 0 || n <= 0) return;
  // Memory-bound (52.8 MB a copy at V = 50k, b = 64, sum); each thread its
  // own range of entries. Integer sums: the order of the copies changes nothing.
  const int max_threads = std::min(omp_get_max_threads(), 65535);
#pragma omp parallel num_threads(max_threads)
  {
    const int me = omp_get_thread_num(), T = omp_get_num_threads();
    const int64_t e0 = n * me / T, e1 = n * (me + 1) / T;
    for (int64_t k = 0; k < n_parts; ++k) {
      uint64_t* p = parts + 2 * n * k;
      for (int64_t e = e0; e < e1; ++e) {
        add(A + 2 * e, (static_cast<unsigned __int128>(p[2 * e + 1]) << 64) | p[2 * e]);
        p[2 * e] = p[2 * e + 1] = 0;
      }
    }
  }
}

void to_double(const uint64_t* A, int64_t n, double* out) {
  // GCC/Clang's unsigned __int128 -> double conversion rounds once to nearest
  // (ties to even); * 2^-62 is exact (the result is 0 or >= 2^-62, normal).
  // Serial: ~2 ns an element, once per vectors() call.
  for (int64_t k = 0; k < n; ++k) {
    const unsigned __int128 v = (static_cast<unsigned __int128>(A[2 * k + 1]) << 64) | A[2 * k];
    out[k] = static_cast<double>(v) * 0x1p-62;
  }
}

EMBKERN_ISA_END
}  // namespace bit_cipher
}  // namespace embkern
