"""Bit-cipher word vectors: the reference against docs/ops/bit_cipher.md, the public API,
streaming and merging, the tokenizer, bad input, the torch.library op."""

import math

import numpy as np
import pytest
import torch

import embkern
from embkern.ops import bit_cipher as ops
from embkern.reference import bit_cipher as ref
from helpers import backend_params


def bits_str(t):
    return ["".join(str(int(v)) for v in row) for row in t]


# --------------------------------------------------------------------------- patterns (the spec's tables)

B4 = "1000 0100 0010 0001 0011 0101 1001 0110 1010 1100 1101 1011 0111 1110 1111".split()
B5 = ("10000 01000 00100 00010 00001 "
      "00011 00101 01001 10001 00110 01010 10010 01100 10100 11000 "
      "11001 10101 01101 10011 01011 00111 11010 10110 01110 11100 "
      "11101 01111 10111 11011 11110 11111").split()


def test_pattern_tables_b4_b5():
    assert bits_str(embkern.cipher_patterns(15, 4)) == B4
    assert bits_str(embkern.cipher_patterns(31, 5)) == B5
    # a prefix of the order for any smaller vocabulary
    assert bits_str(embkern.cipher_patterns(7, 5)) == B5[:7]


def test_patterns_distinct_fewest_ones_first_large_b():
    p = embkern.cipher_patterns(50_000, 768).numpy()
    assert p.shape == (50_000, 768) and p.dtype == np.uint8
    pc = p.sum(1)
    # at most 2 active bits at b = 768 (spec); at b = 64, 64 + 2016 + 41664 < 50k, so 4
    assert pc.max() == 2 and np.all(np.diff(pc) >= 0)
    assert len({r.tobytes() for r in p}) == 50_000
    p64 = embkern.cipher_patterns(50_000, 64).numpy()
    assert p64.sum(1).max() == 4 and len({r.tobytes() for r in p64}) == 50_000


def test_patterns_too_many_types():
    with pytest.raises(ValueError, match="vocab_size.*2\\^bits - 1 = 15"):
        embkern.cipher_patterns(16, 4)
    with pytest.raises(ValueError, match="bits"):
        embkern.cipher_patterns(3, 0)
    with pytest.raises(TypeError, match="vocab_size"):
        embkern.cipher_patterns(3.0, 4)


# --------------------------------------------------------------------------- the cipher

def zipf_corpus(V, N, n_docs, seed=0, a=1.2):
    rng = np.random.default_rng(seed)
    ids = np.minimum(rng.zipf(a, N) - 1, V - 1).astype(np.int64)
    cuts = np.sort(rng.integers(0, N + 1, n_docs - 1))
    return ids, np.concatenate([[0], cuts, [N]]).astype(np.int64)


def test_fit_rank_ties_by_first_occurrence_and_codes_by_id():
    ids = np.array([3, 1, 1, 0, 3, 2, 2, 5])  # counts: 3:2 1:2 2:2 0:1 5:1 4:0
    c = embkern.BitCipher.fit(ids, vocab_size=6)
    assert c.bits == 3  # floor(log2 6) + 1
    assert c.counts.tolist() == [1, 2, 2, 2, 0, 1]
    order = torch.argsort(c.rank).tolist()
    assert order == [3, 1, 2, 0, 5, 4]  # count desc, ties by first occurrence, unseen last
    pats = bits_str(embkern.cipher_patterns(6, 3))
    for t in range(6):
        assert bits_str(c.codes[t:t + 1])[0] == pats[int(c.rank[t])]
    assert torch.allclose(c.normalised_codes.sum(1), torch.ones(6, dtype=torch.float64))


def test_noise_definitions():
    ids, _ = zipf_corpus(40, 3000, 5, seed=1)
    c = embkern.BitCipher.fit(ids, vocab_size=40)
    counts = c.counts.numpy().astype(np.float64)
    eta = c.normalised_codes.numpy()
    pbar = (counts[:, None] * eta).sum(0)
    pbar /= pbar.sum()
    q = (1 - pbar) / (1 - pbar).sum()
    np.testing.assert_allclose(c.q.numpy(), q, rtol=1e-15)
    for t in range(40):
        same = int((c.counts == c.counts[t]).sum())
        assert c.beta[t].item() == 1.0 / same
    reps = c.reference_cipher().reps()
    np.testing.assert_allclose(reps[:, 1:], c.beta.numpy()[:, None] * eta + (1 - c.beta.numpy()[:, None]) * q,
                               rtol=1e-15)
    assert np.all(reps[:, 0] == 0)
    c0 = embkern.BitCipher.fit(ids, vocab_size=40, noise=False)
    assert torch.all(c0.beta == 1) and torch.all(c0.q == 0)
    np.testing.assert_array_equal(c0.reference_cipher().reps()[:, 1:], eta)


def test_fit_stream_equals_fit_and_save_load(tmp_path):
    ids, off = zipf_corpus(60, 5000, 9, seed=2)
    whole = embkern.BitCipher.fit(ids, vocab_size=60)
    chunks = [(ids[off[i]:off[i + 1]], np.array([0, off[i + 1] - off[i]])) for i in range(9)]
    streamed = embkern.BitCipher.fit(iter(chunks), vocab_size=60)
    for name in ("counts", "rank", "codes", "beta", "q"):
        assert torch.equal(getattr(whole, name), getattr(streamed, name)), name
    whole.save(tmp_path / "c.npz")
    back = embkern.BitCipher.load(tmp_path / "c.npz")
    for name in ("counts", "rank", "codes", "normalised_codes", "beta", "q"):
        assert torch.equal(getattr(whole, name), getattr(back, name)), name


# --------------------------------------------------------------------------- semantics by hand

def test_tiny_corpus_by_hand():
    """Two documents [0 1 0] [1], window 1, noise off, weight none, sum mode: every sum written out."""
    ids = np.array([0, 1, 0, 1])
    off = np.array([0, 3, 4])
    c = embkern.BitCipher.fit(ids, vocab_size=3, bits=2, noise=False)
    # counts 0:2 1:2 -> rank 0, 1; type 2 unseen -> rank 2 -> pattern 11
    R = {0: [0, 1, 0], 1: [0, 0, 1], "pad": [1, 0, 0]}
    F = np.zeros((3, 3))
    corpus = [[0, 1, 0], [1]]
    for doc in corpus:
        for i, t in enumerate(doc):
            for d in (-1, 0, 1):
                j = i + d
                F[t] += R[doc[j]] if 0 <= j < len(doc) else R["pad"]
    counts = embkern.CooccurrenceCounts(c, 1, "sum", "none", True, backend="reference").update(ids, off)
    np.testing.assert_array_equal(counts.totals().numpy(), F)
    v = counts.vectors(eps=1e-3).numpy()
    G = np.where(F == 0, 1e-3, F)
    np.testing.assert_allclose(v, (-np.log10(G / G.sum(1, keepdims=True))).astype(np.float32), rtol=1e-6)
    # the unseen type's row: all eps -> log10(b + 1)
    np.testing.assert_allclose(v[2], np.full(3, math.log10(3)), rtol=1e-6)


def test_weights_and_offsets():
    c = embkern.BitCipher.fit(np.array([0, 1, 1, 2, 2, 2]), vocab_size=3)
    psi, wpad = ref.weight_table(c.reference_cipher(), 2, True, "inv")
    assert ref.deltas(2, True) == [-2, -1, 0, 1, 2] and ref.deltas(2, False) == [-2, -1, 1, 2]
    np.testing.assert_array_equal(psi[:, 0], [0.5, 1, 1, 1, 0.5])
    np.testing.assert_array_equal(wpad, [0.5, 1, 1, 1, 0.5])
    psi, wpad = ref.weight_table(c.reference_cipher(), 2, True, "cos2")
    p = c.counts.numpy() / 6
    np.testing.assert_allclose(psi[0], np.cos(2 * math.pi * p) ** 2)
    np.testing.assert_array_equal(psi[2], 1.0)
    np.testing.assert_array_equal(wpad, 1.0)


@pytest.mark.parametrize("backend", backend_params("reference", "cpu"))
def test_empty_corpus_defined(backend):
    c = embkern.BitCipher.fit(np.zeros(0, dtype=np.int64), vocab_size=5)
    assert c.bits == 3 and torch.all(c.q == 1 / 3)
    v = embkern.cooccurrence_vectors(np.zeros(0, dtype=np.int64), np.array([0]), c, backend=backend)
    assert v.shape == (5, 4) and v.dtype == torch.float32
    np.testing.assert_allclose(v.numpy(), math.log10(4), rtol=1e-6)
    v = embkern.cooccurrence_vectors(np.zeros(0, dtype=np.int64), np.array([0, 0, 0]), c, mode="concat",
                                     window=2, backend=backend)
    assert v.shape == (5, 5 * 4)


# --------------------------------------------------------------------------- streaming and merging

def raw_sums(counts):
    """The 128-bit sums of a CooccurrenceCounts as Python ints, shape (V, nb, b + 2)."""
    w = counts.A.cpu().numpy().view(np.uint64)
    return [[[(int(h) << 64) | int(lo) for lo, h in blk] for blk in row] for row in w.tolist()]


@pytest.mark.parametrize("backend", backend_params("reference", "cpu"))
@pytest.mark.parametrize("mode", ["sum", "concat"])
def test_chunked_equals_one_pass_equals_merged(backend, mode):
    ids, off = zipf_corpus(80, 6000, 30, seed=3)
    c = embkern.BitCipher.fit(ids, vocab_size=80)

    def new():
        return embkern.CooccurrenceCounts(c, 4, mode, "cos2", True, backend=backend)

    one = new().update(ids, off)
    # chunks of whole documents, counted one after the other
    cuts = [0, 7, 8, 19, 30]
    chunks = [(ids[off[a]:off[b]], off[a:b + 1] - off[a]) for a, b in zip(cuts[:-1], cuts[1:])]
    seq = new()
    for t, o in chunks:
        seq.update(t, o)
    streamed = embkern.cooccurrence_vectors(iter(chunks), None, c, window=4, mode=mode, backend=backend,
                                            progress=False)
    assert torch.equal(seq.A, one.A)  # exact integer sums
    assert torch.equal(streamed, one.vectors())
    # shards counted separately, merged in several groupings: the same 128-bit sums and float64 totals
    F, raw = one.totals(), raw_sums(one)

    def shards():
        return [new().update(t, o) for t, o in chunks]

    s = shards()
    m1 = new()
    for x in s:
        m1.merge(x)
    s = shards()
    m2 = new().merge(s[3].merge(s[2])).merge(s[1].merge(s[0]))  # a tree, reversed
    s = shards()
    m3 = s[2].merge(s[0]).merge(s[3]).merge(s[1])  # merged into one shard, shuffled
    # single documents as shards (30 of them), merged right to left
    docs = [new().update(ids[off[d]:off[d + 1]], np.array([0, off[d + 1] - off[d]])) for d in range(30)]
    m4 = docs[-1]
    for x in reversed(docs[:-1]):
        m4.merge(x)
    for m in (m1, m2, m3, m4):
        assert torch.equal(m.A, one.A)
        assert raw_sums(m) == raw
        assert torch.equal(m.totals(), F)
        assert torch.equal(m.vectors(), one.vectors())
        assert m.n_tokens == one.n_tokens == 6000 and m.n_docs == 30


@pytest.mark.parametrize("mode", ["sum", "concat"])
def test_kernel_equals_reference_exactly_and_merges_across_backends(mode):
    ids, off = zipf_corpus(90, 4000, 12, seed=8)
    c = embkern.BitCipher.fit(ids, vocab_size=90)
    r = embkern.CooccurrenceCounts(c, 3, mode, "cos2", backend="reference").update(ids, off)
    k = embkern.CooccurrenceCounts(c, 3, mode, "cos2", backend="cpu").update(ids, off)
    assert torch.equal(k.A, r.A)
    assert torch.equal(k.totals(), r.totals())
    assert torch.equal(k.totals(), ref.count([(ids, off)], c.reference_cipher(), 3, mode, "cos2"))
    half = int(off[6])
    a = embkern.CooccurrenceCounts(c, 3, mode, "cos2", backend="reference").update(ids[:half], off[:7])
    b = embkern.CooccurrenceCounts(c, 3, mode, "cos2", backend="cpu").update(ids[half:], off[6:] - half)
    assert torch.equal(b.merge(a).A, k.A)


def test_quantise_rounds_half_to_even_once():
    from fractions import Fraction

    q = ref.quantise(np.array([0.0, 1.0, 2.0 ** -63, 3 * 2.0 ** -63, 5 * 2.0 ** -63, 2.0 ** -62, 0.75 * 2.0 ** -62,
                               2.0 ** -10, 0.1, 1 / 3, np.nextafter(2.0 ** -10, 0)]))
    assert q.dtype == np.int64
    assert q[:7].tolist() == [0, 1 << 62, 0, 2, 2, 1, 1]
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.random(2000), rng.random(2000) * 2.0 ** -20,
                        [2.0 ** -10, 0.1, 1 / 3, np.nextafter(2.0 ** -10, 0), 2.0 ** -1074]])
    n = ref.quantise(x)
    for xi, ni in zip(x.tolist(), n.tolist()):
        exact = Fraction(xi) * 2 ** 62
        assert ni == round(exact)  # Python's round of a Fraction: nearest, ties to even
        if xi >= 2.0 ** -10:
            assert ni == exact  # no rounding at all
        elif xi > 0:
            assert abs(Fraction(ni) - exact) <= Fraction(1, 2)
    with pytest.raises(ValueError, match="weights"):
        ref.quantise(np.array([1.5]))


def test_counts_pickle_and_deepcopy():
    import copy
    import pickle

    ids, off = zipf_corpus(40, 2000, 5, seed=6)
    c = embkern.BitCipher.fit(ids, vocab_size=40)
    a = embkern.CooccurrenceCounts(c, 2, "concat", backend="cpu").update(ids[:off[2]], off[:3])
    for b in (pickle.loads(pickle.dumps(a)), copy.deepcopy(a)):
        assert torch.equal(b.A, a.A) and b.A.data_ptr() != a.A.data_ptr()
        assert b.n_tokens == a.n_tokens and b.n_docs == a.n_docs
        b.update(ids[off[2]:], off[2:] - off[2])  # the copy counts on without touching the original
        one = embkern.CooccurrenceCounts(c, 2, "concat", backend="cpu").update(ids, off)
        assert torch.equal(b.A, one.A) and not torch.equal(a.A, one.A)
        assert torch.equal(copy.deepcopy(a).merge(pickle.loads(pickle.dumps(
            embkern.CooccurrenceCounts(c, 2, "concat").update(ids[off[2]:], off[2:] - off[2])))).A, one.A)


def test_merge_rejects_other_settings():
    ids, off = zipf_corpus(20, 500, 3)
    c = embkern.BitCipher.fit(ids, vocab_size=20)
    a = embkern.CooccurrenceCounts(c, 2)
    with pytest.raises(ValueError, match="other: expected counts of the same"):
        a.merge(embkern.CooccurrenceCounts(c, 3))
    with pytest.raises(TypeError, match="other"):
        a.merge(1)


# --------------------------------------------------------------------------- bad input

def test_bad_input():
    ids, off = zipf_corpus(20, 500, 3)
    c = embkern.BitCipher.fit(ids, vocab_size=20)
    with pytest.raises(ValueError, match=r"token_ids: expected token ids in \[0, 20\).*token_ids\[1\] = -1"):
        embkern.cooccurrence_vectors(np.array([0, -1, 2]), None, c)
    with pytest.raises(ValueError, match=r"token_ids.*\[0, 20\).*= 20"):
        embkern.cooccurrence_vectors(np.array([0, 20]), None, c)
    with pytest.raises(ValueError, match="doc_offsets: expected non-decreasing"):
        embkern.cooccurrence_vectors(np.array([0, 1, 2]), np.array([0, 2, 1, 3]), c)
    with pytest.raises(ValueError, match="doc_offsets"):
        embkern.cooccurrence_vectors(np.array([0, 1, 2]), np.array([0, 2]), c)
    with pytest.raises(ValueError, match="window: expected an int >= 1"):
        embkern.cooccurrence_vectors(ids, off, c, window=0)
    with pytest.raises(ValueError, match="mode"):
        embkern.cooccurrence_vectors(ids, off, c, mode="mean")
    with pytest.raises(ValueError, match="weight"):
        embkern.cooccurrence_vectors(ids, off, c, weight="exp")
    with pytest.raises(TypeError, match="token_ids"):
        embkern.cooccurrence_vectors(np.array([0.5, 1.0]), None, c)
    with pytest.raises(ValueError, match="eps"):
        embkern.cooccurrence_vectors(ids, off, c, eps=0.0)
    for bad_eps in (float("inf"), float("nan"), True, "1e-3"):
        with pytest.raises(ValueError, match="eps: expected a finite float > 0"):
            embkern.cooccurrence_vectors(ids, off, c, eps=bad_eps)
    assert torch.equal(embkern.cooccurrence_vectors(ids, off, c, eps=np.float32(0.25), progress=False),
                       embkern.cooccurrence_vectors(ids, off, c, eps=float(np.float32(0.25)), progress=False))
    with pytest.raises(TypeError, match="cipher"):
        embkern.CooccurrenceCounts("cipher")
    with pytest.raises(ValueError, match="bits: expected bits with 2\\^bits - 1 >= vocab_size = 20"):
        embkern.BitCipher.fit(ids, vocab_size=20, bits=4)
    with pytest.raises(ValueError, match=r"token_ids.*\[0, 10\)"):
        embkern.BitCipher.fit(ids, vocab_size=10)
    with pytest.raises(ValueError, match="token_ids.*= -3"):
        embkern.BitCipher.fit(np.array([1, -3]))
    with pytest.raises(ValueError, match="vocab_size: expected an int >= 1 for an empty corpus"):
        embkern.BitCipher.fit(np.zeros(0, dtype=np.int64))
    with pytest.raises(ValueError, match="backend"):
        embkern.cooccurrence_vectors(ids, off, c, backend="gpu")
    with pytest.raises(MemoryError, match="bits = 1099511627776"):  # 1 << bits was a bare MemoryError
        embkern.BitCipher.fit(ids, vocab_size=20, bits=2**40)
    with pytest.raises(TypeError, match=r"token_ids: expected chunks as \(token_ids, doc_offsets\) pairs"):
        embkern.cooccurrence_vectors([torch.as_tensor(ids)], cipher=c)  # a list of id arrays: chunks, not ids


def test_from_counts_rejects_counts_beyond_the_exact_range():
    # a uint64 count of 2^63 wrapped to a negative int64 count, silently
    with pytest.raises(ValueError, match=r"counts: expected at most 2\^56 .* got 9223372036854775808"):
        embkern.BitCipher.from_counts(np.array([2**63, 1], dtype=np.uint64))
    with pytest.raises(ValueError, match=r"counts: expected at most 2\^56"):  # once refused later as 'load'
        embkern.BitCipher.from_counts(np.array([2**62, 2**62, 5]))
    with pytest.raises(ValueError, match=r"counts: expected a total below 2\^62"):
        embkern.BitCipher.from_counts(np.full(200, 2**56))
    with pytest.raises(MemoryError, match="bits = 1099511627776"):
        embkern.BitCipher.from_counts(np.array([3, 2, 1]), bits=2**40)
    c = embkern.BitCipher.from_counts(np.array([2**56, 7, 0], dtype=np.uint64))  # the edge is accepted
    assert c.counts.tolist() == [2**56, 7, 0] and c.total == 2**56 + 7


def test_unsigned_ids_and_an_empty_list_are_corpora():
    # numpy uint16/32/64 ids (what tokenizers often return) count as int64 ids: torch has no min / max
    # on those dtypes, and uint64 ids raised a NotImplementedError; [] is the empty corpus, not a
    # float32 array (torch.as_tensor([]))
    ids, off = zipf_corpus(20, 300, 4)
    c = embkern.BitCipher.fit(ids, vocab_size=20)
    want = embkern.cooccurrence_vectors(ids, off, c, progress=False)
    for dt in (np.uint16, np.uint32, np.uint64):
        assert np.array_equal(embkern.BitCipher.fit(ids.astype(dt), vocab_size=20).codes, c.codes), dt
        got = embkern.cooccurrence_vectors(ids.astype(dt), off.astype(dt), c, progress=False)
        assert torch.equal(got, want), dt
    with pytest.raises(ValueError, match="token_ids: expected values below 2\\^63"):
        embkern.BitCipher.fit(np.array([0, 2**63], dtype=np.uint64))
    empty = embkern.cooccurrence_vectors(np.zeros(0, dtype=np.int64), np.array([0]), c, progress=False)
    assert torch.equal(embkern.cooccurrence_vectors([], None, c, progress=False), empty)
    assert np.array_equal(embkern.BitCipher.fit([], vocab_size=20).codes, embkern.cipher_patterns(20, 5).numpy())


def test_sizes_too_big_for_memory_are_refused_up_front():
    # a MemoryError naming the argument, with the size in GB, before anything is built: the (V, b)
    # pattern table, a cipher whose V comes from vocab_size or from the largest id, and the
    # (2 window + 1, V) offset weight tables (window = 2^40 built a Python list of 2^41 offsets and
    # died with a MemoryError that said nothing)
    c = embkern.BitCipher.fit(np.array([0, 1, 2, 1]), vocab_size=4)
    with pytest.raises(MemoryError, match=r"vocab_size: the \(1099511627776, 64\) uint8 pattern table needs .* GB"):
        embkern.cipher_patterns(2**40, 64)
    with pytest.raises(MemoryError, match="vocab_size: vocab_size = 1099511627776: .* GB"):
        embkern.BitCipher.fit(np.array([0, 1]), vocab_size=2**40)
    with pytest.raises(MemoryError, match="token_ids: the largest id 1099511627776 .* GB"):
        embkern.BitCipher.fit(np.array([0, 2**40]))
    for mode in ("sum", "concat"):
        with pytest.raises(MemoryError, match=f"window = 1099511627776, mode '{mode}': .* GB"):
            embkern.cooccurrence_vectors(np.array([0, 1]), None, c, window=2**40, mode=mode, progress=False)


# --------------------------------------------------------------------------- the op

def test_opcheck():
    ids, off = zipf_corpus(30, 400, 4, seed=4)
    c = embkern.BitCipher.fit(ids, vocab_size=30)
    cc = embkern.CooccurrenceCounts(c, 2, "concat", "cos2", True, backend="reference")
    args = (torch.as_tensor(ids, dtype=torch.int32), torch.as_tensor(off), cc._bit_offsets, cc._bit_index, cc._wa,
            cc._ws, cc._wpad, cc._deltas, cc._load, cc.A)
    for be in ("reference", "cpu"):
        for K in (0, 2):  # no thread copies, and two the cpu kernel counts into at 3 or more threads
            parts = torch.zeros((K,) + tuple(cc.A.shape), dtype=torch.int64)
            torch.library.opcheck(torch.ops.embkern.bit_cipher_count.default, args + (parts, True, be))


def test_compiled_count_update():
    ids, off = zipf_corpus(30, 400, 4, seed=5)
    c = embkern.BitCipher.fit(ids, vocab_size=30)
    eager = embkern.CooccurrenceCounts(c, 2, backend="cpu")
    comp = embkern.CooccurrenceCounts(c, 2, backend="cpu")
    t, o = torch.as_tensor(ids, dtype=torch.int32), torch.as_tensor(off)

    def step(cc, t, o, A, parts):
        ops.bit_cipher_count(t, o, cc._bit_offsets, cc._bit_index, cc._wa, cc._ws, cc._wpad, cc._deltas,
                             cc._load, A, parts, False, "cpu")
        return A.sum()

    for cc in (eager, comp):  # one thread copy: counted into at 2 or more threads
        cc._parts = torch.zeros((1,) + tuple(cc._A.shape), dtype=torch.int64)
    step(eager, t, o, eager._A, eager._parts)
    torch.compile(lambda t, o, A, p: step(comp, t, o, A, p), fullgraph=True)(t, o, comp._A, comp._parts)
    for cc in (eager, comp):
        cc._parts_dirty = True  # the direct op calls bypass update()'s bookkeeping
    assert torch.equal(eager.A, comp.A)
    assert torch.equal(eager.A, embkern.CooccurrenceCounts(c, 2, backend="reference").update(ids, off).A)


# --------------------------------------------------------------------------- tokenizer

def test_tokenize_file(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("The cat, the dog!\n\nA cat-dog? 42\nthe end\n", encoding="utf-8")
    ids, off, vocab = embkern.tokenize_file(p)
    assert vocab == ["the", "cat", "dog", "a", "42", "end"]
    assert ids.tolist() == [0, 1, 0, 2, 3, 1, 2, 4, 0, 5] and off.tolist() == [0, 4, 8, 10]
    ids, off, vocab = embkern.tokenize_file(p, blank_line_docs=True, min_count=2)
    assert vocab == ["the", "cat", "dog"]
    assert ids.tolist() == [0, 1, 0, 2, 1, 2, 0] and off.tolist() == [0, 4, 7]
    chunks, none, vocab2 = embkern.tokenize_file(p, chunk_tokens=3)
    assert none is None
    got = list(chunks)
    assert [o.tolist() for _, o in got] == [[0, 4], [0, 4], [0, 2]]
    assert list(chunks)[2][0].tolist() == [0, 5]  # re-iterable
    with pytest.raises(ValueError, match="path"):
        embkern.tokenize_file(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="min_count"):
        embkern.tokenize_file(p, min_count=0)


def test_tokenize_then_vectors_streamed_equals_in_memory(tmp_path):
    rng = np.random.default_rng(7)
    words = [f"w{i}" for i in range(50)]
    lines = [" ".join(words[min(int(z) - 1, 49)] for z in rng.zipf(1.3, rng.integers(1, 40))) for _ in range(60)]
    p = tmp_path / "c.txt"
    p.write_text("\n".join(lines) + "\n")
    ids, off, vocab = embkern.tokenize_file(p)
    c = embkern.BitCipher.fit(ids, vocab_size=len(vocab))
    chunks, _, vocab2 = embkern.tokenize_file(p, chunk_tokens=100)
    c2 = embkern.BitCipher.fit(chunks, vocab_size=len(vocab))
    assert vocab2 == vocab and torch.equal(c.codes, c2.codes)
    a = embkern.cooccurrence_vectors(ids, off, c, backend="cpu")
    b = embkern.cooccurrence_vectors(chunks, None, c2, backend="cpu", progress=False)
    assert torch.equal(a, b)


def test_real_data_head500():
    from embkern.contrib.bit_cipher_eval import gensim_data

    path = gensim_data("head500.noblanks.cor")
    if path is None:
        pytest.skip("gensim's head500.noblanks.cor is not installed (pip install --no-deps gensim)")
    chunks, _, vocab = embkern.tokenize_file(path, chunk_tokens=50_000)
    c = embkern.BitCipher.fit(chunks, vocab_size=len(vocab))
    v = embkern.cooccurrence_vectors(chunks, None, c, backend="cpu", progress=False)
    assert v.shape == (len(vocab), c.bits + 1) and bool(torch.isfinite(v).all())
    # the most frequent words get the lowest-level patterns
    top = torch.argsort(c.rank)[:c.bits]
    assert torch.all(c.codes[top].sum(1) == 1)


def test_bench_zipf_ids_are_truncated_zipf_not_clamped():
    from embkern.bench.bit_cipher import zipf_ids

    V, n, a = 1000, 200_000, 1.1
    ids = zipf_ids(np.random.default_rng(0), V, n, a)
    assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < V
    p = np.arange(1, V + 1, dtype=np.float64) ** -a
    p /= p.sum()
    freq = np.bincount(ids, minlength=V) / n
    # the head follows the truncated law within 5 binomial standard deviations ...
    sd = np.sqrt(p[:20] * (1 - p[:20]) / n)
    assert np.all(np.abs(freq[:20] - p[:20]) < 5 * sd)
    # ... and the last id holds its own share, not the tail beyond V (clamping gave it ~46% here)
    assert freq[V - 1] < 10 * p[V - 1] + 5 / n


def test_html_prose_keeps_main_text_and_drops_code_and_navigation():
    from embkern.contrib.bit_cipher_eval import html_prose

    page = """<html><head><style>p { x: 1 }</style><script>var a = 1;</script></head><body>
    <div class="related"><a href="x">Navigation</a></div>
    <div class="body" role="main"><h1>Built-in Functions<a class="headerlink">&para;</a></h1>
    <p>The <code>abs</code> function returns
    the absolute value &amp; more.<p>Unclosed paragraph</p>
    <div class="highlight"><pre>def f(): return 1</pre></div>
    <ul><li>one<br>two</li><li>three</li></ul><table><tr><td>cell a</td><td>cell b</td></tr></table>
    </div><div class="footer">Copyright</div></body></html>"""
    assert html_prose(page) == ["Built-in Functions\u00b6", "The abs function returns the absolute value & more.",
                                "Unclosed paragraph", "one two", "three", "cell a", "cell b"]


def test_python_doc_corpus_skips_indexes_and_is_cached(tmp_path):
    from embkern.contrib.bit_cipher_eval import python_doc_corpus

    root = tmp_path / "html"
    (root / "library").mkdir(parents=True)
    (root / "_static").mkdir()
    main = '<div role="main"><p>{}</p></div>'
    (root / "index.html").write_text(main.format("front page"))
    (root / "library" / "os.html").write_text(main.format("the os module"))
    (root / "genindex-A.html").write_text(main.format("index entry"))
    (root / "search.html").write_text(main.format("search page"))
    (root / "_static" / "x.html").write_text(main.format("static"))
    assert python_doc_corpus(str(tmp_path / "cache"), root=str(tmp_path / "none")) is None
    p = python_doc_corpus(str(tmp_path / "cache"), root=str(root))
    with open(p) as f:
        assert f.read() == "front page\nthe os module\n"
    assert python_doc_corpus(str(tmp_path / "cache"), root=str(root)) == p  # cached: same file
    (root / "library" / "sys.html").write_text(main.format("the sys module"))
    p2 = python_doc_corpus(str(tmp_path / "cache"), root=str(root))  # a new page: a new key
    assert p2 != p and open(p2).read().splitlines()[-1] == "the sys module"


@pytest.mark.parametrize("mode", ["sum", "concat"])
def test_bench_anchor_counts_the_same_quantities(mode):
    """The bench's plain scipy.sparse count (its anchor row) computes the reference's F."""
    pytest.importorskip("scipy")
    from embkern.bench.bit_cipher import scipy_count, zipf_chunk

    tok, off = zipf_chunk(200, 5000, seed=9, doc_len=37)
    c = embkern.BitCipher.fit(tok, vocab_size=200)
    want = embkern.CooccurrenceCounts(c, 5, mode, "cos2", backend="cpu").update(tok, off).totals()
    torch.testing.assert_close(scipy_count(tok, off, c, 5, mode, "cos2"), want, rtol=1e-11, atol=1e-11)


def test_bench_workloads_tiny(monkeypatch):
    monkeypatch.setenv("EMBKERN_BENCH_TINY", "1")
    from embkern.bench import bit_cipher as bench

    ws = bench.workloads(True, torch.device("cpu"))
    assert ws and all(w.group == "cooccurrence_vectors" for w in ws)
    w = ws[0]
    w.setup()
    try:
        ref64 = w.reference64()
        for fn in list(w.backends.values()) + list(w.anchors.values()):
            assert w.error(fn(), ref64) < 1e-10
    finally:
        w.teardown()
