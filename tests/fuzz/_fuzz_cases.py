"""Case executors of the fuzz suite (they run inside the worker process).

Each executor takes a plain-data spec (built by the hypothesis strategies in
``_fuzz_strategies``), builds the inputs, makes the call and checks the
property, raising ``AssertionError`` when it does not hold:

* the call raises ``ValueError`` / ``TypeError`` / ``MemoryError`` whose
  message names one of the call's arguments (a ``MemoryError`` also states
  the size in GB), or
* it returns what the reference returns: exact ops (products, FDE encodings,
  ranks, top-k indices, tables) bit for bit; others within twice the error of
  the reference run in the input dtype (``embkern.testing.compare``).

A spec's ``faults`` lists what the strategy broke on purpose (documented
invalid input): then the call must raise. With no faults the input is valid
and the call must return. ``soft`` faults (e.g. NaN scores, whose behaviour
the library may define either way) accept both outcomes.
"""

from __future__ import annotations

import array
import gc
import re
import time

import numpy as np
import torch

import embkern
import embkern._C as C
from embkern import testing
from embkern.reference import fde as rfde
from embkern.reference import hypercomplex as rhc

DTYPES = {
    "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64,
    "int8": torch.int8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64, "uint8": torch.uint8,
    "bool": torch.bool, "complex64": torch.complex64, "complex128": torch.complex128,
}
NP_DTYPES = {
    "float16": np.float16, "float32": np.float32, "float64": np.float64, "int8": np.int8, "int16": np.int16,
    "int32": np.int32, "int64": np.int64, "uint8": np.uint8, "uint32": np.uint32, "uint64": np.uint64,
    "bool": np.bool_, "complex64": np.complex64, "complex128": np.complex128, "bfloat16": np.float32,
}
LOWP = (torch.float16, torch.bfloat16)

_DEFAULT_THREADS = C.get_num_threads()
_START_ISA = C.isa_info()["active"]  # the level this process runs at (EMBKERN_CPU_ISA may force a lower one)


def restore_globals():
    """Undo what a case may have changed in the process (thread count, ISA level)."""
    try:
        if C.get_num_threads() != _DEFAULT_THREADS:
            C.set_num_threads(_DEFAULT_THREADS)
        info = C.isa_info()
        if info["active"] != _START_ISA:
            C.set_isa(_START_ISA)
    except Exception:  # pragma: no cover - reported by the next case if it matters
        pass


# ---------------------------------------------------------------------------
# Input builders


def _special(dtype, name):
    if dtype.is_floating_point or dtype.is_complex:
        fi = torch.finfo(dtype)
        return {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "denorm": fi.tiny / 4,
                "-0": -0.0, "big": fi.max / 4, "tiny": fi.tiny, "one": 1.0}[name]
    if dtype == torch.bool:
        return True
    info = torch.iinfo(dtype)
    return {"big": info.max, "neg": info.min if info.min < 0 else 0, "2^40": min(info.max, 2**40),
            "-1": -1 if info.min < 0 else 0}.get(name, 1)


def tensor(spec):
    """A torch tensor (or numpy array when spec['lib'] == 'numpy') from a tensor spec, or a raw value."""
    if not isinstance(spec, dict) or "shape" not in spec:
        return spec.get("raw") if isinstance(spec, dict) else spec
    shape = tuple(int(s) for s in spec["shape"])
    dt = DTYPES[spec.get("dtype", "float32")]
    view = spec.get("view", "contig")
    if view == "transposed" and len(shape) < 2:
        view = "contig"
    if view == "rows" and len(shape) < 3:
        view = "contig"
    if view == "expand":
        base_shape = tuple(1 if (i == 0 or s > 4096) else s for i, s in enumerate(shape))
    elif view == "transposed":
        base_shape = shape[:-2] + (shape[-1], shape[-2])
    elif view == "stride2":
        base_shape = shape[:-1] + (2 * shape[-1],) if shape else shape
    elif view == "rows":  # a slice [:, :, :L] of a buffer with 5 more rows: a decode cache
        base_shape = shape[:2] + (shape[2] + 5,) + shape[3:]
    else:
        base_shape = shape
    g = torch.Generator().manual_seed(int(spec.get("seed", 0)))
    n = 1
    for s in base_shape:
        n *= s
    extra = 3 if view == "offset" else 0
    if dt.is_floating_point:
        flat = torch.randn(n + extra, generator=g, dtype=torch.float64) * float(spec.get("scale", 1.0))
        if spec.get("ties"):  # coarse values: exact ties between entries
            flat = torch.round(flat * 2) / 2
        flat = flat.to(dt)
    elif dt.is_complex:
        flat = torch.randn(n + extra, generator=g, dtype=dt)
    elif dt == torch.bool:
        flat = torch.randint(0, 2, (n + extra,), generator=g).bool()
    else:
        lo, hi = spec.get("range", (0, 4))
        info = torch.iinfo(dt)
        lo, hi = max(lo, info.min), min(hi, info.max)
        flat = torch.randint(int(lo), int(hi) + 1, (n + extra,), generator=g, dtype=torch.int64).to(dt)
    if view == "expand":  # every visible element is a base element
        for pos, name in spec.get("special", ()):
            if n:
                flat[extra + int(pos) % n] = _special(dt, name)
    if view == "offset":
        t = flat[extra:].view(base_shape)
    else:
        t = flat.view(base_shape)
    if view == "expand":
        t = t.expand(shape)
    elif view == "transposed":
        t = t.transpose(-1, -2)
    elif view == "stride2":
        t = t[..., ::2] if shape else t
    elif view == "rows":
        if dt.is_floating_point:
            t[:, :, shape[2]:] = float("nan")  # a read past the slice shows
        t = t[:, :, :shape[2]]
    numel = 1
    for sz in shape:
        numel *= sz
    if view != "expand" and numel:  # specials land on visible elements
        for pos, name in spec.get("special", ()):
            t[np.unravel_index(int(pos) % numel, shape)] = _special(dt, name)
    if spec.get("lib") == "numpy":
        if dt == torch.bfloat16:
            raise ValueError("spec: numpy has no bfloat16")
        if view == "expand":
            base = t[tuple(slice(0, 1) if (i == 0 or s > 4096) else slice(None) for i, s in enumerate(shape))]
            return np.broadcast_to(base.contiguous().numpy(), shape)
        return t.numpy()
    if spec.get("requires_grad") and dt.is_floating_point:
        t = t.detach().clone().requires_grad_(True) if view != "expand" else t.detach().requires_grad_(True)
    return t


def small_numel(spec) -> bool:
    if not isinstance(spec, dict) or "shape" not in spec:
        return True
    n = 1
    for s in spec["shape"]:
        n *= int(s)
    return n <= 1 << 22


# ---------------------------------------------------------------------------
# The property


SIZE_SYMBOLS = ("R", "d", "k", "d_p", "L", "D", "B", "N", "config")


class Unavailable(Exception):
    pass


def _names_re(names):
    alts = "|".join(re.escape(n) for n in sorted(set(names), key=len, reverse=True))
    return re.compile(rf"(?<![\w.])({alts})(?![\w(])")


def attempt(call, names, allow_unavailable=False):
    """('ok', value) or ('err', exception) after checking the error's kind and message."""
    try:
        return "ok", call()
    except (ValueError, TypeError, MemoryError) as e:
        msg = str(e)
        # a size refusal may name the config by its symbols (R, d, k, d_p, L, D, B, N)
        ok_names = tuple(names) + (SIZE_SYMBOLS if isinstance(e, MemoryError) else ())
        if not _names_re(ok_names).search(msg):
            raise AssertionError(f"{type(e).__name__} does not name an argument (one of {sorted(set(names))}): "
                                 f"{msg[:600]!r}") from None
        if isinstance(e, MemoryError) and "GB" not in msg:
            raise AssertionError(f"MemoryError without the size in GB (an allocator's message?): {msg[:600]!r}") from None
        return "err", e
    except RuntimeError as e:
        if allow_unavailable and "is unavailable" in str(e) and "backend" in str(e):
            return "err", Unavailable(str(e))
        raise AssertionError(f"unexpected RuntimeError (expected ValueError/TypeError/MemoryError naming the "
                             f"argument): {str(e)[:800]!r}") from None
    except AssertionError:
        raise
    except BaseException as e:
        raise AssertionError(f"unexpected {type(e).__name__}: {str(e)[:800]!r}") from None


def settle(kind, value, spec):
    """Check the outcome against the spec's faults; True when a result must be compared."""
    faults = [f for f in spec.get("faults", ()) if not f.startswith("soft:")]
    soft = [f for f in spec.get("faults", ()) if f.startswith("soft:")]
    if kind == "err":
        if isinstance(value, Unavailable):
            if not spec.get("unavailable_ok"):
                raise AssertionError(f"backend reported unavailable for a supported input: {value}")
            return False
        if not faults and not soft:
            raise AssertionError(f"valid input rejected: {type(value).__name__}: {str(value)[:600]}")
        return False
    if faults:
        raise AssertionError(f"invalid input accepted (faults {faults}); it returned {_brief(value)}")
    return True


def _brief(v):
    if isinstance(v, (torch.Tensor, np.ndarray)):
        return f"{type(v).__name__} shape {tuple(v.shape)} dtype {v.dtype}"
    if isinstance(v, tuple):
        return "(" + ", ".join(_brief(x) for x in v) + ")"
    return repr(v)[:200]


def bits_equal(a, b, what="output"):
    """Exact equality: same shape and dtype, NaN where the reference has NaN, every other bit equal."""
    a = a.detach().cpu() if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
    b = b.detach().cpu() if isinstance(b, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(b))
    assert tuple(a.shape) == tuple(b.shape), f"{what}: shape {tuple(a.shape)} != reference {tuple(b.shape)}"
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != reference {b.dtype}"
    if a.numel() == 0:
        return
    if a.is_floating_point():
        an, bn = torch.isnan(a), torch.isnan(b)
        if not torch.equal(an, bn):
            i = int(torch.nonzero((an != bn).reshape(-1))[0, 0])
            raise AssertionError(f"{what}: NaN pattern differs from the reference at flat index {i}: "
                                 f"{a.reshape(-1)[i].item()} vs {b.reshape(-1)[i].item()}")
        ib = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        ai = a.contiguous().view(ib).reshape(-1)
        bi = b.contiguous().view(ib).reshape(-1)
        diff = (ai != bi) & ~an.reshape(-1)
    else:
        diff = (a != b).reshape(-1)
    if bool(diff.any()):
        idx = torch.nonzero(diff)[:, 0]
        i = int(idx[0])
        raise AssertionError(f"{what}: {idx.numel()} of {a.numel()} elements differ from the reference bit for bit; "
                             f"first at flat index {i}: {a.reshape(-1)[i].item()!r} vs {b.reshape(-1)[i].item()!r}")


def close(fast, ref_lp, ref64, dtype, what="output", ref32=None):
    """The 2x rule (embkern.testing.compare), after matching non-finite entries that the reference also has
    (overflow in low precision is the reference's answer too; whether inf - inf or an overflow comes first is
    order-dependent, so NaN and inf count alike there).

    For float64 inputs the reference "in the input dtype" is the float64 reference itself; then the bound
    also allows twice the float32 reference's error scaled by eps64/eps32 (``ref32``), the error that the
    problem's conditioning gives any float64 evaluation order."""
    f = fast.detach().cpu().double()
    r = ref_lp.detach().cpu().double()
    r64 = ref64.detach().cpu().double()
    assert f.shape == r64.shape, f"{what}: shape {tuple(f.shape)} != reference {tuple(r64.shape)}"
    bad = ~torch.isfinite(f)
    ref_bad = ~torch.isfinite(r) | ~torch.isfinite(r64)
    same = bad & (ref_bad | (f == r) | (f == r64))
    if bool((bad & ~same).any()):
        i = int(torch.nonzero((bad & ~same).reshape(-1))[0, 0])
        raise AssertionError(f"{what}: non-finite {f.reshape(-1)[i].item()} at flat index {i} where the reference "
                             f"gives {r.reshape(-1)[i].item()} (in the input dtype) / {r64.reshape(-1)[i].item()} (float64)")
    mask = bad | ref_bad
    f, r, r64 = (x.masked_fill(mask, 0.0) for x in (f, r, r64))
    reps = testing.compare(f, r, r64, dtype, what)
    extra = 0.0
    if ref32 is not None and dtype == torch.float64:
        r32 = ref32.detach().cpu().double().masked_fill(mask | ~torch.isfinite(ref32.detach().cpu().double()), 0.0)
        extra = 2.0 * float((r32 - r64).abs().max()) * (testing.eps(torch.float64) / testing.eps(torch.float32)) \
            if r32.numel() else 0.0
    badr = [str(x) + (f" (+ {extra:.3e} from float32 conditioning)" if extra else "")
            for x in reps if not (x.ok or x.err_fast <= x.bound + extra)]
    assert not badr, "parity failed: " + "; ".join(badr)


# ---------------------------------------------------------------------------
# Filters (CSR / per-row lists)


def build_filter(fs):
    """The filter_index argument from its spec, and (fo, fi) int64 tensors for the reference (None if invalid)."""
    if fs is None:
        return None, (None, None)
    form = fs["form"]
    if form == "junk":
        return fs["value"], (None, None)
    if form == "rows":
        rows = [list(r) for r in fs["rows"]]
        arg = rows if not fs.get("tuple") else tuple(rows)
        try:
            parts = [torch.tensor([int(v) for v in r], dtype=torch.int64) for r in rows]
            off = torch.zeros(len(rows) + 1, dtype=torch.int64)
            off[1:] = torch.cumsum(torch.tensor([p.numel() for p in parts], dtype=torch.int64), 0) if rows else off[1:]
            fi = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
            return arg, (off, fi)
        except Exception:
            return arg, (None, None)
    off, idx = list(fs["offsets"]), list(fs["index"])
    odt, idt = fs.get("odtype", "int64"), fs.get("idtype", "int64")
    if form == "csr_tensor":
        arg = (torch.tensor(off, dtype=DTYPES[odt]), torch.tensor(idx, dtype=DTYPES[idt]))
    elif form == "csr_numpy":
        arg = (np.array(off, NP_DTYPES[odt]), np.array(idx, NP_DTYPES[idt]))
    else:  # csr_lists: a tuple of two Python lists
        arg = (off, idx)
    try:
        ref = (torch.tensor(off, dtype=torch.int64), torch.tensor(idx, dtype=torch.int64))
    except Exception:
        ref = (None, None)
    return arg, ref


# ---------------------------------------------------------------------------
# Hypercomplex, public API

HC_NAMES = ("h", "r", "entities", "targets", "filter_index", "ties", "algebra", "score", "normalize_relation",
            "normalize", "bias_h", "bias_t", "layout", "backend", "k", "reduction", "shape")


def _c(t):
    return None if t is None else t.detach().contiguous()


def _up(t):
    return None if t is None else t.detach().double()


def _tie_band(S_lp, S64):
    """Tolerance of a score comparison: twice the reference's own low-precision error plus a few ulp."""
    fin = torch.isfinite(S_lp) & torch.isfinite(S64)
    if not bool(fin.any()):
        return 0.0
    err = float((S_lp.double() - S64)[fin].abs().max())
    scale = float(S64[fin].abs().max())
    if bool((torch.isfinite(S64) & ~torch.isfinite(S_lp)).any()):
        return float("inf")
    return 2 * err + testing.ULPS.get(S_lp.dtype, 16) * testing.eps(S_lp.dtype if S_lp.dtype.is_floating_point
                                                                  else torch.float32) * max(1.0, scale)


def hc_public(spec):
    fn = spec["fn"]
    T = {k: tensor(v) for k, v in spec["tensors"].items()}
    kw = dict(spec.get("kwargs", {}))
    be = spec.get("backend")
    filt, (fo, fi) = build_filter(spec.get("filter"))
    public = getattr(embkern, fn)
    dtype = T["h"].dtype if isinstance(T.get("h"), torch.Tensor) else torch.float32
    allow_unav = be == "cpu" and dtype in LOWP
    spec = dict(spec, unavailable_ok=allow_unav)

    if fn in ("hamilton_product", "dihedron_product"):
        call = lambda: public(T["h"], T["r"], backend=be, **kw)  # noqa: E731
    elif fn == "score_all":
        call = lambda: public(T["h"], T["r"], T["entities"], bias_h=T.get("bias_h"), bias_t=T.get("bias_t"),  # noqa: E731
                              backend=be, **kw)
    elif fn == "rank_all":
        call = lambda: public(T["h"], T["r"], T["entities"], T["targets"], filter_index=filt,  # noqa: E731
                              bias_h=T.get("bias_h"), bias_t=T.get("bias_t"), backend=be, **kw)
    elif fn == "topk_all":
        call = lambda: public(T["h"], T["r"], T["entities"], spec["k"], filter_index=filt,  # noqa: E731
                              bias_h=T.get("bias_h"), bias_t=T.get("bias_t"), backend=be, **kw)
    elif fn == "one_to_n_loss":
        call = lambda: public(T["h"], T["r"], T["entities"], T["targets"], bias_h=T.get("bias_h"),  # noqa: E731
                              bias_t=T.get("bias_t"), backend=be, **kw)
    else:
        raise AssertionError(f"unknown fn {fn}")
    kind, out = attempt(call, HC_NAMES, allow_unavailable=allow_unav)
    if not settle(kind, out, spec):
        return kind
    h, r = T["h"], T["r"]
    algebra = "dihedron" if fn == "dihedron_product" else kw.get("algebra", "quaternion")
    layout = kw.get("layout", "component")
    if fn in ("hamilton_product", "dihedron_product"):
        hb, rb = torch.broadcast_tensors(h.detach(), r.detach())
        shape = hb.shape
        exp = rhc.query(hb.reshape(-1, shape[-1]).contiguous(), rb.reshape(-1, shape[-1]).contiguous(), algebra,
                        layout, kw.get("normalize", False)).reshape(shape)
        bits_equal(out, exp, fn)
        return "ok"
    E, bh, bt = T["entities"], T.get("bias_h"), T.get("bias_t")
    score = kw.get("score", "inner")
    norm = kw.get("normalize_relation", True)
    args_lp = (_c(h), _c(r), _c(E))
    args_64 = tuple(_up(a) for a in args_lp)
    S_lp = rhc.score_all(*args_lp, algebra, score, norm, _c(bh), _c(bt), layout)
    S64 = rhc.score_all(*args_64, algebra, score, norm, _up(bh), _up(bt), layout)
    S32 = None
    if h.dtype == torch.float64:
        a32 = tuple(a.float() for a in args_lp)
        S32 = rhc.score_all(*a32, algebra, score, norm, None if bh is None else _c(bh).float(),
                            None if bt is None else _c(bt).float(), layout)
    if fn == "score_all":
        assert out.dtype == h.dtype, f"score_all: dtype {out.dtype}, expected {h.dtype}"
        close(out, S_lp, S64, h.dtype, "score_all", ref32=S32)
        return "ok"
    if fn == "rank_all":
        t = T["targets"].to(torch.int64)
        ties = kw.get("ties", "realistic")
        exp = rhc.rank_from_scores(S_lp, t, fo, fi, ties)
        _check_ranks(out, exp, S_lp, S64, t, fo, fi)
        return "ok"
    if fn == "topk_all":
        k = spec["k"]
        ev, ei = rhc.topk_from_scores(S_lp, k, fo, fi)
        _check_topk(out, (ev, ei), S_lp, S64, fo, fi, h.dtype)
        return "ok"
    if fn == "one_to_n_loss":
        red = kw.get("reduction", "mean")
        t = T["targets"]
        want_dt = torch.float32 if h.dtype in LOWP else h.dtype
        assert out.dtype == want_dt, f"one_to_n_loss: dtype {out.dtype}, expected {want_dt}"
        lp = rhc.one_to_n_loss(*args_lp, t, algebra, score, norm, _c(bh), _c(bt), layout, red)
        r64 = rhc.one_to_n_loss(*args_64, t, algebra, score, norm, _up(bh), _up(bt), layout, red)
        l32 = None
        if h.dtype == torch.float64:
            l32 = rhc.one_to_n_loss(*(a.float() for a in args_lp), t, algebra, score, norm,
                                    None if bh is None else _c(bh).float(), None if bt is None else _c(bt).float(),
                                    layout, red)
        close(out, lp, r64, h.dtype, "one_to_n_loss", ref32=l32)
        if spec.get("grad") and out.requires_grad:
            _check_loss_grads(out, T, kw, algebra, score, norm, layout, red, h.dtype)
        return "ok"
    raise AssertionError("unreachable")


def _check_loss_grads(out, T, kw, algebra, score, norm, layout, red, dtype):
    leaves = [T[n] for n in ("h", "r", "entities") if T[n].requires_grad]
    g_fast = torch.autograd.grad(out.sum(), leaves, allow_unused=True)

    def ref_grads(cast):
        xs = [T[n].detach().to(cast(T[n].dtype)).clone().requires_grad_(True) for n in ("h", "r", "entities")]
        bh = T.get("bias_h")
        bt = T.get("bias_t")
        bh = None if bh is None else bh.detach().to(cast(bh.dtype))
        bt = None if bt is None else bt.detach().to(cast(bt.dtype))
        loss = rhc.one_to_n_loss(*xs, T["targets"], algebra, score, norm, bh, bt, layout, red)
        gs = torch.autograd.grad(loss.sum(), xs, allow_unused=True)
        return [g for g, n in zip(gs, ("h", "r", "entities")) if T[n].requires_grad]

    g_lp = ref_grads(lambda d: d)
    g_64 = ref_grads(lambda d: torch.float64)
    g_32 = ref_grads(lambda d: torch.float32) if dtype == torch.float64 else [None] * len(g_64)
    for name, a, b, c, e in zip(("grad_h", "grad_r", "grad_entities"), g_fast, g_lp, g_64, g_32):
        if a is None or b is None or c is None:
            continue
        close(a, b, c, dtype, f"one_to_n_loss {name}", ref32=e)


def _mask(B, N, fo, fi):
    m = torch.zeros(B, N, dtype=torch.bool)
    if fo is not None:
        rows = torch.repeat_interleave(torch.arange(B), fo[1:] - fo[:-1])
        m[rows, fi] = True
    return m


def _check_ranks(out, exp, S_lp, S64, t, fo, fi):
    assert out.dtype == torch.float64, f"rank_all: dtype {out.dtype}, expected float64"
    assert out.shape == exp.shape, f"rank_all: shape {tuple(out.shape)} != reference {tuple(exp.shape)}"
    B, N = S_lp.shape
    if B == 0:
        return
    tol = _tie_band(S_lp, S64)
    keep = ~_mask(B, N, fo, fi)
    keep[torch.arange(B), t] = False
    for b in range(B):
        if out[b] == exp[b]:
            continue
        row_lp = S_lp[b]
        if bool(torch.isnan(row_lp).any()) or not bool(torch.isfinite(S64[b]).all()):
            raise AssertionError(f"rank_all: row {b}: rank {out[b].item()} != reference {exp[b].item()} "
                                 f"(row has NaN/inf scores; the reference's comparisons decide)")
        st = S64[b, t[b]]
        lo = 1 + int(((S64[b] > st + tol) & keep[b]).sum())
        hi = 1 + int(((S64[b] >= st - tol) & keep[b]).sum())
        if not lo <= float(out[b]) <= hi:
            raise AssertionError(f"rank_all: row {b}: rank {out[b].item()} != reference {exp[b].item()} and outside "
                                 f"[{lo}, {hi}], the ranks that scores within the tolerance {tol:.3g} allow")


def _check_topk(out, ref, S_lp, S64, fo, fi, dtype):
    v, i = out
    ev, ei = ref
    assert i.dtype == torch.int64, f"topk_all: indices dtype {i.dtype}, expected int64"
    assert v.dtype == dtype, f"topk_all: values dtype {v.dtype}, expected {dtype}"
    assert tuple(i.shape) == tuple(ei.shape) and tuple(v.shape) == tuple(ev.shape), \
        f"topk_all: shapes {tuple(v.shape)}, {tuple(i.shape)} != reference {tuple(ev.shape)}, {tuple(ei.shape)}"
    B, N = S_lp.shape
    if i.numel() == 0:
        return
    if not torch.equal(i, ei):
        tol = _tie_band(S_lp, S64)
        m = _mask(B, N, fo, fi)
        for b in range(B):
            if torch.equal(i[b], ei[b]):
                continue
            ctx = f"topk_all: row {b}: indices {i[b].tolist()} != reference {ei[b].tolist()}"
            if bool(torch.isnan(S_lp[b]).any()) or not bool(torch.isfinite(S64[b]).all()):
                raise AssertionError(ctx + " (row has NaN/inf scores)")
            ib = i[b]
            assert bool(((ib >= 0) & (ib < N)).all()), ctx + ": ids out of range"
            assert ib.unique().numel() == ib.numel(), ctx + ": duplicate ids"
            assert not bool(m[b, ib].any()), ctx + ": a filtered id was returned"
            d = (S64[b, ib] - S64[b, ei[b]]).abs()
            if not bool((d <= tol).all()):
                raise AssertionError(ctx + f" and the scores differ by {float(d.max()):.3g} > tolerance {tol:.3g}")
        ev = S_lp.gather(1, i)  # compare values at the ids returned
    close(v, ev, S64.gather(1, i), dtype, "topk_all values")


# ---------------------------------------------------------------------------
# FDE, public API

FDE_NAMES = ("points", "offsets", "config", "backend", "lengths", "out", "dimension", "num_repetitions",
             "num_simhash_projections", "seed", "encoding_type", "projection_type", "projection_dimension",
             "fill_empty_partitions", "final_projection_dimension", "batch", "batches", "total", "progress",
             "q_points", "q_offsets", "d_points", "d_offsets", "doc_chunk", "candidates", "k", "config.dimension")


def _ref_cost(c) -> int:
    """A rough count of the reference's Python-level work for one document."""
    return c.num_repetitions * (c.num_partitions + 4) + (c.fde_dimension_before_projection if
                                                         c.final_projection_dimension else 0) // 64


def _ragged_points(spec):
    """(call args for the input form, X float32 numpy (N, d), offsets int64) from an FDE input spec."""
    form = spec["form"]
    if form == "list":
        parts = [tensor(p) for p in spec["parts"]]
        return {"points": parts}, parts
    P = tensor(spec["points"])
    if form == "padded":
        return {"points": P, "lengths": tensor(spec["lengths"])}, None
    return {"points": P, "offsets": tensor(spec["offsets"])}, None


def _as_np32(x):
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return x.to(torch.float32).numpy() if x.is_floating_point() else x.numpy()
    return np.asarray(x).astype(np.float32)


def _expected_ragged(args, d):
    """(X float32 (N, d), offsets int64 (B+1,)) as the reference reads the valid input."""
    pts = args["points"]
    if isinstance(pts, list):
        arrs = [_as_np32(p).reshape(-1, d) for p in pts]
        X = np.concatenate(arrs) if arrs else np.zeros((0, d), np.float32)
        off = np.zeros(len(arrs) + 1, np.int64)
        off[1:] = np.cumsum([a.shape[0] for a in arrs])
        return X, off
    if "lengths" in args:
        P = _as_np32(pts)
        L = np.asarray(args["lengths"].cpu() if isinstance(args["lengths"], torch.Tensor) else args["lengths"],
                       np.int64)
        X = np.concatenate([P[b, :L[b]] for b in range(P.shape[0])]) if P.shape[0] else np.zeros((0, d), np.float32)
        off = np.zeros(P.shape[0] + 1, np.int64)
        off[1:] = np.cumsum(L)
        return X.reshape(-1, d), off
    o = args["offsets"]
    off = np.asarray(o.cpu() if isinstance(o, torch.Tensor) else o, np.int64)
    return _as_np32(pts), off


_REF_TABLES = {}


def ref_tables(c):
    key = (c.seed, c.dimension, c.num_repetitions, c.num_simhash_projections, c.projection_type, c.projection_dim,
           c.final_projection_dimension)
    if key not in _REF_TABLES:
        if len(_REF_TABLES) > 64:
            _REF_TABLES.clear()
        _REF_TABLES[key] = rfde.Tables(c)
    return _REF_TABLES[key]


def _make_out(spec_out, B, D, as_np):
    if spec_out is None:
        return None
    kind = spec_out["kind"]
    if kind == "raw":
        return spec_out["value"]
    shape = tuple(spec_out.get("shape", (B, D)))
    dt = spec_out.get("dtype", "float32")
    if as_np if kind == "auto" else kind == "numpy":
        a = np.full(shape, np.nan, NP_DTYPES[dt]) if dt.startswith("float") else np.zeros(shape, NP_DTYPES[dt])
        if spec_out.get("fortran") and a.ndim == 2:
            a = np.asfortranarray(a)
        if spec_out.get("readonly"):
            a.flags.writeable = False
        return a
    t = torch.full(shape, float("nan"), dtype=DTYPES[dt]) if DTYPES[dt].is_floating_point else torch.zeros(
        shape, dtype=DTYPES[dt])
    if spec_out.get("fortran") and t.dim() == 2:
        t = t.T.contiguous().T
    return t


def fde_public(spec):
    be = spec.get("backend")
    names = FDE_NAMES
    kind, cfg = attempt(lambda: embkern.FDEConfig(**spec["config"]), names)
    if kind == "err":
        settle(kind, cfg, spec)
        return "config rejected"
    args, _ = _ragged_points(spec["input"])
    fn = spec.get("fn", "fde_encode")
    out_arg = None
    if spec.get("out") is not None:
        # B and the input kind from the spec (the out buffer is built before the call)
        as_np = not isinstance(args["points"], torch.Tensor) and not (
            isinstance(args["points"], list) and args["points"] and isinstance(args["points"][0], torch.Tensor))
        out_arg = _make_out(spec["out"], spec["input"].get("B", 0), cfg.output_dimension, as_np)
    t0 = time.monotonic()
    if fn == "fde_encode":
        call = lambda: embkern.fde_encode(config=cfg, backend=be, out=out_arg, **args)  # noqa: E731
    else:
        enc_kind = fn.split(".", 1)[1]
        # the encoder builds its tables in the constructor: that is part of the call
        if enc_kind == "encode_corpus":
            batches = _corpus_batches(args)
            call = lambda: embkern.FDEEncoder(cfg, backend=be).encode_corpus(  # noqa: E731
                batches, out=out_arg, progress=False)
            cfg_used = cfg.replace(encoding_type="document")
        else:
            call = lambda: getattr(embkern.FDEEncoder(cfg, backend=be), enc_kind)(**args)  # noqa: E731
            cfg_used = {"encode": cfg, "encode_queries": cfg.replace(encoding_type="query",
                                                                     fill_empty_partitions=False),
                        "encode_documents": cfg.replace(encoding_type="document")}[enc_kind]
    kind, res = attempt(call, names)
    wall = time.monotonic() - t0
    if not settle(kind, res, spec):
        return kind
    c = cfg if fn == "fde_encode" else cfg_used
    X, off = _expected_ragged(args, c.dimension)
    B = len(off) - 1
    if out_arg is not None and fn == "fde_encode":
        assert res is out_arg, "fde_encode: returned a new array instead of out"
    if isinstance(res, torch.Tensor):
        assert res.dtype == torch.float32, f"result dtype {res.dtype}, expected float32"
        res_np = res.detach().cpu().numpy()
    else:
        assert isinstance(res, np.ndarray), f"result of type {type(res).__name__}"
        assert res.dtype == np.float32, f"result dtype {res.dtype}, expected float32"
        res_np = res
    assert res_np.shape == (B, c.output_dimension), \
        f"result shape {res_np.shape}, expected {(B, c.output_dimension)}"
    if B == 0:
        return "ok (empty batch)"
    if _ref_cost(c) > 3000:
        # too big for the NumPy reference: shape and time are checked, and that it did not overrun
        assert wall < 20, f"{fn}: {wall:.1f} s for a {res_np.shape} float32 result"
        assert np.isfinite(res_np).all(), f"{fn}: non-finite values in the encoding of finite points"
        return "ok (large config: shape checked)"
    exp = rfde.encode(X, off, c, ref_tables(c))
    bits_equal(res_np, exp, fn)
    return "ok"


def _corpus_batches(args):
    pts = args["points"]
    if isinstance(pts, list):
        half = len(pts) // 2
        return [pts[:half], pts[half:]]
    if "lengths" in args:
        return [(pts, args["lengths"])]
    return [(pts, args["offsets"])]


def chamfer_public(spec):
    names = FDE_NAMES
    q = tensor(spec["q_points"])
    d = tensor(spec["d_points"])
    qo = tensor(spec["q_offsets"])
    do = tensor(spec["d_offsets"])
    fn = spec["fn"]
    if fn == "chamfer":
        kw = {} if spec.get("doc_chunk", "default") == "default" else {"doc_chunk": spec["doc_chunk"]}
        call = lambda: embkern.chamfer(q, qo, d, do, **kw)  # noqa: E731
    else:
        cand = tensor(spec["candidates"])
        call = lambda: embkern.chamfer_rerank(q, qo, cand, d, do, spec["k"])  # noqa: E731
    kind, res = attempt(call, names)
    if not settle(kind, res, spec):
        return kind
    qn, dn = _as_np32(q), _as_np32(d)
    qon = np.asarray(qo.cpu() if isinstance(qo, torch.Tensor) else qo, np.int64)
    don = np.asarray(do.cpu() if isinstance(do, torch.Tensor) else do, np.int64)
    as_np = isinstance(q, np.ndarray)
    S64 = _chamfer64(qn, qon, dn, don)
    S32 = _chamfer32(qn, qon, dn, don)
    if fn == "chamfer":
        assert isinstance(res, np.ndarray) == as_np, f"chamfer: returned {type(res).__name__} for numpy={as_np} input"
        r = torch.as_tensor(np.asarray(res) if as_np else res)
        assert r.dtype == torch.float32, f"chamfer: dtype {r.dtype}, expected float32"
        close(r, torch.from_numpy(S32), torch.from_numpy(S64), torch.float32, "chamfer")
        return "ok"
    s, ids = res
    s = torch.as_tensor(np.asarray(s)) if as_np else s
    ids = torch.as_tensor(np.asarray(ids)) if as_np else ids
    cand = torch.as_tensor(np.asarray(tensor(spec["candidates"])), dtype=torch.int64) if not isinstance(
        tensor(spec["candidates"]), torch.Tensor) else tensor(spec["candidates"]).to(torch.int64)
    k = int(spec["k"])
    Bq = len(qon) - 1
    assert tuple(s.shape) == (Bq, k) and tuple(ids.shape) == (Bq, k), \
        f"chamfer_rerank: shapes {tuple(s.shape)}, {tuple(ids.shape)}, expected {(Bq, k)}"
    assert ids.dtype == torch.int64 and s.dtype == torch.float32, f"chamfer_rerank: dtypes {s.dtype}, {ids.dtype}"
    if Bq == 0 or k == 0:
        return "ok"
    C64 = torch.from_numpy(S64).gather(1, cand) if cand.numel() else torch.zeros(Bq, 0, dtype=torch.float64)
    C32 = torch.from_numpy(S32).gather(1, cand) if cand.numel() else torch.zeros(Bq, 0, dtype=torch.float32)
    order = torch.sort(C32, dim=1, descending=True, stable=True).indices[:, :k]
    e_ids = cand.gather(1, order)
    if not torch.equal(ids, e_ids):
        tol = _tie_band(C32, C64)
        for a in range(Bq):
            if torch.equal(ids[a], e_ids[a]):
                continue
            ctx = f"chamfer_rerank: row {a}: ids {ids[a].tolist()} != reference {e_ids[a].tolist()}"
            assert set(ids[a].tolist()) <= set(cand[a].tolist()), ctx + ": an id that is not a candidate"
            s_got = torch.from_numpy(S64)[a, ids[a]]
            s_exp = torch.from_numpy(S64)[a, e_ids[a]]
            fin = torch.isfinite(s_got) & torch.isfinite(s_exp)
            assert torch.equal(torch.isfinite(s_got), torch.isfinite(s_exp)), ctx
            assert bool(((s_got - s_exp)[fin].abs() <= tol).all()), ctx + f" beyond the tolerance {tol:.3g}"
    got64 = torch.from_numpy(S64).gather(1, ids)
    got32 = torch.from_numpy(S32).gather(1, ids)
    close(s, got32, got64, torch.float32, "chamfer_rerank scores")
    return "ok"


def _chamfer64(q, qo, x, xo):
    return rfde.chamfer(q, qo, x, xo).astype(np.float64) if len(qo) > 1 and len(xo) > 1 else np.zeros(
        (len(qo) - 1, len(xo) - 1))


def _chamfer32(q, qo, x, xo):
    """The Chamfer definition evaluated in float32 (the reference run in the input dtype)."""
    S = np.zeros((len(qo) - 1, len(xo) - 1), np.float32)
    q = q.astype(np.float32)
    x = x.astype(np.float32)
    for a in range(len(qo) - 1):
        qa = q[qo[a]:qo[a + 1]]
        if len(qa) == 0:
            continue
        for b in range(len(xo) - 1):
            xb = x[xo[b]:xo[b + 1]]
            S[a, b] = (qa @ xb.T).max(axis=1).sum(dtype=np.float32) if len(xb) else -np.inf
    return S


# ---------------------------------------------------------------------------
# Raw embkern._C


def _raw_array(spec):
    """numpy input for a raw _C call: a tensor spec (lib numpy), None, or a raw object."""
    if isinstance(spec, dict) and "shape" in spec:
        a = tensor(dict(spec, lib="numpy"))
        if spec.get("readonly") and isinstance(a, np.ndarray):
            a = a.copy() if a.flags.writeable is False else a
            a.flags.writeable = False
        if spec.get("as_array_module"):
            return array.array("f" if a.dtype == np.float32 else "d" if a.dtype == np.float64 else "q",
                               a.reshape(-1).tolist())
        return a
    if isinstance(spec, dict) and "raw" in spec:
        return spec["raw"]
    return spec


RAW_HC_ARGS = {
    "query_forward": ("h", "r", "q_out", "algebra", "layout", "normalize"),
    "query_backward": ("grad_q", "h", "r", "grad_h_out", "grad_r_out", "algebra", "layout", "normalize"),
    "score_forward": ("q", "E", "bias_h", "bias_t", "S_out", "score"),
    "rank": ("q", "E", "bias_h", "bias_t", "targets", "filter_offsets", "filter_index", "ranks_out", "score", "ties"),
    "topk": ("q", "E", "bias_h", "bias_t", "filter_offsets", "filter_index", "values_out", "indices_out", "score"),
    "ce_forward": ("q", "E", "bias_h", "bias_t", "targets", "loss_out", "lse_out", "score"),
    "ce_backward": ("grad_loss", "q", "E", "bias_h", "bias_t", "targets", "lse", "grad_q_out", "grad_E_out",
                    "grad_bias_h_out", "grad_bias_t_out", "score"),
}
_ALG = ("quaternion", "dihedron")
_LAY = ("component", "interleaved")
_SC = ("inner", "distance")
_TI = ("realistic", "optimistic", "pessimistic")


def _set_env(spec, names):
    """Apply the case's ISA level and thread count (restored after the case)."""
    if spec.get("isa"):
        C.set_isa(spec["isa"])
    if spec.get("threads"):
        C.set_num_threads(spec["threads"])


def raw_hc(spec):
    fn = spec["fn"]
    argn = RAW_HC_ARGS[fn]
    vals = {n: _raw_array(spec["args"][n]) for n in argn}
    _set_env(spec, argn)
    f = getattr(C.hypercomplex, fn)
    names = argn + ("filter_offsets / filter_index",)
    kind, res = attempt(lambda: f(*[vals[n] for n in argn]), names)
    if not settle(kind, res, spec):
        return kind
    assert res is None, f"{fn}: returned {res!r}, expected None (outputs are written in place)"
    tt = {n: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v) for n, v in vals.items()}
    if fn == "query_forward":
        exp = rhc.query(tt["h"], tt["r"], _ALG[vals["algebra"]], _LAY[vals["layout"]], bool(vals["normalize"]))
        bits_equal(tt["q_out"], exp, "q_out")
        return "ok"
    if fn == "query_backward":
        up = lambda x: x.double()  # noqa: E731
        a = (_ALG[vals["algebra"]], _LAY[vals["layout"]], bool(vals["normalize"]))
        gh, gr = rhc.query_backward(tt["grad_q"], tt["h"], tt["r"], *a)
        gh64, gr64 = rhc.query_backward(up(tt["grad_q"]), up(tt["h"]), up(tt["r"]), *a)
        gh32, gr32 = rhc.query_backward(tt["grad_q"].float(), tt["h"].float(), tt["r"].float(), *a)
        close(tt["grad_h_out"], gh, gh64, tt["h"].dtype, "grad_h_out", ref32=gh32)
        close(tt["grad_r_out"], gr, gr64, tt["h"].dtype, "grad_r_out", ref32=gr32)
        return "ok"
    q, E, bh, bt = tt["q"], tt["E"], tt["bias_h"], tt["bias_t"]
    sc = _SC[vals["score"]]
    S = rhc.scores(q, E, bh, bt, sc)
    S64 = rhc.scores(q.double(), E.double(), _up(bh), _up(bt), sc)
    S32 = rhc.scores(q.float(), E.float(), None if bh is None else bh.float(), None if bt is None else bt.float(),
                     sc)
    if fn == "score_forward":
        close(tt["S_out"], S, S64, q.dtype, "S_out", ref32=S32)
        return "ok"
    fo, fi = tt.get("filter_offsets"), tt.get("filter_index")
    if fn == "rank":
        t = tt["targets"]
        exp = rhc.rank_from_scores(S, t, fo, fi, _TI[vals["ties"]])
        _check_ranks(tt["ranks_out"], exp, S, S64, t, fo, fi)
        return "ok"
    if fn == "topk":
        k = tt["values_out"].shape[1]
        ev, ei = rhc.topk_from_scores(S, k, fo, fi)
        _check_topk((tt["values_out"], tt["indices_out"]), (ev, ei), S, S64, fo, fi, q.dtype)
        return "ok"
    if fn == "ce_forward":
        t = tt["targets"]
        lse = torch.logsumexp(S, 1)
        lse64 = torch.logsumexp(S64, 1)
        close(tt["lse_out"], lse, lse64, q.dtype, "lse_out")
        close(tt["loss_out"], lse - S.gather(1, t[:, None])[:, 0], lse64 - S64.gather(1, t[:, None])[:, 0], q.dtype,
              "loss_out")
        return "ok"
    if fn == "ce_backward":
        from embkern.ops import hypercomplex as ophc

        t = tt["targets"]
        got = (tt["grad_q_out"], tt["grad_E_out"], tt["grad_bias_h_out"], tt["grad_bias_t_out"])
        lp = ophc._ref_ce_backward(tt["grad_loss"], q, E, bh, bt, t, tt["lse"], sc)
        r64 = ophc._ref_ce_backward(tt["grad_loss"].double(), q.double(), E.double(), _up(bh), _up(bt), t,
                                    tt["lse"].double(), sc)
        r32 = ophc._ref_ce_backward(tt["grad_loss"].float(), q.float(), E.float(), None if bh is None else bh.float(),
                                    None if bt is None else bt.float(), t, tt["lse"].float(), sc)
        for name, a, b, c, e in zip(("grad_q_out", "grad_E_out", "grad_bias_h_out", "grad_bias_t_out"), got, lp, r64,
                                    r32):
            close(a, b, c, q.dtype, name, ref32=e)
        return "ok"
    raise AssertionError("unreachable")


def raw_fde_tables(spec):
    fn = spec["fn"]
    a = spec["args"]
    names = ("seed", "dimension", "num_simhash", "num_repetitions", "projection_dim", "projection_dimension",
             "length", "final_dim", "final_projection_dimension", "bucket", "num_simhash_projections")
    f = getattr(C.fde, fn)
    if fn == "count_sketch_csr":
        bucket = _raw_array(a["bucket"])
        call = lambda: f(bucket, a["final_dim"])  # noqa: E731
    else:
        call = lambda: f(*a["pos"])  # noqa: E731
    kind, res = attempt(call, names)
    if not settle(kind, res, spec):
        return kind
    if fn == "simhash_table":
        seed, d, k, R = a["pos"]
        bits_equal(res, rfde.simhash_table(seed, d, k, R), "simhash_table")
    elif fn == "ams_table":
        seed, d, dp, R = a["pos"]
        idx, sgn = res
        assert idx.shape == (R, d) and sgn.shape == (R, d), f"ams_table: shapes {idx.shape}, {sgn.shape}"
        if idx.size:
            assert int(idx.min()) >= 0 and int(idx.max()) < dp, \
                f"ams_table: indices outside [0, {dp}): min {int(idx.min())}, max {int(idx.max())}"
            assert np.isin(sgn, (-1.0, 1.0)).all(), "ams_table: signs other than +-1"
        ei, es = rfde.ams_table(seed, d, dp, R)
        bits_equal(idx, ei, "ams_table index")
        bits_equal(sgn, es, "ams_table sign")
    elif fn == "count_sketch_table":
        seed, L, D = a["pos"]
        b, s = res
        if b.size:
            assert int(b.min()) >= 0 and int(b.max()) < D, f"count_sketch_table: buckets outside [0, {D})"
        eb, es = rfde.count_sketch_table(seed, L, D)
        bits_equal(b, eb, "count_sketch_table bucket")
        bits_equal(s, es, "count_sketch_table sign")
    elif fn == "count_sketch_csr":
        bucket = np.asarray(_raw_array(a["bucket"]))
        off, mem = res
        eo, em, _ = rfde.count_sketch_csr(bucket.astype(np.int64), np.ones(bucket.shape, np.float32), a["final_dim"])
        bits_equal(off, eo, "count_sketch_csr offsets")
        bits_equal(mem, em, "count_sketch_csr members")
    return "ok"


PLAN_NAMES = ("dimension", "num_repetitions", "num_simhash", "projection_dim", "projection_dimension",
              "is_document", "fill_empty_partitions", "final_dim", "simhash", "ams_index", "ams_sign", "cs_bucket",
              "cs_sign", "plan", "points", "offsets", "out", "fde tables", "num_simhash_projections",
              "final_projection_dimension", "config", "ams_index, ams_sign", "cs_bucket, cs_sign")


def raw_fde_plan(spec):
    """embkern._C.fde.Plan(...) then encode(plan, points, offsets, out), tables possibly broken or mutated."""
    p = spec["plan"]
    d, R, k, dp = p["d"], p["R"], p["k"], p["dp"]
    is_doc, fill, D = p["is_document"], p["fill"], p["final_dim"]
    seed = p.get("seed", 1)
    tabs = _plan_tables(spec)
    _set_env(spec, ())
    kind, plan = attempt(lambda: C.fde.Plan(d, R, k, dp, is_doc, fill, D, tabs["simhash"], tabs["ams_index"],
                                            tabs["ams_sign"], tabs["cs_bucket"], tabs["cs_sign"]), PLAN_NAMES)
    if kind == "err":
        settle(kind, plan, spec)
        return "plan rejected"
    # what the tables were when the plan was built
    snap = {n: (np.array(v, copy=True) if isinstance(v, (np.ndarray, array.array)) else v) for n, v in tabs.items()}
    mutated = _mutate_tables(spec, tabs)
    del tabs
    gc.collect()
    X = _raw_array(spec["points"])
    off = _raw_array(spec["offsets"])
    out = _raw_array(spec["out"]) if spec.get("out") is not None else None
    if out is None:
        Bn = (len(off) - 1) if isinstance(off, np.ndarray) and off.ndim == 1 and len(off) else 0
        Dout = D if D > 0 else R * (1 << k) * dp
        out = np.full((Bn, Dout), np.nan, np.float32)
    kind, res = attempt(lambda: C.fde.encode(plan, X, off, out), PLAN_NAMES)
    if not settle(kind, res, spec):
        return kind
    cfg = rfde.FDEConfig(d, R, k, seed, "document" if is_doc else "query",
                         "ams_sketch" if snap["ams_index"] is not None else "identity",
                         dp if snap["ams_index"] is not None else None, fill, D if D > 0 else None)
    exp = _ref_encode_with(cfg, snap, X, off)
    try:
        bits_equal(out, exp, "encode out")
    except AssertionError:
        if mutated is None:
            raise
        # a plan that pins (rather than copies) the caller's tables may read the new, in-range contents
        bits_equal(out, _ref_encode_with(cfg, mutated, X, off), "encode out (against the mutated tables)")
    return "ok"


def _plan_tables(spec):
    p = spec["plan"]
    d, R, k, dp, D = p["d"], p["R"], p["k"], p["dp"], p["final_dim"]
    seed = p.get("seed", 1)
    t = {}
    broken = dict(p.get("broken", {}))
    ok = d > 0 and R > 0 and 0 <= k <= 30 and 0 < dp < 2**31
    t["simhash"] = broken["simhash"] if "simhash" in broken else (
        rfde.simhash_table(seed, d, k, R) if ok else np.zeros((max(R, 0), max(d, 0), max(k, 0)), np.float32))
    if not ok:  # a config past its limits: tables of whatever shape can be made, the plan must refuse it
        D = max(D, 0) if D < 2**20 else 0
        L = max(R, 0) * (1 << max(min(k, 8), 0)) * min(max(dp, 0), 8)
    if p.get("ams") and not ok:
        t["ams_index"] = np.zeros((max(R, 0), max(d, 0)), np.int32)
        t["ams_sign"] = np.ones((max(R, 0), max(d, 0)), np.float32)
    elif p.get("ams"):
        ai, asg = rfde.ams_table(seed, d, dp, R)
        t["ams_index"] = broken.get("ams_index", ai)
        t["ams_sign"] = broken.get("ams_sign", asg)
    else:
        t["ams_index"] = broken.get("ams_index", None)
        t["ams_sign"] = broken.get("ams_sign", None)
    if D > 0:
        if ok:
            L = R * (1 << k) * dp
        cb, cs = rfde.count_sketch_table(seed, L, D)
        if p.get("signs") == "arbitrary":
            cs = (np.random.default_rng(p.get("seed", 1) & 0xFFFF).standard_normal(L)).astype(np.float32)
        if p.get("array_module"):
            cb, cs = array.array("i", cb.tolist()), array.array("f", cs.tolist())
        t["cs_bucket"] = broken.get("cs_bucket", cb)
        t["cs_sign"] = broken.get("cs_sign", cs)
    else:
        t["cs_bucket"] = broken.get("cs_bucket", None)
        t["cs_sign"] = broken.get("cs_sign", None)
    return t


def _mutate_tables(spec, tabs):
    """After the plan is built: change or resize the caller's count-sketch arrays (the plan must not care)."""
    how = spec["plan"].get("mutate")
    if not how or tabs["cs_bucket"] is None:
        return None
    cb, cs = tabs["cs_bucket"], tabs["cs_sign"]
    D = spec["plan"]["final_dim"]
    new = None
    if how == "overwrite" and isinstance(cb, np.ndarray):
        cb[...] = (cb + 1) % D  # still in range
        cs[...] = -2.5 * cs
        new = dict(tabs, cs_bucket=cb.copy(), cs_sign=cs.copy())
    elif how == "overwrite_out_of_range" and isinstance(cb, np.ndarray):
        cb[...] = 2**31 - 1
        cs[...] = np.nan
    elif how == "resize" and isinstance(cb, array.array):
        try:  # array.array refuses to resize while a buffer is exported; both outcomes are fine
            cb.extend([2**31 - 1] * 100000)
            cs.extend([float("nan")] * 100000)
            del cb[:]
            del cs[:]
        except BufferError:
            pass
    return new


def _ref_encode_with(cfg, tabs, X, off):
    t = rfde.Tables.__new__(rfde.Tables)
    t.config = cfg
    t.simhash = np.asarray(tabs["simhash"], np.float32)
    if tabs["ams_index"] is not None:
        t.ams_index = np.asarray(tabs["ams_index"], np.int32)
        t.ams_sign = np.asarray(tabs["ams_sign"], np.float32)
        R, d = t.ams_index.shape
        dense = np.zeros((R, d, cfg.projection_dim), np.float32)
        r_i, d_i = np.meshgrid(np.arange(R), np.arange(d), indexing="ij")
        dense[r_i, d_i, t.ams_index] = t.ams_sign
        t.ams_dense = dense
    else:
        t.ams_index = t.ams_sign = t.ams_dense = None
    if tabs["cs_bucket"] is not None:
        t.cs_bucket = np.asarray(tabs["cs_bucket"], np.int32)
        t.cs_sign = np.asarray(tabs["cs_sign"], np.float32)
    else:
        t.cs_bucket = t.cs_sign = None
    return rfde.encode(np.asarray(X, np.float32), np.asarray(off, np.int64), cfg, t)


def raw_misc(spec):
    """Top-level _C functions: set_num_threads, set_isa, get_num_threads, isa_info, build_info."""
    fn = spec["fn"]
    names = ("num_threads", "isa", "level")
    if fn == "set_num_threads":
        n = spec["value"]
        kind, res = attempt(lambda: C.set_num_threads(n), names)
        if not settle(kind, res, spec):
            return kind
        assert C.get_num_threads() == n, f"set_num_threads({n!r}): get_num_threads() = {C.get_num_threads()}"
        # and the kernels still run with that many threads, same bits
        _threads_smoke()
        return "ok"
    if fn == "set_isa":
        lvl = spec["value"]
        kind, res = attempt(lambda: C.set_isa(lvl), names)
        if not settle(kind, res, spec):
            return kind
        want = C.isa_info()["best"] if lvl == "native" else lvl
        got = C.isa_info()["active"]
        assert got == want, f"set_isa({lvl!r}): active level {got!r}, expected {want!r}"
        _threads_smoke()
        return "ok"
    if fn == "info":
        b = C.build_info()
        i = C.isa_info()
        assert isinstance(b, dict) and isinstance(i, dict), "build_info/isa_info: expected dicts"
        assert i["active"] in i["available"], f"isa_info: active {i['active']!r} not in {i['available']}"
        assert isinstance(C.get_num_threads(), int) and C.get_num_threads() >= 1
        return "ok"
    raise AssertionError(f"unknown fn {fn}")


def _threads_smoke():
    g = torch.Generator().manual_seed(5)
    h, r, E = (torch.randn(s, generator=g) for s in ((37, 16), (37, 16), (51, 16)))
    out = embkern.hamilton_product(h, r, backend="cpu")
    bits_equal(out, rhc.query(h, r, "quaternion", "component", False), "hamilton_product after the change")
    cfg = embkern.FDEConfig(16, 2, 3, encoding_type="document")
    X = torch.randn(40, 16, generator=g).numpy()
    off = np.array([0, 7, 7, 40])
    bits_equal(embkern.fde_encode(X, off, cfg, backend="cpu"), rfde.encode(X, off, cfg, ref_tables(cfg)),
               "fde_encode after the change")


EXECUTORS = {
    "hc_public": hc_public,
    "fde_public": fde_public,
    "chamfer_public": chamfer_public,
    "raw_hc": raw_hc,
    "raw_fde_tables": raw_fde_tables,
    "raw_fde_plan": raw_fde_plan,
    "raw_misc": raw_misc,
}

# The attention and bit-cipher raw executors live in their own module (they use the helpers above).
from _fuzz_cases_attn import EXECUTORS as _ATTENTION_EXECUTORS  # noqa: E402

EXECUTORS.update(_ATTENTION_EXECUTORS)
