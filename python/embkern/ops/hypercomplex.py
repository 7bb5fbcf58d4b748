"""Hypercomplex (quaternion / dihedron) KG scoring: torch.library ops + public API.

Ops (namespace ``embkern``; ``backend`` is resolved before the op is called):

=====================  ==================================================  ================
op                     computes                                            backward
=====================  ==================================================  ================
hc_query               q = h (x) r_hat (or h (x) r)         (B, 4d)        hc_query_backward
hc_score               S = epilogue(q E^T)                  (B, N)         hc_score_backward
hc_rank                filtered rank of targets, no B x N buffer  (B,)     --
hc_topk                top-k per row, no B x N buffer   (B, k) x 2         --
hc_ce                  1-N cross-entropy (online logsumexp) (B,), lse (B,) hc_ce_backward
=====================  ==================================================  ================

The reference (``embkern.reference.hypercomplex``) is the default kernel for
every device; ``register_kernel("cpu")`` routes to the C++ kernels in
``embkern._C.hypercomplex`` and ``register_kernel("cuda")`` to the Triton
kernels in ``embkern.triton_kernels.hypercomplex``; the ``backend`` string
argument lets tests run the Triton kernels on CPU tensors under
``TRITON_INTERPRET=1`` and the reference on any device.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import _backends, _checks
from .._backends import BackendSupport, OpDescriptor
from ..reference import hypercomplex as ref

ALGEBRAS = ref.ALGEBRAS
LAYOUTS = ref.LAYOUTS
SCORES = ref.SCORES
TIES = ref.TIES
_ALG, _LAY, _SCORE, _TIES = ref.ALGEBRA_CODE, ref.LAYOUT_CODE, ref.SCORE_CODE, ref.TIES_CODE

_QUERY = ("query_forward", "query_backward")
DESCRIPTOR = OpDescriptor(
    name="hypercomplex",
    kernels=("query_forward", "query_backward", "score_forward", "rank", "topk", "ce_forward", "ce_backward"),
    backends={
        "reference": BackendSupport(frozenset(_checks.FLOATS), frozenset({"cpu", "cuda"})),
        "cpu": BackendSupport(frozenset({torch.float32, torch.float64}), frozenset({"cpu"}),
                              symbol="hypercomplex.{kernel}"),
        "triton": BackendSupport(frozenset({torch.float16, torch.bfloat16, torch.float32}),
                                 frozenset({"cpu", "cuda"}), symbol="hypercomplex.{kernel}"),
    },
    entry_points={
        "hamilton_product": _QUERY,
        "dihedron_product": _QUERY,
        "score_all": _QUERY + ("score_forward",),
        "rank_all": ("query_forward", "rank"),
        "topk_all": ("query_forward", "topk"),
        "one_to_n_loss": _QUERY + ("ce_forward", "ce_backward"),
    },
)
KERNELS = DESCRIPTOR.kernels


def _resolve(public: str, backend: Optional[str], x: Tensor) -> str:
    return _backends.resolve(DESCRIPTOR, public, backend, x.device.type, x.dtype)


# ---------------------------------------------------------------------------
# Reference kernels (the op bodies for backend="reference")


_ref_query_backward = ref.query_backward


def _nan_targets(q, E, bias_h, bias_t, targets, score):
    """Raise when a target's own score is NaN: NaN compares false with everything, so the
    kernels would give it rank 1. O(B * K): the targets' scores alone, as the reference
    computes them (accumulation dtype, same epilogue)."""
    if targets.numel() == 0:
        return
    acc = ref._acc_dtype(q.dtype)
    t = targets.long()
    qa, et = q.to(acc), E.index_select(0, t).to(acc)
    st = (qa * et).sum(1)
    if score == "distance":
        st = 2.0 * st - (qa * qa).sum(1) - (et * et).sum(1)
        if bias_h is not None:
            st = st + bias_h.to(acc)
        if bias_t is not None:
            st = st + bias_t.index_select(0, t).to(acc)
    bad = torch.isnan(st)
    if bool(bad.any()):
        rows = torch.nonzero(bad)[:, 0]
        b = int(rows[0])
        raise ValueError(f"h, r, entities: the score of row {b}'s target (entity {int(t[b])}) is NaN "
                         f"({rows.numel()} of {t.numel()} rows); a NaN score has no rank. Expected finite "
                         "embeddings whose products do not overflow")


def _ref_rank(q, E, bias_h, bias_t, targets, fo, fi, score, ties):
    return ref.rank_from_scores(ref.scores(q, E, bias_h, bias_t, score), targets, fo, fi, ties)


def _ref_topk(q, E, bias_h, bias_t, k, fo, fi, score):
    return ref.topk_from_scores(ref.scores(q, E, bias_h, bias_t, score), k, fo, fi)


def _ref_ce_forward(q, E, bias_h, bias_t, targets, score):
    acc = ref._acc_dtype(q.dtype)
    s = ref.scores(q.to(acc), E.to(acc), None if bias_h is None else bias_h.to(acc),
                   None if bias_t is None else bias_t.to(acc), score)
    lse = torch.logsumexp(s, dim=1)
    return lse - s.gather(1, targets.long()[:, None])[:, 0], lse


def _score_vjp(G: Tensor, q: Tensor, E: Tensor, score: str) -> Tuple[Tensor, Tensor]:
    """(grad_q, grad_E) of sum(G * S) for S = epilogue(q E^T); G in the accumulation dtype."""
    gq = G @ E
    gE = G.T @ q
    if score == "distance":
        # S = 2 qE^T - |q|^2 - |E|^2 + biases
        gq = 2.0 * gq - 2.0 * q * G.sum(1, keepdim=True)
        gE = 2.0 * gE - 2.0 * E * G.sum(0)[:, None]
    return gq, gE


def _ref_ce_backward(grad_loss, q, E, bias_h, bias_t, targets, lse, score):
    acc = ref._acc_dtype(q.dtype)
    qa, Ea = q.to(acc), E.to(acc)
    s = ref.scores(qa, Ea, None if bias_h is None else bias_h.to(acc),
                   None if bias_t is None else bias_t.to(acc), score)
    G = torch.exp(s - lse.to(acc)[:, None])
    G[torch.arange(G.shape[0], device=G.device), targets.long()] -= 1.0
    G = G * grad_loss.to(acc)[:, None]
    gq, gE = _score_vjp(G, qa, Ea, score)
    return gq.to(q.dtype), gE.to(E.dtype), G.sum(1).to(q.dtype), G.sum(0).to(q.dtype)


_REFERENCE = {
    "query_forward": ref.query,
    "query_backward": _ref_query_backward,
    "score_forward": ref.scores,
    "rank": _ref_rank,
    "topk": _ref_topk,
    "ce_forward": _ref_ce_forward,
    "ce_backward": _ref_ce_backward,
}


# ---------------------------------------------------------------------------
# C++ kernels: allocate outputs in torch, hand numpy views (zero copy) to _C.


def _np(t: Optional[Tensor]):
    return None if t is None else t.detach().contiguous().numpy()


def _cpu():
    return _backends.cpu_module().hypercomplex


def _cpu_query_forward(h, r, algebra, layout, normalize):
    q = torch.empty_like(h, memory_format=torch.contiguous_format)
    _cpu().query_forward(_np(h), _np(r), q.numpy(), _ALG[algebra], _LAY[layout], bool(normalize))
    return q


def _cpu_query_backward(grad_q, h, r, algebra, layout, normalize):
    gh = torch.empty_like(h, memory_format=torch.contiguous_format)
    gr = torch.empty_like(r, memory_format=torch.contiguous_format)
    _cpu().query_backward(_np(grad_q), _np(h), _np(r), gh.numpy(), gr.numpy(), _ALG[algebra], _LAY[layout],
                          bool(normalize))
    return gh, gr


def _cpu_score_forward(q, E, bias_h, bias_t, score):
    S = torch.empty(q.shape[0], E.shape[0], dtype=q.dtype)
    _cpu().score_forward(_np(q), _np(E), _np(bias_h), _np(bias_t), S.numpy(), _SCORE[score])
    return S


def _cpu_rank(q, E, bias_h, bias_t, targets, fo, fi, score, ties):
    out = torch.empty(q.shape[0], dtype=torch.float64)
    _cpu().rank(_np(q), _np(E), _np(bias_h), _np(bias_t), _np(targets.to(torch.int64)), _np(fo), _np(fi),
                out.numpy(), _SCORE[score], _TIES[ties])
    return out


def _cpu_topk(q, E, bias_h, bias_t, k, fo, fi, score):
    vals = torch.empty(q.shape[0], k, dtype=q.dtype)
    idx = torch.empty(q.shape[0], k, dtype=torch.int64)
    _cpu().topk(_np(q), _np(E), _np(bias_h), _np(bias_t), _np(fo), _np(fi), vals.numpy(), idx.numpy(),
                _SCORE[score])
    return vals, idx


def _cpu_ce_forward(q, E, bias_h, bias_t, targets, score):
    loss = torch.empty(q.shape[0], dtype=q.dtype)
    lse = torch.empty(q.shape[0], dtype=q.dtype)
    _cpu().ce_forward(_np(q), _np(E), _np(bias_h), _np(bias_t), _np(targets.to(torch.int64)), loss.numpy(),
                      lse.numpy(), _SCORE[score])
    return loss, lse


def _cpu_ce_backward(grad_loss, q, E, bias_h, bias_t, targets, lse, score):
    gq = torch.empty_like(q, memory_format=torch.contiguous_format)
    gE = torch.empty_like(E, memory_format=torch.contiguous_format)
    gbh = torch.empty(q.shape[0], dtype=q.dtype)
    gbt = torch.empty(E.shape[0], dtype=q.dtype)
    _cpu().ce_backward(_np(grad_loss.to(q.dtype)), _np(q), _np(E), _np(bias_h), _np(bias_t),
                       _np(targets.to(torch.int64)), _np(lse.to(q.dtype)), gq.numpy(), gE.numpy(), gbh.numpy(),
                       gbt.numpy(), _SCORE[score])
    return gq, gE, gbh, gbt


_CPU = {
    "query_forward": _cpu_query_forward,
    "query_backward": _cpu_query_backward,
    "score_forward": _cpu_score_forward,
    "rank": _cpu_rank,
    "topk": _cpu_topk,
    "ce_forward": _cpu_ce_forward,
    "ce_backward": _cpu_ce_backward,
}


def _implementations(kernel: str) -> dict:
    return {"reference": _REFERENCE[kernel], "cpu": _CPU[kernel],
            "triton": f"embkern.triton_kernels.hypercomplex:{kernel}"}


# ---------------------------------------------------------------------------
# torch.library ops


@torch.library.custom_op("embkern::hc_query", mutates_args=())
def hc_query(h: Tensor, r: Tensor, algebra: str, layout: str, normalize: bool, backend: str) -> Tensor:
    """q = h (x) r_hat. h, r: (B, 4d) contiguous, same dtype -> (B, 4d)."""
    return ref.query(h, r, algebra, layout, normalize)


@torch.library.custom_op("embkern::hc_query_backward", mutates_args=())
def hc_query_backward(grad_q: Tensor, h: Tensor, r: Tensor, algebra: str, layout: str, normalize: bool,
                      backend: str) -> Tuple[Tensor, Tensor]:
    return _ref_query_backward(grad_q, h, r, algebra, layout, normalize)


@torch.library.custom_op("embkern::hc_score", mutates_args=())
def hc_score(q: Tensor, E: Tensor, bias_h: Optional[Tensor], bias_t: Optional[Tensor], score: str,
             backend: str) -> Tensor:
    """S = epilogue(q E^T). q: (B, K), E: (N, K) -> (B, N)."""
    return ref.scores(q, E, bias_h, bias_t, score)


@torch.library.custom_op("embkern::hc_score_backward", mutates_args=())
def hc_score_backward(grad: Tensor, q: Tensor, E: Tensor, score: str, backend: str) -> Tuple[Tensor, Tensor]:
    # Two GEMMs; the platform BLAS (through torch.mm) is the right tool on every backend.
    acc = ref._acc_dtype(q.dtype)
    gq, gE = _score_vjp(grad.to(acc), q.to(acc), E.to(acc), score)
    return gq.to(q.dtype), gE.to(E.dtype)


@torch.library.custom_op("embkern::hc_rank", mutates_args=())
def hc_rank(q: Tensor, E: Tensor, bias_h: Optional[Tensor], bias_t: Optional[Tensor], targets: Tensor,
            filter_offsets: Optional[Tensor], filter_index: Optional[Tensor], score: str, ties: str,
            backend: str) -> Tensor:
    """Filtered ranks (B,) float64 of targets among all N entities; a NaN target score raises."""
    _nan_targets(q, E, bias_h, bias_t, targets, score)
    return _ref_rank(q, E, bias_h, bias_t, targets, filter_offsets, filter_index, score, ties)


@torch.library.custom_op("embkern::hc_topk", mutates_args=())
def hc_topk(q: Tensor, E: Tensor, bias_h: Optional[Tensor], bias_t: Optional[Tensor], k: int,
            filter_offsets: Optional[Tensor], filter_index: Optional[Tensor], score: str,
            backend: str) -> Tuple[Tensor, Tensor]:
    return _ref_topk(q, E, bias_h, bias_t, k, filter_offsets, filter_index, score)


@torch.library.custom_op("embkern::hc_ce", mutates_args=())
def hc_ce(q: Tensor, E: Tensor, bias_h: Optional[Tensor], bias_t: Optional[Tensor], targets: Tensor, score: str,
          backend: str) -> Tuple[Tensor, Tensor]:
    """(loss (B,), lse (B,)) of the 1-N cross-entropy; fp32 for fp16/bf16 inputs."""
    return _ref_ce_forward(q, E, bias_h, bias_t, targets, score)


@torch.library.custom_op("embkern::hc_ce_backward", mutates_args=())
def hc_ce_backward(grad_loss: Tensor, q: Tensor, E: Tensor, bias_h: Optional[Tensor], bias_t: Optional[Tensor],
                   targets: Tensor, lse: Tensor, score: str, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return _ref_ce_backward(grad_loss, q, E, bias_h, bias_t, targets, lse, score)


def _route(op, kernel: str, pre=None):
    _backends.route(op, _implementations(kernel), pre=pre)


_route(hc_query, "query_forward")
_route(hc_query_backward, "query_backward")
_route(hc_score, "score_forward")
_route(hc_rank, "rank", lambda q, E, bh, bt, t, fo, fi, score, ties: _nan_targets(q, E, bh, bt, t, score))
_route(hc_topk, "topk")
_route(hc_ce, "ce_forward")
_route(hc_ce_backward, "ce_backward")


def _lowp(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@hc_query.register_fake
def _(h, r, algebra, layout, normalize, backend):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


@hc_query_backward.register_fake
def _(grad_q, h, r, algebra, layout, normalize, backend):
    return (torch.empty_like(h, memory_format=torch.contiguous_format),
            torch.empty_like(r, memory_format=torch.contiguous_format))


@hc_score.register_fake
def _(q, E, bias_h, bias_t, score, backend):
    return q.new_empty(q.shape[0], E.shape[0])


@hc_score_backward.register_fake
def _(grad, q, E, score, backend):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(E, memory_format=torch.contiguous_format))


@hc_rank.register_fake
def _(q, E, bias_h, bias_t, targets, fo, fi, score, ties, backend):
    return q.new_empty(q.shape[0], dtype=torch.float64)


@hc_topk.register_fake
def _(q, E, bias_h, bias_t, k, fo, fi, score, backend):
    return q.new_empty(q.shape[0], k), q.new_empty(q.shape[0], k, dtype=torch.int64)


@hc_ce.register_fake
def _(q, E, bias_h, bias_t, targets, score, backend):
    dt = _lowp(q.dtype)
    return q.new_empty(q.shape[0], dtype=dt), q.new_empty(q.shape[0], dtype=dt)


@hc_ce_backward.register_fake
def _(grad_loss, q, E, bias_h, bias_t, targets, lse, score, backend):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(E, memory_format=torch.contiguous_format),
            q.new_empty(q.shape[0]), q.new_empty(E.shape[0]))


# autograd ------------------------------------------------------------------


def _query_setup(ctx, inputs, output):
    h, r, algebra, layout, normalize, backend = inputs
    ctx.save_for_backward(h, r)
    ctx.args = (algebra, layout, normalize, backend)


def _query_bwd(ctx, grad):
    h, r = ctx.saved_tensors
    gh, gr = hc_query_backward(grad.contiguous(), h, r, *ctx.args)
    return gh, gr, None, None, None, None


torch.library.register_autograd("embkern::hc_query", _query_bwd, setup_context=_query_setup)


def _score_setup(ctx, inputs, output):
    q, E, bias_h, bias_t, score, backend = inputs
    ctx.save_for_backward(q, E)
    ctx.args = (score, backend)
    ctx.has_bias = (bias_h is not None, bias_t is not None)


def _score_bwd(ctx, grad):
    q, E = ctx.saved_tensors
    score, backend = ctx.args
    gq, gE = hc_score_backward(grad.contiguous(), q, E, score, backend)
    gbh = grad.sum(1).to(q.dtype) if ctx.has_bias[0] else None
    gbt = grad.sum(0).to(q.dtype) if ctx.has_bias[1] else None
    return gq, gE, gbh, gbt, None, None


torch.library.register_autograd("embkern::hc_score", _score_bwd, setup_context=_score_setup)


def _ce_setup(ctx, inputs, output):
    q, E, bias_h, bias_t, targets, score, backend = inputs
    ctx.save_for_backward(q, E, bias_h, bias_t, targets, output[1])
    ctx.args = (score, backend)
    ctx.has_bias = (bias_h is not None, bias_t is not None)


def _ce_bwd(ctx, grad_loss, grad_lse):
    q, E, bias_h, bias_t, targets, lse = ctx.saved_tensors
    score, backend = ctx.args
    gq, gE, gbh, gbt = hc_ce_backward(grad_loss.contiguous(), q, E, bias_h, bias_t, targets, lse, score, backend)
    return (gq, gE, gbh.to(bias_h.dtype) if ctx.has_bias[0] else None,
            gbt.to(bias_t.dtype) if ctx.has_bias[1] else None, None, None, None)


torch.library.register_autograd("embkern::hc_ce", _ce_bwd, setup_context=_ce_setup)


# ---------------------------------------------------------------------------
# Public API


def _check_pair(h, r, name_h="h", name_r="r"):
    _checks.float_tensor(h, name_h)
    _checks.float_tensor(r, name_r)
    _checks.same_device(name_h, h, name_r, r)
    _checks.same_dtype(name_h, h, name_r, r)
    if h.dim() < 1 or h.shape[-1] % 4 != 0 or h.shape[-1] == 0:
        raise ValueError(f"{name_h}: expected last dimension 4*d with d >= 1 (quaternion components), "
                         f"got shape {tuple(h.shape)}")
    if r.dim() < 1 or r.shape[-1] != h.shape[-1]:
        raise ValueError(f"{name_r}: expected last dimension {h.shape[-1]} (same as {name_h}), got shape {tuple(r.shape)}")


def _product(h, r, algebra, layout, normalize, backend, public):
    _check_pair(h, r)
    _checks.choice(layout, "layout", LAYOUTS)
    try:
        shape = torch.broadcast_shapes(h.shape, r.shape)
    except RuntimeError:
        raise ValueError(f"r: shape {tuple(r.shape)} does not broadcast with h: {tuple(h.shape)}") from None
    n = math.prod(shape)
    # the (broadcast) output and the two contiguous operand copies
    _checks.fits(3 * n * h.element_size(), h.device, f"{public}: h {tuple(h.shape)} and r {tuple(r.shape)} "
                 f"broadcast to {tuple(shape)}: the {_checks._dt(h.dtype)} product and its two operand copies")
    hb = h.expand(shape).reshape(-1, shape[-1]).contiguous()
    rb = r.expand(shape).reshape(-1, shape[-1]).contiguous()
    be = _resolve(public, backend, hb)
    return hc_query(hb, rb, algebra, layout, normalize, be).reshape(shape)


def hamilton_product(h: Tensor, r: Tensor, *, layout: str = "component", normalize: bool = False,
                     backend: Optional[str] = None) -> Tensor:
    """Quaternion (Hamilton) product h (x) r.

    Args:
        h, r: (..., 4d) floating tensors (broadcastable), components stored
            ``[a | b | c | d]`` (``layout="component"``) or ``(d, 4)``
            interleaved (``layout="interleaved"``, PyKEEN's layout).
        normalize: divide r by its Euclidean 4-norm per coordinate first (QuatE's
            unit relation). A coordinate whose four components are all zero has no
            direction: 0 / 0 makes its output and gradients NaN, in the reference
            and in every kernel alike.
        backend: None (auto) or "reference" | "cpu" | "triton".
    Returns:
        (..., 4d) in the input dtype (fp16/bf16 computed in fp32). Differentiable.
    """
    return _product(h, r, "quaternion", layout, normalize, backend, "hamilton_product")


def dihedron_product(h: Tensor, r: Tensor, *, layout: str = "component", normalize: bool = False,
                     backend: Optional[str] = None) -> Tensor:
    """Dihedron (split-quaternion) product h (x) r; i^2 = -1, j^2 = k^2 = +1.

    Same shapes, layouts and numerics as :func:`hamilton_product`.
    """
    return _product(h, r, "dihedron", layout, normalize, backend, "dihedron_product")


def _prepare(h, r, entities, algebra, score, layout, bias_h, bias_t):
    _check_pair(h, r)
    if h.dim() != 2:
        raise ValueError(f"h: expected a 2-d tensor (batch, 4d), got shape {tuple(h.shape)}")
    if r.shape != h.shape:
        raise ValueError(f"r: expected shape {tuple(h.shape)} (same as h), got {tuple(r.shape)}")
    _checks.float_tensor(entities, "entities", 2)
    _checks.same_device("h", h, "entities", entities)
    _checks.same_dtype("h", h, "entities", entities)
    if entities.shape[1] != h.shape[1]:
        raise ValueError(f"entities: expected shape (N, {h.shape[1]}) (same width as h), got {tuple(entities.shape)}")
    _checks.choice(algebra, "algebra", ALGEBRAS)
    _checks.choice(score, "score", SCORES)
    _checks.choice(layout, "layout", LAYOUTS)
    B, N = h.shape[0], entities.shape[0]
    for name, b, n in (("bias_h", bias_h, B), ("bias_t", bias_t, N)):
        if b is None:
            continue
        if score != "distance":
            raise ValueError(f"{name}: biases apply to score='distance' only, got score={score!r}")
        _checks.float_tensor(b, name, 1)
        _checks.same_device("h", h, name, b)
        _checks.same_dtype("h", h, name, b)
        if b.shape[0] != n:
            raise ValueError(f"{name}: expected shape ({n},), got {tuple(b.shape)}")
    c = lambda t, n: None if t is None else _checks.contiguous(t, n)  # noqa: E731 -- non-contiguous inputs are copied
    return (c(h, "h"), c(r, "r"), c(entities, "entities"), c(bias_h, "bias_h"), c(bias_t, "bias_t"))


def _targets(targets, B, N, device):
    _checks.int_tensor(targets, "targets", 1)
    if targets.shape[0] != B:
        raise ValueError(f"targets: expected shape ({B},) (one per query), got {tuple(targets.shape)}")
    if targets.device != device:
        raise ValueError(f"targets: expected device {device}, got {targets.device}")
    return _checks.ids(_checks.contiguous(targets.to(torch.int64), "targets"), "targets", N)


def _reference_scratch(be: str, public: str, B: int, N: int, dtype: torch.dtype, extra: int, device) -> None:
    """The reference backend materialises (B, N) scores (plus ``extra`` bytes per element)."""
    if be == "reference":
        per = torch.empty((), dtype=ref._acc_dtype(dtype)).element_size() + extra
        _checks.fits(B * N * per, device, f"{public}(backend='reference'): the ({B}, {N}) score matrix and its "
                     "temporaries")


def score_all(h: Tensor, r: Tensor, entities: Tensor, algebra: str = "quaternion", score: str = "inner",
              normalize_relation: bool = True, bias_h: Optional[Tensor] = None, bias_t: Optional[Tensor] = None,
              layout: str = "component", backend: Optional[str] = None) -> Tensor:
    """1-vs-all scores of (h, r, ?) against every entity: ONE product + ONE GEMM with epilogue.

    Args:
        h, r: (B, 4d) head and relation embeddings.
        entities: (N, 4d) entity table (same dtype, device and layout).
        algebra: "quaternion" (QuatE) or "dihedron".
        score: "inner" -> <h (x) r_hat, t>;  "distance" -> b_h + b_t - ||h (x) r_hat - t||^2.
        normalize_relation: r_hat = r / Euclidean 4-norm per coordinate (the models' choice).
        bias_h: (B,), bias_t: (N,) optional, distance score only.
    Returns:
        (B, N) scores in the input dtype. Differentiable in h, r, entities, biases.
    Raises:
        MemoryError: the (B, N) output is larger than the memory available on the device.
    """
    h, r, E, bias_h, bias_t = _prepare(h, r, entities, algebra, score, layout, bias_h, bias_t)
    _checks.fits(h.shape[0] * E.shape[0] * h.element_size(), h.device,
                 f"score_all: the ({h.shape[0]}, {E.shape[0]}) {_checks._dt(h.dtype)} score matrix")
    be = _resolve("score_all", backend, h)
    q = hc_query(h, r, algebra, layout, normalize_relation, be)
    return hc_score(q, E, bias_h, bias_t, score, be)


def rank_all(h: Tensor, r: Tensor, entities: Tensor, targets: Tensor, filter_index=None, ties: str = "realistic",
             algebra: str = "quaternion", score: str = "inner", normalize_relation: bool = True,
             bias_h: Optional[Tensor] = None, bias_t: Optional[Tensor] = None, layout: str = "component",
             backend: Optional[str] = None) -> Tensor:
    """Filtered rank of each true tail among all N entities, fused: no (B, N) buffer.

    Args:
        targets: (B,) integer ids of the true tails.
        filter_index: known true tails to skip (the "filtered" setting). The
            form is told by its Python type, never by its length:

            * ``None``: raw ranks;
            * a **tuple** ``(offsets, index)``: always a CSR pair, ``offsets``
              (B+1,) non-decreasing from 0 to ``len(index)``, ``index`` (nnz,);
              tensors, numpy arrays or lists of ints (what
              ``TailFilter.lookup`` returns);
            * a **list** of B per-row id collections (lists of ints, 1-d integer
              tensors or arrays), one per query.

            Ids are integers in [0, N); floats, bools, strings and nested lists
            are a TypeError in every form, a tuple of another length a
            ValueError. The target itself never counts against itself.
        ties: "optimistic" (1 + #greater), "pessimistic" (1 + #greater-or-equal
            others) or "realistic" (their mean), as PyKEEN defines them.
    Returns:
        (B,) float64 ranks (1 = best). Extra memory O(B + N).
    Raises:
        ValueError: bad ids or filter lists (also under ``torch.compile``: the
            value checks run as ops in the compiled graph), or a row whose
            target score is NaN (NaN compares false with everything, so it would
            rank 1); the message names the first such row. Entities other
            than the target whose score is NaN never count against it.
    """
    h, r, E, bias_h, bias_t = _prepare(h, r, entities, algebra, score, layout, bias_h, bias_t)
    _checks.choice(ties, "ties", TIES)
    B, N = h.shape[0], E.shape[0]
    t = _targets(targets, B, N, h.device)
    fo, fi = _checks.filter_to_csr(filter_index, B, N, h.device)
    be = _resolve("rank_all", backend, h)
    _reference_scratch(be, "rank_all", B, N, h.dtype, 4, h.device)  # + filter mask, comparisons
    with torch.no_grad():
        q = hc_query(h, r, algebra, layout, normalize_relation, be)
        return hc_rank(q, E, bias_h, bias_t, t, fo, fi, score, ties, be)


def topk_all(h: Tensor, r: Tensor, entities: Tensor, k: int, filter_index=None, algebra: str = "quaternion",
             score: str = "inner", normalize_relation: bool = True, bias_h: Optional[Tensor] = None,
             bias_t: Optional[Tensor] = None, layout: str = "component",
             backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """Top-k entities per query, fused: no (B, N) buffer.

    Returns ``(values (B, k), indices (B, k) int64)``, descending score, ties
    broken by the lower entity id; entities in ``filter_index`` (the forms of
    :func:`rank_all`) are skipped. ``k`` may be at most N minus the largest
    number of distinct filtered ids in a row, in eager and compiled calls alike.
    """
    h, r, E, bias_h, bias_t = _prepare(h, r, entities, algebra, score, layout, bias_h, bias_t)
    B, N = h.shape[0], E.shape[0]
    k = _checks.integer(k, "k")
    fo, fi = _checks.filter_to_csr(filter_index, B, N, h.device)
    # distinct ids per row count: duplicates in a filter list skip nothing extra
    fi = _checks.topk_k(k, fo, fi, B, N)
    be = _resolve("topk_all", backend, h)
    _reference_scratch(be, "topk_all", B, N, h.dtype, 25, h.device)  # + two int64 sort orders, mask
    with torch.no_grad():
        q = hc_query(h, r, algebra, layout, normalize_relation, be)
        return hc_topk(q, E, bias_h, bias_t, k, fo, fi, score, be)


def one_to_n_loss(h: Tensor, r: Tensor, entities: Tensor, targets: Tensor, algebra: str = "quaternion",
                  score: str = "inner", normalize_relation: bool = True, bias_h: Optional[Tensor] = None,
                  bias_t: Optional[Tensor] = None, layout: str = "component", reduction: str = "mean",
                  backend: Optional[str] = None) -> Tensor:
    """1-N cross-entropy over all entities with a fused online-logsumexp forward and backward.

    loss_b = logsumexp_n S[b, n] - S[b, targets[b]], S as in :func:`score_all`.
    The (B, N) score matrix is never stored: the backward recomputes it tile by
    tile and produces gradients for h, r, the whole entity table and biases.

    Returns a scalar (``reduction="mean"|"sum"``) or (B,) (``"none"``), fp32 for
    fp16/bf16 inputs. An empty batch (B = 0) gives NaN for ``"mean"``, as
    ``torch.nn.functional.cross_entropy`` does, and 0 for ``"sum"``.
    """
    h, r, E, bias_h, bias_t = _prepare(h, r, entities, algebra, score, layout, bias_h, bias_t)
    _checks.choice(reduction, "reduction", ("mean", "sum", "none"))
    B, N = h.shape[0], E.shape[0]
    if N == 0:
        raise ValueError("entities: expected at least one entity for a cross-entropy over N, got N = 0")
    t = _targets(targets, B, N, h.device)
    be = _resolve("one_to_n_loss", backend, h)
    _reference_scratch(be, "one_to_n_loss", B, N, h.dtype, 8, h.device)
    q = hc_query(h, r, algebra, layout, normalize_relation, be)
    loss, _ = hc_ce(q, E, bias_h, bias_t, t, score, be)
    if reduction == "mean":
        return loss.mean()
    return loss.sum() if reduction == "sum" else loss
