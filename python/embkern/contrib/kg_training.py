"""Training and evaluating the hypercomplex KG models of :mod:`embkern.nn` (a study helper, not a layer).

:func:`fit` trains with the fused 1-N cross-entropy (``embkern.one_to_n_loss``),
:func:`evaluate` gives filtered link-prediction metrics with the fused rank
kernel (``embkern.rank_all``), and :func:`kinships_benchmark` trains and scores
QuatE or DihedronKGE on the Kinships triples (:mod:`embkern.contrib.datasets`),
the end-to-end check ``python -m embkern bench`` reports for hypercomplex.
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor

from .. import _checks
from .._progress import Progress, iterate
from ..nn.hypercomplex import DihedronKGE, HypercomplexKGE, QuatE

__all__ = ["fit", "evaluate", "kinships_benchmark"]


def _triples(x, name: str, model: HypercomplexKGE, base: bool) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape (n, 3), got {type(x).__name__}")
    _checks.int_tensor(x, name, 2)
    if x.shape[1] != 3:
        raise ValueError(f"{name}: expected shape (n, 3) (head, relation, tail), got {tuple(x.shape)}")
    upper_r = model.num_relations if base else model.num_relation_ids
    N = model.num_entities
    for col, what, upper in ((0, "head", N), (1, "relation", upper_r), (2, "tail", N)):
        c = x[:, col]
        if c.numel() and (int(c.min()) < 0 or int(c.max()) >= upper):
            bad = int(c.min()) if int(c.min()) < 0 else int(c.max())
            raise ValueError(f"{name}: expected {what} ids in [0, {upper}), got {bad}")
    return x.to(torch.int64)


def fit(model: HypercomplexKGE, train_triples: Tensor, epochs: int = 10, batch_size: int = 512, lr: float = 0.1,
        optimizer: str = "adagrad", reciprocal: bool = True, backend: Optional[str] = None, seed: Optional[int] = 0,
        progress: bool = True, callback=None) -> List[float]:
    """Train with 1-N cross-entropy over all entities (fused ``one_to_n_loss``).

    Args:
        model: a :class:`HypercomplexKGE`.
        train_triples: (n, 3) integer (head, relation, tail) with BASE relation ids.
        epochs, batch_size, lr: the usual.
        optimizer: "adagrad" (kbc / KGEmb default for 1-N training) | "adam".
        reciprocal: train on the triples plus (t, r + R, h), so the model predicts
            heads as well (needs ``model.reciprocal``).
        backend: overrides ``model.backend`` for this run.
        seed: shuffling seed (None: torch's global generator).
        progress: tqdm bar over epochs (when tqdm is installed).
        callback: optional ``callback(epoch, mean_loss)``; return True to stop early.
    Returns:
        Mean training loss per epoch.
    """
    if not isinstance(model, HypercomplexKGE):
        raise TypeError(f"model: expected an embkern.nn HypercomplexKGE, got {type(model).__name__}")
    train = _triples(train_triples, "train_triples", model, base=reciprocal)
    for name, v in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "epochs" else 1):
            raise ValueError(f"{name}: expected an int >= {0 if name == 'epochs' else 1}, got {v!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr: expected a float > 0, got {lr!r}")
    _checks.choice(optimizer, "optimizer", ("adagrad", "adam"))
    if reciprocal:
        if not model.reciprocal:
            raise ValueError("reciprocal: True needs a model built with reciprocal=True (2R relation rows)")
        from .datasets import add_reciprocal

        train = add_reciprocal(train, model.num_relations)
    train = train.to(model._device())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adagrad(params, lr=lr) if optimizer == "adagrad" else torch.optim.Adam(params, lr=lr)
    gen = None
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
    history: List[float] = []
    model.train()
    bar = Progress(epochs, desc=f"fit {type(model).__name__}", unit="epoch", enabled=progress)
    for epoch in range(epochs):
        perm = torch.randperm(train.shape[0], generator=gen).to(train.device)
        total, count = 0.0, 0
        for start in range(0, train.shape[0], batch_size):
            b = train[perm[start:start + batch_size]]
            opt.zero_grad(set_to_none=True)
            loss = model.loss(b[:, 0], b[:, 1], b[:, 2], backend=backend)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * b.shape[0]
            count += b.shape[0]
        mean = total / max(count, 1)
        history.append(mean)
        bar.set(f"loss {mean:.4f}")
        bar.update()
        if callback is not None and callback(epoch, mean):
            break
    bar.close()
    return history


def _filter_obj(filter, model: HypercomplexKGE):
    """None | TailFilter-like | iterable of (n, 3) triple sets -> None | object with lookup."""
    if filter is None or hasattr(filter, "lookup"):
        return filter
    if isinstance(filter, Tensor):
        filter = [filter]
    if isinstance(filter, (list, tuple)):
        from .datasets import build_filter

        sets = [_triples(f, f"filter[{i}]", model, base=True) for i, f in enumerate(filter)]
        return build_filter(*[s.cpu() for s in sets], num_entities=model.num_entities,
                            num_relations=model.num_relations, reciprocal=model.reciprocal)
    raise TypeError("filter: expected None, a TailFilter (embkern.contrib.datasets), or a list of (n, 3) triple tensors "
                    f"with all known triples, got {type(filter).__name__}")


def evaluate(model: HypercomplexKGE, triples: Tensor, filter=None, batch_size: int = 1024, ties: str = "realistic",
             sides: Optional[str] = None, ks: Sequence[int] = (1, 3, 10), backend: Optional[str] = None,
             progress: bool = False) -> Dict[str, float]:
    """Link-prediction metrics with the fused rank kernel (``embkern.rank_all``), batched.

    Args:
        triples: (n, 3) integer test triples with BASE relation ids.
        filter: None (raw), a :class:`embkern.contrib.datasets.TailFilter` built with the
            model's reciprocal setting (``dataset.filter()``), or a list of (n, 3)
            triple sets (train, valid, test) to build one from.
        ties: rank tie policy, "realistic" by default.
        sides: "both" (tail prediction (h, r, ?) and head prediction as
            (t, r + R, ?)), "tail" or "head"; default "both" for reciprocal
            models, "tail" otherwise.
        ks: the Hits@k cut-offs.
    Returns:
        ``{"mrr", "hits@1", "hits@3", "hits@10", "mean_rank", "count"}`` averaged
        over every ranked query (2n for both sides); plus "mrr_tail"/"mrr_head".
    Raises:
        ValueError: a test triple whose true tail scores NaN (NaN or inf in the
            embeddings, or products that overflow). A NaN score has no rank, so
            no metric is reported for such a model rather than a perfect one;
            the message names the first such row of the batch (see
            :func:`embkern.rank_all`).
    """
    if not isinstance(model, HypercomplexKGE):
        raise TypeError(f"model: expected an embkern.nn HypercomplexKGE, got {type(model).__name__}")
    x = _triples(triples, "triples", model, base=True)
    if sides is None:
        sides = "both" if model.reciprocal else "tail"
    _checks.choice(sides, "sides", ("both", "tail", "head"))
    if sides != "tail" and not model.reciprocal:
        raise ValueError(f"sides: {sides!r} needs reciprocal relations (head prediction is (t, r + R, ?)); "
                         "this model has reciprocal=False, use sides='tail'")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    flt = _filter_obj(filter, model)
    dev = model._device()
    x = x.to(dev)
    queries = {}
    if sides in ("both", "tail"):
        queries["tail"] = x
    if sides in ("both", "head"):
        queries["head"] = torch.stack([x[:, 2], model.inverse(x[:, 1]), x[:, 0]], dim=1)
    was_training = model.training
    model.eval()
    ranks = {}
    try:
        with torch.no_grad():
            T = model.tables()  # Tetra builds its N entity rows once, not per batch
            for side, q in queries.items():
                parts = []
                for start in iterate(range(0, q.shape[0], batch_size), desc=f"rank {side}", unit="batch",
                                     enabled=progress, leave=False):
                    b = q[start:start + batch_size]
                    parts.append(model.rank(b[:, 0], b[:, 1], b[:, 2], filter=flt, ties=ties, backend=backend,
                                            tables=T))
                ranks[side] = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    finally:
        model.train(was_training)
    allr = torch.cat(list(ranks.values())).cpu()
    out: Dict[str, float] = {}
    n = allr.numel()
    out["mrr"] = float((1.0 / allr).mean()) if n else float("nan")
    for k in ks:
        out[f"hits@{k}"] = float((allr <= k).double().mean()) if n else float("nan")
    out["mean_rank"] = float(allr.mean()) if n else float("nan")
    out["count"] = n
    for side, r in ranks.items():
        out[f"mrr_{side}"] = float((1.0 / r.cpu()).mean()) if r.numel() else float("nan")
    return out


def kinships_benchmark(algebra: str = "quaternion", epochs: int = 50, dim: int = 32, backend: Optional[str] = None,
                       progress: bool = True, batch_size: int = 256, lr: float = 0.1, reg_weight: float = 0.05,
                       seed: int = 0, num_threads: Optional[int] = None) -> Dict[str, Union[float, int, str]]:
    """Train and evaluate on Kinships (reciprocal relations, 1-N CE, Adagrad, N3); filtered test metrics.

    Args:
        algebra: "quaternion" (:class:`QuatE`, inner score) or "dihedron"
            (:class:`DihedronKGE`, distance score with biases).
        epochs: training epochs.
        dim: d hypercomplex coordinates (4d reals per entity).
        backend: op backend (None = fastest available).
        reg_weight: N3 weight; on Kinships (d = 32, 30 epochs) 1e-3 / 1e-2 / 5e-2 gave
            test MRR 0.758 / 0.800 / 0.814 for QuatE.
        num_threads: torch CPU threads during the run (restored after); None leaves
            them alone. The GEMMs are tiny (256 x 4d x 104): on a loaded machine one
            thread is much faster per step than two (each step ends at an OpenMP
            barrier that may wait a scheduler time slice for the second thread).
    Returns:
        ``{"mrr", "hits@1", "hits@3", "hits@10", "mean_rank", "train_time_s",
        "eval_time_s", "final_loss", "model", "algebra", "dim", "reals",
        "epochs", "backend"}`` (filtered, both sides, realistic ties).
    Raises:
        FileNotFoundError: Kinships is not installed (the message gives the pip command).
    """
    from .datasets import load_kg

    _checks.choice(algebra, "algebra", ("quaternion", "dihedron"))
    ds = load_kg("kinships")
    old_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _kinships_run(ds, algebra, epochs, dim, backend, progress, batch_size, lr, reg_weight, seed)
    finally:
        torch.set_num_threads(old_threads)


def _kinships_run(ds, algebra, epochs, dim, backend, progress, batch_size, lr, reg_weight, seed):
    torch.manual_seed(seed)
    if algebra == "quaternion":
        model = QuatE(ds.num_entities, ds.num_relations, dim, reg_weight=reg_weight, backend=backend)
    else:
        model = DihedronKGE(ds.num_entities, ds.num_relations, dim, reg_weight=reg_weight, backend=backend)
    t0 = time.perf_counter()
    hist = fit(model, ds.train, epochs=epochs, batch_size=batch_size, lr=lr, progress=progress, seed=seed)
    t1 = time.perf_counter()
    metrics = evaluate(model, ds.test, filter=ds.filter(reciprocal=True))
    t2 = time.perf_counter()
    used = backend
    if used is None:
        from ..ops.hypercomplex import _resolve

        used = _resolve("one_to_n_loss", None, model.relation)  # the training step's backend
    out: Dict[str, Union[float, int, str]] = {k: v for k, v in metrics.items()}
    out.update(train_time_s=t1 - t0, eval_time_s=t2 - t1, final_loss=hist[-1] if hist else float("nan"),
               model=type(model).__name__, algebra=algebra, dim=dim, reals=4 * dim, epochs=epochs,
               backend=str(used), threads=torch.get_num_threads())
    return out
