"""Relative convolutional attention (RCMHA): torch.library ops + public API.

Ops (namespace ``embkern``; ``backend`` is resolved before the op is called):

=====================  ==================================================  =====================
op                     computes                                            backward
=====================  ==================================================  =====================
rca_forward            O (B, H, Lq, dv), lse (B, H, Lq)                    rca_backward
rca_backward           dq, dk, dv, dR, dS, du                              --
causal_conv            y (..., T, C) causal depthwise convolution           causal_conv_backward
causal_conv_backward   dx, dweight, dbias                                  --
=====================  ==================================================  =====================

Backends: the reference (``embkern.reference.rel_conv_attention``, every
dtype and device); ``cpu`` (the fused C++ kernels of
``src/cpu/rel_conv_attention.cpp``, float32 / float64); and ``"triton"``
(``embkern.triton_kernels.rel_conv_attention``; fp16 / bf16 / fp32, the
automatic choice for CUDA tensors), which fuses the relative terms into
flash-attention 2 tiles, forward and backward, in O(L d) memory with no
atomics, and has the causal conv too (``docs/ops/rel_conv_attention.md``).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _backends, _checks
from .._backends import BackendSupport, OpDescriptor
from ..reference import rel_conv_attention as ref

DESCRIPTOR = OpDescriptor(
    name="rel_conv_attention",
    kernels=("forward", "backward", "conv_forward", "conv_backward"),
    backends={
        "reference": BackendSupport(frozenset(_checks.FLOATS), frozenset({"cpu", "cuda"})),
        "cpu": BackendSupport(frozenset({torch.float32, torch.float64}), frozenset({"cpu"}),
                              symbol="rel_conv_attention.{kernel}"),
        "triton": BackendSupport(frozenset({torch.float16, torch.bfloat16, torch.float32}),
                                 frozenset({"cpu", "cuda"}), symbol="rel_conv_attention.{kernel}"),
    },
    entry_points={"relative_attention": ("forward", "backward"),
                  "causal_depthwise_conv": ("conv_forward", "conv_backward")},
)
KERNELS = DESCRIPTOR.kernels


# ---------------------------------------------------------------------------
# Reference kernels


def _ref_forward(q, k, v, R, S, u, causal, q_offset):
    return ref.attention_forward(q, k, v, R, S, u, causal, q_offset)


def _ref_backward(grad_out, q, k, v, R, S, u, out, lse, causal, q_offset):
    return ref.attention_backward(grad_out, q, k, v, R, S, u, causal, q_offset)


def _ref_conv_backward(grad_y, x, weight, has_bias):
    dx, dw, db = ref.causal_depthwise_conv_backward(grad_y, x, weight, has_bias)
    return dx, dw, (db if db is not None else weight.new_empty(0))


_REFERENCE = {"forward": _ref_forward, "backward": _ref_backward, "conv_forward": ref.causal_depthwise_conv,
              "conv_backward": _ref_conv_backward}


# ---------------------------------------------------------------------------
# C++ kernels (src/cpu/rel_conv_attention.cpp): outputs allocated in torch,
# numpy views (zero copy) handed to _C; inputs made contiguous (a copy only
# when they are not).


def _np(t: Tensor):
    return t.detach().contiguous().numpy()


def _cpu():
    return _backends.cpu_module().rel_conv_attention


def _np_rows(t: Tensor):
    """The forward's k and v: read in place when each (batch, head)'s rows are packed (a slice along Lk of
    the (B, H, capacity, d_k) buffers :class:`embkern.nn.RelConvCache` keeps), else a contiguous copy."""
    return t.detach().numpy() if _checks.packed_below(t, 2) else _np(t)


def _cpu_forward(q, k, v, R, S, u, causal, q_offset):
    B, H, Lq, _ = q.shape
    out = torch.empty(B, H, Lq, v.shape[-1], dtype=q.dtype)
    lse = torch.empty(B, H, Lq, dtype=q.dtype)
    _cpu().forward(_np(q), _np_rows(k), _np_rows(v), _np(R), _np(S), _np(u), out.numpy(), lse.numpy(), bool(causal),
                   int(q_offset))
    return out, lse


def _cpu_backward(grad_out, q, k, v, R, S, u, out, lse, causal, q_offset):
    grads = tuple(torch.empty(t.shape, dtype=q.dtype) for t in (q, k, v, R, S, u))
    _cpu().backward(_np(grad_out.to(q.dtype)), _np(q), _np(k), _np(v), _np(R), _np(S), _np(u), _np(out.to(q.dtype)),
                    _np(lse.to(q.dtype)), *(g.numpy() for g in grads), bool(causal), int(q_offset))
    return grads


def _ntc(shape) -> Tuple[int, int, int]:
    """(N, T, C) of an (..., T, C) shape, N the product of the leading dims (reshape(-1, T, C) cannot
    infer N when T or C is 0)."""
    return math.prod(shape[:-2]), shape[-2], shape[-1]


def _as_ntc(x: Tensor) -> Tensor:
    return x.detach().reshape(_ntc(x.shape)).contiguous()


def _cpu_conv_forward(x, weight, bias):
    y = torch.empty(x.shape, dtype=x.dtype)
    _cpu().conv_forward(_as_ntc(x).numpy(), _np(weight), None if bias is None else _np(bias),
                        y.view(_ntc(x.shape)).numpy())
    return y


def _cpu_conv_backward(grad_y, x, weight, has_bias):
    dx = torch.empty(x.shape, dtype=x.dtype)
    dw = torch.empty(weight.shape, dtype=x.dtype)
    db = torch.empty(weight.shape[0], dtype=x.dtype) if has_bias else weight.new_empty(0)
    _cpu().conv_backward(_as_ntc(grad_y.to(x.dtype)).numpy(), _as_ntc(x).numpy(), _np(weight),
                         dx.view(_ntc(x.shape)).numpy(), dw.numpy(), db.numpy() if has_bias else None)
    return dx, dw, db


_CPU = {"forward": _cpu_forward, "backward": _cpu_backward, "conv_forward": _cpu_conv_forward,
        "conv_backward": _cpu_conv_backward}


def _implementations(kernel: str) -> dict:
    return {"reference": _REFERENCE[kernel], "cpu": _CPU[kernel],
            "triton": f"embkern.triton_kernels.rel_conv_attention:{kernel}"}


# ---------------------------------------------------------------------------
# torch.library ops


@torch.library.custom_op("embkern::rca_forward", mutates_args=())
def rca_forward(q: Tensor, k: Tensor, v: Tensor, R: Tensor, S: Tensor, u: Tensor, causal: bool, q_offset: int,
                backend: str) -> Tuple[Tensor, Tensor]:
    """(O (B, H, Lq, dv) in q's dtype, lse (B, H, Lq) in the accumulation dtype)."""
    return _ref_forward(q, k, v, R, S, u, causal, q_offset)


@torch.library.custom_op("embkern::rca_backward", mutates_args=())
def rca_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, R: Tensor, S: Tensor, u: Tensor, out: Tensor,
                 lse: Tensor, causal: bool, q_offset: int,
                 backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _ref_backward(grad_out, q, k, v, R, S, u, out, lse, causal, q_offset)


@torch.library.custom_op("embkern::causal_conv", mutates_args=())
def causal_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], backend: str) -> Tensor:
    return ref.causal_depthwise_conv(x, weight, bias)


@torch.library.custom_op("embkern::causal_conv_backward", mutates_args=())
def causal_conv_backward(grad_y: Tensor, x: Tensor, weight: Tensor, has_bias: bool,
                         backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias); dbias is empty (0,) without a bias."""
    return _ref_conv_backward(grad_y, x, weight, has_bias)


_backends.route(rca_forward, _implementations("forward"))
_backends.route(rca_backward, _implementations("backward"))
_backends.route(causal_conv, _implementations("conv_forward"))
_backends.route(causal_conv_backward, _implementations("conv_backward"))


@rca_forward.register_fake
def _(q, k, v, R, S, u, causal, q_offset, backend):
    B, H, Lq, _ = q.shape
    return q.new_empty(B, H, Lq, v.shape[-1]), q.new_empty(B, H, Lq, dtype=ref._acc_dtype(q.dtype))


@rca_backward.register_fake
def _(grad_out, q, k, v, R, S, u, out, lse, causal, q_offset, backend):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v, R, S, u))


@causal_conv.register_fake
def _(x, weight, bias, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@causal_conv_backward.register_fake
def _(grad_y, x, weight, has_bias, backend):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format),
            weight.new_empty(weight.shape[0]) if has_bias else weight.new_empty(0))


def _rca_setup(ctx, inputs, output):
    q, k, v, R, S, u, causal, q_offset, backend = inputs
    ctx.save_for_backward(q, k, v, R, S, u, output[0], output[1])
    ctx.args = (causal, q_offset, backend)


def _rca_bwd(ctx, grad_out, grad_lse):
    q, k, v, R, S, u, out, lse = ctx.saved_tensors
    grads = rca_backward(grad_out.contiguous(), q, k, v, R, S, u, out, lse, *ctx.args)
    return (*grads, None, None, None)


torch.library.register_autograd("embkern::rca_forward", _rca_bwd, setup_context=_rca_setup)


def _conv_setup(ctx, inputs, output):
    x, weight, bias, backend = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias, ctx.backend = bias is not None, backend


def _conv_bwd(ctx, grad_y):
    x, weight = ctx.saved_tensors
    dx, dw, db = causal_conv_backward(grad_y.contiguous(), x, weight, ctx.has_bias, ctx.backend)
    return dx, dw, (db if ctx.has_bias else None), None


torch.library.register_autograd("embkern::causal_conv", _conv_bwd, setup_context=_conv_setup)


# ---------------------------------------------------------------------------
# Public API


def relative_attention(q: Tensor, k: Tensor, v: Tensor, rel_emb: Tensor, rel_bias: Tensor, content_bias: Tensor,
                       causal: bool = True, q_offset: Optional[int] = None, max_distance: int = 4096,
                       backend: Optional[str] = None) -> Tensor:
    """Transformer-XL learned relative attention (RCMHA's scores).

    ``s_ij = [(q_i + u) . k_j + q_i . R[P + j - i_a] + S[P + j - i_a]] / sqrt(d)``, ``i_a = i + q_offset``,
    P = ``max_distance``; causal: key j visible iff ``j <= i_a``; ``O_i = sum_j softmax_j(s)_ij v_j``.

    Args:
        q: (B, H, Lq, d) float16 / bfloat16 / float32 / float64.
        k: (B, H, Lk, d), v: (B, H, Lk, dv): same dtype and device.
        rel_emb: R (2P, H, d); rel_bias: S (2P, H); content_bias: u (H, d); same dtype and device.
        causal: mask keys after ``i_a``. q_offset: default ``Lk - Lq`` (the memory length).
        max_distance: P, the tables' half-width; every visible pair must have
            ``-P <= j - i_a < P`` and ``Lk <= P`` (else ValueError).
        backend: None (fastest available) or one of ``embkern._backends.BACKENDS``.

    Returns:
        (B, H, Lq, dv) in q's dtype; fp16/bf16 accumulate in float32. Differentiable in
        q, k, v, R, S and u. A query that sees no key outputs zeros.
    """
    q, k, v = (_checks.float_tensor(t, n, 4) for t, n in ((q, "q"), (k, "k"), (v, "v")))
    R = _checks.float_tensor(rel_emb, "rel_emb", 3)
    S = _checks.float_tensor(rel_bias, "rel_bias", 2)
    u = _checks.float_tensor(content_bias, "content_bias", 2)
    for name, t in (("k", k), ("v", v), ("rel_emb", R), ("rel_bias", S), ("content_bias", u)):
        _checks.same_device("q", q, name, t)
        _checks.same_dtype("q", q, name, t)
    B, H, Lq, d = q.shape
    if tuple(k.shape[:2]) != (B, H) or k.shape[3] != d:
        raise ValueError(f"k: expected shape (B, H, Lk, d) = ({B}, {H}, Lk, {d}), got {tuple(k.shape)}")
    Lk = k.shape[2]
    if tuple(v.shape[:3]) != (B, H, Lk):
        raise ValueError(f"v: expected shape (B, H, Lk, dv) = ({B}, {H}, {Lk}, dv), got {tuple(v.shape)}")
    P = _checks.positive_int(max_distance, "max_distance")
    if tuple(R.shape) != (2 * P, H, d):
        raise ValueError(f"rel_emb: expected shape (2 * max_distance, H, d) = ({2 * P}, {H}, {d}), got "
                         f"{tuple(R.shape)}")
    if tuple(S.shape) != (2 * P, H):
        raise ValueError(f"rel_bias: expected shape (2 * max_distance, H) = ({2 * P}, {H}), got {tuple(S.shape)}")
    if tuple(u.shape) != (H, d):
        raise ValueError(f"content_bias: expected shape (H, d) = ({H}, {d}), got {tuple(u.shape)}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    q_offset = ref.default_q_offset(Lq, Lk) if q_offset is None else _checks.integer(q_offset, "q_offset")
    why = ref.table_range_error(Lq, Lk, P, causal, q_offset)
    if why is not None:
        raise ValueError(f"max_distance: {why}; raise max_distance (and the tables) or shorten the keys")
    if Lq == 0 or Lk == 0:
        # no (i, j) pair: nothing depends on the offset, which the range check above then lets through
        # at any size (2^70 did not fit the op's int64 schema)
        q_offset = Lk - Lq
    elif causal and q_offset < -Lq:
        # every key masked for every query, at any such offset (the kernels clamp it the same way); -2^70
        # passed the range check and then did not fit the op's int64 schema
        q_offset = -Lq - 1
    be = _backends.resolve(DESCRIPTOR, "relative_attention", backend, q.device.type, q.dtype)
    # out and lse, the copies of non-contiguous inputs, and the reference's (B, H, Lq, Lk) content,
    # position and probability terms: checked before any of it is allocated
    acc = 8 if q.dtype == torch.float64 else 4
    # the cpu and triton forwards read k and v in place when each (batch, head)'s rows are packed
    kv = [t for t in (k, v) if be == "reference" or not _checks.packed_below(t, 2)]
    need = B * H * Lq * (v.shape[-1] * q.element_size() + acc) + _checks.copy_bytes(q, *kv, R, S, u)
    if be == "reference":
        need += 3 * B * H * Lq * Lk * acc
    _checks.fits(need, q.device, f"relative_attention(backend={be!r}) of q {tuple(q.shape)}, k {tuple(k.shape)}, "
                 f"v {tuple(v.shape)}")
    out, _ = rca_forward(q, k, v, R, S, u, causal, int(q_offset), be)
    return out


def causal_depthwise_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                          backend: Optional[str] = None) -> Tensor:
    """Causal depthwise convolution along time: ``y[t] = sum_k weight[:, k] x[t - K + 1 + k] + bias``.

    Args:
        x: (..., T, C) float tensor (time second to last, channels last).
        weight: (C, K), taps oldest first (K = 3 is RCMHA's); bias: (C,) or None. Same dtype and device.

    Returns:
        (..., T, C) in x's dtype; ``x[t < 0] = 0``. Differentiable in x, weight and bias.
    """
    x = _checks.float_tensor(x, "x")
    if x.dim() < 2:
        raise ValueError(f"x: expected shape (..., T, C) with at least 2 dims, got {tuple(x.shape)}")
    weight = _checks.float_tensor(weight, "weight", 2)
    C = x.shape[-1]
    if weight.shape[0] != C or weight.shape[1] < 1:
        raise ValueError(f"weight: expected shape (C, K) = ({C}, K >= 1), got {tuple(weight.shape)}")
    _checks.same_device("x", x, "weight", weight)
    _checks.same_dtype("x", x, "weight", weight)
    if bias is not None:
        bias = _checks.float_tensor(bias, "bias", 1)
        if bias.shape[0] != C:
            raise ValueError(f"bias: expected shape (C,) = ({C},), got {tuple(bias.shape)}")
        _checks.same_device("x", x, "bias", bias)
        _checks.same_dtype("x", x, "bias", bias)
    be = _backends.resolve(DESCRIPTOR, "causal_depthwise_conv", backend, x.device.type, x.dtype)
    _checks.fits(x.numel() * x.element_size() + _checks.copy_bytes(x), x.device,
                 f"causal_depthwise_conv: the output of x {tuple(x.shape)} {x.dtype} (and a contiguous copy of x "
                 "when it is not)")
    return causal_conv(x, weight, bias, be)


__all__ = ["relative_attention", "causal_depthwise_conv", "DESCRIPTOR"]
