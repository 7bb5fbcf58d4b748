"""Word-similarity check of bit-cipher vectors on real text (docs/ops/bit_cipher.md, "Real data").

Corpus: gensim's ``head500.noblanks.cor`` (500 Wikipedia articles, one per
line, shipped in the gensim wheel and read as a file). Benchmarks: gensim's
``wordsim353.tsv`` and ``simlex999.txt`` (word pairs with human scores).
Score: Spearman's rho between the human scores and the cosine similarity of
the two words' vectors, over the pairs whose two words are both in the
corpus vocabulary (the coverage is reported next to it).

gensim Word2Vec on the same tokens is the comparison when gensim's own modules
import (it is installed without its dependencies, so they may not); otherwise
the report says why it is missing.
"""

from __future__ import annotations

import importlib.util
import os
import re
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

INSTALL_HINT = "pip install --no-deps gensim   (only its test data files are read)"


def gensim_data(name: str) -> Optional[str]:
    """Path of a file in the installed gensim wheel's test data, or None."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.origin:
        return None
    p = os.path.join(os.path.dirname(spec.origin), "test", "test_data", name)
    return p if os.path.exists(p) else None


def read_pairs(path: str) -> List[Tuple[str, str, float]]:
    """(word1, word2, score) from a tab-separated file; '#' lines and headers are skipped."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3:
                continue
            try:
                score = float(parts[2])
            except ValueError:
                continue  # a header line
            out.append((parts[0].lower(), parts[1].lower(), score))
    return out


def spearman(vectors: np.ndarray, index: Dict[str, int], pairs: Sequence[Tuple[str, str, float]]):
    """(rho, covered, total): Spearman of cosine similarities vs human scores on covered pairs."""
    from scipy.stats import spearmanr

    sims, gold = [], []
    for a, b, s in pairs:
        if a in index and b in index:
            u, v = vectors[index[a]], vectors[index[b]]
            den = float(np.linalg.norm(u) * np.linalg.norm(v))
            sims.append(float(u @ v) / den if den > 0 else 0.0)
            gold.append(s)
    if len(sims) < 3:
        return float("nan"), len(sims), len(pairs)
    return float(spearmanr(sims, gold).correlation), len(sims), len(pairs)


def _word2vec(sentences, workers: int):
    from gensim.models import Word2Vec  # noqa: F401  (gensim's compiled parts and dependencies)

    t = time.perf_counter()
    m = Word2Vec(sentences, vector_size=100, window=5, min_count=1, workers=workers, seed=1)
    return m, time.perf_counter() - t


def report(quick: bool, tiny: bool = False) -> dict:
    """Rows: model, mode, wall time raw text -> vectors, Spearman and coverage on both benchmarks."""
    import embkern

    title = "word similarity on head500.noblanks.cor: bit cipher vs Word2Vec"
    corpus = gensim_data("head500.noblanks.cor")
    bench = {n: gensim_data(f) for n, f in (("wordsim353", "wordsim353.tsv"), ("simlex999", "simlex999.txt"))}
    if corpus is None or None in bench.values():
        return {"title": title, "rows": [], "panels": [], "notes": [f"skipped: no gensim test data ({INSTALL_HINT})"]}
    pairs = {n: read_pairs(p) for n, p in bench.items()}
    rows, notes = [], []
    # b = floor(log2 V) + 1 is the default; more bits give each word fewer shared bits (b = 768: at most
    # 2 ones a word at V = 50k). concat at b = 768 is left out: (V, 11 x 769) float64 is ~2 GB at V = 28k.
    configs = [(None, "sum"), (None, "concat"), (64, "sum"), (64, "concat"), (768, "sum")]
    if quick or tiny:
        configs = [(None, "sum"), (64, "concat"), (768, "sum")]
    for bits, mode in configs:
        t0 = time.perf_counter()
        chunks, _, vocab = embkern.tokenize_file(corpus, chunk_tokens=200_000)
        cipher = embkern.BitCipher.fit(chunks, vocab_size=len(vocab), bits=bits)
        vec = embkern.cooccurrence_vectors(chunks, None, cipher, window=5, mode=mode, progress=False).numpy()
        wall = time.perf_counter() - t0
        index = {w: i for i, w in enumerate(vocab)}
        row = {"model": f"bit cipher b={cipher.bits}", "mode": mode, "wall s (text -> vectors)": round(wall, 3),
               "tokens": int(cipher.total), "types": len(vocab)}
        for n, p in pairs.items():
            rho, cov, tot = spearman(vec, index, p)
            row[f"{n} rho"] = round(rho, 4)
            row[f"{n} covered"] = f"{cov}/{tot}"
        rows.append(row)
        del vec
    try:
        import gensim.models  # noqa: F401
        have_gensim = True
    except Exception as exc:
        have_gensim = False
        notes.append(f"Word2Vec not run: gensim's modules do not import here ({type(exc).__name__}: {exc}); "
                     "install gensim with its dependencies for the comparison")
    if have_gensim:
        for workers in (1, 2):
            t0 = time.perf_counter()
            with open(corpus, encoding="utf-8") as f:  # the same \w+ lowercased tokens as tokenize_file
                sentences = [re.findall(r"\w+", line.lower()) for line in f if line.strip()]
            m, _ = _word2vec(sentences, workers)
            wall = time.perf_counter() - t0
            index = {w: i for i, w in enumerate(m.wv.index_to_key)}
            row = {"model": f"gensim Word2Vec workers={workers}", "mode": "skip-gram" if m.sg else "cbow",
                   "wall s (text -> vectors)": round(wall, 3)}
            for n, p in pairs.items():
                rho, cov, tot = spearman(m.wv.vectors, index, p)
                row[f"{n} rho"] = round(rho, 4)
                row[f"{n} covered"] = f"{cov}/{tot}"
            rows.append(row)
    notes.append("larger offline corpus (Debian python3.11-doc HTML text): "
                 + ("not used yet" if os.path.isdir("/usr/share/doc/python3.11/html") else
                    "skipped, not installed on this machine"))
    return {"title": title, "rows": rows, "panels": [], "notes": notes}
