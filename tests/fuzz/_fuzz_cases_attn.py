"""Executors of the attention and bit-cipher fuzz cases: the raw ``embkern._C`` functions
(test_fuzz_raw_attention.py) and the public API (test_fuzz_attention.py).

They run in the worker process, like those of ``_fuzz_cases`` (whose helpers they use): build the
inputs, make the call, then either check the error (kind, and the argument it names) or compare the
result with the reference.
"""

from __future__ import annotations

import numpy as np
import torch

import embkern._C as C
import embkern
from _fuzz_cases import LOWP, _raw_array, _set_env, attempt, bits_equal, close, settle, tensor
from embkern.ops import bit_cipher as obc
from embkern.reference import bit_cipher as rbc
from embkern.reference import rel_conv_attention as rrca
from embkern.reference import selective_attention as rssa


def _t(v):
    return torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v


def _as(dtype, *ts):
    """The tensors cast to dtype (None stays None): the reference run in float64 or float32."""
    return [None if t is None else t.to(dtype) for t in ts]


SSA_ARGS = {
    "forward": ("q", "k", "v", "tau_q", "tau_v", "out", "lse_out"),
    "backward": ("grad_out", "q", "k", "v", "tau_q", "tau_v", "out", "lse", "dq_out", "dk_out", "dv_out",
                 "dtau_q_out", "dtau_v_out"),
}


def raw_ssa(spec):
    fn, argn = spec["fn"], SSA_ARGS[spec["fn"]]
    vals = {n: _raw_array(spec["args"][n]) for n in argn}
    causal, scale, off = spec["causal"], spec["scale"], spec["q_offset"]
    hard = [f for f in spec["faults"] if not f.startswith("soft:")]
    tt = {n: _t(v) for n, v in vals.items()}
    if fn == "backward" and not hard:
        # a consistent (out, lse) pair for the backward: the reference's, in the input dtype
        o, l = rssa.attention_forward(tt["q"], tt["k"], tt["v"], tt["tau_q"], tt["tau_v"], causal, scale, off)
        vals["out"][...] = o.numpy()
        vals["lse"][...] = l.numpy()
    _set_env(spec, argn)
    f = getattr(C.selective_attention, fn)
    names = argn + ("scale", "q_offset", "causal")
    kind, res = attempt(lambda: f(*[vals[n] for n in argn], causal, scale, off), names)
    if not settle(kind, res, spec):
        return kind
    assert res is None, f"{fn}: returned {res!r}, expected None (outputs are written in place)"
    q, k, v, tq, tv = (tt[n] for n in ("q", "k", "v", "tau_q", "tau_v"))
    dt = q.dtype
    if fn == "forward":
        o, l = rssa.attention_forward(q, k, v, tq, tv, causal, scale, off)
        o64, l64 = rssa.attention_forward(*_as(torch.float64, q, k, v, tq, tv), causal, scale, off)
        o32, l32 = rssa.attention_forward(*_as(torch.float32, q, k, v, tq, tv), causal, scale, off)
        close(tt["out"], o, o64, dt, "out", ref32=o32)
        close(tt["lse_out"], l, l64, dt, "lse_out", ref32=l32)
        return "ok"
    go, out, lse = tt["grad_out"], tt["out"], tt["lse"]
    lp = rssa.attention_backward(go, q, k, v, tq, tv, out, lse, causal, scale, off)
    r64, r32 = [], []
    for dtype, r in ((torch.float64, r64), (torch.float32, r32)):
        ins = _as(dtype, q, k, v, tq, tv)
        o_, l_ = rssa.attention_forward(*ins, causal, scale, off)
        r.extend(rssa.attention_backward(*_as(dtype, go), *ins, o_, l_, causal, scale, off))
    for i, name in enumerate(("dq_out", "dk_out", "dv_out", "dtau_q_out", "dtau_v_out")):
        if tt[name] is None:
            continue
        close(tt[name], lp[i], r64[i], dt, name, ref32=r32[i])
    return "ok"


RCA_ARGS = {
    "forward": ("q", "k", "v", "rel_emb", "rel_bias", "content_bias", "out", "lse_out"),
    "backward": ("grad_out", "q", "k", "v", "rel_emb", "rel_bias", "content_bias", "out", "lse", "dq_out", "dk_out",
                 "dv_out", "drel_emb_out", "drel_bias_out", "dcontent_bias_out"),
    "conv_forward": ("x", "weight", "bias", "y_out"),
    "conv_backward": ("grad_y", "x", "weight", "dx_out", "dweight_out", "dbias_out"),
}


def raw_rca(spec):
    fn, argn = spec["fn"], RCA_ARGS[spec["fn"]]
    vals = {n: _raw_array(spec["args"][n]) for n in argn}
    tt = {n: _t(v) for n, v in vals.items()}
    hard = [f for f in spec["faults"] if not f.startswith("soft:")]
    f = getattr(C.rel_conv_attention, fn)
    _set_env(spec, argn)
    if fn.startswith("conv"):
        kind, res = attempt(lambda: f(*[vals[n] for n in argn]), argn)
        if not settle(kind, res, spec):
            return kind
        x, w = tt["x"], tt["weight"]
        dt = x.dtype
        if fn == "conv_forward":
            b = tt["bias"]
            close(tt["y_out"], rrca.causal_depthwise_conv(x, w, b),
                  rrca.causal_depthwise_conv(*_as(torch.float64, x, w, b)), dt, "y_out",
                  ref32=rrca.causal_depthwise_conv(*_as(torch.float32, x, w, b)))
            return "ok"
        g, hb = tt["grad_y"], tt["dbias_out"] is not None
        lp = rrca.causal_depthwise_conv_backward(g, x, w, hb)
        r64 = rrca.causal_depthwise_conv_backward(*_as(torch.float64, g, x, w), hb)
        r32 = rrca.causal_depthwise_conv_backward(*_as(torch.float32, g, x, w), hb)
        for i, name in enumerate(("dx_out", "dweight_out", "dbias_out")):
            if tt[name] is not None:
                close(tt[name], lp[i], r64[i], dt, name, ref32=r32[i])
        return "ok"
    causal, off = spec["causal"], spec["q_offset"]
    six = ("q", "k", "v", "rel_emb", "rel_bias", "content_bias")
    if fn == "backward" and not hard:
        o, l = rrca.attention_forward(*(tt[n] for n in six), causal, off)
        vals["out"][...] = o.numpy()
        vals["lse"][...] = l.numpy()
    names = argn + ("q_offset", "causal", "max_distance")
    kind, res = attempt(lambda: f(*[vals[n] for n in argn], causal, off), names)
    if not settle(kind, res, spec):
        return kind
    assert res is None, f"{fn}: returned {res!r}, expected None (outputs are written in place)"
    ins = [tt[n] for n in six]
    dt = ins[0].dtype
    if fn == "forward":
        o, l = rrca.attention_forward(*ins, causal, off)
        o64, l64 = rrca.attention_forward(*_as(torch.float64, *ins), causal, off)
        o32, l32 = rrca.attention_forward(*_as(torch.float32, *ins), causal, off)
        close(tt["out"], o, o64, dt, "out", ref32=o32)
        close(tt["lse_out"], l, l64, dt, "lse_out", ref32=l32)
        return "ok"
    go = tt["grad_out"]
    lp = rrca.attention_backward(go, *ins, causal, off)
    r64 = rrca.attention_backward(*_as(torch.float64, go, *ins), causal, off)
    r32 = rrca.attention_backward(*_as(torch.float32, go, *ins), causal, off)
    for i, name in enumerate(("dq_out", "dk_out", "dv_out", "drel_emb_out", "drel_bias_out", "dcontent_bias_out")):
        close(tt[name], lp[i], r64[i], dt, name, ref32=r32[i])
    return "ok"


BC_ARGS = ("token_ids", "doc_offsets", "bit_offsets", "bit_index", "wa", "ws", "wpad", "deltas", "load", "A",
           "parts")


def _folded(A, parts):
    """A + every copy in parts as (lo, hi) uint64 words mod 2^128, in NumPy (not the kernel's fold)."""
    out = np.array(A, np.int64).view(np.uint64).copy()
    if parts is not None:
        for p in np.asarray(parts).view(np.uint64):
            rbc.add128_(out, p[..., 0], p[..., 1])
    return out.view(np.int64)


def raw_bit_cipher(spec):
    if spec["fn"] == "to_double":
        A, out = _raw_array(spec["args"]["A"]), _raw_array(spec["args"]["out"])
        if "to_double: readonly" in spec["faults"] and isinstance(out, np.ndarray):
            out.flags.writeable = False
        _set_env(spec, ("A", "out"))
        kind, res = attempt(lambda: C.bit_cipher.to_double(A, out), ("A", "out"))
        if not settle(kind, res, spec):
            return kind
        bits_equal(torch.from_numpy(out), torch.from_numpy(rbc.to_double(A)), "out")
        return "ok"
    vals = {n: _raw_array(spec["args"][n]) for n in BC_ARGS}
    concat = spec["concat"]
    if "A read-only" in spec["faults"] and isinstance(vals["A"], np.ndarray):
        vals["A"].flags.writeable = False
    if "wa strided" in spec["faults"]:
        wide = np.zeros((vals["wa"].shape[0], 2 * vals["wa"].shape[1]), np.int64)
        wide[:, ::2] = vals["wa"]
        vals["wa"] = wide[:, ::2]
    if "parts overlap" in spec["faults"]:
        vals["parts"] = vals["A"][None]
    before = vals["A"].copy() if isinstance(vals["A"], np.ndarray) else None
    parts_before = vals["parts"].copy() if isinstance(vals["parts"], np.ndarray) else None
    _set_env(spec, BC_ARGS)
    names = BC_ARGS + ("len(token_ids)", "len(bit_index)", "concat")
    kind, res = attempt(lambda: C.bit_cipher.count(*[vals[n] for n in BC_ARGS], concat), names)
    if not settle(kind, res, spec):
        if before is not None and vals["A"].flags.writeable:
            # a refused call leaves the counts as they were
            bits_equal(torch.from_numpy(vals["A"]), torch.from_numpy(before), "A after a refused call")
        if parts_before is not None and "parts overlap" not in spec["faults"]:
            bits_equal(torch.from_numpy(vals["parts"]), torch.from_numpy(parts_before), "parts after a refused call")
        return kind
    assert res is None, f"count: returned {res!r}, expected None (A is added to in place)"
    want = torch.from_numpy(_folded(before, parts_before))
    t = {n: _t(vals[n]) for n in BC_ARGS if n not in ("A", "parts")}
    obc._ref_count(t["token_ids"], t["doc_offsets"], t["bit_offsets"], t["bit_index"], t["wa"], t["ws"], t["wpad"],
                   t["deltas"], t["load"], want, None, concat)
    bits_equal(torch.from_numpy(_folded(vals["A"], vals["parts"])), want, "A + parts")
    if vals["parts"] is not None:
        # fold: A += the parts, the parts zeroed; the sums it leaves are the same
        C.bit_cipher.fold(vals["A"], vals["parts"])
        bits_equal(torch.from_numpy(vals["A"]), want, "A after fold")
        assert not vals["parts"].any(), "fold left a nonzero word in parts"
    return "ok"


# ---------------------------------------------------------------------------
# Public API: selective_attention, relative_attention, causal_depthwise_conv


def _acc(dtype):
    return torch.float32 if dtype in LOWP else dtype


def _public_parity(out, T, grad_names, ref_fn, dtype, what, grad):
    """The output, and (grad) the gradients of sum(out * w) of every leaf in grad_names, against the
    reference in the input dtype, in float64 and (float64 inputs) in float32: the 2x rule."""
    leaves = {n: T[n] for n in grad_names if isinstance(T.get(n), torch.Tensor)}

    def run(cast):
        xs = {n: (t.detach().to(cast(t.dtype)).clone().requires_grad_(grad) if isinstance(t, torch.Tensor) else t)
              for n, t in T.items()}
        return xs, ref_fn(xs)

    lp_in, lp = run(lambda d: d)
    r64_in, r64 = run(lambda d: torch.float64)
    r32_in, r32 = run(lambda d: torch.float32) if dtype == torch.float64 else (None, None)
    assert out.dtype == dtype, f"{what}: dtype {out.dtype}, expected {dtype}"
    close(out, lp, r64, dtype, what, ref32=r32)
    if not grad or not out.requires_grad:
        return
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    names = list(leaves)
    g_fast = torch.autograd.grad((out.double() * w).sum(), [leaves[n] for n in names], allow_unused=True)

    def ref_grads(xs, r):
        if not r.requires_grad:  # the reference's result of an empty input is a constant: zero gradients
            return [torch.zeros_like(xs[n]) for n in names]
        return torch.autograd.grad((r.double() * w).sum(), [xs[n] for n in names], allow_unused=True)

    g_lp, g_64 = ref_grads(lp_in, lp), ref_grads(r64_in, r64)
    g_32 = ref_grads(r32_in, r32) if r32 is not None else [None] * len(names)
    for n, a, b, c, e in zip(names, g_fast, g_lp, g_64, g_32):
        if a is None or b is None or c is None:
            assert a is None or not bool(a.any()), f"{what}: d{n} nonzero where the reference has no gradient"
            continue
        assert a.shape == T[n].shape, f"{what}: d{n} shape {tuple(a.shape)}, expected {tuple(T[n].shape)}"
        close(a, b, c, dtype, f"{what} d{n}", ref32=e)


def _public_inputs(spec, first):
    """(tensors, kwargs, backend, dtype of the ``first`` tensor, whether 'unavailable' is a valid answer:
    the cpu backend has no float16 / bfloat16 kernels)."""
    T = {n: tensor(v) for n, v in spec["tensors"].items()}
    be = spec.get("backend")
    dtype = T[first].dtype if isinstance(T[first], torch.Tensor) else torch.float32
    return T, dict(spec.get("kwargs", {})), be, dtype, be == "cpu" and dtype in LOWP


SSA_NAMES = ("q", "k", "v", "tau_q", "tau_v", "causal", "scale", "q_offset", "backend")


def ssa_public(spec):
    T, kw, be, dtype, allow_unav = _public_inputs(spec, "q")
    q = T["q"]
    spec = dict(spec, unavailable_ok=allow_unav)
    kind, out = attempt(lambda: embkern.selective_attention(T["q"], T["k"], T["v"], T["tau_q"], T.get("tau_v"),
                                                            backend=be, **kw), SSA_NAMES, allow_unavailable=allow_unav)
    if not settle(kind, out, spec):
        return kind
    causal, scale, off = kw.get("causal", True), kw.get("scale"), kw.get("q_offset")
    if off is not None:
        off = max(-q.shape[2], min(T["k"].shape[2], off))  # the reference's arange masks need a small offset

    def ref_fn(x):
        acc = _acc(x["q"].dtype)
        tv = None if x.get("tau_v") is None else x["tau_v"].to(acc)
        return rssa.attention(x["q"], x["k"], x["v"], x["tau_q"].to(acc), tv, causal, scale, off)

    _public_parity(out, T, ("q", "k", "v", "tau_q", "tau_v"), ref_fn, dtype, "selective_attention",
                   spec.get("grad"))
    return "ok"


RCA_NAMES = ("q", "k", "v", "rel_emb", "rel_bias", "content_bias", "causal", "q_offset", "max_distance", "backend")


def rca_public(spec):
    T, kw, be, dtype, allow_unav = _public_inputs(spec, "q")
    q = T["q"]
    faults = list(spec["faults"])
    if not [f for f in faults if not f.startswith("soft:")]:
        # a valid call still needs every visible (i, j) inside the tables: the reference's rule decides
        Lq, Lk = q.shape[2], T["k"].shape[2]
        off = kw.get("q_offset")
        why = rrca.table_range_error(Lq, Lk, kw["max_distance"], kw.get("causal", True),
                                     Lk - Lq if off is None else off)
        if why is not None:
            faults.append(f"max_distance: {why}")
    spec = dict(spec, unavailable_ok=allow_unav, faults=faults)
    six = ("q", "k", "v", "rel_emb", "rel_bias", "content_bias")
    kind, out = attempt(lambda: embkern.relative_attention(*(T[n] for n in six), backend=be, **kw), RCA_NAMES,
                        allow_unavailable=allow_unav)
    if not settle(kind, out, spec):
        return kind
    causal, off = kw.get("causal", True), kw.get("q_offset")
    if 0 in (q.shape[2], T["k"].shape[2]):
        off = None  # no pair: any offset is the default one (the reference's masks need a small one)
    _public_parity(out, T, six, lambda x: rrca.attention(*(x[n] for n in six), causal, off), dtype,
                   "relative_attention", spec.get("grad"))
    return "ok"


def conv_public(spec):
    T, _, be, dtype, allow_unav = _public_inputs(spec, "x")
    x = T["x"]
    spec = dict(spec, unavailable_ok=allow_unav)
    kind, out = attempt(lambda: embkern.causal_depthwise_conv(T["x"], T["weight"], T.get("bias"), backend=be),
                        ("x", "weight", "bias", "backend"), allow_unavailable=allow_unav)
    if not settle(kind, out, spec):
        return kind
    assert out.shape == x.shape, f"causal_depthwise_conv: shape {tuple(out.shape)}, expected {tuple(x.shape)}"
    _public_parity(out, T, ("x", "weight", "bias"),
                   lambda t: rrca.causal_depthwise_conv(t["x"], t["weight"], t.get("bias")), dtype,
                   "causal_depthwise_conv", spec.get("grad"))
    return "ok"


# ---------------------------------------------------------------------------
# Public API: BitCipher.fit, cooccurrence_vectors (exact: the reference's bits)

BC_NAMES = ("token_ids", "doc_offsets", "cipher", "vocab_size", "bits", "noise", "window", "mode", "weight",
            "include_center", "eps", "backend")


def _ids_value(v):
    if isinstance(v, dict) and "ids" in v:
        a = np.array(v["ids"], dtype=v["dtype"])
        return torch.from_numpy(a) if v.get("lib") == "torch" and v["dtype"] not in ("uint16", "uint32",
                                                                                   "uint64") else a
    return v.get("raw") if isinstance(v, dict) else v


def bc_public(spec):
    ids, off = _ids_value(spec["token_ids"]), _ids_value(spec["doc_offsets"])
    fit_kw, kw, be = dict(spec["fit"]), dict(spec["kwargs"]), spec.get("backend")
    if spec.get("threads"):
        embkern._C.set_num_threads(spec["threads"])
    a, o = np.asarray(spec["ids"], np.int64), np.asarray(spec["offsets"], np.int64)  # the corpus, as drawn
    if spec.get("chunks"):  # whole documents per chunk, cut at the spec's document boundaries
        cut = spec["chunks"]
        corpus = [(a[o[lo]:o[hi]], o[lo:hi + 1] - o[lo]) for lo, hi in zip(cut[:-1], cut[1:])]
        call_ids, call_off = corpus, None
    else:
        call_ids, call_off = ids, off

    def run():
        c = embkern.BitCipher.fit(ids, **fit_kw)
        return c, embkern.cooccurrence_vectors(call_ids, call_off, c, backend=be, progress=False, **kw)

    kind, res = attempt(run, BC_NAMES)
    if not settle(kind, res, spec):
        return kind
    c, got = res
    one = spec["doc_offsets"] is None and not spec.get("chunks")  # no offsets: the corpus is one document
    want = embkern.cooccurrence_vectors(torch.from_numpy(a), None if one else torch.from_numpy(o), c,
                                        backend="reference", progress=False, **kw)
    bits_equal(got, want, "cooccurrence_vectors")
    return "ok"


EXECUTORS = {"raw_ssa": raw_ssa, "raw_rca": raw_rca, "raw_bit_cipher": raw_bit_cipher, "ssa_public": ssa_public,
             "rca_public": rca_public, "conv_public": conv_public, "bc_public": bc_public}
