"""Fuzz every function of the raw embkern._C module, each call in the worker process.

embkern._C.hypercomplex.{query_forward, query_backward, score_forward, rank, topk, ce_forward, ce_backward},
embkern._C.fde.{simhash_table, ams_table, count_sketch_table, count_sketch_csr, Plan, encode} and the
top-level set_num_threads, set_isa, get_num_threads, isa_info, build_info. A raw call must raise a
ValueError/TypeError/MemoryError naming an argument or write what the reference computes; it must never
crash, whatever the buffers (dtype, shape, strides, read-only outputs, ranges, CSR structure).
"""

import os

from hypothesis import given
from hypothesis import strategies as st

import _fuzz_harness as H
from _fuzz_strategies import tspec

CPUS = os.cpu_count() or 1
ISAS = ("generic", "avx2", "avx512")


def _arr(draw, shape, dtype, **kw):
    return draw(tspec(shape, dtype, lib="numpy", views=("contig",), specials=kw.pop("specials", True), **kw))


@st.composite
def raw_hc_case(draw):
    fn = draw(st.sampled_from(("query_forward", "query_backward", "score_forward", "rank", "topk", "ce_forward",
                               "ce_backward")))
    dt = draw(st.sampled_from(("float32", "float64")))
    B, N, d = draw(st.integers(0, 5)), draw(st.integers(0, 7)), draw(st.integers(1, 3))
    K = 4 * d
    faults = []
    a = {}
    if fn in ("query_forward", "query_backward"):
        for n in (("h", "r", "q_out") if fn == "query_forward" else ("grad_q", "h", "r", "grad_h_out", "grad_r_out")):
            a[n] = _arr(draw, (B, K), dt)
        a["algebra"], a["layout"], a["normalize"] = draw(st.integers(0, 1)), draw(st.integers(0, 1)), draw(
            st.booleans())
        outs = [n for n in a if n.endswith("_out")]
    else:
        score = draw(st.integers(0, 1))
        a["q"], a["E"] = _arr(draw, (B, K), dt), _arr(draw, (N, K), dt, ties=draw(st.booleans()))
        a["bias_h"] = _arr(draw, (B,), dt, specials=False) if score == 1 and draw(st.booleans()) else None
        a["bias_t"] = _arr(draw, (N,), dt, specials=False) if score == 1 and draw(st.booleans()) else None
        a["score"] = score
        if fn in ("rank", "ce_forward", "ce_backward"):
            a["targets"] = _arr(draw, (B,), "int64", specials=False, range=(0, max(N - 1, 0)))
            if N == 0 and B > 0:
                faults.append("targets: N = 0")
        widest = 0
        if fn in ("rank", "topk"):
            if draw(st.booleans()):
                rows = [sorted(set(draw(st.lists(st.integers(0, max(N - 1, 0)), max_size=min(N, 3))))) if N else []
                        for _ in range(B)]
                widest = max((len(r) for r in rows), default=0)
                off = [0]
                for r in rows:
                    off.append(off[-1] + len(r))
                a["filter_offsets"] = {"raw_list": off}
                a["filter_index"] = {"raw_list": [v for r in rows for v in r]}
            else:
                a["filter_offsets"] = a["filter_index"] = None
        if fn == "score_forward":
            a["S_out"] = _arr(draw, (B, N), dt)
        elif fn == "rank":
            a["ranks_out"] = _arr(draw, (B,), "float64")
            a["ties"] = draw(st.integers(0, 2))
        elif fn == "topk":
            k = draw(st.integers(0, max(N - widest, 0)))
            a["values_out"] = _arr(draw, (B, k), dt)
            a["indices_out"] = _arr(draw, (B, k), "int64", specials=False)
        elif fn == "ce_forward":
            a["loss_out"], a["lse_out"] = _arr(draw, (B,), dt), _arr(draw, (B,), dt)
        elif fn == "ce_backward":
            a["grad_loss"] = _arr(draw, (B,), dt)
            a["lse"] = _arr(draw, (B,), dt)
            a["grad_q_out"], a["grad_E_out"] = _arr(draw, (B, K), dt), _arr(draw, (N, K), dt)
            a["grad_bias_h_out"], a["grad_bias_t_out"] = _arr(draw, (B,), dt), _arr(draw, (N,), dt)
        outs = [n for n in a if n.endswith("_out")]
    # CSR lists to exact arrays
    import numpy as np

    for n in ("filter_offsets", "filter_index"):
        if isinstance(a.get(n), dict) and "raw_list" in a[n]:
            a[n] = {"raw": np.array(a[n]["raw_list"], np.int64)}
    arrays = [n for n, v in a.items() if isinstance(v, dict)]
    for _ in range(draw(st.integers(0, 2)) if draw(st.integers(0, 2)) else 0):
        kind = draw(st.sampled_from(("dtype", "shape", "noncontig", "readonly", "none", "list", "enum", "enum_big",
                                     "targets", "filter", "bias_inner", "k_big", "int32_index", "stride0")))
        if kind in ("dtype", "shape", "noncontig", "readonly", "none", "list", "stride0") and arrays:
            n = draw(st.sampled_from(arrays))
            v = a[n]
            if kind == "readonly" and not n.endswith("_out"):
                continue
            if v is None or "raw" in v:
                continue
            if kind == "dtype":
                new = draw(st.sampled_from(("float16", "int32", "float64" if v["dtype"] != "float64" else "float32",
                                            "bool", "complex64")))
                if new == v["dtype"]:
                    continue
                a[n] = dict(v, dtype=new)
            elif kind == "shape":
                sh = list(v["shape"]) or [0]
                j = draw(st.integers(0, len(sh) - 1))
                sh[j] += draw(st.sampled_from((1, 2, -1))) if sh[j] else 1
                a[n] = dict(v, shape=tuple(sh))
            elif kind == "noncontig":
                if not v["shape"] or v["shape"][-1] <= 1 or (len(v["shape"]) > 1 and v["shape"][0] == 0):
                    continue
                a[n] = dict(v, view="stride2")
            elif kind == "stride0":
                if not v["shape"] or v["shape"][0] <= 1:
                    continue
                a[n] = dict(v, view="expand")
            elif kind == "readonly":
                a[n] = dict(v, readonly=True)
            elif kind == "none":
                if n in ("bias_h", "bias_t", "filter_offsets", "filter_index"):
                    continue
                a[n] = None
            elif kind == "list":
                a[n] = {"raw": [[1.0, 2.0, 3.0, 4.0]]}
            faults.append(f"{n}: {kind}")
        elif kind in ("enum", "enum_big"):
            en = [n for n in ("algebra", "layout", "score", "ties") if n in a]
            n = draw(st.sampled_from(en))
            a[n] = draw(st.sampled_from((-1, 2, 3, 7))) if kind == "enum" else draw(
                st.sampled_from((2**31, 2**40, -(2**63))))
            if n == "ties" and a[n] == 2:
                a[n] = 3
            faults.append(f"{n}: {a[n]}")
        elif kind == "targets" and "targets" in a and B > 0:
            bad = draw(st.sampled_from((N, -1, 2**40, -(2**62))))
            a["targets"] = {"raw": np.full(B, bad, np.int64)}
            faults.append(f"targets: {bad}")
        elif kind == "filter" and fn in ("rank", "topk"):
            how = draw(st.sampled_from(("one", "nonmono", "start", "end", "len", "range", "range_neg")))
            off = np.zeros(B + 1, np.int64)
            idx = np.zeros(0, np.int64)
            if how == "one":
                a["filter_offsets"], a["filter_index"] = {"raw": off}, None
                faults.append("filter: offsets without index")
                continue
            if how == "nonmono" and B >= 2:
                off = np.array([0, 2] + [1] * (B - 1), np.int64)
                idx = np.zeros(1, np.int64)
            elif how == "start":
                off = off + 1
            elif how == "end":
                off[-1] = 5
            elif how == "len":
                off = np.zeros(B + 2, np.int64)
            elif how in ("range", "range_neg"):
                if B == 0:
                    continue
                off[1:] = 1
                idx = np.array([N if how == "range" else -1], np.int64)
            else:
                continue
            a["filter_offsets"], a["filter_index"] = {"raw": off}, {"raw": idx}
            faults.append(f"filter: {how}")
        elif kind == "bias_inner" and "score" in a:
            a["score"] = 0
            a["bias_t"] = _arr(draw, (N,), dt, specials=False)
            faults.append("bias_t: with the inner score")
        elif kind == "k_big" and fn == "topk":
            k = N - widest + 1
            a["values_out"] = _arr(draw, (B, k), dt)
            a["indices_out"] = _arr(draw, (B, k), "int64", specials=False)
            faults.append("values_out: k beyond N - widest filter")
        elif kind == "int32_index" and fn in ("rank", "ce_forward", "ce_backward"):
            a["targets"] = dict(a["targets"], dtype="int32")
            faults.append("targets: int32")
    # a zero-size array passes any dtype/contiguity check trivially? No: dtype is still checked.
    spec = {"fn": fn, "args": a, "faults": faults, "isa": draw(st.sampled_from(ISAS + (None,))),
            "threads": draw(st.sampled_from((None, 1, 2, 3)))}
    return spec


def _avail():
    import embkern._C as C

    return C.isa_info()["available"]


@given(raw_hc_case())
def test_fuzz_raw_hypercomplex(spec):
    if spec.get("isa") and spec["isa"] not in _avail():
        spec["isa"] = None
    H.check("raw_hc", spec)


@st.composite
def raw_table_case(draw):
    fn = draw(st.sampled_from(("simhash_table", "ams_table", "count_sketch_table", "count_sketch_csr")))
    faults = []
    seed = draw(st.sampled_from((0, 1, 42, -1, -(2**31), 2**32 - 1)))
    if draw(st.integers(0, 10)) == 0 and fn != "count_sketch_csr":
        seed = draw(st.sampled_from((2**32, -(2**31) - 1, 2**63 - 1)))
        faults.append("seed: out of range")
    if fn == "simhash_table":
        d, k, R = draw(st.integers(1, 12)), draw(st.integers(0, 6)), draw(st.integers(1, 3))
        lim = draw(st.sampled_from(("none",) * 6 + ("d0", "k31", "kneg", "R0", "huge", "k30")))
        if lim == "d0":
            d = 0
        elif lim == "k31":
            k = 31
        elif lim == "kneg":
            k = -1
        elif lim == "R0":
            R = 0
        elif lim == "huge":
            d, k, R = 2**20, 30, 2**12
        elif lim == "k30":
            d, k, R = 1, 30, 1
        if lim != "none" and lim != "k30":
            faults.append(f"simhash_table: {lim}")
        return {"fn": fn, "args": {"pos": (seed, d, k, R)}, "faults": faults}
    if fn == "ams_table":
        d, dp, R = draw(st.integers(1, 12)), draw(st.integers(1, 9)), draw(st.integers(1, 3))
        lim = draw(st.sampled_from(("none",) * 6 + ("d0", "dp0", "R0", "dp_2^31", "huge")))
        if lim == "d0":
            d = 0
        elif lim == "dp0":
            dp = 0
        elif lim == "R0":
            R = 0
        elif lim == "dp_2^31":
            dp = draw(st.sampled_from((2**31 - 1, 2**31, 2**32 - 1, 2**32)))
            if dp >= 2**31:
                faults.append("soft:projection_dim at or past 2^31 (int32 indices)")
            if dp >= 2**32:
                faults.append("projection_dim: >= 2^32")
        elif lim == "huge":
            d, R = 2**30, 2**8
        if lim in ("d0", "dp0", "R0", "huge"):
            faults.append(f"ams_table: {lim}")
        return {"fn": fn, "args": {"pos": (seed, d, dp, R)}, "faults": faults}
    if fn == "count_sketch_table":
        L, D = draw(st.integers(0, 3000)), draw(st.sampled_from((1, 2, 7, 64, 2**31 - 1)))
        lim = draw(st.sampled_from(("none",) * 6 + ("D0", "D_2^31", "Lneg", "huge")))
        if lim == "D0":
            D = 0
        elif lim == "D_2^31":
            D = 2**31
        elif lim == "Lneg":
            L = -1
        elif lim == "huge":
            L = 2**40
        if lim != "none":
            faults.append(f"count_sketch_table: {lim}")
        return {"fn": fn, "args": {"pos": (seed, L, D)}, "faults": faults}
    D = draw(st.integers(1, 9))
    L = draw(st.integers(0, 40))
    b = {"shape": (L,), "dtype": "int32", "seed": draw(st.integers(0, 99)), "range": (0, D - 1)}
    lim = draw(st.sampled_from(("none",) * 5 + ("hi", "neg", "int64", "2d", "D0", "noncontig")))
    if lim == "hi" and L:
        b["special"] = ((0, "big"),)
    elif lim == "neg" and L:
        b["special"] = ((L - 1, "neg"),)
    elif lim == "int64":
        b["dtype"] = "int64"
    elif lim == "2d":
        b["shape"] = (1, L)
    elif lim == "D0":
        D = 0
    elif lim == "noncontig" and L > 1:
        b["view"] = "stride2"
    else:
        lim = "none"
    if lim != "none":
        faults.append(f"count_sketch_csr: {lim}")
    return {"fn": fn, "args": {"bucket": b, "final_dim": D}, "faults": faults}


@given(raw_table_case())
def test_fuzz_raw_fde_tables(spec):
    H.check("raw_fde_tables", spec, timeout=60)


@st.composite
def raw_plan_case(draw):
    import numpy as np

    faults = []
    d, R, k = draw(st.integers(1, 5)), draw(st.integers(1, 2)), draw(st.integers(0, 4))
    ams = draw(st.booleans())
    dp = draw(st.integers(1, 5)) if ams else d
    is_doc = draw(st.booleans())
    fill = is_doc and draw(st.booleans())
    D = draw(st.sampled_from((0, 0, 1, 3, 8)))
    plan = {"d": d, "R": R, "k": k, "dp": dp, "is_document": is_doc, "fill": fill, "final_dim": D, "ams": ams,
            "seed": draw(st.sampled_from((1, 5, 2**32 - 1)))}
    if D and draw(st.booleans()):
        plan["signs"] = "arbitrary"  # count-sketch signs that are not +-1 (issue 7 defect 2)
    if D and draw(st.booleans()):
        if draw(st.booleans()):
            plan["array_module"] = True
            plan["mutate"] = "resize"
        else:
            plan["mutate"] = draw(st.sampled_from(("overwrite", "overwrite_out_of_range")))
    lim = draw(st.sampled_from(("none",) * 8 + (
        "d0", "k31", "kneg", "R0", "dp0", "dp_2^32", "fill_query", "final_neg", "simhash_shape", "simhash_dtype",
        "ams_half", "ams_range", "ams_neg", "cs_range", "cs_len", "cs_dtype", "cs_missing", "identity_dp")))
    broken = {}
    L = R * (1 << k) * dp
    if lim == "d0":
        plan["d"] = 0
    elif lim == "k31":
        plan["k"] = 31
    elif lim == "kneg":
        plan["k"] = -1
    elif lim == "R0":
        plan["R"] = 0
    elif lim == "dp0":
        plan["dp"] = 0
    elif lim == "dp_2^32":
        plan["dp"] = 2**32
    elif lim == "fill_query":
        plan["is_document"], plan["fill"] = False, True
    elif lim == "final_neg":
        plan["final_dim"] = -1
    elif lim == "simhash_shape":
        broken["simhash"] = np.zeros((R, d, k + 1), np.float32)
    elif lim == "simhash_dtype":
        broken["simhash"] = np.zeros((R, d, k), np.float64)
    elif lim == "ams_half":
        broken["ams_index"] = np.zeros((R, d), np.int32)
        plan["ams"] = False
    elif lim == "ams_range" and ams:
        broken["ams_index"] = np.full((R, d), dp, np.int32)
    elif lim == "ams_neg" and ams:
        broken["ams_index"] = np.full((R, d), -1, np.int32)
    elif lim == "cs_range" and D:
        broken["cs_bucket"] = np.full(L, D, np.int32)
    elif lim == "cs_len" and D:
        broken["cs_bucket"] = np.zeros(L + 1, np.int32)
        broken["cs_sign"] = np.ones(L + 1, np.float32)
    elif lim == "cs_dtype" and D:
        broken["cs_bucket"] = np.zeros(L, np.int64)
    elif lim == "cs_missing" and D:
        broken["cs_sign"] = None
        broken["cs_bucket"] = None
    elif lim == "identity_dp" and not ams:
        plan["dp"] = d + 1
    else:
        lim = "none"
    if broken:
        plan["broken"] = broken
    if lim != "none":
        faults.append(f"plan: {lim}")
    B = draw(st.integers(0, 4))
    lens = [draw(st.integers(0, 5)) for _ in range(B)]
    N = sum(lens)
    off = np.zeros(B + 1, np.int64)
    off[1:] = np.cumsum(lens) if B else off[1:]
    X = {"shape": (N, d), "dtype": "float32", "seed": draw(st.integers(0, 999)),
         "ties": draw(st.booleans())}
    ef = draw(st.sampled_from(("none",) * 8 + ("f64", "width", "noncontig", "nan", "off_i32", "off_nonmono",
                                               "off_end", "off_2^40", "off_empty", "out_shape", "out_ro",
                                               "out_f64")))
    Dout = plan["final_dim"] if plan["final_dim"] > 0 else R * (1 << k) * dp
    out = None
    if ef == "f64":
        X["dtype"] = "float64"
    elif ef == "width":
        X["shape"] = (N, d + 1)
    elif ef == "noncontig" and N > 1 and d > 1:
        X["view"] = "stride2"
    elif ef == "nan" and N:
        X["special"] = ((0, "nan"),)
    elif ef == "off_i32":
        off = off.astype(np.int32)
    elif ef == "off_nonmono" and B >= 2:
        off[1] = N + 1
    elif ef == "off_end":
        off[-1] += 1
    elif ef == "off_2^40":
        off[-1] = 2**40
    elif ef == "off_empty":
        off = np.zeros(0, np.int64)
    elif ef == "out_shape":
        out = {"raw": np.zeros((B, Dout + 1), np.float32)}
    elif ef == "out_ro":
        a = np.zeros((B, Dout), np.float32)
        a.flags.writeable = False
        out = {"raw": a}
    elif ef == "out_f64":
        out = {"raw": np.zeros((B, Dout), np.float64)}
    else:
        ef = "none"
    if ef != "none":
        faults.append(f"encode: {ef}")
    return {"plan": plan, "points": X, "offsets": {"raw": off}, "out": out, "faults": faults,
            "threads": draw(st.sampled_from((None, 1, 2, 3))), "isa": draw(st.sampled_from(ISAS + (None,)))}


@given(raw_plan_case())
def test_fuzz_raw_fde_plan(spec):
    if spec.get("isa") and spec["isa"] not in _avail():
        spec["isa"] = None
    H.check("raw_fde_plan", spec)


@st.composite
def raw_misc_case(draw):
    import embkern._C as C

    fn = draw(st.sampled_from(("set_num_threads", "set_isa", "info")))
    if fn == "info":
        return {"fn": fn, "faults": []}
    if fn == "set_num_threads":
        cap = min(1024, 8 * max(1, CPUS))
        v = draw(st.sampled_from((1, 2, 3, 4, cap, 0, -1, cap + 1, 1025, 2**31, 2**63 - 1, -(2**63), 1.5, "2",
                                  None, True)))
        ok = isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= cap
        faults = [] if ok else ([f"soft:num_threads: {v!r}"] if isinstance(v, bool) else [f"num_threads: {v!r}"])
        return {"fn": fn, "value": v, "faults": faults}
    info = C.isa_info()
    v = draw(st.sampled_from(("generic", "avx2", "avx512", "native", "", "AVX2", "sse4", "avx512 ", 3, None)))
    ok = v in info["available"]
    # "native" names the level of an EMBKERN_ARCH=native build; a portable build may refuse it
    faults = [] if ok else ["soft:isa: native"] if v == "native" else [f"isa: {v!r}"]
    return {"fn": fn, "value": v, "faults": faults}


@given(raw_misc_case())
def test_fuzz_raw_misc(spec):
    H.check("raw_misc", spec)
