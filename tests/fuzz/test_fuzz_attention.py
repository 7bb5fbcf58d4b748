"""Fuzz the public API of the attention and bit-cipher ops: selective_attention, relative_attention,
causal_depthwise_conv (backends None, "reference", "cpu"), and BitCipher.fit + cooccurrence_vectors
(None, "cpu").

Property (see _fuzz_cases): a ValueError/TypeError/MemoryError naming an argument, or the reference's
result -- attention outputs and their gradients by the 2x rule against the float64 reference, cipher
vectors bit for bit. Inputs: any dtype, strides (transposed, expanded, offset, every other element),
empty dimensions, -0 and subnormals, GQA, offsets far outside the keys, views too big for memory.
"""

import math

from hypothesis import given
from hypothesis import strategies as st

import _fuzz_harness as H
from _fuzz_strategies import FLOATS, float_dtype, tspec

BACKENDS = (None, "reference", "cpu", "cpu")
# NaN / inf / huge values in q, k or v reach the output through order-dependent paths (online vs
# one-shot softmax, 0 * inf in the tiled products): no wrong answer close() could tell apart. NaN
# propagation is tested in the op test files; here the values stay finite.
ATT_SPECIALS = ("-0", "denorm", "tiny")
VIEWS = ("contig", "contig", "transposed", "expand", "offset", "stride2", "rows")


def _dtype(draw, faults, name):
    return float_dtype(draw, faults, name, bad_one_in=13, f32_f64_weight=3)


def _t(draw, shape, dt, grad=False, views=VIEWS, specials=ATT_SPECIALS):
    return draw(tspec(shape, dt, views=views, special_names=specials, requires_grad=grad))


def _has_non_finite(spec):
    """Whether a NaN / inf special survives in the tensor _fuzz_cases.tensor builds: a later special at
    the same element overwrites it, and an expanded view places them on its stored elements only."""
    shape = spec["shape"]
    if not math.prod(shape):
        return False
    if spec["view"] == "expand":
        shape = tuple(1 if (i == 0 or n > 4096) else n for i, n in enumerate(shape))
    n = math.prod(shape)
    if not n:
        return False
    final = {}
    for pos, name in spec.get("special", ()):
        final[pos % n] = name
    return any(v in ("nan", "inf", "-inf") for v in final.values())


def _backend(draw, faults):
    if draw(st.integers(0, 25)) == 0:
        faults.append("backend: unknown")
        return "tpu"
    return draw(st.sampled_from(BACKENDS))


def _huge(faults, name):
    faults.append(f"{name}: a (2^28, ...) expanded view: outputs and copies beyond 10 TB")
    return 2**28


@st.composite
def ssa_case(draw):
    faults = []
    B, Hkv, G = draw(st.integers(0, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    Lq = draw(st.sampled_from((0, 1, 1, 2, 3, 5, 9, 17)))
    Lk = draw(st.sampled_from((0, 1, 3, 5, 9, 17, 70)))
    d, dv = draw(st.integers(1, 20)), draw(st.integers(1, 20))
    Hq = Hkv * G
    dt = _dtype(draw, faults, "q")
    grad = not faults and draw(st.integers(0, 2)) == 0
    sq, sk, sv, stq, stv = (B, Hq, Lq, d), (B, Hkv, Lk, d), (B, Hkv, Lk, dv), (B, Hq, Lq), (B, Hkv, Lk)
    sf = draw(st.sampled_from(("none",) * 12 + ("k_dim", "v_len", "heads", "tau_q", "tau_v", "rank", "huge")))
    if sf == "k_dim":
        sk = (B, Hkv, Lk, d + 1)
        faults.append("k: head dim differs from q")
    elif sf == "v_len":
        sv = (B, Hkv, Lk + 1, dv)
        faults.append("v: length differs from k")
    elif sf == "heads" and Hkv == 2:
        sq, stq = (B, 3, Lq, d), (B, 3, Lq)
        faults.append("q, k: Hq not a multiple of Hkv")
    elif sf == "tau_q":
        stq = (B, Hq, Lq + 1)
        faults.append("tau_q: wrong shape")
    elif sf == "tau_v":
        stv = (B, Hkv, Lk + 2)
        faults.append("tau_v: wrong shape")
    elif sf == "rank":
        sq = sq[1:]
        faults.append("q: 3-d")
    views = VIEWS
    if sf == "huge" and Lq and Lk:
        B = _huge(faults, "q")
        sq, sk, sv, stq, stv = (B, Hq, Lq, d), (B, Hkv, Lk, d), (B, Hkv, Lk, dv), (B, Hq, Lq), (B, Hkv, Lk)
        views, grad = ("expand",), False
    tensors = {"q": _t(draw, sq, dt, grad, views), "k": _t(draw, sk, dt, grad, views),
               "v": _t(draw, sv, dt, grad, views)}
    if draw(st.integers(0, 15)) == 0 and dt in FLOATS:
        tensors["k"] = dict(tensors["k"], dtype="float64" if dt != "float64" else "float32")
        faults.append("k: dtype differs from q")
    # temperatures: any float dtype, around 1; NaN / inf must be refused
    tdt = draw(st.sampled_from(("float32", "float32", "float64", "float16", "bfloat16")))
    tq = _t(draw, stq, tdt, grad, views, specials=("nan", "inf", "-0", "denorm"))
    tensors["tau_q"] = dict(tq, scale=0.25)
    if sf == "tau_v" or draw(st.booleans()):
        tensors["tau_v"] = dict(_t(draw, stv, tdt, grad, views, specials=("nan", "-inf", "-0", "denorm")),
                                scale=0.25)
    for n in ("tau_q", "tau_v"):
        if n in tensors and _has_non_finite(tensors[n]):
            faults.append(f"{n}: NaN / inf")
    kwargs = {"causal": draw(st.booleans())}
    of = draw(st.sampled_from(("none",) * 3 + ("small",) * 3 + ("far",) * 2 + ("float",)))
    if of == "small":
        kwargs["q_offset"] = draw(st.integers(-12, 12))
    elif of == "far":
        kwargs["q_offset"] = draw(st.sampled_from((2**62, -2**62, 2**63 - 1, -2**63, 2**70, -2**70)))
    elif of == "float":
        kwargs["q_offset"] = 1.5
        faults.append("q_offset: float")
    sc = draw(st.sampled_from(("none",) * 12 + ("pos",) * 3 + ("zero", "nan", "str")))
    if sc != "none":
        kwargs["scale"] = {"pos": 0.3, "zero": 0.0, "nan": float("nan"), "str": "0.3"}[sc]
        if sc != "pos":
            faults.append(f"scale: {sc}")
    if draw(st.integers(0, 25)) == 0:
        kwargs["causal"] = 1
        faults.append("causal: int")
    if draw(st.integers(0, 25)) == 0:
        tensors["q"] = {"raw": [[[[1.0]]]]}
        faults.append("q: a list")
    return {"tensors": tensors, "kwargs": kwargs, "backend": _backend(draw, faults), "faults": faults,
            "grad": grad}


@st.composite
def rca_case(draw):
    faults = []
    B, H = draw(st.integers(0, 2)), draw(st.integers(1, 3))
    Lq = draw(st.sampled_from((0, 1, 1, 2, 5, 9, 17)))
    Lk = draw(st.sampled_from((0, 1, 3, 5, 9, 17, 40)))
    d, dv = draw(st.integers(1, 16)), draw(st.integers(1, 16))
    dt = _dtype(draw, faults, "q")
    grad = not faults and draw(st.integers(0, 2)) == 0
    kwargs = {"causal": draw(st.booleans())}
    of = draw(st.sampled_from(("none",) * 4 + ("small",) * 3 + ("far",)))
    if of == "small":
        kwargs["q_offset"] = draw(st.integers(-6, 6)) + Lk - Lq
    elif of == "far":
        kwargs["q_offset"] = draw(st.sampled_from((2**62, -2**62, 2**70)))
    P = max(Lk, 1) + draw(st.integers(0, 20))  # too small for some offsets: the executor knows which
    sq, sk, sv = (B, H, Lq, d), (B, H, Lk, d), (B, H, Lk, dv)
    sR, sS, su = (2 * P, H, d), (2 * P, H), (H, d)
    sf = draw(st.sampled_from(("none",) * 12 + ("R_rows", "S_heads", "u_dim", "k_heads", "v_len", "P_small",
                                                 "P_zero", "huge")))
    if sf == "R_rows":
        sR = (2 * P + 1, H, d)
        faults.append("rel_emb: rows != 2P")
    elif sf == "S_heads":
        sS = (2 * P, H + 1)
        faults.append("rel_bias: heads differ")
    elif sf == "u_dim":
        su = (d,)
        faults.append("content_bias: 1-d")
    elif sf == "k_heads":
        sk = (B, H + 1, Lk, d)
        faults.append("k: heads differ from q")
    elif sf == "v_len":
        sv = (B, H, Lk + 1, dv)
        faults.append("v: length differs from k")
    elif sf == "P_small" and Lk >= 2:
        P = Lk - 1
        sR, sS = (2 * P, H, d), (2 * P, H)
        faults.append("max_distance: below Lk")
    elif sf == "P_zero":
        kwargs["max_distance"] = 0
        faults.append("max_distance: 0")
    views = VIEWS
    if sf == "huge" and Lq and Lk:
        B = _huge(faults, "q")
        sq, sk, sv = (B, H, Lq, d), (B, H, Lk, d), (B, H, Lk, dv)
        views, grad = ("expand",), False
    kwargs.setdefault("max_distance", P)
    tensors = {"q": _t(draw, sq, dt, grad, views), "k": _t(draw, sk, dt, grad, views),
               "v": _t(draw, sv, dt, grad, views),
               "rel_emb": dict(_t(draw, sR, dt, grad), scale=0.5), "rel_bias": dict(_t(draw, sS, dt, grad), scale=0.5),
               "content_bias": dict(_t(draw, su, dt, grad), scale=0.5)}
    if draw(st.integers(0, 15)) == 0 and dt in FLOATS:
        tensors["rel_emb"] = dict(tensors["rel_emb"], dtype="float64" if dt != "float64" else "float32")
        faults.append("rel_emb: dtype differs from q")
    if draw(st.integers(0, 25)) == 0:
        kwargs["causal"] = "yes"
        faults.append("causal: str")
    return {"tensors": tensors, "kwargs": kwargs, "backend": _backend(draw, faults), "faults": faults,
            "grad": grad}


@st.composite
def conv_case(draw):
    faults = []
    lead = tuple(draw(st.lists(st.integers(0, 3), max_size=2)))
    T, C, K = draw(st.sampled_from((0, 1, 2, 5, 17, 70))), draw(st.integers(0, 12)), draw(st.integers(1, 6))
    dt = _dtype(draw, faults, "x")
    grad = not faults and draw(st.integers(0, 2)) == 0
    sx, sw, sb = lead + (T, C), (C, K), (C,)
    sf = draw(st.sampled_from(("none",) * 10 + ("x_1d", "w_channels", "w_taps", "w_1d", "b_len", "huge")))
    if sf == "x_1d":
        sx = (C,)
        faults.append("x: 1-d")
    elif sf == "w_channels":
        sw = (C + 1, K)
        faults.append("weight: channels differ from x")
    elif sf == "w_taps":
        sw = (C, 0)
        faults.append("weight: K = 0")
    elif sf == "w_1d":
        sw = (C,)
        faults.append("weight: 1-d")
    elif sf == "b_len":
        sb = (C + 2,)
        faults.append("bias: length differs from C")
    views = VIEWS
    if sf == "huge" and T and C:
        sx = (2**30, T, C)
        faults.append("x: a (2^30, T, C) expanded view: an output beyond 10 TB")
        views, grad = ("expand",), False
    tensors = {"x": _t(draw, sx, dt, grad, views), "weight": _t(draw, sw, dt, grad)}
    if sf == "b_len" or draw(st.booleans()):
        tensors["bias"] = _t(draw, sb, dt, grad)
    if draw(st.integers(0, 15)) == 0 and dt in FLOATS:
        tensors["weight"] = dict(tensors["weight"], dtype="float64" if dt != "float64" else "float32")
        faults.append("weight: dtype differs from x")
    return {"tensors": tensors, "backend": _backend(draw, faults), "faults": faults, "grad": grad}


ID_DTYPES = ("int64", "int64", "int32", "int16", "uint8", "uint16", "uint32", "uint64")


@st.composite
def bit_cipher_case(draw):
    faults = []
    V = draw(st.integers(1, 40))
    n_docs = draw(st.integers(0, 6))
    lens = [draw(st.sampled_from((0, 1, 2, 3, 7, 20))) for _ in range(n_docs)]
    N = sum(lens)
    ids = [draw(st.integers(0, V - 1)) for _ in range(N)] if draw(st.booleans()) else \
        [min(int(draw(st.integers(0, 2**20)) ** 0.3), V - 1) for _ in range(N)]  # a few frequent ids
    off = [0]
    for n in lens:
        off.append(off[-1] + n)
    idt = draw(st.sampled_from(ID_DTYPES))  # V <= 40: every id fits every dtype
    lib = draw(st.sampled_from(("numpy", "torch", "list")))
    fit = {"vocab_size": V} if draw(st.integers(0, 3)) or not N else {}
    if draw(st.integers(0, 3)) == 0:
        fit["bits"] = max(V.bit_length(), draw(st.integers(1, 12)))
    fit["noise"] = draw(st.booleans())
    kwargs = {"window": draw(st.sampled_from((1, 1, 2, 3, 5, 25))), "mode": draw(st.sampled_from(("sum", "concat"))),
              "weight": draw(st.sampled_from(("cos2", "inv", "none"))), "include_center": draw(st.booleans())}
    if draw(st.booleans()):
        kwargs["eps"] = draw(st.sampled_from((1e-3, 1e-6, 0.5)))
    f = draw(st.sampled_from(("none",) * 12 + ("id_neg", "id_hi", "off_nonmono", "off_end", "off_float", "window",
                                                 "mode", "weight", "eps", "bits", "ids_float")))
    if f == "id_neg" and N and idt.startswith("int"):
        ids[draw(st.integers(0, N - 1))] = -1
        faults.append("token_ids: -1")
    elif f == "id_hi" and N and "vocab_size" in fit:
        ids[draw(st.integers(0, N - 1))] = V
        faults.append("token_ids: id == vocab_size")
    elif f == "off_nonmono" and n_docs >= 2 and off[1] > 0:
        off[1], off[2] = off[2] + 1, off[2]
        faults.append("doc_offsets: non-monotone")
    elif f == "off_end":
        off[-1] += 1
        faults.append("doc_offsets: end != N")
    elif f == "window":
        kwargs["window"] = draw(st.sampled_from((0, -1, 2**40)))
        faults.append(f"window: {kwargs['window']}")
    elif f == "mode":
        kwargs["mode"] = "mean"
        faults.append("mode: unknown")
    elif f == "weight":
        kwargs["weight"] = "exp"
        faults.append("weight: unknown")
    elif f == "eps":
        kwargs["eps"] = draw(st.sampled_from((0.0, -1.0, float("nan"))))
        faults.append("eps: not > 0")
    elif f == "bits":
        fit["vocab_size"], fit["bits"] = V, max(1, V.bit_length() - 1)
        if (1 << fit["bits"]) - 1 < V:
            faults.append("bits: too few for V")
    ids_spec = {"ids": ids, "dtype": idt, "lib": lib}
    off_dt = draw(st.sampled_from(("int64", "int32", "uint32")))
    off_spec = {"ids": off, "dtype": off_dt, "lib": lib}
    if f == "off_float":
        off_spec = {"raw": [float(o) + 0.5 for o in off]}
        faults.append("doc_offsets: floats")
    if f == "ids_float" and N:
        ids_spec = {"raw": [float(i) + 0.25 for i in ids]}
        faults.append("token_ids: floats")
    if lib == "list" and "raw" not in ids_spec:
        ids_spec = {"raw": [int(i) for i in ids]}
    if lib == "list" and "raw" not in off_spec:
        off_spec = {"raw": [int(o) for o in off]}
    if any(v < 0 for v in ids) and not idt.startswith("int"):
        ids_spec = {"ids": ids, "dtype": "int64", "lib": "numpy"}
    no_off = not faults and draw(st.integers(0, 5)) == 0
    spec = {"token_ids": ids_spec, "doc_offsets": None if no_off else off_spec, "ids": ids, "offsets": off,
            "fit": fit, "kwargs": kwargs,
            "backend": draw(st.sampled_from((None, "cpu"))), "faults": faults,
            "threads": draw(st.sampled_from((None, None, 1, 2, 3)))}
    if no_off:
        spec["token_ids"] = {"ids": ids, "dtype": "int64", "lib": "numpy"}
    elif not faults and n_docs >= 1 and draw(st.booleans()):
        cuts = sorted(set([0, n_docs] + draw(st.lists(st.integers(0, n_docs), max_size=3))))
        spec["chunks"] = cuts
        spec["token_ids"] = {"ids": ids, "dtype": "int64", "lib": "numpy"}
        spec["doc_offsets"] = {"ids": off, "dtype": "int64", "lib": "numpy"}
    return spec


@given(ssa_case())
def test_fuzz_selective_attention(spec):
    H.check("ssa_public", spec)


@given(rca_case())
def test_fuzz_relative_attention(spec):
    H.check("rca_public", spec)


@given(conv_case())
def test_fuzz_causal_depthwise_conv(spec):
    H.check("conv_public", spec)


@given(bit_cipher_case())
def test_fuzz_bit_cipher(spec):
    H.check("bc_public", spec)
