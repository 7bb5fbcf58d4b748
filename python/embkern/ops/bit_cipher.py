"""Bit-cipher word vectors: torch.library op + public API.

Ops (namespace ``embkern``; ``backend`` is resolved before the op is called):

=====================  ==========================================================
op                     computes
=====================  ==========================================================
bit_cipher_count       adds one chunk's co-occurrence sums into S, Q (in place)
=====================  ==========================================================

The counts live in :class:`CooccurrenceCounts` as one int64 array
``A (V, nb, b + 2, 2)``: unsigned 128-bit integers stored as (lo, hi) 64-bit
words, in quanta of 2^-62, each block ``[pad, bit 0 .. bit b-1, q weight]``.
The first b + 1 entries hold the pad entry and the sparse ``beta eta`` part
(S), the last the weight of the q direction (Q, the rank-1 part of the noise;
``docs/ops/bit_cipher.md``, "Kernel view"). Every addend is a table value
rounded once to a whole number of quanta, so the sums are exact integers:
every backend, thread count, ISA level, chunking and merge grouping gives the
same bits. :meth:`CooccurrenceCounts.totals` rounds each sum once to float64
and forms ``F = S + Q q``; :meth:`CooccurrenceCounts.vectors` finalises it.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .. import _backends, _checks, _progress
from .._backends import BackendSupport, OpDescriptor
from ..reference import bit_cipher as ref

MODES = ref.MODES
WEIGHTS = ref.WEIGHTS

# Said by `embkern info` and warned once when the cuda backend counts (docs/ops/bit_cipher.md, "CUDA").
CUDA_UNVERIFIED = ("unverified: its bit-for-bit tests against the cpu kernel failed on an H200 (2026-12-04); "
                   "the cpu backend is exact")

# dtype in the descriptor: that of the vectors (float32); every backend counts exactly in 128-bit integers.
DESCRIPTOR = OpDescriptor(
    name="bit_cipher",
    kernels=("count",),
    backends={
        "reference": BackendSupport(frozenset({torch.float32}), frozenset({"cpu"})),
        "cpu": BackendSupport(frozenset({torch.float32}), frozenset({"cpu"}), symbol="bit_cipher.{kernel}"),
        "cuda": BackendSupport(frozenset({torch.float32}), frozenset({"cuda"}), symbol="bit_cipher.{kernel}",
                               note=CUDA_UNVERIFIED),
    },
    entry_points={"cooccurrence_vectors": ("count",), "CooccurrenceCounts": ("count",)},
)
KERNELS = DESCRIPTOR.kernels


# ---------------------------------------------------------------------------
# Kernels of embkern::bit_cipher_count


def _ref_count(tokens, doc_offsets, bit_offsets, bit_index, wa, ws, wpad, deltas, load, A, parts, concat):
    V, _, E, _ = A.shape
    codes = torch.zeros(V, E - 2, dtype=torch.int64)
    codes[torch.repeat_interleave(torch.arange(V), bit_offsets[1:] - bit_offsets[:-1]), bit_index.to(torch.int64)] = 1
    ref.count_into(tokens, doc_offsets, codes, wa, ws, wpad, deltas.tolist(), concat, A.numpy().view(np.uint64))


def _cpu_count(tokens, doc_offsets, bit_offsets, bit_index, wa, ws, wpad, deltas, load, A, parts, concat):
    _backends.cpu_module().bit_cipher.count(
        tokens.numpy(), doc_offsets.numpy(), bit_offsets.numpy(), bit_index.numpy(), wa.numpy(),
        None if ws is None else ws.numpy(), wpad.numpy(), deltas.numpy(), load.numpy(), A.numpy(),
        parts.numpy() if parts.shape[0] else None, bool(concat))


def _cuda_count(tokens, doc_offsets, bit_offsets, bit_index, wa, ws, wpad, deltas, load, A, parts, concat):
    from . import _bit_cipher_cuda

    # bit_offsets carries the code mask on this backend (see CooccurrenceCounts)
    _bit_cipher_cuda.count(tokens, doc_offsets, bit_offsets, wa, ws, wpad, deltas, A, concat)


@torch.library.custom_op("embkern::bit_cipher_count", mutates_args=("A", "parts"))
def bit_cipher_count(tokens: Tensor, doc_offsets: Tensor, bit_offsets: Tensor, bit_index: Tensor, wa: Tensor,
                     ws: Optional[Tensor], wpad: Tensor, deltas: Tensor, load: Tensor, A: Tensor, parts: Tensor,
                     concat: bool, backend: str) -> None:
    """Adds the exact sums of one chunk into A (V, nb, b + 2, 2) int64 and parts in place.

    A holds unsigned 128-bit integers as (lo, hi) words, quanta of 2^-62, blocks
    [pad, bits, q weight]; wa, ws (n_off, V) and wpad (n_off,) are int64 quanta
    in [0, 2^62] (``reference.bit_cipher.tables``). parts (K, V, nb, b + 2, 2)
    int64: K further copies the cpu kernel may count some positions into (K = 0:
    none; the other backends count into A only); the sums are A + the parts."""
    _ref_count(tokens, doc_offsets, bit_offsets, bit_index, wa, ws, wpad, deltas, load, A, parts, concat)


_backends.route(bit_cipher_count, {"reference": _ref_count, "cpu": _cpu_count, "cuda": _cuda_count})


@bit_cipher_count.register_fake
def _(tokens, doc_offsets, bit_offsets, bit_index, wa, ws, wpad, deltas, load, A, parts, concat, backend):
    return None


def _to_double(A: Tensor) -> Tensor:
    """float64 ``A * 2^-62`` (A (..., 2) int64 128-bit sums), each rounded once; the compiled
    conversion when the CPU module is built, else the reference's (the tests check they agree)."""
    A = A.detach().cpu().contiguous()
    try:
        mod = _backends.cpu_module()
    except RuntimeError:
        return torch.from_numpy(ref.to_double(A.numpy()))
    out = torch.empty(A.shape[:-1], dtype=torch.float64)
    mod.bit_cipher.to_double(A.reshape(-1, 2).numpy(), out.reshape(-1).numpy())
    return out


# ---------------------------------------------------------------------------
# Public API: patterns and the cipher


def _nonneg_int(value, name: str, minimum: int = 0) -> int:
    v = _checks.integer(value, name)
    if v < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {v}")
    return v


def _cipher_fits(V: int, name: str, why: str, bits: Optional[int] = None) -> None:
    """MemoryError naming ``name`` when a cipher of V types cannot fit: its codes (V, b) uint8 and
    normalised codes (V, b) float64, counts, ranks and first positions (V,) int64, with b the given
    ``bits`` or else at least ``default_bits(V)`` (V <= 2^b - 1), a lower bound of what fitting allocates."""
    b = ref.default_bits(V) if bits is None else bits
    at = "b >=" if bits is None else "b ="
    _checks.fits(V * (9 * b + 48), "cpu", f"{name}: {why}: a bit cipher of V = {V} types and {at} {b} bits")


# Per-type counts the exact co-occurrence sums hold (the cpu kernel's fixed-point range).
MAX_TYPE_COUNT = 1 << 56


def cipher_patterns(vocab_size: int, bits: int) -> Tensor:
    """The first ``vocab_size`` b-bit patterns in the spec's order: (V, bits) uint8, bit 0 first.

    Level 1 is e_0..e_{b-1}; level k >= 2 XORs the reversed level k - 1 with the
    basis (e_{b-1}, ..., e_0), keeping unseen patterns with k ones
    (``docs/ops/bit_cipher.md``, "Patterns"). Raises ValueError when
    ``vocab_size > 2^bits - 1`` (the all-zero pattern is reserved for unknown words)."""
    V = _nonneg_int(vocab_size, "vocab_size")
    b = _nonneg_int(bits, "bits", 1)
    # the (V, b) table, and the set of seen patterns the generator keeps (about 100 bytes a pattern)
    _checks.fits(V * (b + 100), "cpu", f"vocab_size: the ({V}, {b}) uint8 pattern table")
    return torch.from_numpy(ref.patterns(V, b))


def _as_ids(x, name: str) -> Tensor:
    t = _checks.integer_array(x, name, "integer token ids")
    if t.dim() != 1:
        raise ValueError(f"{name}: expected a 1-d array of token ids, got shape {tuple(t.shape)}")
    if t.device.type != "cpu":
        t = t.cpu()
    return t


def _id_range(t: Tensor, name: str, V: int) -> None:
    if t.numel() == 0:
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < 0:
        i = int(torch.nonzero(t < 0)[0, 0])
        raise ValueError(f"{name}: expected token ids in [0, {V}), got {name}[{i}] = {int(t[i])}")
    if hi >= V:
        i = int(torch.nonzero(t >= V)[0, 0])
        raise ValueError(f"{name}: expected token ids in [0, {V}) (vocab_size), got {name}[{i}] = {int(t[i])}")


def _chunks_of(token_ids) -> Iterator[Tensor]:
    """The id arrays of token_ids: one array, or an iterable of arrays / (ids, doc_offsets) pairs."""
    if isinstance(token_ids, (torch.Tensor, np.ndarray, list)) and not (
            isinstance(token_ids, list) and token_ids and isinstance(token_ids[0], (tuple, torch.Tensor,
                                                                                    np.ndarray))):
        yield _as_ids(token_ids, "token_ids")
        return
    if not isinstance(token_ids, Iterable):
        raise TypeError(f"token_ids: expected an array of ids or an iterable of chunks, got "
                        f"{type(token_ids).__name__}")
    for k, ch in enumerate(token_ids):
        ids = ch[0] if isinstance(ch, tuple) else ch
        yield _as_ids(ids, f"token_ids chunk {k}")


class BitCipher:
    """A fitted bit cipher: frequency-ranked sparse binary codes of a vocabulary.

    Attributes (by token id; V types, b bits):
        counts (V,) int64, rank (V,) int64 (0 = most frequent; ties by first
        occurrence, types never seen after every seen one, by id), codes (V, b)
        uint8, normalised_codes (V, b) float64 (each row sums to 1), beta (V,)
        float64 (``1 / #types with the same count``; ones without noise), q (b,)
        float64 (the anti-frequency direction; zeros without noise), total
        (tokens counted), noise (bool).
    """

    def __init__(self, counts, first, bits: int, noise: bool = True):
        counts = np.asarray(counts, dtype=np.int64)
        self._c = ref.fit(counts, np.asarray(first, dtype=np.int64), int(bits), bool(noise))
        self._first = np.asarray(first, dtype=np.int64)

    @classmethod
    def fit(cls, token_ids, vocab_size: Optional[int] = None, bits: Optional[int] = None,
            noise: bool = True) -> "BitCipher":
        """Fit on a corpus: ``token_ids`` (N,) ids in [0, V), or an iterable of chunks
        (arrays of ids or ``(token_ids, doc_offsets)`` pairs, read once).

        vocab_size: V (default: max id + 1; required for an empty corpus).
        bits: b (default ``floor(log2 V) + 1``); V <= 2^b - 1 is required.
        Raises TypeError / ValueError for non-integer ids, ids < 0 or >= V, or too few bits."""
        if not isinstance(noise, bool):
            raise TypeError(f"noise: expected a bool, got {type(noise).__name__}")
        V = None if vocab_size is None else _nonneg_int(vocab_size, "vocab_size", 1)
        if V is not None:
            _cipher_fits(V, "vocab_size", f"vocab_size = {V}")
        counts = np.zeros(V if V is not None else 0, dtype=np.int64)
        first = np.full(counts.shape, np.iinfo(np.int64).max, dtype=np.int64)
        pos = 0
        for t in _chunks_of(token_ids):
            if t.numel():
                if int(t.min()) < 0 or (V is not None and int(t.max()) >= V):
                    _id_range(t, "token_ids", V if V is not None else 2 ** 62)
                n = t.to(torch.int64).numpy()
                top = int(n.max()) + 1
                if top > counts.shape[0]:
                    _cipher_fits(top, "token_ids", f"the largest id {top - 1} implies V >= {top}")
                    counts = np.concatenate([counts, np.zeros(top - counts.shape[0], dtype=np.int64)])
                    first = np.concatenate([first, np.full(top - first.shape[0], np.iinfo(np.int64).max)])
                counts += np.bincount(n, minlength=counts.shape[0])
                fc = torch.from_numpy(first)  # shares memory: updated in place
                fc.scatter_reduce_(0, torch.from_numpy(n), torch.arange(pos, pos + n.shape[0]), "amin")
            pos += t.numel()
        if counts.shape[0] == 0:
            raise ValueError("vocab_size: expected an int >= 1 for an empty corpus (it cannot be inferred)")
        V = counts.shape[0]
        b = ref.default_bits(V) if bits is None else _nonneg_int(bits, "bits", 1)
        if V.bit_length() > b:  # V > 2^b - 1 without building 2^b (bits = 2^40: a bare MemoryError)
            raise ValueError(f"bits: expected bits with 2^bits - 1 >= vocab_size = {V} (at least "
                             f"{ref.default_bits(V)}; the all-zero pattern is reserved for unknown words), got {b}")
        _cipher_fits(V, "bits", f"bits = {b}", b)
        return cls(counts, first, b, noise)

    @classmethod
    def from_counts(cls, counts, bits: Optional[int] = None, noise: bool = True) -> "BitCipher":
        """A cipher from unigram counts (V,) by id, ids in first-occurrence order (so count ties
        rank by id, as :meth:`fit` ranks them by first occurrence); ``embkern.distributed.fit_cipher``
        builds its cipher this way."""
        if not isinstance(noise, bool):
            raise TypeError(f"noise: expected a bool, got {type(noise).__name__}")
        c = np.asarray(counts)
        if c.ndim != 1 or c.shape[0] < 1 or not np.issubdtype(c.dtype, np.integer) or (c < 0).any():
            raise ValueError(f"counts: expected a non-empty 1-d array of non-negative integers, got {c.dtype} "
                             f"{c.shape}")
        top = int(c.max())  # a Python int: a uint64 count of 2^63 or more must not wrap into int64
        if top > MAX_TYPE_COUNT:
            raise ValueError(f"counts: expected at most 2^56 = {MAX_TYPE_COUNT} per type (the exact co-occurrence "
                             f"sums' range), got {top}")
        c = c.astype(np.int64)
        approx_total = float(c.sum(dtype=np.float64))
        if approx_total >= 2.0 ** 62:  # int64 totals stay exact below that
            raise ValueError(f"counts: expected a total below 2^62 tokens, got about {approx_total:.3g}")
        V = int(c.shape[0])
        b = ref.default_bits(V) if bits is None else _nonneg_int(bits, "bits", 1)
        if V.bit_length() > b:  # V > 2^b - 1 without building 2^b (bits = 2^40: a bare MemoryError)
            raise ValueError(f"bits: expected bits with 2^bits - 1 >= vocab_size = {V} (at least "
                             f"{ref.default_bits(V)}), got {b}")
        _cipher_fits(V, "bits", f"bits = {b}", b)
        return cls(c, np.arange(V, dtype=np.int64), b, noise)

    # ---- attributes
    vocab_size = property(lambda self: self._c.vocab_size)
    bits = property(lambda self: self._c.bits)
    noise = property(lambda self: self._c.noise)
    counts = property(lambda self: torch.from_numpy(self._c.counts))
    rank = property(lambda self: torch.from_numpy(self._c.rank))
    codes = property(lambda self: torch.from_numpy(self._c.codes))
    normalised_codes = property(lambda self: torch.from_numpy(self._c.eta))
    eta = normalised_codes
    beta = property(lambda self: torch.from_numpy(self._c.beta))
    q = property(lambda self: torch.from_numpy(self._c.q))
    total = property(lambda self: int(self._c.counts.sum()))

    def reference_cipher(self) -> ref.Cipher:
        """The reference's view of this cipher (shared arrays)."""
        return self._c

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write counts, first occurrences, bits and the noise flag (``.npz``); the rest is refitted on load."""
        with open(path, "wb") as f:
            np.savez(f, counts=self._c.counts, first=self._first, bits=np.int64(self.bits),
                     noise=np.bool_(self.noise))

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "BitCipher":
        with np.load(path) as z:
            return cls(z["counts"], z["first"], int(z["bits"]), bool(z["noise"]))

    def __repr__(self) -> str:
        return f"BitCipher(vocab_size={self.vocab_size}, bits={self.bits}, noise={self.noise}, total={self.total})"


# ---------------------------------------------------------------------------
# Counting


def _offsets(doc_offsets, n: int, name: str = "doc_offsets") -> Tensor:
    o = _checks.integer_array(doc_offsets, name, "integer CSR offsets")
    if o.dim() != 1 or o.numel() < 1:
        raise ValueError(f"{name}: expected a 1-d (n_docs + 1,) array, got shape {tuple(o.shape)}")
    o = o.cpu().to(torch.int64).contiguous()
    _checks.offsets_values(o, n, name)
    return o


class CooccurrenceCounts:
    """Streaming, mergeable bit-cipher co-occurrence sums, kept exactly.

    ``update(token_ids, doc_offsets)`` adds a chunk of whole documents;
    ``merge(other)`` adds another object's counts (same cipher and settings);
    ``vectors(eps)`` gives the (V, D) float32 word vectors. ``A`` (V, nb, b + 2, 2)
    int64 holds the sums as unsigned 128-bit integers ((lo, hi) words) of quanta
    2^-62; memory is ``V * nb * (b + 2) * 16`` bytes whatever the corpus length
    (nb = number of offsets in concat mode, 1 in sum mode).

    Exactness (``docs/ops/bit_cipher.md``, "Numerics"): every addend is a float64
    table value rounded once to a multiple of 2^-62 (relative error < 2^-52 for
    addends >= 2^-10), and the sums are exact integers, so one pass, chunks
    counted one after the other, and shards merged in any grouping give the same
    bits, at any thread count, ISA level and backend. :meth:`totals` rounds each
    sum once to float64. Picklable and deep-copyable (plain attributes).

    Threads (cpu backend): with T threads the kernel counts into up to T copies
    of ``A``, one per contiguous range of each chunk's positions, the threads of
    a copy dealing its rows among themselves (``docs/ops/bit_cipher.md``,
    "Threads"). The copies are added into ``A`` (exactly) whenever the counts are
    read: ``A``, ``S``, ``Q``, ``totals``, ``vectors``, ``merge``, pickling.
    ``thread_copies`` caps them: None takes as many as threads while the extra
    copies need at most 256 MiB (V = 50k, b = 64, sum: 52.8 MB a copy); 1 keeps
    one copy (threads split the rows only). The bits do not depend on it.
    """

    # the auto rule's cap on the memory of the extra copies (class attribute: tests and benches may change it)
    copies_budget_bytes = 256 << 20

    def __init__(self, cipher: BitCipher, window: int = 5, mode: str = "sum", weight: str = "cos2",
                 include_center: bool = True, backend: Optional[str] = None,
                 thread_copies: Optional[int] = None):
        if not isinstance(cipher, BitCipher):
            raise TypeError(f"cipher: expected an embkern.BitCipher, got {type(cipher).__name__}")
        self.thread_copies = None if thread_copies is None else _nonneg_int(thread_copies, "thread_copies", 1)
        self.window = _nonneg_int(window, "window", 1)
        _checks.choice(mode, "mode", MODES)
        _checks.choice(weight, "weight", WEIGHTS)
        if not isinstance(include_center, bool):
            raise TypeError(f"include_center: expected a bool, got {type(include_center).__name__}")
        self.cipher, self.mode, self.weight, self.include_center = cipher, mode, weight, include_center
        self.device = torch.device("cuda") if backend == "cuda" else torch.device("cpu")
        self.backend = _backends.resolve(DESCRIPTOR, "CooccurrenceCounts", backend, self.device.type,
                                         torch.float32)
        c = cipher.reference_cipher()
        V, b = c.vocab_size, c.bits
        n_off = 2 * self.window + int(include_center)
        self.n_blocks = n_off if mode == "concat" else 1
        E = b + 2
        # the counts, and the (n_offsets, V) weight tables ref.tables builds (psi in float64, wa and ws
        # in int64, one temporary) with the offsets' list: checked before any of it is built
        _checks.fits(V * self.n_blocks * E * 16 + n_off * (32 * V + 48), "cpu",
                     f"window = {self.window}, mode {mode!r}: the bit-cipher counts (V {V}, blocks {self.n_blocks}, "
                     f"b + 2 = {E}, 128-bit integers) and the ({n_off}, {V}) offset weight tables")
        self.deltas = ref.deltas(self.window, include_center)
        self._A = torch.zeros(V, self.n_blocks, E, 2, dtype=torch.int64)
        self._parts = self._no_parts()  # the thread copies: see "Threads" above
        self._parts_dirty = False  # some count went to the parts since the last fold
        self.n_tokens = 0
        self.n_docs = 0
        # tables of the kernels: int64 quanta of 2^-62, rounded once here
        wa, ws, wpad = ref.tables(c, self.window, include_center, weight)
        cols = np.nonzero(c.codes)[1]
        self._bit_offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(c.codes.sum(axis=1, dtype=np.int64))]))
        self._bit_index = torch.from_numpy(cols.astype(np.int32))
        self._wa = torch.from_numpy(wa)
        self._ws = None if ws is None else torch.from_numpy(ws)
        self._wpad = torch.from_numpy(wpad)
        self._deltas = torch.tensor(self.deltas, dtype=torch.int64)
        self._load = torch.from_numpy(c.counts)  # how the cpu kernel deals rows to threads
        if self.backend == "cuda":
            from . import _bit_cipher_cuda

            warnings.warn(f"embkern bit_cipher cuda backend: {CUDA_UNVERIFIED}", RuntimeWarning, stacklevel=2)

            # the GPU tests bits in a (V, ceil(b / 64)) uint64 mask; it travels in the bit_offsets slot
            self._bit_offsets = torch.from_numpy(_bit_cipher_cuda.code_mask(c.codes).view(np.int64))
            dev = self.device
            for name in ("_wpad", "_bit_offsets", "_bit_index", "_wa", "_ws", "_deltas", "_load"):
                t = getattr(self, name)
                if t is not None:
                    setattr(self, name, t.to(dev))
            self._bit_offsets = self._bit_offsets.view(torch.uint64)
            self._A = self._A.to(dev)
            self._parts = self._no_parts()

    @property
    def A(self) -> Tensor:
        """(V, nb, b + 2, 2) int64: the sums (every thread copy added in first)."""
        self._fold()
        return self._A

    def _fold(self) -> None:
        if self._parts_dirty:
            _backends.cpu_module().bit_cipher.fold(self._A.numpy(), self._parts.numpy())  # zeroes the parts
            self._parts_dirty = False

    def _copies(self) -> Tensor:
        """The extra copies the next cpu count may use (K, V, nb, b + 2, 2), allocated as needed."""
        if self.backend != "cpu":
            return self._parts
        T = int(_backends.cpu_module().get_num_threads())
        one = self._A.numel() * 8
        want = self.thread_copies if self.thread_copies is not None else 1 + self.copies_budget_bytes // max(one, 1)
        K = max(0, min(want, T) - 1)
        if K > self._parts.shape[0]:
            self._fold()
            self._parts = self._no_parts()  # the old copies' memory goes first
            _checks.fits(K * one, "cpu", f"{K} thread copies of the bit-cipher counts ({one} bytes each)")
            self._parts = torch.zeros((K,) + tuple(self._A.shape), dtype=torch.int64)
        return self._parts

    def __getstate__(self):
        self._fold()
        state = dict(self.__dict__)
        state["_parts"] = self._no_parts()  # zeros: not worth their bytes in a pickle or a copy
        return state

    def __setstate__(self, state):
        if "A" in state:  # pickled before the thread copies
            state["_A"] = state.pop("A")
        state.setdefault("thread_copies", None)
        state.setdefault("_parts_dirty", False)
        self.__dict__.update(state)
        if "_parts" not in state:
            self._parts = self._no_parts()

    def _no_parts(self) -> Tensor:
        return torch.zeros((0,) + tuple(self._A.shape), dtype=torch.int64, device=self._A.device)

    def update(self, token_ids, doc_offsets=None) -> "CooccurrenceCounts":
        """Add a chunk: token_ids (N,) ids in [0, V), doc_offsets (n_docs + 1,) CSR offsets of whole
        documents (None: the chunk is one document)."""
        t = _as_ids(token_ids, "token_ids")
        N = t.numel()
        off = torch.tensor([0, N], dtype=torch.int64) if doc_offsets is None else _offsets(doc_offsets, N)
        _id_range(t, "token_ids", self.cipher.vocab_size)
        t32 = t.to(torch.int32).contiguous()
        if self.device.type == "cuda":
            t32, off = t32.to(self.device), off.to(self.device)
        parts = self._copies()
        bit_cipher_count(t32, off, self._bit_offsets, self._bit_index, self._wa, self._ws, self._wpad,
                         self._deltas, self._load, self._A, parts, self.mode == "concat", self.backend)
        self._parts_dirty |= N > 0 and parts.shape[0] > 0
        self.n_tokens += N
        self.n_docs += off.numel() - 1
        return self

    def _key(self):
        c = self.cipher.reference_cipher()
        return (self.window, self.mode, self.weight, self.include_center, c.bits, c.noise, c.counts.tobytes(),
                c.rank.tobytes())

    def merge(self, other: "CooccurrenceCounts") -> "CooccurrenceCounts":
        """Add ``other``'s counts into these (same cipher, window, mode, weight, include_center):
        128-bit integer additions with carry, so any grouping of shards gives the same bits."""
        if not isinstance(other, CooccurrenceCounts):
            raise TypeError(f"other: expected a CooccurrenceCounts, got {type(other).__name__}")
        if other._key() != self._key():
            raise ValueError("other: expected counts of the same cipher, window, mode, weight and include_center")
        mine = self.A.cpu().contiguous()
        w = mine.numpy().view(np.uint64)
        theirs = other.A.cpu().contiguous().numpy().view(np.uint64)
        ref.add128_(w, theirs[..., 0], theirs[..., 1])
        if mine.data_ptr() != self.A.data_ptr():
            self.A.copy_(mine)
        self.n_tokens += other.n_tokens
        self.n_docs += other.n_docs
        return self

    @property
    def S(self) -> Tensor:
        """(V, nb, b + 1) float64 (a copy): per block the pad entry and the ``beta eta`` sums, each rounded once."""
        return _to_double(self.A[:, :, :-1])

    @property
    def Q(self) -> Optional[Tensor]:
        """(V, nb) float64 (a copy): per block the weight of the q direction (None without noise)."""
        return _to_double(self.A[:, :, -1]) if self.cipher.noise else None

    def totals(self) -> Tensor:
        """F (V, nb * (b + 1)) float64: the sums before finalisation, ``S + Q q`` (each sum rounded once
        to float64, then one product and one add per entry)."""
        c = self.cipher.reference_cipher()
        return ref.totals_of(_to_double(self.A), c.q, c.noise)

    def vectors(self, eps: float = 1e-3) -> Tensor:
        """(V, nb * (b + 1)) float32: per block, zeros -> eps, then -log10(F / sum F)."""
        eps = _checks.positive_float(eps, "eps")  # numpy scalars too (np.float32(1e-3) was refused)
        return ref.finalise(self.totals(), self.n_blocks, eps)


def cooccurrence_vectors(token_ids, doc_offsets=None, cipher: Optional[BitCipher] = None, window: int = 5,
                         mode: str = "sum", weight: str = "cos2", include_center: bool = True, eps: float = 1e-3,
                         backend: Optional[str] = None, progress: bool = True) -> Tensor:
    """Bit-cipher word vectors (V, D) float32, rows by token id.

    Args:
        token_ids: (N,) integer ids in [0, V) with ``doc_offsets`` (n_docs + 1,) CSR offsets
            (None: one document); or an iterable of ``(token_ids, doc_offsets)`` chunks of
            whole documents (then ``doc_offsets`` must be None), streamed with a progress bar.
        cipher: a fitted :class:`BitCipher` (None: fitted here on an in-memory corpus).
        window: m >= 1; offsets -m..m (0 only with ``include_center``).
        mode: "sum" (D = b + 1) or "concat" (D = n_offsets * (b + 1)).
        weight: "cos2" (cos^2(pi |delta| p(c))), "inv" (1/|delta|, 1 at 0) or "none".
        eps: the value of zero entries before ``-log10(F / sum F)`` (per block).

    Numerics contract (``docs/ops/bit_cipher.md``): addends rounded once to multiples of 2^-62,
    summed exactly (128-bit integers), each sum rounded once to float64: the reference's bits,
    identical for any backend, thread count and ISA level, and for any split of the corpus into
    chunks or shards. An empty corpus gives every row ``log10(b + 1)``.
    """
    # a list of ids is one corpus; a list of tuples or of arrays is chunks (arrays are then refused below
    # with a message, not read as ids: torch.as_tensor of a list of tensors fails obscurely)
    single = isinstance(token_ids, (torch.Tensor, np.ndarray)) or (
        isinstance(token_ids, list) and not (token_ids and isinstance(token_ids[0], (tuple, torch.Tensor,
                                                                                      np.ndarray))))
    if cipher is None:
        if not single:
            raise ValueError("cipher: expected a fitted BitCipher when token_ids is a stream of chunks")
        cipher = BitCipher.fit(token_ids)
    counts = CooccurrenceCounts(cipher, window, mode, weight, include_center, backend)
    if single:
        counts.update(token_ids, doc_offsets)
    else:
        if doc_offsets is not None:
            raise ValueError("doc_offsets: expected None when token_ids is an iterable of (token_ids, doc_offsets) "
                             "chunks")
        for k, ch in enumerate(_progress.iterate(token_ids, desc="bit-cipher counts", unit="chunk",
                                                 enabled=bool(progress))):
            if not (isinstance(ch, tuple) and len(ch) == 2):
                raise TypeError(f"token_ids: expected chunks as (token_ids, doc_offsets) pairs (doc_offsets None: "
                                f"the chunk is one document), got {type(ch).__name__} at chunk {k}")
            counts.update(ch[0], ch[1])
    return counts.vectors(eps)


# ---------------------------------------------------------------------------
# Text


_WORD = re.compile(r"\w+")


def _documents_of(f, lowercase: bool, blank_line_docs: bool, tokenizer=None) -> Iterator[List[str]]:
    """Token lists of the documents in the lines of the text stream ``f``.

    ``tokenizer`` (None: ``\\w+`` words) maps one line (lowercased first when
    ``lowercase``) to its words. ``embkern.distributed`` calls this on the
    blocks of a file, so a file read whole and read in blocks give the same
    documents."""
    split = _WORD.findall if tokenizer is None else tokenizer
    doc: List[str] = []
    for line in f:
        if lowercase:
            line = line.lower()
        words = split(line)
        if not blank_line_docs:
            if words:
                yield list(words)
        elif line.strip():
            doc.extend(words)
        elif doc:
            yield doc
            doc = []
    if blank_line_docs and doc:
        yield doc


def _documents(path, lowercase: bool, blank_line_docs: bool, tokenizer=None) -> Iterator[List[str]]:
    """Token lists of the documents of a text file, read line by line (never the whole file)."""
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        yield from _documents_of(f, lowercase, blank_line_docs, tokenizer)


# The C++ word tokenizer (csrc/bit_cipher_text.cpp): the same words, ids and
# documents as the loop above (tests/test_bit_cipher_text.py), ~10x faster.
# It handles ASCII lines itself and calls _LineSplit for the others.

BLOCK_BYTES = 1 << 24  # text handed to the C++ tokenizer at a time (~3M words)


class _LineSplit:
    """bytes of one line (no line end) -> (its \\w+ words, whether it is blank), by Python's rules: the
    C++ tokenizer's fallback for lines with non-ASCII bytes. Picklable."""

    def __init__(self, lowercase: bool):
        self.lowercase = lowercase

    def __call__(self, raw: bytes):
        line = raw.decode("utf-8", errors="replace")
        if self.lowercase:
            line = line.lower()
        return _WORD.findall(line), not line.strip()


def _word_table_type():
    """embkern._C.bit_cipher.WordTable, or None when the CPU module is not built."""
    try:
        return _backends.cpu_module().bit_cipher.WordTable
    except (RuntimeError, AttributeError):
        return None


def _word_table_for(tokenizer):
    """The WordTable type when the C++ tokenizer gives this tokenizer's words (``tokenizer=None`` and the CPU
    module built), else None (the Python loop)."""
    return _word_table_type() if tokenizer is None else None


def is_blank_bytes(line: bytes) -> bool:
    """A line blank under ASCII whitespace: blank to ``str.strip()`` too, so a cut after it never splits a
    blank-line document (a line blank only under Unicode whitespace is just not used as a cut)."""
    return not line.strip()


def _text_blocks(f, blank_line_docs: bool, block_bytes: Optional[int] = None) -> Iterator[bytes]:
    """Whole-document blocks of the binary stream ``f``: about ``block_bytes`` each, ending just after a
    newline (one document per line) or after a blank line, or at the end. A cut after b"\\n" never falls
    inside a UTF-8 sequence or a CRLF pair, so the blocks give exactly the lines of the whole file."""
    block_bytes = BLOCK_BYTES if block_bytes is None else block_bytes
    while True:
        blk = f.read(block_bytes)
        if not blk:
            return
        rest = [f.readline()]
        if blank_line_docs and rest[0]:
            while True:
                line = f.readline()
                rest.append(line)
                if not line or is_blank_bytes(line):
                    break
        yield blk + b"".join(rest)


class TextChunks:
    """Re-iterable ``(token_ids int32, doc_offsets int64)`` chunks of whole documents of a text file
    (about ``chunk_tokens`` tokens each), read lazily with a fixed vocabulary: ``index`` (word -> id), or
    ``table`` (an ``embkern._C.bit_cipher.WordTable`` of the same words by id) for the C++ tokenizer."""

    def __init__(self, path, index: Optional[dict], lowercase: bool, blank_line_docs: bool, chunk_tokens: int,
                 tokenizer=None, table=None):
        self.path, self.index, self.lowercase = path, index, lowercase
        self.blank_line_docs, self.chunk_tokens, self.tokenizer = blank_line_docs, chunk_tokens, tokenizer
        self.table = table

    def __iter__(self) -> Iterator[Tuple[Tensor, Tensor]]:
        if self.table is not None:
            yield from self._iter_table()
            return
        ids: List[int] = []
        offs = [0]
        get = self.index.get
        for words in _documents(self.path, self.lowercase, self.blank_line_docs, self.tokenizer):
            doc = [i for i in map(get, words) if i is not None]
            if not doc:
                continue
            ids.extend(doc)
            offs.append(len(ids))
            if len(ids) >= self.chunk_tokens:
                yield torch.tensor(ids, dtype=torch.int32), torch.tensor(offs, dtype=torch.int64)
                ids, offs = [], [0]
        if ids:
            yield torch.tensor(ids, dtype=torch.int32), torch.tensor(offs, dtype=torch.int64)

    def _iter_table(self) -> Iterator[Tuple[Tensor, Tensor]]:
        # the same chunks as the loop above: a chunk closes at the first document end that brings it to
        # >= chunk_tokens tokens
        split = _LineSplit(self.lowercase)
        ids_parts: List[np.ndarray] = []
        ends_parts: List[np.ndarray] = []  # document ends, relative to the chunk's first token
        n = 0
        with open(self.path, "rb") as f:
            for blk in _text_blocks(f, self.blank_line_docs):
                ids, offs = self.table.encode(blk, self.lowercase, self.blank_line_docs, split)
                ends = offs[1:]
                while ends.size:
                    k = int(np.searchsorted(ends, self.chunk_tokens - n, side="left"))
                    if k == ends.size:  # the chunk stays open
                        ids_parts.append(ids)
                        ends_parts.append(ends + n)
                        n += int(ends[-1])
                        break
                    cut = int(ends[k])
                    ids_parts.append(ids[:cut])
                    ends_parts.append(ends[:k + 1] + n)
                    yield self._chunk(ids_parts, ends_parts)
                    ids_parts, ends_parts, n = [], [], 0
                    ids, ends = ids[cut:], ends[k + 1:] - cut
        if ids_parts:
            yield self._chunk(ids_parts, ends_parts)

    @staticmethod
    def _chunk(ids_parts, ends_parts) -> Tuple[Tensor, Tensor]:
        ids = np.concatenate(ids_parts).astype(np.int32, copy=False)
        offs = np.concatenate([np.zeros(1, np.int64)] + ends_parts)
        return torch.from_numpy(ids), torch.from_numpy(offs)


def tokenize_file(path, lowercase: bool = True, min_count: int = 1, blank_line_docs: bool = False,
                  chunk_tokens: Optional[int] = None, tokenizer=None):
    """Tokenise a text file: ``(token_ids, doc_offsets, vocab)``.

    Tokens are maximal runs of word characters (``\\w+``: letters, digits, underscore;
    whitespace and punctuation separate them), lowercased by default. A document is one
    line, or with ``blank_line_docs=True`` one block of lines between blank lines;
    documents left without tokens are dropped. Tokens seen fewer than ``min_count``
    times are dropped before the windows are formed (as GloVe drops out-of-vocabulary
    words). ``vocab`` lists the kept tokens by id, ids in order of first occurrence.
    ``tokenizer``: a callable mapping one line of text (lowercased first when
    ``lowercase``) to its list of words, instead of ``\\w+``.

    The file is read in blocks of whole documents (twice: counts, then ids), never whole.
    With ``tokenizer=None`` and the CPU module built, the words are found by embkern's C++
    tokenizer (~10x the Python loop; ASCII lines in C++, other lines by Python's own Unicode
    rules), with the same result.
    With ``chunk_tokens`` given, ``token_ids`` is a re-iterable of ``(token_ids,
    doc_offsets)`` chunks of whole documents, read lazily (for :func:`cooccurrence_vectors`
    and :meth:`BitCipher.fit` on corpora larger than memory) and ``doc_offsets`` is None;
    otherwise they are (N,) int32 and (n_docs + 1,) int64 tensors.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"path: expected a readable text file, got {path!r}")
    min_count = _nonneg_int(min_count, "min_count", 1)
    for name, v in (("lowercase", lowercase), ("blank_line_docs", blank_line_docs)):
        if not isinstance(v, bool):
            raise TypeError(f"{name}: expected a bool, got {type(v).__name__}")
    if chunk_tokens is not None:
        chunk_tokens = _nonneg_int(chunk_tokens, "chunk_tokens", 1)
    if tokenizer is not None and not callable(tokenizer):
        raise TypeError(f"tokenizer: expected None or a callable str -> list of str, got {type(tokenizer).__name__}")
    Table = _word_table_for(tokenizer)
    if Table is not None:  # the C++ tokenizer: same words and documents
        table = Table()
        split = _LineSplit(lowercase)
        with open(path, "rb") as f:
            for blk in _text_blocks(f, blank_line_docs):
                table.count(blk, lowercase, split)
        counts = table.counts()
        words = table.words()
        if bool((counts >= min_count).all()):
            vocab = words
        else:
            vocab = [w for w, n in zip(words, counts.tolist()) if n >= min_count]
            table = Table()
            table.add(vocab)
        chunks = TextChunks(path, None, lowercase, blank_line_docs, chunk_tokens or (1 << 62), table=table)
    else:
        seen: dict = {}
        for words in _documents(path, lowercase, blank_line_docs, tokenizer):
            for w in words:
                seen[w] = seen.get(w, 0) + 1
        vocab = [w for w, n in seen.items() if n >= min_count]  # dicts keep first-insertion order
        index = {w: i for i, w in enumerate(vocab)}
        chunks = TextChunks(path, index, lowercase, blank_line_docs, chunk_tokens or (1 << 62), tokenizer)
    if chunk_tokens is not None:
        return chunks, None, vocab
    got = list(chunks)
    if not got:
        return torch.zeros(0, dtype=torch.int32), torch.zeros(1, dtype=torch.int64), vocab
    return got[0][0], got[0][1], vocab


__all__ = ["cipher_patterns", "BitCipher", "CooccurrenceCounts", "cooccurrence_vectors", "tokenize_file", "TextChunks",
           "DESCRIPTOR", "MODES",
           "WEIGHTS"]
