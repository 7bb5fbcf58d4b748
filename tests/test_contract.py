"""The contract layer itself: the shipped parity harness (embkern.testing) must
fail on a wrong kernel, and the one backend resolver must explain every
rejection."""

import pytest
import torch

from embkern import _backends, testing
from embkern._backends import BackendSupport, OpDescriptor
from embkern.ops import DESCRIPTORS


def _f(x, w):
    return (x * w).sin().sum(-1)


def test_assert_parity_accepts_the_reference_and_rejects_a_biased_kernel():
    x, w = testing.randn((40, 16), (40, 16), dtype=torch.float32, seed=1)
    testing.assert_parity(_f, _f, (x, w))
    with pytest.raises(AssertionError, match="parity failed"):
        testing.assert_parity(lambda a, b: _f(a, b) * (1 + 1e-4), _f, (x, w))


def test_assert_grad_parity_checks_every_input_gradient():
    x, w = testing.randn((40, 16), (40, 16), dtype=torch.bfloat16, seed=2)
    reps = testing.assert_grad_parity(_f, _f, (x, w), seed=3)
    assert len(reps) == 2 and all(r.ok for r in reps)

    def wrong_grad_w(a, b):  # right forward, the gradient of w scaled by 1.01
        return _f(a, b.detach()) + (_f(a.detach(), b) - _f(a.detach(), b).detach()) * 1.01

    x32, w32 = x.float(), w.float()
    testing.assert_grad_parity(_f, _f, (x32, w32), seed=3)
    with pytest.raises(AssertionError, match=r"grad\[1\]"):
        testing.assert_grad_parity(wrong_grad_w, _f, (x32, w32), seed=3)
    with pytest.raises(AssertionError, match="gradient present"):
        testing.assert_grad_parity(lambda a, b: _f(a, b.detach()), _f, (x, w), seed=3)


def test_assert_grad_parity_uses_the_given_output_gradient():
    x, w = testing.randn((8, 4), (8, 4), dtype=torch.float32, seed=4)
    zero = torch.zeros(8, dtype=torch.float64)
    reps = testing.assert_grad_parity(lambda a, b: _f(a, b) * 3, _f, (x, w), grad_outputs=zero)
    assert all(r.err_fast == 0 for r in reps)  # a zero output gradient makes any scale agree


FAKE = OpDescriptor(
    name="fake",
    kernels=("fwd", "bwd"),
    backends={
        "reference": BackendSupport(frozenset({torch.float32}), frozenset({"cpu", "cuda"})),
        "cpu": BackendSupport(frozenset({torch.float64}), frozenset({"cpu"}), symbol="no_such_module.{kernel}"),
        "triton": BackendSupport(frozenset({torch.float32}), frozenset({"cuda"}), symbol="no_such.{kernel}"),
    },
    entry_points={"fake_fn": ("fwd", "bwd")},
)


def test_resolver_lists_every_rejected_backend_with_every_reason():
    with pytest.raises(RuntimeError) as exc:
        _backends.resolve(FAKE, "fake_fn", None, "cpu", torch.float16)
    msg = str(exc.value)
    assert msg.startswith("embkern.fake_fn: no backend can run on cpu float16 tensors; rejected")
    # cpu: both the dtype and the missing kernels (each one) are named
    assert "cpu: supports dtypes {float64}, got float16" in msg
    assert "'no_such_module.fwd'" in msg and "'no_such_module.bwd'" in msg
    assert "reference: supports dtypes {float32}, got float16" in msg
    # backends that are never automatic, and those the op does not have, are reported too
    assert "triton: runs on ['cuda'] tensors, got cpu" in msg
    assert "cuda: fake has no cuda kernels" in msg


def test_resolver_explicit_backend_and_argument_checks():
    assert _backends.resolve(FAKE, "fake_fn", None, "cpu", torch.float32) == "reference"
    with pytest.raises(RuntimeError, match=r"backend='cpu' is unavailable for cpu float32 tensors: "
                                           r"supports dtypes \{float64\}, got float32; .*not implemented"):
        _backends.resolve(FAKE, "fake_fn", "cpu", "cpu", torch.float32)
    with pytest.raises(ValueError, match="backend: expected None or one of"):
        _backends.resolve(FAKE, "fake_fn", "gpu", "cpu", torch.float32)
    with pytest.raises(TypeError, match="backend: expected None or one of"):
        _backends.resolve(FAKE, "fake_fn", 1, "cpu", torch.float32)


@pytest.mark.parametrize("name", sorted(DESCRIPTORS))
def test_every_descriptor_is_consistent(name):
    desc = DESCRIPTORS[name]
    assert desc.name == name
    assert "reference" in desc.backends
    for entry, kernels in desc.entry_points.items():
        assert kernels and set(kernels) <= set(desc.kernels), (entry, kernels)
    for be, spec in desc.backends.items():
        assert be in _backends.BACKENDS
        assert spec.devices <= {"cpu", "cuda"} and spec.dtypes
        assert spec.kernels is None or spec.kernels <= set(desc.kernels)
        if be in ("cpu", "cuda", "triton"):
            assert spec.symbol is not None and "{kernel}" in spec.symbol, be
    # the cpu kernels are built by make test: every one must resolve here
    if "cpu" in desc.backends:
        st = _backends.check(desc, "cpu", desc.kernels, "cpu", next(iter(desc.backends["cpu"].dtypes)))
        assert st.ok, st.reason



@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_matches_isfinite(dtype):
    from embkern import _checks

    g = torch.Generator().manual_seed(3)
    base = torch.randn(5, 7, 33, generator=g).to(dtype)
    assert _checks.all_finite(base)
    assert _checks.all_finite(base[:0])  # empty
    assert _checks.all_finite(base.clone().requires_grad_(True))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in ((0, 0, 0), (4, 6, 32), (2, 3, 17)):
            x = base.clone()
            x[where] = bad
            assert not _checks.all_finite(x), (bad, where)
            # strided views: the one holding the bad element is caught, the other is finite
            for view in (x[:, :, 0::2], x[:, :, 1::2], x.transpose(0, 2)):
                assert _checks.all_finite(view) == bool(torch.isfinite(view).all()), (bad, where)
    assert _checks.all_finite(torch.tensor([2**31 - 1, -5]))  # integers are finite
    assert _checks.all_finite(torch.tensor([True, False]))


def _shapes(r):
    return [tuple(t.shape) for t in (r if isinstance(r, (tuple, list)) else [r])]


def _meta_cases():
    import embkern
    B, H, L, d, P, N, D = 2, 2, 7, 8, 16, 30, 4
    attn = lambda dev: [torch.randn(B, H, L, d, device=dev, requires_grad=True) for _ in range(3)]
    return {
        "selective_attention": lambda dev: (embkern.selective_attention, attn(dev) + [
            torch.rand(B, H, L, device=dev, requires_grad=True), torch.rand(B, H, L, device=dev)], {}),
        "relative_attention": lambda dev: (embkern.relative_attention, attn(dev) + [
            torch.randn(2 * P, H, d, device=dev, requires_grad=True), torch.randn(2 * P, H, device=dev),
            torch.randn(H, d, device=dev)], {"max_distance": P}),
        "causal_depthwise_conv": lambda dev: (embkern.causal_depthwise_conv, [
            torch.randn(B, L, d, device=dev, requires_grad=True), torch.randn(d, 3, device=dev)], {}),
        "selective_temperatures": lambda dev: (embkern.selective_temperatures, [
            torch.randn(B, H, L, d, device=dev, requires_grad=True), torch.arange(L, device=dev)], {}),
        "score_all": lambda dev: (embkern.score_all, [torch.randn(B, 4 * D, device=dev, requires_grad=True),
                                                      torch.randn(B, 4 * D, device=dev),
                                                      torch.randn(N, 4 * D, device=dev)], {}),
        "topk_all": lambda dev: (embkern.topk_all, [torch.randn(B, 4 * D, device=dev), torch.randn(B, 4 * D, device=dev),
                                                    torch.randn(N, 4 * D, device=dev), 5], {}),
        "rank_all": lambda dev: (embkern.rank_all, [torch.randn(B, 4 * D, device=dev), torch.randn(B, 4 * D, device=dev),
                                                    torch.randn(N, 4 * D, device=dev),
                                                    torch.tensor([3, 7], device=dev)], {}),
        "one_to_n_loss": lambda dev: (embkern.one_to_n_loss, [
            torch.randn(B, 4 * D, device=dev, requires_grad=True), torch.randn(B, 4 * D, device=dev),
            torch.randn(N, 4 * D, device=dev), torch.tensor([3, 7], device=dev)], {}),
    }


@pytest.mark.parametrize("name", list(_meta_cases()))
def test_meta_tensors_give_the_shapes_of_a_real_call(name):
    # as torch's own ops do: model init on "meta", shape propagation, FLOP counting without data
    fn, real, kw = _meta_cases()[name]("cpu")
    _, meta, _ = _meta_cases()[name]("meta")
    want, got = fn(*real, **kw), fn(*meta, **kw)
    assert all(t.device.type == "meta" for t in (got if isinstance(got, tuple) else [got]))
    assert _shapes(got) == _shapes(want)
    first = got[0] if isinstance(got, tuple) else got
    if meta[0].requires_grad and first.requires_grad:  # the backward's fake kernels too
        first.sum().backward()
        assert meta[0].grad is not None and meta[0].grad.shape == meta[0].shape
        assert meta[0].grad.device.type == "meta"


def test_layers_built_and_run_on_meta():
    from embkern import nn as enn
    with torch.device("meta"):
        rc = enn.RelConvMultiHeadAttention(32, 4, memory_len=4)
        out, mem = rc(torch.randn(2, 5, 32), torch.randn(2, 4, 32))
        ss = enn.SelectiveSelfAttention(32, 4)
        out2 = ss(torch.randn(2, 5, 32))
        kge = enn.QuatE(100, 10, 8)
        ids = torch.tensor([1, 2, 3, 4])
        scores, loss, ranks = kge.score_t(ids, ids), kge.loss(ids, ids, ids), kge.rank(ids, ids, ids)
    assert out.shape == (2, 5, 32) and mem.shape == (2, 4, 32) and out.device.type == "meta"
    assert out2.shape == (2, 5, 32) and out2.device.type == "meta"
    assert scores.shape == (4, 100) and loss.shape == () and ranks.shape == (4,)
    assert {t.device.type for t in (scores, loss, ranks)} == {"meta"}
