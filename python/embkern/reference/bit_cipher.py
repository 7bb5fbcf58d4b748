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
* :func:`count` -- the co-occurrence sums F in float64, densely: for every
  offset delta, every position i gathers ``psi(delta, w_{i+delta}) *
  R[w_{i+delta}]`` (the pad outside the document) and adds it to row
  ``w_i`` (block ``delta`` in concat mode, block 0 in sum mode).
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


def count_into(tok: torch.Tensor, off: torch.Tensor, psi: torch.Tensor, wpad: torch.Tensor, reps: torch.Tensor,
               ds: Sequence[int], concat: bool, F: torch.Tensor) -> None:
    """Adds one chunk's sums to F (V, n_blocks * (b + 1)) float64, densely.

    tok (N,) ids, off (n_docs + 1,) CSR offsets, psi (n_off, V) the weight of a
    word at each offset, wpad (n_off,) the pad's, reps (V, b + 1) ``[0, r_c]``."""
    D = reps.shape[1]
    tok = tok.to(torch.int64)
    off = off.to(torch.int64)
    N = tok.numel()
    if N == 0:
        return
    pad = torch.zeros(D, dtype=torch.float64)
    pad[0] = 1.0
    doc = torch.repeat_interleave(torch.arange(off.numel() - 1), off[1:] - off[:-1])
    # pieces of positions bound the (piece, b + 1) temporaries to ~64 MB
    piece = max(1, (1 << 23) // D)
    for lo in range(0, N, piece):
        i = torch.arange(lo, min(N, lo + piece))
        for o, d in enumerate(ds):
            j = i + int(d)
            inside = (j >= 0) & (j < N)
            jc = j.clamp(0, N - 1)
            inside &= doc[jc] == doc[i]
            c = tok[jc]
            rep = torch.where(inside[:, None], reps[c], pad)
            psi_c = torch.where(inside, psi[o][c], wpad[o].expand(c.shape))
            blk = o if concat else 0
            F[:, blk * D:(blk + 1) * D].index_add_(0, tok[i], psi_c[:, None] * rep)


def count(chunks: Sequence[Tuple[np.ndarray, np.ndarray]], cipher: Cipher, window: int = 5, mode: str = "sum",
          weight: str = "cos2", include_center: bool = True) -> torch.Tensor:
    """F (V, n_blocks * (b + 1)) float64: the co-occurrence sums of the chunks (whole documents each)."""
    V, b = cipher.vocab_size, cipher.bits
    ds = deltas(window, include_center)
    nb = len(ds) if mode == "concat" else 1
    F = torch.zeros(V, nb * (b + 1), dtype=torch.float64)
    w, wp = weight_table(cipher, window, include_center, weight)
    reps = torch.from_numpy(cipher.reps())
    for tok, off in chunks:
        count_into(torch.as_tensor(np.asarray(tok)), torch.as_tensor(np.asarray(off)), torch.from_numpy(w),
                   torch.from_numpy(wp), reps, ds, mode == "concat", F)
    return F


def finalise(F: torch.Tensor, n_blocks: int, eps: float = 1e-3) -> torch.Tensor:
    """(V, D) float32: per block of ``D / n_blocks`` entries, zeros -> eps, then -log10(F / sum F)."""
    V, D = F.shape
    G = F.reshape(V, n_blocks, D // n_blocks).to(torch.float64)
    G = torch.where(G == 0, torch.full_like(G, eps), G)
    U = -torch.log10(G / G.sum(dim=-1, keepdim=True))
    return U.reshape(V, D).to(torch.float32)
