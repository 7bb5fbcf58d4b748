"""Parity helpers shipped with embkern, so users can check a fast kernel themselves.

The numerics contract (docs/ops/<op>.md, "Numerics contract"): compare against
the reference run in float64 on upcast inputs. A fast kernel passes when its error is at most
``factor`` (2) times the error of the reference run in the input dtype, plus a
few ulp of the output's scale::

    err_fast = max |fast - ref64|
    err_ref  = max |ref(input dtype) - ref64|
    pass  <=>  err_fast <= factor * err_ref + ulps * eps(dtype) * max(1, max |ref64|)

Example::

    from embkern import testing, reference
    h, r, E = testing.randn((64, 32), (64, 32), (500, 32), dtype=torch.float32, seed=0)
    testing.assert_parity(
        lambda *a: embkern.score_all(*a, backend="cpu"),
        reference.hypercomplex.score_all, (h, r, E))

Gradients follow the same rule: :func:`assert_grad_parity` back-propagates one
random output gradient through the fast function, the reference in the input
dtype and the reference in float64, and applies the 2x rule to every input's
gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, Tuple

import torch

# Few-ulp slack per dtype: covers a kernel that is as accurate as the
# reference but rounds in a different order (the reference error can be 0 on
# tiny problems, where 2x0 would demand bit-exactness).
ULPS = {torch.float64: 64, torch.float32: 16, torch.bfloat16: 4, torch.float16: 4}
FACTOR = 2.0


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


@dataclass
class ParityReport:
    name: str
    err_fast: float
    err_ref: float
    bound: float
    scale: float

    @property
    def ok(self) -> bool:
        return self.err_fast <= self.bound

    def __str__(self) -> str:
        return (f"{self.name}: max|fast-ref64| = {self.err_fast:.3e}, max|ref-ref64| = {self.err_ref:.3e}, "
                f"bound = {self.bound:.3e} (scale {self.scale:.3e}) -> {'ok' if self.ok else 'FAIL'}")


def _flat(x) -> Sequence[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    return [t for t in x if isinstance(t, torch.Tensor)]


def _up(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().to(torch.float64)
    return x


def _same_dtype(x, like):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().to(like.dtype) if like is not None else x.detach()
    return x


def compare(fast_out, ref_out, ref64_out, dtype: torch.dtype, name: str = "output",
            factor: float = FACTOR, ulps: int | None = None) -> list:
    """Reports for each floating output tensor (integer outputs must match exactly)."""
    reports = []
    for i, (f, r, r64) in enumerate(zip(_flat(fast_out), _flat(ref_out), _flat(ref64_out))):
        tag = name if len(_flat(fast_out)) == 1 else f"{name}[{i}]"
        if f.shape != r64.shape:
            raise AssertionError(f"{tag}: shape {tuple(f.shape)} != reference {tuple(r64.shape)}")
        if not f.is_floating_point():
            if not torch.equal(f.cpu(), r64.cpu()):
                bad = int((f.cpu() != r64.cpu()).sum())
                raise AssertionError(f"{tag}: {bad} integer entries differ from the reference")
            continue
        f64, r_64, rl = f.detach().double().cpu(), r64.detach().double().cpu(), r.detach().double().cpu()
        if not bool(torch.isfinite(f64).all()) and not torch.equal(torch.isfinite(f64), torch.isfinite(r_64)):
            raise AssertionError(f"{tag}: non-finite values where the reference is finite (unwritten output?)")
        fin = torch.isfinite(r_64)
        scale = float(r_64[fin].abs().max()) if bool(fin.any()) else 1.0
        err_fast = float((f64 - r_64)[fin].abs().max()) if bool(fin.any()) else 0.0
        err_ref = float((rl - r_64)[fin].abs().max()) if bool(fin.any()) else 0.0
        u = ULPS.get(dtype, 16) if ulps is None else ulps
        bound = factor * err_ref + u * eps(dtype) * max(1.0, scale)
        reports.append(ParityReport(tag, err_fast, err_ref, bound, scale))
    return reports


def assert_parity(fast: Callable, reference: Callable, args: Tuple, kwargs: dict | None = None,
                  name: str = "output", factor: float = FACTOR, ulps: int | None = None) -> list:
    """Run `fast` and `reference` on `args` (and the reference on fp64 upcasts); assert the 2x rule."""
    kwargs = kwargs or {}
    dtype = next((a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()), torch.float32)
    out = fast(*args, **kwargs)
    ref_lp = reference(*args, **kwargs)
    ref64 = reference(*[_up(a) for a in args], **{k: _up(v) for k, v in kwargs.items()})
    reports = compare(out, ref_lp, ref64, dtype, name, factor, ulps)
    bad = [str(r) for r in reports if not r.ok]
    if bad:
        raise AssertionError("parity failed:\n  " + "\n  ".join(bad))
    return reports


def leaf(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fresh autograd leaf with x's values (in ``dtype`` if given); never aliases x."""
    return x.detach().to(dtype or x.dtype).clone().requires_grad_(True)


def _backward(fn: Callable, args: Tuple, kwargs: dict, dtype: torch.dtype | None, grads: Sequence[torch.Tensor]):
    """Leaves of args' floating tensors (in ``dtype``, or their own), fn on them, backward with grads."""
    leaves = [leaf(a, dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    outs = [o for o in _flat(fn(*leaves, **kwargs)) if o.is_floating_point() and o.requires_grad]
    if len(outs) != len(grads):
        raise AssertionError(f"expected {len(grads)} differentiable floating outputs, got {len(outs)}")
    torch.autograd.backward(outs, [g.to(device=o.device, dtype=o.dtype) for o, g in zip(outs, grads)])
    return [x for x in leaves if isinstance(x, torch.Tensor) and x.is_floating_point()]


def assert_grad_parity(fast: Callable, reference: Callable, args: Tuple, kwargs: dict | None = None,
                       grad_outputs=None, seed: int = 0, name: str = "grad", factor: float = FACTOR,
                       ulps: int | None = None) -> list:
    """The 2x rule for gradients, for every floating tensor in ``args``.

    ``fast``, the reference in the input dtype and the reference on float64
    upcasts each run on fresh leaves and back-propagate the same output
    gradient(s): ``grad_outputs`` (one tensor per differentiable floating
    output, cast to each output's dtype) or standard-normal draws from ``seed``.
    Then each input's gradient from ``fast`` must be within ``factor`` times the
    reference's own low-precision gradient error of the float64 gradient, plus
    a few ulp, as :func:`assert_parity` checks outputs. An input that gets no
    gradient from one side but does from the other fails.

    Returns the per-input :class:`ParityReport` list.
    """
    kwargs = kwargs or {}
    floats = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
    if not floats:
        raise ValueError("args: expected at least one floating tensor to differentiate")
    dtype = floats[0].dtype
    if grad_outputs is None:
        with torch.no_grad():
            outs = [o for o in _flat(fast(*args, **kwargs)) if o.is_floating_point()]
        g = torch.Generator().manual_seed(seed)
        grad_outputs = [torch.randn(tuple(o.shape), generator=g, dtype=torch.float64) for o in outs]
    grads = list(_flat(grad_outputs))
    got = _backward(fast, args, kwargs, None, grads)
    low = _backward(reference, args, kwargs, None, grads)
    hi = _backward(reference, args, kwargs, torch.float64, grads)
    reports = []
    for i, (f, r, r64) in enumerate(zip(got, low, hi)):
        present = (f.grad is not None, r.grad is not None, r64.grad is not None)
        if not all(present):
            if any(present):
                raise AssertionError(f"{name}[{i}]: gradient present for (fast, reference, reference64) = {present}")
            continue
        reports += compare(f.grad, r.grad, r64.grad, dtype, f"{name}[{i}]", factor, ulps)
    bad = [str(r) for r in reports if not r.ok]
    if bad:
        raise AssertionError("gradient parity failed:\n  " + "\n  ".join(bad))
    return reports


def randn(*shapes, dtype=torch.float32, device="cpu", seed: int = 0, scale: float = 1.0):
    """Fresh standard-normal tensors (never zeros), one per shape, from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    out = [(torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype=dtype, device=device) for s in shapes]
    return out[0] if len(out) == 1 else tuple(out)


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill an output buffer with NaN (floats) or a sentinel (ints), so unwritten elements show up."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(torch.iinfo(t.dtype).min if t.dtype != torch.bool else False)


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous view (every other column of a wider buffer)."""
    if t.dim() == 0:
        return t
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    poison(wide)
    view = wide[..., ::2]
    view.copy_(t)
    return view
