"""NumPy / PyTorch reference for bit-cipher word vectors: the numerics contract.

Everything here follows ``docs/ops/bit_cipher.md`` literally and is written to
be obviously right rather than fast; the C++ and CUDA kernels are tested
against it and the bench times it as the baseline.

* :func:`patterns` -- the b-bit codes in the spec's order (level 1 is
  e_0..e_{b-1}; level k >= 2 walks the reversed previous level against the
  reversed basis, keeping unseen patterns with k ones).
* :func:`fit` -- counts, rank (descending count, ties by first occurrence,
  then by id for types that never occur), codes by token id, normalised codes
  eta (rows sum to 1), beta, q and the context representations
  ``R[c] = [0, r_c]`` (``r_c = beta_c eta_c + (1 - beta_c) q`` with noise,
  ``eta_c`` without) and the pad ``[1, 0, ..., 0]``.
* :func:`tables` / :func:`quantise` -- the kernels' addends (the rank-1 form
  of ``psi * R``: ``psi beta_c / popcount(c)`` per bit, ``psi (1 - beta_c)``
  for the q direction, the pad's ``psi``), each rounded once to an integer
  number of quanta ``2^-62``.
* :func:`count_into` / :func:`count` -- the co-occurrence sums, exactly: for
  every offset delta, every position i adds the integer addends of
  ``w_{i+delta}`` (the pad outside the document) to row ``w_i`` (block
  ``delta`` in concat mode, block 0 in sum mode) of an unsigned 128-bit
  accumulator; :func:`totals` rounds each sum once to float64 and forms
  ``F = S + Q q``.
* :func:`finalise` -- per block, zeros -> eps, then ``-log10(F / sum F)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

MODES = ("sum", "concat")
MODE_CODE = {m: i for i, m in enumerate(MODES)}
WEIGHTS = ("none", "inv", "cos2")
WEIGHT_CODE = {w: i for i, w in enumerate(WEIGHTS)}


def default_bits(vocab_size: int) -> int:
    """floor(log2 V) + 1: the fewest bits with 2^b > V (2^b - 1 non-zero patterns >= V)."""
    return int(vocab_size).bit_length()


def patterns(vocab_size: int, bits: int) -> np.ndarray:
    """(V, bits) uint8: the first V patterns of the spec's order, bit 0 first.

    Raises ValueError when V > 2^bits - 1 (the all-zero pattern is reserved for
    unknown words)."""
    if vocab_size > (1 << bits) - 1:
        raise ValueError(f"vocab_size: expected at most 2^bits - 1 = {(1 << bits) - 1} types for bits = {bits} "
                         f"(the all-zero pattern is reserved for unknown words), got {vocab_size}")
    out: List[int] = []
    level = [1 << j for j in range(bits)]          # L_1 = e_0 .. e_{b-1}
    out.extend(level[:vocab_size])
    seen = set(level)
    basis = [1 << j for j in reversed(range(bits))]  # reversed once, after level 1
    k = 1
    while len(out) < vocab_size:
        k += 1
        nxt = []
        for e in basis:
            for s in reversed(level):
                x = s ^ e
                if bin(x).count("1") == k and x not in seen:
                    seen.add(x)
                    nxt.append(x)
                    if len(out) + len(nxt) >= vocab_size:
                        break
            if len(out) + len(nxt) >= vocab_size:
                break
        out.extend(nxt)
        level = nxt
    arr = np.zeros((vocab_size, bits), dtype=np.uint8)
    for r, x in enumerate(out[:vocab_size]):
        for j in range(bits):
            if (x >> j) & 1:
                arr[r, j] = 1
    return arr


@dataclass
class Cipher:
    """A fitted cipher (all arrays by token id; float arrays float64)."""

    counts: np.ndarray      # (V,) int64
    rank: np.ndarray        # (V,) int64: rank[t] = position of t in the frequency order
    codes: np.ndarray       # (V, b) uint8
    eta: np.ndarray         # (V, b) codes / popcount
    beta: np.ndarray        # (V,) 1 / n_{count(t)}; all ones without noise
    q: np.ndarray           # (b,) anti-frequency direction (zeros without noise)
    noise: bool

    @property
    def vocab_size(self) -> int:
        return int(self.counts.shape[0])

    @property
    def bits(self) -> int:
        return int(self.codes.shape[1])

    def reps(self) -> np.ndarray:
        """(V, b + 1) float64: ``[0, r_t]`` for every type."""
        r = self.eta if not self.noise else self.beta[:, None] * self.eta + (1.0 - self.beta[:, None]) * self.q
        return np.concatenate([np.zeros((self.vocab_size, 1)), r], axis=1)


def rank_types(counts: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Token ids by descending count, ties by first occurrence (types never seen: by id, last)."""
    V = counts.shape[0]
    never = np.iinfo(np.int64).max
    f = np.where(counts > 0, first, never)
    return np.lexsort((np.arange(V), f, -counts))  # last key is primary


def fit(counts: np.ndarray, first: np.ndarray, bits: int, noise: bool = True) -> Cipher:
    """The cipher of a corpus summarised by its per-type counts and first-occurrence positions."""
    counts = np.asarray(counts, dtype=np.int64)
    V = counts.shape[0]
    order = rank_types(counts, np.asarray(first, dtype=np.int64))
    rank = np.empty(V, dtype=np.int64)
    rank[order] = np.arange(V)
    pats = patterns(V, bits)
    codes = pats[rank]
    eta = codes.astype(np.float64) / codes.sum(axis=1, keepdims=True).astype(np.float64)
    if noise:
        pbar = (counts.astype(np.float64)[:, None] * eta).sum(axis=0)
        tot = pbar.sum()
        pbar = pbar / tot if tot > 0 else np.zeros(bits)      # empty corpus: no frequency direction
        anti = 1.0 - pbar
        den = anti.sum()
        q = anti / den if den > 0 else np.zeros(bits)          # b = 1: no anti-frequency direction
        _, inv, n_same = np.unique(counts, return_inverse=True, return_counts=True)
        beta = 1.0 / n_same[inv].astype(np.float64)
    else:
        q = np.zeros(bits)
        beta = np.ones(V)
    return Cipher(counts=counts, rank=rank, codes=codes, eta=eta, beta=beta, q=q, noise=bool(noise))


def deltas(window: int, include_center: bool) -> List[int]:
    """The offsets -m..m in ascending order, 0 only with include_center."""
    return [d for d in range(-window, window + 1) if d != 0 or include_center]


def weight_table(cipher: Cipher, window: int, include_center: bool, weight: str) -> Tuple[np.ndarray, np.ndarray]:
    """(psi (n_off, V) for words, psi_pad (n_off,)) in float64."""
    ds = deltas(window, include_center)
    V = cipher.vocab_size
    total = int(cipher.counts.sum())
    p = cipher.counts.astype(np.float64) / total if total > 0 else np.zeros(V)
    w = np.empty((len(ds), V))
    wp = np.empty(len(ds))
    for o, d in enumerate(ds):
        a = abs(d)
        if weight == "none":
            w[o] = 1.0
            wp[o] = 1.0
        elif weight == "inv":
            w[o] = 1.0 if a == 0 else 1.0 / a
            wp[o] = 1.0 if a == 0 else 1.0 / a
        else:  # cos2: cos^2(pi |delta| p(c)), p = 0 for the pad
            w[o] = np.cos(math.pi * a * p) ** 2
            wp[o] = 1.0
    return w, wp


# ---------------------------------------------------------------------------
# Exact sums: addends in quanta of 2^-62, unsigned 128-bit accumulators

QUANTUM_BITS = 62  # an addend x in [0, 1] is n = round(x * 2^62) quanta, n <= 2^62 (fits int64)


def quantise(x: np.ndarray) -> np.ndarray:
    """int64 ``round_half_even(x * 2^62)`` of float64 values in [0, 1].

    ``x * 2^62`` is an exact float64 scaling and ``np.rint`` rounds to nearest,
    ties to even, giving an integer-valued float64 <= 2^62 that converts to int64
    exactly. Values >= 2^-10 are multiples of 2^-62 already (their ulp is
    >= 2^-62): no rounding at all; smaller ones move by at most 2^-63."""
    x = np.asarray(x, dtype=np.float64)
    if x.size and not (np.all(x >= 0) and np.all(x <= 1)):
        raise ValueError("weights: expected table values in [0, 1] to quantise")
    return np.ascontiguousarray(np.rint(np.ldexp(x, QUANTUM_BITS)).astype(np.int64))


def tables(cipher: Cipher, window: int, include_center: bool,
           weight: str) -> Tuple[np.ndarray, Optional[np.ndarray], np.ndarray]:
    """The kernels' quantised addends ``(wa (n_off, V), ws (n_off, V) or None, wpad (n_off,))`` int64.

    ``wa[o, c] = psi(o, c) beta_c / popcount(c)`` (added to each bit of c),
    ``ws[o, c] = psi(o, c) (1 - beta_c)`` (added to the q weight; None without
    noise), ``wpad[o]`` the pad's weight, each computed in float64 and rounded
    once by :func:`quantise`."""
    psi, wpad = weight_table(cipher, window, include_center, weight)
    pc = cipher.codes.sum(axis=1).astype(np.float64)
    wa = quantise(psi * (cipher.beta / pc)[None, :])
    ws = quantise(psi * (1.0 - cipher.beta)[None, :]) if cipher.noise else None
    return wa, ws, quantise(wpad)


def add128_(A: np.ndarray, x_lo: np.ndarray, x_hi: np.ndarray) -> None:
    """A (..., 2) uint64 (lo, hi) += x_hi * 2^64 + x_lo (uint64 arrays of A's leading shape), mod 2^128."""
    s = A[..., 0] + x_lo  # numpy uint64 arrays wrap mod 2^64
    carry = (s < x_lo).astype(np.uint64)
    A[..., 0] = s
    A[..., 1] += x_hi + carry


def to_double(A) -> np.ndarray:
    """float64 ``A * 2^-62`` of unsigned 128-bit integers A (..., 2) (lo, hi) words, each rounded once.

    Python's int -> float conversion rounds to nearest, ties to even; values
    below 2^53 convert exactly through numpy."""
    w = np.ascontiguousarray(np.asarray(A)).view(np.uint64)
    shape = w.shape[:-1]
    w = w.reshape(-1, 2)
    lo, hi = w[:, 0], w[:, 1]
    out = lo.astype(np.float64)
    big = np.nonzero((hi != 0) | (lo >= np.uint64(1 << 53)))[0]
    if big.size:
        out[big] = [float((int(h) << 64) | int(l)) for l, h in zip(lo[big].tolist(), hi[big].tolist())]
    return np.ldexp(out, -QUANTUM_BITS).reshape(shape)


def totals(A, q: np.ndarray, noise: bool) -> torch.Tensor:
    """F (V, nb * (b + 1)) float64 from the sums A (V, nb, b + 2, 2): ``S + Q q`` after one rounding each."""
    return totals_of(torch.from_numpy(to_double(A)), q, noise)


def totals_of(Ad: torch.Tensor, q: np.ndarray, noise: bool) -> torch.Tensor:
    """F (V, nb * (b + 1)) from the float64 sums Ad (V, nb, b + 2): ``S + Q q`` (one product, one add)."""
    F = Ad[:, :, :-1].clone()
    if noise:
        F[:, :, 1:] += Ad[:, :, -1:] * torch.from_numpy(q)
    return F.reshape(F.shape[0], F.shape[1] * F.shape[2])  # not -1: V = 0 is valid


def count_into(tok: torch.Tensor, off: torch.Tensor, codes: torch.Tensor, wa: torch.Tensor,
               ws: Optional[torch.Tensor], wpad: torch.Tensor, ds: Sequence[int], concat: bool,
               A: np.ndarray) -> None:
    """Adds one chunk's exact sums to A (V, n_blocks, b + 2, 2) uint64 (unsigned 128-bit (lo, hi)), densely.

    tok (N,) ids, off (n_docs + 1,) CSR offsets, codes (V, b) 0/1, wa / ws
    (n_off, V) and wpad (n_off,) the quantised addends of :func:`tables`.
    Each addend n <= 2^62 is split into 32-bit halves summed in int64 (at most
    2^30 of them an element before they are carried into A, so no overflow)."""
    V, nb, E, _ = A.shape
    tok = tok.to(torch.int64)
    off = off.to(torch.int64)
    N = tok.numel()
    if N == 0:
        return
    codes = codes.to(torch.int64)
    lo_acc = torch.zeros(V, nb * E, dtype=torch.int64)
    hi_acc = torch.zeros(V, nb * E, dtype=torch.int64)
    pending = 0
    flat = A.reshape(V, nb * E, 2)

    def flush():
        add128_(flat, lo_acc.numpy().view(np.uint64), np.zeros((V, nb * E), dtype=np.uint64))
        h = hi_acc.numpy().view(np.uint64)
        add128_(flat, h << np.uint64(32), h >> np.uint64(32))
        lo_acc.zero_()
        hi_acc.zero_()

    doc = torch.repeat_interleave(torch.arange(off.numel() - 1), off[1:] - off[:-1])
    piece = max(1, min(1 << 29, (1 << 22) // E))  # (piece, b + 2) int64 temporaries of ~32 MB
    for lo in range(0, N, piece):
        i = torch.arange(lo, min(N, lo + piece))
        for o, d in enumerate(ds):
            if pending + i.numel() > (1 << 30):
                flush()
                pending = 0
            j = i + int(d)
            inside = (j >= 0) & (j < N)
            jc = j.clamp(0, N - 1)
            inside &= doc[jc] == doc[i]
            c = tok[jc]
            X = torch.zeros(i.numel(), E, dtype=torch.int64)
            X[:, 0] = torch.where(inside, 0, wpad[o])
            X[:, 1:E - 1] = codes[c] * torch.where(inside, wa[o][c], 0)[:, None]
            if ws is not None:
                X[:, E - 1] = torch.where(inside, ws[o][c], 0)
            blk = o if concat else 0
            lo_acc[:, blk * E:(blk + 1) * E].index_add_(0, tok[i], X & 0xFFFFFFFF)
            hi_acc[:, blk * E:(blk + 1) * E].index_add_(0, tok[i], X >> 32)
            pending += i.numel()
    flush()


def count(chunks: Sequence[Tuple[np.ndarray, np.ndarray]], cipher: Cipher, window: int = 5, mode: str = "sum",
          weight: str = "cos2", include_center: bool = True) -> torch.Tensor:
    """F (V, n_blocks * (b + 1)) float64: the co-occurrence sums of the chunks (whole documents each)."""
    V, b = cipher.vocab_size, cipher.bits
    ds = deltas(window, include_center)
    nb = len(ds) if mode == "concat" else 1
    A = np.zeros((V, nb, b + 2, 2), dtype=np.uint64)
    wa, ws, wpad = tables(cipher, window, include_center, weight)
    codes = torch.from_numpy(cipher.codes)
    for tok, off in chunks:
        count_into(torch.as_tensor(np.asarray(tok)), torch.as_tensor(np.asarray(off)), codes, torch.from_numpy(wa),
                   None if ws is None else torch.from_numpy(ws), torch.from_numpy(wpad), ds, mode == "concat", A)
    return totals(A, cipher.q, cipher.noise)


def finalise(F: torch.Tensor, n_blocks: int, eps: float = 1e-3) -> torch.Tensor:
    """(V, D) float32: per block of ``D / n_blocks`` entries, zeros -> eps, then -log10(F / sum F)."""
    V, D = F.shape
    G = F.reshape(V, n_blocks, D // n_blocks).to(torch.float64)
    G = torch.where(G == 0, torch.full_like(G, eps), G)
    U = -torch.log10(G / G.sum(dim=-1, keepdim=True))
    return U.reshape(V, D).to(torch.float32)
