"""hypercomplex: parity of every backend with the fp64 reference, gradients,
fused rank/top-k/loss consistency, opcheck, torch.compile, bad input, and
thread-count invariance."""

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import embkern
from torch.utils._pytree import tree_map
from embkern import testing
from embkern.ops import hypercomplex as ops
from embkern.reference import hypercomplex as ref
from helpers import (assert_same_bits, at_each, backend_params, cpu_threads, device_of, filter_rows, kg_triples,
                     leaf, require_backend)

FAST = backend_params("reference", "cpu", "triton")
ALGS = ["quaternion", "dihedron"]
LAYS = ["component", "interleaved"]


def dtypes_for(backend):
    if backend == "cpu":
        return [torch.float32, torch.float64]
    if backend == "triton":
        return [torch.float32, torch.bfloat16]
    return [torch.float32, torch.float64, torch.bfloat16]


def need(backend, kernel, dtype=torch.float32):
    require_backend(ops.DESCRIPTOR, kernel, backend, device_of(backend), dtype)


class api:
    """``api(backend).score_all(...)``: the embkern function with every tensor argument
    (lists too) moved to the backend's device and every tensor result moved back to
    the CPU, so one test body checks CPU and GPU backends against the CPU reference.
    The moves are differentiable: gradients land on the CPU leaves."""

    def __init__(self, backend):
        self.device = device_of(backend)

    def __getattr__(self, name):
        fn = getattr(embkern, name)
        if self.device == "cpu":
            return fn
        to_dev = lambda x: x.to(self.device) if isinstance(x, torch.Tensor) else x  # noqa: E731
        to_cpu = lambda x: x.cpu() if isinstance(x, torch.Tensor) else x  # noqa: E731

        def call(*args, **kwargs):
            args, kwargs = tree_map(to_dev, (args, kwargs))
            return tree_map(to_cpu, fn(*args, **kwargs))

        return call


def triples(B, N, d, dtype, seed):
    return kg_triples(B, N, d, dtype, seed)


# --------------------------------------------------------------------------- algebra facts


def test_structure_constants_match_spec_tables():
    # i*j = k, j*k = i, k*i = j in both algebras up to the signs of docs/ops/hypercomplex.md, "Algebras"
    for alg, fn in (("quaternion", ref.hamilton), ("dihedron", ref.dihedron)):
        T = ref.structure(alg)
        e = torch.eye(4, dtype=torch.float64)
        for i, j in itertools.product(range(4), range(4)):
            assert torch.equal(T[:, i, j], torch.stack(fn(tuple(e[i]), tuple(e[j]))))
    # quaternion: i^2 = j^2 = k^2 = -1 ; dihedron: i^2 = -1, j^2 = k^2 = +1
    Tq, Td = ref.structure("quaternion"), ref.structure("dihedron")
    assert [Tq[0, n, n].item() for n in (1, 2, 3)] == [-1.0, -1.0, -1.0]
    assert [Td[0, n, n].item() for n in (1, 2, 3)] == [-1.0, 1.0, 1.0]
    assert Td[3, 1, 2] == 1 and Td[3, 2, 1] == -1  # ij = k = -ji


@pytest.mark.parametrize("alg", ALGS)
def test_reference_associative_and_norm(alg):
    a, b, c = testing.randn((7, 12), (7, 12), (7, 12), dtype=torch.float64, seed=3)
    lhs = ref.product(ref.product(a, b, alg), c, alg)
    rhs = ref.product(a, ref.product(b, c, alg), alg)
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)
    if alg == "quaternion":  # a unit relation preserves length per coordinate
        rh = ref.normalize_relation(b)
        q = ref.product(a, rh)
        na = torch.stack(ref.split(a)).pow(2).sum(0)
        nq = torch.stack(ref.split(q)).pow(2).sum(0)
        torch.testing.assert_close(na, nq, rtol=1e-12, atol=1e-12)


def test_layout_roundtrip():
    x = testing.randn((3, 20), seed=1)
    y = ref.to_layout(x, "component", "interleaved")
    assert y[0, 0] == x[0, 0] and y[0, 1] == x[0, 5] and y[0, 4] == x[0, 1]
    assert torch.equal(ref.to_layout(y, "interleaved", "component"), x)


# --------------------------------------------------------------------------- products


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("alg", ALGS)
@pytest.mark.parametrize("layout", LAYS)
def test_product_parity_and_grad(backend, alg, layout):
    for dtype in dtypes_for(backend):
        need(backend, "query_forward", dtype)
        need(backend, "query_backward", dtype)
        for shape, normalize in (((5, 12), False), ((2, 3, 28), True), ((1, 4), True)):
            h, r = testing.randn(shape, shape, dtype=dtype, seed=shape[-1])
            fn = api(backend).hamilton_product if alg == "quaternion" else api(backend).dihedron_product
            testing.assert_parity(lambda a, b: fn(a, b, layout=layout, normalize=normalize, backend=backend),
                                  lambda a, b: ref.query(a, b, alg, layout, normalize), (h, r))
            # gradients against autograd through the reference (fp64)
            testing.assert_grad_parity(lambda a, b: fn(a, b, layout=layout, normalize=normalize, backend=backend),
                                       lambda a, b: ref.query(a, b, alg, layout, normalize), (h, r),
                                       grad_outputs=testing.randn(shape, dtype=dtype, seed=99))


def test_product_broadcast_and_noncontiguous():
    h = testing.noncontiguous(testing.randn((6, 8), seed=1))
    r = testing.randn((8,), seed=2)
    out = embkern.hamilton_product(h, r)
    torch.testing.assert_close(out, ref.product(h.contiguous(), r.expand(6, 8)), rtol=0, atol=0)


# --------------------------------------------------------------------------- 1-vs-all scores


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("alg,score", [("quaternion", "inner"), ("dihedron", "distance"),
                                       ("quaternion", "distance"), ("dihedron", "inner")])
def test_score_all_parity_and_grads(backend, alg, score):
    shapes = [(3, 37, 5), (1, 1, 1), (8, 19, 3)] if backend == "triton" else [(3, 37, 5), (1, 1, 1), (37, 1001, 25)]
    for dtype in dtypes_for(backend):
        need(backend, "score_forward", dtype)
        for (B, N, d), layout in zip(shapes, itertools.cycle(LAYS)):
            h, r, E, bh, bt = triples(B, N, d, dtype, seed=B + N)
            kw = dict(algebra=alg, score=score, layout=layout)
            if score == "distance":
                args = (h, r, E, bh, bt)
                fast = lambda h, r, E, bh, bt: api(backend).score_all(h, r, E, bias_h=bh, bias_t=bt, backend=backend, **kw)  # noqa: E731
                slow = lambda h, r, E, bh, bt: ref.score_all(h, r, E, bias_h=bh, bias_t=bt, **kw)  # noqa: E731
            else:
                args = (h, r, E)
                fast = lambda h, r, E: api(backend).score_all(h, r, E, backend=backend, **kw)  # noqa: E731
                slow = lambda h, r, E: ref.score_all(h, r, E, **kw)  # noqa: E731
            testing.assert_parity(fast, slow, args)

            # gradients of h, r, E (and biases) vs autograd through the reference
            testing.assert_grad_parity(fast, slow, args, grad_outputs=testing.randn((B, N), dtype=dtype, seed=7))


@pytest.mark.parametrize("backend", FAST)
def test_score_all_without_normalisation_and_noncontiguous(backend):
    need(backend, "score_forward")
    h, r, E, _, _ = triples(4, 9, 2, torch.float32, seed=5)
    dev = device_of(backend)  # strided views made on the device itself (a .to() would make them contiguous)
    hv, Ev = testing.noncontiguous(h.to(dev)), testing.noncontiguous(E.to(dev))
    assert not hv.is_contiguous() and not Ev.is_contiguous()
    out = embkern.score_all(hv, r.to(dev), Ev, normalize_relation=False, backend=backend).cpu()
    testing.assert_parity(lambda *a: out, lambda h, r, E: ref.score_all(h, r, E, normalize_relation=False), (h, r, E))


# --------------------------------------------------------------------------- fused rank / top-k / loss


def _filters(B, N, g):
    # a few known tails per row, each twice
    return filter_rows(B, N, g, max_per_row=3, dups="repeat")


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("score", ["inner", "distance"])
@pytest.mark.parametrize("ties", ["realistic", "optimistic", "pessimistic"])
def test_rank_all_matches_its_own_scores(backend, score, ties):
    need(backend, "rank")
    B, N, d = (5, 33, 3) if backend == "triton" else (37, 1001, 25)
    g = torch.Generator().manual_seed(11)
    h, r, E, bh, bt = triples(B, N, d, torch.float32, seed=3)
    E[N // 2:N // 2 + 4] = E[0]  # exact ties with entity 0
    t = torch.randint(0, N, (B,), generator=g)
    t[0] = 0
    filt = _filters(B, N, g)
    filt[1] = torch.cat([filt[1], t[1:2]])  # the target inside its own filter list
    kw = dict(score=score)
    if score == "distance":
        kw.update(bias_h=bh, bias_t=bt)
    ranks = api(backend).rank_all(h, r, E, t, filter_index=filt, ties=ties, backend=backend, **kw)
    s = api(backend).score_all(h, r, E, backend=backend, **kw)
    fo, fi = embkern._checks.filter_to_csr(filt, B, N, torch.device("cpu"))
    expect = ref.rank_from_scores(s, t, fo, fi, ties)
    assert ranks.dtype == torch.float64
    torch.testing.assert_close(ranks, expect, rtol=0, atol=0)
    # and the CSR form gives the same answer as the list form
    ranks2 = api(backend).rank_all(h, r, E, t, filter_index=(fo, fi), ties=ties, backend=backend, **kw)
    assert torch.equal(ranks, ranks2)


@pytest.mark.parametrize("backend", FAST)
def test_rank_all_against_fp64_reference(backend):
    need(backend, "rank")
    B, N, d = (6, 40, 4) if backend == "triton" else (20, 500, 10)
    h, r, E, _, _ = triples(B, N, d, torch.float32, seed=21)
    t = torch.arange(B) * 3
    fast = api(backend).rank_all(h, r, E, t, backend=backend)
    exact = ref.rank_all(h.double(), r.double(), E.double(), t)
    # random continuous scores: only near-ties could differ; allow none here
    assert torch.equal(fast, exact)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("score", ["inner", "distance"])
def test_topk_all(backend, score):
    need(backend, "topk")
    B, N, d, k = (4, 40, 3, 5) if backend == "triton" else (13, 700, 9, 10)
    h, r, E, bh, bt = triples(B, N, d, torch.float32, seed=31)
    E[7] = E[3]  # a tie: index 3 must come before 7
    kw = dict(score=score)
    if score == "distance":
        kw.update(bias_h=bh, bias_t=bt[:N].clone())
        kw["bias_t"][7] = kw["bias_t"][3]
    g = torch.Generator().manual_seed(1)
    filt = _filters(B, N, g)
    vals, idx = api(backend).topk_all(h, r, E, k, filter_index=filt, backend=backend, **kw)
    s = api(backend).score_all(h, r, E, backend=backend, **kw)
    fo, fi = embkern._checks.filter_to_csr(filt, B, N, torch.device("cpu"))
    ev, ei = ref.topk_from_scores(s, k, fo, fi)
    assert torch.equal(idx, ei)
    assert torch.equal(vals, ev)
    v0, i0 = api(backend).topk_all(h, r, E, 0, backend=backend, **kw)
    assert v0.shape == (B, 0) and i0.shape == (B, 0)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("alg,score", [("quaternion", "inner"), ("dihedron", "distance")])
def test_one_to_n_loss_parity_and_grads(backend, alg, score):
    B, N, d = (5, 37, 3) if backend == "triton" else (17, 503, 7)
    for dtype in dtypes_for(backend):
        need(backend, "ce_forward", dtype)
        need(backend, "ce_backward", dtype)
        h, r, E, bh, bt = triples(B, N, d, dtype, seed=41)
        t = torch.randint(0, N, (B,), generator=torch.Generator().manual_seed(2))
        biased = score == "distance"
        args = (h, r, E, bh, bt) if biased else (h, r, E)

        def run(fn, *a, **extra):
            kw = dict(algebra=alg, score=score, reduction="none", **extra)
            if biased:
                return fn(a[0], a[1], a[2], t, bias_h=a[3], bias_t=a[4], **kw)
            return fn(a[0], a[1], a[2], t, **kw)

        fast = lambda *a: run(api(backend).one_to_n_loss, *a, backend=backend)  # noqa: E731
        slow = lambda *a: run(ref.one_to_n_loss, *a)  # noqa: E731
        testing.assert_parity(fast, slow, args)
        g = torch.rand(B, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        testing.assert_grad_parity(fast, slow, args, grad_outputs=g)


def test_one_to_n_loss_reductions_and_large_logits():
    h, r, E, _, _ = triples(6, 50, 4, torch.float32, seed=8)
    t = torch.arange(6)
    none = embkern.one_to_n_loss(h * 30, r, E * 30, t, reduction="none")  # logits ~ 1e3: needs the max shift
    assert torch.isfinite(none).all()
    torch.testing.assert_close(embkern.one_to_n_loss(h * 30, r, E * 30, t), none.mean())
    torch.testing.assert_close(embkern.one_to_n_loss(h * 30, r, E * 30, t, reduction="sum"), none.sum())


# --------------------------------------------------------------------------- torch.library integration


def _op_samples(backend):
    h, r, E, bh, bt = triples(3, 11, 2, torch.float32, seed=4)
    t = torch.tensor([0, 5, 10])
    fo = torch.tensor([0, 1, 1, 3])
    fi = torch.tensor([2, 5, 1])
    q = ref.query(h, r)
    return [
        (ops.hc_query, (h.requires_grad_(), r.requires_grad_(), "quaternion", "component", True, backend)),
        (ops.hc_query, (h.detach(), r.detach(), "dihedron", "interleaved", False, backend)),
        (ops.hc_score, (q.detach().requires_grad_(), E.requires_grad_(), None, None, "inner", backend)),
        (ops.hc_score, (q.detach().requires_grad_(), E.detach().requires_grad_(), bh.requires_grad_(),
                        bt.requires_grad_(), "distance", backend)),
        (ops.hc_rank, (q.detach(), E.detach(), None, None, t, fo, fi, "inner", "realistic", backend)),
        (ops.hc_topk, (q.detach(), E.detach(), None, None, 4, fo, fi, "inner", backend)),
        (ops.hc_ce, (q.detach().requires_grad_(), E.detach().requires_grad_(), None, None, t, "inner", backend)),
    ]


@pytest.mark.parametrize("backend", backend_params("reference", "cpu"))
def test_opcheck(backend):
    need(backend, "score_forward")
    for op, args in _op_samples(backend):
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    h, r, E, _, _ = triples(4, 21, 3, torch.float32, seed=6)
    t = torch.tensor([1, 2, 3, 4])

    def f(h, r, E):
        s = embkern.score_all(h, r, E)
        return s.logsumexp(1).sum() + embkern.one_to_n_loss(h, r, E, t)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [leaf(x) for x in (h, r, E)]
    out = compiled(*leaves)
    out.backward()
    eager = [leaf(x) for x in (h, r, E)]
    f(*eager).backward()
    torch.testing.assert_close(out, f(h, r, E))
    for a, b in zip(leaves, eager):
        torch.testing.assert_close(a.grad, b.grad)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("call,exc,match", [
    (lambda h, r, E, t: embkern.score_all(h[:, :7], r[:, :7], E[:, :7]), ValueError, "h: expected last dimension 4"),
    (lambda h, r, E, t: embkern.score_all(h, r[:2], E), ValueError, "r: expected shape"),
    (lambda h, r, E, t: embkern.score_all(h, r, E[:, :4]), ValueError, "entities: expected shape"),
    (lambda h, r, E, t: embkern.score_all(h, r.double(), E), TypeError, "r: expected dtype float32"),
    (lambda h, r, E, t: embkern.score_all(h, r, E.long()), TypeError, "entities: expected a floating"),
    (lambda h, r, E, t: embkern.score_all(h, r, E, algebra="octonion"), ValueError, "algebra: expected one of"),
    (lambda h, r, E, t: embkern.score_all(h, r, E, layout="rows"), ValueError, "layout: expected one of"),
    (lambda h, r, E, t: embkern.score_all(h, r, E, bias_h=torch.zeros(3)), ValueError, "bias_h: biases apply"),
    (lambda h, r, E, t: embkern.score_all(h, r, E, score="distance", bias_t=torch.zeros(3)), ValueError, "bias_t: expected shape"),
    (lambda h, r, E, t: embkern.score_all(h, r, E, backend="gpu"), ValueError, "backend: expected None or one of"),
    (lambda h, r, E, t: embkern.score_all(h, r, E, backend="cuda"), RuntimeError, "backend='cuda' is unavailable"),
    (lambda h, r, E, t: embkern.score_all(h.numpy(), r, E), TypeError, "h: expected a torch.Tensor"),
    (lambda h, r, E, t: embkern.rank_all(h, r, E, t + 100), ValueError, r"targets: expected indices in \[0, 10\)"),
    (lambda h, r, E, t: embkern.rank_all(h, r, E, -t - 1), ValueError, "targets: expected indices"),
    (lambda h, r, E, t: embkern.rank_all(h, r, E, t.float()), TypeError, "targets: expected an integer"),
    (lambda h, r, E, t: embkern.rank_all(h, r, E, t[:2]), ValueError, "targets: expected shape"),
    (lambda h, r, E, t: embkern.rank_all(h, r, E, t, ties="average"), ValueError, "ties: expected one of"),
    (lambda h, r, E, t: embkern.rank_all(h, r, E, t, filter_index=(torch.tensor([0, 2, 1, 3]), torch.tensor([1, 2, 3]))),
     ValueError, "non-decreasing"),
    (lambda h, r, E, t: embkern.rank_all(h, r, E, t, filter_index=(torch.tensor([0, 1, 2, 5]), torch.tensor([1, 2, 3]))),
     ValueError, r"offsets\[-1\] == len\(index\)"),
    (lambda h, r, E, t: embkern.rank_all(h, r, E, t, filter_index=(torch.tensor([1, 1, 2, 3]), torch.tensor([1, 2, 3]))),
     ValueError, r"offsets\[0\] == 0"),
    (lambda h, r, E, t: embkern.rank_all(h, r, E, t, filter_index=[[1], [2, 99], []]), ValueError, r"indices in \[0, 10\)"),
    (lambda h, r, E, t: embkern.rank_all(h, r, E, t, filter_index=[[1]]), ValueError, "expected 3 per-row lists"),
    (lambda h, r, E, t: embkern.topk_all(h, r, E, 11), ValueError, "k: expected 0 <= k <= 10"),
    (lambda h, r, E, t: embkern.topk_all(h, r, E, 2.0), TypeError, "k: expected an int"),
    (lambda h, r, E, t: embkern.one_to_n_loss(h, r, E, t, reduction="avg"), ValueError, "reduction: expected"),
    (lambda h, r, E, t: embkern.one_to_n_loss(h, r, E[:0], t), ValueError, "at least one entity"),
])
def test_bad_input(call, exc, match):
    h, r, E, _, _ = triples(3, 10, 2, torch.float32, seed=1)
    t = torch.tensor([0, 4, 9])
    with pytest.raises(exc, match=match):
        call(h, r, E, t)


def test_cpu_boundary_rechecks():
    """The C++ boundary raises on bad buffers even when the Python checks are bypassed."""
    need("cpu", "score_forward")
    C = embkern._backends.cpu_module().hypercomplex
    q = torch.randn(3, 8).numpy()
    E = torch.randn(5, 8).numpy()
    S = torch.empty(3, 5).numpy()
    with pytest.raises(ValueError):
        C.score_forward(q, E[:, :4].copy(), None, None, S, 0)
    with pytest.raises(ValueError):
        C.score_forward(q, E, None, None, torch.empty(3, 4).numpy(), 0)
    with pytest.raises((ValueError, TypeError)):
        C.score_forward(q, E, None, None, S, 7)
    with pytest.raises(TypeError):
        C.score_forward(q.astype("float64"), E, None, None, S, 0)
    with pytest.raises(ValueError):
        C.score_forward(torch.randn(8, 6).numpy()[:, ::2], E[:, :3].copy(), None, None, S, 0)
    ranks = torch.empty(3, dtype=torch.float64).numpy()
    with pytest.raises(ValueError):
        C.rank(q, E, None, None, torch.tensor([0, 1, 5]).numpy(), None, None, ranks, 0, 0)
    with pytest.raises(ValueError):
        C.rank(q, E, None, None, torch.tensor([0, 1, 2]).numpy(), torch.tensor([0, 2, 1, 1]).numpy(),
               torch.tensor([0]).numpy(), ranks, 0, 0)


def test_cpu_writes_every_output_element():
    need("cpu", "score_forward")
    C = embkern._backends.cpu_module().hypercomplex
    h, r, E, bh, bt = triples(7, 45, 3, torch.float32, seed=2)
    q = ref.query(h, r)
    for score in (0, 1):
        S = testing.poison(torch.empty(7, 45))
        C.score_forward(q.numpy(), E.numpy(), bh.numpy() if score else None, bt.numpy() if score else None,
                        S.numpy(), score)
        assert torch.isfinite(S).all()


@pytest.mark.parametrize("backend", backend_params("reference", "cpu"))
def test_empty_batch(backend):
    need(backend, "score_forward")
    h, r, E, _, _ = triples(0, 10, 2, torch.float32, seed=1)
    assert api(backend).score_all(h, r, E, backend=backend).shape == (0, 10)
    assert api(backend).rank_all(h, r, E, torch.zeros(0, dtype=torch.long), backend=backend).shape == (0,)
    v, i = api(backend).topk_all(h, r, E, 3, backend=backend)
    assert v.shape == (0, 3) and i.shape == (0, 3)
    h, r, E, _, _ = triples(2, 0, 2, torch.float32, seed=1)
    assert api(backend).score_all(h, r, E, backend=backend).shape == (2, 0)


# --------------------------------------------------------------------------- determinism


def test_thread_count_invariance():
    need("cpu", "score_forward")
    h, r, E, bh, bt = triples(67, 2003, 25, torch.float32, seed=9)
    t = torch.randint(0, 2003, (67,), generator=torch.Generator().manual_seed(0))

    def results():
        leaves = [leaf(x) for x in (h, r, E, bh, bt)]
        loss = embkern.one_to_n_loss(*leaves[:3], t, score="distance", bias_h=leaves[3], bias_t=leaves[4],
                                     backend="cpu")
        loss.backward()
        return [embkern.score_all(h, r, E, backend="cpu"), embkern.rank_all(h, r, E, t, backend="cpu"),
                *embkern.topk_all(h, r, E, 10, backend="cpu"), loss.detach(), *[x.grad for x in leaves]]

    assert_same_bits(at_each(cpu_threads, (1, 2, 3), results))


# --------------------------------------------------------------------------- randomised shapes (cheap tiers)


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 9), N=st.integers(1, 70), d=st.integers(1, 9), seed=st.integers(0, 2**16),
       alg=st.sampled_from(ALGS), layout=st.sampled_from(LAYS), score=st.sampled_from(["inner", "distance"]))
def test_hypothesis_cpu_scores(B, N, d, seed, alg, layout, score):
    need("cpu", "score_forward")
    h, r, E, bh, bt = triples(B, N, d, torch.float32, seed=seed)
    kw = dict(algebra=alg, layout=layout, score=score)
    if score == "distance":
        kw.update(bias_h=bh, bias_t=bt)
    testing.assert_parity(lambda h, r, E: embkern.score_all(h, r, E, backend="cpu", **kw),
                          lambda h, r, E: ref.score_all(h, r, E, **{k: (v.to(h.dtype) if isinstance(v, torch.Tensor) else v)
                                                                    for k, v in kw.items()}),
                          (h, r, E))


@pytest.mark.parametrize("backend", FAST)
def test_topk_k_bound_counts_distinct_filter_ids(backend):
    """Duplicates in a filter list skip nothing extra: k may reach N - distinct filtered ids."""
    need(backend, "topk")
    h, r, E, _, _ = triples(2, 5, 2, torch.float32, seed=12)
    filt = [[1, 1, 1], [2]]
    vals, idx = api(backend).topk_all(h, r, E, 4, filter_index=filt, backend=backend)
    ev, ei = api(backend).topk_all(h, r, E, 4, filter_index=filt, backend="reference")
    assert torch.equal(idx, ei) and not (idx[0] == 1).any() and not (idx[1] == 2).any()
    with pytest.raises(ValueError, match="k: expected 0 <= k <= 4"):
        api(backend).topk_all(h, r, E, 5, filter_index=filt, backend=backend)


# --------------------------------------------------------------------------- filter forms, compiled checks, NaN


@pytest.mark.parametrize("B", [2, 3])
def test_filter_tuple_of_lists_is_always_csr(B):
    """A tuple (offsets, index) is CSR whatever B is; a list is per-row (it was misread when B == 2)."""
    h, r, E, _, _ = triples(B, 10, 2, torch.float32, seed=4)
    t = torch.arange(B) * 2
    a = 7
    offsets = [0, 1] + [1] * (B - 1)  # row 0 filters entity a, the other rows nothing
    as_tuple = embkern.rank_all(h, r, E, t, filter_index=(offsets, [a]))
    as_tensors = embkern.rank_all(h, r, E, t, filter_index=(torch.tensor(offsets), torch.tensor([a])))
    as_rows = embkern.rank_all(h, r, E, t, filter_index=[[a]] + [[] for _ in range(B - 1)])
    assert torch.equal(as_tuple, as_tensors) and torch.equal(as_tuple, as_rows)
    s = ref.scores(ref.query(h, r), E)
    fo, fi = torch.tensor(offsets), torch.tensor([a])
    assert torch.equal(as_tuple, ref.rank_from_scores(s, t, fo, fi, "realistic"))
    with pytest.raises(ValueError, match="a tuple is always read as a CSR pair.*tuple of length 3"):
        embkern.rank_all(h, r, E, t, filter_index=([0], [1], [2]))


@pytest.mark.parametrize("filt,exc,match", [
    ([[1.7], [], []], TypeError, r"filter_index\[0\]\[0\]: expected an integer entity id, got float 1.7"),
    ([[True], [], []], TypeError, r"filter_index\[0\]\[0\]: expected an integer entity id, got bool"),
    ([[1, 2.0], [], []], TypeError, r"filter_index\[0\]\[1\]: expected an integer entity id, got float"),
    ([[1, [2]], [], []], TypeError, r"filter_index\[0\]\[1\]: expected an integer entity id, got list"),
    ([["a"], [], []], TypeError, r"filter_index\[0\]\[0\]: expected an integer entity id, got str 'a'"),
    ([torch.tensor([1.0]), [], []], TypeError, r"filter_index\[0\]: expected integer ids, got dtype float32"),
    ([torch.tensor([True]), [], []], TypeError, r"filter_index\[0\]: expected integer ids, got dtype bool"),
    ([[2 ** 70], [], []], ValueError, r"filter_index\[0\]: expected ids that fit in int64"),
    ([1, 2, 3], TypeError, r"filter_index\[0\]: expected the id list of row 0"),
    ([[[1, 2]], [], []], TypeError, r"filter_index\[0\]\[0\]: expected an integer entity id, got list"),
    (([0, 1, 1, 1], [1.5]), TypeError, r"filter_index index\[0\]: expected an integer entity id, got float"),
    (([0, 1, 1, 1], [True]), TypeError, r"filter_index index\[0\]: expected an integer entity id, got bool"),
    (([0.0, 1, 1, 1], [1]), TypeError, r"filter_index offsets\[0\]: expected an integer offset, got float"),
    ((torch.tensor([0, 1, 1, 1]), torch.tensor([1.0])), TypeError, "filter_index index: expected integer ids"),
    ({0: [1]}, TypeError, "filter_index: expected None, an \\(offsets, index\\) CSR tuple"),
])
def test_filter_ids_must_be_integers_in_every_form(filt, exc, match):
    h, r, E, _, _ = triples(3, 10, 2, torch.float32, seed=1)
    t = torch.tensor([0, 4, 9])
    with pytest.raises(exc, match=match):
        embkern.rank_all(h, r, E, t, filter_index=filt)
    with pytest.raises(exc, match=match):
        embkern.topk_all(h, r, E, 2, filter_index=filt)


def test_filter_numpy_rows_and_csr_accepted():
    np = pytest.importorskip("numpy")
    h, r, E, _, _ = triples(3, 10, 2, torch.float32, seed=1)
    t = torch.tensor([0, 4, 9])
    want = embkern.rank_all(h, r, E, t, filter_index=[[1, 3], [], [2]])
    got_rows = embkern.rank_all(h, r, E, t, filter_index=[np.array([1, 3]), np.zeros(0, np.int64), (2,)])
    got_csr = embkern.rank_all(h, r, E, t, filter_index=(np.array([0, 2, 2, 3]), np.array([1, 3, 2], np.int32)))
    assert torch.equal(want, got_rows) and torch.equal(want, got_csr)


COMPILE_MODES = [
    pytest.param(dict(fullgraph=True, backend="aot_eager"), id="fullgraph-aot_eager"),
    pytest.param(dict(), id="default"),
]


@pytest.mark.parametrize("mode", COMPILE_MODES)
@pytest.mark.parametrize("dtype,backend", [(torch.bfloat16, None), (torch.float32, "reference"),
                                           (torch.float32, "cpu")])
def test_compiled_calls_reject_what_eager_rejects(mode, dtype, backend):
    """Under torch.compile the reference path (the default for bf16) ran unchecked: a filter id of -1
    meant entity N-1 and top-k returned filtered ids. The value checks now run inside the graph."""
    if backend is not None:
        need(backend, "rank", dtype)
    torch._dynamo.reset()
    B, N = 3, 10
    h, r, E, _, _ = triples(B, N, 2, dtype, seed=8)
    t = torch.tensor([0, 4, 9])

    def ranks(h, r, E, t, fo, fi):
        return embkern.rank_all(h, r, E, t, filter_index=(fo, fi), backend=backend)

    def top(h, r, E, fo, fi):
        return embkern.topk_all(h, r, E, N - 1, filter_index=(fo, fi), backend=backend)[1]

    c_ranks, c_top = torch.compile(ranks, **mode), torch.compile(top, **mode)
    fo, fi = torch.tensor([0, 1, 1, 1]), torch.tensor([3])
    assert torch.equal(c_ranks(h, r, E, t, fo, fi), ranks(h, r, E, t, fo, fi))
    assert torch.equal(c_top(h, r, E, fo, fi), top(h, r, E, fo, fi))
    bad = [
        (lambda f: f(h, r, E, t, fo, torch.tensor([-1])), r"filter_index index: expected indices in \[0, 10\), got -1"),
        (lambda f: f(h, r, E, t, fo, torch.tensor([10])), r"filter_index index: expected indices in \[0, 10\), got 10"),
        (lambda f: f(h, r, E, torch.tensor([0, -1, 2]), fo, fi), r"targets: expected indices in \[0, 10\), got -1"),
        (lambda f: f(h, r, E, t, torch.tensor([0, 1, 0, 1]), fi), "non-decreasing"),
        (lambda f: f(h, r, E, t, torch.tensor([0, 1, 1, 2]), fi), r"offsets\[-1\] == len\(index\) = 1, got 2"),
    ]
    for call, match in bad:
        for f in (ranks, c_ranks):
            with pytest.raises(ValueError, match=match):
                call(f)
    # two distinct ids filtered in row 0 leave N - 2 < k candidates
    for f in (top, c_top):
        with pytest.raises(ValueError, match=r"k: expected 0 <= k <= 8"):
            f(h, r, E, torch.tensor([0, 2, 2, 2]), torch.tensor([3, 5]))
        with pytest.raises(ValueError, match=r"filter_index index: expected indices in \[0, 10\), got -1"):
            f(h, r, E, fo, torch.tensor([-1]))
    # a NaN target score raises inside the graph too
    En = E.clone()
    En[4] = float("nan")
    for f in (ranks, c_ranks):
        with pytest.raises(ValueError, match=r"row 1's target \(entity 4\) is NaN"):
            f(h, r, En, t, fo, fi)


def test_compiled_per_row_lists_checked():
    torch._dynamo.reset()
    h, r, E, _, _ = triples(3, 10, 2, torch.bfloat16, seed=8)
    t = torch.tensor([0, 4, 9])
    f = torch.compile(lambda h, r, E, t: embkern.rank_all(h, r, E, t, filter_index=[[-1], [], []]),
                      fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match=r"filter_index index: expected indices in \[0, 10\), got -1"):
        f(h, r, E, t)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("score", ["inner", "distance"])
def test_nan_target_score_raises_naming_the_row(backend, score):
    """NaN compares false with everything, so a NaN target used to rank 1 (MRR 1.0 for a NaN model)."""
    need(backend, "rank")
    B, N = 4, 12
    h, r, E, bh, bt = triples(B, N, 2, torch.float32, seed=12)
    kw = dict(score=score, backend=backend)
    if score == "distance":
        kw.update(bias_h=bh, bias_t=bt)
    t = torch.tensor([0, 5, 7, 11])
    En = torch.full_like(E, float("nan"))
    with pytest.raises(ValueError, match=r"h, r, entities: the score of row 0's target \(entity 0\) is NaN "
                                         r"\(4 of 4 rows\)"):
        api(backend).rank_all(h, r, En, t, **kw)
    En = E.clone()
    En[7, 1] = float("nan")
    with pytest.raises(ValueError, match=r"row 2's target \(entity 7\) is NaN \(1 of 4 rows\)"):
        api(backend).rank_all(h, r, En, t, **kw)
    hn = h.clone()
    hn[3, 0] = float("inf")
    with pytest.raises(ValueError, match=r"row 3's target \(entity 11\) is NaN"):
        api(backend).rank_all(hn, r, E, t, **kw)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("ties", ["optimistic", "pessimistic", "realistic"])
def test_nan_scores_of_other_entities_never_count(backend, ties):
    """Entities other than the target that score NaN rank as if filtered, on every backend."""
    need(backend, "rank")
    B, N = 5, 14
    h, r, E, _, _ = triples(B, N, 2, torch.float32, seed=13)
    t = torch.tensor([0, 3, 6, 9, 13])
    nan_rows = [1, 2, 8]
    En = E.clone()
    En[nan_rows] = float("nan")
    got = api(backend).rank_all(h, r, En, t, ties=ties, backend=backend)
    want = api(backend).rank_all(h, r, E, t, ties=ties, backend=backend, filter_index=[nan_rows] * B)
    assert torch.equal(got, want)
    assert torch.equal(got, ref.rank_all(h, r, En, t, ties=ties))


def test_sizes_up_front():
    h = torch.randn(2 ** 19, 4)  # (B, N) = 2^19 x 2^19 float32 scores: 1.1 TB
    with pytest.raises(MemoryError, match=r"score_all: the \(524288, 524288\) float32 score matrix needs 1\.1e\+03 GB"):
        embkern.score_all(h, h, h)
    t = torch.zeros(2 ** 19, dtype=torch.long)
    with pytest.raises(MemoryError, match=r"rank_all\(backend='reference'\): the \(524288, 524288\) score matrix"):
        embkern.rank_all(h, h, h, t, backend="reference")
    with pytest.raises(MemoryError, match=r"one_to_n_loss\(backend='reference'\).* GB"):
        embkern.one_to_n_loss(h, h, h, t, backend="reference")
    avail = embkern._checks.available_bytes("cpu")
    assert avail is None or avail > 0


def test_sizes_up_front_without_proc_meminfo(monkeypatch):
    """Where /proc/meminfo cannot be read, os.sysconf gives the available memory."""
    import builtins
    import os

    real_open = builtins.open

    def no_meminfo(path, *a, **k):
        if str(path) == "/proc/meminfo":
            raise OSError("no /proc here")
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", no_meminfo)
    want = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert embkern._checks._available_host_bytes() == want
    h = torch.randn(2 ** 19, 4)
    with pytest.raises(MemoryError, match="GB"):
        embkern.score_all(h, h, h)


@pytest.mark.parametrize("fn", ["product", "score_all", "rank_all"])
def test_expanded_inputs_sized_before_their_copy(fn):
    # 2^34 x 4 expanded from one row: 64 bytes of storage, a 256 GB contiguous copy
    big = torch.ones(1, 4).expand(2**34, 4)
    with pytest.raises(MemoryError, match=r"GB"):
        if fn == "product":
            embkern.hamilton_product(big, torch.ones(1, 4), backend="cpu")
        elif fn == "score_all":
            embkern.score_all(torch.ones(5, 4), torch.ones(5, 4), big, backend="cpu")
        else:
            embkern.rank_all(big, big, torch.ones(8, 4), torch.zeros(1, dtype=torch.long).expand(2**34), backend="cpu")
