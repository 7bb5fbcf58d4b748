"""Selective self-attention (docs/ops/selective_attention.md): reference semantics, parity and gradients of
every backend the descriptor declares, temperatures, torch.library, bad input."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import embkern
from embkern import testing
from embkern.ops import selective_attention as ops
from embkern.reference import selective_attention as ref
from helpers import backend_params, device_of, in_cache_buffer, require_backend

BACKENDS = backend_params(*ops.DESCRIPTOR.backends)


def _inputs(B, Hq, Hkv, Lq, Lk, d, dv, dtype=torch.float32, seed=0, device="cpu", tau_v=True):
    g = torch.Generator().manual_seed(seed)

    def rn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(device)

    q, k, v = rn(B, Hq, Lq, d), rn(B, Hkv, Lk, d), rn(B, Hkv, Lk, dv)
    tq = (0.5 + torch.rand(B, Hq, Lq, generator=g, dtype=torch.float64)).float().to(device)
    tv = (0.5 + torch.rand(B, Hkv, Lk, generator=g, dtype=torch.float64)).float().to(device) if tau_v else None
    return q, k, v, tq, tv


# --------------------------------------------------------------------------- semantics of the reference


def test_reference_equals_sdpa_on_prescaled_inputs():
    # tau_q depends only on the query row, so scaling q is exact (the spec's anchor)
    q, k, v, tq, tv = _inputs(2, 3, 3, 9, 9, 16, 8, torch.float64)
    for causal in (True, False):
        want = F.scaled_dot_product_attention(q * tq.double()[..., None], k, v * tv.double()[..., None],
                                              is_causal=causal)
        got = ref.attention(q, k, v, tq.double(), tv.double(), causal=causal)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_reference_mask_uses_absolute_positions_and_q_offset():
    q, k, v, tq, tv = _inputs(1, 2, 2, 3, 8, 8, 8, torch.float64)
    # q_offset = 2: query i sees keys 0..i+2; by hand, one row at a time
    got = ref.attention(q, k, v, tq.double(), tv.double(), causal=True, q_offset=2)
    for i in range(3):
        n = i + 3
        s = tq.double()[0, :, i, None] * torch.einsum("hd,hnd->hn", q[0, :, i], k[0, :, :n]) / math.sqrt(8)
        p = torch.softmax(s, -1)
        want = (p[..., None] * (tv.double()[0, :, :n, None] * v[0, :, :n])).sum(1)
        torch.testing.assert_close(got[0, :, i], want, rtol=1e-12, atol=1e-12)
    # a query that sees no key gives zeros, and its lse is -inf
    out, lse = ref.attention_forward(q, k, v, tq.double(), None, True, None, -1)
    assert torch.all(out[:, :, 0] == 0) and torch.all(torch.isinf(lse[:, :, 0]))
    assert torch.isfinite(out).all()


def test_reference_gqa_reads_kv_head_h_div_groups():
    q, k, v, tq, tv = _inputs(1, 6, 2, 4, 5, 8, 4, torch.float64)
    got = ref.attention(q, k, v, tq.double(), tv.double(), causal=False)
    ke, ve, tve = (t.repeat_interleave(3, dim=1) for t in (k, v, tv.double()))
    torch.testing.assert_close(got, ref.attention(q, ke, ve, tq.double(), tve, causal=False), rtol=0, atol=0)


def test_reference_backward_matches_autograd():
    for causal, qo in ((True, None), (False, None), (True, -2), (True, 3)):
        q, k, v, tq, tv = _inputs(2, 4, 2, 5, 7, 8, 6, torch.float64)
        leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v, tq, tv)]
        out, lse = ref.attention_forward(*leaves, causal, None, qo)
        g = torch.randn_like(out)
        want = torch.autograd.grad((out * g).sum(), leaves)
        got = ref.attention_backward(g, *[t.detach() for t in leaves], out.detach(), lse.detach(), causal, None,
                                     qo)
        for name, a, b in zip(("dq", "dk", "dv", "dtau_q", "dtau_v"), got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_authors_formulation_equals_reference():
    q, k, v, tq, tv = _inputs(1, 2, 2, 6, 6, 8, 8, torch.float64)
    torch.testing.assert_close(ref.authors_attention(q, k, v, tq.double(), tv.double()),
                               ref.attention(q, k, v, tq.double(), tv.double()), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- every backend: parity, gradients

SHAPES = [  # B, Hq, Hkv, Lq, Lk, d, dv, causal, q_offset
    (1, 2, 2, 1, 1, 16, 16, True, None),
    (2, 4, 2, 7, 7, 32, 16, True, None),
    (1, 4, 1, 7, 129, 64, 64, True, None),
    (1, 2, 2, 129, 129, 16, 32, False, None),
    (2, 2, 1, 5, 12, 128, 64, True, 3),
    (1, 3, 3, 7, 7, 16, 16, True, -2),
    (1, 2, 1, 5, 40, 256, 256, True, None),  # head dim 256: the GPU's smallest tile class
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:7])) + f"-c{int(s[7])}-o{s[8]}")
def test_parity_fp32(backend, shape):
    *dims, causal, qo = shape
    dev = device_of(backend)
    require_backend(ops.DESCRIPTOR, "forward", backend, dev, torch.float32)
    q, k, v, tq, tv = _inputs(*dims, device=dev)
    testing.assert_parity(lambda *a: embkern.selective_attention(*a, causal=causal, q_offset=qo, backend=backend),
                          lambda *a: ref.attention(*a, causal=causal, q_offset=qo), (q, k, v, tq, tv))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,Hkv", [(2, 2), (1, 2), (3, 1), (1, 1)])
def test_slices_of_a_cache_buffer_give_the_packed_result(backend, dtype, B, Hkv):
    """k, v and tau_v as slices [:, :, :Lk] of larger buffers (KVCache keeps them so; the cpu and triton
    forwards read them in place): the same result as packed copies, with NaN in the buffers' unused rows
    (a read past a head's Lk rows would show), for one decode token and a block of queries."""
    dev = device_of(backend)
    require_backend(ops.DESCRIPTOR, "forward", backend, dev, dtype)
    for Lq, Lk in ((1, 45), (17, 40)):
        q, k, v, tq, tv = _inputs(B, 2 * Hkv, Hkv, Lq, Lk, 16, 8, dtype, seed=Lq, device=dev)

        with torch.no_grad():
            want = embkern.selective_attention(q, k, v, tq, tv, backend=backend)
            got = embkern.selective_attention(q, in_cache_buffer(k, Lk + 3), in_cache_buffer(v, Lk + 19), tq,
                                              in_cache_buffer(tv, Lk + 64), backend=backend)
        assert torch.equal(got, want), (Lq, Lk)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_parity_low_precision(backend, dtype):
    dev = device_of(backend)
    require_backend(ops.DESCRIPTOR, "forward", backend, dev, dtype)
    q, k, v, tq, tv = _inputs(2, 4, 2, 33, 40, 64, 32, dtype, device=dev)
    testing.assert_parity(lambda *a: embkern.selective_attention(*a, backend=backend),
                          lambda *a: ref.attention(*a), (q, k, v, tq, tv))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [64, 256])
def test_gradients_low_precision(backend, d):
    """bf16 gradients at head dims 64 and 256 (on the GPU the two tile classes of 16-bit inputs; at 256 the
    key-block kernel takes 64 x 64, the 128 x 32 it had needed 290 KiB of shared memory)."""
    dev = device_of(backend)
    require_backend(ops.DESCRIPTOR, "backward", backend, dev, torch.bfloat16)
    q, k, v, tq, tv = _inputs(1, 2, 1, 20, 37, d, d, torch.bfloat16, device=dev)
    testing.assert_grad_parity(lambda *a: embkern.selective_attention(*a, backend=backend),
                               lambda *a: ref.attention(*a), (q, k, v, tq, tv))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[4], SHAPES[5], SHAPES[6]],
                         ids=["gqa", "offset", "negative-offset", "head-256"])
def test_gradients(backend, shape):
    *dims, causal, qo = shape
    dev = device_of(backend)
    require_backend(ops.DESCRIPTOR, "backward", backend, dev, torch.float32)
    q, k, v, tq, tv = _inputs(*dims, device=dev)
    testing.assert_grad_parity(
        lambda *a: embkern.selective_attention(*a, causal=causal, q_offset=qo, backend=backend),
        lambda *a: ref.attention(*a, causal=causal, q_offset=qo), (q, k, v, tq, tv))


@pytest.mark.triton
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3], SHAPES[4], SHAPES[5]],
                         ids=["gqa", "full-129", "offset", "negative-offset"])
def test_triton_kernels_take_their_own_tiles(shape, monkeypatch):
    """The forward, the key-block and the query-block kernel each take their own (BM, BN, warps) from
    ``_cfg``, as fp32 does on the GPU: here 32 x 16, 16 x 32 and 32 x 32 (rows ending mid-tile, key blocks
    the query blocks do not line up with)."""
    from embkern.triton_kernels import selective_attention as tk

    *dims, causal, qo = shape
    dev = device_of("triton")
    require_backend(ops.DESCRIPTOR, "backward", "triton", dev, torch.float32)
    monkeypatch.setattr(tk, "_cfg", lambda t, d: dict(fwd=(32, 16, 1), kv=(16, 32, 1), q=(32, 32, 1), stages=1))
    q, k, v, tq, tv = _inputs(*dims, device=dev)
    fast = lambda *a: embkern.selective_attention(*a, causal=causal, q_offset=qo, backend="triton")  # noqa: E731
    slow = lambda *a: ref.attention(*a, causal=causal, q_offset=qo)  # noqa: E731
    testing.assert_parity(fast, slow, (q, k, v, tq, tv))
    testing.assert_grad_parity(fast, slow, (q, k, v, tq, tv))


def test_triton_gpu_tiles():
    """The tiles _cfg gives a CUDA tensor: each kernel a (BM, BN, warps) of powers of two from 16 (the
    tl.dot minimum) and 4 or 8 warps, for every dtype and head-dim class."""
    import types

    pytest.importorskip("triton")
    from embkern.triton_kernels import selective_attention as tk

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for d in (8, 64, 65, 128, 129, 256):
            c = tk._cfg(types.SimpleNamespace(device=types.SimpleNamespace(type="cuda"), dtype=dtype), d)
            for name in ("fwd", "kv", "q"):
                BM, BN, warps = c[name]
                assert BM >= 16 and BN >= 16 and BM & (BM - 1) == 0 and BN & (BN - 1) == 0, (dtype, d, c)
                assert warps in (4, 8), (dtype, d, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_and_no_value_temperature(backend):
    dev = device_of(backend)
    require_backend(ops.DESCRIPTOR, "forward", backend, dev, torch.float32)
    q, k, v, tq, _ = _inputs(2, 4, 2, 9, 9, 16, 16, device=dev, tau_v=False)
    qt, kt, vt = (testing.noncontiguous(t) for t in (q, k, v))
    assert not qt.is_contiguous()
    testing.assert_parity(lambda *a: embkern.selective_attention(*a, None, backend=backend),
                          lambda *a: ref.attention(*a, None), (qt, kt, vt, tq))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    dev = device_of(backend)
    require_backend(ops.DESCRIPTOR, "backward", backend, dev, torch.float64)
    q, k, v, tq, tv = _inputs(1, 2, 1, 3, 4, 4, 3, torch.float64, device=dev)
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v, tq, tv)]
    assert torch.autograd.gradcheck(lambda *a: embkern.selective_attention(*a, backend=backend), leaves)


# --------------------------------------------------------------------------- temperatures


def test_temperatures_formula_and_positions():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64)
    beta = torch.tensor([1.5, 2.0, 0.5], dtype=torch.float64)
    u = torch.randn(3, 8, generator=g, dtype=torch.float64)
    tau = embkern.selective_temperatures(x, 4, beta, u)  # decode after a 4-token cache: n = 5..9
    n = torch.arange(5, 10, dtype=torch.float64)
    want = 1 + torch.exp(-torch.exp(beta))[None, :, None] * torch.log(n) + torch.tanh(
        (F.gelu(x) * u[None, :, None, :]).sum(-1))
    torch.testing.assert_close(tau, want, rtol=1e-12, atol=1e-12)
    # the same positions as a tensor, and per batch
    torch.testing.assert_close(embkern.selective_temperatures(x, torch.arange(4, 9), beta, u), want)
    torch.testing.assert_close(embkern.selective_temperatures(x, torch.arange(4, 9)[None].expand(2, 5), beta, u),
                               want)
    # gates
    a = torch.tensor(0.3, dtype=torch.float64)
    s = embkern.selective_temperatures(x, 0, a, None, gate="sigmoid")
    torch.testing.assert_close(s, (1 + torch.sigmoid(a) * torch.log(torch.arange(1, 6).double())).expand(2, 3, 5))
    lin = embkern.selective_temperatures(x, 0, a, None, gate="linear")
    torch.testing.assert_close(lin, (1 + a * torch.log(torch.arange(1, 6).double())).expand(2, 3, 5))
    # no term at all: vanilla attention
    assert torch.all(embkern.selective_temperatures(x, 0) == 1)


def test_temperatures_gradients_reach_the_parameters():
    x = torch.randn(1, 2, 4, 8, dtype=torch.float64, requires_grad=True)
    beta = torch.tensor([1.0, -0.5], dtype=torch.float64, requires_grad=True)
    u = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b, u: embkern.selective_temperatures(x, 3, b, u), (x, beta, u))


def test_temperatures_into_attention_decode_equals_prefill():
    # n from absolute positions: decoding token by token with the cache equals the full forward
    g = torch.Generator().manual_seed(3)
    L, d = 6, 8
    q, k, v = (torch.randn(1, 2, L, d, generator=g, dtype=torch.float64) for _ in range(3))
    beta, u = torch.tensor(0.2, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    full = embkern.selective_attention(q, k, v, embkern.selective_temperatures(q, 0, beta, u),
                                       embkern.selective_temperatures(v, 0, beta, u))
    steps = []
    for t in range(L):
        tq = embkern.selective_temperatures(q[:, :, t:t + 1], t, beta, u)
        tv = embkern.selective_temperatures(v[:, :, :t + 1], 0, beta, u)
        steps.append(embkern.selective_attention(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], tq, tv))
    torch.testing.assert_close(torch.cat(steps, dim=2), full, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- torch.library


def _op_args(backend):
    q, k, v, tq, tv = _inputs(1, 4, 2, 5, 6, 8, 4, device=device_of(backend))
    return q, k, v, tq, tv, True, 1 / math.sqrt(8), 1, backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    require_backend(ops.DESCRIPTOR, "forward", backend, device_of(backend), torch.float32)
    args = _op_args(backend)
    leaves = [t.requires_grad_(True) for t in args[:5]]
    torch.library.opcheck(torch.ops.embkern.ssa_forward.default, (*leaves, *args[5:]))
    no_tv = (*[t.detach() for t in args[:4]], None, *args[5:])
    torch.library.opcheck(torch.ops.embkern.ssa_forward.default, no_tv)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_forward_and_backward(backend):
    require_backend(ops.DESCRIPTOR, "backward", backend, device_of(backend), torch.float32)
    q, k, v, tq, tv = _inputs(1, 4, 2, 5, 6, 8, 4, device=device_of(backend))

    def f(q, k, v, tq, tv):
        return embkern.selective_attention(q, k, v, tq, tv, backend=backend).square().sum()

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, tq, tv)]
    eager = [t.clone().requires_grad_(True) for t in (q, k, v, tq, tv)]
    cf(*leaves).backward()
    f(*eager).backward()
    for a, b in zip(leaves, eager):
        torch.testing.assert_close(a.grad, b.grad)


def test_compiled_call_rejects_non_finite_temperature():
    q, k, v, tq, tv = _inputs(1, 2, 2, 4, 4, 8, 8)
    tq[0, 1, 2] = float("nan")
    torch._dynamo.reset()
    cf = torch.compile(lambda *a: embkern.selective_attention(*a), fullgraph=True)
    with pytest.raises(Exception, match="tau_q"):
        cf(q, k, v, tq, tv)


# --------------------------------------------------------------------------- bad input


def test_bad_input_names_the_argument():
    q, k, v, tq, tv = _inputs(1, 4, 2, 5, 6, 8, 4)
    sa = embkern.selective_attention
    with pytest.raises(TypeError, match="q: expected a torch.Tensor"):
        sa(q.numpy(), k, v, tq)
    with pytest.raises(ValueError, match="q: expected a 4-d tensor"):
        sa(q[0], k, v, tq)
    with pytest.raises(TypeError, match="k: expected dtype float32"):
        sa(q, k.double(), v, tq)
    with pytest.raises(ValueError, match="k: expected head dim 8"):
        sa(q, k[..., :4], v, tq)
    with pytest.raises(ValueError, match="v: expected"):
        sa(q, k, v[:, :, :3], tq)
    with pytest.raises(ValueError, match="k, v: expected batch 1"):
        sa(q, torch.cat([k, k]), torch.cat([v, v]), tq)
    with pytest.raises(ValueError, match="positive multiple of Hkv"):
        sa(q[:, :3], k, v, tq[:, :3])
    with pytest.raises(ValueError, match=r"tau_q: expected shape \(B, Hq, Lq\)"):
        sa(q, k, v, tq[:, :, :2])
    with pytest.raises(ValueError, match=r"tau_v: expected shape \(B, Hkv, Lk\)"):
        sa(q, k, v, tq, tq)
    with pytest.raises(TypeError, match="tau_q: expected a floating tensor"):
        sa(q, k, v, tq.long())
    bad = tq.clone()
    bad[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="tau_q: expected finite values"):
        sa(q, k, v, bad)
    with pytest.raises(ValueError, match="scale: expected None or a finite float > 0"):
        sa(q, k, v, tq, scale=-1.0)
    for bad_scale in (float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="scale: expected None or a finite float > 0"):
            sa(q, k, v, tq, scale=bad_scale)
    torch.testing.assert_close(sa(q, k, v, tq, scale=np.float32(0.5)), sa(q, k, v, tq, scale=0.5), rtol=0, atol=0)
    with pytest.raises(TypeError, match="q_offset: expected an int"):
        sa(q, k, v, tq, q_offset=1.5)
    with pytest.raises(TypeError, match="causal: expected a bool"):
        sa(q, k, v, tq, causal="yes")
    with pytest.raises(ValueError, match="backend: expected None or one of"):
        sa(q, k, v, tq, backend="gpu")
    with pytest.raises(RuntimeError, match="backend='cpu' is unavailable.*float16"):
        sa(q.half(), k.half(), v.half(), tq, backend="cpu")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="k: expected device"):
            sa(q, k.cuda(), v, tq)


@pytest.mark.parametrize("backend", BACKENDS)
def test_offsets_beyond_the_keys_equal_the_clamped_offset(backend):
    # q_offset >= Lk shows every key and q_offset <= -Lq none: offsets out at 2^62 and past int64 give
    # the clamped offset's bits (the kernels once computed i + q_offset near 2^63, and a Python int past
    # 2^63 did not fit the op's schema: a RuntimeError that named no argument)
    dev = device_of(backend)
    require_backend(ops.DESCRIPTOR, "forward", backend, dev, torch.float32)
    q, k, v, tq, tv = _inputs(1, 2, 2, 3, 5, 8, 8, device=dev)
    sa = lambda off: embkern.selective_attention(q, k, v, tq, tv, q_offset=off, backend=backend)  # noqa: E731
    every, none = sa(5), sa(-3)
    assert torch.equal(none, torch.zeros_like(none))
    for off in (6, 2**62, 2**63 - 1, 2**70):
        assert torch.equal(sa(off), every), off
    for off in (-4, -2**62, -2**63, -2**70):
        assert torch.equal(sa(off), none), off


def test_inputs_too_big_for_memory_are_refused_up_front():
    # expanded views: a few bytes of storage, but the output (and the contiguous copies) would need
    # about 20 TB; a MemoryError with the size, before anything is allocated. On meta tensors (no
    # values, no memory) there is nothing to refuse: the fake kernel gives the shape.
    q = k = v = torch.randn(1, 1, 1, 8).expand(2**28, 2, 2**10, 8)
    tq = torch.ones(1, 1, 1).expand(2**28, 2, 2**10)
    for be in (None, "reference"):
        with pytest.raises(MemoryError, match=r"selective_attention\(backend=.*\) of q \(268435456, 2, 1024, 8\).* GB"):
            embkern.selective_attention(q, k, v, tq, backend=be)
    m = torch.randn(1, 1, 1, 8, device="meta").expand(2**28, 2, 2**10, 8)
    out = embkern.selective_attention(m, m, m, torch.ones(1, 1, 1, device="meta").expand(2**28, 2, 2**10))
    assert out.shape == m.shape and out.device.type == "meta"


def test_temperature_bad_input_names_the_argument():
    x = torch.randn(1, 2, 4, 8)
    st = embkern.selective_temperatures
    with pytest.raises(ValueError, match="gate: expected one of"):
        st(x, 0, torch.tensor(1.0), gate="relu")
    with pytest.raises(ValueError, match=r"positions: expected shape \(L,\)"):
        st(x, torch.arange(3))
    with pytest.raises(ValueError, match="positions: expected 0-based positions >= 0"):
        st(x, torch.arange(-1, 3))
    for start in (-2, 2**63 - 4, 2**70):  # int64 positions: 2^63 - 4 + L overflowed torch.arange
        with pytest.raises(ValueError, match=r"positions: expected a start position in \[0, 2\^63 - 1 - L\]"):
            st(x, start)
    assert st(x, 2**63 - 5).shape == (1, 2, 4)  # the last start whose positions fit
    with pytest.raises(ValueError, match=r"gate_param: expected a scalar or shape \(2,\)"):
        st(x, 0, torch.ones(3))
    with pytest.raises(ValueError, match=r"u: expected shape \(d,\)"):
        st(x, 0, None, torch.ones(4))
    with pytest.raises(TypeError, match="positions: expected an integer tensor"):
        st(x, torch.arange(4.0))


# --------------------------------------------------------------------------- bench workloads


def test_bench_workloads_run_and_agree_with_the_reference(monkeypatch):
    from embkern import bench
    from embkern.bench import selective_attention as sb

    monkeypatch.setenv(bench.TINY_ENV, "1")
    ws = sb.workloads(quick=True, device=torch.device("cpu"))
    assert {w.name.split(" L=")[0].split(" 1 x")[0] for w in ws} == {"forward", "forward+backward", "decode",
                                                                       "layer decode"}
    for w in ws:
        w.setup()
        try:
            want = w.reference64()
            for name, fn in {**w.backends, **w.anchors}.items():
                out = fn()
                if name in w.no_error:  # the vanilla layers: no temperatures, not the same function
                    assert out.shape == want.shape and torch.isfinite(out).all(), (w.name, name)
                    continue
                assert w.error(out, want) < 1e-4, (w.name, name)
        finally:
            w.teardown()
