"""Benchmark workloads of bit-cipher co-occurrence counting (CPU, exact 128-bit integer counts).

Cases, each in tokens/s of co-occurrence (window 5, cos2 weights, noise on,
include_center), at b = 64 and b = 768, sum and concat modes:

* ``head500``: gensim's ``head500.noblanks.cor`` (500 Wikipedia articles, one
  document a line, tokenised by :func:`embkern.tokenize_file`), all tokens.
* ``zipf``: a synthetic Zipf corpus (V = 50k, exponent 1.1, documents of 1000
  tokens), one chunk of 2M tokens (``--quick``: 500k) timed as one
  :meth:`CooccurrenceCounts.update` call.

Each call zeroes the accumulator and adds the chunk (the zeroing, V x (b + 2)
128-bit integers, is part of the time). Rows: the ``cpu`` kernel and the reference
(``embkern.reference.bit_cipher``, dense int64 index_add of the quantised
addends' 32-bit halves, timed once per case), and the anchor ``scipy sparse``: what a user would write -- one
weighted sparse co-occurrence matrix (type x context type, pad as an extra
column) per offset with ``scipy.sparse.coo_matrix(...).tocsr()``, then
``C @ R`` with R the dense ``[0, r_c]`` rows. At b = 768 in concat mode the
reference and the anchor are skipped (their dense int64 / float64 blocks alone
need several GB at V = 50k).

Targets (printed met / missed): >= 50x the reference, and the issue's
>= 10M tokens/s per core in sum mode at b = 64 is read from the throughput
column (cpu row, 1 thread given by ``--threads 1``).

``extra_report``: 1 vs 2 threads on the b = 64 sum case; a streamed Zipf
corpus (100M tokens, ``--quick`` 10M) counted chunk by chunk with the resident
memory after every chunk (peak memory must not grow with the corpus); and the
word-similarity check of :mod:`embkern.contrib.bit_cipher_eval`.
"""

from __future__ import annotations

import os
import time
from typing import Dict, List, Optional

import numpy as np
import torch

import embkern
from .. import _backends
from ..ops import bit_cipher as ops
from ..reference import bit_cipher as ref
from .workload import Target, Workload, tiny

WINDOW = 5
ZIPF_A = 1.1


def corpus_path() -> Optional[str]:
    """gensim's ``head500.noblanks.cor`` (in the installed wheel), or None."""
    from ..contrib.bit_cipher_eval import gensim_data

    return gensim_data("head500.noblanks.cor")


def zipf_ids(rng: np.random.Generator, V: int, n: int, a: float = ZIPF_A) -> np.ndarray:
    """n ids int32 in [0, V) drawn from the Zipf law truncated to V types: P(id = k) ~ (k + 1)^-a.

    (Not ``min(rng.zipf(a) - 1, V - 1)``: with a = 1.1 that clamp puts the whole
    tail beyond V, 32% of all tokens at V = 50k, on the one id V - 1, a corpus
    no text looks like. Truncated, the most frequent id has 13.9%.)
    """
    cdf = np.cumsum(np.arange(1, V + 1, dtype=np.float64) ** -a)
    cdf /= cdf[-1]
    return np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), V - 1).astype(np.int32)


def zipf_chunk(V: int, n: int, seed: int, doc_len: int = 1000):
    """(token_ids int32 (n,), doc_offsets int64): truncated Zipf ids (rank = id, see zipf_ids), documents
    of doc_len tokens."""
    ids = zipf_ids(np.random.default_rng(seed), V, n)
    off = np.append(np.arange(0, n, doc_len, dtype=np.int64), np.int64(n))
    return torch.from_numpy(ids), torch.from_numpy(off)


def scipy_count(tok, off, cipher, window: int, mode: str, weight: str, include_center: bool = True) -> torch.Tensor:
    """The plain NumPy/SciPy version: F (V, nb * (b + 1)) float64 via one sparse matrix per offset."""
    import scipy.sparse as sp

    c = cipher.reference_cipher()
    V, D = c.vocab_size, c.bits + 1
    tok = np.asarray(tok, dtype=np.int64)
    off = np.asarray(off, dtype=np.int64)
    N = tok.shape[0]
    doc = np.repeat(np.arange(off.shape[0] - 1), np.diff(off))
    R = np.vstack([c.reps(), np.eye(1, D)])        # row V is the pad
    psi, wpad = ref.weight_table(c, window, include_center, weight)
    ds = ref.deltas(window, include_center)
    blocks = []
    acc = None
    i = np.arange(N)
    for o, d in enumerate(ds):
        j = i + d
        inside = (j >= 0) & (j < N)
        jc = np.clip(j, 0, max(N - 1, 0))
        inside &= doc[jc] == doc
        ctx = np.where(inside, tok[jc], V)
        w = np.where(inside, psi[o][np.minimum(ctx, V - 1)], wpad[o])
        C = sp.coo_matrix((w, (tok, ctx)), shape=(V, V + 1)).tocsr()
        if mode == "concat":
            blocks.append(C @ R)
        else:
            acc = C if acc is None else acc + C
    F = np.hstack(blocks) if mode == "concat" else acc @ R
    return torch.from_numpy(np.ascontiguousarray(F))


class _Data:
    def __init__(self, kind: str, n: int, b: int, mode: str):
        self.kind, self.n, self.b, self.mode = kind, n, b, mode
        self.t: Dict[str, object] = {}

    def setup(self):
        if self.kind == "head500":
            tok, off, vocab = embkern.tokenize_file(corpus_path())
            V = len(vocab)
        else:
            V = 50_000
            tok, off = zipf_chunk(V, self.n, seed=1)
        cipher = embkern.BitCipher.fit(tok, vocab_size=V, bits=max(self.b, ref.default_bits(V)))
        self.t.update(tok=tok, off=off, cipher=cipher, counts={})

    def teardown(self):
        self.t.clear()

    def run(self, backend: str):
        counts = self.t["counts"].get(backend)
        if counts is None:
            counts = self.t["counts"][backend] = embkern.CooccurrenceCounts(
                self.t["cipher"], WINDOW, self.mode, "cos2", True, backend=backend)
        counts.A.zero_()
        counts.update(self.t["tok"], self.t["off"])
        return counts

    def ref64(self):
        return self.run("reference").totals()


def _error(out, want) -> float:
    got = out.totals() if isinstance(out, ops.CooccurrenceCounts) else out
    return float(((got - want).abs() / want.abs().clamp_min(1e-300)).max())


def _case(kind: str, n: int, b: int, mode: str) -> Workload:
    data = _Data(kind, n, b, mode)
    heavy = b >= 768 and mode == "concat"
    run = ["cpu"] if _backends.check(ops.DESCRIPTOR, "cpu", ("count",), "cpu", torch.float32).ok else []
    skipped = {} if run else {"cpu": _backends.check(ops.DESCRIPTOR, "cpu", ("count",), "cpu",
                                                     torch.float32).reason}
    anchors = {}
    if heavy:
        skipped["reference"] = "dense int64 (V, 11 x 770) sums of two halves plus (piece, 770) temporaries: GBs"
        skipped["scipy sparse"] = "11 dense (V, 769) float64 products: GBs at V = 50k"
    else:
        run = ["reference"] + run
        anchors["scipy sparse"] = lambda: scipy_count(data.t["tok"], data.t["off"], data.t["cipher"], WINDOW, mode,
                                                      "cos2")
    ntok = n if kind == "zipf" else None
    w = Workload(
        name=f"{kind} b={b} {mode}", group="cooccurrence_vectors",
        description=f"bit-cipher counts, {kind} corpus, b={b}, window {WINDOW}, cos2, noise, {mode}, exact int128",
        backends={be: (lambda be=be: data.run(be)) for be in run}, anchors=anchors,
        primary_anchor="scipy sparse" if anchors else None,
        reference64=None if heavy else data.ref64, error=_error,
        work=(ntok or 0) / 1e6, work_unit="Mtokens/s",
        params={"corpus": kind, "tokens": ntok, "bits": b, "mode": mode, "window": WINDOW, "weight": "cos2"},
        targets=[Target("time / reference (target >= 50x faster)", "reference", "time", "speedup", 50.0)],
        skipped=skipped, slow=("reference", "scipy sparse"), setup=data.setup, teardown=data.teardown,
        notes=["max err: max relative difference of the float64 sums F from the reference's"])
    if kind == "head500":
        orig_setup = w.setup

        def setup():
            orig_setup()
            w.work = data.t["tok"].numel() / 1e6
            w.params["tokens"] = int(data.t["tok"].numel())

        w.setup = setup
    return w


def workloads(quick: bool, device) -> List[Workload]:
    if device.type != "cpu":
        return []
    n = 20_000 if tiny() else (500_000 if quick else 2_000_000)
    bits = (64,) if tiny() else (64, 768)
    out = []
    for b in bits:
        for mode in ("sum", "concat"):
            if corpus_path() is not None and not tiny():
                out.append(_case("head500", 0, b, mode))
            out.append(_case("zipf", n, b, mode))
    return out


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _threads_row(n: int, rounds: int = 6) -> dict:
    """1 vs 2 threads on one chunk: the two counts alternate, the order flipped every round (a fixed
    order biased this row by up to 10% on a shared host), median of ``rounds`` calls each."""
    C = _backends.cpu_module()
    tok, off = zipf_chunk(50_000, n, seed=2)
    cipher = embkern.BitCipher.fit(tok, vocab_size=50_000, bits=64)
    counts = embkern.CooccurrenceCounts(cipher, WINDOW, "sum", "cos2", backend="cpu")
    before = C.get_num_threads()
    ts = {1: [], 2: []}
    try:
        counts.update(tok, off)  # warm-up: first-touch of the sums, the thread pool
        for r in range(rounds):
            for T in ((1, 2) if r % 2 == 0 else (2, 1)):
                C.set_num_threads(T)
                t = time.perf_counter()
                counts.update(tok, off)
                ts[T].append(time.perf_counter() - t)
    finally:
        C.set_num_threads(before)
    med = {T: float(np.median(v)) for T, v in ts.items()}
    return {"case": f"zipf {n} tokens b=64 sum: 1 -> 2 threads", "Mtokens/s 1 thread": round(n / med[1] / 1e6, 2),
            "Mtokens/s 2 threads": round(n / med[2] / 1e6, 2), "speedup": round(med[1] / med[2], 2),
            "speedup min..max": f"{min(ts[1]) / max(ts[2]):.2f}..{max(ts[1]) / min(ts[2]):.2f}",
            "target": ">= 1.8x"}


def _stream_row(total: int, chunk: int) -> dict:
    V = 50_000
    first, _ = zipf_chunk(V, chunk, seed=100)
    cipher = embkern.BitCipher.fit(first, vocab_size=V, bits=64)
    counts = embkern.CooccurrenceCounts(cipher, WINDOW, "sum", "cos2", backend="cpu")
    base = _rss()
    rss = []
    busy = 0.0
    t0 = time.perf_counter()
    for k in range(total // chunk):
        tok, off = zipf_chunk(V, chunk, seed=100 + k)
        t = time.perf_counter()
        counts.update(tok, off)
        busy += time.perf_counter() - t
        rss.append(_rss() - base)
        del tok, off
    wall = time.perf_counter() - t0
    half = len(rss) // 2
    return {"case": f"streamed zipf {total / 1e6:g}M tokens, {chunk / 1e6:g}M a chunk, b=64 sum",
            "Mtokens/s (counting)": round(total / busy / 1e6, 2), "wall s (incl. generating)": round(wall, 2),
            "extra RSS MB after half": round(max(rss[:half] or [0]) / 1e6, 1),
            "extra RSS MB at end": round(max(rss) / 1e6, 1)}


def extra_report(quick: bool) -> dict:
    title = "bit cipher: thread scaling, streaming memory, word similarity"
    rows, notes, tables = [], [], []
    if not _backends.check(ops.DESCRIPTOR, "cpu", ("count",), "cpu", torch.float32).ok:
        return {"title": title, "rows": [], "panels": [], "notes": ["skipped: no cpu kernel"]}
    small = tiny()
    rows.append(_threads_row(20_000 if small else 2_000_000))
    total = 200_000 if small else (10_000_000 if quick else 100_000_000)
    tables.append({"title": "streamed counting: throughput and extra RSS (peak memory must not grow with the "
                            "corpus)", "rows": [_stream_row(total, 100_000 if small else 1_000_000)]})
    notes.append("thread scaling is only meaningful on otherwise idle cores")
    if not small:
        from ..contrib import bit_cipher_eval

        sim = bit_cipher_eval.report(quick)
        tables.append({"title": sim["title"], "rows": sim["rows"]})
        notes += sim["notes"]
    return {"title": title, "rows": rows, "tables": tables, "panels": [], "notes": notes}
