"""Selective self-attention (SSA): torch.library ops + public API.

Ops (namespace ``embkern``; ``backend`` is resolved before the op is called):

======================  ==============================================  ======================
op                      computes                                        backward
======================  ==============================================  ======================
ssa_forward             O (B, Hq, Lq, dv), lse (B, Hq, Lq)              ssa_backward
ssa_backward            dq, dk, dv, dtau_q, dtau_v                      --
======================  ==============================================  ======================

The reference (``embkern.reference.selective_attention``) is the default
kernel on every device. The temperature producers
(:func:`selective_temperatures`) are ordinary torch ops with autograd: they are
O(L d), and the attention is where the time goes (``docs/ops/selective_attention.md``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _backends, _checks
from .._backends import BackendSupport, OpDescriptor
from ..reference import selective_attention as ref

GATES = ref.GATES

DESCRIPTOR = OpDescriptor(
    name="selective_attention",
    kernels=("forward", "backward"),
    backends={
        "reference": BackendSupport(frozenset(_checks.FLOATS), frozenset({"cpu", "cuda"})),
        "cpu": BackendSupport(frozenset({torch.float32, torch.float64}), frozenset({"cpu"}),
                              symbol="selective_attention.{kernel}"),
        "triton": BackendSupport(frozenset({torch.float16, torch.bfloat16, torch.float32}),
                                 frozenset({"cpu", "cuda"}), symbol="selective_attention.{kernel}"),
    },
    entry_points={"selective_attention": ("forward", "backward")},
)
KERNELS = DESCRIPTOR.kernels


# ---------------------------------------------------------------------------
# Reference kernels (the op bodies for backend="reference")


def _ref_forward(q, k, v, tau_q, tau_v, causal, scale, q_offset):
    return ref.attention_forward(q, k, v, tau_q, tau_v, causal, scale, q_offset)


def _ref_backward(grad_out, q, k, v, tau_q, tau_v, out, lse, causal, scale, q_offset):
    dq, dk, dv, dtq, dtv = ref.attention_backward(grad_out, q, k, v, tau_q, tau_v, out, lse, causal, scale,
                                                  q_offset)
    return dq, dk, dv, dtq, (dtv if dtv is not None else tau_q.new_empty(0))


_REFERENCE = {"forward": _ref_forward, "backward": _ref_backward}


# ---------------------------------------------------------------------------
# C++ kernels: allocate outputs in torch, hand numpy views (zero copy) to _C.
# Inputs are made contiguous (a copy only when they are not) and temperatures
# cast to q's dtype, the accumulation dtype of float32 / float64.


def _np(t: Optional[Tensor], dtype: Optional[torch.dtype] = None):
    if t is None:
        return None
    t = t.detach()
    if dtype is not None:
        t = t.to(dtype)
    return t.contiguous().numpy()


def _np_rows(t: Optional[Tensor], dtype: torch.dtype):
    """The forward's k, v, tau_v: read in place when each kv head's rows are packed (a slice along Lk of a
    larger cache buffer, as :class:`embkern.nn.KVCache` keeps; copying a 4096-token fp32 cache at
    B 4, H 8, d 64 costs more than the decode step's attention), else a contiguous copy."""
    if t is not None and t.dtype == dtype and _checks.packed_below(t, 2):
        return t.detach().numpy()
    return _np(t, dtype)


def _cpu():
    return _backends.cpu_module().selective_attention


def _cpu_forward(q, k, v, tau_q, tau_v, causal, scale, q_offset):
    B, Hq, Lq, _ = q.shape
    out = torch.empty(B, Hq, Lq, v.shape[-1], dtype=q.dtype)
    lse = torch.empty(B, Hq, Lq, dtype=q.dtype)
    _cpu().forward(_np(q), _np_rows(k, q.dtype), _np_rows(v, q.dtype), _np(tau_q, q.dtype), _np_rows(tau_v, q.dtype),
                   out.numpy(), lse.numpy(), bool(causal), float(scale), int(q_offset))
    return out, lse


def _cpu_backward(grad_out, q, k, v, tau_q, tau_v, out, lse, causal, scale, q_offset):
    dq = torch.empty(q.shape, dtype=q.dtype)
    dk = torch.empty(k.shape, dtype=q.dtype)
    dv = torch.empty(v.shape, dtype=q.dtype)
    dtq = torch.empty(tau_q.shape, dtype=q.dtype)
    dtv = torch.empty(tau_v.shape, dtype=q.dtype) if tau_v is not None else None
    _cpu().backward(_np(grad_out, q.dtype), _np(q), _np(k), _np(v), _np(tau_q, q.dtype), _np(tau_v, q.dtype),
                    _np(out, q.dtype), _np(lse, q.dtype), dq.numpy(), dk.numpy(), dv.numpy(), dtq.numpy(),
                    None if dtv is None else dtv.numpy(), bool(causal), float(scale), int(q_offset))
    return (dq, dk, dv, dtq.to(tau_q.dtype),
            dtv.to(tau_v.dtype) if dtv is not None else tau_q.new_empty(0))


_CPU = {"forward": _cpu_forward, "backward": _cpu_backward}


def _implementations(kernel: str) -> dict:
    return {"reference": _REFERENCE[kernel], "cpu": _CPU[kernel], "triton": f"embkern.triton_kernels.selective_attention:{kernel}"}


# ---------------------------------------------------------------------------
# torch.library ops


@torch.library.custom_op("embkern::ssa_forward", mutates_args=())
def ssa_forward(q: Tensor, k: Tensor, v: Tensor, tau_q: Tensor, tau_v: Optional[Tensor], causal: bool,
                scale: float, q_offset: int, backend: str) -> Tuple[Tensor, Tensor]:
    """(O (B, Hq, Lq, dv) in q's dtype, lse (B, Hq, Lq) fp32 (fp64 for fp64 inputs))."""
    return _ref_forward(q, k, v, tau_q, tau_v, causal, scale, q_offset)


@torch.library.custom_op("embkern::ssa_backward", mutates_args=())
def ssa_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, tau_q: Tensor, tau_v: Optional[Tensor],
                 out: Tensor, lse: Tensor, causal: bool, scale: float, q_offset: int,
                 backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dtau_q, dtau_v); dtau_v is empty (0,) when tau_v is None."""
    return _ref_backward(grad_out, q, k, v, tau_q, tau_v, out, lse, causal, scale, q_offset)


_backends.route(ssa_forward, _implementations("forward"))
_backends.route(ssa_backward, _implementations("backward"))


@ssa_forward.register_fake
def _(q, k, v, tau_q, tau_v, causal, scale, q_offset, backend):
    B, Hq, Lq, _ = q.shape
    return (q.new_empty(B, Hq, Lq, v.shape[-1]), q.new_empty(B, Hq, Lq, dtype=ref._acc_dtype(q.dtype)))


@ssa_backward.register_fake
def _(grad_out, q, k, v, tau_q, tau_v, out, lse, causal, scale, q_offset, backend):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format),
            torch.empty_like(tau_q, memory_format=torch.contiguous_format),
            torch.empty_like(tau_v, memory_format=torch.contiguous_format) if tau_v is not None
            else tau_q.new_empty(0))


def _setup(ctx, inputs, output):
    q, k, v, tau_q, tau_v, causal, scale, q_offset, backend = inputs
    ctx.save_for_backward(q, k, v, tau_q, tau_v, output[0], output[1])
    ctx.args = (causal, scale, q_offset, backend)
    ctx.has_tau_v = tau_v is not None


def _bwd(ctx, grad_out, grad_lse):
    q, k, v, tau_q, tau_v, out, lse = ctx.saved_tensors
    dq, dk, dv, dtq, dtv = ssa_backward(grad_out.contiguous(), q, k, v, tau_q, tau_v, out, lse, *ctx.args)
    return dq, dk, dv, dtq, (dtv if ctx.has_tau_v else None), None, None, None, None


torch.library.register_autograd("embkern::ssa_forward", _bwd, setup_context=_setup)


# ---------------------------------------------------------------------------
# Public API


def _tau(t, name: str, shape: Tuple[int, ...], like: Tensor, shape_text: str) -> Tensor:
    t = _checks.float_tensor(t, name, 3)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape_text} = {shape}, got {tuple(t.shape)}")
    _checks.same_device("q", like, name, t)
    return _checks.finite_checked(t, name, " (a temperature multiplies every score of its query, or its value)")


def selective_attention(q: Tensor, k: Tensor, v: Tensor, tau_q: Tensor, tau_v: Optional[Tensor] = None,
                        causal: bool = True, scale: Optional[float] = None, q_offset: Optional[int] = None,
                        backend: Optional[str] = None) -> Tensor:
    """Attention with per-query and per-value temperatures (selective self-attention).

    ``S_ij = tau_q[i] * scale * q_i . k_j``; key j is visible to query i iff
    ``j <= i + q_offset`` (``causal=True``); ``O_i = sum_j softmax_j(S)_ij tau_v[j] v_j``.
    A query that sees no key (possible when ``q_offset < 0``) outputs zeros.

    Args:
        q: (B, Hq, Lq, d) float16 / bfloat16 / float32 / float64.
        k: (B, Hkv, Lk, d), v: (B, Hkv, Lk, dv), same dtype and device as q; Hq a
            multiple of Hkv (GQA / MQA: query head h reads kv head h // (Hq / Hkv)).
        tau_q: (B, Hq, Lq) finite query temperatures (any float dtype; computed in
            the accumulation dtype). tau_v: (B, Hkv, Lk) value temperatures, or None.
        causal: mask keys after ``i + q_offset``. scale: default ``1/sqrt(d)``.
        q_offset: absolute position of query 0 minus that of key 0; default
            ``Lk - Lq`` (prefill with a cache, or one decode step).
        backend: None (fastest available) or one of ``embkern._backends.BACKENDS``.

    Returns:
        (B, Hq, Lq, dv) in q's dtype. fp16/bf16 accumulate in float32. Differentiable
        in q, k, v, tau_q and tau_v.

    Numerics contract (``docs/ops/selective_attention.md``): a fast backend's error
    against the float64 reference is at most twice the reference's own error in
    the input dtype.
    """
    q = _checks.float_tensor(q, "q", 4)
    k = _checks.float_tensor(k, "k", 4)
    v = _checks.float_tensor(v, "v", 4)
    for name, t in (("k", k), ("v", v)):
        _checks.same_device("q", q, name, t)
        _checks.same_dtype("q", q, name, t)
    B, Hq, Lq, d = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"k, v: expected batch {B} (q's), got k {k.shape[0]} and v {v.shape[0]}")
    Hkv, Lk = k.shape[1], k.shape[2]
    if k.shape[3] != d:
        raise ValueError(f"k: expected head dim {d} (q's last dim), got {k.shape[3]}")
    if tuple(v.shape[1:3]) != (Hkv, Lk):
        raise ValueError(f"v: expected (B, Hkv, Lk, dv) with Hkv = {Hkv} and Lk = {Lk} (k's), got "
                         f"{tuple(v.shape)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q, k: expected Hq (q.shape[1] = {Hq}) to be a positive multiple of Hkv "
                         f"(k.shape[1] = {Hkv}) for grouped-query attention")
    tau_q = _tau(tau_q, "tau_q", (B, Hq, Lq), q, "(B, Hq, Lq)")
    if tau_v is not None:
        tau_v = _tau(tau_v, "tau_v", (B, Hkv, Lk), q, "(B, Hkv, Lk)")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    if scale is None:
        scale = ref.default_scale(d)
    else:  # numpy scalars too (np.float32(0.5) was refused)
        scale = _checks.positive_float(scale, "scale", "None or a finite float > 0")
    q_offset = ref.default_q_offset(Lq, Lk) if q_offset is None else _checks.integer(q_offset, "q_offset")
    # Any offset >= Lk shows every key to every query and any offset <= -Lq none, so clamping changes no
    # value; it keeps i + q_offset inside int64 in the kernels (an offset near 2^63 overflowed there, one
    # past 2^63 did not fit the op's schema).
    q_offset = max(-Lq, min(Lk, q_offset))
    be = _backends.resolve(DESCRIPTOR, "selective_attention", backend, q.device.type, q.dtype)
    # out and lse, the temperatures in the accumulation dtype, the copies of non-contiguous inputs, and
    # the reference's (B, Hq, Lq, Lk) scores and probabilities: checked before any of it is allocated
    acc = ref._acc_dtype(q.dtype)
    a = 8 if acc == torch.float64 else 4
    # the cpu and triton forwards read k and v in place when each kv head's rows are packed
    kv = [t for t in (k, v) if be == "reference" or not _checks.packed_below(t, 2)]
    need = B * Hq * Lq * (v.shape[-1] * q.element_size() + 2 * a) + B * Hkv * Lk * a + _checks.copy_bytes(q, *kv)
    if be == "reference":
        need += 2 * B * Hq * Lq * Lk * a
    _checks.fits(need, q.device, f"selective_attention(backend={be!r}) of q {tuple(q.shape)}, k {tuple(k.shape)}, "
                 f"v {tuple(v.shape)}")
    tau_q = tau_q.to(acc)
    tau_v = None if tau_v is None else tau_v.to(acc)
    out, _ = ssa_forward(q, k, v, tau_q, tau_v, causal, float(scale), int(q_offset), be)
    return out


def selective_temperatures(x: Tensor, positions, gate_param: Optional[Tensor] = None, u: Optional[Tensor] = None,
                           gate: str = "expexp") -> Tensor:
    """Per-token temperatures ``tau = tau_pos(n) + tau_tok(x)`` for :func:`selective_attention`, (B, H, L).

    ``tau_pos(n) = 1 + g log n`` with ``n = positions + 1`` (absolute, 1-based) and
    ``g = exp(-exp(beta))`` (``gate="expexp"``, the authors'), ``sigmoid(alpha)``
    (``"sigmoid"``) or ``beta`` itself (``"linear"``, unbounded);
    ``tau_tok(x) = tanh(u . GELU(x))``. Either term may be absent (``gate_param``
    / ``u`` None; without a position term ``tau_pos = 1``).

    Args:
        x: (B, H, L, d) projected queries (for tau_q) or values (for tau_v).
        positions: (L,) or (B, L) integer tensor of 0-based absolute positions, or an
            int ``start`` meaning ``start, start + 1, ...`` (decode with a cache of
            ``start`` tokens).
        gate_param: scalar or (H,) tensor: beta / alpha of the position term.
        u: (d,) or (H, d) tensor: the token term's direction.

    Returns:
        (B, H, L) in the accumulation dtype (float32 for fp16/bf16), differentiable
        in x, gate_param and u.
    """
    x = _checks.float_tensor(x, "x", 4)
    B, H, L, d = x.shape
    _checks.choice(gate, "gate", GATES)
    if isinstance(positions, int) and not isinstance(positions, bool):
        if positions < 0 or positions > 2**63 - 1 - L:  # int64 positions (2^63 - 1 overflowed torch.arange)
            raise ValueError(f"positions: expected a start position in [0, 2^63 - 1 - L] = [0, {2**63 - 1 - L}], "
                             f"got {positions}")
        positions = torch.arange(positions, positions + L, device=x.device)
    else:
        positions = _checks.int_tensor(positions, "positions")
        if positions.dim() not in (1, 2) or positions.shape[-1] != L or (positions.dim() == 2
                                                                        and positions.shape[0] != B):
            raise ValueError(f"positions: expected shape (L,) = ({L},) or (B, L) = ({B}, {L}), got "
                             f"{tuple(positions.shape)}")
        _checks.same_device("x", x, "positions", positions)
        if not _checks._data_checks_off() and not _checks.no_values(positions) and positions.numel() \
                and int(positions.min()) < 0:
            raise ValueError(f"positions: expected 0-based positions >= 0, got {int(positions.min())}")
    if gate_param is not None:
        gate_param = _checks.float_tensor(gate_param, "gate_param")
        if gate_param.dim() > 1 or (gate_param.dim() == 1 and gate_param.shape[0] not in (1, H)):
            raise ValueError(f"gate_param: expected a scalar or shape ({H},) (one per head), got "
                             f"{tuple(gate_param.shape)}")
        _checks.same_device("x", x, "gate_param", gate_param)
    if u is not None:
        u = _checks.float_tensor(u, "u")
        if tuple(u.shape) not in ((d,), (H, d)):
            raise ValueError(f"u: expected shape (d,) = ({d},) or (H, d) = ({H}, {d}), got {tuple(u.shape)}")
        _checks.same_device("x", x, "u", u)
    return ref.temperatures(x, positions, gate_param, u, gate)


__all__ = ["selective_attention", "selective_temperatures", "DESCRIPTOR", "GATES"]
