"""embkern.nn.CipherEmbedding: the documented rule for tokenizer tokens, known and unknown."""

import math

import numpy as np
import pytest
import torch

import embkern
from embkern.nn.bit_cipher import normalise_token


def _vectors():
    ids = np.array([0, 1, 2, 1, 0, 0, 3, 2])
    c = embkern.BitCipher.fit(ids, vocab_size=5)
    return ["the", "cat", "sat", "mat", "zzz"], embkern.cooccurrence_vectors(ids, None, c, window=2), c


def test_from_vocab_rule():
    vocab, vec, c = _vectors()
    tok = {"[PAD]": 0, "Ġthe": 1, "Cat": 2, "##sat": 3, "▁mat</w>": 4, "dog": 5, "zzz": 7}
    emb = embkern.nn.CipherEmbedding.from_vocab(vocab, vec, tok)
    assert isinstance(emb, torch.nn.Embedding) and emb.weight.shape == (8, c.bits + 1)
    for t, i in tok.items():
        w = normalise_token(t)
        if w in vocab:
            assert torch.equal(emb.weight[i], vec[vocab.index(w)]) and emb.known[i]
        else:
            assert not emb.known[i]
            torch.testing.assert_close(emb.weight[i], torch.full((c.bits + 1,), math.log10(c.bits + 1)))
    # id 6 is absent from the tokenizer: unknown too
    assert not emb.known[6]
    assert emb.coverage == pytest.approx(5 / 8)
    # the unseen rule is the row cooccurrence_vectors gives a type that never occurs ("zzz", id 4)
    torch.testing.assert_close(vec[4], emb.weight[0])
    out = emb(torch.tensor([[1, 2], [5, 0]]))
    assert out.shape == (2, 2, c.bits + 1)
    mean = embkern.nn.CipherEmbedding.from_vocab(vocab, vec, tok, unknown="mean", freeze=True)
    torch.testing.assert_close(mean.weight[5], mean.weight[mean.known].mean(0))
    assert not mean.weight.requires_grad


def test_from_vocab_bad_input():
    vocab, vec, _ = _vectors()
    with pytest.raises(ValueError, match="vocab"):
        embkern.nn.CipherEmbedding.from_vocab(vocab[:3], vec, {"a": 0})
    with pytest.raises(ValueError, match="unknown"):
        embkern.nn.CipherEmbedding.from_vocab(vocab, vec, {"a": 0}, unknown="random")
    with pytest.raises(ValueError, match="tokenizer_vocab"):
        embkern.nn.CipherEmbedding.from_vocab(vocab, vec, {"a": 0, "b": 0})
    with pytest.raises(ValueError, match="block"):
        embkern.nn.CipherEmbedding.from_vocab(vocab, vec, {"a": 0}, block=5)
    with pytest.raises(TypeError, match="vectors"):
        embkern.nn.CipherEmbedding.from_vocab(vocab, vec.numpy(), {"a": 0})
    # these came out of nn.Embedding, str.startswith, a meta copy or an 8 TB allocation
    with pytest.raises(ValueError, match=r"padding_idx: expected None or an int id in \[-1, 1\)"):
        embkern.nn.CipherEmbedding.from_vocab(vocab, vec, {"a": 0}, padding_idx=5)
    with pytest.raises(TypeError, match="tokenizer_vocab: expected str tokens, got int 1"):
        embkern.nn.CipherEmbedding.from_vocab(vocab, vec, {1: 0})
    with pytest.raises(ValueError, match="vectors: expected a tensor with data"):
        embkern.nn.CipherEmbedding.from_vocab(vocab, vec.to("meta"), {"a": 0})
    with pytest.raises(MemoryError, match=r"CipherEmbedding.from_vocab: a \(1000000000001, "):
        embkern.nn.CipherEmbedding.from_vocab(vocab, vec, {"a": 10**12})
    for block in (2.5, True):  # were truncated to 2 and 1
        with pytest.raises(TypeError, match="block: expected an int"):
            embkern.nn.CipherEmbedding.from_vocab(vocab, vec, {"a": 0}, block=block)
