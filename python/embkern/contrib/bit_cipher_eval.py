"""Word-similarity check of bit-cipher vectors on real text (docs/ops/bit_cipher.md, "Real data").

Corpora: gensim's ``head500.noblanks.cor`` (500 Wikipedia articles, one per
line, shipped in the gensim wheel and read as a file), and, where Debian's
``python3.11-doc`` package is installed (``make bench`` installs it when it
runs as root with apt), the prose of the Python 3.11 documentation's HTML
pages, ~1.3M tokens, converted once to a text file (:func:`python_doc_corpus`).
Benchmarks: gensim's
``wordsim353.tsv`` and ``simlex999.txt`` (word pairs with human scores).
Score: Spearman's rho between the human scores and the cosine similarity of
the two words' vectors, over the pairs whose two words are both in the
corpus vocabulary (the coverage is reported next to it).

gensim Word2Vec on the same tokens is the comparison when gensim's own modules
import (it is installed without its dependencies, so they may not); otherwise
the report says why it is missing.
"""

from __future__ import annotations

import hashlib
import html.parser
import importlib.util
import os
import re
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

INSTALL_HINT = "pip install --no-deps gensim   (only its test data files are read)"
PYTHON_DOC_HTML = "/usr/share/doc/python3.11/html"
PYTHON_DOC_HINT = "apt-get install python3.11-doc   (as root; make bench tries it)"


def gensim_data(name: str) -> Optional[str]:
    """Path of a file in the installed gensim wheel's test data, or None."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.origin:
        return None
    p = os.path.join(os.path.dirname(spec.origin), "test", "test_data", name)
    return p if os.path.exists(p) else None


class _Prose(html.parser.HTMLParser):
    """The prose of one Sphinx HTML page: the text inside ``<div role="main">``, one line per block
    element (paragraph, list item, definition, heading, table cell), without code listings
    (``<pre>``), scripts and styles. Navigation, sidebars and footers lie outside the main div."""

    BLOCKS = {"p", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "td", "th", "tr", "div",
              "blockquote", "caption", "figcaption", "table", "ul", "ol", "dl", "section"}
    SKIP = {"pre", "script", "style"}
    VOID = {"br", "img", "hr", "meta", "link", "input", "col", "area", "base", "wbr", "source"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.lines: List[str] = []
        self._cur: List[str] = []
        self._open: List[Tuple[str, bool]] = []  # (tag, is the main div) of the open elements
        self._main = 0  # open main divs (0 or 1)
        self._skip = 0  # open pre/script/style elements inside main

    def _flush(self):
        text = " ".join("".join(self._cur).split())
        if text:
            self.lines.append(text)
        self._cur = []

    def handle_starttag(self, tag, attrs):
        if tag in self.VOID:
            if tag == "br" and self._main:
                self._cur.append(" ")
            return
        is_main = tag == "div" and dict(attrs).get("role") == "main"
        self._open.append((tag, is_main))
        self._main += is_main
        if self._main and tag in self.SKIP:
            self._skip += 1
        if self._main and tag in self.BLOCKS:
            self._flush()

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        # pop to the matching open tag (HTML in the wild leaves some unclosed: <p> before <div>)
        for k in range(len(self._open) - 1, -1, -1):
            if self._open[k][0] == tag:
                for t, was_main in self._open[k:]:
                    if self._main and t in self.SKIP:
                        self._skip -= 1
                    if self._main and t in self.BLOCKS:
                        self._flush()
                    self._main -= was_main
                del self._open[k:]
                break

    def handle_data(self, data):
        if self._main and not self._skip:
            self._cur.append(data)

    def close(self):
        super().close()
        self._flush()


def html_prose(text: str) -> List[str]:
    """The prose lines of one Sphinx HTML page (see :class:`_Prose`)."""
    p = _Prose()
    p.feed(text)
    p.close()
    return p.lines


def _doc_pages(root: str) -> List[str]:
    """The documentation's HTML pages, sorted, without the generated indexes and the search page."""
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith("_"))  # _static, _sources, _images, ...
        for f in files:
            if f.endswith(".html") and not f.startswith(("genindex", "py-modindex", "search")):
                out.append(os.path.join(d, f))
    return sorted(out)


def python_doc_corpus(cache_dir: Optional[str] = None, root: str = PYTHON_DOC_HTML) -> Optional[str]:
    """Path of a text file with the prose of Debian's python3.11-doc HTML pages, one paragraph a
    line (a document each), written once into ``cache_dir`` (default: ``$EMBKERN_CACHE`` or
    ``~/.cache/embkern``) and keyed by the pages' names, sizes and times; None if not installed."""
    if not os.path.isdir(root):
        return None
    pages = _doc_pages(root)
    if not pages:
        return None
    key = hashlib.sha1()
    for p in pages:
        st = os.stat(p)
        key.update(f"{os.path.relpath(p, root)}\0{st.st_size}\0{int(st.st_mtime)}\n".encode())
    if cache_dir is None:
        from .fde_eval import default_cache_dir

        cache_dir = default_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    out = os.path.join(cache_dir, f"python3.11-doc-prose-{key.hexdigest()[:12]}.txt")
    if os.path.exists(out):
        return out
    tmp = f"{out}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for p in pages:
            with open(p, encoding="utf-8", errors="replace") as g:
                for line in html_prose(g.read()):
                    f.write(line + "\n")
    os.replace(tmp, out)
    return out


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


def _add_scores(row: dict, vectors: np.ndarray, index: Dict[str, int], pairs) -> dict:
    """row with "<benchmark> rho" and "<benchmark> covered" for each benchmark of pairs."""
    for n, p in pairs.items():
        rho, cov, tot = spearman(vectors, index, p)
        row[f"{n} rho"] = round(rho, 4)
        row[f"{n} covered"] = f"{cov}/{tot}"
    return row


def _corpus_rows(name: str, corpus: str, pairs, configs, word2vec: bool) -> List[dict]:
    """Cipher rows for each (bits, mode) of configs, then Word2Vec rows (workers 1 and 2). Each run
    starts from the raw text, so its wall time covers reading and tokenising too."""
    import embkern

    rows = []
    for bits, mode in configs:
        t0 = time.perf_counter()
        chunks, _, vocab = embkern.tokenize_file(corpus, chunk_tokens=200_000)
        cipher = embkern.BitCipher.fit(chunks, vocab_size=len(vocab), bits=bits)
        vec = embkern.cooccurrence_vectors(chunks, None, cipher, window=5, mode=mode, progress=False).numpy()
        wall = time.perf_counter() - t0
        index = {w: i for i, w in enumerate(vocab)}
        rows.append(_add_scores({"corpus": name, "model": f"bit cipher b={cipher.bits}", "mode": mode,
                                 "wall s (text -> vectors)": round(wall, 3), "tokens": int(cipher.total),
                                 "types": len(vocab)}, vec, index, pairs))
        del vec
    if word2vec:
        for workers in (1, 2):
            t0 = time.perf_counter()
            with open(corpus, encoding="utf-8") as f:  # the same \w+ lowercased tokens as tokenize_file
                sentences = [re.findall(r"\w+", line.lower()) for line in f if line.strip()]
            m, _ = _word2vec(sentences, workers)
            wall = time.perf_counter() - t0
            index = {w: i for i, w in enumerate(m.wv.index_to_key)}
            rows.append(_add_scores({"corpus": name, "model": f"gensim Word2Vec workers={workers}",
                                     "mode": "skip-gram" if m.sg else "cbow",
                                     "wall s (text -> vectors)": round(wall, 3),
                                     "tokens": int(sum(map(len, sentences)))}, m.wv.vectors, index, pairs))
    return rows


def report(quick: bool, tiny: bool = False, cache_dir: Optional[str] = None) -> dict:
    """Rows: corpus, model, mode, wall time raw text -> vectors, Spearman and coverage on both
    benchmarks, for head500 and (where installed) the Python 3.11 documentation."""
    title = "word similarity on real text: bit cipher vs Word2Vec"
    head500 = gensim_data("head500.noblanks.cor")
    bench = {n: gensim_data(f) for n, f in (("wordsim353", "wordsim353.tsv"), ("simlex999", "simlex999.txt"))}
    if head500 is None or None in bench.values():
        return {"title": title, "rows": [], "panels": [], "notes": [f"skipped: no gensim test data ({INSTALL_HINT})"]}
    pairs = {n: read_pairs(p) for n, p in bench.items()}
    notes = []
    try:
        import gensim.models  # noqa: F401
        have_gensim = True
    except Exception as exc:
        have_gensim = False
        notes.append(f"Word2Vec not run: gensim's modules do not import here ({type(exc).__name__}: {exc}); "
                     "install gensim with its dependencies for the comparison")
    # b = floor(log2 V) + 1 is the default; more bits give each word fewer shared bits (b = 768: at most
    # 2 ones a word at V = 50k). concat at b = 768 is left out: (V, 11 x 769) float64 is ~2 GB at V = 28k.
    configs = [(None, "sum"), (None, "concat"), (64, "sum"), (64, "concat"), (768, "sum")]
    if quick or tiny:
        configs = [(None, "sum"), (64, "concat"), (768, "sum")]
    rows = _corpus_rows("head500", head500, pairs, configs, have_gensim)
    if not tiny:
        doc = python_doc_corpus(cache_dir)
        if doc is None:
            notes.append(f"python3.11-doc corpus skipped: {PYTHON_DOC_HTML} is not installed ({PYTHON_DOC_HINT})")
        else:
            rows += _corpus_rows("python3.11-doc", doc, pairs,
                                 [(None, "sum"), (64, "concat")] if quick else configs, have_gensim)
            notes.append("python3.11-doc: the prose of the Python 3.11 documentation's HTML pages (Debian's "
                         "python3.11-doc; code listings left out), one paragraph a document")
    return {"title": title, "rows": rows, "panels": [], "notes": notes}
