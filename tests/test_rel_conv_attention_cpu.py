"""C++ CPU kernels of relative attention and the causal depthwise conv: the corners the main suite does not reach.

Shapes cross every blocking boundary of src/cpu/rel_conv_attention.cpp (32-query and 128-key tiles, the
159-row R window, the causal diagonal inside and across tiles, d and dv not multiples of the register tile
width), with memory (M = Lk - Lq > 0), q_offset negative and positive, rows that see no key, and windows
reaching past the table's ends. Exactness: the same bits for every thread count and at every ISA level this
CPU runs. Bad input at the _C boundary is a ValueError / TypeError naming the argument.
"""

import math

import numpy as np
import pytest
import torch

import embkern
from embkern import testing
from embkern.reference import rel_conv_attention as ref
from helpers import assert_same_bits, at_each, cpu_isa, cpu_module, cpu_threads, in_cache_buffer

C = cpu_module()
RA = C.rel_conv_attention
LEVELS = list(C.isa_info()["available"])


def data(B, H, Lq, Lk, d, dv, P, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rn(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype)

    return (rn(B, H, Lq, d), rn(B, H, Lk, d), rn(B, H, Lk, dv), rn(2 * P, H, d, s=0.5), rn(2 * P, H, s=0.5),
            rn(H, d, s=0.5))


def run_cpu(args, causal, qo, P, grad_seed=1):
    """Output and the six gradients through the public API."""
    leaves = [t.clone().requires_grad_(True) for t in args]
    out = embkern.relative_attention(*leaves, causal=causal, q_offset=qo, max_distance=P, backend="cpu")
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    out.backward(g.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


# --------------------------------------------------------------------------- odd sizes against the reference

ODD = [  # B, H, Lq, Lk, d, dv, P, causal, q_offset
    (1, 2, 1, 1, 16, 16, 8, True, None),
    (2, 3, 17, 17, 16, 16, 32, True, None),
    (1, 2, 17, 49, 20, 12, 64, True, None),       # memory M = 32, d and dv off the tile widths
    (1, 2, 130, 130, 16, 16, 160, True, None),    # 5 query blocks, 2 key blocks, diagonal across both
    (1, 1, 130, 300, 64, 64, 320, True, None),    # M = 170: three key blocks
    (1, 2, 1, 257, 32, 32, 300, True, None),      # decode against a long memory
    (1, 2, 130, 130, 24, 40, 140, False, None),   # not causal: both table ends in use
    (2, 2, 17, 40, 8, 8, 48, False, 5),
    (1, 2, 40, 70, 16, 16, 80, True, -9),         # q_offset < 0: the first rows see no key
    (1, 2, 33, 60, 16, 16, 100, True, 50),        # q_offset > Lk - Lq: every key from some row on
]


@pytest.mark.parametrize("shape", ODD, ids=lambda s: "x".join(map(str, s[:7])) + f"-c{int(s[7])}-o{s[8]}")
def test_odd_sizes_parity_and_gradients(shape):
    *dims, P, causal, qo = shape
    args = data(*dims, P)
    fn = lambda *a: embkern.relative_attention(*a, causal=causal, q_offset=qo, max_distance=P,  # noqa: E731
                                               backend="cpu")
    rf = lambda *a: ref.attention(*a, causal=causal, q_offset=qo)  # noqa: E731
    testing.assert_parity(fn, rf, args)
    testing.assert_grad_parity(fn, rf, args)


def test_float64_agrees_with_the_reference_tightly():
    args = data(2, 2, 70, 150, 24, 16, 160, torch.float64, seed=3)
    got = run_cpu(args, True, None, 160)
    leaves = [t.clone().requires_grad_(True) for t in args]
    out = ref.attention(*leaves, causal=True)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    for a, b in zip(got, [out.detach()] + [t.grad for t in leaves]):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_lse_and_rows_that_see_no_key():
    P = 80
    q, k, v, R, S, u = data(1, 2, 40, 40, 16, 16, P)
    out = torch.full((1, 2, 40, 16), float("nan"))
    lse = torch.full((1, 2, 40), float("nan"))
    RA.forward(q.numpy(), k.numpy(), v.numpy(), R.numpy(), S.numpy(), u.numpy(), out.numpy(), lse.numpy(), True, -5)
    want, want_lse = ref.attention_forward(*(t.double() for t in (q, k, v, R, S, u)), True, -5)
    assert torch.all(out[:, :, :5] == 0) and torch.all(lse[:, :, :5] == float("-inf"))
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse[:, :, 5:].double(), want_lse[:, :, 5:], rtol=1e-5, atol=1e-5)
    res = run_cpu((q, k, v, R, S, u), True, -5, P)
    assert torch.all(res[1][:, :, :5] == 0)
    assert all(bool(torch.isfinite(t).all()) for t in res)
    # nobody sees anything: zero output and zero gradients everywhere
    res = run_cpu((q, k, v, R, S, u), True, -40, P)
    assert all(bool((t == 0).all()) for t in res)


def test_table_rows_no_pair_reads_get_zero_gradient():
    P = 64
    args = data(1, 2, 17, 30, 8, 8, P)
    res = run_cpu(args, True, None, P)
    dR, dS = res[4], res[5]
    # causal, q_offset = Lk - Lq: rows r = P + j - i_a cover P - 29 .. P only
    lo, hi = P - 29, P
    assert torch.all(dR[:lo] == 0) and torch.all(dR[hi + 1:] == 0)
    assert torch.all(dS[:lo] == 0) and torch.all(dS[hi + 1:] == 0)
    assert dR[lo:hi + 1].abs().sum() > 0


def test_empty_sizes():
    P = 8
    for dims in ((0, 2, 5, 5, 8, 4), (1, 2, 0, 5, 8, 4), (1, 2, 5, 0, 8, 4), (1, 2, 5, 5, 8, 0)):
        res = run_cpu(data(*dims, P), True, None, P)
        assert res[0].shape == (dims[0], dims[1], dims[2], dims[5])
        assert all(bool(torch.isfinite(t).all()) for t in res)


@pytest.mark.parametrize("causal,qo", [(True, None), (True, -2), (True, 3), (False, None)])
def test_gradcheck_float64(causal, qo):
    args = data(1, 2, 6, 9, 5, 3, 12, torch.float64, seed=2)
    leaves = [t.clone().requires_grad_(True) for t in args]
    fn = lambda *a: embkern.relative_attention(*a, causal=causal, q_offset=qo, max_distance=12,  # noqa: E731
                                               backend="cpu")
    assert torch.autograd.gradcheck(fn, leaves)


def test_outputs_fully_written():
    P = 100
    args = [t.numpy() for t in data(2, 2, 45, 70, 20, 12, P)]
    out, lse = np.full((2, 2, 45, 12), np.nan, np.float32), np.full((2, 2, 45), np.nan, np.float32)
    RA.forward(*args, out, lse, True, 25)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    go = np.random.default_rng(0).standard_normal(out.shape).astype(np.float32)
    grads = [np.full(t.shape, np.nan, np.float32) for t in args]
    RA.backward(go, *args, out, lse, *grads, True, 25)
    assert all(np.isfinite(g).all() for g in grads)


# --------------------------------------------------------------------------- the layer on the cpu backend


@pytest.mark.parametrize("conv", ["shared", "per_head", None])
def test_layer_parameters_get_the_reference_gradients(conv):
    # RCMHA through the cpu kernels (attention and the three convs) against the same layer on the
    # reference, in float64: every parameter's gradient, with memory M = 7
    torch.manual_seed(0)
    kw = dict(conv=conv, memory_len=7, max_distance=64, dtype=torch.float64)
    a = embkern.nn.RelConvMultiHeadAttention(32, 4, backend="cpu", **kw)
    b = embkern.nn.RelConvMultiHeadAttention(32, 4, backend="reference", **kw)
    with torch.no_grad():
        for p in a.parameters():
            p.normal_(0, 0.3)
    b.load_state_dict(a.state_dict())
    g = torch.Generator().manual_seed(1)
    z, mem = torch.randn(2, 19, 32, generator=g, dtype=torch.float64), torch.randn(2, 7, 32, generator=g,
                                                                                    dtype=torch.float64)
    oa, _ = a(z, mem)
    ob, _ = b(z, mem)
    torch.testing.assert_close(oa, ob, rtol=1e-11, atol=1e-11)
    w = torch.randn(oa.shape, generator=g, dtype=torch.float64)
    (oa * w).sum().backward()
    (ob * w).sum().backward()
    names = [n for n, _ in a.named_parameters()]
    if conv is not None:
        assert any(n.startswith("convs.") for n in names)
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert pa.grad is not None, n
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-10, atol=1e-10, msg=n)


# --------------------------------------------------------------------------- causal depthwise conv


@pytest.mark.parametrize("shape,K,bias", [((2, 9, 6), 3, True), ((3, 5, 40), 1, False), ((2, 300, 17), 7, True),
                                          ((4, 4, 3), 6, True), ((2, 3, 130, 16), 3, False)])
def test_conv_parity_and_gradients(shape, K, bias):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(*shape, generator=g)
    w = torch.randn(shape[-1], K, generator=g)
    args = (x, w, torch.randn(shape[-1], generator=g)) if bias else (x, w)
    fn = lambda *a: embkern.causal_depthwise_conv(*a, backend="cpu")  # noqa: E731
    testing.assert_parity(fn, ref.causal_depthwise_conv, args)
    testing.assert_grad_parity(fn, ref.causal_depthwise_conv, args)


def test_conv_gradcheck_float64():
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(2, 6, 4, generator=g, dtype=torch.float64).requires_grad_(True),
          torch.randn(4, 3, generator=g, dtype=torch.float64).requires_grad_(True),
          torch.randn(4, generator=g, dtype=torch.float64).requires_grad_(True)]
    assert torch.autograd.gradcheck(lambda *a: embkern.causal_depthwise_conv(*a, backend="cpu"), xs)


def _conv_all(x, w, b):
    xl, wl, bl = (t.clone().requires_grad_(True) for t in (x, w, b))
    y = embkern.causal_depthwise_conv(xl, wl, bl, backend="cpu")
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=y.dtype))
    return [y.detach(), xl.grad, wl.grad, bl.grad]


# --------------------------------------------------------------------------- exactness

EXACT = [(2, 3, 130, 200, 64, 48, 256, True, None), (1, 2, 70, 65, 20, 36, 100, False, None),
         (1, 3, 129, 129, 16, 16, 160, True, -7), (2, 2, 1, 150, 32, 20, 160, True, None),
         (1, 2, 33, 290, 24, 24, 300, True, None)]


def _all_results(shape, dtype, seed):
    *dims, P, causal, qo = shape
    res = run_cpu(data(*dims, P, dtype=dtype, seed=seed), causal, qo, P)
    g = torch.Generator().manual_seed(seed)
    x, w, b = torch.randn(3, 600, 24, generator=g), torch.randn(24, 3, generator=g), torch.randn(24, generator=g)
    return res + _conv_all(x.to(dtype), w.to(dtype), b.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", EXACT, ids=lambda s: "x".join(map(str, s[:6])))
def test_thread_count_invariance(dtype, shape):
    assert_same_bits(at_each(cpu_threads, (1, 2, 3), lambda: _all_results(shape, dtype, 5)))


@pytest.mark.skipif(len(LEVELS) < 2, reason="this CPU runs one ISA level")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", EXACT, ids=lambda s: "x".join(map(str, s[:6])))
def test_same_bits_at_every_isa_level(dtype, shape):
    assert_same_bits(at_each(cpu_isa, LEVELS, lambda: _all_results(shape, dtype, 6)))


# --------------------------------------------------------------------------- k, v read in place

SLICES = [(2, 4, 1, 300, 64, 64, 320, True, None), (1, 2, 3, 70, 16, 8, 80, True, -1),
          (2, 3, 130, 200, 32, 48, 256, True, None), (1, 1, 1, 5, 8, 8, 8, True, None),
          (3, 2, 5, 65, 24, 40, 80, False, None)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SLICES, ids=lambda s: "x".join(map(str, s[:6])))
def test_forward_reads_a_slice_of_a_cache_buffer_in_place(dtype, shape):
    *dims, P, causal, qo = shape
    q, k, v, R, S, u = data(*dims, P, dtype=dtype, seed=8)
    Lk = dims[3]
    # NaN rows past each head's Lk: a kernel that reads beyond them, or steps heads by Lk d, shows it
    ks, vs = in_cache_buffer(k, Lk + 37), in_cache_buffer(v, 2 * Lk + 1)
    assert not ks.is_contiguous() or dims[0] * dims[1] == 1
    from embkern.ops import rel_conv_attention as ops
    for t in (ks, vs):  # what the kernel gets is a view of the buffer, not a copy
        assert ops._np_rows(t).__array_interface__["data"][0] == t.data_ptr()

    def run(k, v):
        with torch.no_grad():
            return embkern.relative_attention(q, k, v, R, S, u, causal=causal, q_offset=qo, max_distance=P,
                                              backend="cpu")

    assert_same_bits({"packed": run(k, v), "slices": run(ks, vs), "k slice": run(ks, v)})
    # the backward copies (its kernel takes packed buffers) and gives the packed inputs' gradients
    assert_same_bits({"packed": run_cpu((q, k, v, R, S, u), causal, qo, P),
                      "slices": run_cpu((q, ks, vs, R, S, u), causal, qo, P)})


@pytest.mark.skipif(len(LEVELS) < 2, reason="this CPU runs one ISA level")
def test_cache_slices_give_the_same_bits_at_every_isa_level_and_thread_count():
    q, k, v, R, S, u = data(2, 4, 1, 300, 64, 64, 320, seed=9)
    ks, vs = in_cache_buffer(k, 512), in_cache_buffer(v, 512)

    def run(k, v):
        with torch.no_grad():
            return embkern.relative_attention(q, k, v, R, S, u, max_distance=320, backend="cpu")

    want = run(k, v)
    assert_same_bits({"packed": want, **at_each(cpu_isa, LEVELS, lambda: run(ks, vs)),
                      **at_each(cpu_threads, (1, 3), lambda: run(ks, vs))})


def test_views_the_kernel_cannot_read_in_place_are_copied():
    q, k, v, R, S, u = data(2, 4, 3, 40, 16, 16, 48, seed=10)
    with torch.no_grad():
        want = embkern.relative_attention(q, k, v, R, S, u, max_distance=48, backend="cpu")
        wide = torch.cat([k, k], 1)[:, :4]  # heads 0..3 of 8: the batch step is not 4 head steps
        strided = torch.stack([v, v], -1)[..., 0]  # elements 2 apart
        lk = k.transpose(1, 2).contiguous().transpose(1, 2)  # (B, Lk, H, d) memory, as the layer's projections
        from embkern.ops import rel_conv_attention as ops
        for t in (wide, strided, lk):
            assert ops._np_rows(t).__array_interface__["data"][0] != t.data_ptr()
        got = {n: embkern.relative_attention(q, kk, vv, R, S, u, max_distance=48, backend="cpu")
               for n, (kk, vv) in {"wide": (wide, v), "strided": (k, strided), "lk": (lk, v)}.items()}
    assert_same_bits({"packed": want, **got})


# --------------------------------------------------------------------------- torch.library on the cpu backend


def test_opcheck_backward_ops():
    q, k, v, R, S, u = data(1, 2, 5, 7, 8, 4, 16)
    out, lse = torch.ops.embkern.rca_forward(q, k, v, R, S, u, True, 2, "cpu")
    go = torch.randn(out.shape)
    torch.library.opcheck(torch.ops.embkern.rca_backward.default, (go, q, k, v, R, S, u, out, lse, True, 2, "cpu"))
    x, w = torch.randn(2, 6, 4), torch.randn(4, 3)
    torch.library.opcheck(torch.ops.embkern.causal_conv_backward.default, (torch.randn(2, 6, 4), x, w, True, "cpu"))


def test_torch_compile_fullgraph_layer():
    torch.manual_seed(0)
    layer = embkern.nn.RelConvMultiHeadAttention(16, 2, conv="shared", max_distance=32, backend="cpu")
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    z = torch.randn(2, 9, 16)
    torch._dynamo.reset()
    cf = torch.compile(lambda x: layer(x)[0].square().sum(), fullgraph=True)
    cf(z).backward()
    got = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    layer(z)[0].square().sum().backward()
    for a, p in zip(got, layer.parameters()):
        torch.testing.assert_close(a, p.grad)


# --------------------------------------------------------------------------- raw binding: bad input


def _raw_args(dtype=np.float32):
    rng = np.random.default_rng(0)
    mk = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    B, H, Lq, Lk, d, dv, P = 1, 2, 5, 6, 8, 4, 8
    return dict(q=mk(B, H, Lq, d), k=mk(B, H, Lk, d), v=mk(B, H, Lk, dv), rel_emb=mk(2 * P, H, d),
                rel_bias=mk(2 * P, H), content_bias=mk(H, d), out=np.empty((B, H, Lq, dv), dtype),
                lse_out=np.empty((B, H, Lq), dtype), causal=True, q_offset=1)


def _raw_bwd_args(dtype=np.float32):
    a = _raw_args(dtype)
    RA.forward(**a)
    t = {n: a[n] for n in ("q", "k", "v", "rel_emb", "rel_bias", "content_bias")}
    return dict(grad_out=np.ones_like(a["out"]), **t, out=a["out"], lse=a["lse_out"],
                dq_out=np.empty_like(a["q"]), dk_out=np.empty_like(a["k"]), dv_out=np.empty_like(a["v"]),
                drel_emb_out=np.empty_like(a["rel_emb"]), drel_bias_out=np.empty_like(a["rel_bias"]),
                dcontent_bias_out=np.empty_like(a["content_bias"]), causal=True, q_offset=1)


def _readonly(x):
    x = x.copy()
    x.setflags(write=False)
    return x


FWD_BAD = [
    ("q", lambda a: [[1.0]], TypeError, "q: expected"),
    ("q", lambda a: a["q"].astype(np.float16), TypeError, "q: expected dtype float32 or float64"),
    ("k", lambda a: a["k"].astype(np.float64), TypeError, "k: expected dtype float32"),
    ("q", lambda a: a["q"][0], ValueError, "q: expected 4-d"),
    ("k", lambda a: a["k"][:, :, :, :4].copy(), ValueError, "k: expected shape"),
    ("k", lambda a: np.ones((1, 3, 6, 8), np.float32), ValueError, "k: expected shape"),      # H mismatch
    ("v", lambda a: a["v"][:, :, :3].copy(), ValueError, "v: expected shape"),
    ("v", lambda a: a["v"][:, :, :, ::2], ValueError, "v: expected a C-contiguous"),
    ("rel_emb", lambda a: np.ones((16, 3, 8), np.float32), ValueError, "rel_emb: expected shape"),  # H mismatch
    ("rel_emb", lambda a: np.ones((16, 2, 7), np.float32), ValueError, "rel_emb: expected shape"),
    ("rel_emb", lambda a: np.ones((15, 2, 8), np.float32), ValueError, "rel_emb: expected shape \\(2P"),
    ("rel_emb", lambda a: np.ones((0, 2, 8), np.float32), ValueError, "rel_emb: expected shape \\(2P"),
    ("rel_emb", lambda a: None, TypeError, "rel_emb: expected an array"),
    ("rel_bias", lambda a: np.ones((14, 2), np.float32), ValueError, "rel_bias: expected shape"),
    ("rel_bias", lambda a: np.ones((16, 3), np.float32), ValueError, "rel_bias: expected shape"),
    ("content_bias", lambda a: np.ones((3, 8), np.float32), ValueError, "content_bias: expected shape"),
    ("content_bias", lambda a: np.ones((2, 8), np.float64), TypeError, "content_bias: expected dtype float32"),
    ("out", lambda a: np.empty((1, 2, 5, 3), np.float32), ValueError, "out: expected shape"),
    ("out", lambda a: _readonly(a["out"]), ValueError, "out: expected a writable buffer"),
    ("lse_out", lambda a: np.empty((1, 2, 4), np.float32), ValueError, "lse_out: expected shape"),
    ("q_offset", lambda a: 2**70, TypeError, "incompatible function arguments"),
]


@pytest.mark.parametrize("name,bad,exc,match", FWD_BAD, ids=[f"{c[0]}-{i}" for i, c in enumerate(FWD_BAD)])
def test_raw_forward_rejects_bad_input(name, bad, exc, match):
    a = _raw_args()
    a[name] = bad(a)
    with pytest.raises(exc, match=match):
        RA.forward(**a)


def test_raw_forward_rejects_keys_beyond_the_tables():
    a = _raw_args()
    rng = np.random.default_rng(1)
    # Lk = 9 > P = 8
    a.update(k=rng.standard_normal((1, 2, 9, 8)).astype(np.float32), v=rng.standard_normal((1, 2, 9, 4)).astype(
        np.float32))
    with pytest.raises(ValueError, match="max_distance: Lk = 9 keys exceed max_distance"):
        RA.forward(**a)
    # Lk <= P, but the queries' positions reach past the table (not causal, or a large q_offset)
    for causal, qo in ((False, -6), (True, 8), (True, 2**62), (False, -(2**62))):
        a = _raw_args()
        a.update(causal=causal, q_offset=qo)
        with pytest.raises(ValueError, match="max_distance: query positions"):
            RA.forward(**a)
    # causal with a very negative offset is fine: nobody sees a key
    a = _raw_args()
    a.update(q_offset=-(2**62))
    RA.forward(**a)
    assert (a["out"] == 0).all()


BWD_BAD = [
    ("grad_out", lambda a: a["grad_out"][..., :2].copy(), ValueError, "grad_out: expected shape"),
    ("out", lambda a: a["out"][:, :1].copy(), ValueError, "out: expected shape"),
    ("lse", lambda a: a["lse"].astype(np.float64), TypeError, "lse: expected dtype float32"),
    ("dq_out", lambda a: np.empty((1, 2, 5, 7), np.float32), ValueError, "dq_out: expected shape"),
    ("dk_out", lambda a: np.empty((1, 2, 6, 4), np.float32), ValueError, "dk_out: expected shape"),
    ("dv_out", lambda a: _readonly(a["dv_out"]), ValueError, "dv_out: expected a writable"),
    ("drel_emb_out", lambda a: np.empty((14, 2, 8), np.float32), ValueError, "drel_emb_out: expected shape"),
    ("drel_bias_out", lambda a: np.empty((16, 3), np.float32), ValueError, "drel_bias_out: expected shape"),
    ("dcontent_bias_out", lambda a: None, TypeError, "dcontent_bias_out: expected an array"),
    ("rel_bias", lambda a: np.ones((16, 1), np.float32), ValueError, "rel_bias: expected shape"),
]


@pytest.mark.parametrize("name,bad,exc,match", BWD_BAD, ids=[f"{c[0]}-{i}" for i, c in enumerate(BWD_BAD)])
def test_raw_backward_rejects_bad_input(name, bad, exc, match):
    a = _raw_bwd_args()
    a[name] = bad(a)
    with pytest.raises(exc, match=match):
        RA.backward(**a)


CONV_BAD = [
    ("x", lambda a: a["x"][0], ValueError, "x: expected 3-d"),
    ("x", lambda a: a["x"].astype(np.int32), TypeError, "x: expected dtype float32 or float64"),
    ("weight", lambda a: np.ones((5, 3), np.float32), ValueError, "weight: expected shape"),
    ("weight", lambda a: np.ones((4, 0), np.float32), ValueError, "weight: expected shape \\(C, K\\) with K >= 1"),
    ("weight", lambda a: np.ones((4, 3), np.float64), TypeError, "weight: expected dtype float32"),
    ("bias", lambda a: np.ones(5, np.float32), ValueError, "bias: expected shape"),
    ("y_out", lambda a: np.empty((2, 5, 4), np.float32), ValueError, "y_out: expected shape"),
    ("y_out", lambda a: _readonly(a["y_out"]), ValueError, "y_out: expected a writable"),
]


@pytest.mark.parametrize("name,bad,exc,match", CONV_BAD, ids=[f"{c[0]}-{i}" for i, c in enumerate(CONV_BAD)])
def test_raw_conv_rejects_bad_input(name, bad, exc, match):
    rng = np.random.default_rng(0)
    a = dict(x=rng.standard_normal((2, 6, 4)).astype(np.float32), weight=rng.standard_normal((4, 3)).astype(
        np.float32), bias=rng.standard_normal(4).astype(np.float32), y_out=np.empty((2, 6, 4), np.float32))
    a[name] = bad(a)
    with pytest.raises(exc, match=match):
        RA.conv_forward(**a)


def test_raw_conv_backward_rejects_bad_outputs():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 6, 4)).astype(np.float32), rng.standard_normal((4, 3)).astype(np.float32)
    ok = dict(grad_y=np.ones_like(x), x=x, weight=w, dx_out=np.empty_like(x), dweight_out=np.empty_like(w),
              dbias_out=np.empty(4, np.float32))
    for name, bad, match in (("dweight_out", np.empty((4, 2), np.float32), "dweight_out: expected shape"),
                             ("dbias_out", np.empty(3, np.float32), "dbias_out: expected shape"),
                             ("grad_y", np.ones((2, 5, 4), np.float32), "grad_y: expected shape")):
        a = dict(ok, **{name: bad})
        with pytest.raises(ValueError, match=match):
            RA.conv_backward(**a)
    RA.conv_backward(**dict(ok, dbias_out=None))
    assert np.isfinite(ok["dweight_out"]).all()


def test_raw_float64():
    a = _raw_args(np.float64)
    RA.forward(**a)
    assert a["out"].dtype == np.float64 and np.isfinite(a["out"]).all()
    assert math.isfinite(float(a["lse_out"].sum()))


# --------------------------------------------------------------------------- NaN propagates

@pytest.mark.parametrize("level", LEVELS)
def test_nan_score_propagates_to_its_row_only(level):
    # A NaN in q row 4 of (0, 1) makes that row's scores NaN: output and lse NaN, as in the
    # reference; the other rows are untouched (the fixed exp no longer maps NaN to 0).
    B, H, Lq, Lk, d, dv, P = 2, 2, 9, 40, 16, 8, 64
    q, k, v, R, S, u = data(B, H, Lq, Lk, d, dv, P, dtype=torch.float64, seed=6)
    q[0, 1, 4, 3] = float("nan")
    out = torch.empty(B, H, Lq, dv, dtype=torch.float64)
    lse = torch.empty(B, H, Lq, dtype=torch.float64)
    with cpu_isa(level):
        RA.forward(*(t.numpy() for t in (q, k, v, R, S, u)), out.numpy(), lse.numpy(), True, Lk - Lq)
    want, want_lse = ref.attention_forward(q, k, v, R, S, u, True, Lk - Lq)
    nan_rows = torch.zeros(B, H, Lq, dtype=torch.bool)
    nan_rows[0, 1, 4] = True
    assert torch.equal(torch.isnan(want_lse), nan_rows) and torch.equal(torch.isnan(lse), nan_rows)
    assert torch.isnan(out[nan_rows]).all() and torch.isnan(want[nan_rows]).all()
    torch.testing.assert_close(out[~nan_rows], want[~nan_rows], rtol=1e-12, atol=1e-12)
