// embkern::rca entry points: forward to the active ISA level's kernels
// (src/cpu/rel_conv_attention.cpp, compiled once per level; see embkern/cpu_isa.h).
#include "embkern/rel_conv_attention.h"

namespace embkern {
namespace rca {
#define EMBKERN_API_INC "embkern/rel_conv_attention_api.inc"
#include "embkern/isa_levels.inc"

template <typename T>
void forward(const T* q, const T* k, const T* v, const T* R, const T* S, const T* u, T* out, T* lse, int64_t B,
             int64_t H, int64_t Lq, int64_t Lk, int64_t d, int64_t dv, int64_t P, bool causal, int64_t q_offset,
             int64_t k_stride, int64_t v_stride) {
  EMBKERN_DISPATCH(forward<T>, q, k, v, R, S, u, out, lse, B, H, Lq, Lk, d, dv, P, causal, q_offset, k_stride,
                   v_stride);
}

template <typename T>
void backward(const T* grad_out, const T* q, const T* k, const T* v, const T* R, const T* S, const T* u, const T* out,
              const T* lse, T* dq, T* dk, T* dv, T* dR, T* dS, T* du, int64_t B, int64_t H, int64_t Lq, int64_t Lk,
              int64_t d, int64_t dv_dim, int64_t P, bool causal, int64_t q_offset) {
  EMBKERN_DISPATCH(backward<T>, grad_out, q, k, v, R, S, u, out, lse, dq, dk, dv, dR, dS, du, B, H, Lq, Lk, d,
                   dv_dim, P, causal, q_offset);
}

template <typename T>
void conv_forward(const T* x, const T* weight, const T* bias, T* y, int64_t N, int64_t T_len, int64_t C, int64_t K) {
  EMBKERN_DISPATCH(conv_forward<T>, x, weight, bias, y, N, T_len, C, K);
}

template <typename T>
void conv_backward(const T* grad_y, const T* x, const T* weight, T* dx, T* dweight, T* dbias, int64_t N,
                   int64_t T_len, int64_t C, int64_t K) {
  EMBKERN_DISPATCH(conv_backward<T>, grad_y, x, weight, dx, dweight, dbias, N, T_len, C, K);
}

// Plain arithmetic, the same at every level.
int64_t scratch_bytes(bool backward, int64_t B, int64_t H, int64_t Lq, int64_t Lk, int64_t d, int64_t dv,
                      int elem_size) {
  return EMBKERN_ISA_BASE::scratch_bytes(backward, B, H, Lq, Lk, d, dv, elem_size);
}
int64_t conv_scratch_bytes(bool backward, int64_t N, int64_t T_len, int64_t C, int64_t K, int elem_size) {
  return EMBKERN_ISA_BASE::conv_scratch_bytes(backward, N, T_len, C, K, elem_size);
}

EMBKERN_RCA_INSTANTIATE(float)
EMBKERN_RCA_INSTANTIATE(double)

}  // namespace rca
}  // namespace embkern
