"""Hypothesis strategies shared by the fuzz tests: tensor specs and CSR filters.

Strategies build plain-data specs (see ``_fuzz_cases.tensor``); the worker
process turns them into tensors, so a failing example prints as a readable,
re-runnable spec.
"""

from __future__ import annotations

from hypothesis import strategies as st

FLOATS = ("float32", "float64", "float16", "bfloat16")
BAD_DTYPES = ("int32", "int64", "bool", "complex64", "uint8", "int8")
VIEWS = ("contig", "contig", "contig", "transposed", "expand", "offset", "stride2")
SPECIALS = ("nan", "inf", "-inf", "denorm", "-0", "big", "tiny")


def float_dtype(draw, faults, name, bad_one_in=10, f32_f64_weight=2):
    """A float dtype (float32 / float64 drawn ``f32_f64_weight`` times as often), or about once in
    ``bad_one_in`` draws a non-float one, recorded in ``faults`` against ``name``."""
    if draw(st.integers(0, bad_one_in - 1)) == 0:
        dt = draw(st.sampled_from(BAD_DTYPES))
        faults.append(f"{name}: dtype {dt}")
        return dt
    return draw(st.sampled_from(FLOATS + ("float32", "float64") * f32_f64_weight))


@st.composite
def tspec(draw, shape, dtype="float32", lib="torch", views=VIEWS, specials=True, special_names=SPECIALS, **extra):
    """A tensor spec of a fixed logical shape: storage view, seed, maybe special values."""
    spec = {"shape": tuple(int(s) for s in shape), "dtype": dtype, "view": draw(st.sampled_from(views)),
            "seed": draw(st.integers(0, 2**16)), "lib": lib}
    if specials and draw(st.integers(0, 4)) == 0:
        spec["special"] = tuple(draw(st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(special_names)),
                                              min_size=1, max_size=3)))
    spec.update(extra)
    return spec


@st.composite
def csr_filter(draw, B, N, allow_faults=True):
    """(filter spec, faults, widest distinct row) for a (B, N) problem."""
    faults = []
    rows = [sorted(draw(st.lists(st.integers(0, max(N - 1, 0)), max_size=min(N, 4)))) if N else []
            for _ in range(B)]
    widest = max((len(set(r)) for r in rows), default=0)
    form = draw(st.sampled_from(("csr_tensor", "csr_numpy", "csr_lists", "rows", "rows")))
    fault = draw(st.sampled_from(("none",) * 6 + (
        "nonmonotone", "start", "end", "length", "odtype", "idtype", "range_hi", "range_neg", "range_2^40",
        "rows_count", "rows_float", "rows_bool", "rows_nested", "rows_str", "junk"))) if allow_faults else "none"
    off = [0]
    for r in rows:
        off.append(off[-1] + len(r))
    idx = [v for r in rows for v in r]
    odt = idt = "int64"
    if form != "rows" and fault.startswith("rows_"):
        fault = "none"
    if form == "rows" and fault in ("nonmonotone", "start", "end", "length", "odtype", "idtype"):
        fault = "none"
    if fault == "nonmonotone" and B >= 2:
        off[1] = off[-1] + 1  # > offsets[2] <= offsets[-1]; offsets[0] and offsets[-1] stay right
        faults.append("filter: non-monotone offsets")
    elif fault == "start":
        off = [draw(st.sampled_from((1, -1, 2**40)))] + off[1:]
        faults.append("filter: offsets[0] != 0")
    elif fault == "end":
        off[-1] = off[-1] + draw(st.sampled_from((1, 2**40, 3)))
        faults.append("filter: offsets[-1] != nnz")
    elif fault == "length":
        off = off + [off[-1]] if draw(st.booleans()) else off[:-1]
        faults.append("filter: offsets length != B+1")
    elif fault == "odtype" and form != "csr_lists":
        odt = draw(st.sampled_from(("float32", "float64", "bool")))
        faults.append("filter: float offsets")
    elif fault == "idtype" and form != "csr_lists" and idx:
        idt = draw(st.sampled_from(("float32", "float64", "bool")))
        faults.append("filter: float index")
    elif fault in ("range_hi", "range_neg", "range_2^40") and idx:
        bad = {"range_hi": N, "range_neg": -1, "range_2^40": 2**40}[fault]
        j = draw(st.integers(0, len(idx) - 1))
        idx[j] = bad
        faults.append(f"filter: index {bad} outside [0, N)")
    if form == "rows":
        rr = [list(r) for r in rows]
        # rebuild rows from the (possibly broken) index
        k = 0
        for r in rr:
            for i in range(len(r)):
                r[i] = idx[k]
                k += 1
        if fault == "rows_count":
            rr = rr + [[]] if draw(st.booleans()) or not rr else rr[:-1]
            faults.append("filter: wrong number of rows")
        elif fault in ("rows_float", "rows_bool", "rows_nested", "rows_str"):
            bad = {"rows_float": 1.7, "rows_bool": True, "rows_nested": [1, [2]], "rows_str": "a"}[fault]
            if rr:
                rr[draw(st.integers(0, len(rr) - 1))].append(bad if fault != "rows_nested" else [0])
                faults.append(f"filter: a row element {bad!r}")
        return {"form": "rows", "rows": rr}, faults, widest
    if fault == "junk":
        return {"form": "junk", "value": draw(st.sampled_from(("abc", 3, {"a": 1}, 1.5)))}, ["filter: junk"], widest
    return {"form": form, "offsets": off, "index": idx, "odtype": odt, "idtype": idt}, faults, widest
