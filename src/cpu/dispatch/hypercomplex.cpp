// embkern::hc entry points: forward to the active ISA level's kernels
// (src/cpu/hypercomplex.cpp, compiled once per level; see embkern/cpu_isa.h).
#include "embkern/hypercomplex.h"

namespace embkern {
namespace hc {
#define EMBKERN_API_INC "embkern/hypercomplex_api.inc"
#include "embkern/isa_levels.inc"

template <typename T>
void query_forward(const T* h, const T* r, T* q, int64_t B, int64_t d, Algebra alg, Layout layout, bool normalize) {
  EMBKERN_DISPATCH(query_forward<T>, h, r, q, B, d, alg, layout, normalize);
}

template <typename T>
void query_backward(const T* grad_q, const T* h, const T* r, T* grad_h, T* grad_r, int64_t B, int64_t d,
                    Algebra alg, Layout layout, bool normalize) {
  EMBKERN_DISPATCH(query_backward<T>, grad_q, h, r, grad_h, grad_r, B, d, alg, layout, normalize);
}

template <typename T>
void score_forward(const T* q, const T* E, const T* bias_h, const T* bias_t, T* S, int64_t B, int64_t N, int64_t K,
                   Score score) {
  EMBKERN_DISPATCH(score_forward<T>, q, E, bias_h, bias_t, S, B, N, K, score);
}

template <typename T>
void rank(const T* q, const T* E, const T* bias_h, const T* bias_t, const int64_t* targets,
          const int64_t* filter_offsets, const int64_t* filter_index, double* ranks, int64_t B, int64_t N, int64_t K,
          Score score, Ties ties) {
  EMBKERN_DISPATCH(rank<T>, q, E, bias_h, bias_t, targets, filter_offsets, filter_index, ranks, B, N, K, score, ties);
}

template <typename T>
void topk(const T* q, const T* E, const T* bias_h, const T* bias_t, const int64_t* filter_offsets,
          const int64_t* filter_index, T* values, int64_t* indices, int64_t B, int64_t N, int64_t K, int64_t k,
          Score score) {
  EMBKERN_DISPATCH(topk<T>, q, E, bias_h, bias_t, filter_offsets, filter_index, values, indices, B, N, K, k, score);
}

template <typename T>
void ce_forward(const T* q, const T* E, const T* bias_h, const T* bias_t, const int64_t* targets, T* loss, T* lse,
                int64_t B, int64_t N, int64_t K, Score score) {
  EMBKERN_DISPATCH(ce_forward<T>, q, E, bias_h, bias_t, targets, loss, lse, B, N, K, score);
}

template <typename T>
void ce_backward(const T* grad_loss, const T* q, const T* E, const T* bias_h, const T* bias_t, const int64_t* targets,
                 const T* lse, T* grad_q, T* grad_E, T* grad_bias_h, T* grad_bias_t, int64_t B, int64_t N, int64_t K,
                 Score score) {
  EMBKERN_DISPATCH(ce_backward<T>, grad_loss, q, E, bias_h, bias_t, targets, lse, grad_q, grad_E, grad_bias_h,
                   grad_bias_t, B, N, K, score);
}

// Plain arithmetic, the same at every level.
int64_t scratch_bytes(Kernel kernel, int64_t B, int64_t N, int64_t K, int64_t k, int64_t nnz, int elem_size) {
  return EMBKERN_ISA_BASE::scratch_bytes(kernel, B, N, K, k, nnz, elem_size);
}

EMBKERN_HC_INSTANTIATE(float)
EMBKERN_HC_INSTANTIATE(double)

}  // namespace hc
}  // namespace embkern
