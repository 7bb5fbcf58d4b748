// Relative convolutional attention (RCMHA) CPU kernels: Transformer-XL
// learned relative attention and the causal depthwise convolution
// (docs/ops/rel_conv_attention.md). Torch-free: raw pointers to C-contiguous
// row-major buffers, sizes as int64_t.
//
// Attention shapes (P = table half-width, the op's max_distance):
//   q (B, H, Lq, d)   k (B, H, Lk, d)   v (B, H, Lk, dv)
//   R (2P, H, d)      S (2P, H)         u (H, d)
//   out (B, H, Lq, dv)                  lse (B, H, Lq)
// Semantics: with i_a = i + q_offset and r = P + j - i_a,
//   s_ij = [(q_i + u) . k_j + q_i . R[r] + S[r]] / sqrt(d),
//   key j visible to query i iff !causal or j <= i_a; O_i = sum_j softmax_j(s)_ij v_j;
//   lse_i = log sum_j exp(s_ij) over the visible keys; a row that sees no key
//   has O_i = 0, lse_i = -inf and zero gradients.
// Preconditions (checked at the csrc/ boundary, trusted here): sizes >= 0,
// P > 0, buffers of the shapes above, outputs not aliasing inputs, and every
// visible pair indexes the table (0 <= r < 2P; see the reference's
// table_range_error). Table rows outside [0, 2P) are read as zero, so a
// masked pair never reads out of bounds.
//
// Conv shapes: x (N, T, C), weight (C, K) taps oldest first, bias (C) or
// null, y (N, T, C): y[n, t, c] = sum_k weight[c, k] x[n, t - K + 1 + k, c] + bias[c],
// x[t < 0] = 0.
//
// Numerics: T = float accumulates in float, T = double in double. Every
// output element is one chain of fused multiply-adds in a fixed order,
// vectorised across independent outputs only; sums over many tiles (dR, dS,
// du, dweight, dbias) are per-tile or per-chunk partials reduced in a fixed
// order. Results are the same bits at every ISA level and thread count.
#pragma once
#include <cstdint>

#include "embkern/cpu_isa.h"

namespace embkern {
namespace rca {

EMBKERN_ISA_BEGIN
#include "embkern/rel_conv_attention_api.inc"
EMBKERN_ISA_END

#define EMBKERN_RCA_INSTANTIATE(T)                                                                                \
  template void forward<T>(const T*, const T*, const T*, const T*, const T*, const T*, T*, T*, int64_t, int64_t,  \
                           int64_t, int64_t, int64_t, int64_t, int64_t, bool, int64_t, int64_t, int64_t);         \
  template void backward<T>(const T*, const T*, const T*, const T*, const T*, const T*, const T*, const T*,      \
                            const T*, T*, T*, T*, T*, T*, T*, int64_t, int64_t, int64_t, int64_t, int64_t,        \
                            int64_t, int64_t, bool, int64_t);                                                     \
  template void conv_forward<T>(const T*, const T*, const T*, T*, int64_t, int64_t, int64_t, int64_t);            \
  template void conv_backward<T>(const T*, const T*, const T*, T*, T*, T*, int64_t, int64_t, int64_t, int64_t);

}  // namespace rca
}  // namespace embkern
