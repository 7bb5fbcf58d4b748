"""Pure-PyTorch reference for selective self-attention (SSA): the numerics contract.

This module is what ``embkern.selective_attention`` and
``embkern.selective_temperatures`` must equal: every fast kernel is tested
against these functions run in float64, and the bench times them as the
baseline. They follow ``docs/ops/selective_attention.md`` (Zhang et al.,
"Selective Attention", NeurIPS 2024):

* scores ``S_ij = tau_q[i] * scale * q_i . k_j`` (the temperature multiplies
  the scaled logits, before the mask), ``scale = 1/sqrt(d)`` by default;
* key j is visible to query i iff ``j <= i + q_offset`` (``causal=True``;
  ``q_offset = Lk - Lq`` by default); a query that sees no key outputs zeros
  and has log-sum-exp ``-inf``;
* ``O_i = sum_j softmax_j(S)_ij * tau_v[j] * v_j`` (``tau_v=None``: 1);
* GQA / MQA: query head h reads kv head ``h // (Hq / Hkv)``.

The attention is materialised (B, Hq, Lq, Lk): the reference is the contract,
not a fast path. fp16/bf16 inputs are computed in float32 and the output cast
back; float32 and float64 in their own dtype. Temperatures are computed in the
accumulation dtype.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

GATES = ("expexp", "sigmoid", "linear")
# A gate's position in GATES is its integer code in the C++ and Triton kernels.
GATE_CODE = {name: i for i, name in enumerate(GATES)}


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def default_scale(d: int) -> float:
    return 1.0 / math.sqrt(d) if d > 0 else 1.0


def default_q_offset(Lq: int, Lk: int) -> int:
    return Lk - Lq


# ---------------------------------------------------------------------------
# Temperatures


def position_gate(param: torch.Tensor, gate: str = "expexp") -> torch.Tensor:
    """g of ``tau_pos(n) = 1 + g * log(n)``: ``exp(-exp(beta))`` (the authors'), ``sigmoid(alpha)`` or ``beta``."""
    if gate == "expexp":
        return torch.exp(-torch.exp(param))
    if gate == "sigmoid":
        return torch.sigmoid(param)
    if gate == "linear":
        return param
    raise ValueError(f"gate: expected one of {GATES}, got {gate!r}")


def temperatures(x: torch.Tensor, positions: torch.Tensor, gate_param: Optional[torch.Tensor] = None,
                 u: Optional[torch.Tensor] = None, gate: str = "expexp") -> torch.Tensor:
    """Per-token temperatures ``tau = tau_pos(n) + tau_tok(x)``, (B, H, L) in the accumulation dtype.

    x: (B, H, L, d) the projected queries (or values) of each head.
    positions: (L,) or (B, L) integer 0-based absolute positions; ``n = positions + 1``.
    gate_param: the position term's parameter, a scalar or (H,) (None: no position term,
        ``tau_pos = 1``).
    u: the token term's direction, (d,) shared or (H, d) per head (None: no token term);
        ``tau_tok(x) = tanh(u . GELU(x))`` (exact erf GELU).
    """
    B, H, L, d = x.shape
    acc = _acc_dtype(x.dtype)
    pos = positions.to(device=x.device)
    if pos.dim() == 1:
        pos = pos[None, :].expand(B, L)
    n = (pos.to(acc) + 1.0)[:, None, :]  # (B, 1, L)
    tau = torch.ones(B, H, L, dtype=acc, device=x.device)
    if gate_param is not None:
        g = position_gate(gate_param.to(acc), gate)
        g = g.reshape(1, -1, 1) if g.dim() == 1 else g.reshape(1, 1, 1)
        tau = tau + g * torch.log(n)
    if u is not None:
        uu = u.to(acc)
        uu = uu[None, :, None, :] if uu.dim() == 2 else uu.reshape(1, 1, 1, d)
        tau = tau + torch.tanh((F.gelu(x.to(acc)) * uu).sum(-1))
    return tau


# ---------------------------------------------------------------------------
# Attention


def _expand_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, ...) -> (B, Hkv * groups, ...): query head h reads kv head h // groups."""
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def visible(Lq: int, Lk: int, causal: bool, q_offset: int, device) -> Optional[torch.Tensor]:
    """(Lq, Lk) bool, True where key j is visible to query i (None: every key)."""
    if not causal:
        return None
    i = torch.arange(Lq, device=device)[:, None]
    j = torch.arange(Lk, device=device)[None, :]
    return j <= i + q_offset


def _probabilities(q, k, tau_q, causal, scale, q_offset):
    """(P, lse) in the accumulation dtype; fully masked rows: P = 0, lse = -inf."""
    S = _masked_scores(q, k, tau_q, causal, scale, q_offset, _acc_dtype(q.dtype))
    lse = torch.logsumexp(S, dim=-1)
    return _softmax_from(S, lse), lse


def _softmax_from(S, lse):
    # Only a row that sees no key (lse = -inf) is set to P = 0; a NaN (or +inf)
    # lse comes from NaN / overflowing scores and propagates into P and O.
    empty = lse == float("-inf")
    P = torch.exp(S - torch.where(empty, torch.zeros_like(lse), lse)[..., None])
    return torch.where(empty[..., None], torch.zeros_like(P), P)


def _scaled_v(v, tau_v, acc):
    return v.to(acc) if tau_v is None else tau_v.to(acc)[..., None] * v.to(acc)


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tau_q: torch.Tensor,
                      tau_v: Optional[torch.Tensor] = None, causal: bool = True, scale: Optional[float] = None,
                      q_offset: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(O (B, Hq, Lq, dv) in q's dtype, lse (B, Hq, Lq) in the accumulation dtype).

    q: (B, Hq, Lq, d), k: (B, Hkv, Lk, d), v: (B, Hkv, Lk, dv), tau_q: (B, Hq, Lq),
    tau_v: (B, Hkv, Lk) or None; Hq a multiple of Hkv. ``lse`` is the row
    log-sum-exp of the masked scores (what a flash backward recomputes from).
    """
    Lq, Lk = q.shape[2], k.shape[2]
    scale = default_scale(q.shape[-1]) if scale is None else scale
    q_offset = default_q_offset(Lq, Lk) if q_offset is None else q_offset
    acc = _acc_dtype(q.dtype)
    P, lse = _probabilities(q, k, tau_q, causal, scale, q_offset)
    groups = q.shape[1] // k.shape[1]
    O = P @ _expand_kv(_scaled_v(v, tau_v, acc), groups)
    return O.to(q.dtype), lse


def attention(q, k, v, tau_q, tau_v=None, causal: bool = True, scale: Optional[float] = None,
              q_offset: Optional[int] = None) -> torch.Tensor:
    """Selective attention, (B, Hq, Lq, dv); differentiable with plain autograd (see :func:`attention_forward`)."""
    return attention_forward(q, k, v, tau_q, tau_v, causal, scale, q_offset)[0]


def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       tau_q: torch.Tensor, tau_v: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor,
                       causal: bool = True, scale: Optional[float] = None, q_offset: Optional[int] = None):
    """(dq, dk, dv, dtau_q, dtau_v) of ``sum(grad_out * O)``; dtau_v is None when tau_v is None.

    With ``q' = tau_q q`` and ``v' = tau_v v`` it is the attention backward of
    (q', k, v') plus the epilogues ``dq = tau_q dq'``, ``dtau_q = sum_d dq' q``,
    ``dv = tau_v dv'``, ``dtau_v = sum_d dv' v``; GQA sums dk, dv' over each
    kv head's query heads. Gradients come back in the inputs' dtypes.
    """
    B, Hq, Lq, d = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    groups = Hq // Hkv
    scale = default_scale(d) if scale is None else scale
    q_offset = default_q_offset(Lq, Lk) if q_offset is None else q_offset
    acc = _acc_dtype(q.dtype)
    P = _softmax_from(_masked_scores(q, k, tau_q, causal, scale, q_offset, acc), lse.to(acc))
    go = grad_out.to(acc)
    vs = _scaled_v(v, tau_v, acc)
    ve = _expand_kv(vs, groups)
    Oa = P @ ve  # recomputed in the accumulation dtype, not the rounded output
    dvp = (P.transpose(-1, -2) @ go).reshape(B, Hkv, groups, Lk, go.shape[-1]).sum(2)  # not -1: B = 0 is valid
    dP = go @ ve.transpose(-1, -2)
    dS = P * (dP - (go * Oa).sum(-1, keepdim=True))
    ke = _expand_kv(k, groups).to(acc)
    qa, ta = q.to(acc), tau_q.to(acc)
    dqp = scale * (dS @ ke)
    dk = (scale * (dS.transpose(-1, -2) @ (ta[..., None] * qa))).reshape(B, Hkv, groups, Lk, d).sum(2)
    dq = ta[..., None] * dqp
    dtau_q = (dqp * qa).sum(-1)
    if tau_v is None:
        dv, dtau_v = dvp, None
    else:
        dv = tau_v.to(acc)[..., None] * dvp
        dtau_v = (dvp * v.to(acc)).sum(-1).to(tau_v.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dtau_q.to(tau_q.dtype), dtau_v


def _masked_scores(q, k, tau_q, causal, scale, q_offset, acc):
    groups = q.shape[1] // k.shape[1]
    S = (tau_q.to(acc)[..., None] * scale) * (q.to(acc) @ _expand_kv(k, groups).to(acc).transpose(-1, -2))
    m = visible(q.shape[2], k.shape[2], causal, q_offset, q.device)
    return S if m is None else S.masked_fill(~m, float("-inf"))


def authors_attention(q, k, v, tau_q, tau_v=None, causal: bool = True, scale: Optional[float] = None):
    """The attention as the authors' code writes it (materialised scores, temperature on the scaled logits,
    then the causal mask, softmax, P @ V), for the bench's "materialised" anchor.

    Only the default q_offset (Lk - Lq) and no GQA (Hq == Hkv), as there.
    """
    scale = default_scale(q.shape[-1]) if scale is None else scale
    att = (q @ k.transpose(-2, -1)) * scale
    att = att * tau_q[..., None]
    if causal:
        Lq, Lk = q.shape[2], k.shape[2]
        mask = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(diagonal=Lk - Lq)
        att = att.masked_fill(~mask, float("-inf"))
    att = torch.softmax(att, dim=-1)
    return att @ (v if tau_v is None else tau_v[..., None] * v)
