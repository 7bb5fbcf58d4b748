// Hypercomplex (quaternion / dihedron) KG scoring kernels. Torch-free: raw
// pointers to C-contiguous row-major buffers, sizes as int64_t.
//
// Shapes (D = 4d reals per entity, stored component-major [a|b|c|d] or
// interleaved (d, 4) per `layout`):
//   h, r, q:   (B, D)        head, relation, query q = h (x) r_hat
//   E:         (N, D)        entity table
//   bias_h:    (B,)  or null (distance score only)
//   bias_t:    (N,)  or null (distance score only)
//   S:         (B, N)        scores
// Scores: inner    S[b,n] = <q_b, E_n>
//         distance S[b,n] = bias_h[b] + bias_t[n] - (|q_b|^2 + |E_n|^2 - 2 <q_b, E_n>)
// Every S[b,n] the score/rank/topk/loss kernels compute is produced by the
// same blocked GEMM with a fixed k-order, so a fused kernel sees exactly the
// value the materialised score matrix holds. Work is partitioned by output
// ownership, never by float atomics: results do not depend on thread count.
#pragma once
#include <cstdint>

#include "embkern/cpu_isa.h"

namespace embkern {
namespace hc {

enum class Algebra : int { Quaternion = 0, Dihedron = 1 };
enum class Layout : int { Component = 0, Interleaved = 1 };
enum class Score : int { Inner = 0, Distance = 1 };
enum class Ties : int { Realistic = 0, Optimistic = 1, Pessimistic = 2 };
// The scoring kernels, for scratch_bytes().
enum class Kernel : int { Score = 0, Rank = 1, Topk = 2, CeForward = 3, CeBackward = 4 };

EMBKERN_ISA_BEGIN
#include "embkern/hypercomplex_api.inc"
EMBKERN_ISA_END

// Explicit instantiations of the templates above, for float and double: one
// list for the kernels (per level) and the dispatcher.
#define EMBKERN_HC_INSTANTIATE(T)                                                                                   \
  template void query_forward<T>(const T*, const T*, T*, int64_t, int64_t, Algebra, Layout, bool);                 \
  template void query_backward<T>(const T*, const T*, const T*, T*, T*, int64_t, int64_t, Algebra, Layout, bool);  \
  template void score_forward<T>(const T*, const T*, const T*, const T*, T*, int64_t, int64_t, int64_t, Score);    \
  template void rank<T>(const T*, const T*, const T*, const T*, const int64_t*, const int64_t*, const int64_t*,    \
                        double*, int64_t, int64_t, int64_t, Score, Ties);                                         \
  template void topk<T>(const T*, const T*, const T*, const T*, const int64_t*, const int64_t*, T*, int64_t*,      \
                        int64_t, int64_t, int64_t, int64_t, Score);                                                \
  template void ce_forward<T>(const T*, const T*, const T*, const T*, const int64_t*, T*, T*, int64_t, int64_t,    \
                              int64_t, Score);                                                                     \
  template void ce_backward<T>(const T*, const T*, const T*, const T*, const T*, const int64_t*, const T*, T*, T*, \
                               T*, T*, int64_t, int64_t, int64_t, Score);

}  // namespace hc
}  // namespace embkern
