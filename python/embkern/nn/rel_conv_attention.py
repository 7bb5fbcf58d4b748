"""The RCMHA layer (docs/ops/rel_conv_attention.md): relative multi-head attention with causal depthwise-conv
Q/K/V and Transformer-XL memory, through :func:`embkern.relative_attention` and
:func:`embkern.causal_depthwise_conv`.

``conv=None`` is RMHA (relative attention alone); ``conv="shared"`` is the
authors' RCMHA (one kernel per channel of d_k shared by all heads, with bias,
PyTorch's Conv1d init); ``conv="per_head"`` is Primer's MDHA (a kernel per
head and channel, no bias, init 0.5 at t and 0.5/3 at t-1, t-2).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .. import _checks
from ..ops.rel_conv_attention import causal_depthwise_conv, relative_attention

__all__ = ["RelConvMultiHeadAttention"]

CONVS = ("shared", "per_head", None)
RELS = ("learned", "sinusoidal")


class _DepthwiseConv(nn.Module):
    """One causal depthwise conv over (B, T, H * d_k) inputs, shared across heads or per head."""

    def __init__(self, n_heads: int, d_k: int, kind: str, K: int, dtype=None, device=None):
        super().__init__()
        self.kind, self.n_heads = kind, n_heads
        kw = dict(dtype=dtype, device=device)
        if kind == "shared":
            bound = 1.0 / math.sqrt(K)  # Conv1d's default init for groups = channels (fan_in = K)
            self.weight = nn.Parameter(torch.empty(d_k, K, **kw).uniform_(-bound, bound))
            self.bias = nn.Parameter(torch.empty(d_k, **kw).uniform_(-bound, bound))
        else:
            w = torch.full((n_heads * d_k, K), 0.0, **kw)
            w[:, -1] = 0.5
            if K > 1:
                w[:, max(0, K - 3):K - 1] = 0.5 / 3
            self.weight = nn.Parameter(w)
            self.bias = None

    def forward(self, x: Tensor, backend: Optional[str]) -> Tensor:
        if self.kind == "shared":  # channels = d_k, heads as a leading dim
            B, T, C = x.shape
            xh = x.view(B, T, self.n_heads, -1).transpose(1, 2)
            y = causal_depthwise_conv(xh, self.weight, self.bias, backend=backend)
            return y.transpose(1, 2).reshape(B, T, C)
        return causal_depthwise_conv(x, self.weight, None, backend=backend)


def _sinusoid(P: int, d: int, device, dtype) -> Tensor:
    """(2P, d) sinusoidal encodings of the relative distances -P .. P-1 (row r is distance r - P)."""
    pos = torch.arange(-P, P, device=device, dtype=torch.float64)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=device, dtype=torch.float64) / d))
    ang = pos[:, None] * inv[None, :]
    return torch.cat([ang.sin(), ang.cos()], dim=1)[:, :d].to(dtype)


class RelConvMultiHeadAttention(nn.Module):
    """Relative (Transformer-XL) multi-head attention with causal depthwise-conv Q/K/V: RCMHA.

    ``forward(z, memory=None) -> (out, new_memory)``: z (B, L, d_model); memory (B, M, d_model) the
    previous segment's layer inputs (or None); ``new_memory`` the last ``memory_len`` rows of
    ``[memory; z]``, detached (None when ``memory_len = 0``). Q = z W_q is convolved over the segment,
    K = [m; z] W_k and V = [m; z] W_v + b_v over memory plus segment.

    rel: ``"learned"`` tables R (2P, H, d_k), S (2P, H) and the content bias u (H, d_k), all zero at
    init (the authors'); ``"sinusoidal"`` is Transformer-XL's: R = phi(r) W_R with global biases u, v,
    the position bias being ``S[r] = v . R[r]``.
    """

    def __init__(self, d_model: int, n_heads: int, conv: Optional[str] = "shared", rel: str = "learned",
                 memory_len: int = 0, max_distance: int = 4096, conv_kernel: int = 3,
                 backend: Optional[str] = None, dtype=None, device=None):
        super().__init__()
        _checks.positive_int(d_model, "d_model")
        _checks.positive_int(n_heads, "n_heads")
        if d_model % n_heads:
            raise ValueError(f"d_model: expected a multiple of n_heads = {n_heads}, got {d_model}")
        if conv not in CONVS:
            raise ValueError(f"conv: expected one of {CONVS}, got {conv!r}")
        _checks.choice(rel, "rel", RELS)
        self.memory_len = _checks.positive_int(memory_len, "memory_len", 0)
        self.P = _checks.positive_int(max_distance, "max_distance")
        _checks.positive_int(conv_kernel, "conv_kernel")
        self.n_heads, self.d_k, self.rel, self.backend = n_heads, d_model // n_heads, rel, backend
        kw = dict(dtype=dtype, device=device)
        self.w_q = nn.Linear(d_model, d_model, bias=False, **kw)
        self.w_k = nn.Linear(d_model, d_model, bias=False, **kw)
        self.w_v = nn.Linear(d_model, d_model, bias=True, **kw)
        self.w_o = nn.Linear(d_model, d_model, bias=True, **kw)
        self.convs = nn.ModuleDict({n: _DepthwiseConv(n_heads, self.d_k, conv, conv_kernel, **kw)
                                    for n in "qkv"}) if conv is not None else None
        H, d, P = n_heads, self.d_k, self.P
        if rel == "learned":
            self.rel_emb = nn.Parameter(torch.zeros(2 * P, H, d, **kw))
            self.rel_bias = nn.Parameter(torch.zeros(2 * P, H, **kw))
        else:
            self.w_r = nn.Linear(d_model, d_model, bias=False, **kw)
            self.pos_bias = nn.Parameter(torch.zeros(H, d, **kw))  # Transformer-XL's v
        self.content_bias = nn.Parameter(torch.zeros(H, d, **kw))

    def tables(self) -> Tuple[Tensor, Tensor]:
        """(R (2P, H, d_k), S (2P, H)) of this layer."""
        if self.rel == "learned":
            return self.rel_emb, self.rel_bias
        w = self.w_r.weight
        R = self.w_r(_sinusoid(self.P, w.shape[1], w.device, w.dtype)).view(2 * self.P, self.n_heads, self.d_k)
        return R, (R * self.pos_bias[None]).sum(-1)

    def forward(self, z: Tensor, memory: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        z = _checks.float_tensor(z, "z", 3)
        B, L, C = z.shape
        full = z if memory is None else torch.cat([_checks.float_tensor(memory, "memory", 3), z], dim=1)
        M = full.shape[1] - L
        q, k, v = self.w_q(z), self.w_k(full), self.w_v(full)
        if self.convs is not None:
            q = self.convs["q"](q, self.backend)
            k = self.convs["k"](k, self.backend)
            v = self.convs["v"](v, self.backend)
        q, k, v = (t.view(B, -1, self.n_heads, self.d_k).transpose(1, 2) for t in (q, k, v))
        R, S = self.tables()
        o = relative_attention(q, k, v, R, S, self.content_bias, causal=True, q_offset=M, max_distance=self.P,
                               backend=self.backend)
        out = self.w_o(o.transpose(1, 2).reshape(B, L, C))
        new_memory = full[:, -self.memory_len:].detach() if self.memory_len else None
        return out, new_memory
