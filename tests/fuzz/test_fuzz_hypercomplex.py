"""Fuzz the public hypercomplex API: hamilton_product, dihedron_product, score_all, rank_all, topk_all,
one_to_n_loss, on backends None (auto), "reference" and "cpu".

Property (see _fuzz_cases): a named ValueError/TypeError/MemoryError, or the reference's result
(products, ranks and top-k ids exact; scores and losses by the 2x rule).
"""

from hypothesis import given
from hypothesis import strategies as st

import _fuzz_harness as H
from _fuzz_strategies import csr_filter, float_dtype, tspec

BACKENDS = (None, "reference", "cpu", "cpu")


def _dtype(draw, faults, name):
    return float_dtype(draw, faults, name)


def _soft_values(spec, faults, name):
    if any(v in ("nan", "inf", "-inf", "big") for _, v in spec.get("special", ())):
        faults.append(f"soft:{name} has NaN/inf/huge values")


@st.composite
def product_case(draw):
    faults = []
    fn = draw(st.sampled_from(("hamilton_product", "dihedron_product")))
    d = draw(st.integers(1, 5))
    D = 4 * d
    lead = draw(st.lists(st.integers(0, 3), max_size=3))
    hshape = tuple(lead) + (D,)
    rshape = tuple(1 if draw(st.booleans()) else s for s in lead) + (D,)
    if draw(st.booleans()) and lead:
        rshape = rshape[draw(st.integers(0, len(lead))):]  # fewer leading dims broadcast too
    shape_fault = draw(st.sampled_from(("none",) * 8 + ("width", "zero_width", "mismatch", "broadcast", "huge",
                                                        "scalar")))
    if shape_fault == "width":
        hshape = hshape[:-1] + (D + draw(st.integers(1, 3)),)
        rshape = rshape[:-1] + (hshape[-1],)
        faults.append("h: last dimension not 4*d")
    elif shape_fault == "zero_width":
        hshape, rshape = hshape[:-1] + (0,), rshape[:-1] + (0,)
        faults.append("h: last dimension 0")
    elif shape_fault == "mismatch":
        rshape = rshape[:-1] + (D + 4,)
        faults.append("r: last dimension differs from h")
    elif shape_fault == "broadcast":
        hshape, rshape = (2, D), (3, D)
        faults.append("r: does not broadcast with h")
    elif shape_fault == "huge":
        hshape, rshape = (2**35, D), (1, D)
        faults.append("h: expanded to (2^35, D): the contiguous copy would need > 100 GB")
    elif shape_fault == "scalar":
        hshape = ()
        faults.append("h: 0-d tensor")
    dt = _dtype(draw, faults, "h")
    dt_r = dt
    if draw(st.integers(0, 12)) == 0:
        dt_r = "float64" if dt != "float64" else "float32"
        faults.append("r: dtype differs from h")
    hs = draw(tspec(hshape, dt, views=("expand",) if shape_fault == "huge" else
                    ("contig", "contig", "transposed", "expand", "offset", "stride2")))
    rs = draw(tspec(rshape, dt_r))
    kwargs = {"layout": draw(st.sampled_from(("component", "interleaved")))}
    if draw(st.booleans()):
        kwargs["normalize"] = draw(st.booleans())
    if draw(st.integers(0, 15)) == 0:
        kwargs["layout"] = draw(st.sampled_from(("pykeen", "", "Component")))
        faults.append("layout: unknown")
    tensors = {"h": hs, "r": rs}
    if draw(st.integers(0, 20)) == 0:
        tensors["h"] = {"raw": [[1.0, 2.0, 3.0, 4.0]]}
        faults.append("h: a list, not a tensor")
    backend = draw(st.sampled_from(BACKENDS + ("nope",) if draw(st.integers(0, 20)) == 0 else BACKENDS))
    if backend == "nope":
        faults.append("backend: unknown")
    return {"fn": fn, "tensors": tensors, "kwargs": kwargs, "backend": backend, "faults": faults}


@st.composite
def scoring_case(draw, fn):
    faults = []
    B = draw(st.integers(0, 6))
    N = draw(st.integers(0, 9))
    d = draw(st.integers(1, 4))
    D = 4 * d
    dt = _dtype(draw, faults, "h")
    score = draw(st.sampled_from(("inner", "distance")))
    kwargs = {"algebra": draw(st.sampled_from(("quaternion", "dihedron"))), "score": score,
              "layout": draw(st.sampled_from(("component", "interleaved")))}
    if draw(st.booleans()):
        kwargs["normalize_relation"] = draw(st.booleans())
    hshape, eshape = (B, D), (N, D)
    sf = draw(st.sampled_from(("none",) * 10 + ("e_width", "h_3d", "r_shape", "huge_B", "huge_N")))
    rshape = hshape
    if sf == "e_width":
        eshape = (N, D + 4)
        faults.append("entities: width differs from h")
    elif sf == "h_3d":
        hshape = rshape = (1, B, D)
        faults.append("h: 3-d")
    elif sf == "r_shape":
        rshape = (B + 1, D)
        faults.append("r: shape differs from h")
    elif sf == "huge_B" and fn != "one_to_n_loss":
        B = 2**34
        hshape = rshape = (B, D)
        faults.append("h: (2^34, D) expanded: copies / outputs beyond 100 GB")
    elif sf == "huge_N" and fn == "score_all":
        N = 2**34
        eshape = (N, D)
        B = max(B, 1)
        hshape = rshape = (B, D)
        faults.append("entities: (2^34, D) expanded: a (B, N) output beyond 100 GB")
    huge = sf in ("huge_B", "huge_N") and any(f.startswith(("h: (2^34", "entities: (2^34")) for f in faults)
    hv = ("expand",) if huge and sf == "huge_B" else ("contig", "contig", "transposed", "expand", "offset", "stride2")
    ev = ("expand",) if huge and sf == "huge_N" else ("contig", "contig", "transposed", "offset", "stride2")
    hs = draw(tspec(hshape, dt, views=hv))
    rs = draw(tspec(rshape, dt, views=hv))
    es = draw(tspec(eshape, dt if draw(st.integers(0, 15)) else "float64" if dt != "float64" else "float32",
                    views=ev, ties=draw(st.booleans())))
    if es["dtype"] != dt:
        faults.append("entities: dtype differs from h")
    for name, s in (("h", hs), ("r", rs), ("entities", es)):
        _soft_values(s, faults, name)
    tensors = {"h": hs, "r": rs, "entities": es}
    if score == "distance" and draw(st.booleans()) and not huge:
        tensors["bias_h"] = draw(tspec((B,), dt, specials=False, views=("contig", "stride2")))
        if draw(st.booleans()):
            tensors["bias_t"] = draw(tspec((N,), dt, specials=False, views=("contig", "stride2")))
        if draw(st.integers(0, 10)) == 0:
            tensors["bias_h"] = draw(tspec((B + 1,), dt, specials=False))
            faults.append("bias_h: wrong length")
    elif score == "inner" and draw(st.integers(0, 12)) == 0 and not huge:
        tensors["bias_t"] = draw(tspec((N,), dt, specials=False))
        faults.append("bias_t: with the inner score")
    spec = {"fn": fn, "tensors": tensors, "kwargs": kwargs, "backend": draw(st.sampled_from(BACKENDS)),
            "faults": faults}
    if draw(st.integers(0, 20)) == 0:
        kwargs[draw(st.sampled_from(("algebra", "score")))] = draw(st.sampled_from(("octonion", "", "INNER")))
        faults.append("algebra/score: unknown")
    if fn in ("rank_all", "one_to_n_loss"):
        tf = draw(st.sampled_from(("none",) * 8 + ("hi", "neg", "2^40", "float", "shape", "bool")))
        tdt = draw(st.sampled_from(("int64", "int64", "int32", "int16", "uint8")))
        rng = (0, max(N - 1, 0))
        tshape = (B,)
        if N == 0 and B > 0:
            faults.append("targets: no entity to point at (N = 0)")
        if fn == "one_to_n_loss" and N == 0:
            faults.append("entities: N = 0 for a cross-entropy")
        if tf in ("hi", "neg", "2^40") and B > 0:
            tdt = "int64"
            bad = {"hi": N, "neg": -1, "2^40": 2**40}[tf]
            rng = (bad, bad)
            faults.append(f"targets: {bad} outside [0, N)")
        elif tf == "float":
            tdt = "float32"
            faults.append("targets: float dtype")
        elif tf == "bool":
            tdt = "bool"
            faults.append("targets: bool dtype")
        elif tf == "shape":
            tshape = (B + 1,)
            faults.append("targets: wrong length")
        if tdt == "uint8" and N > 255:
            tdt = "int64"
        tensors["targets"] = draw(tspec(tshape, tdt, specials=False,
                                        views=("expand",) if huge else ("contig", "stride2"), range=rng))
    if fn == "rank_all":
        kwargs["ties"] = draw(st.sampled_from(("realistic", "optimistic", "pessimistic")))
    if fn in ("rank_all", "topk_all") and draw(st.booleans()) and not huge:
        fs, ff, widest = draw(csr_filter(B, N))
        spec["filter"] = fs
        faults.extend(ff)
    else:
        widest = 0
    if fn == "topk_all":
        kf = draw(st.sampled_from(("none",) * 8 + ("big", "neg", "bool", "float")))
        k = draw(st.integers(0, max(N - widest, 0)))
        if kf == "big":
            k = N - widest + draw(st.sampled_from((1, 2**31, 2**40)))
            faults.append("k: beyond entities minus the most filtered")
        elif kf == "neg":
            k = -1
            faults.append("k: negative")
        elif kf == "bool":
            k = True
            faults.append("k: a bool")
        elif kf == "float":
            k = 1.0
            faults.append("k: a float")
        spec["k"] = k
    if fn == "one_to_n_loss":
        kwargs["reduction"] = draw(st.sampled_from(("mean", "sum", "none")))
        if draw(st.integers(0, 15)) == 0:
            kwargs["reduction"] = "avg"
            faults.append("reduction: unknown")
        if draw(st.booleans()) and not huge:
            spec["grad"] = True
            for s in (hs, rs, es):
                s["requires_grad"] = True
    # low-precision inputs on the cpu backend: unavailable, which the resolver says
    return spec


def _run(spec):
    H.check("hc_public", spec)


@given(product_case())
def test_fuzz_products(spec):
    _run(spec)


@given(scoring_case("score_all"))
def test_fuzz_score_all(spec):
    _run(spec)


@given(scoring_case("rank_all"))
def test_fuzz_rank_all(spec):
    _run(spec)


@given(scoring_case("topk_all"))
def test_fuzz_topk_all(spec):
    _run(spec)


@given(scoring_case("one_to_n_loss"))
def test_fuzz_one_to_n_loss(spec):
    _run(spec)
