"""Sharded bit-cipher jobs on Dask: the unigram pass (fit_cipher) and the
co-occurrence counts (cooccurrence_vectors) over text files split in blocks."""

from __future__ import annotations

import copy
import io
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .._progress import Progress
from . import _cluster

DEFAULT_BLOCKSIZE = 64 << 20  # bytes of text per task: ~10M tokens, a few seconds of counting


# ---------------------------------------------------------------------------
# Blocks: byte ranges of the files that end where a document ends.


def _blocksize(blocksize) -> int:
    if isinstance(blocksize, str):
        units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
        s = blocksize.strip().lower()
        for u in sorted(units, key=len, reverse=True):
            if s.endswith(u) and s[:-len(u)].strip().replace(".", "", 1).isdigit():
                return max(1, int(float(s[:-len(u)]) * units[u]))
        raise ValueError(f"blocksize: expected bytes as an int or a size like '64MiB', got {blocksize!r}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize: expected an int >= 1 (bytes) or a size like '64MiB', got {blocksize!r}")
    return blocksize


def _splits(path: str, blocksize: int, blank_line_docs: bool) -> List[Tuple[int, int]]:
    """Byte ranges [start, end) covering the file, each ending just after a newline (one document
    per line) or after a blank line (blank-line documents), or at the end of the file.

    A cut right after b"\\n" never falls inside a UTF-8 sequence or between the
    "\\r" and "\\n" of a CRLF pair, so each block decodes to exactly the lines
    the whole file would give."""
    from ..ops import bit_cipher as bc

    size = os.path.getsize(path)
    cuts = [0]
    with open(path, "rb") as f:
        while cuts[-1] < size:
            target = cuts[-1] + blocksize
            if target >= size:
                cuts.append(size)
                break
            f.seek(target)
            f.readline()  # the rest of the line the target falls in
            if blank_line_docs:
                while True:
                    line = f.readline()
                    if not line or bc.is_blank_bytes(line):
                        break
            cuts.append(min(f.tell(), size))
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def _block_bytes(path: str, start: int, end: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def _block_documents(path: str, start: int, end: int, lowercase: bool, blank_line_docs: bool, tokenizer):
    """The token lists of the documents in one block, as ``tokenize_file``'s Python loop reads them
    (the path taken with a custom ``tokenizer``, or without the CPU module)."""
    from ..ops import bit_cipher as bc

    data = _block_bytes(path, start, end)
    text = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="replace")  # the same decoding as open()
    return bc._documents_of(text, lowercase, blank_line_docs, tokenizer)


# ---------------------------------------------------------------------------
# Worker tasks and their merges (each merge returns a new object: a retried
# task may see its inputs again).


class _Packed:
    """A word dict (word -> count in first-occurrence order, or word -> id) wrapped so that Dask
    pickles it as one object:
    a bare dict result is serialised entry by entry, which took 1.7 s for a 43k-word dict
    against 3 ms for pickle (and made the merge tree, not the counting, the cost)."""

    __slots__ = ("seen", "table")

    def __init__(self, seen: Dict[str, int]):
        self.seen = seen
        self.table = None  # word -> id as a C++ WordTable, built on first use on each worker

    def __getstate__(self):
        return self.seen

    def __setstate__(self, seen):
        self.seen = seen
        self.table = None

    def word_table(self, Table):
        """The words by id (the dict's order: ``index`` maps word -> its position) as a ``Table``; built once
        per worker (the scattered object is shared by its tasks)."""
        if self.table is None:
            t = Table()
            t.add(list(self.seen))
            self.table = t
        return self.table


def _unigram_task(path, start, end, lowercase, blank_line_docs, tokenizer) -> _Packed:
    from ..ops import bit_cipher as bc

    Table = bc._word_table_for(tokenizer)
    if Table is not None:
        t = Table()
        t.count(_block_bytes(path, start, end), lowercase, bc._LineSplit(lowercase))
        return _Packed(dict(zip(t.words(), t.counts().tolist())))  # first-occurrence order, as below
    seen: Dict[str, int] = {}
    for words in _block_documents(path, start, end, lowercase, blank_line_docs, tokenizer):
        for w in words:
            seen[w] = seen.get(w, 0) + 1
    return _Packed(seen)  # insertion order = first occurrence in the block


def _merge_unigrams(a: _Packed, b: _Packed) -> _Packed:
    out = dict(a.seen)  # a's words keep their places; b's new words follow in b's order
    for w, n in b.seen.items():
        out[w] = out.get(w, 0) + n
    return _Packed(out)


def _count_task(path, start, end, cipher, index, settings, lowercase, blank_line_docs, tokenizer):
    from ..ops import bit_cipher as bc

    counts = bc.CooccurrenceCounts(cipher, **settings)
    Table = bc._word_table_for(tokenizer)
    if Table is not None:
        ids_a, offs_a = index.word_table(Table).encode(_block_bytes(path, start, end), lowercase, blank_line_docs,
                                                       bc._LineSplit(lowercase))
        if ids_a.size:
            counts.update(ids_a, offs_a)
        return counts
    ids: List[int] = []
    offs = [0]
    get = index.seen.get
    for words in _block_documents(path, start, end, lowercase, blank_line_docs, tokenizer):
        doc = [i for i in map(get, words) if i is not None]
        if doc:  # a document left without known tokens is dropped, as tokenize_file drops it
            ids.extend(doc)
            offs.append(len(ids))
    if ids:
        counts.update(np.asarray(ids, dtype=np.int32), np.asarray(offs, dtype=np.int64))
    return counts


def _merge_counts(a, b):
    return copy.deepcopy(a).merge(b)


def _tree_reduce(client, futures: Sequence, merge: Callable, bar: Optional[Progress] = None):
    """Merge futures pairwise, neighbours first, level by level: a fixed tree for a given number of
    blocks whatever worker runs what, and the data stays on the workers until the root."""
    level = list(futures)
    if not level:
        return None
    while len(level) > 1:
        nxt = [client.submit(merge, level[i], level[i + 1], pure=False) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


# ---------------------------------------------------------------------------
# Client side


def _paths(paths) -> List[str]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not isinstance(paths, (list, tuple)) or not paths:
        raise TypeError(f"paths: expected a text file path or a non-empty list of them, got {paths!r}")
    out = []
    for p in paths:
        if not isinstance(p, (str, os.PathLike)):
            raise TypeError(f"paths: expected file paths, got {type(p).__name__}")
        p = os.path.abspath(os.fspath(p))
        if not os.path.isfile(p):
            raise FileNotFoundError(f"paths: {p!r} does not exist (or is not a file)")
        out.append(p)
    return out


def _blocks(paths: List[str], blocksize, blank_line_docs: bool) -> List[Tuple[str, int, int]]:
    bs = _blocksize(blocksize)
    return [(p, a, b) for p in paths for a, b in _splits(p, bs, blank_line_docs)]


def _check_bool(v, name):
    if not isinstance(v, bool):
        raise TypeError(f"{name}: expected a bool, got {type(v).__name__}")


def _check_tokenizer(tokenizer):
    if tokenizer is not None and not callable(tokenizer):
        raise TypeError(f"tokenizer: expected None (embkern's word tokenizer) or a callable str -> list of str, "
                        f"got {type(tokenizer).__name__}")


def _label(b):
    return f"block {b[0]!r}[{b[1]}:{b[2]}]"


def fit_cipher(paths, client=None, *, lowercase: bool = True, min_count: int = 1, blank_line_docs: bool = False,
               tokenizer=None, bits: Optional[int] = None, noise: bool = True,
               blocksize: Union[int, str] = DEFAULT_BLOCKSIZE, n_workers: Optional[int] = None,
               progress: bool = True):
    """The unigram pass on Dask: ``(cipher, vocab)``, equal to one process's
    ``tokenize_file`` + ``BitCipher.fit`` over the files in order.

    Each block of text (``blocksize`` bytes, cut where a document ends) is
    tokenised and counted on a worker; the per-block counts (word -> count, in
    first-occurrence order) merge neighbours first, so the vocabulary comes out
    in corpus first-occurrence order, as ``tokenize_file`` assigns ids. Counts
    are integers: the merge is exact in any grouping.

    Args:
        paths: a text file or a list of them (one corpus, in this order); on a
            cluster they must be readable by every worker at the same path.
        lowercase, min_count, blank_line_docs: as :func:`embkern.tokenize_file`.
        tokenizer: None (``tokenize_file``'s ``\\w+`` words) or a picklable
            callable mapping a line of text to its list of words.
        bits, noise: as :meth:`embkern.BitCipher.fit`.
        client / n_workers: a ``distributed.Client``, or None for a LocalCluster
            of ``n_workers`` single-threaded processes.
    Returns:
        (BitCipher over the ``len(vocab)`` kept words, vocab: list of words by id).
    """
    from ..ops import bit_cipher as bc

    files = _paths(paths)
    for name, v in (("lowercase", lowercase), ("blank_line_docs", blank_line_docs), ("noise", noise)):
        _check_bool(v, name)
    _check_tokenizer(tokenizer)
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
        raise ValueError(f"min_count: expected an int >= 1, got {min_count!r}")
    blocks = _blocks(files, blocksize, blank_line_docs)
    with _cluster.client_for(client, n_workers) as c:
        _cluster.dashboard_note(c, progress)
        futs = [c.submit(_unigram_task, p, a, b, lowercase, blank_line_docs, tokenizer, pure=False)
                for p, a, b in blocks]
        with Progress(len(futs), desc="fit_cipher", unit="block", enabled=progress) as bar:
            _cluster.gather_in_order(c, futs, [_label(b) for b in blocks], bar, keep=False)
        root = _tree_reduce(c, futs, _merge_unigrams)
        seen = root.result().seen if root is not None else {}
    vocab = [w for w, n in seen.items() if n >= min_count]
    if not vocab:
        raise ValueError(f"paths: no word occurs at least min_count = {min_count} times in {len(files)} file(s)")
    counts = np.fromiter((seen[w] for w in vocab), dtype=np.int64, count=len(vocab))
    # ids are first-occurrence order, so ordering ties by id is ordering them by first occurrence
    cipher = bc.BitCipher.from_counts(counts, bits=bits, noise=noise)
    return cipher, vocab


def cooccurrence_vectors(paths, cipher, vocab: Sequence[str], client=None, *, window: int = 5, mode: str = "sum",
                         weight: str = "cos2", include_center: bool = True, eps: float = 1e-3,
                         lowercase: bool = True, blank_line_docs: bool = False, tokenizer=None,
                         blocksize: Union[int, str] = DEFAULT_BLOCKSIZE, n_workers: Optional[int] = None,
                         progress: bool = True):
    """Bit-cipher word vectors of text files on Dask, equal to one process's
    ``cooccurrence_vectors`` over the same documents (``tokenize_file`` ids).

    Each block is tokenised with ``vocab`` (words not in it are dropped before
    the windows are formed, as ``tokenize_file`` drops words under
    ``min_count``) and counted by embkern's kernel on a worker into a
    :class:`embkern.CooccurrenceCounts`; the counts merge pairwise, neighbours
    first (a fixed tree, on the workers), and are finalised here.

    Args:
        paths: the text files (see :func:`fit_cipher`).
        cipher, vocab: from :func:`fit_cipher` (or ``tokenize_file`` +
            ``BitCipher.fit``); ``len(vocab)`` must equal ``cipher.vocab_size``.
        window, mode, weight, include_center, eps: as
            :func:`embkern.cooccurrence_vectors`.
        lowercase, blank_line_docs, tokenizer, blocksize, client, n_workers,
            progress: as :func:`fit_cipher`.
    Returns:
        (V, D) float32 vectors, rows by id (``vocab`` order).
    """
    from ..ops import bit_cipher as bc

    files = _paths(paths)
    if not isinstance(cipher, bc.BitCipher):
        raise TypeError(f"cipher: expected an embkern.BitCipher, got {type(cipher).__name__}")
    if isinstance(vocab, (str, bytes)) or not isinstance(vocab, Sequence):
        raise TypeError(f"vocab: expected a list of words by id, got {type(vocab).__name__}")
    if len(vocab) != cipher.vocab_size:
        raise ValueError(f"vocab: has {len(vocab)} words but the cipher codes vocab_size = {cipher.vocab_size} "
                         "types (a cipher fitted on another vocabulary?)")
    index = {w: i for i, w in enumerate(vocab)}
    if len(index) != len(vocab):
        raise ValueError("vocab: expected distinct words")
    for name, v in (("lowercase", lowercase), ("blank_line_docs", blank_line_docs)):
        _check_bool(v, name)
    _check_tokenizer(tokenizer)
    settings = dict(window=window, mode=mode, weight=weight, include_center=include_center)
    empty = bc.CooccurrenceCounts(cipher, **settings)  # the settings are checked here, before any task
    blocks = _blocks(files, blocksize, blank_line_docs)
    with _cluster.client_for(client, n_workers) as c:
        _cluster.dashboard_note(c, progress)
        cipher_f, index_f = c.scatter([cipher, _Packed(index)], broadcast=True)  # once per worker, not once per task
        futs = [c.submit(_count_task, p, a, b, cipher_f, index_f, settings, lowercase, blank_line_docs, tokenizer,
                         pure=False) for p, a, b in blocks]
        with Progress(len(futs), desc="cooccurrence", unit="block", enabled=progress) as bar:
            _cluster.gather_in_order(c, futs, [_label(b) for b in blocks], bar, keep=False)
        root = _tree_reduce(c, futs, _merge_counts)
        total = root.result() if root is not None else empty
    return total.vectors(eps)
