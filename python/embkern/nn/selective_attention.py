"""Selective self-attention layers (docs/ops/selective_attention.md) and conversion of existing models.

* :class:`SelectiveSelfAttention`: a causal multi-head (GQA) self-attention
  layer with query and value temperatures, position- and token-aware, through
  :func:`embkern.selective_attention`, with a KV cache (:class:`KVCache`) whose
  decode steps take n from absolute positions.
* :func:`convert_to_selective`: replaces the causal self-attention of a
  Hugging Face ``GPT2LMHeadModel`` (or a nanoGPT-style block: ``c_attn``,
  ``c_proj``, ``n_head``) by selective attention that reuses its projection
  weights, initialised so the converted model's outputs equal the original's
  at step 0 (to rounding).

Temperatures (per layer): ``tau = tau_pos(n) + tau_tok(x)`` with
``tau_pos = 1 + g(beta) log n`` (one ``beta`` per layer, as the authors; or per
head) and ``tau_tok = tanh(u . GELU(x))`` (``u`` per head, zero at init, so the
token term starts at 0 and learns).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .. import _checks
from ..ops.selective_attention import GATES, selective_attention, selective_temperatures

__all__ = ["KVCache", "SelectiveTemperature", "SelectiveSelfAttention", "convert_to_selective"]


class KVCache:
    """Keys, values and value temperatures of the tokens seen so far, (B, Hkv, length, ...).

    One per layer; :meth:`SelectiveSelfAttention.forward` appends to it. ``length``
    is the absolute position of the next token.

    Appends made without autograd (``torch.no_grad()`` / ``inference_mode``, or
    inputs that need no gradient) write into buffers of ``capacity`` tokens that
    grow by doubling, so a decode step copies only its own token (amortised), and
    ``k`` / ``v`` / ``tau_v`` are views ``[:, :, :length]`` of them that the cpu
    kernel reads in place. Concatenating instead copies the whole cache every step:
    at B 4, Hkv 8, 4096 tokens, d 64 (fp32) that was 19 ms a step against 3.7 ms for
    the step's attention. Appends that need gradients (training through the cache)
    concatenate, so autograd sees every step; the buffers then hold exactly ``length``.

    Args:
        capacity: tokens to allocate at the first append (at least what it brings);
            None: exactly what the first append brings, doubling from there. Give the
            longest sequence you will decode to allocate once and never copy.
    """

    def __init__(self, capacity: Optional[int] = None):
        self.capacity = None if capacity is None else _checks.positive_int(capacity, "capacity")
        self.reset()

    @property
    def length(self) -> int:
        return self._len

    @property
    def k(self) -> Optional[Tensor]:
        """(B, Hkv, length, d) keys, or None before the first append."""
        return None if self._k is None else self._k[:, :, :self._len]

    @property
    def v(self) -> Optional[Tensor]:
        """(B, Hkv, length, dv) values, or None before the first append."""
        return None if self._v is None else self._v[:, :, :self._len]

    @property
    def tau_v(self) -> Optional[Tensor]:
        """(B, Hkv, length) value temperatures, or None (none appended, or the layer has none)."""
        return None if self._tv is None else self._tv[:, :, :self._len]

    def _check(self, k: Tensor, v: Tensor, tau_v: Optional[Tensor]) -> None:
        k = _checks.float_tensor(k, "k", 4)
        v = _checks.float_tensor(v, "v", 4)
        B, H, n = k.shape[:3]
        if tuple(v.shape[:3]) != (B, H, n):
            raise ValueError(f"v: expected (B, Hkv, n, dv) = ({B}, {H}, {n}, dv) (k's), got {tuple(v.shape)}")
        _checks.same_dtype("k", k, "v", v)
        _checks.same_device("k", k, "v", v)
        if tau_v is not None:
            _checks.float_tensor(tau_v, "tau_v", 3)
            if tuple(tau_v.shape) != (B, H, n):
                raise ValueError(f"tau_v: expected (B, Hkv, n) = ({B}, {H}, {n}) (k's), got {tuple(tau_v.shape)}")
            _checks.same_device("k", k, "tau_v", tau_v)
        if self._k is None:
            return
        for name, new, old in (("k", k, self._k), ("v", v, self._v), ("tau_v", tau_v, self._tv)):
            if (new is None) != (old is None):
                raise ValueError(f"{name}: expected {'None' if old is None else 'a tensor'} as in the earlier "
                                 f"appends, got {'None' if new is None else 'a tensor'}")
            if new is None:
                continue
            want = tuple(old.shape[:2]) + tuple(old.shape[3:])
            got = tuple(new.shape[:2]) + tuple(new.shape[3:])
            if got != want:
                raise ValueError(f"{name}: expected shape {want[:2] + ('n',) + want[2:]} (the cached tokens'), "
                                 f"got {tuple(new.shape)}")
            _checks.same_dtype(f"the cached {name}", old, name, new)
            _checks.same_device(f"the cached {name}", old, name, new)

    def append(self, k: Tensor, v: Tensor, tau_v: Optional[Tensor]) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """Add n tokens: k (B, Hkv, n, d), v (B, Hkv, n, dv), tau_v (B, Hkv, n) or None (as in every
        append). Returns the whole cache ``(k, v, tau_v)``, each (B, Hkv, length, ...)."""
        self._check(k, v, tau_v)
        new = (k, v, tau_v)
        L, n = self._len, k.shape[2]
        stored = (self._k, self._v, self._tv)
        graph = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in new)
        if graph or (not self._owned and any(t is not None and t.requires_grad for t in stored)):
            old = (self.k, self.v, self.tau_v)
            self._k, self._v, self._tv = (t if o is None else (None if t is None else torch.cat([o, t], dim=2))
                                          for o, t in zip(old, new))
            self._owned = False  # the caller's tensors (first append) or autograd's: never written in place
        else:
            # new buffers when there are none of ours, too small ones, or ones made under inference_mode
            # (those cannot be written outside it)
            if (not self._owned or self._k.shape[2] < L + n
                    or (self._k.is_inference() and not torch.is_inference_mode_enabled())):
                cap = max(L + n, 2 * L, self.capacity or 0)
                self._k, self._v, self._tv = (None if t is None else self._grown(o, t, L, cap)
                                              for o, t in zip(stored, new))
                self._owned = True
            for buf, t in zip((self._k, self._v, self._tv), new):
                if t is not None:
                    buf[:, :, L:L + n].copy_(t)
        self._len = L + n
        return self.k, self.v, self.tau_v

    @staticmethod
    def _grown(old: Optional[Tensor], t: Tensor, L: int, cap: int) -> Tensor:
        shape = tuple(t.shape[:2]) + (cap,) + tuple(t.shape[3:])
        _checks.fits(math.prod(shape) * t.element_size(), t.device,
                     f"KVCache: a buffer of {cap} tokens for {tuple(t.shape)} {_checks._dt(t.dtype)} appends")
        buf = torch.empty(shape, dtype=t.dtype, device=t.device)
        if old is not None and L:
            buf[:, :, :L].copy_(old[:, :, :L])
        return buf

    def crop(self, length: int) -> None:
        """Keep the first ``length`` tokens (a rejected draft in speculative decoding, a rerun from a
        prefix); the buffers stay allocated. A negative ``length`` drops that many from the end."""
        length = _checks.integer(length, "length")
        if length < 0:
            length = max(0, self._len + length)
        if length > self._len:
            raise ValueError(f"length: expected at most the cached {self._len} tokens, got {length}")
        self._len = length  # the views k, v, tau_v end there; the next append writes (or concatenates) after it

    def reorder(self, index) -> None:
        """Keep the batch rows ``index`` (B',), in that order: beam search's surviving beams (a row may be
        kept twice), or the unfinished sequences of a batch. The next append takes (B', ...) tokens."""
        if self._k is None:
            return
        idx = _checks.batch_index(index, self._k.shape[0], self._k.device)
        # index_select makes new tensors: the cache's own buffers stay its own, a caller's or autograd's
        # tensors stay never written in place (the next append concatenates)
        self._k, self._v, self._tv = (None if t is None else t.index_select(0, idx)
                                      for t in (self._k, self._v, self._tv))

    def reset(self) -> None:
        """Forget every token (and the buffers)."""
        self._k: Optional[Tensor] = None
        self._v: Optional[Tensor] = None
        self._tv: Optional[Tensor] = None
        self._len = 0
        self._owned = False  # whether _k, _v, _tv are buffers this cache allocated (and may write)


class SelectiveTemperature(nn.Module):
    """One temperature producer: ``tau = tau_pos(n) + tau_tok(x)`` of (B, H, L, d) heads -> (B, H, L).

    position_aware: the ``1 + g(beta) log n`` term (``beta`` a scalar, or (H,) with
        ``per_head=True``); token_aware: the ``tanh(u . GELU(x))`` term, ``u`` (H, d).
    beta_init: 2.0 for fine-tuning with ``gate="expexp"`` (g ~ 6e-4, close to vanilla);
        0.0 with ``gate="linear"`` is exactly vanilla (g = 0) and still learns.
    """

    def __init__(self, n_heads: int, head_dim: int, position_aware: bool = True, token_aware: bool = True,
                 gate: str = "expexp", beta_init: float = 2.0, per_head: bool = False, dtype=None, device=None):
        super().__init__()
        _checks.choice(gate, "gate", GATES)
        self.gate = gate
        kw = dict(dtype=dtype, device=device)
        self.beta = (nn.Parameter(torch.full((n_heads,) if per_head else (), float(beta_init), **kw))
                     if position_aware else None)
        self.u = nn.Parameter(torch.zeros(n_heads, head_dim, **kw)) if token_aware else None

    def forward(self, x: Tensor, start) -> Tensor:
        return selective_temperatures(x, start, self.beta, self.u, self.gate)


def _heads(x: Tensor, n: int) -> Tensor:
    B, L, C = x.shape
    return x.view(B, L, n, C // n).transpose(1, 2)  # no -1: B or L may be 0


class _SelectiveCore(nn.Module):
    """The attention of one layer from projected heads: temperatures, cache, the fused op."""

    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int, query_temperature: bool,
                 value_temperature: bool, token_aware: bool, position_aware: bool, gate: str, beta_init: float,
                 per_head: bool, scale: Optional[float], backend: Optional[str], dtype=None, device=None):
        super().__init__()
        self.scale, self.backend = scale, backend
        kw = dict(position_aware=position_aware, token_aware=token_aware, gate=gate, beta_init=beta_init,
                  dtype=dtype, device=device)
        self.tau_q = SelectiveTemperature(n_heads, head_dim, per_head=per_head, **kw) if query_temperature else None
        self.tau_v = (SelectiveTemperature(n_kv_heads, head_dim, per_head=per_head, **kw) if value_temperature
                      else None)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, cache: Optional[KVCache]) -> Tensor:
        start = 0 if cache is None else cache.length
        tv = None if self.tau_v is None else self.tau_v(v, start)
        if cache is not None:
            k, v, tv = cache.append(k, v, tv)
        tq = self.tau_q(q, start) if self.tau_q is not None else q.new_ones(q.shape[:3], dtype=torch.float32)
        return selective_attention(q, k, v, tq, tv, causal=True, scale=self.scale, q_offset=start,
                                   backend=self.backend)


class SelectiveSelfAttention(nn.Module):
    """Causal self-attention with selective (query and value) temperatures.

    x: (B, L, d_model) -> (B, L, d_model). ``n_kv_heads`` < ``n_heads`` is GQA.
    ``forward(x, cache=KVCache())`` appends the new tokens' keys and values
    and attends over the whole cache, with positions ``cache.length ...``:
    decoding token by token equals the full-sequence forward.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: Optional[int] = None, query_temperature: bool = True,
                 value_temperature: bool = True, token_aware: bool = True, position_aware: bool = True,
                 gate: str = "expexp", beta_init: float = 2.0, per_head_beta: bool = False, bias: bool = True,
                 backend: Optional[str] = None, dtype=None, device=None):
        super().__init__()
        _checks.positive_int(d_model, "d_model")
        _checks.positive_int(n_heads, "n_heads")
        n_kv_heads = n_heads if n_kv_heads is None else _checks.positive_int(n_kv_heads, "n_kv_heads")
        if d_model % n_heads:
            raise ValueError(f"d_model: expected a multiple of n_heads = {n_heads}, got {d_model}")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads: expected a divisor of n_heads = {n_heads}, got {n_kv_heads}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, d_model // n_heads
        kw = dict(dtype=dtype, device=device)
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias, **kw)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias, **kw)
        self.core = _SelectiveCore(n_heads, n_kv_heads, self.head_dim, query_temperature, value_temperature,
                                   token_aware, position_aware, gate, beta_init, per_head_beta, None, backend, **kw)

    def forward(self, x: Tensor, cache: Optional[KVCache] = None) -> Tensor:
        x = _checks.float_tensor(x, "x", 3)
        _checks.layer_input(x, "x", self.q_proj.weight)
        B, L, _ = x.shape
        q = _heads(self.q_proj(x), self.n_heads)
        k = _heads(self.k_proj(x), self.n_kv_heads)
        v = _heads(self.v_proj(x), self.n_kv_heads)
        o = self.core(q, k, v, cache)
        return self.o_proj(o.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim))


# ---------------------------------------------------------------------------
# Conversion of existing models


class _GPT2Selective(nn.Module):
    """Stands in for a Hugging Face GPT2Attention: the same c_attn / c_proj, selective attention between.

    Follows GPT2Attention's call: ``(hidden_states, cache=None, attention_mask=None, ...) -> (out, None)``,
    with HF's ``Cache`` (``update``, ``get_seq_length``) for generation. Attention dropout is not applied
    (the fused op has none); padding masks are rejected.
    """

    def __init__(self, attn: nn.Module, core: _SelectiveCore):
        super().__init__()
        self.c_attn, self.c_proj, self.resid_dropout = attn.c_attn, attn.c_proj, attn.resid_dropout
        self.num_heads, self.head_dim, self.split_size = attn.num_heads, attn.head_dim, attn.split_size
        self.layer_idx = attn.layer_idx
        self.core = core

    def forward(self, hidden_states: Tensor, cache=None, attention_mask: Optional[Tensor] = None,
                encoder_hidden_states=None, **kwargs):
        if encoder_hidden_states is not None:
            raise ValueError("encoder_hidden_states: selective attention replaces causal self-attention only")
        B, L, _ = hidden_states.shape
        q, k, v = self.c_attn(hidden_states).split(self.split_size, dim=2)
        q, k, v = (_heads(t, self.num_heads) for t in (q, k, v))
        start = 0
        if cache is not None:
            start = int(cache.get_seq_length(self.layer_idx))
        _reject_padding(attention_mask, L, start + L)
        tq = self.core.tau_q(q, start) if self.core.tau_q is not None else None
        tv = self.core.tau_v(v, start) if self.core.tau_v is not None else None
        if cache is not None:
            # HF's cache keeps keys and values only, so it gets the values pre-scaled, tau_v v (rounded once to
            # v's dtype, as the Triton kernel rounds them when it loads v): the attention reads nothing else of
            # v, and a step computes the temperatures of its own tokens only. Recomputing every cached token's
            # tau_v instead took 35 ms a step at B 4, H 8, 4096 tokens, d 64, ten times the attention.
            if tv is not None:
                v = (v.to(tv.dtype) * tv[..., None]).to(v.dtype)
                tv = None
            k, v = cache.update(k, v, self.layer_idx)
        if tq is None:
            tq = q.new_ones(q.shape[:3], dtype=torch.float32)
        o = selective_attention(q, k, v, tq, tv, causal=True, scale=self.core.scale, q_offset=start,
                                backend=self.core.backend)
        out = self.resid_dropout(self.c_proj(o.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim)))
        return out, None


class _NanoGPTSelective(nn.Module):
    """Stands in for a nanoGPT CausalSelfAttention (``c_attn`` Linear(C, 3C), ``c_proj``, ``n_head``): x -> y."""

    def __init__(self, attn: nn.Module, core: _SelectiveCore):
        super().__init__()
        self.c_attn, self.c_proj, self.n_head = attn.c_attn, attn.c_proj, attn.n_head
        self.resid_dropout = getattr(attn, "resid_dropout", nn.Identity())
        self.core = core

    def forward(self, x: Tensor, cache: Optional[KVCache] = None) -> Tensor:
        x = _checks.float_tensor(x, "x", 3)
        _checks.layer_input(x, "x", self.c_attn.weight)
        B, L, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (_heads(t, self.n_head) for t in (q, k, v))
        o = self.core(q, k, v, cache)
        return self.resid_dropout(self.c_proj(o.transpose(1, 2).reshape(B, L, C)))


def _reject_padding(mask: Optional[Tensor], Lq: int, Lk: int) -> None:
    """The converted layer is causal over absolute positions; a mask that hides more than that is padding."""
    if mask is None:
        return
    if mask.dim() == 2:  # (B, Lk) 1 = keep, 0 = padding
        if bool((mask == 0).any()):
            raise ValueError("attention_mask: has padding (zeros); the selective attention layer supports "
                             "unpadded causal batches only")
        return
    if mask.dtype == torch.bool:
        hidden = ~mask
    else:
        hidden = mask < -1e4  # HF's additive masks use the dtype's minimum
    # columns are key positions from 0: exactly Lk of them for a growing cache, the whole buffer for a static one
    hidden = hidden.reshape(-1, *hidden.shape[-2:])[..., -Lq:, :Lk]
    i = torch.arange(Lq, device=hidden.device)[:, None] + (Lk - Lq)
    j = torch.arange(Lk, device=hidden.device)[None, :]
    if bool((hidden & (j <= i)).any()):
        raise ValueError("attention_mask: hides tokens a causal mask would show (padding); the selective attention "
                         "layer supports unpadded causal batches only")


def convert_to_selective(model: nn.Module, query_temperature: bool = True, value_temperature: bool = True,
                         token_aware: bool = True, position_aware: bool = True, gate: str = "linear",
                         beta_init: Optional[float] = None, per_head_beta: bool = False,
                         backend: Optional[str] = None) -> nn.Module:
    """Replace every causal self-attention of ``model`` (in place) by selective attention; returns ``model``.

    Recognised: Hugging Face ``GPT2Attention`` (``GPT2LMHeadModel``, ``GPT2Model``) and nanoGPT-style
    attention modules (``c_attn``: Linear(C, 3C), ``c_proj``, ``n_head``). The projections are reused;
    the temperatures are new parameters initialised to tau = 1 exactly (``u = 0``; with the default
    ``gate="linear"``, ``beta = 0`` gives g = 0), so the converted model's outputs equal the
    original's at step 0 to rounding, and every temperature parameter still gets a gradient.
    ``gate="expexp"`` with the authors' ``beta_init=2.0`` starts close to, not at, the original
    (g ~ 6e-4, tau = 1 + g log n).

    Raises:
        ValueError: no causal self-attention module was found.
    """
    _checks.choice(gate, "gate", GATES)
    if beta_init is None:
        beta_init = 0.0 if gate == "linear" else 2.0
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            kind = _attention_kind(child)
            if kind is None:
                continue
            heads = child.num_heads if kind == "gpt2" else child.n_head
            C = child.c_proj.weight.shape[0] if kind == "nanogpt" else child.embed_dim
            if C % heads:
                raise ValueError(f"model: {name} ({type(child).__name__}) has an embedding width {C} that its "
                                 f"{heads} heads do not divide")
            head_dim = C // heads
            w = child.c_attn.weight
            scale = float(child.scaling) if kind == "gpt2" else 1.0 / math.sqrt(head_dim)
            core = _SelectiveCore(heads, heads, head_dim, query_temperature, value_temperature, token_aware,
                                  position_aware, gate, beta_init, per_head_beta, scale, backend, dtype=w.dtype,
                                  device=w.device)
            setattr(parent, name, (_GPT2Selective if kind == "gpt2" else _NanoGPTSelective)(child, core))
            replaced += 1
    if not replaced:
        raise ValueError("model: expected a GPT-2 (Hugging Face GPT2Attention) or nanoGPT-style causal "
                         "self-attention module (c_attn, c_proj, n_head), found none")
    return model


def _attention_kind(m: nn.Module) -> Optional[str]:
    if type(m).__name__ == "GPT2Attention":
        if getattr(m, "is_cross_attention", False):
            return None
        if getattr(m, "reorder_and_upcast_attn", False):
            return None  # a different rounding recipe; the plain path is what conversion preserves
        return "gpt2"
    if (hasattr(m, "c_attn") and hasattr(m, "c_proj") and hasattr(m, "n_head")
            and isinstance(m.c_attn, nn.Linear) and not isinstance(m, (_GPT2Selective, _NanoGPTSelective))):
        return "nanogpt"
    return None
