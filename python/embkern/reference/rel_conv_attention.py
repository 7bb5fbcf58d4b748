"""Pure-PyTorch reference for relative convolutional attention (RCMHA): the numerics contract.

What ``embkern.relative_attention`` and ``embkern.causal_depthwise_conv`` must
equal (``docs/ops/rel_conv_attention.md``; Sugiharto et al. 2023, on
Transformer-XL's learned relative attention):

* ``s_ij = [(q_i + u) . k_j + q_i . R[r] + S[r]] / sqrt(d)`` with
  ``r = P + j - i_a``, ``i_a = i + q_offset`` (default ``Lk - Lq``, the memory
  length), P the table half-width (``R``: (2P, H, d), ``S``: (2P, H));
* causal: key j visible to query i iff ``j <= i_a``; a query that sees no key
  outputs zeros (lse ``-inf``);
* every visible pair must index the table: ``0 <= r < 2P`` (and ``Lk <= P``),
  else a ValueError -- the authors' code silently wraps there;
* ``causal_depthwise_conv``: ``y[t] = sum_k w[:, k] x[t - K + 1 + k] + b``,
  taps oldest first, ``x[t < 0] = 0``.

:func:`attention_forward` gathers ``q . R[r]`` from ``q R^T`` over the table
rows some pair reads (simple, O(Lq * (Lq + Lk)) per head); :func:`authors_attention` is the
authors' formulation (the relative term for a window of rows, realigned with
Transformer-XL's pad-and-reshape shift), a second, independent check and the
bench's materialised anchor. fp16 / bf16 compute in float32; float32 and
float64 in their own dtype.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .selective_attention import _softmax_from


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def default_q_offset(Lq: int, Lk: int) -> int:
    return Lk - Lq


def table_range_error(Lq: int, Lk: int, P: int, causal: bool, q_offset: int) -> Optional[str]:
    """Why some visible (i, j) would index outside the (2P)-row tables, or None."""
    if Lk > P:
        return f"Lk = {Lk} keys exceed max_distance = {P} (the relative tables hold distances -P..P-1)"
    if Lq == 0 or Lk == 0:
        return None
    i_max = Lq - 1 + q_offset
    r_min = P - i_max  # j = 0, the last query
    if causal:
        if i_max < 0:
            return None  # no query sees any key
        r_max = min(P, P + (Lk - 1) - q_offset)
    else:
        r_max = P + (Lk - 1) - q_offset  # the last key, the first query
    if r_min < 0 or r_max >= 2 * P:
        return (f"query positions {q_offset}..{i_max} against {Lk} keys reach relative distances outside "
                f"-{P}..{P - 1} (max_distance = {P})")
    return None


def visible(Lq: int, Lk: int, causal: bool, q_offset: int, device) -> Optional[torch.Tensor]:
    if not causal:
        return None
    i = torch.arange(Lq, device=device)[:, None] + q_offset
    return torch.arange(Lk, device=device)[None, :] <= i


def rel_index(Lq: int, Lk: int, P: int, q_offset: int, device) -> torch.Tensor:
    """(Lq, Lk) int64 ``r = P + j - i_a``, clamped into the table (clamped entries are masked)."""
    i = torch.arange(Lq, device=device)[:, None] + q_offset
    return (P + torch.arange(Lk, device=device)[None, :] - i).clamp(0, 2 * P - 1)


def _window(Lq: int, Lk: int, P: int, q_offset: int) -> Tuple[int, int]:
    """First and last table rows any (i, j) reads, clamped into the table: at most Lq + Lk - 1 rows."""
    lo = min(max(P - (Lq - 1 + q_offset), 0), 2 * P - 1)
    hi = max(min(P + (Lk - 1) - q_offset, 2 * P - 1), lo)
    return lo, hi


def scores(q, k, R, S, u, causal: bool, q_offset: int) -> torch.Tensor:
    """(B, H, Lq, Lk) masked scores in the accumulation dtype."""
    acc = _acc_dtype(q.dtype)
    B, H, Lq, d = q.shape
    Lk, P = k.shape[2], R.shape[0] // 2
    qa, ka, Ra, Sa, ua = (t.to(acc) for t in (q, k, R, S, u))
    content = (qa + ua[None, :, None, :]) @ ka.transpose(-1, -2)
    lo, hi = _window(Lq, Lk, P, q_offset)
    idx = rel_index(Lq, Lk, P, q_offset, q.device).clamp(lo, hi) - lo
    qR = qa @ Ra[lo:hi + 1].permute(1, 2, 0)  # (B, H, Lq, W): only the rows some (i, j) reads
    pos = qR.gather(-1, idx[None, None].expand(B, H, Lq, Lk))
    bias = Sa[lo:hi + 1].T[:, idx]  # (H, Lq, Lk)
    s = (content + pos + bias[None]) / math.sqrt(d)
    m = visible(Lq, Lk, causal, q_offset, q.device)
    return s if m is None else s.masked_fill(~m, float("-inf"))


def _softmax(s):
    """(P, lse): selective attention's rule (P = 0 only for a row that sees no key; NaN propagates)."""
    lse = torch.logsumexp(s, dim=-1)
    return _softmax_from(s, lse), lse


def attention_forward(q, k, v, R, S, u, causal: bool = True,
                      q_offset: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(O (B, H, Lq, dv) in q's dtype, lse (B, H, Lq) in the accumulation dtype).

    q: (B, H, Lq, d), k: (B, H, Lk, d), v: (B, H, Lk, dv), R: (2P, H, d), S: (2P, H), u: (H, d).
    """
    q_offset = default_q_offset(q.shape[2], k.shape[2]) if q_offset is None else q_offset
    p, lse = _softmax(scores(q, k, R, S, u, causal, q_offset))
    return (p @ v.to(p.dtype)).to(q.dtype), lse


def attention(q, k, v, R, S, u, causal: bool = True, q_offset: Optional[int] = None) -> torch.Tensor:
    """Relative attention (B, H, Lq, dv), differentiable with plain autograd."""
    return attention_forward(q, k, v, R, S, u, causal, q_offset)[0]


def attention_backward(grad_out, q, k, v, R, S, u, causal: bool = True, q_offset: Optional[int] = None):
    """(dq, dk, dv, dR, dS, du) of ``sum(grad_out * O)``, in the inputs' dtypes.

    With ``G[i, r] = sum_j [r_ij = r] dS_ij / sqrt(d)`` (dS the softmax backward of the scores): the
    relative terms give ``dq_i += sum_r G[i, r] R[r]``, ``dR[r] = sum_i G[i, r] q_i``,
    ``dS[r] = sum_i G[i, r]``; the content term ``du = sum_ij dS_ij k_j / sqrt(d)``.
    """
    acc = _acc_dtype(q.dtype)
    B, H, Lq, d = q.shape
    Lk, P = k.shape[2], R.shape[0] // 2
    q_offset = default_q_offset(Lq, Lk) if q_offset is None else q_offset
    qa, ka, va, Ra, ua = (t.to(acc) for t in (q, k, v, R, u))
    p, _ = _softmax(scores(q, k, R, S, u, causal, q_offset))
    go = grad_out.to(acc)
    out = p @ va
    dv = p.transpose(-1, -2) @ go
    dp = go @ va.transpose(-1, -2)
    ds = p * (dp - (go * out).sum(-1, keepdim=True)) / math.sqrt(d)
    dq = ds @ ka
    dk = ds.transpose(-1, -2) @ (qa + ua[None, :, None, :])
    du = torch.einsum("bhij,bhjd->hd", ds, ka)
    lo, hi = _window(Lq, Lk, P, q_offset)
    idx = (rel_index(Lq, Lk, P, q_offset, q.device).clamp(lo, hi) - lo)[None, None].expand(B, H, Lq, Lk)
    G = torch.zeros(B, H, Lq, hi - lo + 1, dtype=acc, device=q.device).scatter_add_(-1, idx, ds)
    dq = dq + G @ Ra[lo:hi + 1].permute(1, 0, 2)
    dR = torch.zeros(R.shape, dtype=acc, device=q.device)
    dR[lo:hi + 1] = torch.einsum("bhir,bhid->rhd", G, qa)
    dS = torch.zeros(S.shape, dtype=acc, device=q.device)
    dS[lo:hi + 1] = G.sum(dim=(0, 2)).T
    return tuple(g.to(t.dtype).contiguous() for g, t in zip((dq, dk, dv, dR, dS, du), (q, k, v, R, S, u)))


def _shift(x: torch.Tensor) -> torch.Tensor:
    """Transformer-XL's realignment of (Lq, W, ...) relative scores: row i moves left by Lq - 1 - i.

    Append a zero column, reinterpret the (Lq, W + 1) block as (W + 1, Lq), drop its last row and
    reinterpret back: entry (i, j) then holds the input's (i, j + Lq - 1 - i).
    """
    Lq, W = x.shape[0], x.shape[1]
    padded = torch.cat([x, x.new_zeros(Lq, 1, *x.shape[2:])], dim=1)
    return padded.reshape(W + 1, Lq, *x.shape[2:])[:-1].reshape(x.shape)


def authors_attention(q, k, v, R, S, u, causal: bool = True) -> torch.Tensor:
    """The authors' formulation: the q . R term for the rows P - Lk .. P + Lq - 1 of the table, materialised
    for every (i, row) and realigned with :func:`_shift`; then content term, bias, mask, softmax, P V.
    Default q_offset (the memory length) only, as there. (B, H, Lq, dv)."""
    B, H, Lq, d = q.shape
    Lk, P = k.shape[2], R.shape[0] // 2
    # (i, j, B, H) layout, as theirs
    qi, kj, vj = q.permute(2, 0, 1, 3), k.permute(2, 0, 1, 3), v.permute(2, 0, 1, 3)
    ac = torch.einsum("ibhd,jbhd->ijbh", qi + u[None, None], kj)
    rows = R[P - Lk:P + Lq]
    b = torch.einsum("ibhd,jhd->ijbh", qi, rows) + S[P - Lk:P + Lq][None, :, None, :]
    bd = _shift(b)[:, -Lk:]
    att = (ac + bd) / math.sqrt(d)
    if causal:
        mask = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(Lk - Lq)
        att = att.masked_fill(~mask[:, :, None, None], float("-inf"))
    att = torch.softmax(att, dim=1)
    return torch.einsum("ijbh,jbhd->bhid", att, vj)


# ---------------------------------------------------------------------------
# Causal depthwise convolution


def causal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y[..., t, c] = sum_k weight[c, k] x[..., t - K + 1 + k, c] + bias[c]``; x[t < 0] = 0. x: (..., T, C)."""
    acc = _acc_dtype(x.dtype)
    T, K = x.shape[-2], weight.shape[-1]
    xa, w = x.to(acc), weight.to(acc)
    y = torch.zeros_like(xa)
    for kk in range(K):
        shift = K - 1 - kk  # tap kk reads x[t - shift]
        if shift >= T:
            continue
        y[..., shift:, :] += w[:, kk] * xa[..., :T - shift, :]
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


def causal_depthwise_conv_backward(grad_y, x, weight, has_bias: bool):
    """(dx, dweight, dbias or None) of ``sum(grad_y * causal_depthwise_conv(x, weight, bias))``."""
    acc = _acc_dtype(x.dtype)
    T, K = x.shape[-2], weight.shape[-1]
    g, xa, w = grad_y.to(acc), x.to(acc), weight.to(acc)
    dx = torch.zeros_like(xa)
    dw = torch.zeros(weight.shape, dtype=acc, device=x.device)
    lead = tuple(range(g.dim() - 1))
    for kk in range(K):
        shift = K - 1 - kk
        if shift >= T:
            continue
        dx[..., :T - shift, :] += w[:, kk] * g[..., shift:, :]
        dw[:, kk] = (g[..., shift:, :] * xa[..., :T - shift, :]).sum(dim=lead)
    db = g.sum(dim=lead).to(weight.dtype) if has_bias else None
    return dx.to(x.dtype), dw.to(weight.dtype), db
