"""Hypercomplex knowledge-graph embedding layers on top of embkern's fused ops.

Models (``dim`` = d hypercomplex coordinates; every entity and relation row
holds ``4 * d`` reals, stored component-major ``[a | b | c | d]``):

===============  ==========  ==========  ============================================
model            algebra     score       entity representation
===============  ==========  ==========  ============================================
``QuatE``        quaternion  inner       free (N, 4d) table
``DihedronKGE``  dihedron    distance    free (N, 4d) table + head/tail biases (N,)
``Tetra``        dihedron    distance    [struct | k W(x) | k F(x) | k S(x)] + biases
===============  ==========  ==========  ============================================

Scores (``docs/ops/hypercomplex.md``): inner ``<h (x) r_hat, t>``; distance
``b_h + b_t - ||h (x) r_hat - t||^2``; ``r_hat`` is r divided by its Euclidean
4-norm per coordinate. ``DihedronKGE`` defaults to the distance score because
that is how the dihedron models of Nayyeri et al. (2023) score (with KGEmb's
two per-entity bias tables ``bh``/``bt``); ``score="inner"`` is accepted.

Relations are reciprocal by default: the relation table has ``2 R`` rows, the
inverse of r being ``r + R``; head prediction (?, r, t) is tail prediction
(t, r + R, ?). Every 1-vs-all computation goes through the public fused ops
(``embkern.score_all``, ``rank_all``, ``one_to_n_loss``) with the model's
``backend`` (or a per-call override), so the layers pick up the C++/Triton
kernels without changes.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from .. import _checks
from ..ops.hypercomplex import dihedron_product, hamilton_product, one_to_n_loss, rank_all, score_all

__all__ = ["KGTables", "HypercomplexKGE", "QuatE", "DihedronKGE", "Tetra"]

REGULARIZERS = ("n3", "f2", None)


class KGTables(NamedTuple):
    """The tables one scoring call needs.

    entities: (N, 4d); relations: (R', 4d); bias_head, bias_tail: (N,) or None.
    """

    entities: Tensor
    relations: Tensor
    bias_head: Optional[Tensor]
    bias_tail: Optional[Tensor]


def _ids(x, name: str, upper: int, device) -> Tensor:
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x)
    _checks.int_tensor(x, name, 1)
    _checks.index_range(x, name, upper)
    return x.to(device=device, dtype=torch.int64)


class HypercomplexKGE(nn.Module):
    """Base class: a 4d-real entity / relation model scored by one hypercomplex product.

    Args:
        num_entities: N.
        num_relations: R base relations; the relation table has 2R rows when
            ``reciprocal`` (inverse of r is r + R), R otherwise.
        dim: d hypercomplex coordinates (4d reals per row).
        algebra: "quaternion" | "dihedron".
        score: "inner" | "distance" (distance adds per-entity head and tail biases).
        reciprocal: allocate inverse relations.
        init_scale: std of the normal initialisation of entity rows (1e-3, as
            kbc / KGEmb). Relations start at std 1: they are normalised before
            use, so their scale only sets the effective step size of the
            optimiser (a 1e-3 row would be rotated by a whole radian by one
            Adagrad step of 0.1).
        regularizer: "n3" (nuclear 3-norm of the head and tail coordinates'
            4-moduli, Lacroix et al. 2018), "f2" (squared Frobenius) or None.
        reg_weight: its weight; the regulariser is divided by the batch size.
        backend: default backend of every op call (None = fastest available).
    """

    def __init__(self, num_entities: int, num_relations: int, dim: int, *, algebra: str = "quaternion",
                 score: str = "inner", reciprocal: bool = True, init_scale: float = 1e-3,
                 regularizer: Optional[str] = "n3", reg_weight: float = 0.0, backend: Optional[str] = None,
                 dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        for name, v in (("num_entities", num_entities), ("num_relations", num_relations), ("dim", dim)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
            if v < 1:
                raise ValueError(f"{name}: expected >= 1, got {v}")
        _checks.choice(algebra, "algebra", ("quaternion", "dihedron"))
        _checks.choice(score, "score", ("inner", "distance"))
        if regularizer not in REGULARIZERS:
            raise ValueError(f"regularizer: expected one of {REGULARIZERS}, got {regularizer!r}")
        if not (isinstance(reg_weight, (int, float)) and reg_weight >= 0 and math.isfinite(reg_weight)):
            raise ValueError(f"reg_weight: expected a finite float >= 0, got {reg_weight!r}")
        self.num_entities = num_entities
        self.num_relations = num_relations
        self.dim = dim
        self.algebra = algebra
        self.score_kind = score
        self.reciprocal = bool(reciprocal)
        self.init_scale = float(init_scale)
        self.regularizer = regularizer
        self.reg_weight = float(reg_weight)
        self.backend = backend
        kw = {"dtype": dtype if dtype is not None else torch.get_default_dtype(), "device": device}
        self.relation = nn.Parameter(torch.randn(self.num_relation_ids, 4 * dim, **kw))
        if score == "distance":
            self.bias_head = nn.Parameter(torch.zeros(num_entities, **kw))
            self.bias_tail = nn.Parameter(torch.zeros(num_entities, **kw))
        else:
            self.register_parameter("bias_head", None)
            self.register_parameter("bias_tail", None)

    # -- tables -----------------------------------------------------------

    @property
    def num_relation_ids(self) -> int:
        """Rows of the relation table: 2R with reciprocal relations, R without."""
        return self.num_relations * (2 if self.reciprocal else 1)

    def inverse(self, r: Tensor) -> Tensor:
        """Id of the reciprocal of base relation r (r + R)."""
        if not self.reciprocal:
            raise ValueError("r: this model was built with reciprocal=False and has no inverse relations")
        return r + self.num_relations

    def entity_rows(self, ids: Optional[Tensor] = None) -> Tensor:
        """Entity representations: (len(ids), 4d), or (N, 4d) for ids=None."""
        raise NotImplementedError

    def tables(self) -> KGTables:
        """All tables at once (entity rows built once; reuse them across batches in evaluation)."""
        return KGTables(self.entity_rows(), self.relation, self.bias_head, self.bias_tail)

    def _device(self) -> torch.device:
        return self.relation.device

    def _be(self, backend: Optional[str]) -> Optional[str]:
        return backend if backend is not None else self.backend

    def _hr(self, h, r, tables: Optional[KGTables]):
        dev = self._device()
        h = _ids(h, "h", self.num_entities, dev)
        r = _ids(r, "r", self.num_relation_ids, dev)
        if h.shape != r.shape:
            raise ValueError(f"r: expected shape {tuple(h.shape)} (same as h), got {tuple(r.shape)}")
        T = tables if tables is not None else self.tables()
        bh = None if T.bias_head is None else T.bias_head[h]
        return h, r, T, T.entities[h], T.relations[r], bh

    def _ops_kw(self, T: KGTables, bh: Optional[Tensor], backend: Optional[str]) -> dict:
        return dict(algebra=self.algebra, score=self.score_kind, normalize_relation=True, bias_h=bh,
                    bias_t=T.bias_tail, layout="component", backend=self._be(backend))

    # -- scoring ----------------------------------------------------------

    def score_hrt(self, h, r, t, backend: Optional[str] = None) -> Tensor:
        """Scores of individual triples.

        Args:
            h, r, t: (B,) integer ids (r may be a reciprocal id).
        Returns:
            (B,) scores, differentiable.
        """
        dev = self._device()
        h = _ids(h, "h", self.num_entities, dev)
        r = _ids(r, "r", self.num_relation_ids, dev)
        t = _ids(t, "t", self.num_entities, dev)
        if not (h.shape == r.shape == t.shape):
            raise ValueError(f"h, r, t: expected equal shapes, got {tuple(h.shape)}, {tuple(r.shape)}, "
                             f"{tuple(t.shape)}")
        prod = hamilton_product if self.algebra == "quaternion" else dihedron_product
        q = prod(self.entity_rows(h), self.relation[r], normalize=True, backend=self._be(backend))
        tv = self.entity_rows(t)
        if self.score_kind == "inner":
            return (q * tv).sum(-1)
        return self.bias_head[h] + self.bias_tail[t] - ((q - tv) ** 2).sum(-1)

    def score_t(self, h, r, backend: Optional[str] = None, tables: Optional[KGTables] = None) -> Tensor:
        """1-vs-all tail scores of (h, r, ?) with ``embkern.score_all``.

        Args:
            h, r: (B,) integer ids.
            tables: precomputed :meth:`tables` (optional).
        Returns:
            (B, N) scores, differentiable.
        """
        _, _, T, hv, rv, bh = self._hr(h, r, tables)
        return score_all(hv, rv, T.entities, **self._ops_kw(T, bh, backend))

    def forward(self, h, r) -> Tensor:
        """Same as :meth:`score_t`: (B,), (B,) -> (B, N)."""
        return self.score_t(h, r)

    def rank(self, h, r, t, filter=None, ties: str = "realistic", backend: Optional[str] = None,
             tables: Optional[KGTables] = None) -> Tensor:
        """Rank of the true tail among all N entities with the fused ``embkern.rank_all``.

        Args:
            h, r, t: (B,) integer ids.
            filter: None (raw ranks); an object with ``lookup(h, r) -> (offsets, index)``
                such as :class:`embkern.contrib.datasets.TailFilter`; an ``(offsets (B+1,),
                index)`` CSR tuple; or a list of B per-row lists of tail ids to skip
                (the forms of :func:`embkern.rank_all`).
            ties: "realistic" (default) | "optimistic" | "pessimistic".
        Returns:
            (B,) float64 ranks, 1 = best. A NaN true-tail score raises ValueError.
        """
        h, r, T, hv, rv, bh = self._hr(h, r, tables)
        t = _ids(t, "t", self.num_entities, self._device())
        if t.shape != h.shape:
            raise ValueError(f"t: expected shape {tuple(h.shape)} (same as h), got {tuple(t.shape)}")
        if filter is not None and hasattr(filter, "lookup"):
            filter = filter.lookup(h, r)
        with torch.no_grad():
            return rank_all(hv, rv, T.entities, t, filter_index=filter, ties=ties, **self._ops_kw(T, bh, backend))

    def loss(self, h, r, t, reduction: str = "mean", backend: Optional[str] = None) -> Tensor:
        """1-N cross-entropy of the true tails (``embkern.one_to_n_loss``) plus the regulariser.

        Args:
            h, r, t: (B,) integer ids.
            reduction: "mean" | "sum" (the regulariser is added once, scaled by 1/B
                for "mean" and unscaled for "sum"); "none" returns the (B,) CE only.
        Returns:
            scalar (or (B,)), differentiable in every parameter.
        """
        _checks.choice(reduction, "reduction", ("mean", "sum", "none"))
        h, r, T, hv, rv, bh = self._hr(h, r, None)
        t = _ids(t, "t", self.num_entities, self._device())
        if t.shape != h.shape:
            raise ValueError(f"t: expected shape {tuple(h.shape)} (same as h), got {tuple(t.shape)}")
        ce = one_to_n_loss(hv, rv, T.entities, t, reduction=reduction, **self._ops_kw(T, bh, backend))
        if reduction == "none" or self.regularizer is None or self.reg_weight == 0.0:
            return ce
        reg = self.regularization(hv, T.entities[t])
        return ce + self.reg_weight * (reg / max(h.numel(), 1) if reduction == "mean" else reg)

    def regularization(self, *factors: Tensor) -> Tensor:
        """Sum over factors (B, 4d) of |coordinate modulus|^3 (N3) or ^2 (F2).

        The modulus of coordinate k is sqrt(a_k^2 + b_k^2 + c_k^2 + d_k^2). Relations
        are not regularised: they are normalised before use, so shrinking them only
        brings r_hat closer to the 0/0 point.
        """
        p = 3 if self.regularizer == "n3" else 2
        total = None
        for f in factors:
            mod2 = f.reshape(*f.shape[:-1], 4, self.dim).pow(2).sum(-2)
            term = mod2.pow(1.5).sum() if p == 3 else mod2.sum()
            total = term if total is None else total + term
        return total

    def extra_repr(self) -> str:
        return (f"num_entities={self.num_entities}, num_relations={self.num_relations}, dim={self.dim} "
                f"({4 * self.dim} reals), algebra={self.algebra!r}, score={self.score_kind!r}, "
                f"reciprocal={self.reciprocal}, regularizer={self.regularizer!r}, reg_weight={self.reg_weight}, "
                f"backend={self.backend!r}")


class _FreeEntities(HypercomplexKGE):
    def __init__(self, num_entities, num_relations, dim, **kw):
        super().__init__(num_entities, num_relations, dim, **kw)
        self.entity = nn.Parameter(self.init_scale * torch.randn(num_entities, 4 * dim, dtype=self.relation.dtype,
                                                                 device=self.relation.device))

    def entity_rows(self, ids: Optional[Tensor] = None) -> Tensor:
        return self.entity if ids is None else self.entity[ids]


class QuatE(_FreeEntities):
    """QuatE (Zhang et al. 2019): score <h (x) r_hat, t> with the Hamilton product.

    Parameters: ``entity`` (N, 4d), ``relation`` (R', 4d), component-major.
    Keyword arguments as :class:`HypercomplexKGE` (algebra and score are fixed).
    """

    def __init__(self, num_entities: int, num_relations: int, dim: int, **kw):
        for k in ("algebra", "score"):
            if k in kw:
                raise TypeError(f"{k}: QuatE fixes algebra='quaternion', score='inner'")
        super().__init__(num_entities, num_relations, dim, algebra="quaternion", score="inner", **kw)


class DihedronKGE(_FreeEntities):
    """Dihedron (split-quaternion) KGE: b_h + b_t - ||h (x)_D r_hat - t||^2 by default.

    ``score="inner"`` gives <h (x)_D r_hat, t> without biases. r_hat uses the
    Euclidean 4-norm, as the official code (it does not preserve the split norm).
    Parameters: ``entity`` (N, 4d), ``relation`` (R', 4d), ``bias_head`` and
    ``bias_tail`` (N,) for the distance score.
    """

    def __init__(self, num_entities: int, num_relations: int, dim: int, score: str = "distance", **kw):
        if "algebra" in kw:
            raise TypeError("algebra: DihedronKGE fixes algebra='dihedron'")
        super().__init__(num_entities, num_relations, dim, algebra="dihedron", score=score, **kw)


class _Project(nn.Module):
    """Linear(in, d) -> tanh -> Linear(d, d) -> tanh, as the official AdjustDim."""

    def __init__(self, in_dim: int, dim: int, dtype, device):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, dim, dtype=dtype, device=device)
        self.fc2 = nn.Linear(dim, dim, dtype=dtype, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.fc2(torch.tanh(self.fc1(x))))


class Tetra(HypercomplexKGE):
    """Tetra (Nayyeri et al. 2023): structure + three frozen text views in one dihedron.

    An entity x is ``[s(x) | k W(x) | k F(x) | k S(x)]`` (component-major, each
    block d wide): s a free structural table, W / F / S the frozen word-,
    document- (fastText) and sentence-level features of x each passed through
    Linear(in, d) -> tanh -> Linear(d, d) -> tanh, k = ``kappa`` (1e-3).
    Score: ``b_h + b_t - ||h (x) r_hat - t||^2``, t built the same way as h.

    The k choice: the official code scales the tail's W part by k always but
    its F and S parts only at evaluation. Here every text part of heads AND
    tails is scaled by k in training and evaluation alike, so the model that is
    trained is the model that is evaluated (and 1-vs-all training uses the same
    entity table as 1-vs-all ranking).

    Args:
        w_features, f_features, s_features: (N, in_w), (N, in_f), (N, in_s) frozen
            float tensors (stored as buffers, no gradient).
        kappa: text scale (1e-3).
        algebra: "dihedron" (Tetra_WSF, default) or "quaternion" (Tetra_WSF_Quat).
        other keyword arguments as :class:`HypercomplexKGE` (score is fixed to "distance").
    Parameters: ``struct`` (N, d), ``relation`` (R', 4d), ``bias_head``/``bias_tail``
    (N,), and the three projections ``proj_w``, ``proj_f``, ``proj_s``.
    """

    def __init__(self, num_entities: int, num_relations: int, dim: int, w_features: Tensor, f_features: Tensor,
                 s_features: Tensor, kappa: float = 1e-3, algebra: str = "dihedron", **kw):
        if "score" in kw:
            raise TypeError("score: Tetra fixes score='distance'")
        super().__init__(num_entities, num_relations, dim, algebra=algebra, score="distance", **kw)
        if not (isinstance(kappa, (int, float)) and math.isfinite(kappa)):
            raise ValueError(f"kappa: expected a finite float, got {kappa!r}")
        self.kappa = float(kappa)
        dt, dev = self.relation.dtype, self.relation.device
        self.struct = nn.Parameter(self.init_scale * torch.randn(num_entities, dim, dtype=dt, device=dev))
        for name, feat in (("w_features", w_features), ("f_features", f_features), ("s_features", s_features)):
            _checks.float_tensor(feat, name, 2)
            if feat.shape[0] != num_entities or feat.shape[1] < 1:
                raise ValueError(f"{name}: expected shape ({num_entities}, in_dim >= 1), got {tuple(feat.shape)}")
            _checks.finite(feat, name)
            self.register_buffer(name, feat.detach().to(dtype=dt, device=dev).clone())
        self.proj_w = _Project(w_features.shape[1], dim, dt, dev)
        self.proj_f = _Project(f_features.shape[1], dim, dt, dev)
        self.proj_s = _Project(s_features.shape[1], dim, dt, dev)

    def entity_rows(self, ids: Optional[Tensor] = None) -> Tensor:
        sel = (lambda x: x) if ids is None else (lambda x: x[ids])  # noqa: E731
        k = self.kappa
        return torch.cat([sel(self.struct), k * self.proj_w(sel(self.w_features)),
                          k * self.proj_f(sel(self.f_features)), k * self.proj_s(sel(self.s_features))], dim=-1)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", kappa={self.kappa}"


# ---------------------------------------------------------------------------
# Training and evaluation
