"""C++ CPU kernels of the hypercomplex op: the corners the main suite does not reach.

Shapes cross every blocking boundary of src/cpu/hypercomplex.cpp (64-row
query blocks, 16/8-lane query panels, 96-entity blocks, 6-entity micro-tiles,
up to 8 entity chunks) and K = 4d with d odd (vector tails of 4 and 12).
"""

import itertools

import numpy as np
import pytest
import torch

import embkern
from embkern import testing
from embkern.reference import hypercomplex as ref
from helpers import assert_same_bits, at_each, cpu_module, cpu_threads, filter_rows

C = cpu_module()
HC = C.hypercomplex

SHAPES = [(1, 1, 1), (3, 5, 3), (37, 1001, 25), (130, 301, 7)]
DTYPES = [torch.float32, torch.float64]


def data(B, N, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return mk(B, 4 * d), mk(B, 4 * d), mk(N, 4 * d), mk(B), mk(N)


def filters(B, N, g, with_dups=True):
    return filter_rows(B, N, g, max_per_row=6, dups="first" if with_dups else "none")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,d", SHAPES)
@pytest.mark.parametrize("score", ["inner", "distance"])
def test_fused_kernels_see_the_score_matrix(dtype, B, N, d, score):
    """rank/topk from the fused kernels == rank/topk of the cpu score matrix, bit for bit."""
    h, r, E, bh, bt = data(B, N, d, dtype, seed=B * N + d)
    E[N // 2] = E[0]  # an exact tie between entities 0 and N//2
    kw = dict(score=score, algebra="dihedron" if d % 2 else "quaternion")
    if score == "distance":
        bt[N // 2] = bt[0]
        kw.update(bias_h=bh, bias_t=bt)
    g = torch.Generator().manual_seed(5)
    t = torch.randint(0, N, (B,), generator=g)
    t[0] = 0
    filt = filters(B, N, g)
    filt[-1] = torch.cat([filt[-1], t[-1:]])  # the target inside its own (duplicated) filter
    S = embkern.score_all(h, r, E, backend="cpu", **kw)
    fo, fi = embkern._checks.filter_to_csr(filt, B, N, torch.device("cpu"))
    for ties in ("realistic", "optimistic", "pessimistic"):
        for f, (o, i) in ((None, (None, None)), (filt, (fo, fi))):
            got = embkern.rank_all(h, r, E, t, filter_index=f, ties=ties, backend="cpu", **kw)
            assert torch.equal(got, ref.rank_from_scores(S, t, o, i, ties))
    widest = int((fo[1:] - fo[:-1]).max())
    for k in sorted(k for k in {0, 1, min(N, 10), N - widest} if 0 <= k <= N - widest):
        v, i = embkern.topk_all(h, r, E, k, filter_index=filt, backend="cpu", **kw)
        ev, ei = ref.topk_from_scores(S, k, fo, fi)
        assert torch.equal(i, ei) and torch.equal(v, ev)
    # loss: the cpu kernel vs the logsumexp of the cpu score matrix
    loss = embkern.one_to_n_loss(h, r, E, t, backend="cpu", reduction="none", **kw)
    expect = ref.ce_from_scores(S.double(), t)
    tol = 64 * torch.finfo(dtype).eps * (1 + expect.abs())
    assert ((loss.double() - expect).abs() <= tol).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,d", [(37, 1001, 25), (130, 301, 7), (1, 5, 1)])
@pytest.mark.parametrize("alg,layout,score", [("quaternion", "component", "inner"),
                                              ("dihedron", "interleaved", "distance"),
                                              ("dihedron", "component", "inner"),
                                              ("quaternion", "interleaved", "distance")])
def test_loss_and_grads_parity(dtype, B, N, d, alg, layout, score):
    h, r, E, bh, bt = data(B, N, d, dtype, seed=d + 3)
    t = torch.randint(0, N, (B,), generator=torch.Generator().manual_seed(1))
    kw = dict(algebra=alg, layout=layout, score=score)
    use_b = score == "distance"

    def run(fn, xs):
        leaves = [x.detach().clone().requires_grad_(True) for x in xs]
        extra = dict(bias_h=leaves[3], bias_t=leaves[4]) if use_b else {}
        loss = fn(*leaves[:3], t, reduction="sum", **kw, **extra)
        loss.backward(torch.tensor(0.75, dtype=loss.dtype))
        return [loss.detach()] + [x.grad for x in leaves[: 5 if use_b else 3]]

    xs = (h, r, E, bh, bt)
    fast = run(lambda *a, **k: embkern.one_to_n_loss(*a, backend="cpu", **k), xs)
    same = run(ref.one_to_n_loss, xs)
    exact = run(ref.one_to_n_loss, [x.double() for x in xs])
    for name, f, s, e in zip(["loss", "h", "r", "E", "bh", "bt"], fast, same, exact):
        # fp64: the reference IS the fp64 reference (err_ref = 0), so the bound is
        # 64 ulp of the output scale; distance scores reach |S| ~ 200 at K = 100 and
        # exp(S - lse) carries eps*|S| of argument error into every gradient.
        ulps = 1024 if dtype == torch.float64 else None
        for rep in testing.compare(f, s, e, dtype, name, ulps=ulps):
            assert rep.ok, str(rep)


def test_ce_backward_bias_sums_for_inner_score():
    B, N, K = 9, 200, 12
    g = torch.Generator().manual_seed(2)
    q = torch.randn(B, K, generator=g, dtype=torch.float64)
    E = torch.randn(N, K, generator=g, dtype=torch.float64)
    t = torch.randint(0, N, (B,), generator=g)
    gl = torch.rand(B, generator=g, dtype=torch.float64)
    s = q @ E.T
    lse = torch.logsumexp(s, 1)
    G = torch.exp(s - lse[:, None])
    G[torch.arange(B), t] -= 1
    G *= gl[:, None]
    outs = [testing.poison(torch.empty(*sh, dtype=torch.float64)) for sh in ((B, K), (N, K), (B,), (N,))]
    HC.ce_backward(gl.numpy(), q.numpy(), E.numpy(), None, None, t.numpy(), lse.numpy(), *[o.numpy() for o in outs], 0)
    for got, want in zip(outs, (G @ E, G.T @ q, G.sum(1), G.sum(0))):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_thread_count_invariance_all_kernels(dtype):
    B, N, d = 130, 1100, 7  # 3 query blocks, 12 entity blocks -> 8 chunks
    h, r, E, bh, bt = data(B, N, d, dtype, seed=4)
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, N, (B,), generator=g)
    filt = filters(B, N, g)

    def results():
        res = []
        for score in ("inner", "distance"):
            kw = dict(score=score, algebra="dihedron", layout="interleaved")
            if score == "distance":
                kw.update(bias_h=bh, bias_t=bt)
            res.append(embkern.score_all(h, r, E, backend="cpu", **kw))
            res.append(embkern.rank_all(h, r, E, t, filter_index=filt, backend="cpu", **kw))
            res.extend(embkern.topk_all(h, r, E, 17, filter_index=filt, backend="cpu", **kw))
            leaves = [x.clone().requires_grad_(True) for x in (h, r, E, bh, bt)]
            extra = dict(bias_h=leaves[3], bias_t=leaves[4]) if score == "distance" else {}
            kw2 = {k: v for k, v in kw.items() if not k.startswith("bias")}
            loss = embkern.one_to_n_loss(*leaves[:3], t, backend="cpu", **kw2, **extra)
            loss.backward()
            res.append(loss.detach())
            res.extend(x.grad for x in leaves if x.grad is not None)
        return res

    assert_same_bits(at_each(cpu_threads, (1, 2, 3, 5), results))


@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_with_infinite_logits(dtype):
    """-inf scores drop out of the logsumexp; an all -inf row gives lse = -inf (torch.logsumexp)."""
    B, N, d = 3, 300, 2
    h, r, E, bh, bt = data(B, N, d, dtype, seed=8)
    bt[::2] = -float("inf")
    t = torch.tensor([1, 3, 5])
    kw = dict(score="distance", bias_h=bh, bias_t=bt)
    got = embkern.one_to_n_loss(h, r, E, t, backend="cpu", reduction="none", **kw)
    want = ref.one_to_n_loss(h.double(), r.double(), E.double(), t, reduction="none", score="distance",
                             bias_h=bh.double(), bias_t=bt.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=1e-4)
    q = ref.query(h, r).contiguous()
    loss, lse = np.empty(B, dtype=q.numpy().dtype), np.empty(B, dtype=q.numpy().dtype)
    HC.ce_forward(q.numpy(), E.numpy(), None, np.full(N, -np.inf, dtype=loss.dtype), t.numpy(), loss, lse, 1)
    assert np.all(np.isneginf(lse))


def test_large_logits_are_stable():
    B, N, K = 4, 500, 8
    q = torch.randn(B, K) * 30
    E = torch.randn(N, K) * 30
    t = torch.arange(B) * 7
    loss, lse = np.empty(B, np.float32), np.empty(B, np.float32)
    HC.ce_forward(q.numpy(), E.numpy(), None, None, t.numpy(), loss, lse, 0)
    s = q.double() @ E.double().T
    want = torch.logsumexp(s, 1)
    assert np.all(np.isfinite(lse))
    torch.testing.assert_close(torch.from_numpy(lse).double(), want, rtol=1e-5, atol=1e-2)


def test_empty_inputs():
    f = np.float32
    q0, E0 = np.zeros((0, 8), f), np.zeros((0, 8), f)
    E = np.random.randn(5, 8).astype(f)
    q = np.random.randn(2, 8).astype(f)
    HC.score_forward(q0, E, None, None, np.zeros((0, 5), f), 0)
    HC.score_forward(q, E0, None, None, np.zeros((2, 0), f), 1)
    HC.rank(q0, E, None, None, np.zeros(0, np.int64), None, None, np.zeros(0), 0, 0)
    HC.topk(q, E, None, None, None, None, np.zeros((2, 0), f), np.zeros((2, 0), np.int64), 0)
    HC.ce_forward(q0, E, None, None, np.zeros(0, np.int64), np.zeros(0, f), np.zeros(0, f), 0)
    gE = np.full((5, 8), np.nan, f)
    gbt = np.full(5, np.nan, f)
    HC.ce_backward(np.zeros(0, f), q0, E, None, None, np.zeros(0, np.int64), np.zeros(0, f), np.zeros((0, 8), f), gE,
                   np.zeros(0, f), gbt, 0)
    assert np.all(gE == 0) and np.all(gbt == 0)


def _args():
    f = np.float32
    q = np.random.randn(3, 8).astype(f)
    E = np.random.randn(5, 8).astype(f)
    return f, q, E


@pytest.mark.parametrize("case,exc,match", [
    ("q_width", ValueError, "q: expected last dimension 4"),
    ("E_dtype", TypeError, "E: expected dtype float32"),
    ("not_array", TypeError, "E: expected"),
    ("bias_inner", ValueError, "bias_h"),
    ("bias_shape", ValueError, "bias_t: expected shape"),
    ("score_enum", ValueError, "score"),
    ("ties_enum", ValueError, "ties"),
    ("target_range", ValueError, "targets"),
    ("target_dtype", TypeError, "targets"),
    ("fo_start", ValueError, "filter_offsets"),
    ("fo_end", ValueError, "filter_offsets"),
    ("fi_range", ValueError, "filter_index"),
    ("fo_without_fi", ValueError, "filter_offsets / filter_index"),
    ("k_too_big", ValueError, "k = values_out"),
    ("k_filtered", ValueError, "k = values_out"),
    ("idx_shape", ValueError, "indices_out"),
    ("grad_E_shape", ValueError, "grad_E_out"),
    ("readonly_out", ValueError, ""),
    ("algebra_enum", ValueError, "algebra"),
    ("layout_enum", ValueError, "layout"),
])
def test_boundary_errors(case, exc, match):
    f, q, E = _args()
    t = np.array([0, 1, 4], np.int64)
    S = np.empty((3, 5), f)
    ranks = np.empty(3)
    if case == "readonly_out":
        S.setflags(write=False)
        with pytest.raises((ValueError, BufferError)):
            HC.score_forward(q, E, None, None, S, 0)
        return
    calls = {
        "q_width": lambda: HC.score_forward(q[:, :6].copy(), E[:, :6].copy(), None, None, S, 0),
        "E_dtype": lambda: HC.score_forward(q, E.astype(np.float64), None, None, S, 0),
        "not_array": lambda: HC.score_forward(q, "E", None, None, S, 0),
        "bias_inner": lambda: HC.score_forward(q, E, np.zeros(3, f), None, S, 0),
        "bias_shape": lambda: HC.score_forward(q, E, None, np.zeros(4, f), S, 1),
        "score_enum": lambda: HC.score_forward(q, E, None, None, S, 2),
        "ties_enum": lambda: HC.rank(q, E, None, None, t, None, None, ranks, 0, 3),
        "target_range": lambda: HC.rank(q, E, None, None, np.array([0, -1, 2], np.int64), None, None, ranks, 0, 0),
        "target_dtype": lambda: HC.rank(q, E, None, None, t.astype(np.int32), None, None, ranks, 0, 0),
        "fo_start": lambda: HC.rank(q, E, None, None, t, np.array([1, 1, 1, 1], np.int64), np.zeros(1, np.int64),
                                    ranks, 0, 0),
        "fo_end": lambda: HC.rank(q, E, None, None, t, np.array([0, 1, 1, 1], np.int64), np.zeros(2, np.int64),
                                  ranks, 0, 0),
        "fi_range": lambda: HC.rank(q, E, None, None, t, np.array([0, 1, 1, 1], np.int64), np.array([5], np.int64),
                                    ranks, 0, 0),
        "fo_without_fi": lambda: HC.rank(q, E, None, None, t, np.array([0, 0, 0, 0], np.int64), None, ranks, 0, 0),
        "k_too_big": lambda: HC.topk(q, E, None, None, None, None, np.empty((3, 6), f), np.empty((3, 6), np.int64), 0),
        "k_filtered": lambda: HC.topk(q, E, None, None, np.array([0, 2, 2, 2], np.int64), np.array([0, 1], np.int64),
                                      np.empty((3, 4), f), np.empty((3, 4), np.int64), 0),
        "idx_shape": lambda: HC.topk(q, E, None, None, None, None, np.empty((3, 2), f), np.empty((3, 3), np.int64), 0),
        "grad_E_shape": lambda: HC.ce_backward(np.ones(3, f), q, E, None, None, t, np.zeros(3, f), np.empty((3, 8), f),
                                               np.empty((4, 8), f), np.empty(3, f), np.empty(5, f), 0),
        "algebra_enum": lambda: HC.query_forward(q, q, np.empty_like(q), 2, 0, True),
        "layout_enum": lambda: HC.query_forward(q, q, np.empty_like(q), 0, -1, True),
    }
    with pytest.raises(exc, match=match):
        calls[case]()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alg,layout,normalize", list(itertools.product(("quaternion", "dihedron"),
                                                                         ("component", "interleaved"),
                                                                         (True, False))))
def test_query_kernels(dtype, alg, layout, normalize):
    B, d = 11, 13
    h, r, _, _, _ = data(B, 1, d, dtype, seed=7)
    qf = embkern.hamilton_product if alg == "quaternion" else embkern.dihedron_product
    got = qf(h, r, layout=layout, normalize=normalize, backend="cpu")
    assert torch.equal(got, ref.query(h, r, alg, layout, normalize))  # same ops, same order, no FMA
    g = torch.randn(B, 4 * d, dtype=dtype)
    out = [np.empty((B, 4 * d), h.numpy().dtype) for _ in range(2)]
    HC.query_backward(g.numpy(), h.numpy(), r.numpy(), *out, ("quaternion", "dihedron").index(alg),
                      ("component", "interleaved").index(layout), normalize)
    want = ref.query_backward(g.double(), h.double(), r.double(), alg, layout, normalize)
    for o, w in zip(out, want):
        torch.testing.assert_close(torch.from_numpy(o).double(), w, rtol=1e-4 if dtype == torch.float32 else 1e-12,
                                   atol=1e-4 if dtype == torch.float32 else 1e-12)


# ---------------------------------------------------------------------------
# Memory: per-thread scratch is allocated before the parallel regions, so an
# allocation failure is a MemoryError naming the size, never std::terminate.
# In a child process under an address-space limit (an abort there fails the
# test with its input, the suite runs on).

_OOM_CHILD = r"""
import resource
import numpy as np, embkern
HC = embkern._backends.cpu_module().hypercomplex

def vm():
    return int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()

rng = np.random.default_rng(0)
N, K = 1 << 21, 4                       # 32 MB of entities; top-k of all of them
E = rng.standard_normal((N, K)).astype(np.float32)
q = rng.standard_normal((1, K)).astype(np.float32)
vals, idx = np.empty((1, N), np.float32), np.empty((1, N), np.int64)
HC.topk(q, E[:4096], None, None, None, None, np.empty((1, 8), np.float32), np.empty((1, 8), np.int64), 0)  # warm pool
top = np.argsort(-(E @ q[0]), kind="stable")[:5]
outcomes = []
for extra_mb in (40, 60, 100, 160, 400, 1200):  # old code: 60 and 100 aborted
    resource.setrlimit(resource.RLIMIT_AS, (vm() + (extra_mb << 20), resource.RLIM_INFINITY))
    try:
        HC.topk(q, E, None, None, None, None, vals, idx, 0)
        outcome = "ok"
    except MemoryError as e:
        outcome = "MemoryError"
        assert "GB" in str(e) and "topk" in str(e), str(e)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    if outcome == "ok":
        assert (np.diff(vals[0]) <= 0).all() and (idx[0, :5] == top).all()
    outcomes.append((extra_mb, outcome))
print("OUTCOMES", outcomes)
"""


@pytest.mark.address_space
def test_topk_scratch_under_address_space_limit_is_memory_error_not_abort():
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-c", _OOM_CHILD], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (f"child died (rc {p.returncode}) on:\n{_OOM_CHILD}\n"
                               f"--- stdout\n{p.stdout[-2000:]}\n--- stderr\n{p.stderr[-2000:]}")
    out = p.stdout
    assert "OUTCOMES" in out, out
    # the tightest limit cannot hold the heaps (48 MB) and candidates: refused up front
    assert "(40, 'MemoryError')" in out, out
