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

namespace embkern {
namespace hc {

enum class Algebra : int { Quaternion = 0, Dihedron = 1 };
enum class Layout : int { Component = 0, Interleaved = 1 };
enum class Score : int { Inner = 0, Distance = 1 };
enum class Ties : int { Realistic = 0, Optimistic = 1, Pessimistic = 2 };

// q = h (x) r_hat, r_hat = r / sqrt(a^2+b^2+c^2+d^2) per coordinate when
// normalize, else r. Both algebras use the Euclidean 4-norm (spec).
template <typename T>
void query_forward(const T* h, const T* r, T* q, int64_t B, int64_t d,
                   Algebra alg, Layout layout, bool normalize);

// Backward of query_forward: grad_h, grad_r (B, D) from grad_q (B, D).
template <typename T>
void query_backward(const T* grad_q, const T* h, const T* r, T* grad_h, T* grad_r,
                    int64_t B, int64_t d, Algebra alg, Layout layout, bool normalize);

// S (B, N) = epilogue(q E^T).
template <typename T>
void score_forward(const T* q, const T* E, const T* bias_h, const T* bias_t, T* S,
                   int64_t B, int64_t N, int64_t K, Score score);

// Filtered rank of targets[b] among all N entities without a B x N buffer.
// filter_offsets (B+1) / filter_index (nnz) is a CSR list of known true tails
// per row (may contain the target; may be null for unfiltered). Filtered
// entities are excluded from the count; the target itself never counts.
// optimistic = 1 + #{s > s_t}, pessimistic = 1 + #{s >= s_t, n != t},
// realistic = mean of the two. ranks: (B,) double.
template <typename T>
void rank(const T* q, const T* E, const T* bias_h, const T* bias_t,
          const int64_t* targets, const int64_t* filter_offsets, const int64_t* filter_index,
          double* ranks, int64_t B, int64_t N, int64_t K, Score score, Ties ties);

// Top-k per row, descending score, ties broken by lower entity index.
// Filtered entities (CSR as in rank, may be null) are skipped.
// values (B, k), indices (B, k). Requires k <= N - (filtered count).
template <typename T>
void topk(const T* q, const T* E, const T* bias_h, const T* bias_t,
          const int64_t* filter_offsets, const int64_t* filter_index,
          T* values, int64_t* indices, int64_t B, int64_t N, int64_t K, int64_t k, Score score);

// 1-N cross entropy, online logsumexp over N:
//   loss[b] = logsumexp_n S[b,n] - S[b, targets[b]];   lse[b] saved for backward.
template <typename T>
void ce_forward(const T* q, const T* E, const T* bias_h, const T* bias_t, const int64_t* targets,
                T* loss, T* lse, int64_t B, int64_t N, int64_t K, Score score);

// Backward: G[b,n] = grad_loss[b] * (exp(S[b,n] - lse[b]) - [n == targets[b]]), recomputed
// tile by tile. grad_q (B,K), grad_E (N,K) always; grad_bias_h (B,), grad_bias_t (N,)
// when non-null (distance score).
template <typename T>
void ce_backward(const T* grad_loss, const T* q, const T* E, const T* bias_h, const T* bias_t,
                 const int64_t* targets, const T* lse, T* grad_q, T* grad_E,
                 T* grad_bias_h, T* grad_bias_t, int64_t B, int64_t N, int64_t K, Score score);

}  // namespace hc
}  // namespace embkern
