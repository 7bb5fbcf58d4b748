"""Triton hypercomplex kernels (on the GPU, or on the CPU under the interpreter (TRITON_INTERPRET=1 on CPU):
parity with the fp64 reference (2x rule) at odd shapes, both algebras, layouts
and scores, biases, CSR filters with duplicates and the target; fused rank /
top-k consistent with the Triton score matrix bit for bit; gradients.

Shapes stay tiny (B, N <= 64, K <= 28): the interpreter runs every program in Python.
"""

import importlib.util
import itertools

import pytest
import torch

import embkern
from embkern import testing
from embkern.ops import hypercomplex as ops
from embkern.reference import hypercomplex as ref
from helpers import filter_rows, kg_triples, to_csr

pytestmark = pytest.mark.triton

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

import embkern.triton_kernels.hypercomplex as tk  # noqa: E402  (a missing module is a failure, not a skip)


DEV = "cuda" if torch.cuda.is_available() else "cpu"
BE = "triton"
LOWP = [torch.bfloat16, torch.float16]


def data(B, N, d, dtype, seed):
    return kg_triples(B, N, d, dtype, seed, device=DEV)


def filters(B, N, g, t=None):
    """Per-row CSR lists with duplicates; some rows hold their target; row 2 filters a quarter of N."""
    return to_csr(filter_rows(B, N, g, max_per_row=4, dups="repeat", targets=t, dense_row=2), DEV)


def grads_check(fast, slow, args, dtype, seed):
    shape = tuple(fast(*args).shape)
    G = testing.randn(shape, dtype=torch.float64, seed=seed).to(device=DEV)
    testing.assert_grad_parity(fast, slow, args, grad_outputs=G)


# --------------------------------------------------------------------------- product


@pytest.mark.parametrize("alg,layout", list(itertools.product(["quaternion", "dihedron"], ["component", "interleaved"])))
def test_product_parity_and_grads(alg, layout):
    fn = embkern.hamilton_product if alg == "quaternion" else embkern.dihedron_product
    for (B, d), dtype, norm in zip([(1, 1), (3, 7), (37, 3)], [torch.float32, torch.bfloat16, torch.float16],
                                   [True, False, True]):
        h, r, *_ = data(B, 1, d, dtype, seed=B + d)
        fast = lambda h, r: fn(h, r, layout=layout, normalize=norm, backend=BE)  # noqa: E731
        slow = lambda h, r: ref.query(h, r, alg, layout, norm)  # noqa: E731
        testing.assert_parity(fast, slow, (h, r))
        grads_check(fast, slow, (h, r), dtype, seed=5)


def test_query_kernels_direct_fp32_grid():
    # every (algebra, layout, normalize) combination of the two elementwise kernels
    h, r, *_ = data(37, 1, 7, torch.float32, seed=9)
    g = testing.randn((37, 28), seed=10).to(DEV)
    for alg, lay, norm in itertools.product(["quaternion", "dihedron"], ["component", "interleaved"], [True, False]):
        testing.assert_parity(lambda h, r: tk.query_forward(h, r, alg, lay, norm),
                              lambda h, r: ref.query(h, r, alg, lay, norm), (h, r))
        testing.assert_parity(lambda g, h, r: tk.query_backward(g, h, r, alg, lay, norm),
                              lambda g, h, r: ref.query_backward(g, h, r, alg, lay, norm), (g, h, r))


# --------------------------------------------------------------------------- scores


@pytest.mark.parametrize("alg,score", [("quaternion", "inner"), ("dihedron", "distance"), ("quaternion", "distance")])
def test_score_all_parity_and_grads(alg, score):
    shapes = [(1, 1, 1), (3, 5, 7), (37, 33, 3)]
    for (B, N, d), layout, dtype in zip(shapes, ["component", "interleaved", "interleaved"],
                                        [torch.float32, torch.float32, torch.bfloat16]):
        h, r, E, bh, bt = data(B, N, d, dtype, seed=B + N)
        kw = dict(algebra=alg, score=score, layout=layout)
        if score == "distance":
            args = (h, r, E, bh, bt)
            fast = lambda h, r, E, bh, bt: embkern.score_all(h, r, E, bias_h=bh, bias_t=bt, backend=BE, **kw)  # noqa
            slow = lambda h, r, E, bh, bt: ref.score_all(h, r, E, bias_h=bh, bias_t=bt, **kw)  # noqa: E731
        else:
            args = (h, r, E)
            fast = lambda h, r, E: embkern.score_all(h, r, E, backend=BE, **kw)  # noqa: E731
            slow = lambda h, r, E: ref.score_all(h, r, E, **kw)  # noqa: E731
        testing.assert_parity(fast, slow, args)
        grads_check(fast, slow, args, dtype, seed=7)


@pytest.mark.parametrize("dtype", [torch.float32] + LOWP)
def test_score_forward_direct(dtype):
    h, r, E, bh, bt = data(19, 33, 5, dtype, seed=3)  # K = 20: a partial K block
    q = ref.query(h, r)
    testing.assert_parity(lambda q, E: tk.score_forward(q, E, None, None, "inner"),
                          lambda q, E: ref.scores(q, E, None, None, "inner"), (q, E))
    testing.assert_parity(lambda q, E, bh: tk.score_forward(q, E, bh, None, "distance"),
                          lambda q, E, bh: ref.scores(q, E, bh, None, "distance"), (q, E, bh))
    testing.assert_parity(lambda q, E, bt: tk.score_forward(q, E, None, bt, "distance"),
                          lambda q, E, bt: ref.scores(q, E, None, bt, "distance"), (q, E, bt))
    assert tk.score_forward(q[:0], E, None, None, "inner").shape == (0, 33)


# --------------------------------------------------------------------------- rank


@pytest.mark.parametrize("score", ["inner", "distance"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rank_matches_own_scores_with_ties_and_filters(score, dtype):
    B, N, d = 37, 33, 3
    g = torch.Generator().manual_seed(11)
    h, r, E, bh, bt = data(B, N, d, dtype, seed=3)
    E[20:24] = E[0]  # exact ties with entity 0, across two tiles
    if score == "distance":
        bt[20:24] = bt[0]
    t = torch.randint(0, N, (B,), generator=g).to(DEV)
    t[0], t[5] = 0, 21
    fo, fi = filters(B, N, g, t)
    kw = dict(score=score)
    if score == "distance":
        kw.update(bias_h=bh, bias_t=bt)
    s = embkern.score_all(h, r, E, backend=BE, **kw)
    for ties in ref.TIES:
        ranks = embkern.rank_all(h, r, E, t, filter_index=(fo, fi), ties=ties, backend=BE, **kw)
        assert ranks.dtype == torch.float64 and ranks.shape == (B,)
        assert torch.equal(ranks, ref.rank_from_scores(s, t, fo, fi, ties)), ties
        if dtype == torch.float32:  # and the reference's own fp32 scores (continuous data: no near-ties)
            expect = ref.rank_all(h, r, E, t, fo, fi, ties, **kw)
            assert torch.equal(ranks, expect), ties
    # unfiltered
    ranks = embkern.rank_all(h, r, E, t, backend=BE, **kw)
    assert torch.equal(ranks, ref.rank_from_scores(s, t, None, None, "realistic"))


def test_rank_odd_shapes_and_fp16():
    g = torch.Generator().manual_seed(5)
    for B, N, d in [(1, 1, 1), (3, 5, 7), (1, 33, 2)]:
        h, r, E, *_ = data(B, N, d, torch.float16, seed=B * N)
        t = torch.randint(0, N, (B,), generator=g).to(DEV)
        fo, fi = filters(B, N, g, t)
        s = embkern.score_all(h, r, E, backend=BE)
        ranks = embkern.rank_all(h, r, E, t, filter_index=(fo, fi), backend=BE)
        assert torch.equal(ranks, ref.rank_from_scores(s, t, fo, fi, "realistic"))
    # a CSR filter with no ids at all gives the unfiltered ranks
    empty = (torch.zeros(B + 1, dtype=torch.int64, device=DEV), torch.zeros(0, dtype=torch.int64, device=DEV))
    assert torch.equal(embkern.rank_all(h, r, E, t, filter_index=empty, backend=BE),
                       ref.rank_from_scores(s, t, None, None, "realistic"))
    assert tk.rank(h[:0], E, None, None, t[:0], None, None, "inner", "realistic").shape == (0,)


# --------------------------------------------------------------------------- top-k


@pytest.mark.parametrize("score", ["inner", "distance"])
@pytest.mark.parametrize("k", [1, 5, 16, 20])  # 20 > the interpreter's 16-wide tile: chunked fallback
def test_topk_matches_own_scores(score, k):
    B, N, d = 19, 61, 3  # 2 row blocks x 4 column tiles (the interpreter's bitonic sorts are slow)
    dtype = torch.float32 if k != 5 else torch.bfloat16
    h, r, E, bh, bt = data(B, N, d, dtype, seed=31)
    E[7] = E[3]  # a tie: 3 before 7
    E[40] = E[3]  # and one in another tile
    kw = dict(score=score)
    if score == "distance":
        bt[7] = bt[3]
        bt[40] = bt[3]
        kw.update(bias_h=bh, bias_t=bt)
    g = torch.Generator().manual_seed(1)
    fo, fi = filters(B, N, g)
    s = embkern.score_all(h, r, E, backend=BE, **kw)
    for f in [(fo, fi), None] if k == 5 else [(fo, fi)]:
        vals, idx = embkern.topk_all(h, r, E, k, filter_index=f, backend=BE, **kw)
        ev, ei = ref.topk_from_scores(s, k, *(f or (None, None)))
        assert torch.equal(idx, ei)
        assert torch.equal(vals, ev)


def test_topk_tie_order_and_odd_shapes():
    # all-equal scores: the answer is 0..k-1 minus the filtered ids
    q = torch.ones(3, 4, device=DEV)
    E = torch.ones(33, 4, device=DEV)
    fo = torch.tensor([0, 2, 2, 3], device=DEV)
    fi = torch.tensor([1, 1, 0], device=DEV)
    v, i = tk.topk(q, E, None, None, 4, fo, fi, "inner")
    assert i.tolist() == [[0, 2, 3, 4], [0, 1, 2, 3], [1, 2, 3, 4]]
    assert torch.equal(v, torch.full((3, 4), 4.0, device=DEV))
    for B, N, d, k in [(1, 1, 1, 1), (3, 5, 7, 5)]:
        h, r, E, *_ = data(B, N, d, torch.float32, seed=N)
        s = embkern.score_all(h, r, E, backend=BE)
        vals, idx = embkern.topk_all(h, r, E, k, backend=BE)
        ev, ei = ref.topk_from_scores(s, k)
        assert torch.equal(idx, ei) and torch.equal(vals, ev)
    v0, i0 = tk.topk(q, E, None, None, 0, None, None, "inner")
    assert v0.shape == (3, 0) and i0.shape == (3, 0)


# --------------------------------------------------------------------------- 1-N cross-entropy


def _ce_ref(alg, layout, score, t):
    def f(h, r, E, bh=None, bt=None):
        return ops._ref_ce_forward(ref.query(h, r, alg, layout, True), E, bh, bt, t, score)[0]
    return f


@pytest.mark.parametrize("alg,score,layout", [("quaternion", "inner", "component"),
                                              ("dihedron", "distance", "interleaved")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_to_n_loss_parity_and_grads(alg, score, layout, dtype):
    for B, N, d in [(37, 33, 3), (1, 1, 1)]:
        h, r, E, bh, bt = data(B, N, d, dtype, seed=41 + B)
        t = torch.randint(0, N, (B,), generator=torch.Generator().manual_seed(2)).to(DEV)
        args = (h, r, E, bh, bt) if score == "distance" else (h, r, E)

        def fast(h, r, E, bh=None, bt=None):
            return embkern.one_to_n_loss(h, r, E, t, algebra=alg, score=score, layout=layout, bias_h=bh, bias_t=bt,
                                         reduction="none", backend=BE)

        slow = _ce_ref(alg, layout, score, t)
        testing.assert_parity(fast, slow, args)
        assert fast(*args).dtype == torch.float32
        grads_check(fast, slow, args, dtype, seed=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ce_kernels_direct(dtype):
    # K = 28 > the 16-wide output K-chunk: two chunks, grad_bias outputs always returned
    B, N, d = 21, 35, 7
    h, r, E, bh, bt = data(B, N, d, dtype, seed=13)
    q = ref.query(h, r)
    t = torch.randint(0, N, (B,), generator=torch.Generator().manual_seed(4)).to(DEV)
    gl = testing.randn((B,), seed=6).to(DEV)
    for score, biases in [("inner", (None, None)), ("distance", (bh, bt)), ("distance", (None, bt))]:
        ce_kernels_parity(q, E, biases, t, gl, score)


def ce_kernels_parity(q, E, biases, t, gl, score):
    """tk.ce_forward and tk.ce_backward against the reference (the 2x rule); lse from fp64."""
    testing.assert_parity(lambda q, E: tk.ce_forward(q, E, *biases, t, score),
                          lambda q, E: ops._ref_ce_forward(q, E, *biases, t, score), (q, E))
    _, lse = ops._ref_ce_forward(q.double(), E.double(), *[None if b is None else b.double() for b in biases],
                                 t, score)
    testing.assert_parity(
        lambda q, E, gl, lse: tk.ce_backward(gl, q, E, *biases, t, lse, score),
        lambda q, E, gl, lse: ops._ref_ce_backward(gl, q, E, *biases, t, lse, score),
        (q, E, gl.float(), lse.float()))


# --------------------------------------------------------------------------- N splits


@pytest.mark.parametrize("programs", [4, 10 ** 6], ids=["uneven-splits", "one-tile-splits"])
def test_n_split_sweeps(monkeypatch, programs):
    """rank / topk / ce with the N tiles split between programs (the GPU shape at B = 128);
    the interpreter's 16-wide tiles never split by default, so force it. Ranks and top-k
    are integer or exact merges: they must equal the same backend's own score matrix."""
    monkeypatch.setattr(tk, "_MIN_SPLIT_TILES", 1)
    monkeypatch.setattr(tk, "_SPLIT_PROGRAMS", programs)
    B, N, d = 19, 70, 2  # 2 row blocks x 5 column tiles in the interpreter
    monkeypatch.setattr(tk, "_CE_CHUNK", 16 * N)  # ce_backward in row chunks of 16 (+ 3) in the interpreter
    c = tk._cfg(torch.empty(0, device=DEV))
    splits, tps = tk._n_split(-(-B // c["BB"]), -(-N // c["BN"]))
    assert splits > 1  # (the interpreter's uneven case: 2 splits of 3 + 2 tiles)
    g = torch.Generator().manual_seed(7)
    h, r, E, bh, bt = data(B, N, d, torch.float32, seed=17)
    E[50] = E[3]  # a tie across splits
    bt[50] = bt[3]
    t = torch.randint(0, N, (B,), generator=g).to(DEV)
    t[0] = 3
    fo, fi = filters(B, N, g, t)
    for score in ["inner", "distance"]:
        kw = dict(score=score, **(dict(bias_h=bh, bias_t=bt) if score == "distance" else {}))
        s = embkern.score_all(h, r, E, backend=BE, **kw)
        for ties in ref.TIES:
            ranks = embkern.rank_all(h, r, E, t, filter_index=(fo, fi), ties=ties, backend=BE, **kw)
            assert torch.equal(ranks, ref.rank_from_scores(s, t, fo, fi, ties)), (score, ties)
        vals, idx = embkern.topk_all(h, r, E, 6, filter_index=(fo, fi), backend=BE, **kw)
        ev, ei = ref.topk_from_scores(s, 6, fo, fi)
        assert torch.equal(idx, ei) and torch.equal(vals, ev), score
        q = ref.query(h, r)
        biases = (bh, bt) if score == "distance" else (None, None)
        ce_kernels_parity(q, E, biases, t, testing.randn((B,), seed=6).to(DEV), score)


def test_split_cursors_start_at_each_split():
    fo = torch.tensor([0, 5, 5, 8], device=DEV)
    fi = torch.tensor([1, 1, 17, 40, 63, 0, 16, 32], device=DEV)  # row 0, (row 1 empty), row 2; sorted per row
    cur = tk._split_cursors(fo, fi, True, 3, 64, 4, 16)
    # first id >= 16 * s in each row's slice
    assert cur.tolist() == [[0, 5, 5], [2, 5, 6], [3, 5, 7], [4, 5, 8]]


@pytest.mark.parametrize("programs", [4, 10 ** 6], ids=["uneven-splits", "one-tile-splits"])
def test_mm_strided_and_split(monkeypatch, programs):
    """ce_backward's fp32 product: strided (transposed) A, bf16 / fp32 B, reduction split."""
    monkeypatch.setattr(tk, "_MIN_SPLIT_TILES", 1)
    monkeypatch.setattr(tk, "_SPLIT_PROGRAMS", programs)
    a = testing.randn((70, 21), seed=1).to(DEV)
    for b in (testing.randn((70, 9), seed=2).to(DEV), testing.randn((70, 9), seed=3, dtype=torch.bfloat16).to(DEV)):
        for A, Bm in ((a.t(), b), (a.t().contiguous(), b)):
            want = A.double() @ Bm.double()
            got = tk._mm(A, Bm)
            assert got.dtype == torch.float32 and got.shape == (21, 9)
            # fp32 products and sums of 70 terms: well inside 70 ulp of the largest partial sum
            bound = 70 * torch.finfo(torch.float32).eps * (A.abs().double() @ Bm.abs().double())
            assert bool(((got.double() - want).abs() <= bound).all())
    assert tk._mm(a[:0], testing.randn((21, 4), seed=4).to(DEV)).shape == (0, 4)
