"""Benchmark workloads of the FDE op (MUVERA encodings, ColBERT-like sizes).

Inputs: random Gaussian points, d = 128 (ColBERTv2's token width), as one CSR
batch (points (B*n, 128) float32, offsets (B+1,)); every document has 80
points, every query 32 (ColBERTv2's query length).

Cases (documents/s or queries/s; each times every available embkern backend
and every anchor on the same inputs):

* ``documents R20 k5``: document FDE, identity projection, fill, R = 20,
  k = 5 (81,920 dims), B = 2000 (``--quick`` 200).
* ``queries R20 k5``: query FDE (SUM) of the same config, B = 2000 (200).
* ``documents R40 k6 +final``: R = 40, k = 6, identity, fill, count-sketch
  final projection to 10,240; B = 1000 (200).
* the first and the third again at B = 20 / 8 (``--quick`` 8 / 4) with the
  NumPy ``reference`` backend, which costs tens of ms per document.

Backends: ``cpu`` at the current OpenMP thread count and ``cpu (1 thread)``
(per-core comparison with the single-threaded anchors; the ratio of the two
is the thread scaling, printed as a target), ``cuda`` with ``--device cuda``.

Anchors (optional imports; skipped with the reason when missing):

* ``muvfde`` -- the reference C++ (google/graph-mining) wrapped for Python,
  one document per call, one thread; it regenerates its random tables on
  every call (the count sketch alone is ~8 ms). Also the error oracle: the
  "max err" column is max |output - muvfde| over the first 16 documents
  (0.0 = bit-identical; embkern's contract for the identity projection).
  Without muvfde the oracle is embkern's NumPy reference (bit-identical to
  muvfde by its tests).
* ``muvera-python`` (PyPI, Rust core) -- batch API; its own PCG64 tables, so
  its values are not comparable (no error).
* ``fastembed`` -- ``fastembed.postprocess.Muvera``, one document per call;
  NumPy, a dense random +-1 projection (128 -> 128: no identity mode),
  float64 arithmetic inside, no final projection (skipped there).

``extra_report``: retrieval quality on real text (:mod:`embkern.contrib.fde_eval`):
recall of FDE retrieval against the exact Chamfer top-10, all-MiniLM-L6-v2
token vectors of CPython's pydoc passages.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import statistics
import time
from typing import Dict, List

import numpy as np
import torch

from .. import _backends
from ..ops import fde as fde_ops
from ..reference.fde import FDEConfig
from .workload import Target, Workload, tiny

D = 128
DOC_TOKENS = 80
QUERY_TOKENS = 32
ERROR_SAMPLE = 16
SEED = 42
RECALL_PNG_ENV = "EMBKERN_FDE_RECALL_PNG"


def _sizes(quick: bool) -> Dict[str, int]:
    if tiny():
        return {"docs": 16, "queries": 16, "final": 4, "ref": 2, "ref_final": 1}
    if quick:
        return {"docs": 200, "queries": 200, "final": 200, "ref": 8, "ref_final": 4}
    return {"docs": 2000, "queries": 2000, "final": 1000, "ref": 20, "ref_final": 8}


# ---------------------------------------------------------------------------
# Inputs


class _Data:
    """B point clouds of n points each, generated in setup() and dropped in teardown()."""

    def __init__(self, B: int, n: int, device: torch.device, salt: int):
        self.B, self.n, self.device, self.salt = B, n, device, salt
        self.X = self.off = self.Xt = self.offt = self.docs = None

    def setup(self):
        rng = np.random.default_rng(1000 * self.salt + self.B)
        self.X = rng.standard_normal((self.B * self.n, D), dtype=np.float32)
        self.off = np.arange(0, (self.B + 1) * self.n, self.n, dtype=np.int64)
        self.docs = [self.X[i * self.n:(i + 1) * self.n] for i in range(self.B)]  # views, no copies
        if self.device.type == "cuda":
            self.Xt = torch.from_numpy(self.X).to(self.device)
            self.offt = torch.from_numpy(self.off).to(self.device)

    def teardown(self):
        self.X = self.off = self.Xt = self.offt = self.docs = None

    def inputs(self):
        """(points, offsets) in the form the embkern backends take on this device."""
        if self.device.type == "cuda":
            return self.Xt, self.offt
        return self.X, self.off


def _as_np(out) -> np.ndarray:
    if isinstance(out, torch.Tensor):
        return out.detach().cpu().numpy()
    return np.asarray(out)


# ---------------------------------------------------------------------------
# Anchors


def _import_muvfde():
    try:
        return importlib.import_module("muvfde"), ""
    except Exception as exc:
        return None, f"muvfde not importable ({type(exc).__name__}: {exc}); pip install muvfde (cp311 wheels)"


def _import_muvera_python():
    try:
        importlib.metadata.version("muvera-python")
    except importlib.metadata.PackageNotFoundError:
        return None, "muvera-python not installed (pip install muvera-python)"
    try:
        return importlib.import_module("muvera"), ""
    except Exception as exc:
        return None, f"muvera-python failed to import ({type(exc).__name__}: {exc})"


def _import_fastembed():
    try:
        mod = importlib.import_module("fastembed.postprocess.muvera")
        return mod.Muvera, ""
    except Exception as exc:
        return None, (f"fastembed not importable ({type(exc).__name__}: {str(exc)[:80]}); pip install fastembed "
                      "(pulls onnxruntime and huggingface-hub)")


def muvfde_config(muvfde, c: FDEConfig):
    """The ``muvfde`` (google/graph-mining FDE, wrapped for Python) config equal to ``c``.

    The one place that maps an :class:`embkern.FDEConfig` onto muvfde's setters;
    the bench, ``benchmarks/test_bench_fde.py`` and the oracle tests use it. The
    seed is passed as muvfde's int32 (the same 32 bits as ``c.seed``).
    """
    m = muvfde.fixed_dimensional_encoding_config()
    m.set_num_repetitions(c.num_repetitions)
    m.set_num_simhash_projections(c.num_simhash_projections)
    m.set_seed(int(np.int32(np.uint32(int(c.seed) & 0xFFFFFFFF))))
    if c.is_document:
        m.set_encoding_type(muvfde.encoding_type.AVERAGE)
    if c.projection_type == "ams_sketch":
        m.set_projection_type(muvfde.projection_type.AMS_SKETCH)
        m.set_projection_dimension(c.projection_dim)
    if c.fill_empty_partitions:
        m.enable_fill_empty(True)
    if c.final_projection_dimension is not None:
        m.set_final_projection_dimension(c.final_projection_dimension)
    return m


def muvfde_encode(muvfde, m, docs) -> np.ndarray:
    """(len(docs), D) float32: muvfde's encoding of each (n_i, d) document under config ``m``, one call each."""
    gen = muvfde.generate_fixed_dimensional_encoding
    return np.stack([np.asarray(gen(x, m)) for x in docs])


# ---------------------------------------------------------------------------
# Cases


def _fast_backends(device: torch.device, threads: int):
    """(names -> backend id, {name: why not}) for the fast embkern backends on this device."""
    run, skipped = {}, {}
    if device.type == "cpu":
        st = _backends.check(fde_ops.DESCRIPTOR, "cpu", ("encode",), device.type, torch.float32)
        if st.ok:
            run["cpu"] = "cpu"
            if threads > 1:
                run["cpu (1 thread)"] = "cpu"
            else:
                skipped["cpu (1 thread)"] = "OpenMP already runs 1 thread (the cpu row is the 1-thread row)"
        else:
            skipped["cpu"] = st.reason
        if torch.cuda.is_available():
            skipped["cuda"] = "inputs on the CPU; run with --device cuda"
    else:
        st = _backends.check(fde_ops.DESCRIPTOR, "cuda", ("encode",), device.type, torch.float32)
        if st.ok:
            run["cuda"] = "cuda"
        else:
            skipped["cuda"] = st.reason
        skipped["cpu"] = "inputs on the GPU; run with --device cpu"
    return run, skipped


def _omp_threads() -> int:
    mod, _ = _backends._load_cpu()
    if mod is not None and hasattr(mod, "get_num_threads"):
        return int(mod.get_num_threads())
    return 1


def _case(kind: str, cfg: FDEConfig, n: int, B: int, device: torch.device, salt: int, with_reference: bool,
          fastembed_ok: bool) -> Workload:
    data = _Data(B, n, device, salt)
    threads = _omp_threads()
    run, skipped = _fast_backends(device, threads)
    backends = {}
    if with_reference:
        backends["reference"] = lambda: fde_ops.fde_encode(*data.inputs(), cfg, "reference")

    # Seconds of every call of the two cpu rows: the thread scaling is their ratio, which
    # no bench column shows (targets would print it for every row); teardown adds it to the notes.
    calls: Dict[str, List[float]] = {}

    def fast(name: str, be: str, one_thread: bool):
        def f():
            mod = _backends.cpu_module() if one_thread else None
            if mod is not None:
                mod.set_num_threads(1)
            t0 = time.perf_counter()
            try:
                return fde_ops.fde_encode(*data.inputs(), cfg, be)
            finally:
                calls.setdefault(name, []).append(time.perf_counter() - t0)
                if mod is not None:
                    mod.set_num_threads(threads)
        return f

    for name, be in run.items():
        backends[name] = fast(name, be, name.endswith("(1 thread)"))

    anchors, no_error = {}, []
    muvfde, why = _import_muvfde()
    if muvfde is not None:
        m = muvfde_config(muvfde, cfg)
        anchors["muvfde"] = lambda: muvfde_encode(muvfde, m, data.docs)
        no_error.append("muvfde")
    else:
        skipped["muvfde"] = why
    if not with_reference:  # the small reference cases time embkern vs muvfde only
        mp, why = _import_muvera_python()
        if mp is not None:
            enc = mp.Muvera(num_repetitions=cfg.num_repetitions, num_simhash_projections=cfg.num_simhash_projections,
                            dimension=cfg.dimension, projection_type="identity",
                            fill_empty_partitions=bool(cfg.fill_empty_partitions),
                            final_projection_dimension=cfg.final_projection_dimension, seed=SEED)
            fn = enc.encode_documents if cfg.is_document else enc.encode_queries
            anchors["muvera-python"] = lambda: fn(data.docs)
            no_error.append("muvera-python")
        else:
            skipped["muvera-python"] = why
        if cfg.final_projection_dimension is not None:
            skipped["fastembed"] = "fastembed's Muvera has no final projection"
        elif fastembed_ok:
            FE, why = _import_fastembed()
            if FE is not None:
                fe = FE(dim=cfg.dimension, k_sim=cfg.num_simhash_projections, dim_proj=cfg.dimension,
                        r_reps=cfg.num_repetitions, random_seed=SEED)
                one = fe.process_document if cfg.is_document else fe.process_query
                anchors["fastembed"] = lambda: np.stack([one(x) for x in data.docs])
                no_error.append("fastembed")
            else:
                skipped["fastembed"] = why

    S = min(B, ERROR_SAMPLE)

    def oracle():
        if muvfde is not None:
            return muvfde_encode(muvfde, muvfde_config(muvfde, cfg), data.docs[:S])
        return _as_np(fde_ops.fde_encode(data.X[:S * n], data.off[:S + 1], cfg, "reference"))

    def error(out, want):
        got = _as_np(out)[:S]
        return float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))) if got.size else 0.0

    targets = []
    if muvfde is not None and not with_reference:
        targets.append(Target("speedup vs muvfde (one thread, one document per call; goal > 1)", "muvfde",
                              "time", "speedup", 1.0))

    label = kind
    notes = [f"max err: max |output - {params_oracle(muvfde)}| over the first min(B, {ERROR_SAMPLE}) clouds of "
             "each case (0 = bit-identical, the identity projection's contract); muvera-python and fastembed "
             "draw other random tables, so their values are not comparable",
             "per-core speedup = the 'cpu (1 thread)' row's vs-anchor column (muvfde and fastembed run one "
             "thread)",
             "fastembed projects 128 -> 128 with a dense random +-1 matrix (no identity mode) in float64"]
    fin = f" +final {cfg.final_projection_dimension}" if cfg.final_projection_dimension else ""
    proj = "identity" if cfg.projection_type == "identity" else f"AMS {cfg.projection_dim}"
    name = f"{label} R{cfg.num_repetitions} k{cfg.num_simhash_projections}{fin} n={n} B={B}"
    if with_reference:
        name += " (ref)"
    params = {"R": cfg.num_repetitions, "k": cfg.num_simhash_projections, "d": D, "points_per_cloud": n, "B": B,
              "encoding": cfg.encoding_type, "projection": proj, "fill": bool(cfg.fill_empty_partitions),
              "final_projection_dimension": cfg.final_projection_dimension, "output_dim": cfg.output_dimension,
              "omp_threads": threads, "error_sample": S,
              "error_oracle": "muvfde" if muvfde is not None else "embkern reference"}
    return Workload(
        name=name,
        group=f"fde_encode {label}{' +final' if fin else ''}",
        description=f"{B} {label} of {n} Gaussian points (d={D}), R={cfg.num_repetitions} k="
                    f"{cfg.num_simhash_projections} {proj}{' fill' if cfg.fill_empty_partitions else ''}{fin}; "
                    f"output ({B}, {cfg.output_dimension}) float32, {device.type}",
        backends=backends,
        anchors=anchors,
        primary_anchor="muvfde" if "muvfde" in anchors else None,
        reference64=oracle,
        error=error,
        work=float(B),
        work_unit="docs/s" if cfg.is_document else "queries/s",
        params=params,
        targets=targets,
        skipped=skipped,
        notes=notes,
        no_error=tuple(no_error),
        slow=("reference", "muvfde", "fastembed") if not tiny() else (),
        setup=data.setup,
        teardown=lambda: (_scaling_note(name, calls, threads, B, notes),
                          _paired_scaling(name, cfg, data, threads, B, notes, "cpu" in run), data.teardown()),
    )


def params_oracle(muvfde) -> str:
    return "muvfde" if muvfde is not None else "embkern reference"


def _scaling_note(name: str, calls: Dict[str, List[float]], threads: int, B: int, notes: List[str]) -> None:
    one, many = calls.get("cpu (1 thread)", [])[1:], calls.get("cpu", [])[1:]  # [0]: the first warm-up call
    if not one or not many:
        return
    t1, tn = statistics.median(one), statistics.median(many)
    notes.append(f"thread scaling, {name}: 1 -> {threads} threads {t1 / tn:.2f}x ({B / t1:.0f} -> {B / tn:.0f} "
                 f"per s; medians of the cpu rows' {len(one)} / {len(many)} timed calls)")


def _paired_scaling(name: str, cfg: FDEConfig, data, threads: int, B: int, notes: List[str], have_cpu: bool,
                    pairs: int = 7) -> None:
    """1 -> N thread scaling from back-to-back pairs of calls (order alternating inside the
    pairs). On a shared VM the two cpu rows run tens of seconds apart and their ratio moves
    by +-25% between runs; a pair sees the same machine state, so the median of the pairs'
    ratios is the steadier figure. Each call returns a fresh output, as the rows do."""
    mod = _backends.cpu_module()
    if not have_cpu or threads < 2 or mod is None:
        return

    def timed(nt: int, out) -> float:
        mod.set_num_threads(nt)
        t0 = time.perf_counter()
        try:
            fde_ops.fde_encode(*data.inputs(), cfg, "cpu", out=out)
        finally:
            mod.set_num_threads(threads)
        return time.perf_counter() - t0

    inputs = data.inputs()
    reuse = fde_ops.fde_encode(*inputs, cfg, "cpu")  # a touched buffer of the right kind for out=
    for label, out in (("fresh output", None), ("out= reused", reuse)):
        timed(1, out), timed(threads, out)  # warm-up
        ratios = []
        for i in range(pairs):
            if i % 2 == 0:
                t1 = timed(1, out)
                tn = timed(threads, out)
            else:
                tn = timed(threads, out)
                t1 = timed(1, out)
            ratios.append(t1 / tn)
        ratios.sort()
        notes.append(f"thread scaling, {name}, {pairs} back-to-back pairs, {label}: 1 -> {threads} threads "
                     f"{statistics.median(ratios):.2f}x (min {ratios[0]:.2f}x, max {ratios[-1]:.2f}x)")


def workloads(quick: bool, device) -> List[Workload]:
    """The FDE cases; see the module docstring."""
    device = torch.device(device)
    sz = _sizes(quick)
    doc = FDEConfig(D, 20, 5, SEED, "document", fill_empty_partitions=True)
    qry = FDEConfig(D, 20, 5, SEED, "query")
    fin = FDEConfig(D, 40, 6, SEED, "document", fill_empty_partitions=True, final_projection_dimension=10240)
    # fastembed's import pulls onnxruntime (~2.5 s); in tiny runs (the test-suite) leave it out
    fe_ok = not tiny()
    return [
        _case("documents", doc, DOC_TOKENS, sz["docs"], device, 1, False, fe_ok),
        _case("queries", qry, QUERY_TOKENS, sz["queries"], device, 2, False, fe_ok),
        _case("documents", fin, DOC_TOKENS, sz["final"], device, 3, False, fe_ok),
        _case("documents", doc, DOC_TOKENS, sz["ref"], device, 4, True, fe_ok),
        _case("documents", fin, DOC_TOKENS, sz["ref_final"], device, 5, True, fe_ok),
    ]


# ---------------------------------------------------------------------------
# Real data: FDE retrieval vs exact Chamfer on MiniLM token vectors


def _short(setting: str) -> str:
    return setting.replace(" ->", "\n->").replace("mean-pooled tokens", "mean-pooled\ntokens")


def extra_report(quick: bool) -> dict:
    """Recall of FDE retrieval against the exact Chamfer top-10 (:func:`embkern.contrib.fde_eval.recall_study`).

    Sizes: full -- every held-out pydoc passage (616 documents), 100 queries,
    the 10 default settings; ``--quick`` -- 200 documents, 50 queries, 4
    settings; tiny -- 24 documents of 16 tokens, 4 queries, 1 setting.
    Besides the bar panel of the bench chart, the log-x plot of
    :func:`embkern.contrib.fde_eval.plot_recall` goes to ``$EMBKERN_FDE_RECALL_PNG``
    (default ``bench_fde_recall.png``; empty: none; never in tiny runs).
    """
    title = "FDE retrieval vs exact Chamfer top-10 (all-MiniLM-L6-v2 tokens, pydoc passages)"
    try:
        fde_eval = importlib.import_module("embkern.contrib.fde_eval")
        from ..contrib import _minilm
    except Exception as exc:
        return {"title": title, "rows": [], "panels": [],
                "notes": [f"skipped: embkern.contrib.fde_eval unavailable ({type(exc).__name__}: {exc})"]}
    if tiny():
        kw = dict(settings=[(2, 2, 8)], n_docs=24, n_queries=4, doc_tokens=16, query_tokens=8)
    elif quick:
        kw = dict(settings=fde_eval.QUICK_SETTINGS, n_docs=200, n_queries=50)
    else:
        kw = dict(settings=fde_eval.DEFAULT_SETTINGS, n_docs=None, n_queries=100)
    try:
        res = fde_eval.recall_study(progress=True, **kw)
    except RuntimeError as exc:
        if not _minilm.available():
            return {"title": title, "rows": [], "panels": [], "notes": [f"skipped: {exc}"]}
        raise
    keys = ["setting", "fde_dim", "recall@10", "recall@100", "encode_docs_s"]
    rows = [{k: r.get(k) for k in keys} for r in res]
    for r in rows:
        if r["encode_docs_s"] is None:
            r["encode_docs_s"] = "-"
    first = res[0]
    notes = [f"{first['n_docs']} documents (<= 128 tokens), {first['n_queries']} held-out one-sentence queries "
             "(<= 32 tokens); recall@k = share of the exact Chamfer top-10 in the FDE top-k; "
             "'mean-pooled tokens' = single-vector baseline (384 dims)",
             "settings: R repetitions, k SimHash bits, p<d_p> AMS sketch / id identity (d_p = 384), ->D final "
             "projection"]
    if first["n_docs"] <= 100:
        notes.append(f"with {first['n_docs']} documents the FDE top-100 is the whole corpus: recall@100 = 1")
    ordered = sorted(res, key=lambda r: (r["fde_dim"], r["setting"]))
    panels = [{"title": "FDE recall of the exact Chamfer top-10 (bars sorted by FDE dimension)", "kind": "bar",
               # ~0.6 in per label at 8 pt: 11 settings fit the chart's 10 in width
               "x": [f"{_short(r['setting'])}\n{r['fde_dim']} d" for r in ordered],
               "series": {"recall@10": [r["recall@10"] for r in ordered],
                          "recall@100": [r["recall@100"] for r in ordered]},
               "xlabel": "setting / FDE dimension", "ylabel": "recall", "logy": False}]
    png = os.environ.get(RECALL_PNG_ENV, "bench_fde_recall.png")
    if png and not tiny():
        try:
            fde_eval.plot_recall(res, png)
            notes.append(f"wrote {png} (recall vs FDE dimension, log x)")
        except Exception as exc:
            notes.append(f"no recall plot ({type(exc).__name__}: {exc})")
    return {"title": title, "rows": rows, "notes": notes, "panels": panels}
