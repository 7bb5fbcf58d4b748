"""C++ CPU kernels of selective attention: the corners the main suite does not reach.

Shapes cross every blocking boundary of src/cpu/selective_attention.cpp
(64-query and 64-key blocks, the causal diagonal inside and across blocks,
4/16/32-lane register tiles with row tails), with dv != d, q_offset negative
and beyond Lk - Lq, and rows that see no key. Exactness: the same bits for
every thread count and at every ISA level this CPU runs.
"""

import math

import numpy as np
import pytest
import torch

import embkern
from embkern import testing
from embkern.reference import selective_attention as ref
from helpers import assert_same_bits, at_each, cpu_isa, cpu_module, cpu_threads, in_cache_buffer

C = cpu_module()
SA = C.selective_attention
LEVELS = list(C.isa_info()["available"])


def data(B, Hq, Hkv, Lq, Lk, d, dv, dtype=torch.float32, seed=0, tau_v=True):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    q, k, v = mk(B, Hq, Lq, d), mk(B, Hkv, Lk, d), mk(B, Hkv, Lk, dv)
    tq = (0.5 + torch.rand(B, Hq, Lq, generator=g, dtype=torch.float64)).to(dtype)
    tv = (0.5 + torch.rand(B, Hkv, Lk, generator=g, dtype=torch.float64)).to(dtype) if tau_v else None
    return q, k, v, tq, tv


def run_cpu(q, k, v, tq, tv, causal, qo, grad_seed=1):
    """Output and the five gradients (dtau_v None without tau_v) through the public API."""
    leaves = [None if t is None else t.clone().requires_grad_(True) for t in (q, k, v, tq, tv)]
    out = embkern.selective_attention(*leaves, causal=causal, q_offset=qo, backend="cpu")
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    out.backward(g.to(out.dtype))
    return [out.detach()] + [None if t is None else t.grad for t in leaves]


# --------------------------------------------------------------------------- odd sizes against the reference

ODD = [  # B, Hq, Hkv, Lq, Lk, d, dv, causal, q_offset
    (1, 1, 1, 1, 1, 16, 16, True, None),
    (1, 2, 1, 1, 1000, 64, 64, True, None),      # decode against a long cache
    (1, 2, 2, 129, 129, 16, 40, True, None),     # diagonal across block edges, dv != d
    (2, 4, 2, 7, 129, 128, 24, True, None),
    (1, 3, 1, 129, 70, 48, 48, True, -40),       # negative offset: the first rows see nothing
    (1, 2, 2, 70, 129, 32, 16, True, 100),       # q_offset > Lk - Lq
    (1, 2, 2, 65, 63, 24, 8, False, None),
    (1, 1, 1, 1000, 1000, 32, 20, True, None),
]


@pytest.mark.parametrize("shape", ODD, ids=lambda s: "x".join(map(str, s[:7])) + f"-c{int(s[7])}-o{s[8]}")
def test_odd_sizes_parity_and_gradients(shape):
    *dims, causal, qo = shape
    q, k, v, tq, tv = data(*dims)
    fn = lambda *a: embkern.selective_attention(*a, causal=causal, q_offset=qo, backend="cpu")  # noqa: E731
    rf = lambda *a: ref.attention(*a, causal=causal, q_offset=qo)  # noqa: E731
    testing.assert_parity(fn, rf, (q, k, v, tq, tv))
    testing.assert_grad_parity(fn, rf, (q, k, v, tq, tv))


def test_lse_and_rows_that_see_no_key():
    # q_offset = -5: queries 0..4 see no key; their output and gradients are 0, lse -inf
    q, k, v, tq, tv = data(1, 2, 2, 70, 70, 16, 16)
    out = torch.full((1, 2, 70, 16), float("nan"))
    lse = torch.full((1, 2, 70), float("nan"))
    SA.forward(q.numpy(), k.numpy(), v.numpy(), tq.numpy(), tv.numpy(), out.numpy(), lse.numpy(), True,
               1 / math.sqrt(16), -5)
    want, want_lse = ref.attention_forward(q.double(), k.double(), v.double(), tq.double(), tv.double(), True,
                                           None, -5)
    assert torch.all(out[:, :, :5] == 0) and torch.all(lse[:, :, :5] == float("-inf"))
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse[:, :, 5:].double(), want_lse[:, :, 5:], rtol=1e-5, atol=1e-5)
    res = run_cpu(q, k, v, tq, tv, True, -5)
    assert torch.all(res[1][:, :, :5] == 0) and torch.all(res[4][:, :, :5] == 0)
    assert all(bool(torch.isfinite(t).all()) for t in res)
    # every query sees nothing: zeros everywhere, k and v get no gradient
    res = run_cpu(q, k, v, tq, tv, True, -70)
    assert all(bool((t == 0).all()) for t in res)


def test_no_keys_and_empty_sizes():
    q, k, v, tq, tv = data(1, 2, 2, 5, 0, 8, 4)
    res = run_cpu(q, k, v, tq, tv, False, None)
    assert torch.all(res[0] == 0) and torch.all(res[1] == 0) and res[2].shape == k.shape
    for dims in ((0, 2, 2, 5, 5, 8, 4), (1, 2, 2, 0, 5, 8, 4), (1, 2, 2, 5, 5, 8, 0)):
        q, k, v, tq, tv = data(*dims)
        res = run_cpu(q, k, v, tq, tv, True, None)
        assert res[0].shape == (dims[0], dims[1], dims[3], dims[6])


def test_huge_offsets_are_the_clamped_masks():
    q, k, v, tq, tv = data(1, 2, 1, 9, 11, 8, 8, torch.float64)
    for big, same in ((2**62, 11), (-(2**62), -10)):
        a = run_cpu(q, k, v, tq, tv, True, big)
        b = run_cpu(q, k, v, tq, tv, True, same)
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    nc = run_cpu(q, k, v, tq, tv, False, None)
    for x, y in zip(run_cpu(q, k, v, tq, tv, True, 10), nc):
        assert torch.equal(x, y)


@pytest.mark.parametrize("causal,qo", [(True, None), (True, -2), (True, 4), (False, None)])
def test_gradcheck_float64(causal, qo):
    q, k, v, tq, tv = data(1, 4, 2, 6, 9, 5, 3, torch.float64, seed=2)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, tq, tv)]
    fn = lambda *a: embkern.selective_attention(*a, causal=causal, q_offset=qo, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradcheck(lambda *a: fn(*a, None), leaves[:4])


def test_no_value_temperature_equals_ones():
    q, k, v, tq, _ = data(1, 2, 2, 70, 70, 16, 16)
    a = run_cpu(q, k, v, tq, None, True, None)
    b = run_cpu(q, k, v, tq, torch.ones(1, 2, 70), True, None)
    for x, y in zip(a[:5], b[:5]):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- exactness


# Lq = 3 and 1 take forward_block_rows at the vector levels and (Lq = 3)
# forward_block at the generic one: the two layouts must agree bit for bit.
EXACT = [(2, 4, 2, 130, 200, 64, 48, True, None), (1, 2, 1, 70, 65, 20, 36, False, None),
         (1, 3, 3, 129, 129, 16, 16, True, -7), (2, 4, 2, 3, 150, 32, 20, True, None),
         (1, 2, 1, 1, 300, 64, 64, True, None), (1, 2, 2, 3, 70, 16, 8, True, -1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", EXACT, ids=lambda s: "x".join(map(str, s[:7])))
def test_thread_count_invariance(dtype, shape):
    *dims, causal, qo = shape
    q, k, v, tq, tv = data(*dims, dtype=dtype, seed=5)
    assert_same_bits(at_each(cpu_threads, (1, 2, 3), lambda: run_cpu(q, k, v, tq, tv, causal, qo)))


@pytest.mark.skipif(len(LEVELS) < 2, reason="this CPU runs one ISA level")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", EXACT, ids=lambda s: "x".join(map(str, s[:7])))
def test_same_bits_at_every_isa_level(dtype, shape):
    *dims, causal, qo = shape
    q, k, v, tq, tv = data(*dims, dtype=dtype, seed=6)
    assert_same_bits(at_each(cpu_isa, LEVELS, lambda: run_cpu(q, k, v, tq, tv, causal, qo)))


def test_outputs_fully_written():
    q, k, v, tq, tv = data(1, 4, 2, 75, 70, 20, 12)
    args = [t.numpy() for t in (q, k, v, tq, tv)]
    out, lse = np.full((1, 4, 75, 12), np.nan, np.float32), np.full((1, 4, 75), np.nan, np.float32)
    SA.forward(*args, out, lse, True, 0.3, 2)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    go = np.random.default_rng(0).standard_normal(out.shape).astype(np.float32)
    grads = [np.full(t.shape, np.nan, np.float32) for t in (q, k, v, tq, tv)]
    SA.backward(go, *args, out, lse, *grads, True, 0.3, 2)
    assert all(np.isfinite(g).all() for g in grads)


# --------------------------------------------------------------------------- k, v, tau_v read in place

SLICES = [(2, 4, 2, 1, 300, 64, 64, True, None), (1, 2, 2, 3, 70, 16, 8, True, -1),
          (2, 4, 2, 130, 200, 64, 48, True, None), (1, 1, 1, 1, 5, 8, 8, True, None),
          (3, 2, 1, 5, 65, 24, 40, False, None)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SLICES, ids=lambda s: "x".join(map(str, s[:7])))
def test_forward_reads_a_slice_of_a_cache_buffer_in_place(dtype, shape):
    *dims, causal, qo = shape
    q, k, v, tq, tv = data(*dims, dtype=dtype, seed=8)
    Lk = dims[4]
    ks, vs, tvs = in_cache_buffer(k, Lk + 37), in_cache_buffer(v, 2 * Lk + 1), in_cache_buffer(tv, Lk + 64)
    assert not ks.is_contiguous() or dims[0] * dims[2] == 1
    from embkern.ops import selective_attention as ops
    for t in (ks, vs, tvs):  # what the kernel gets is a view of the buffer, not a copy
        assert ops._np_rows(t, dtype).__array_interface__["data"][0] == t.data_ptr()

    def run(k, v, tv):
        with torch.no_grad():
            return embkern.selective_attention(q, k, v, tq, tv, causal=causal, q_offset=qo, backend="cpu")

    assert_same_bits({"packed": run(k, v, tv), "slices": run(ks, vs, tvs), "k slice": run(ks, v, tvs)})
    assert_same_bits({"packed, no tau_v": run(k, v, None), "slices, no tau_v": run(ks, vs, None)})
    # the backward copies (its kernels take packed buffers) and gives the gradients of the packed inputs
    assert_same_bits({"packed": run_cpu(q, k, v, tq, tv, causal, qo),
                      "slices": run_cpu(q, ks, vs, tq, tvs, causal, qo)})


@pytest.mark.skipif(len(LEVELS) < 2, reason="this CPU runs one ISA level")
def test_cache_slices_give_the_same_bits_at_every_isa_level_and_thread_count():
    q, k, v, tq, tv = data(2, 4, 2, 1, 300, 64, 64, seed=9)
    ks, vs, tvs = in_cache_buffer(k, 512), in_cache_buffer(v, 512), in_cache_buffer(tv, 512)

    def run():
        with torch.no_grad():
            return embkern.selective_attention(q, ks, vs, tq, tvs, backend="cpu")

    with torch.no_grad():
        want = embkern.selective_attention(q, k, v, tq, tv, backend="cpu")
    assert_same_bits({"packed": want, **at_each(cpu_isa, LEVELS, run), **at_each(cpu_threads, (1, 3), run)})


def test_views_the_kernel_cannot_read_in_place_are_copied():
    q, k, v, tq, tv = data(2, 4, 4, 3, 40, 16, 16, seed=10)
    want = embkern.selective_attention(q, k, v, tq, tv, backend="cpu")
    wide = torch.cat([k, k], 1)[:, :4]  # heads 0..3 of 8: the batch step is not 4 head steps
    wide_v = torch.cat([v, v], 1)[:, :4]
    strided = torch.stack([k, k], -1)[..., 0]  # elements 2 apart
    assert not embkern._checks.packed_below(wide, 2) and not embkern._checks.packed_below(strided, 2)
    for kk, vv in ((wide, wide_v), (strided, v), (k.transpose(0, 1).contiguous().transpose(0, 1), v)):
        assert_same_bits({"packed": want, "copied": embkern.selective_attention(q, kk, vv, tq, tv, backend="cpu")})
    with pytest.raises(ValueError, match="k: expected dims 0..1 to step as one index"):
        SA.forward(q.numpy(), wide.numpy(), v.numpy(), tq.numpy(), tv.numpy(), np.empty((2, 4, 3, 16), np.float32),
                   np.empty((2, 4, 3), np.float32), True, 0.25, 37)
    with pytest.raises(ValueError, match="k: expected a C-contiguous buffer below dim 2"):
        SA.forward(q.numpy(), strided.numpy(), v.numpy(), tq.numpy(), tv.numpy(),
                   np.empty((2, 4, 3, 16), np.float32), np.empty((2, 4, 3), np.float32), True, 0.25, 37)


# --------------------------------------------------------------------------- raw binding: bad input


def _raw_args(dtype=np.float32):
    rng = np.random.default_rng(0)
    mk = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    q, k, v = mk(1, 4, 5, 8), mk(1, 2, 6, 8), mk(1, 2, 6, 4)
    tq, tv = mk(1, 4, 5), mk(1, 2, 6)
    return dict(q=q, k=k, v=v, tau_q=tq, tau_v=tv, out=np.empty((1, 4, 5, 4), dtype),
                lse_out=np.empty((1, 4, 5), dtype), causal=True, scale=0.35, q_offset=1)


def _raw_bwd_args(dtype=np.float32):
    a = _raw_args(dtype)
    SA.forward(**a)
    return dict(grad_out=np.ones_like(a["out"]), q=a["q"], k=a["k"], v=a["v"], tau_q=a["tau_q"], tau_v=a["tau_v"],
                out=a["out"], lse=a["lse_out"], dq_out=np.empty_like(a["q"]), dk_out=np.empty_like(a["k"]),
                dv_out=np.empty_like(a["v"]), dtau_q_out=np.empty_like(a["tau_q"]),
                dtau_v_out=np.empty_like(a["tau_v"]), causal=True, scale=0.35, q_offset=1)


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
    ("k", lambda a: np.concatenate([a["k"], a["k"]], 0), ValueError, "k: expected shape"),
    ("k", lambda a: np.ones((1, 3, 6, 8), np.float32), ValueError, "Hkv"),
    ("k", lambda a: np.ones((1, 0, 6, 8), np.float32), ValueError, "Hkv"),
    ("v", lambda a: a["v"][:, :, :3].copy(), ValueError, "v: expected shape"),
    ("v", lambda a: a["v"][:, :, :, ::2], ValueError, "v: expected a C-contiguous"),
    ("q", lambda a: np.swapaxes(a["q"], 2, 3), ValueError, "q: expected"),
    ("tau_q", lambda a: a["tau_q"][:, :, :2].copy(), ValueError, "tau_q: expected shape"),
    ("tau_q", lambda a: None, TypeError, "tau_q: expected an array"),
    ("tau_v", lambda a: a["tau_q"], ValueError, "tau_v: expected shape"),
    ("out", lambda a: np.empty((1, 4, 5, 3), np.float32), ValueError, "out: expected shape"),
    ("out", lambda a: _readonly(a["out"]), ValueError, "out: expected a writable buffer"),
    ("lse_out", lambda a: np.empty((1, 4, 4), np.float32), ValueError, "lse_out: expected shape"),
    ("lse_out", lambda a: np.empty((1, 4, 5), np.float64), TypeError, "lse_out: expected dtype float32"),
    ("scale", lambda a: float("nan"), ValueError, "scale: expected a finite"),
    ("q_offset", lambda a: 2**70, TypeError, ""),
]


@pytest.mark.parametrize("name,bad,exc,match", FWD_BAD, ids=[f"{c[0]}-{i}" for i, c in enumerate(FWD_BAD)])
def test_raw_forward_rejects_bad_input(name, bad, exc, match):
    a = _raw_args()
    a[name] = bad(a)
    with pytest.raises(exc, match=match):
        SA.forward(**a)


BWD_BAD = [
    ("grad_out", lambda a: a["grad_out"][..., :2].copy(), ValueError, "grad_out: expected shape"),
    ("out", lambda a: a["out"][:, :2].copy(), ValueError, "out: expected shape"),
    ("lse", lambda a: a["lse"].astype(np.float64), TypeError, "lse: expected dtype float32"),
    ("dq_out", lambda a: np.empty((1, 4, 5, 7), np.float32), ValueError, "dq_out: expected shape"),
    ("dk_out", lambda a: np.empty((1, 2, 6, 4), np.float32), ValueError, "dk_out: expected shape"),
    ("dv_out", lambda a: _readonly(a["dv_out"]), ValueError, "dv_out: expected a writable"),
    ("dtau_q_out", lambda a: np.empty((1, 4, 6), np.float32), ValueError, "dtau_q_out: expected shape"),
    ("dtau_v_out", lambda a: None, ValueError, "dtau_v_out: expected an array"),
    ("dtau_v_out", lambda a: np.empty((1, 2, 5), np.float32), ValueError, "dtau_v_out: expected shape"),
]


@pytest.mark.parametrize("name,bad,exc,match", BWD_BAD, ids=[f"{c[0]}-{i}" for i, c in enumerate(BWD_BAD)])
def test_raw_backward_rejects_bad_input(name, bad, exc, match):
    a = _raw_bwd_args()
    a[name] = bad(a)
    with pytest.raises(exc, match=match):
        SA.backward(**a)


def test_raw_backward_without_tau_v_takes_no_dtau_v():
    a = _raw_bwd_args()
    a["tau_v"] = None
    with pytest.raises(ValueError, match="dtau_v_out: expected None"):
        SA.backward(**a)
    a["dtau_v_out"] = None
    SA.backward(**a)
    assert np.isfinite(a["dq_out"]).all()


def test_raw_float64():
    a = _raw_args(np.float64)
    SA.forward(**a)
    assert a["out"].dtype == np.float64 and np.isfinite(a["out"]).all()


# --------------------------------------------------------------------------- NaN propagates

@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("Lk", [12, 70, 200])  # one key block, and rows spanning several
def test_nan_score_propagates_to_its_row_only(level, Lk):
    # A NaN in q[0, 1, 3] (or in a visible key) makes every score of that row NaN: the
    # row's output and lse are NaN, as in the reference, and every other row is untouched.
    # (Until the fixed exp took max(lo, x), a NaN score became exp(lo) = 0: the key was
    # silently dropped and the row came out finite.)
    q, k, v, tq, tv = data(2, 2, 2, 9, Lk, 16, 8, dtype=torch.float64, seed=5)
    q[0, 1, 3, 2] = float("nan")
    k[1, 0, 2, 5] = float("nan")  # key 2 of batch 1, head 0: every query sees it (causal, offset Lk - 9 >= 0)
    out = torch.empty(2, 2, 9, 8, dtype=torch.float64)
    lse = torch.empty(2, 2, 9, dtype=torch.float64)
    with cpu_isa(level):
        SA.forward(q.numpy(), k.numpy(), v.numpy(), tq.numpy(), tv.numpy(), out.numpy(), lse.numpy(), True,
                   0.25, Lk - 9)
    want, want_lse = ref.attention_forward(q, k, v, tq, tv, True, 0.25, Lk - 9)
    nan_rows = torch.zeros(2, 2, 9, dtype=torch.bool)
    nan_rows[0, 1, 3] = True
    nan_rows[1, 0, :] = True
    assert torch.equal(torch.isnan(want_lse), nan_rows) and torch.equal(torch.isnan(lse), nan_rows)
    assert torch.isnan(out[nan_rows]).all() and torch.isnan(want[nan_rows]).all()
    ok = ~nan_rows
    torch.testing.assert_close(out[ok], want[ok], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse[ok], want_lse[ok], rtol=1e-12, atol=1e-12)
