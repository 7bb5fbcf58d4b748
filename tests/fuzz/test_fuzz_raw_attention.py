"""Fuzz the raw embkern._C functions of the attention and bit-cipher ops, each call in the worker process.

embkern._C.selective_attention.{forward, backward}, embkern._C.rel_conv_attention.{forward, backward,
conv_forward, conv_backward} and embkern._C.bit_cipher.{count, to_double}. As in test_fuzz_raw_c: a raw
call must raise a ValueError/TypeError/MemoryError naming an argument, or write what the reference
computes (attention: the 2x rule against the float64 reference; bit cipher: the reference's bits); it
must never crash, whatever the buffers (dtype, shape, strides, read-only outputs, None, lists, scalars,
ids, offsets, tables).
"""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import _fuzz_harness as H
from _fuzz_strategies import tspec

ISAS = ("generic", "avx2", "avx512")
# -0 and subnormals, no NaN or overflow: a NaN input reaches outputs through 0 * NaN in the tiled
# products (a dR row no pair of the NaN query reads, a masked value row), where the reference's gather
# or its P @ V may or may not; and an overflow to inf is order-dependent (online vs one-shot softmax).
# Neither is a wrong answer close() could tell apart. NaN propagation itself is tested in
# tests/test_selective_attention_cpu.py and tests/test_rel_conv_attention_cpu.py.
ATT_SPECIALS = ("-0", "denorm", "tiny")


def _arr(draw, shape, dtype, specials=True, **kw):
    return draw(tspec(shape, dtype, lib="numpy", views=("contig",), specials=specials, special_names=ATT_SPECIALS,
                      **kw))


def _break_arrays(draw, a, faults, optional=(), outputs=()):
    """0-2 buffer faults on the array arguments of ``a`` (each recorded in ``faults``)."""
    arrays = [n for n, v in a.items() if isinstance(v, dict) and "shape" in v]
    if not arrays:
        return
    for _ in range(draw(st.integers(0, 2)) if draw(st.integers(0, 2)) else 0):
        kind = draw(st.sampled_from(("dtype", "shape", "rank", "noncontig", "readonly", "none", "list", "stride0")))
        n = draw(st.sampled_from(arrays))
        v = a[n]
        if not (isinstance(v, dict) and "shape" in v):
            continue
        if kind == "dtype":
            new = draw(st.sampled_from(("float16", "int32", "int64", "float32", "float64", "bool", "complex64",
                                        "uint8")))
            if new == v["dtype"]:
                continue
            a[n] = dict(v, dtype=new)
        elif kind == "shape":
            sh = list(v["shape"]) or [0]
            j = draw(st.integers(0, len(sh) - 1))
            sh[j] += draw(st.sampled_from((1, 2, -1))) if sh[j] else 1
            a[n] = dict(v, shape=tuple(sh))
        elif kind == "rank":
            a[n] = dict(v, shape=tuple(v["shape"]) + (1,) if draw(st.booleans()) else tuple(v["shape"])[1:])
        elif kind == "noncontig":
            if not v["shape"] or v["shape"][-1] <= 1 or any(s == 0 for s in v["shape"]):
                continue
            a[n] = dict(v, view="stride2")
        elif kind == "stride0":
            if not v["shape"] or v["shape"][0] <= 1 or any(s == 0 for s in v["shape"]):
                continue
            a[n] = dict(v, view="expand")
        elif kind == "readonly":
            if n not in outputs:
                continue
            a[n] = dict(v, readonly=True)
        elif kind == "none":
            if n in optional:
                continue
            a[n] = None
        elif kind == "list":
            a[n] = {"raw": [[1.0, 2.0], [3.0, 4.0]]}
        faults.append(f"{n}: {kind}")


def _env(draw):
    return {"isa": draw(st.sampled_from(ISAS + (None,))), "threads": draw(st.sampled_from((None, 1, 2, 3)))}


# ---------------------------------------------------------------------------
# selective attention


def _one_kv_head_expanded(a, fault: str) -> bool:
    name = fault.split(":")[0]
    v = a.get(name)
    return (fault.endswith(": stride0") and name in ("k", "v", "tau_v") and isinstance(v, dict)
            and tuple(v["shape"])[1:2] == (1,))


@st.composite
def raw_ssa_case(draw):
    fn = draw(st.sampled_from(("forward", "backward")))
    dt = draw(st.sampled_from(("float32", "float64")))
    B, Hkv, G = draw(st.integers(0, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    Hq = Hkv * G
    Lq, Lk, d, dv = draw(st.integers(0, 9)), draw(st.integers(0, 9)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    causal = draw(st.booleans())
    scale = draw(st.sampled_from((1.0 / d ** 0.5, 0.3, 1.0, 0.0, -0.5)))
    q_offset = draw(st.one_of(st.just(Lk - Lq), st.integers(-3, Lk + 2), st.sampled_from((2**40, -(2**40),
                                                                                          2**62, -(2**62)))))
    with_tv = draw(st.booleans())
    a = {"q": _arr(draw, (B, Hq, Lq, d), dt), "k": _arr(draw, (B, Hkv, Lk, d), dt),
         "v": _arr(draw, (B, Hkv, Lk, dv), dt),
         "tau_q": _arr(draw, (B, Hq, Lq), dt, specials=False, scale=0.5),
         "tau_v": _arr(draw, (B, Hkv, Lk), dt, specials=False, scale=0.5) if with_tv else None}
    if fn == "forward":
        a["out"] = _arr(draw, (B, Hq, Lq, dv), dt)
        a["lse_out"] = _arr(draw, (B, Hq, Lq), dt)
    else:
        a["grad_out"] = _arr(draw, (B, Hq, Lq, dv), dt, specials=False)
        # out and lse: the executor writes the reference's into these buffers first
        a["out"] = _arr(draw, (B, Hq, Lq, dv), dt, specials=False)
        a["lse"] = _arr(draw, (B, Hq, Lq), dt, specials=False)
        a["dq_out"] = _arr(draw, (B, Hq, Lq, d), dt)
        a["dk_out"] = _arr(draw, (B, Hkv, Lk, d), dt)
        a["dv_out"] = _arr(draw, (B, Hkv, Lk, dv), dt)
        a["dtau_q_out"] = _arr(draw, (B, Hq, Lq), dt)
        a["dtau_v_out"] = _arr(draw, (B, Hkv, Lk), dt) if with_tv else None
    faults = []
    outs = ("out", "lse_out") if fn == "forward" else ("dq_out", "dk_out", "dv_out", "dtau_q_out", "dtau_v_out")
    _break_arrays(draw, a, faults, optional=("tau_v", "dtau_v_out"), outputs=outs)
    if fn == "forward":
        # The forward reads k, v and tau_v packed within each kv head only (a cache buffer's slice): with one kv
        # head, a view expanded along the batch (stride 0) is one it reads in place, not a fault.
        faults = [f for f in faults if not _one_kv_head_expanded(a, f)]
    if draw(st.integers(0, 6)) == 0:
        scale = draw(st.sampled_from((float("nan"), float("inf"), -float("inf"))))
        faults.append(f"scale: {scale}")
    if fn == "backward" and draw(st.integers(0, 8)) == 0:
        # tau_v without its gradient buffer, or the reverse
        if with_tv:
            a["dtau_v_out"] = None
        else:
            a["dtau_v_out"] = _arr(draw, (B, Hkv, Lk), dt)
        faults.append("dtau_v_out: tau_v mismatch")
    return {"fn": fn, "args": a, "causal": causal, "scale": scale, "q_offset": q_offset, "faults": faults,
            **_env(draw)}


def _avail():
    import embkern._C as C

    return C.isa_info()["available"]


def _fix_isa(spec):
    if spec.get("isa") and spec["isa"] not in _avail():
        spec["isa"] = None


@given(raw_ssa_case())
def test_fuzz_raw_selective_attention(spec):
    _fix_isa(spec)
    H.check("raw_ssa", spec)


# ---------------------------------------------------------------------------
# relative attention and its depthwise conv


@st.composite
def raw_rca_case(draw):
    fn = draw(st.sampled_from(("forward", "backward", "conv_forward", "conv_backward")))
    dt = draw(st.sampled_from(("float32", "float64")))
    faults = []
    if fn.startswith("conv"):
        N, T, Cc, K = draw(st.integers(0, 3)), draw(st.integers(0, 9)), draw(st.integers(1, 6)), draw(st.integers(1, 5))
        with_bias = draw(st.booleans())
        a = {"x": _arr(draw, (N, T, Cc), dt), "weight": _arr(draw, (Cc, K), dt)}
        if fn == "conv_forward":
            a = {"x": a["x"], "weight": a["weight"],
                 "bias": _arr(draw, (Cc,), dt) if with_bias else None, "y_out": _arr(draw, (N, T, Cc), dt)}
        else:
            a = {"grad_y": _arr(draw, (N, T, Cc), dt, specials=False), "x": a["x"], "weight": a["weight"],
                 "dx_out": _arr(draw, (N, T, Cc), dt), "dweight_out": _arr(draw, (Cc, K), dt),
                 "dbias_out": _arr(draw, (Cc,), dt) if with_bias else None}
        _break_arrays(draw, a, faults, optional=("bias", "dbias_out"),
                      outputs=("y_out", "dx_out", "dweight_out", "dbias_out"))
        return {"fn": fn, "args": a, "faults": faults, **_env(draw)}
    B, Hh = draw(st.integers(0, 2)), draw(st.integers(1, 2))
    Lq, Lk, d, dv = draw(st.integers(0, 8)), draw(st.integers(0, 8)), draw(st.integers(1, 5)), draw(st.integers(1, 4))
    P = draw(st.integers(max(Lk, 1), Lk + 4)) if draw(st.integers(0, 5)) else draw(st.integers(1, 9))
    causal = draw(st.booleans())
    q_offset = draw(st.one_of(st.just(Lk - Lq), st.integers(-3, Lk + 2), st.sampled_from((2**40, -(2**62)))))
    a = {"q": _arr(draw, (B, Hh, Lq, d), dt), "k": _arr(draw, (B, Hh, Lk, d), dt),
         "v": _arr(draw, (B, Hh, Lk, dv), dt), "rel_emb": _arr(draw, (2 * P, Hh, d), dt),
         "rel_bias": _arr(draw, (2 * P, Hh), dt), "content_bias": _arr(draw, (Hh, d), dt)}
    if fn == "forward":
        a["out"] = _arr(draw, (B, Hh, Lq, dv), dt)
        a["lse_out"] = _arr(draw, (B, Hh, Lq), dt)
    else:
        a["grad_out"] = _arr(draw, (B, Hh, Lq, dv), dt, specials=False)
        a["out"] = _arr(draw, (B, Hh, Lq, dv), dt, specials=False)
        a["lse"] = _arr(draw, (B, Hh, Lq), dt, specials=False)
        for n, sh in (("dq_out", (B, Hh, Lq, d)), ("dk_out", (B, Hh, Lk, d)), ("dv_out", (B, Hh, Lk, dv)),
                      ("drel_emb_out", (2 * P, Hh, d)), ("drel_bias_out", (2 * P, Hh)),
                      ("dcontent_bias_out", (Hh, d))):
            a[n] = _arr(draw, sh, dt)
    _break_arrays(draw, a, faults, outputs=("lse_out",) + tuple(n for n in a if n.startswith("d") and n.endswith("_out"))
                  + (("out",) if fn == "forward" else ()))
    from embkern.reference import rel_conv_attention as rref

    if rref.table_range_error(Lq, Lk, P, causal, q_offset):
        faults.append("max_distance: tables out of range")
    return {"fn": fn, "args": a, "causal": causal, "q_offset": q_offset, "faults": faults, **_env(draw)}


@given(raw_rca_case())
def test_fuzz_raw_rel_conv_attention(spec):
    _fix_isa(spec)
    H.check("raw_rca", spec)


# ---------------------------------------------------------------------------
# bit cipher


@st.composite
def raw_bit_cipher_case(draw):
    fn = draw(st.sampled_from(("count", "count", "count", "to_double")))
    faults = []
    if fn == "to_double":
        n = draw(st.integers(0, 40))
        words = draw(st.lists(st.integers(0, 2**64 - 1), min_size=2 * n, max_size=2 * n))
        a = {"A": {"raw": np.array(words, np.uint64).view(np.int64).reshape(n, 2)},
             "out": _arr(draw, (n,), "float64", specials=False)}
        kind = draw(st.sampled_from(("none",) * 5 + ("shape", "out_shape", "dtype", "readonly", "list")))
        if kind == "shape":
            a["A"] = {"raw": np.zeros((n, 3), np.int64)}
        elif kind == "out_shape":
            a["out"] = _arr(draw, (n + 1,), "float64", specials=False)
        elif kind == "dtype":
            a["out"] = _arr(draw, (n,), "float32", specials=False)
        elif kind == "readonly":
            a["out"] = dict(a["out"], readonly=True)
        elif kind == "list":
            a["A"] = {"raw": [[1, 2]] * n}
        if kind != "none":
            faults.append(f"to_double: {kind}")
        return {"fn": fn, "args": a, "faults": faults, **_env(draw)}
    V, bits = draw(st.integers(0, 12)), draw(st.integers(1, 6))
    window = draw(st.integers(1, 4))
    center = draw(st.booleans())
    deltas = [x for x in range(-window, window + 1) if x != 0 or center]
    n_off = len(deltas)
    concat, noise = draw(st.booleans()), draw(st.booleans())
    codes = []
    for _ in range(V):
        codes.append(sorted(draw(st.sets(st.integers(0, bits - 1), min_size=1, max_size=min(bits, 3)))))
    boff = np.cumsum([0] + [len(c) for c in codes]).astype(np.int64)
    bidx = np.array([b for c in codes for b in c], np.int32)
    q62 = 2**62
    table = lambda shape: np.array(draw(st.lists(st.sampled_from((0, 1, 2**61, q62, q62 - 1)) | st.integers(0, q62),  # noqa: E731
                                                 min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))),
                                   np.int64).reshape(shape)
    wa, ws, wpad = table((n_off, V)), (table((n_off, V)) if noise else None), table((n_off,))
    N = draw(st.integers(0, 30)) if V else 0
    tok = np.array(draw(st.lists(st.integers(0, max(V - 1, 0)), min_size=N, max_size=N)), np.int32)
    cuts = sorted(draw(st.lists(st.integers(0, N), max_size=4)))
    doff = np.array([0] + cuts + [N], np.int64)
    load = np.array(draw(st.lists(st.integers(0, 50), min_size=V, max_size=V)), np.int64)
    nb = n_off if concat else 1
    A0 = np.array(draw(st.lists(st.sampled_from((0, 1, 2**63, 2**64 - 1, 2**64 - 2**62)) | st.integers(0, 2**64 - 1),
                                min_size=V * nb * (bits + 2) * 2, max_size=V * nb * (bits + 2) * 2)),
                  np.uint64).view(np.int64).reshape(V, nb, bits + 2, 2)
    # parts: None or K further copies the kernel may count positions into (any starting words; the sums are
    # A + the parts, compared after a fold in NumPy)
    K = draw(st.sampled_from((None, 0, 1, 2, 3)))
    P0 = None if K is None else np.array(
        draw(st.lists(st.integers(0, 2**64 - 1), min_size=K * A0.size, max_size=K * A0.size)),
        np.uint64).view(np.int64).reshape((K,) + A0.shape)
    a = {"token_ids": tok, "doc_offsets": doff, "bit_offsets": boff, "bit_index": bidx, "wa": wa, "ws": ws,
         "wpad": wpad, "deltas": np.array(deltas, np.int64), "load": load, "A": A0, "parts": P0}
    kind = draw(st.sampled_from(("none",) * 8 + (
        "id_hi", "id_neg", "doff_nonmono", "doff_end", "doff_start", "doff_empty", "boff_nonmono", "boff_end",
        "bidx_range", "boff_empty", "quanta_hi", "quanta_neg", "wpad_shape", "ws_shape", "delta_big", "load_neg",
        "A_shape", "A_bits", "A_readonly", "tok_dtype", "off_dtype", "bidx_dtype", "A_dtype", "noncontig", "list",
        "none_arg", "A_width", "parts_shape", "parts_dtype", "parts_overlap")))
    bad = None
    if kind == "id_hi" and N:
        tok = tok.copy()
        tok[draw(st.integers(0, N - 1))] = draw(st.sampled_from((V, V + 7, 2**31 - 1)))
        a["token_ids"], bad = tok, "token_ids >= V"
    elif kind == "id_neg" and N:
        tok = tok.copy()
        tok[draw(st.integers(0, N - 1))] = draw(st.sampled_from((-1, -(2**31))))
        a["token_ids"], bad = tok, "negative token id"
    elif kind == "doff_nonmono" and len(doff) >= 3 and N >= 1:
        d2 = doff.copy()
        d2[1] = N
        d2[2] = 0 if len(d2) > 3 else d2[2]
        if not np.all(np.diff(d2) >= 0):
            a["doc_offsets"], bad = d2, "non-monotone doc_offsets"
    elif kind == "doff_end":
        a["doc_offsets"], bad = np.concatenate([doff[:-1], [N + draw(st.sampled_from((1, 2**40)))]]), "doc end"
    elif kind == "doff_start":
        d2 = doff.copy()
        d2[0] = draw(st.sampled_from((1, -1, -(2**62))))
        a["doc_offsets"], bad = d2, "doc start"
    elif kind == "doff_empty":
        a["doc_offsets"], bad = np.zeros(0, np.int64), "empty doc_offsets"
    elif kind == "boff_nonmono" and V >= 2:
        b2 = boff.copy()
        b2[1] = b2[-1] + 1
        a["bit_offsets"], bad = b2, "non-monotone bit_offsets"
    elif kind == "boff_end" and V:
        b2 = boff.copy()
        b2[-1] += draw(st.sampled_from((1, 2**40)))
        a["bit_offsets"], bad = b2, "bit_offsets end"
    elif kind == "bidx_range" and len(bidx):
        b2 = bidx.copy()
        b2[draw(st.integers(0, len(b2) - 1))] = draw(st.sampled_from((bits, -1, 2**31 - 1)))
        a["bit_index"], bad = b2, "bit index out of range"
    elif kind == "boff_empty":
        a["bit_offsets"], bad = np.zeros(0, np.int64), "empty bit_offsets"
    elif kind in ("quanta_hi", "quanta_neg") and V:
        w2 = wa.copy()
        w2.reshape(-1)[draw(st.integers(0, w2.size - 1))] = q62 + 1 if kind == "quanta_hi" else -1
        a["wa"], bad = w2, kind
    elif kind == "wpad_shape":
        a["wpad"], bad = np.zeros(n_off + 1, np.int64), "wpad shape"
    elif kind == "ws_shape" and noise:
        a["ws"], bad = np.zeros((n_off, V + 1), np.int64), "ws shape"
    elif kind == "delta_big":
        d2 = np.array(deltas, np.int64)
        d2[0] = draw(st.sampled_from((2**40, -(2**40), 2**62, -(2**63))))
        a["deltas"], bad = d2, "delta beyond 2^40"
    elif kind == "load_neg" and V:
        l2 = load.copy()
        l2[0] = draw(st.sampled_from((-1, 2**57)))
        a["load"], bad = l2, "load out of range"
    elif kind == "A_shape":
        a["A"], bad = np.zeros((V + 1, nb, bits + 2, 2), np.int64), "A rows"
    elif kind == "A_bits":  # one bit fewer: a fault when some code uses the last bit (or none are left)
        a["A"] = np.zeros((V, nb, bits + 1, 2), np.int64)
        if K is not None:  # the copies keep A's shape
            a["parts"] = np.zeros((K, V, nb, bits + 1, 2), np.int64)
        if bits == 1 or bool((bidx == bits - 1).any()):
            bad = "A bits"
    elif kind == "A_width":
        a["A"], bad = np.zeros((V, nb + 1, bits + 2, 2), np.int64), "A blocks"
    elif kind == "parts_shape":
        a["parts"], bad = np.zeros((1, V + 1, nb, bits + 2, 2), np.int64), "parts shape"
    elif kind == "parts_dtype":
        a["parts"], bad = np.zeros((1, V, nb, bits + 2, 2), np.uint64), "parts dtype"
    elif kind == "parts_overlap" and A0.size:  # the executor passes a view of A (pickling would copy it)
        bad = "parts overlap"
    elif kind == "A_readonly":  # the executor marks A read-only (pickling drops the flag)
        bad = "A read-only"
    elif kind == "tok_dtype":
        a["token_ids"], bad = tok.astype(draw(st.sampled_from((np.int64, np.float32, np.uint32)))), "token dtype"
    elif kind == "off_dtype":
        a["doc_offsets"], bad = doff.astype(np.int32), "offsets dtype"
    elif kind == "bidx_dtype":
        a["bit_index"], bad = bidx.astype(np.int64), "bit_index dtype"
    elif kind == "A_dtype":
        a["A"], bad = A0.view(np.uint64), "A dtype"
    elif kind == "noncontig" and V >= 2:  # the executor takes a strided view (pickling would copy it)
        bad = "wa strided"
    elif kind == "list":
        a["token_ids"], bad = tok.tolist() + [0], "token_ids list"
    elif kind == "none_arg":
        n = draw(st.sampled_from(("token_ids", "doc_offsets", "bit_offsets", "bit_index", "wa", "wpad", "deltas",
                                  "load", "A")))
        a[n], bad = None, f"{n} None"
    if bad:
        faults.append(bad)
    return {"fn": fn, "args": {k: ({"raw": v} if not isinstance(v, dict) else v) for k, v in a.items()},
            "concat": concat, "faults": faults, **_env(draw)}


@given(raw_bit_cipher_case())
def test_fuzz_raw_bit_cipher(spec):
    _fix_isa(spec)
    H.check("raw_bit_cipher", spec)

