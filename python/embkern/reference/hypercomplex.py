"""Pure-PyTorch reference for hypercomplex (quaternion / dihedron) KG scoring.

This module is the numerics contract of ``embkern.hamilton_product``,
``dihedron_product``, ``score_all``, ``rank_all``, ``topk_all`` and
``one_to_n_loss``: every fast kernel is tested against these functions run in
float64, and benchmarks time them as the baseline. They follow
``docs/ops/hypercomplex.md`` (Nayyeri et al. 2023 official code; QuatE):

* an element of rank ``D = 4d`` is stored component-major ``[a | b | c | d]``
  (``layout="component"``, the default) or PyKEEN's interleaved ``(d, 4)``
  (``layout="interleaved"``);
* ``r_hat = r / sqrt(a^2 + b^2 + c^2 + d^2)`` per coordinate, for BOTH
  algebras (the official dihedron model uses the Euclidean 4-norm too, which
  does not preserve the split-quaternion norm; that is the model);
* inner score ``<h (x) r_hat, t>`` (PyKEEN returns the negation), distance
  score ``b_h + b_t - ||h (x) r_hat - t||^2``.

Low-precision inputs (fp16/bf16) are computed in float32 and the result cast
back; float32 and float64 inputs are computed in their own dtype.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

ALGEBRAS = ("quaternion", "dihedron")
LAYOUTS = ("component", "interleaved")
SCORES = ("inner", "distance")
TIES = ("realistic", "optimistic", "pessimistic")

# The kernels take these names as ints: a name's position in its tuple above is
# its value in the C++ enums (src/include/embkern/hypercomplex.h) and in the
# Triton launchers. Reordering a tuple changes the ABI.
ALGEBRA_CODE = {name: i for i, name in enumerate(ALGEBRAS)}
LAYOUT_CODE = {name: i for i, name in enumerate(LAYOUTS)}
SCORE_CODE = {name: i for i, name in enumerate(SCORES)}
TIES_CODE = {name: i for i, name in enumerate(TIES)}


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def split(x: torch.Tensor, layout: str = "component"):
    """(..., 4d) -> four (..., d) components (a, b, c, d)."""
    d = x.shape[-1] // 4
    if layout == "component":
        return x[..., :d], x[..., d : 2 * d], x[..., 2 * d : 3 * d], x[..., 3 * d :]
    if layout == "interleaved":
        y = x.reshape(*x.shape[:-1], d, 4)
        return y[..., 0], y[..., 1], y[..., 2], y[..., 3]
    raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")


def join(a, b, c, d, layout: str = "component") -> torch.Tensor:
    """Inverse of :func:`split`."""
    if layout == "component":
        return torch.cat([a, b, c, d], dim=-1)
    if layout == "interleaved":
        return torch.stack([a, b, c, d], dim=-1).flatten(-2)
    raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")


def to_layout(x: torch.Tensor, src: str, dst: str) -> torch.Tensor:
    """Convert (..., 4d) between the component-major and interleaved layouts."""
    return x if src == dst else join(*split(x, src), layout=dst)


def hamilton(h, r):
    """Quaternion product on component tuples (i^2 = j^2 = k^2 = ijk = -1)."""
    a1, b1, c1, d1 = h
    a2, b2, c2, d2 = r
    return (
        a1 * a2 - b1 * b2 - c1 * c2 - d1 * d2,
        a1 * b2 + b1 * a2 + c1 * d2 - d1 * c2,
        a1 * c2 - b1 * d2 + c1 * a2 + d1 * b2,
        a1 * d2 + b1 * c2 - c1 * b2 + d1 * a2,
    )


def dihedron(h, r):
    """Split-quaternion product on component tuples (i^2 = -1, j^2 = k^2 = +1)."""
    a1, b1, c1, d1 = h
    a2, b2, c2, d2 = r
    return (
        a1 * a2 - b1 * b2 + c1 * c2 + d1 * d2,
        a1 * b2 + b1 * a2 - c1 * d2 + d1 * c2,
        a1 * c2 + c1 * a2 + d1 * b2 - b1 * d2,
        a1 * d2 + d1 * a2 + b1 * c2 - c1 * b2,
    )


def product(h: torch.Tensor, r: torch.Tensor, algebra: str = "quaternion", layout: str = "component") -> torch.Tensor:
    """h (x) r for h, r: (..., 4d) (broadcasting) -> (..., 4d)."""
    if algebra not in ALGEBRAS:
        raise ValueError(f"algebra: expected one of {ALGEBRAS}, got {algebra!r}")
    out_dtype = torch.promote_types(h.dtype, r.dtype)
    acc = _acc_dtype(out_dtype)
    fn = hamilton if algebra == "quaternion" else dihedron
    q = fn(split(h.to(acc), layout), split(r.to(acc), layout))
    return join(*q, layout=layout).to(out_dtype)


def structure(algebra: str = "quaternion") -> torch.Tensor:
    """Structure constants T (4, 4, 4) with (h (x) r)_c = sum_ij T[c, i, j] h_i r_j."""
    fn = hamilton if algebra == "quaternion" else dihedron
    eye = torch.eye(4, dtype=torch.float64)
    T = torch.zeros(4, 4, 4, dtype=torch.float64)
    for i in range(4):
        for j in range(4):
            T[:, i, j] = torch.stack(fn(tuple(eye[i]), tuple(eye[j])))
    return T


def query_backward(grad_q, h, r, algebra="quaternion", layout="component", normalize=True):
    """Analytic VJP of :func:`query`: (grad_h, grad_r), both (B, 4d).

    grad_h_i = sum_cj T[c,i,j] g_c r_hat_j;  grad_r_hat_j = sum_ci T[c,i,j] g_c h_i;
    with normalisation, grad_r = (grad_r_hat - r_hat <grad_r_hat, r_hat>) / |r|.
    """
    out_dtype = torch.promote_types(h.dtype, r.dtype)
    acc = _acc_dtype(out_dtype)
    T = structure(algebra).to(device=h.device, dtype=acc)
    g = torch.stack(split(grad_q.to(acc), layout))  # (4, B, d)
    hh = torch.stack(split(h.to(acc), layout))
    rr = torch.stack(split(r.to(acc), layout))
    if normalize:
        inv = torch.rsqrt((rr * rr).sum(0))
        rh = rr * inv
    else:
        rh = rr
    gh = torch.einsum("cij,cbd,jbd->ibd", T, g, rh)
    grh = torch.einsum("cij,cbd,ibd->jbd", T, g, hh)
    if normalize:
        grh = (grh - rh * (grh * rh).sum(0)) * inv
    return join(*gh, layout=layout).to(h.dtype), join(*grh, layout=layout).to(r.dtype)


def normalize_relation(r: torch.Tensor, layout: str = "component") -> torch.Tensor:
    """r / sqrt(a^2 + b^2 + c^2 + d^2) per coordinate (Euclidean 4-norm)."""
    acc = _acc_dtype(r.dtype)
    a, b, c, d = split(r.to(acc), layout)
    inv = torch.rsqrt(a * a + b * b + c * c + d * d)
    return join(a * inv, b * inv, c * inv, d * inv, layout=layout).to(r.dtype)


def query(h, r, algebra: str = "quaternion", layout: str = "component", normalize: bool = True) -> torch.Tensor:
    """q = h (x) r_hat: (B, 4d)."""
    acc = _acc_dtype(torch.promote_types(h.dtype, r.dtype))
    rr = r.to(acc)
    if normalize:
        rr = normalize_relation(rr, layout)
    return product(h.to(acc), rr, algebra, layout).to(torch.promote_types(h.dtype, r.dtype))


def scores(
    q: torch.Tensor,
    entities: torch.Tensor,
    bias_h: Optional[torch.Tensor] = None,
    bias_t: Optional[torch.Tensor] = None,
    score: str = "inner",
) -> torch.Tensor:
    """Materialised 1-vs-all scores S: (B, N) from q: (B, K) and entities: (N, K)."""
    out_dtype = q.dtype
    acc = _acc_dtype(out_dtype)
    qa, ea = q.to(acc), entities.to(acc)
    s = qa @ ea.T
    if score == "inner":
        return s.to(out_dtype)
    if score != "distance":
        raise ValueError(f"score: expected one of {SCORES}, got {score!r}")
    # ||q - e||^2 expanded, as the fused kernels compute it.
    s = 2.0 * s - (qa * qa).sum(-1, keepdim=True) - (ea * ea).sum(-1)[None, :]
    if bias_h is not None:
        s = s + bias_h.to(acc)[:, None]
    if bias_t is not None:
        s = s + bias_t.to(acc)[None, :]
    return s.to(out_dtype)


def score_all(
    h, r, entities, algebra="quaternion", score="inner", normalize_relation=True,
    bias_h=None, bias_t=None, layout="component",
) -> torch.Tensor:
    """Reference 1-vs-all scores (B, N): product then GEMM then epilogue."""
    return scores(query(h, r, algebra, layout, normalize_relation), entities, bias_h, bias_t, score)


def _filter_mask(B: int, N: int, filter_offsets, filter_index, device) -> torch.Tensor:
    mask = torch.zeros(B, N, dtype=torch.bool, device=device)
    if filter_offsets is not None:
        counts = filter_offsets[1:] - filter_offsets[:-1]
        rows = torch.repeat_interleave(torch.arange(B, device=device), counts)
        mask[rows, filter_index.long()] = True
    return mask


def rank_from_scores(
    s: torch.Tensor, targets: torch.Tensor, filter_offsets=None, filter_index=None, ties: str = "realistic"
) -> torch.Tensor:
    """Filtered rank of targets[b] in row b of a materialised score matrix -> (B,) float64.

    optimistic = 1 + #{n: s_n > s_t}, pessimistic = 1 + #{n != t: s_n >= s_t},
    realistic = their mean (PyKEEN's definitions). Filtered entities never count.
    """
    if ties not in TIES:
        raise ValueError(f"ties: expected one of {TIES}, got {ties!r}")
    B, N = s.shape
    t = targets.long()
    st = s.gather(1, t[:, None])
    keep = ~_filter_mask(B, N, filter_offsets, filter_index, s.device)
    keep[torch.arange(B, device=s.device), t] = False
    gt = ((s > st) & keep).sum(1).double()
    ge = ((s >= st) & keep).sum(1).double()
    opt, pes = 1.0 + gt, 1.0 + ge
    if ties == "optimistic":
        return opt
    if ties == "pessimistic":
        return pes
    return 0.5 * (opt + pes)


def topk_from_scores(s: torch.Tensor, k: int, filter_offsets=None, filter_index=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k per row, descending, ties by lower index; filtered entries skipped."""
    B, N = s.shape
    mask = _filter_mask(B, N, filter_offsets, filter_index, s.device)
    # Stable descending sort gives the lower index first among equal scores; a
    # second stable sort on the mask puts filtered entries strictly last (a plain
    # -inf fill would let a filtered id tie with, and precede, a genuine -inf).
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    moved = torch.sort(mask.gather(1, order).to(torch.uint8), dim=1, stable=True).indices
    order = order.gather(1, moved)[:, :k].contiguous()
    return s.gather(1, order), order


def ce_from_scores(s: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1-N cross-entropy per row: logsumexp(S_b) - S_b,t (B,), in the accumulation dtype."""
    acc = _acc_dtype(s.dtype)
    sa = s.to(acc)
    return (torch.logsumexp(sa, dim=1) - sa.gather(1, targets.long()[:, None])[:, 0]).to(s.dtype)


def rank_all(h, r, entities, targets, filter_offsets=None, filter_index=None, ties="realistic",
             algebra="quaternion", score="inner", normalize_relation=True, bias_h=None, bias_t=None,
             layout="component"):
    s = score_all(h, r, entities, algebra, score, normalize_relation, bias_h, bias_t, layout)
    return rank_from_scores(s, targets, filter_offsets, filter_index, ties)


def one_to_n_loss(h, r, entities, targets, algebra="quaternion", score="inner", normalize_relation=True,
                  bias_h=None, bias_t=None, layout="component", reduction="mean"):
    s = score_all(h, r, entities, algebra, score, normalize_relation, bias_h, bias_t, layout)
    loss = ce_from_scores(s, targets)
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss
