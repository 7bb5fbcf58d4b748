"""An embedding layer initialised from bit-cipher word vectors (docs/ops/bit_cipher.md, "Embedding layer").

The paper replaces a language model's embedding layer by cipher vectors.
:meth:`CipherEmbedding.from_vocab` maps another tokenizer's vocabulary (e.g. a
Hugging Face tokenizer's ``get_vocab()``: token string -> id) onto the words
the vectors were counted for.

Rule for a tokenizer token (in this order):

1. Its subword markers are removed -- a leading ``"Ġ"`` (byte-level BPE's
   space), ``"▁"`` (SentencePiece), ``"##"`` (WordPiece continuation), a
   trailing ``"</w>"`` -- and it is lowercased (``lowercase=True``, as
   :func:`embkern.tokenize_file` does by default).
2. If the result is a word of ``vocab``, the token gets that word's vector.
3. Otherwise (unknown: special tokens, word pieces, words the corpus never
   had) it gets, with ``unknown="unseen"`` (the default), the vector of a type
   that never occurs in the corpus -- the cipher's all-zero code, whose counts
   are all zero, so every entry is ``log10(b + 1)`` after finalisation,
   exactly the row :func:`embkern.cooccurrence_vectors` gives an unseen type;
   with ``"mean"`` the mean of the known tokens' vectors; with ``"zeros"`` zeros.

``known`` (a bool buffer, one per tokenizer id) and ``coverage`` say which
tokens were found.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import _checks

_PREFIXES = ("Ġ", "▁", "##")
_SUFFIXES = ("</w>",)
UNKNOWN = ("unseen", "mean", "zeros")


def normalise_token(token: str, lowercase: bool = True) -> str:
    """A tokenizer token as a corpus word: subword markers removed, lowercased."""
    for p in _PREFIXES:
        if token.startswith(p):
            token = token[len(p):]
            break
    for s in _SUFFIXES:
        if token.endswith(s):
            token = token[: -len(s)]
    return token.lower() if lowercase else token


class CipherEmbedding(nn.Embedding):
    """``nn.Embedding`` whose weight comes from cipher vectors; see the module docstring for the rule."""

    @classmethod
    def from_vocab(cls, vocab: Sequence[str], vectors: Tensor, tokenizer_vocab: Mapping[str, int],
                   unknown: str = "unseen", block: Optional[int] = None, lowercase: bool = True,
                   freeze: bool = False, padding_idx: Optional[int] = None) -> "CipherEmbedding":
        """Build the layer.

        Args:
            vocab: the words of the vector rows (``vocab[i]`` is row i), e.g. from
                :func:`embkern.tokenize_file`.
            vectors: (len(vocab), D) float vectors from :func:`embkern.cooccurrence_vectors`.
            tokenizer_vocab: token string -> id; ids must be distinct and in [0, n).
            unknown: "unseen" | "mean" | "zeros" (see the rule).
            block: entries a block (b + 1); default D (sum mode). Pass b + 1 for concat vectors.
            freeze: no gradient for the weight.

        Returns a CipherEmbedding of n = max id + 1 rows and D columns (float32).
        """
        if not isinstance(vectors, Tensor) or vectors.dim() != 2 or not vectors.dtype.is_floating_point:
            raise TypeError("vectors: expected a 2-d float tensor (len(vocab), D)")
        if len(vocab) != vectors.shape[0]:
            raise ValueError(f"vocab: expected {vectors.shape[0]} words (one per vector row), got {len(vocab)}")
        if unknown not in UNKNOWN:
            raise ValueError(f"unknown: expected one of {UNKNOWN}, got {unknown!r}")
        if not isinstance(tokenizer_vocab, Mapping) or not tokenizer_vocab:
            raise TypeError("tokenizer_vocab: expected a non-empty mapping token string -> id")
        bad = next((t for t in tokenizer_vocab if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"tokenizer_vocab: expected str tokens, got {type(bad).__name__} {bad!r}")
        ids = list(tokenizer_vocab.values())
        if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in ids) or len(set(ids)) != len(ids):
            raise ValueError("tokenizer_vocab: expected distinct non-negative int ids")
        if vectors.device.type == "meta":
            raise ValueError("vectors: expected a tensor with data, got one on the meta device")
        if not isinstance(freeze, bool):
            raise TypeError(f"freeze: expected a bool, got {type(freeze).__name__}")
        D = vectors.shape[1]
        if block is None:
            block = D
        elif not isinstance(block, int) or isinstance(block, bool):
            raise TypeError(f"block: expected an int (b + 1) or None, got {type(block).__name__} {block!r}")
        if block < 1 or D % block:
            raise ValueError(f"block: expected a divisor of D = {D} (b + 1), got {block}")
        n = max(ids) + 1
        if padding_idx is not None and (not isinstance(padding_idx, int) or isinstance(padding_idx, bool)
                                        or not -n <= padding_idx < n):
            raise ValueError(f"padding_idx: expected None or an int id in [-{n}, {n}) (the layer's rows), got "
                             f"{padding_idx!r}")
        # the table is n x D float32 (n = the largest id + 1, not the number of tokens): checked before any of it
        _checks.fits(n * D * 4 * 2, torch.device("cpu"),
                     f"CipherEmbedding.from_vocab: a ({n}, {D}) float32 table (n = the largest tokenizer id + 1)")
        index = {w: i for i, w in enumerate(vocab)}
        vec = vectors.detach().to(torch.float32).cpu()
        rows = torch.full((n,), -1, dtype=torch.int64)
        for tok, i in tokenizer_vocab.items():
            j = index.get(normalise_token(tok, lowercase))
            if j is not None:
                rows[i] = j
        known = rows >= 0
        if unknown == "unseen":
            fill = torch.full((D,), math.log10(block), dtype=torch.float32)
        elif unknown == "mean" and bool(known.any()):
            fill = vec[rows[known]].mean(0)
        else:
            fill = torch.zeros(D, dtype=torch.float32)
        weight = fill.expand(n, D).clone()
        weight[known] = vec[rows[known]]
        layer = cls(n, D, padding_idx=padding_idx, _weight=weight, _freeze=freeze)
        layer.register_buffer("known", known)
        layer.coverage = float(known.float().mean())
        return layer


__all__ = ["CipherEmbedding", "normalise_token", "UNKNOWN"]
