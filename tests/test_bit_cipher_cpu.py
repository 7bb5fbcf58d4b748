"""C++ CPU kernel of bit-cipher counting against the reference: every mode, weight and flag,
empty and one-token documents, windows longer than the document; the same bits for every
thread count and ISA level; the raw binding's checks."""

import itertools
import math
import pickle

import numpy as np
import pytest
import torch

import embkern
from embkern.reference import bit_cipher as ref
from helpers import assert_same_bits, at_each, cpu_isa, cpu_module, cpu_threads

C = cpu_module()
BC = C.bit_cipher
LEVELS = list(C.isa_info()["available"])


def zipf_corpus(V, N, seed, a=1.2):
    """Zipf ids with empty documents, one-token documents and long ones."""
    rng = np.random.default_rng(seed)
    lens = []
    left = N
    while left > 0:
        k = min(int(rng.choice([0, 1, 2, 3, 7, 40, 300])), left)
        lens.append(k)
        left -= k
    lens = [0] + lens[:3] + [0, 1, 0] + lens[3:] + [0]
    off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    ids = np.minimum(rng.zipf(a, int(off[-1])) - 1, V - 1).astype(np.int64)
    return ids, off


GRID = list(itertools.product(["sum", "concat"], ["none", "inv", "cos2"], [True, False], [True, False]))


@pytest.mark.parametrize("mode,weight,include_center,noise", GRID,
                         ids=lambda v: str(v))
@pytest.mark.parametrize("window", [1, 5, 400])  # 400: longer than every document
def test_cpu_matches_reference(mode, weight, include_center, noise, window):
    V = 120
    ids, off = zipf_corpus(V, 3000, seed=window)
    c = embkern.BitCipher.fit(ids, vocab_size=V, noise=noise)
    kw = dict(window=window, mode=mode, weight=weight, include_center=include_center)
    a = embkern.CooccurrenceCounts(c, backend="reference", **kw).update(ids, off)
    b = embkern.CooccurrenceCounts(c, backend="cpu", **kw).update(ids, off)
    # exact integer sums: the same 128-bit words, float64 totals and float32 vectors
    assert torch.equal(b.A, a.A)
    assert torch.equal(b.totals(), a.totals())
    assert torch.equal(b.vectors(), a.vectors())
    # the pad and q parts land where the formula says: the rows of types never seen stay zero
    unseen = c.counts == 0
    assert torch.all(b.totals()[unseen] == 0)


@pytest.mark.parametrize("mode", ["sum", "concat"])
def test_thread_count_invariance(mode):
    ids, off = zipf_corpus(500, 20_000, seed=11)
    c = embkern.BitCipher.fit(ids, vocab_size=500)
    outs = {}
    # thread copies: None = one per thread; 1 = rows dealt only; 2 at 3 and 5 threads = groups of
    # 2 + 1 and 3 + 2 threads, each group dealing its copy's rows
    for n, copies in ((1, None), (2, None), (2, 1), (3, None), (3, 2), (5, 2), (5, None), (5, 1)):
        with cpu_threads(n):
            cc = embkern.CooccurrenceCounts(c, 5, mode, "cos2", backend="cpu", thread_copies=copies)
            outs[n, copies] = cc.update(ids, off).A.clone()
            assert cc._parts.shape[0] == min(n, copies or n) - 1
    assert_same_bits(outs)


def test_thread_copies_persist_across_updates_and_reads():
    """Chunks counted into the copies, reads between them (each folds the copies in), a change of thread
    count, a pickle: the bits of one single-threaded pass."""
    ids, off = zipf_corpus(400, 12_000, seed=13)
    c = embkern.BitCipher.fit(ids, vocab_size=400)
    one = embkern.CooccurrenceCounts(c, 3, "sum", "inv", backend="cpu", thread_copies=1)
    with cpu_threads(1):
        one.update(ids, off)
    cc = embkern.CooccurrenceCounts(c, 3, "sum", "inv", backend="cpu")
    cuts = [0, 40, 90, 150, len(off) - 1]
    for k, T in enumerate((3, 2, 1, 4)):
        lo, hi = cuts[k], cuts[k + 1]
        with cpu_threads(T):
            cc.update(ids[off[lo]:off[hi]], off[lo:hi + 1] - off[lo])
        if k == 1:
            assert not torch.equal(cc.A, one.A)  # a read mid-stream: folds, counting goes on after
    assert cc._parts_dirty
    restored = pickle.loads(pickle.dumps(cc))
    assert restored._parts.shape[0] == 0 and not cc._parts_dirty
    assert torch.equal(cc.A, one.A) and torch.equal(restored.A, one.A)
    assert torch.count_nonzero(cc._parts) == 0  # folded copies are zeroed and kept for the next chunk
    with pytest.raises(ValueError, match="thread_copies: expected"):
        embkern.CooccurrenceCounts(c, 3, thread_copies=0)


@pytest.mark.skipif(len(LEVELS) < 2, reason="this CPU runs one ISA level")
def test_same_bits_at_every_isa_level():
    ids, off = zipf_corpus(300, 10_000, seed=12)
    c = embkern.BitCipher.fit(ids, vocab_size=300)
    assert_same_bits(at_each(cpu_isa, LEVELS, lambda: embkern.CooccurrenceCounts(
        c, 3, "concat", "inv", backend="cpu").update(ids, off).A.clone()))


def _raw_args(V=10, b=4, N=20, n_off=3, concat=False):
    rng = np.random.default_rng(0)
    tok = rng.integers(0, V, N).astype(np.int32)
    doff = np.array([0, 5, N], dtype=np.int64)
    boff = np.arange(V + 1, dtype=np.int64)
    bidx = (np.arange(V) % b).astype(np.int32)
    nb = n_off if concat else 1
    one = np.int64(1 << 62)  # 1.0 in quanta of 2^-62
    return dict(token_ids=tok, doc_offsets=doff, bit_offsets=boff, bit_index=bidx,
                wa=np.full((n_off, V), one), ws=np.full((n_off, V), one), wpad=np.full(n_off, one),
                deltas=np.array([-1, 0, 1], dtype=np.int64), load=np.arange(V, dtype=np.int64),
                A=np.zeros((V, nb, b + 2, 2), dtype=np.int64), parts=None, concat=concat)


def units(A):
    """float64 values of 128-bit sums (V, nb, E, 2) through the binding's conversion."""
    out = np.empty(A.shape[:-1])
    BC.to_double(A.reshape(-1, 2), out.reshape(-1))
    return out


def test_raw_binding_counts_and_checks():
    a = _raw_args()
    BC.count(**a)
    # every position adds 3 offsets' weights (1 each) into its row: mass 3 N in the pad and bits; the q
    # weight gets one 1 per offset inside the document: 3 N minus the 4 pads of the two documents' ends
    u = units(a["A"])
    assert u[..., :-1].sum() == 3 * 20 and u[..., -1].sum() == 3 * 20 - 4
    bad = [
        (dict(token_ids=np.array([0, 10] + [1] * 18, dtype=np.int32)), ValueError,
         r"token_ids: expected token ids in \[0, 10\)"),
        (dict(token_ids=np.array([-1] * 20, dtype=np.int32)), ValueError, "token_ids"),
        (dict(token_ids=np.zeros(20, dtype=np.int64)), TypeError, "token_ids: expected dtype int32"),
        (dict(doc_offsets=np.array([0, 9, 5, 20], dtype=np.int64)), ValueError, "doc_offsets: expected non-decreasing"),
        (dict(doc_offsets=np.array([0, 5, 19], dtype=np.int64)), ValueError, "doc_offsets.*== len\\(token_ids\\)"),
        (dict(bit_index=np.full(10, 4, dtype=np.int32)), ValueError, r"bit_index: expected bit positions in \[0, 4\)"),
        (dict(bit_offsets=np.arange(11, dtype=np.int64)[::-1].copy()), ValueError, "bit_offsets"),
        (dict(A=np.zeros((9, 1, 6, 2), dtype=np.int64)), ValueError, "A: expected shape"),
        (dict(A=np.zeros((10, 2, 6, 2), dtype=np.int64)), ValueError, "A: expected shape"),
        (dict(A=np.zeros((10, 1, 6, 3), dtype=np.int64)), ValueError, "A: expected shape"),
        (dict(A=np.zeros((10, 1, 6), dtype=np.int64)), ValueError, "A: expected 4-d"),
        (dict(A=np.zeros((10, 1, 6, 2))), TypeError, "A: expected dtype int64"),
        (dict(wa=np.ones((3, 10))), TypeError, "wa: expected dtype int64"),
        (dict(wa=np.ones((2, 10), dtype=np.int64)), ValueError, "wa: expected shape"),
        (dict(wa=np.full((3, 10), (1 << 62) + 1, dtype=np.int64)), ValueError, "wa: expected quantised weights"),
        (dict(ws=np.full((3, 10), -1, dtype=np.int64)), ValueError, "ws: expected quantised weights"),
        (dict(wpad=np.full(3, np.iinfo(np.int64).max)), ValueError, "wpad: expected quantised"),
        (dict(ws=np.ones((3, 9), dtype=np.int64)), ValueError, "ws: expected shape"),
        (dict(deltas=np.array([-(1 << 41), 0, 1], dtype=np.int64)), ValueError, "deltas"),
        (dict(wpad=np.ones(4, dtype=np.int64)), ValueError, "wpad"),
        (dict(load=np.full(10, -1, dtype=np.int64)), ValueError, "load: expected per-type counts"),
        (dict(load=np.ones(9, dtype=np.int64)), ValueError, "load: expected shape"),
        (dict(parts=np.zeros((1, 10, 1, 5, 2), dtype=np.int64)), ValueError, "parts: expected shape"),
        (dict(parts=np.zeros((10, 1, 6, 2), dtype=np.int64)), ValueError, "parts: expected 5-d"),
        (dict(parts=np.zeros((1, 10, 1, 6, 2), dtype=np.int32)), TypeError, "parts: expected dtype int64"),
    ]
    for change, exc, msg in bad:
        args = _raw_args()
        args.update(change)
        with pytest.raises(exc, match=msg):
            BC.count(**args)
    ro = _raw_args()
    ro["A"].setflags(write=False)
    with pytest.raises(ValueError, match="A: expected a writable buffer"):
        BC.count(**ro)
    ov = _raw_args()
    ov["parts"] = ov["A"][None]  # the copy is A itself: two threads would add to one element
    with pytest.raises(ValueError, match="parts: expected a buffer apart from A's"):
        BC.count(**ov)
    with pytest.raises(ValueError, match="parts: expected a buffer apart from A's"):
        BC.fold(ov["A"], ov["parts"])
    with pytest.raises(ValueError, match="parts: expected shape"):
        BC.fold(ov["A"], np.zeros((1, 10, 1, 5, 2), dtype=np.int64))
    # two copies at 3 threads: each thread a third of the positions; A + the copies after fold == the sums
    with cpu_threads(3):
        cp = _raw_args()
        cp["parts"] = np.zeros((2,) + cp["A"].shape, dtype=np.int64)
        BC.count(**cp)
        assert np.count_nonzero(cp["parts"]) > 0
        BC.fold(cp["A"], cp["parts"])
    assert np.count_nonzero(cp["parts"]) == 0 and np.array_equal(cp["A"], a["A"])
    a = _raw_args()
    a.update(ws=None)
    BC.count(**a)  # no noise: the q weights stay 0
    u = units(a["A"])
    assert u[..., :-1].sum() == 60 and u[..., -1].sum() == 0


@pytest.mark.parametrize("concat", [False, True])
def test_popcount_slots_any_load_same_sums(concat):
    """The kernel adds the first F entry slots of a context word branch-free (masked adds of 0 past its
    popcount) and loops over the rest, F chosen from `load` (the counts). Codes of popcount 0..8, loads
    that put F at 1, in between and at the largest popcount, and all-zero loads: the same sums as the
    reference every time, also at 2 threads."""
    from embkern.ops import bit_cipher as obc

    rng = np.random.default_rng(5)
    V, b, N, n_off = 40, 8, 3000, 5
    pcs = np.arange(V) % 9  # popcounts 0..8: word 0 has no bits (its slots add 0 to the pad entry)
    codes = [np.sort(rng.choice(b, size=k, replace=False)) for k in pcs]
    boff = np.concatenate([[0], np.cumsum(pcs)]).astype(np.int64)
    bidx = np.concatenate(codes).astype(np.int32)
    tok = rng.integers(0, V, N).astype(np.int32)
    doff = np.array([0, 1, 1, 700, N], dtype=np.int64)
    q62 = 1 << 62
    wa = rng.integers(q62 // 2, q62 + 1, (n_off, V)).astype(np.int64)  # near 1: the low words wrap
    ws = rng.integers(0, q62 + 1, (n_off, V)).astype(np.int64)
    wpad = rng.integers(0, q62 + 1, n_off).astype(np.int64)
    deltas = np.array([-2, -1, 0, 1, 3], dtype=np.int64)
    nb = n_off if concat else 1
    want = torch.zeros(V, nb, b + 2, 2, dtype=torch.int64)
    t = lambda x: torch.from_numpy(x)  # noqa: E731
    obc._ref_count(t(tok), t(doff), t(boff), t(bidx), t(wa), t(ws), t(wpad), t(deltas), None, want, None, concat)
    loads = {"popcount 1 only": np.where(pcs == 1, 100, 0), "uniform": np.ones(V), "popcount 8 only":
             np.where(pcs == 8, 100, 0), "skewed": 1000 // (1 + np.arange(V)), "zero": np.zeros(V)}
    for T in (1, 2):
        with cpu_threads(T):
            for name, load in loads.items():
                A = np.zeros((V, nb, b + 2, 2), dtype=np.int64)
                BC.count(tok, doff, boff, bidx, wa, ws, wpad, deltas, load.astype(np.int64), A, None, concat)
                assert torch.equal(torch.from_numpy(A), want), f"load {name}, {T} threads"


def test_sums_carry_into_the_high_word():
    """Addends of 2^62 quanta: four of them pass 2^64, so the high word must take the carries."""
    a = _raw_args(N=20)
    BC.count(**a)
    A = a["A"].view(np.uint64)
    got = [(int(h) << 64) | int(lo) for lo, h in A.reshape(-1, 2).tolist()]
    assert max(got) >= 1 << 64 and any(h > 0 for h in A[..., 1].ravel())
    # the same sums counted again: exactly twice each (integers, no rounding)
    BC.count(**{**a, "A": a["A"]})
    again = [(int(h) << 64) | int(lo) for lo, h in a["A"].view(np.uint64).reshape(-1, 2).tolist()]
    assert again == [2 * g for g in got]


def test_to_double_rounds_once_to_nearest_even():
    rng = np.random.default_rng(5)
    vals = [0, 1, (1 << 53) + 1, (1 << 53) + 3, (1 << 54) + 2, (1 << 64) - 1, 1 << 64, (1 << 64) + (1 << 11),
            (1 << 64) + (1 << 11) + 1, (1 << 64) + (3 << 11), (1 << 128) - 1, (1 << 117) + (1 << 64)]
    vals += [int(x) << int(s) for x, s in zip(rng.integers(1, 1 << 62, 300), rng.integers(0, 66, 300))]
    vals += [int(x) | (1 << 70) for x in rng.integers(0, 1 << 62, 100)]  # low bits below the mantissa
    A = np.array([[v & ((1 << 64) - 1), v >> 64] for v in vals], dtype=np.uint64).view(np.int64)
    out = np.empty(len(vals))
    BC.to_double(A, out)
    want = np.array([math.ldexp(float(v), -62) for v in vals])  # Python: int -> float rounds half to even
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(ref.to_double(A), want)
    with pytest.raises(ValueError, match="A: expected shape"):
        BC.to_double(np.zeros((3, 3), dtype=np.int64), np.empty(3))
    with pytest.raises(ValueError, match="out: expected shape"):
        BC.to_double(np.zeros((3, 2), dtype=np.int64), np.empty(4))
    with pytest.raises(TypeError, match="A: expected dtype int64"):
        BC.to_double(np.zeros((3, 2)), np.empty(3))


def test_raw_binding_random_inputs_never_crash():
    """Random shapes, dtypes, ranges and CSR structure: a ValueError / TypeError or a counted chunk."""
    rng = np.random.default_rng(123)
    dtypes = [np.int32, np.int64, np.float64, np.float32, np.uint8]
    ok = 0
    for trial in range(300):
        V = int(rng.integers(0, 6))
        b = int(rng.integers(0, 5))
        N = int(rng.integers(0, 12))
        n_off = int(rng.integers(0, 4))
        nb = n_off if rng.random() < 0.5 else 1

        def arr(shape, dtype, lo=-3, hi=8):
            if rng.random() < 0.08:
                dtype = dtypes[int(rng.integers(0, len(dtypes)))]
            if rng.random() < 0.08:
                shape = tuple(int(s) + int(rng.integers(-1, 2)) for s in shape)
                shape = tuple(max(s, 0) for s in shape)
            return rng.integers(lo, max(hi, lo + 1), size=shape).astype(dtype)

        bits_per = rng.integers(0, max(b, 1) + 1, size=V) if V else np.zeros(0, np.int64)
        boff = np.concatenate([[0], np.cumsum(bits_per)]).astype(np.int64)
        if rng.random() < 0.1 and boff.size > 1:
            boff[-1] += 1
        cuts = np.sort(rng.integers(0, N + 1, size=int(rng.integers(0, 4))))
        doff = np.concatenate([[0], cuts, [N]]).astype(np.int64)
        if rng.random() < 0.1:
            doff = doff[::-1].copy()
        args = dict(token_ids=arr((N,), np.int32, 0 if rng.random() < 0.8 else -2, V + (rng.random() < 0.2)),
                    doc_offsets=doff, bit_offsets=boff,
                    bit_index=arr((int(boff[-1]),), np.int32, 0, b + (rng.random() < 0.2)),
                    wa=arr((n_off, V), np.int64, 0, 1 << 62),
                    ws=arr((n_off, V), np.int64, 0, 1 << 62) if rng.random() < 0.5 else None,
                    wpad=arr((n_off,), np.int64, -1 if rng.random() < 0.1 else 0, 1 << 62),
                    deltas=arr((n_off,), np.int64, -20, 20), load=arr((V,), np.int64, 0, 9),
                    A=np.zeros((V, nb, b + 2, 2), dtype=np.int64), concat=bool(nb > 1 or rng.random() < 0.3),
                    parts=None if rng.random() < 0.5 else arr((int(rng.integers(0, 3)), V, nb, b + 2, 2), np.int64,
                                                             0, 1))
        try:
            BC.count(**args)
            ok += 1
        except (ValueError, TypeError):
            pass
    assert ok > 10  # some draws are valid and counted
