"""Benchmark workloads of the hypercomplex op (FB15k-237 scale, fp32).

Sizes: N = 14,505 entities, d = 100 quaternion coordinates (K = 4d = 400),
batches B = 128 and 1024 -- FB15k-237 with the usual QuatE width.

Cases (each times every available embkern backend on the same inputs):

* ``score_all`` inner/quaternion and distance/dihedron (with biases). Anchors:
  ``torch.mm`` of the same (B, K) x (K, N) GEMM -- the floor a fused kernel is
  measured against (target: within 1.3x of it) -- and, for the quaternion
  inner score at B = 128, PyKEEN's QuatE 1-vs-all formulation: one broadcast
  ``einsum("...di,...dj,...dk,ijk->...")`` over (B, 1, d, 4) x (1, N, d, 4),
  which torch contracts left to right and so materialises (B, N, 4, 4, 4)
  intermediates (targets: >= 20x faster, >= 20x less peak memory).
  PyKEEN is used when importable, else that same einsum call is timed and
  labelled as a reimplementation. At B = 1024 it would need ~7.4 GB and ~30 s
  a call on 2 cores, so it runs at B = 128 only.
* ``rank_all`` (filtered, 5 random known tails per row, realistic ties):
  peak extra memory against one B x N fp32 buffer.
* ``topk_all`` k = 10; anchor ``torch.mm`` + ``torch.topk``.
* ``one_to_n_loss`` forward + backward (grads of h, r and the entity table);
  anchor: plain torch autograd (product, ``torch.mm``, ``F.cross_entropy``).

``--quick`` keeps B = 1024 only for ``score_all`` and drops the slow
baselines (reference, PyKEEN) there; ``EMBKERN_BENCH_TINY=1`` shrinks every
size for the test-suite.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from .. import _backends
from ..ops import hypercomplex as hc_ops
from ..reference import hypercomplex as ref
from .workload import Target, Workload, tiny

# The kernels each public function resolves: a backend is timed for a case only if it implements all of them.
KERNELS_OF = hc_ops.DESCRIPTOR.entry_points

FB15K237_N = 14_505
FB15K237_D = 100
N_FILTER = 5  # known true tails per query in the filtered-rank case
TOPK = 10


def _sizes():
    if tiny():
        return {"N": 300, "d": 8, "batches": (16, 64)}
    return {"N": FB15K237_N, "d": FB15K237_D, "batches": (128, 1024)}


# ---------------------------------------------------------------------------
# Inputs: generated once per (B, N, d, device), fp64 copies on demand.


class _Data:
    _entities: Dict[tuple, torch.Tensor] = {}

    def __init__(self, B: int, N: int, d: int, device: torch.device, seed: int = 0):
        self.B, self.N, self.d, self.K = B, N, d, 4 * d
        self.device = device
        self.seed = seed
        self._t: Dict[str, torch.Tensor] = {}

    def _gen(self, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1000 + salt)

    def _randn(self, shape, salt, scale=0.1):
        # 0.1 ~ Xavier scale for K = 400; scores then have O(1) spread, so the
        # softmax of the cross-entropy is neither one-hot nor flat.
        x = torch.randn(*shape, generator=self._gen(salt), dtype=torch.float64) * scale
        return x.to(torch.float32).to(self.device)

    @property
    def E(self) -> torch.Tensor:
        key = (self.N, self.d, str(self.device))
        if key not in _Data._entities:
            _Data._entities[key] = self._randn((self.N, self.K), 1)
        return _Data._entities[key]

    def get(self, name: str) -> torch.Tensor:
        if name not in self._t:
            B, N = self.B, self.N
            if name == "h":
                t = self._randn((B, self.K), 2 + B)
            elif name == "r":
                t = self._randn((B, self.K), 3 + B, scale=1.0)
            elif name == "bh":
                t = self._randn((B,), 4 + B)
            elif name == "bt":
                t = self._randn((N,), 5)
            elif name == "targets":
                t = torch.randint(0, N, (B,), generator=self._gen(6 + B)).to(self.device)
            elif name == "fo":
                t = torch.arange(0, (B + 1) * N_FILTER, N_FILTER, dtype=torch.int64).to(self.device)
            elif name == "fi":
                t = torch.randint(0, N, (B * N_FILTER,), generator=self._gen(7 + B)).to(self.device)
            else:
                raise KeyError(name)
            self._t[name] = t
        return self._t[name]

    def f64(self, name: str) -> torch.Tensor:
        key = name + "@64"
        if key not in self._t:
            src = self.E if name == "E" else self.get(name)
            self._t[key] = src.detach().to(torch.float64)
        return self._t[key]

    def drop64(self) -> None:
        for k in [k for k in self._t if k.endswith("@64")]:
            del self._t[k]

    def free(self) -> None:
        self._t.clear()


def _fast_backends(device: torch.device) -> List[str]:
    return ["cpu"] if device.type == "cpu" else ["cuda", "triton"]


def _availability(group: str, device: torch.device, quick_skip: Optional[str] = None) -> tuple:
    """(backends to time, {backend: why not}) for one public function on this device, fp32."""
    run, skipped = ["reference"], {}
    for be in _fast_backends(device):
        if be not in hc_ops.DESCRIPTOR.backends:
            continue  # the op has no such backend at all (e.g. hypercomplex has no CUDA-C path)
        bad = {k: st.reason for k in KERNELS_OF[group]
               for st in [_backends.check(hc_ops.DESCRIPTOR, be, (k,), device.type, torch.float32)] if not st.ok}
        if bad:
            reasons = list(dict.fromkeys(bad.values()))
            if all("not implemented" in r for r in reasons):
                skipped[be] = f"{group} needs kernels not implemented in this build: {', '.join(bad)}"
            else:
                skipped[be] = "; ".join(f"{k}: {r}" for k, r in list(bad.items())[:2])
        else:
            run.append(be)
    if device.type == "cpu" and "triton" not in skipped:
        skipped["triton"] = "Triton on CPU tensors runs only in the interpreter (correct, ~1000x slower); not timed"
    return run, skipped


def _max_abs(out, ref64) -> float:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    refs = ref64 if isinstance(ref64, (tuple, list)) else (ref64,)
    err = 0.0
    for o, r in zip(outs, refs):
        if o is None or r is None:
            continue
        if o.numel():
            err = max(err, float((o.detach().to(torch.float64) - r.to(torch.float64)).abs().max()))
    return err


# ---------------------------------------------------------------------------
# PyKEEN's QuatE 1-vs-all


def _quate_table() -> torch.Tensor:
    # table[i, j, k]: coefficient of basis k in e_i * e_j (PyKEEN's multiplication_table
    # convention); ref.structure gives T[k, i, j].
    return ref.structure("quaternion").permute(1, 2, 0).contiguous().to(torch.float32)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


class _TinySkip(Exception):
    pass


def _pykeen_interaction():
    """(callable(h, r, t) -> scores, label, why-not-pykeen) -- PyKEEN's QuatEInteraction when importable."""
    try:
        if tiny():  # importing pykeen pulls scikit-learn: ~10 s, longer than the whole tiny bench
            raise _TinySkip()
        mod = importlib.import_module("pykeen.nn.modules")
        inter = mod.QuatEInteraction()
        g = torch.Generator().manual_seed(0)
        h, r, t = (torch.randn(2, 1, 3, 4, generator=g), torch.randn(2, 1, 3, 4, generator=g),
                   torch.randn(1, 5, 3, 4, generator=g))
        got = inter(h=h, r=r, t=t)
        want = -torch.einsum("bndi,bndj,bndk,ijk->bn", h, r, t, _quate_table())
        if got.shape != (2, 5) or not torch.allclose(got, want, atol=1e-4, rtol=1e-4):
            raise RuntimeError("its output did not match the QuatE formula on a smoke test")
        path = "opt_einsum.contract" if importlib.util.find_spec("opt_einsum") else "torch.einsum"
        return ((lambda h, r, t: inter(h=h, r=r, t=t)),
                f"PyKEEN {_version('pykeen')} QuatEInteraction (its einsum runs on {path})", None)
    except _TinySkip:
        why = "pykeen import skipped at --tiny sizes"
    except Exception as exc:  # not installed, missing deps (class_resolver...), API drift
        why = f"pykeen not usable ({type(exc).__name__}: {str(exc)[:80]})"
    table = _quate_table()

    def einsum_1vsall(h, r, t):
        # The formulation of PyKEEN's QuatEInteraction (one 4-operand einsum, negated).
        # torch.einsum contracts left to right, materialising (B, N, 4, 4, 4); PyKEEN
        # does the same unless opt_einsum is installed.
        return -torch.einsum("...di,...dj,...dk,ijk->...", h, r, t, table.to(h.device))

    return einsum_1vsall, "PyKEEN-style einsum (reimplemented)", why


# ---------------------------------------------------------------------------
# Cases


def _score_case(data: _Data, score: str, algebra: str, quick: bool, with_pykeen: bool, slow_ok: bool) -> Workload:
    B, N, K, d, dev = data.B, data.N, data.K, data.d, data.device
    biases = score == "distance"
    run, skipped = _availability("score_all", dev)
    if not slow_ok:
        run.remove("reference")
        skipped["reference"] = f"skipped at B={B} in --quick (slow baseline)"

    def call(be):
        def f():
            bh, bt = (data.get("bh"), data.get("bt")) if biases else (None, None)
            return hc_ops.score_all(data.get("h"), data.get("r"), data.E, algebra, score, True, bh, bt,
                                    backend=be)
        return f

    def mm():
        return torch.mm(data.get("h"), data.E.T)

    anchors = {"torch.mm": mm}
    notes = ["torch.mm: the bare (B x K) x (K x N) GEMM of the same sizes, no product or epilogue (the floor)"]
    targets = [Target("time / torch.mm time (target <= 1.3)", "torch.mm", "time", "ratio", 1.3)]
    no_error = ("torch.mm",)
    slow = ()
    primary = "torch.mm"
    if with_pykeen:
        fn, label, why = _pykeen_interaction()
        cache = {}

        def pyk():
            if not cache:  # PyKEEN's layout: (n, d, 4) interleaved; r normalised per quaternion
                cache["h"] = ref.to_layout(data.get("h"), "component", "interleaved").reshape(B, 1, d, 4)
                cache["r"] = ref.to_layout(data.get("r"), "component", "interleaved").reshape(B, 1, d, 4)
                cache["t"] = ref.to_layout(data.E, "component", "interleaved").reshape(1, N, d, 4)
            r = cache["r"]
            rn = r / r.norm(dim=-1, keepdim=True)
            return fn(cache["h"], rn, cache["t"])

        name = "pykeen"
        anchors[name] = pyk
        primary = name
        slow = (name,)
        notes.append(f"pykeen: {label}" + (f"; {why}" if why else "")
                     + "; output negated back to embkern's sign for the error column")
        targets += [Target("speedup vs PyKEEN (target >= 20)", name, "time", "speedup", 20.0),
                    Target("peak memory reduction vs PyKEEN (target >= 20)", name, "memory", "speedup", 20.0)]

    def ref64():
        bh, bt = (data.f64("bh"), data.f64("bt")) if biases else (None, None)
        return ref.score_all(data.f64("h"), data.f64("r"), data.f64("E"), algebra, score, True, bh, bt)

    def error(out, r64):
        if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape == r64.shape:
            return _max_abs(out, r64)
        return None

    def err_pykeen(out, r64):
        return _max_abs(-out, r64)

    w = Workload(
        name=f"score_all {score}/{algebra} B={B}",
        group="score_all",
        description=f"scores (B={B}, N={N}) of {algebra} h (x) r_hat against all entities, {score} score"
                    + (" with biases" if biases else "") + f", K={K}, fp32, {dev.type}",
        backends={be: call(be) for be in run},
        anchors=anchors,
        primary_anchor=primary,
        reference64=ref64,
        error=error,
        row_error={"pykeen": err_pykeen} if with_pykeen else {},
        work=2.0 * B * N * K / 1e9,
        work_unit="GFLOP/s",
        params={"B": B, "N": N, "K": K, "d": d, "algebra": algebra, "score": score, "dtype": "float32"},
        sizes={"B x N fp32": 4 * B * N},
        targets=targets,
        skipped=skipped,
        notes=notes,
        no_error=no_error,
        slow=slow,
        teardown=data.drop64,
    )
    return w


def _rank_case(data: _Data, quick: bool) -> Workload:
    B, N, K, dev = data.B, data.N, data.K, data.device
    run, skipped = _availability("rank_all", dev)

    def call(be):
        def f():
            return hc_ops.rank_all(data.get("h"), data.get("r"), data.E, data.get("targets"),
                                   (data.get("fo"), data.get("fi")), "realistic", "quaternion", "inner",
                                   backend=be)
        return f

    def ref64():
        return ref.rank_all(data.f64("h"), data.f64("r"), data.f64("E"), data.get("targets"), data.get("fo"),
                            data.get("fi"), "realistic", "quaternion", "inner")

    return Workload(
        name=f"rank_all filtered B={B}",
        group="rank_all",
        description=f"filtered realistic rank of the true tail among N={N} ({N_FILTER} known tails filtered per "
                    f"row), quaternion inner, K={K}, fp32, {dev.type}",
        backends={be: call(be) for be in run},
        anchors={"torch.mm": lambda: torch.mm(data.get("h"), data.E.T)},
        reference64=ref64,
        error=lambda out, r64: _max_abs(out, r64),
        work=2.0 * B * N * K / 1e9,
        params={"B": B, "N": N, "K": K, "filtered_per_row": N_FILTER, "ties": "realistic", "dtype": "float32"},
        sizes={"B x N fp32": 4 * B * N},
        targets=[Target("peak extra memory / one B x N fp32 buffer (target <= 0.1)", "bytes:B x N fp32",
                        "memory", "ratio", 0.1)],
        skipped=skipped,
        notes=["rank error = max |rank - rank(fp64)| in positions (realistic ties: multiples of 0.5)"],
        no_error=("torch.mm",),
        teardown=data.drop64,
    )


def _topk_case(data: _Data, quick: bool) -> Workload:
    B, N, K, dev = data.B, data.N, data.K, data.device
    k = min(TOPK, N)
    run, skipped = _availability("topk_all", dev)

    def call(be):
        def f():
            return hc_ops.topk_all(data.get("h"), data.get("r"), data.E, k, None, "quaternion", "inner",
                                   backend=be)
        return f

    def mm_topk():
        q = ref.query(data.get("h"), data.get("r"), "quaternion", "component", True)
        return torch.topk(torch.mm(q, data.E.T), k, dim=1)

    def ref64():
        s = ref.score_all(data.f64("h"), data.f64("r"), data.f64("E"), "quaternion", "inner")
        return ref.topk_from_scores(s, k)

    def error(out, r64):
        # values only: near-ties may legitimately swap indices between dtypes
        return _max_abs(out[0], r64[0])

    return Workload(
        name=f"topk_all k={k} B={B}",
        group="topk_all",
        description=f"top-{k} of N={N} per query, quaternion inner, K={K}, fp32, {dev.type}",
        backends={be: call(be) for be in run},
        anchors={"torch.mm+topk": mm_topk},
        reference64=ref64,
        error=error,
        work=2.0 * B * N * K / 1e9,
        params={"B": B, "N": N, "K": K, "k": k, "dtype": "float32"},
        sizes={"B x N fp32": 4 * B * N},
        targets=[Target("peak extra memory / one B x N fp32 buffer (target <= 0.1)", "bytes:B x N fp32",
                        "memory", "ratio", 0.1)],
        skipped=skipped,
        notes=["topk error compares values only (near-ties may swap indices)"],
        teardown=data.drop64,
    )


def _loss_case(data: _Data, quick: bool) -> Workload:
    B, N, K, dev = data.B, data.N, data.K, data.device
    run, skipped = _availability("one_to_n_loss", dev)

    def leaves(dtype=torch.float32):
        if dtype == torch.float64:
            src = (data.f64("h"), data.f64("r"), data.f64("E"))
        else:
            src = (data.get("h"), data.get("r"), data.E)
        return [t.detach().clone().requires_grad_(True) for t in src]

    def call(be):
        state = {}

        def f():
            if not state:
                state["x"] = leaves()
            h, r, E = state["x"]
            for t in (h, r, E):
                t.grad = None
            loss = hc_ops.one_to_n_loss(h, r, E, data.get("targets"), "quaternion", "inner", backend=be)
            loss.backward()
            return loss.detach(), h.grad, r.grad, E.grad
        return f

    anchor_state = {}

    def torch_autograd():
        if not anchor_state:
            anchor_state["x"] = leaves()
        h, r, E = anchor_state["x"]
        for t in (h, r, E):
            t.grad = None
        q = ref.query(h, r, "quaternion", "component", True)
        loss = F.cross_entropy(torch.mm(q, E.T), data.get("targets"))
        loss.backward()
        return loss.detach(), h.grad, r.grad, E.grad

    def ref64():
        h, r, E = leaves(torch.float64)
        loss = ref.one_to_n_loss(h, r, E, data.get("targets"), "quaternion", "inner")
        loss.backward()
        return loss.detach(), h.grad, r.grad, E.grad

    return Workload(
        name=f"one_to_n_loss fwd+bwd B={B}",
        group="one_to_n_loss",
        description=f"1-N cross-entropy over N={N} (mean) forward + backward to h, r and the entity table, "
                    f"quaternion inner, K={K}, fp32, {dev.type}",
        backends={be: call(be) for be in run},
        anchors={"torch autograd": torch_autograd},
        reference64=ref64,
        error=lambda out, r64: _max_abs(out, r64),
        work=6.0 * B * N * K / 1e9,
        params={"B": B, "N": N, "K": K, "dtype": "float32", "reduction": "mean"},
        # every row must hold the entity-table gradient (N x K fp32); a fused loss adds O(B + N)
        # to it, a materialising one several B x N buffers.
        sizes={"B x N fp32": 4 * B * N, "B x N + grad E": 4 * B * N + 4 * N * K},
        targets=[Target("peak extra memory / (one B x N fp32 buffer + the N x K entity gradient) (target <= 1)",
                        "bytes:B x N + grad E", "memory", "ratio", 1.0)],
        skipped=skipped,
        notes=["one_to_n_loss throughput counts 6BNK flops (forward GEMM + the two backward GEMMs); "
               "error = max abs over (loss, grad h, grad r, grad E)",
               "torch autograd: product, torch.mm and F.cross_entropy with autograd -- what one writes without embkern; "
               "its peak includes the entity-table gradient (N x K), as every row's does"],
        teardown=data.drop64,
    )


def workloads(quick: bool, device) -> List[Workload]:
    """The hypercomplex cases; see the module docstring."""
    device = torch.device(device)
    sz = _sizes()
    N, d = sz["N"], sz["d"]
    out: List[Workload] = []
    for i, B in enumerate(sz["batches"]):
        big = i > 0  # B = 1024: the slow baselines (reference / PyKEEN) are skipped in --quick
        data = _Data(B, N, d, device)
        if quick and big:
            out.append(_score_case(data, "inner", "quaternion", quick, with_pykeen=False, slow_ok=False))
            continue
        # PyKEEN's einsum at B = 1024 needs 64*B*N*4 bytes = 3.8 GB per intermediate: B = 128 only.
        out.append(_score_case(data, "inner", "quaternion", quick, with_pykeen=not big, slow_ok=True))
        out.append(_score_case(data, "distance", "dihedron", quick, with_pykeen=False, slow_ok=True))
        out.append(_rank_case(data, quick))
        out.append(_topk_case(data, quick))
        out.append(_loss_case(data, quick))
    return out


# ---------------------------------------------------------------------------
# Real data: a short Kinships training run, ranked with embkern's rank kernel.


def extra_report(quick: bool) -> dict:
    title = "Kinships link prediction (filtered, embkern rank kernel)"
    try:
        bench_fn = importlib.import_module("embkern.contrib.kg_training").kinships_benchmark
    except Exception as exc:
        return {"title": title, "rows": [], "panels": [],
                "notes": [f"skipped: embkern.contrib.kg_training.kinships_benchmark unavailable "
                          f"({type(exc).__name__}: {exc})"]}
    # Budget: an epoch is ~17k reciprocal triples in 67 batches of 256. With the reference
    # backend (autograd through torch ops) an epoch takes seconds, not tens of ms, so the
    # epoch count depends on whether the fused CPU kernels are there to train with.
    train_kernels = KERNELS_OF["one_to_n_loss"] + ("rank",)
    fast = _backends.check(hc_ops.DESCRIPTOR, "cpu", train_kernels, "cpu", torch.float32).ok
    if tiny():
        epochs, dim = 1, 8
    elif quick:
        epochs, dim = (3 if fast else 2), 32
    else:
        epochs, dim = (25 if fast else 8), 32
    rows, notes = [], []
    for algebra in ("quaternion", "dihedron"):
        try:
            res = bench_fn(algebra, epochs=epochs, dim=dim, backend=None, progress=True)
        except Exception as exc:
            notes.append(f"{algebra}: failed ({type(exc).__name__}: {exc})")
            continue
        row = {"algebra": algebra, "epochs": epochs, "dim": dim}
        for key, val in (res or {}).items():
            if isinstance(val, (int, float, str, bool)) or val is None:
                row[key] = val
        rows.append(row)
    panels = []
    metric_keys = [k for k in (rows[0] if rows else {}) if isinstance(rows[0][k], float)
                   and any(s in k.lower() for s in ("mrr", "hits"))]
    if rows and metric_keys:
        panels.append({"title": "Kinships (filtered)", "kind": "bar", "x": metric_keys,
                       "series": {r["algebra"]: [r.get(k) for k in metric_keys] for r in rows},
                       "xlabel": "metric", "ylabel": "value", "logy": False})
    columns = ["algebra", "model", "backend", "epochs", "dim", "mrr", "hits@1", "hits@3", "hits@10", "mean_rank",
               "train_time_s", "eval_time_s"]
    if not fast:
        notes.append(f"trained {epochs} epochs only: the fused CPU kernels are not all available, so training "
                     "runs on the reference backend (slow)")
    if quick and not tiny():
        notes.append(f"--quick trains {epochs} epochs: a smoke check of the pipeline, not converged metrics")
    return {"title": title, "rows": rows, "notes": notes, "panels": panels, "columns": columns}
