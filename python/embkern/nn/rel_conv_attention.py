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
import weakref
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .. import _checks
from ..ops.rel_conv_attention import causal_depthwise_conv, relative_attention
from ..reference.rel_conv_attention import table_range_error

__all__ = ["RelConvMultiHeadAttention", "RelConvCache"]

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
        if self.kind == "shared":
            # one kernel per channel of d_k shared by the heads is the depthwise conv over all H * d_k channels
            # of x (B, T, H * d_k) with the kernel tiled H times: the same products and sums per output, where
            # moving the heads to a leading dim cost a transposed copy of x and one of y (at B 4, T 1025,
            # d_model 256: 2 of the 11 ms of a decode step)
            H = self.n_heads
            return causal_depthwise_conv(x, self.weight.repeat(H, 1), self.bias.repeat(H), backend=backend)
        return causal_depthwise_conv(x, self.weight, None, backend=backend)


def _sinusoid(lo: int, hi: int, d: int, device, dtype) -> Tensor:
    """(hi - lo, d) sinusoidal encodings of the relative distances lo .. hi-1 (row r is distance lo + r).

    Each row depends on its distance only, so any window of rows equals those rows of the full table.
    """
    pos = torch.arange(lo, hi, device=device, dtype=torch.float64)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=device, dtype=torch.float64) / d))
    ang = pos[:, None] * inv[None, :]
    return torch.cat([ang.sin(), ang.cos()], dim=1)[:, :d].to(dtype)


class RelConvCache:
    """Decoding state of one :class:`RelConvMultiHeadAttention`: its memory rows' K and V.

    ``layer(z, cache=c)`` gives what ``layer(z, memory=h)`` gives (to rounding), where h is the last
    ``memory_len`` layer inputs the cache has seen, without recomputing h's K and V: the cache keeps
    each row's projection (``h W_k``, ``h W_v + b_v``) and its conv output, and each call projects
    and convolves its own rows, plus the K - 1 rows at the window's start whose conv sees zeros
    before the start and so changes as the window slides (docs/ops/rel_conv_attention.md). Redoing
    the memory was the cost of a decode step: at B 4, d_model 256, memory 1024, one token, W_k and
    W_v over the memory took 6.3 of the layer's 10.9 ms.

    Inference only (``torch.no_grad()`` / ``inference_mode``): under autograd the memory path
    recomputes the memory's K and V with the current weights and sends their gradients through
    them, which a cache cannot. A cache belongs to one layer and checks that the weights it
    depends on (W_k, W_v, b_v and the K and V convs) have not changed in place since it was filled
    (an optimizer step, ``load_state_dict``); ``reset()`` starts again.

    Buffers hold up to about twice the window and are compacted when full, so a step copies its own
    rows (amortised) and the K - 1 recomputed ones; the kernel reads the window's K and V in place from
    (B, H, capacity, d_k) buffers (copying them out cost a third of a step: at B 4, d_model 256,
    memory 1024, 2 x 4 MiB a token).
    """

    def __init__(self):
        self.reset()

    @property
    def length(self) -> int:
        """Memory rows held: at most the layer's ``memory_len``."""
        return self._e - self._s

    def reset(self) -> None:
        """Forget every row (and the buffers)."""
        # _k, _v: (B, H, capacity, d_k), what the attention reads: the rows' K and V after the conv (the
        # projections themselves without one); _pk, _pv: (B, capacity, d_model), the projections before the
        # conv (None without a conv). The window is rows [_s, _e).
        self._k: Optional[Tensor] = None
        self._v: Optional[Tensor] = None
        self._pk: Optional[Tensor] = None
        self._pv: Optional[Tensor] = None
        self._s = self._e = 0
        self._owner = None  # weakref to the layer that filled it
        self._versions: Tuple[int, ...] = ()

    def reorder(self, index) -> None:
        """Keep the batch rows ``index`` (B',), in that order: beam search's surviving beams (a row may be
        kept twice), or the unfinished sequences of a batch. The next call takes z of batch B'."""
        if self._k is None:
            return
        idx = _checks.batch_index(index, self._k.shape[0], self._k.device)
        self._k, self._v, self._pk, self._pv = (None if t is None else t.index_select(0, idx)
                                                for t in (self._k, self._v, self._pk, self._pv))

    def _state(self) -> tuple:
        """The window and its buffers, for :meth:`_restore` (the benchmark repeats one step from one state)."""
        return (self._k, self._v, self._pk, self._pv, self._s, self._e, self._owner, self._versions)

    def _restore(self, state: tuple) -> None:
        """Back to a :meth:`_state` taken since: appends write only past the window's end, into its first
        K - 1 rows (recomputed from the same rows by the next call), or into new buffers, so the rows it
        names read the same. Valid for going back once, not for branching histories."""
        self._k, self._v, self._pk, self._pv, self._s, self._e, self._owner, self._versions = state

    def _check(self, layer: "RelConvMultiHeadAttention", z: Tensor) -> None:
        if self._k is None:
            return
        if self._owner() is not layer:
            raise ValueError("cache: filled by another RelConvMultiHeadAttention; keep one cache per layer "
                             "(or reset() it)")
        if self._versions != layer._projection_versions():
            raise ValueError("cache: the layer's W_k, W_v or K/V conv weights changed since the cache was filled "
                             "(an optimizer step or load_state_dict); its rows are stale: reset() it and run the "
                             "context again")
        B = self._k.shape[0]
        if z.shape[0] != B:
            raise ValueError(f"z: expected batch {B} (the cache's), got {tuple(z.shape)}")
        _checks.same_dtype("the cached rows", self._k, "z", z)
        _checks.same_device("the cached rows", self._k, "z", z)

    def _append(self, layer: "RelConvMultiHeadAttention", k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        """Add the L new rows k, v (B, L, C) (before the conv); returns the attention's K and V over the
        window plus the new rows, (B, H, length + L, d_k) after the conv (views of the buffers), and keeps
        the last ``memory_len`` rows for the next call."""
        B, L, C = k.shape
        H, d = layer.n_heads, layer.d_k
        W = self.length
        convs = layer.convs
        stale = self._k is not None and self._k.is_inference() and not torch.is_inference_mode_enabled()
        if self._k is None or self._e + L > self._k.shape[2] or stale:
            cap = max(2 * (W + L), 16)
            n_bufs = 4 if convs is not None else 2
            _checks.fits(n_bufs * B * cap * C * k.element_size(), k.device,
                         f"RelConvCache: {n_bufs} buffers of {cap} rows for (B {B}, d_model {C}) "
                         f"{_checks._dt(k.dtype)}")
            kw = dict(dtype=k.dtype, device=k.device)
            heads = [torch.empty(B, H, cap, d, **kw) for _ in range(2)]
            rows = [torch.empty(B, cap, C, **kw) for _ in range(n_bufs - 2)]
            if W:
                for new, old in zip(heads, (self._k, self._v)):
                    new[:, :, :W].copy_(old[:, :, self._s:self._e])
                for new, old in zip(rows, (self._pk, self._pv)):
                    new[:, :W].copy_(old[:, self._s:self._e])
            self._k, self._v = heads
            self._pk, self._pv = rows if rows else (None, None)
            self._s, self._e = 0, W
        s, e = self._s, self._e
        Lk = e + L - s
        outs = []
        for post, pre, new, name in ((self._k, self._pk, k, "k"), (self._v, self._pv, v, "v")):
            if convs is None:
                post[:, :, e:e + L].copy_(new.view(B, L, H, d).transpose(1, 2))
            else:
                # A row's conv reads the K1 rows before it. Rows at K1 or more past the window start
                # have all of them in the window: their outputs, computed once when the row came, are
                # reused. The first K1 rows of a window see zeros before its start, so they change as
                # the window slides: recomputed every call (K1 rows, not the window), in place, since
                # the start only moves forward and a row once among them never needs its full-context
                # value again.
                pre[:, e:e + L].copy_(new)
                conv = convs[name]
                K1 = conv.weight.shape[1] - 1
                lo = max(s, e - K1)
                post[:, :, e:e + L].copy_(conv(pre[:, lo:e + L], layer.backend)[:, e - lo:]
                                          .view(B, L, H, d).transpose(1, 2))
                h = min(K1, Lk)
                if h:
                    post[:, :, s:s + h].copy_(conv(pre[:, s:s + h], layer.backend).view(B, h, H, d).transpose(1, 2))
            outs.append(post[:, :, s:e + L])
        self._e = e + L
        self._s = max(s, self._e - layer.memory_len)
        self._owner, self._versions = weakref.ref(layer), layer._projection_versions()
        return outs[0], outs[1]


class RelConvMultiHeadAttention(nn.Module):
    """Relative (Transformer-XL) multi-head attention with causal depthwise-conv Q/K/V: RCMHA.

    ``forward(z, memory=None, cache=None) -> (out, new_memory)``: z (B, L, d_model); memory
    (B, M, d_model) the previous segment's layer inputs (or None); ``new_memory`` the last
    ``memory_len`` rows of ``[memory; z]``, detached (None when ``memory_len = 0``). Q = z W_q is
    convolved over the segment, K = [m; z] W_k and V = [m; z] W_v + b_v over memory plus segment.
    ``M + L <= max_distance``.

    For decoding pass ``cache=RelConvCache()`` instead of memory (inference only): the cache keeps
    the memory rows' projections, so a step projects its own rows only; ``new_memory`` is then None.

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

    def tables(self, span: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """(R (2p, H, d_k), S (2p, H)) of this layer: rows for the distances -p .. p-1, p = ``span``
        (default ``max_distance``, the whole table; at most ``max_distance``)."""
        p = self.P if span is None else _checks.positive_int(span, "span")
        if p > self.P:
            raise ValueError(f"span: expected at most max_distance = {self.P}, got {p}")
        if self.rel == "learned":
            return self.rel_emb[self.P - p:self.P + p], self.rel_bias[self.P - p:self.P + p]
        return self._sinusoidal_tables(-p, p)

    def _sinusoidal_tables(self, lo: int, hi: int) -> Tuple[Tensor, Tensor]:
        """Transformer-XL's R = phi(r) W_R and S[r] = v . R[r] for the distances lo .. hi-1."""
        w = self.w_r.weight
        R = self.w_r(_sinusoid(lo, hi, w.shape[1], w.device, w.dtype)).view(hi - lo, self.n_heads, self.d_k)
        return R, (R * self.pos_bias[None]).sum(-1)

    def _forward_tables(self, Lk: int) -> Tuple[Tensor, Tensor, int]:
        """(R, S, P) for a causal call over Lk keys with q_offset = Lk - L (the memory length).

        Learned tables go in whole: slicing them saves nothing, since the gradient of a slice is a
        zero-filled full table anyway. The sinusoidal table is a matmul per row, and the full one is
        2 * max_distance rows: at d_model 256, L 128, M 128 it took 17 of the 21 ms of a forward. A
        causal call only reads the distances -(Lk - 1) .. 0, so only those Lk rows are computed, placed
        at rows 1 .. Lk of a (2 Lk)-row table (P = Lk); the other rows are zeros no visible pair reads.
        """
        if self.rel == "learned":
            return self.rel_emb, self.rel_bias, self.P
        p = max(Lk, 1)
        R, S = self._sinusoidal_tables(1 - p, 1)
        R = torch.nn.functional.pad(R, (0, 0, 0, 0, 1, p - 1))
        S = torch.nn.functional.pad(S, (0, 0, 1, p - 1))
        return R, S, p

    def _projection_versions(self) -> Tuple[int, ...]:
        """In-place version counters of every weight a RelConvCache's rows depend on."""
        ts = [self.w_k.weight, self.w_v.weight, self.w_v.bias]
        if self.convs is not None:
            ts += [t for n in "kv" for t in (self.convs[n].weight, self.convs[n].bias) if t is not None]
        return tuple(t._version for t in ts)

    def forward(self, z: Tensor, memory: Optional[Tensor] = None,
                cache: Optional[RelConvCache] = None) -> Tuple[Tensor, Optional[Tensor]]:
        z = _checks.float_tensor(z, "z", 3)
        B, L, C = z.shape
        _checks.layer_input(z, "z", self.w_q.weight)
        if cache is not None:
            if not isinstance(cache, RelConvCache):
                raise TypeError(f"cache: expected a RelConvCache, got {type(cache).__name__}")
            if memory is not None:
                raise ValueError("memory: expected None with a cache (the cache holds the memory)")
            if not self.memory_len:
                raise ValueError("cache: the layer keeps no memory (memory_len = 0), so a cache would hold "
                                 "nothing; build it with memory_len > 0")
            if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
                raise ValueError("cache: is for inference (torch.no_grad() or torch.inference_mode()); under "
                                 "autograd pass memory=, which re-projects it so W_k and W_v get their gradients")
            cache._check(self, z)
            M = cache.length
        elif memory is None:
            M = 0
        else:
            memory = _checks.float_tensor(memory, "memory", 3)
            if memory.shape[0] != B or memory.shape[2] != C:
                raise ValueError(f"memory: expected shape (B, M, d_model) = ({B}, M, {C}), got {tuple(memory.shape)}")
            _checks.same_device("z", z, "memory", memory)
            _checks.same_dtype("z", z, "memory", memory)
            M = memory.shape[1]
        Lk = M + L
        why = table_range_error(L, Lk, self.P, True, M)
        if why is not None:
            raise ValueError(f"max_distance: {why}; build the layer with a larger max_distance or use a shorter "
                             "segment or memory")
        q = self.w_q(z)
        if self.convs is not None:
            q = self.convs["q"](q, self.backend)
        q = q.view(B, L, self.n_heads, self.d_k).transpose(1, 2)
        full = None
        if cache is not None:
            k, v = cache._append(self, self.w_k(z), self.w_v(z))
        else:
            full = z if memory is None else torch.cat([memory, z], dim=1)
            k, v = self.w_k(full), self.w_v(full)
            if self.convs is not None:
                k = self.convs["k"](k, self.backend)
                v = self.convs["v"](v, self.backend)
            k, v = (t.view(B, Lk, self.n_heads, self.d_k).transpose(1, 2) for t in (k, v))
        R, S, P = self._forward_tables(Lk)
        o = relative_attention(q, k, v, R, S, self.content_bias, causal=True, q_offset=M, max_distance=P,
                               backend=self.backend)
        out = self.w_o(o.transpose(1, 2).reshape(B, L, C))
        new_memory = full[:, -self.memory_len:].detach() if self.memory_len and full is not None else None
        return out, new_memory
