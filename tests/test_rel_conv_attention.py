"""Relative (Transformer-XL) attention and the causal depthwise conv of RCMHA (docs/ops/rel_conv_attention.md):
the two references agree, every backend of the descriptor meets the parity rule with all gradients,
torch.library, bad input."""

import math

import numpy as np
import pytest
import torch

import embkern
from embkern import testing
from embkern.ops import rel_conv_attention as ops
from embkern.reference import rel_conv_attention as ref
from helpers import backend_params, device_of, in_cache_buffer, require_backend

BACKENDS = backend_params(*ops.DESCRIPTOR.backends)
P = 160


def _inputs(B, H, Lq, Lk, d, dv, dtype=torch.float32, seed=0, device="cpu", P=P):
    g = torch.Generator().manual_seed(seed)

    def rn(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype).to(device)

    return (rn(B, H, Lq, d), rn(B, H, Lk, d), rn(B, H, Lk, dv), rn(2 * P, H, d, s=0.5), rn(2 * P, H, s=0.5),
            rn(H, d, s=0.5))


# --------------------------------------------------------------------------- references


@pytest.mark.parametrize("Lq,Lk,causal", [(1, 1, True), (17, 17, True), (5, 21, True), (17, 17, False),
                                          (6, 30, False)])
def test_gather_reference_equals_the_authors_shift_formulation(Lq, Lk, causal):
    args = _inputs(2, 3, Lq, Lk, 8, 5, torch.float64)
    torch.testing.assert_close(ref.attention(*args, causal=causal), ref.authors_attention(*args, causal=causal),
                               rtol=1e-12, atol=1e-12)


def test_reference_scores_by_hand():
    q, k, v, R, S, u = _inputs(1, 2, 3, 7, 4, 4, torch.float64)
    s = ref.scores(q, k, R, S, u, True, 4)
    for i in range(3):
        ia = i + 4
        for j in range(7):
            if j > ia:
                assert torch.all(torch.isinf(s[0, :, i, j]))
                continue
            r = P + j - ia
            want = ((q[0, :, i] + u) * k[0, :, j]).sum(-1) + (q[0, :, i] * R[r]).sum(-1) + S[r]
            torch.testing.assert_close(s[0, :, i, j], want / 2.0, rtol=1e-12, atol=1e-12)


def test_causal_conv_is_pytorch_conv1d_padded_and_cropped():
    # the authors' construction: Conv1d(padding=K-1, groups=C), last K-1 outputs dropped
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 6, generator=g, dtype=torch.float64)
    w = torch.randn(6, 3, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    want = torch.nn.functional.conv1d(x.transpose(1, 2), w[:, None, :], b, padding=2, groups=6)[..., :-2]
    torch.testing.assert_close(embkern.causal_depthwise_conv(x, w, b), want.transpose(1, 2), rtol=1e-12,
                               atol=1e-12)
    # general K, K > T, no bias
    w5 = torch.randn(6, 12, generator=g, dtype=torch.float64)
    want = torch.nn.functional.conv1d(x.transpose(1, 2), w5[:, None, :], None, padding=11, groups=6)[..., :-11]
    torch.testing.assert_close(embkern.causal_depthwise_conv(x, w5), want.transpose(1, 2), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- every backend

SHAPES = [  # B, H, Lq, Lk, d, dv, causal, q_offset
    (1, 2, 1, 1, 16, 16, True, None),
    (2, 2, 17, 17, 16, 16, True, None),
    (1, 2, 17, 49, 32, 16, True, None),      # memory M = 32
    (1, 1, 130, 130, 16, 16, True, None),
    (1, 2, 17, 17, 16, 32, False, None),
    (1, 2, 9, 20, 16, 16, True, 4),
]


def _id(s):
    return "x".join(map(str, s[:6])) + f"-c{int(s[6])}-o{s[7]}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_parity_fp32(backend, shape):
    *dims, causal, qo = shape
    dev = device_of(backend)
    require_backend(ops.DESCRIPTOR, "forward", backend, dev, torch.float32)
    args = _inputs(*dims, device=dev)
    testing.assert_parity(
        lambda *a: embkern.relative_attention(*a, causal=causal, q_offset=qo, max_distance=P, backend=backend),
        lambda *a: ref.attention(*a, causal=causal, q_offset=qo), args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_parity_low_precision(backend, dtype):
    dev = device_of(backend)
    require_backend(ops.DESCRIPTOR, "forward", backend, dev, dtype)
    args = _inputs(2, 2, 33, 40, 32, 32, dtype, device=dev)
    testing.assert_parity(lambda *a: embkern.relative_attention(*a, max_distance=P, backend=backend),
                          lambda *a: ref.attention(*a), args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[4], SHAPES[5]], ids=["memory", "noncausal", "offset"])
def test_gradients_of_q_k_v_and_the_three_tables(backend, shape):
    *dims, causal, qo = shape
    dev = device_of(backend)
    require_backend(ops.DESCRIPTOR, "backward", backend, dev, torch.float32)
    testing.assert_grad_parity(
        lambda *a: embkern.relative_attention(*a, causal=causal, q_offset=qo, max_distance=P, backend=backend),
        lambda *a: ref.attention(*a, causal=causal, q_offset=qo), _inputs(*dims, device=dev))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    dev = device_of(backend)
    require_backend(ops.DESCRIPTOR, "backward", backend, dev, torch.float64)
    args = [t.requires_grad_(True) for t in _inputs(1, 2, 3, 5, 4, 3, torch.float64, device=dev, P=8)]
    assert torch.autograd.gradcheck(
        lambda *a: embkern.relative_attention(*a, max_distance=8, backend=backend), args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_parity_and_gradients(backend):
    dev = device_of(backend)
    require_backend(ops.DESCRIPTOR, "conv_backward", backend, dev, torch.float32)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 130, 16, generator=g).to(dev)
    w = torch.randn(16, 3, generator=g).to(dev)
    b = torch.randn(16, generator=g).to(dev)
    testing.assert_parity(lambda *a: embkern.causal_depthwise_conv(*a, backend=backend),
                          ref.causal_depthwise_conv, (x, w, b))
    testing.assert_grad_parity(lambda *a: embkern.causal_depthwise_conv(*a, backend=backend),
                               ref.causal_depthwise_conv, (x, w, b))
    if torch.float64 in ops.DESCRIPTOR.backends[backend].dtypes:  # triton takes fp16 / bf16 / fp32 only
        xs = [t.double().requires_grad_(True) for t in (x[:1, :1, :7], w, b)]
        assert torch.autograd.gradcheck(lambda *a: embkern.causal_depthwise_conv(*a, backend=backend), xs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    dev = device_of(backend)
    require_backend(ops.DESCRIPTOR, "forward", backend, dev, torch.float32)
    q, k, v, R, S, u = _inputs(1, 2, 9, 9, 16, 16, device=dev)
    nc = [testing.noncontiguous(t) for t in (q, k, v)]
    assert not nc[0].is_contiguous()
    testing.assert_parity(lambda *a: embkern.relative_attention(*a, max_distance=P, backend=backend),
                          ref.attention, (*nc, R, S, u))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H", [(2, 2), (1, 2), (3, 1), (1, 1)])
def test_slices_of_a_cache_buffer_give_the_packed_result(backend, dtype, B, H):
    """k and v as slices [:, :, :Lk] of larger buffers (RelConvCache keeps them so; the cpu and triton
    forwards read them in place): the same bits as packed copies, with NaN in the buffers' unused rows (a
    read past a head's Lk rows, or a head step of Lk d, would show), for one decode token and a block."""
    dev = device_of(backend)
    require_backend(ops.DESCRIPTOR, "forward", backend, dev, dtype)
    for Lq, Lk in ((1, 45), (17, 40)):
        q, k, v, R, S, u = _inputs(B, H, Lq, Lk, 16, 8, dtype, seed=Lq, device=dev)
        with torch.no_grad():
            want = embkern.relative_attention(q, k, v, R, S, u, max_distance=P, backend=backend)
            got = embkern.relative_attention(q, in_cache_buffer(k, Lk + 3), in_cache_buffer(v, Lk + 19), R, S, u,
                                             max_distance=P, backend=backend)
        assert torch.equal(got, want), (Lq, Lk)


# --------------------------------------------------------------------------- torch.library


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    dev = device_of(backend)
    require_backend(ops.DESCRIPTOR, "backward", backend, dev, torch.float32)
    args = [t.requires_grad_(True) for t in _inputs(1, 2, 5, 7, 8, 4, device=dev)]
    torch.library.opcheck(torch.ops.embkern.rca_forward.default, (*args, True, 2, backend))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 4, generator=g).to(dev).requires_grad_(True)
    w = torch.randn(4, 3, generator=g).to(dev).requires_grad_(True)
    torch.library.opcheck(torch.ops.embkern.causal_conv.default, (x, w, None, backend))
    torch.library.opcheck(torch.ops.embkern.causal_conv.default, (x, w, torch.randn(4).requires_grad_(True),
                                                                  backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_forward_and_backward(backend):
    dev = device_of(backend)
    require_backend(ops.DESCRIPTOR, "backward", backend, dev, torch.float32)
    args = _inputs(1, 2, 5, 7, 8, 4, device=dev)
    cw = torch.randn(8, 3).to(dev)

    def f(q, k, v, R, S, u, cw):
        q = embkern.causal_depthwise_conv(q, cw, backend=backend)
        return embkern.relative_attention(q, k, v, R, S, u, max_distance=P, backend=backend).square().sum()

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True)
    a = [t.clone().requires_grad_(True) for t in (*args, cw)]
    b = [t.clone().requires_grad_(True) for t in (*args, cw)]
    cf(*a).backward()
    f(*b).backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)


# --------------------------------------------------------------------------- bad input


def test_bad_input_names_the_argument():
    q, k, v, R, S, u = _inputs(1, 2, 5, 7, 8, 4)
    ra = embkern.relative_attention
    with pytest.raises(ValueError, match=r"rel_emb: expected shape \(2 \* max_distance, H, d\)"):
        ra(q, k, v, R, S, u)  # the tables are for P = 160, max_distance defaults to 4096
    kw = dict(max_distance=P)
    with pytest.raises(ValueError, match=r"rel_bias: expected shape"):
        ra(q, k, v, R, S[:, :1], u, **kw)
    with pytest.raises(ValueError, match=r"content_bias: expected shape \(H, d\)"):
        ra(q, k, v, R, S, u[:1], **kw)
    with pytest.raises(ValueError, match=r"k: expected shape \(B, H, Lk, d\)"):
        ra(q, k[:, :1], v, R, S, u, **kw)
    with pytest.raises(ValueError, match=r"v: expected shape"):
        ra(q, k, v[:, :, :3], R, S, u, **kw)
    with pytest.raises(TypeError, match="k: expected dtype float32"):
        ra(q, k.double(), v, R, S, u, **kw)
    with pytest.raises(ValueError, match="q: expected a 4-d tensor"):
        ra(q[0], k, v, R, S, u, **kw)
    big = _inputs(1, 2, 5, P + 6, 8, 4)
    with pytest.raises(ValueError, match=f"max_distance: Lk = {P + 6} keys exceed max_distance = {P}"):
        ra(*big, **kw)
    with pytest.raises(ValueError, match="max_distance: query positions"):
        ra(q, k, v, R, S, u, causal=False, q_offset=-P - 10, **kw)
    with pytest.raises(TypeError, match="max_distance: expected an int"):
        ra(q, k, v, R, S, u, max_distance=160.0)
    with pytest.raises(TypeError, match="causal: expected a bool"):
        ra(q, k, v, R, S, u, causal=1, **kw)
    with pytest.raises(ValueError, match="backend: expected None or one of"):
        ra(q, k, v, R, S, u, backend="tpu", **kw)
    conv = embkern.causal_depthwise_conv
    with pytest.raises(ValueError, match=r"weight: expected shape \(C, K\) = \(8, K >= 1\)"):
        conv(q, torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"bias: expected shape \(C,\)"):
        conv(q, torch.randn(8, 3), torch.randn(3))
    with pytest.raises(ValueError, match="x: expected shape"):
        conv(torch.randn(8), torch.randn(8, 3))
    with pytest.raises(TypeError, match="weight: expected dtype float32"):
        conv(q, torch.randn(8, 3, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 0, 4), (2, 7, 0), (0, 7, 4), (0, 4)], ids=["T=0", "C=0", "N=0", "2-d T=0"])
def test_conv_of_an_empty_input(backend, shape):
    # reshape(-1, T, C) cannot infer the leading size of an empty tensor: the cpu path raised a
    # RuntimeError for T = 0 or C = 0 before the leading size was computed
    dev = device_of(backend)
    require_backend(ops.DESCRIPTOR, "conv_backward", backend, dev, torch.float32)
    C = shape[-1]
    x = torch.randn(shape, device=dev, requires_grad=True)
    w = torch.randn(C, 3, device=dev, requires_grad=True)
    b = torch.randn(C, device=dev, requires_grad=True)
    y = embkern.causal_depthwise_conv(x, w, b, backend=backend)
    assert y.shape == x.shape and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))
    assert torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_queries_or_no_keys_take_any_offset(backend):
    # with no (i, j) pair the offset reaches no table row: any int is valid, 2^70 too (it did not fit
    # the op's int64 schema: a RuntimeError that named no argument)
    dev = device_of(backend)
    require_backend(ops.DESCRIPTOR, "forward", backend, dev, torch.float32)
    for Lq, Lk in ((0, 5), (3, 0)):
        q, k, v, R, S, u = _inputs(1, 2, Lq, Lk, 8, 4, device=dev)
        for off in (2**70, -2**70, 2**62):
            out = embkern.relative_attention(q, k, v, R, S, u, causal=False, q_offset=off, max_distance=P,
                                             backend=backend)
            assert out.shape == (1, 2, Lq, 4) and not out.any()


def test_inputs_too_big_for_memory_are_refused_up_front():
    # expanded views: a few bytes of storage, but the output (and the contiguous copies) would need
    # about 20 TB; a MemoryError with the size, before anything is allocated
    one = torch.randn(1, 1, 1, 8)
    q = k = v = one.expand(2**28, 2, 2**10, 8)
    R, S, u = torch.randn(4096, 2, 8), torch.randn(4096, 2), torch.randn(2, 8)
    for be in (None, "reference"):
        with pytest.raises(MemoryError, match=r"relative_attention\(backend=.*\) of q \(268435456, 2, 1024, 8\).* GB"):
            embkern.relative_attention(q, k, v, R, S, u, max_distance=2048, backend=be)
        with pytest.raises(MemoryError, match=r"causal_depthwise_conv: the output of x \(1073741824, 1024, 4\).* GB"):
            embkern.causal_depthwise_conv(torch.randn(1, 1, 4).expand(2**30, 2**10, 4), torch.randn(4, 3),
                                          backend=be)


def test_a_query_that_sees_no_key_outputs_zeros():
    q, k, v, R, S, u = _inputs(1, 2, 4, 4, 8, 8)
    out = embkern.relative_attention(q, k, v, R, S, u, q_offset=-2, max_distance=P)
    assert torch.all(out[:, :, :2] == 0) and torch.isfinite(out).all()
    assert not torch.all(out[:, :, 2:] == 0)
    assert math.isfinite(float(out.sum()))
    for qo in (-5, -2**40, -2**70):  # no query sees a key: zeros and zero gradients, even past int64
        qq = q.detach().clone().requires_grad_(True)
        out = embkern.relative_attention(qq, k, v, R, S, u, q_offset=qo, max_distance=P)
        assert torch.all(out == 0)
        out.sum().backward()
        assert torch.all(qq.grad == 0)


# --------------------------------------------------------------------------- the layer


def _layer(conv, rel="learned", memory_len=0, seed=0):
    from embkern.nn import RelConvMultiHeadAttention

    torch.manual_seed(seed)
    m = RelConvMultiHeadAttention(32, 4, conv=conv, rel=rel, memory_len=memory_len, max_distance=P).double()
    with torch.no_grad():  # non-zero relative terms, so they are exercised
        for name, p in m.named_parameters():
            if name in ("rel_emb", "rel_bias", "content_bias", "pos_bias"):
                p.normal_(0, 0.3)
    return m


def test_rmha_with_zero_tables_is_plain_causal_attention():
    from embkern.nn import RelConvMultiHeadAttention

    torch.manual_seed(0)
    m = RelConvMultiHeadAttention(32, 4, conv=None, max_distance=P).double()
    z = torch.randn(2, 9, 32, dtype=torch.float64)
    q, k, v = (w(z).view(2, 9, 4, 8).transpose(1, 2) for w in (m.w_q, m.w_k, m.w_v))
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    want = m.w_o(o.transpose(1, 2).reshape(2, 9, 32))
    out, mem = m(z)
    assert mem is None
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_rmha_memory_segments_equal_the_full_sequence():
    # without the q conv, a segment attending over its memory sees exactly what the full sequence sees
    m = _layer(None, memory_len=8)
    z = torch.randn(1, 14, 32, dtype=torch.float64)
    full, _ = m(z)
    first, mem = m(z[:, :8])
    assert mem.shape == (1, 8, 32) and not mem.requires_grad
    second, mem2 = m(z[:, 8:], mem)
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mem2, z[:, 6:])


@pytest.mark.parametrize("conv", ["shared", "per_head"])
def test_rcmha_by_hand(conv):
    m = _layer(conv, memory_len=4)
    mem = torch.randn(2, 4, 32, dtype=torch.float64)
    z = torch.randn(2, 5, 32, dtype=torch.float64)
    full = torch.cat([mem, z], dim=1)

    def conv_of(x, c):
        if conv == "shared":
            xh = x.view(x.shape[0], x.shape[1], 4, 8).transpose(1, 2)
            return ref.causal_depthwise_conv(xh, c.weight, c.bias).transpose(1, 2).reshape(x.shape)
        return ref.causal_depthwise_conv(x, c.weight, None)

    q = conv_of(m.w_q(z), m.convs["q"])  # the segment only
    k, v = conv_of(m.w_k(full), m.convs["k"]), conv_of(m.w_v(full), m.convs["v"])
    q, k, v = (t.view(2, -1, 4, 8).transpose(1, 2) for t in (q, k, v))
    o = ref.authors_attention(q, k, v, m.rel_emb, m.rel_bias, m.content_bias)
    want = m.w_o(o.transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(m(z, mem)[0], want, rtol=1e-12, atol=1e-12)
    if conv == "per_head":
        assert m.convs["q"].bias is None and torch.all(m.convs["q"].weight[:, -1] == 0.5)


@pytest.mark.parametrize("conv,rel", [("shared", "learned"), ("per_head", "sinusoidal"), (None, "learned")])
def test_layer_gradients_reach_every_parameter(conv, rel):
    m = _layer(conv, rel, memory_len=3)
    z = torch.randn(2, 6, 32, dtype=torch.float64)
    _, mem = m(z)
    out, _ = m(z, mem)
    out.square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("memory_len", [0, 5])
def test_sinusoidal_layer_equals_the_full_table_definition(memory_len):
    # the layer computes only the Lk table rows a causal call reads (at P = Lk): it must equal
    # relative attention over the whole (2 max_distance)-row table, values and every gradient
    m = _layer("shared", "sinusoidal", memory_len=memory_len)
    z = torch.randn(2, 7, 32, dtype=torch.float64, requires_grad=True)
    mem = torch.randn(2, memory_len, 32, dtype=torch.float64) if memory_len else None
    full = z if mem is None else torch.cat([mem, z], dim=1)
    cq, ck, cv = (m.convs[n] for n in "qkv")

    def conv_of(x, c):
        xh = x.view(x.shape[0], x.shape[1], 4, 8).transpose(1, 2)
        return ref.causal_depthwise_conv(xh, c.weight, c.bias)

    q, k, v = conv_of(m.w_q(z), cq), conv_of(m.w_k(full), ck), conv_of(m.w_v(full), cv)
    R, S = m.tables()
    assert R.shape == (2 * P, 4, 8) and S.shape == (2 * P, 4)
    o = ref.attention(q, k, v, R, S, m.content_bias, causal=True, q_offset=memory_len)
    want = m.w_o(o.transpose(1, 2).reshape(2, 7, 32))
    params = [z, m.w_r.weight, m.pos_bias, m.content_bias, m.w_q.weight, ck.weight]
    g_want = torch.autograd.grad(want.square().sum(), params)
    got = m(z, mem)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w, name in zip(torch.autograd.grad(got.square().sum(), params), g_want,
                          ("z", "w_r", "pos_bias", "content_bias", "w_q", "conv k")):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("rel", ["learned", "sinusoidal"])
def test_layer_tables_span_are_the_middle_rows(rel):
    m = _layer(None, rel)
    R, S = m.tables()
    R3, S3 = m.tables(span=3)
    assert R3.shape == (6, 4, 8) and S3.shape == (6, 4)
    torch.testing.assert_close(R3, R[P - 3:P + 3], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S3, S[P - 3:P + 3], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="span: expected at most max_distance"):
        m.tables(span=P + 1)


@pytest.mark.parametrize("conv,rel", [("shared", "learned"), ("per_head", "sinusoidal"), (None, "sinusoidal"),
                                      ("shared", "sinusoidal")])
@pytest.mark.parametrize("B,L,M", [(0, 3, 0), (0, 3, 2), (2, 0, 0), (2, 0, 2), (2, 3, 0)])
def test_layer_empty_batch_segment_or_memory(conv, rel, B, L, M):
    # a view(..., -1) of a zero-size tensor cannot infer the size: (0, 3, 32) once raised there
    m = _layer(conv, rel, memory_len=2)
    z = torch.randn(B, L, 32, dtype=torch.float64, requires_grad=True)
    mem = torch.randn(B, M, 32, dtype=torch.float64) if M else None
    out, new_mem = m(z, mem)
    assert out.shape == (B, L, 32) and new_mem.shape == (B, min(2, L + M), 32)
    out.sum().backward()
    assert z.grad.shape == z.shape
    if B and L:  # the same rows as a non-empty memory of zero length would give
        torch.testing.assert_close(out, m(z, torch.zeros(B, 0, 32, dtype=torch.float64))[0], rtol=0, atol=0)


@pytest.mark.parametrize("conv,rel", [("shared", "learned"), ("per_head", "sinusoidal"), (None, "learned"),
                                      ("shared", "sinusoidal")])
@pytest.mark.parametrize("steps", [[1] * 20, [5, 1, 1, 3, 1, 7, 1, 1, 2], [9, 9], [0, 2, 0, 1]])
@pytest.mark.parametrize("memory_len", [6, 1])
def test_cache_decode_equals_the_memory_path(conv, rel, steps, memory_len):
    # a cache holds the memory rows' projections before and after the conv; every step must equal the
    # hidden-state memory path while the window fills, slides and the buffers are compacted (16 rows at
    # first); memory_len 1 is shorter than the conv's 2 rows of context
    from embkern.nn import RelConvCache

    m = _layer(conv, rel, memory_len=memory_len)
    x = torch.randn(2, sum(steps), 32, dtype=torch.float64)
    cache, mem, t = RelConvCache(), None, 0
    with torch.no_grad():
        for n in steps:
            z = x[:, t:t + n]
            want, mem = m(z, mem)
            got, none = m(z, cache=cache)
            assert none is None and cache.length == (0 if mem is None else mem.shape[1])
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"rows {t}..{t + n}")
            t += n


@pytest.mark.parametrize("conv", ["shared", None])
def test_cache_reorder_keeps_the_chosen_rows_as_beam_search_does(conv):
    # rows 2, 0, 0 of a batch of 3, mid-window (memory_len 6 after 8 rows, so the window has slid): each next
    # step must equal the memory path over those rows' memories
    from embkern.nn import RelConvCache

    m = _layer(conv, memory_len=6)
    x = torch.randn(3, 8, 32, dtype=torch.float64)
    cont = torch.randn(3, 4, 32, dtype=torch.float64)
    idx = [2, 0, 0]
    with torch.no_grad():
        cache = RelConvCache()
        _, mem = m(x, cache=cache)
        _, mem = m(x, None)
        cache.reorder(torch.tensor(idx))
        mem = mem[idx]
        for t in range(4):
            want, mem = m(cont[:, t:t + 1], mem)
            got, _ = m(cont[:, t:t + 1], cache=cache)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"step {t}")
        cache.reorder(np.array([1]))
        assert cache.length == 6 and m(cont[:1, :1], cache=cache)[0].shape == (1, 1, 32)
        with pytest.raises(ValueError, match=r"index: expected indices in \[0, 1\)"):
            cache.reorder([1])
        with pytest.raises(ValueError, match=r"z: expected batch 1"):
            m(cont[:, :1], cache=cache)


def test_cache_under_inference_mode_then_no_grad():
    from embkern.nn import RelConvCache

    m = _layer("shared", memory_len=4)
    x = torch.randn(1, 7, 32, dtype=torch.float64)
    cache = RelConvCache()
    with torch.inference_mode():
        m(x[:, :5], cache=cache)
    with torch.no_grad():  # buffers made under inference_mode cannot be written outside it: replaced
        got = m(x[:, 5:], cache=cache)[0]
        want = m(x[:, 5:], x[:, 1:5])[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_cache_bad_use():
    from embkern.nn import RelConvCache

    m = _layer("shared", memory_len=4)
    x = torch.randn(2, 3, 32, dtype=torch.float64)
    cache = RelConvCache()
    with pytest.raises(ValueError, match="cache: is for inference"):
        m(x, cache=cache)
    with pytest.raises(TypeError, match="cache: expected a RelConvCache"):
        m(x, cache={})
    with torch.no_grad():
        with pytest.raises(ValueError, match="memory: expected None with a cache"):
            m(x, x, cache=cache)
        with pytest.raises(ValueError, match="memory_len = 0"):
            _layer("shared")(x, cache=cache)
        m(x, cache=cache)
        with pytest.raises(ValueError, match="filled by another"):
            _layer("shared", memory_len=4)(x, cache=cache)
        with pytest.raises(ValueError, match=r"z: expected batch 2"):
            m(x[:1], cache=cache)
        with pytest.raises(TypeError, match="z: expected dtype float64"):
            m(x.float(), cache=cache)
        with pytest.raises(ValueError, match="max_distance"):
            m(torch.randn(2, P, 32, dtype=torch.float64), cache=cache)
        assert cache.length == 3  # the refused calls left it as it was
        for w in (m.w_k.weight, m.w_v.bias, m.convs["k"].weight, m.convs["v"].bias):
            w.add_(1.0)  # stale rows: an optimizer step between calls
            with pytest.raises(ValueError, match="W_k, W_v or K/V conv weights changed"):
                m(x, cache=cache)
            cache.reset()
            assert cache.length == 0
            m(x, cache=cache)
        m.w_q.weight.add_(1.0)  # not cached: no reset needed
        m(x, cache=cache)


def test_layer_bad_arguments():
    from embkern.nn import RelConvMultiHeadAttention

    with pytest.raises(ValueError, match="conv: expected one of"):
        RelConvMultiHeadAttention(32, 4, conv="full")
    with pytest.raises(ValueError, match="rel: expected one of"):
        RelConvMultiHeadAttention(32, 4, rel="rotary")
    with pytest.raises(ValueError, match="d_model: expected a multiple of n_heads"):
        RelConvMultiHeadAttention(30, 4)
    m = RelConvMultiHeadAttention(32, 4, max_distance=8)
    with pytest.raises(ValueError, match="max_distance"):
        m(torch.randn(1, 12, 32))
    with pytest.raises(ValueError, match="max_distance"):  # segment and memory together exceed it
        m(torch.randn(1, 5, 32), torch.randn(1, 4, 32))
    with pytest.raises(ValueError, match=r"z: expected shape \(B, L, d_model\) = \(B, L, 32\)"):
        m(torch.randn(1, 5, 16))
    with pytest.raises(ValueError, match=r"memory: expected shape \(B, M, d_model\) = \(1, M, 32\)"):
        m(torch.randn(1, 5, 32), torch.randn(2, 2, 32))
    with pytest.raises(TypeError, match="memory"):
        m(torch.randn(1, 5, 32), torch.randn(1, 2, 32, dtype=torch.float64))
    with pytest.raises(TypeError, match="z: expected dtype float32 \\(the dtype of the layer's weights\\)"):
        m(torch.randn(1, 5, 32, dtype=torch.float64))


# --------------------------------------------------------------------------- bench workloads, real data


def test_bench_workloads_run_and_agree_with_the_reference(monkeypatch):
    from embkern import bench
    from embkern.bench import rel_conv_attention as rb

    monkeypatch.setenv(bench.TINY_ENV, "1")
    ws = rb.workloads(quick=True, device=torch.device("cpu"))
    assert [w.name for w in ws] == ["forward L=32", "forward+backward L=32", "decode 1 x 48", "layer decode 1 x 48"]
    for w in ws:
        w.setup()
        try:
            want = w.reference64()
            for name, fn in {**w.backends, **w.anchors}.items():
                out = fn()
                if name not in w.no_error:
                    assert w.error(out, want) < 1e-4, (w.name, name)
        finally:
            w.teardown()



@pytest.mark.parametrize("Lq,Lk,causal,qo", [(17, 17, True, None), (5, 21, True, None), (6, 30, False, None),
                                             (9, 9, True, 3)])
def test_flex_attention_anchor_equals_the_reference(Lq, Lk, causal, qo):
    # the GPU timing's FlexAttention anchor (precomputed q . R bias in score_mod, causal block mask): its
    # forward, eager on the CPU in float64 (FlexAttention has no CPU backward), is the reference's
    from embkern.bench import rel_conv_attention as rb

    pytest.importorskip("torch.nn.attention.flex_attention")
    args = _inputs(2, 3, Lq, Lk, 16, 16, torch.float64)
    with torch.no_grad():
        got = rb.flex_relative_attention(*args, causal=causal, q_offset=qo, compiled=False)
    torch.testing.assert_close(got, ref.attention(*args, causal=causal, q_offset=qo), rtol=1e-12, atol=1e-12)
    q, k, v, R, S, u = args
    bias = rb.relative_bias(q, R, S, Lk, qo)
    off = Lk - Lq if qo is None else qo
    for i, j in ((0, 0), (Lq - 1, Lk - 1), (Lq // 2, 1)):
        r = P + j - i - off
        torch.testing.assert_close(bias[1, 2, i, j], q[1, 2, i] @ R[r, 2] + S[r, 2], rtol=1e-12, atol=1e-12)

def test_char_lm_trains_mha_rmha_rcmha_on_the_same_batches():
    from embkern.contrib import char_lm
    from helpers import oracle

    if char_lm.corpus_path() is None:
        oracle("gensim")
    res = char_lm.train_models(("vanilla", "rmha", "rcmha"), steps=3, batch=2, context=16, d=16, heads=2,
                               layers=1, max_chars=20_000, backends=(None, "reference"), progress=False)
    assert set(res["curves"]) == {"vanilla", "rmha[auto]", "rmha[reference]", "rcmha[auto]", "rcmha[reference]"}
    assert res["max_abs_diff_between_backends"]["rcmha"] < 1e-5
    assert res["curves"]["rmha[auto]"] != res["curves"]["rcmha[auto]"]
