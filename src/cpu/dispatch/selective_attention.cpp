// embkern::ssa entry points: forward to the active ISA level's kernels
// (src/cpu/selective_attention.cpp, compiled once per level; see embkern/cpu_isa.h).
#include "embkern/selective_attention.h"

namespace embkern {
namespace ssa {
#define EMBKERN_API_INC "embkern/selective_attention_api.inc"
#include "embkern/isa_levels.inc"

template <typename T>
void forward(const T* q, const T* k, const T* v, const T* tau_q, const T* tau_v, T* out, T* lse, int64_t B,
             int64_t Hq, int64_t Hkv, int64_t Lq, int64_t Lk, int64_t d, int64_t dv, bool causal, double scale,
             int64_t q_offset, int64_t k_hs, int64_t v_hs, int64_t tv_hs) {
  EMBKERN_DISPATCH(forward<T>, q, k, v, tau_q, tau_v, out, lse, B, Hq, Hkv, Lq, Lk, d, dv, causal, scale, q_offset,
                   k_hs, v_hs, tv_hs);
}

template <typename T>
void backward(const T* grad_out, const T* q, const T* k, const T* v, const T* tau_q, const T* tau_v, const T* out,
              const T* lse, T* dq, T* dk, T* dv, T* dtau_q, T* dtau_v, int64_t B, int64_t Hq, int64_t Hkv, int64_t Lq,
              int64_t Lk, int64_t d, int64_t dv_dim, bool causal, double scale, int64_t q_offset) {
  EMBKERN_DISPATCH(backward<T>, grad_out, q, k, v, tau_q, tau_v, out, lse, dq, dk, dv, dtau_q, dtau_v, B, Hq, Hkv,
                   Lq, Lk, d, dv_dim, causal, scale, q_offset);
}

// Plain arithmetic, the same at every level.
int64_t scratch_bytes(bool backward, int64_t B, int64_t Hq, int64_t Lq, int64_t d, int64_t dv, int elem_size) {
  return EMBKERN_ISA_BASE::scratch_bytes(backward, B, Hq, Lq, d, dv, elem_size);
}

EMBKERN_SSA_INSTANTIATE(float)
EMBKERN_SSA_INSTANTIATE(double)

}  // namespace ssa
}  // namespace embkern
