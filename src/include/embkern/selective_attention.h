// Selective self-attention (SSA) CPU kernels: attention with per-query and
// per-value temperatures (docs/ops/selective_attention.md). Torch-free: raw
// pointers to C-contiguous row-major buffers, sizes as int64_t.
//
// Shapes (G = Hq / Hkv query heads per kv head; query head h reads kv head h / G):
//   q      (B, Hq, Lq, d)      k     (B, Hkv, Lk, d)      v      (B, Hkv, Lk, dv)
//   tau_q  (B, Hq, Lq)         tau_v (B, Hkv, Lk) or null (null: 1)
//   out    (B, Hq, Lq, dv)     lse   (B, Hq, Lq)
// Semantics ("Attention"):
//   S_ij = tau_q[i] * scale * (q_i . k_j); key j visible to query i iff
//   !causal or j <= i + q_offset; O_i = sum_j softmax_j(S)_ij tau_v[j] v_j;
//   lse_i = log sum_j exp(S_ij) over the visible keys; a row that sees no key
//   has O_i = 0, lse_i = -inf, and zero gradients.
// Preconditions (checked at the csrc/ boundary, trusted here): every size
// >= 0, Hkv > 0 and Hq % Hkv == 0, buffers of the shapes above, outputs not
// aliasing inputs. Any q_offset is accepted (it is clamped to [-Lq - 1, Lk],
// which changes no mask).
//
// Numerics: T = float accumulates in float, T = double in double. Every
// product is a chain of fused multiply-adds in a fixed order per output
// element, vectorised across independent outputs only, and exp is one fixed
// polynomial: the results are the same bits at every ISA level and for every
// thread count (work is partitioned by output ownership, no float atomics).
#pragma once
#include <cstdint>

#include "embkern/cpu_isa.h"

namespace embkern {
namespace ssa {

EMBKERN_ISA_BEGIN
#include "embkern/selective_attention_api.inc"
EMBKERN_ISA_END

// Explicit instantiations, one list for the kernels (per level) and the dispatcher.
#define EMBKERN_SSA_INSTANTIATE(T)                                                                              \
  template void forward<T>(const T*, const T*, const T*, const T*, const T*, T*, T*, int64_t, int64_t, int64_t, \
                           int64_t, int64_t, int64_t, int64_t, bool, double, int64_t, int64_t, int64_t,         \
                           int64_t);                                                                            \
  template void backward<T>(const T*, const T*, const T*, const T*, const T*, const T*, const T*, const T*, T*, \
                            T*, T*, T*, T*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool, \
                            double, int64_t);

}  // namespace ssa
}  // namespace embkern
