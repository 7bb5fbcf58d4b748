"""Fuzz the public FDE API: FDEConfig, fde_encode, FDEEncoder (encode, encode_queries, encode_documents,
encode_corpus), chamfer, chamfer_rerank; backends None, "reference", "cpu".

FDE encodings must equal embkern.reference.fde.encode bit for bit; Chamfer scores follow the 2x rule
(float32 evaluation vs float64) and rerank ids are exact up to ties within that tolerance.
"""

from hypothesis import given
from hypothesis import strategies as st

import _fuzz_harness as H
from _fuzz_strategies import tspec

BACKENDS = (None, "reference", "cpu", "cpu")
POINT_DTYPES = ("float32",) * 6 + ("float64", "float64", "float16", "bfloat16")
BAD_POINT_DTYPES = ("int32", "int64", "bool", "complex64")


@st.composite
def config(draw, faults):
    """FDEConfig kwargs: mostly small and valid, sometimes at or past a limit."""
    d = draw(st.integers(1, 6))
    cfg = {"dimension": d, "num_repetitions": draw(st.integers(1, 3)),
           "num_simhash_projections": draw(st.integers(0, 4)),
           "seed": draw(st.sampled_from((1, 0, 7, -1, -(2**31), 2**32 - 1, 123456789))),
           "encoding_type": draw(st.sampled_from(("query", "document")))}
    if draw(st.integers(0, 2)) == 0:
        cfg["projection_type"] = "ams_sketch"
        cfg["projection_dimension"] = draw(st.integers(1, 5))
    if cfg["encoding_type"] == "document" and draw(st.booleans()):
        cfg["fill_empty_partitions"] = True
    if draw(st.integers(0, 2)) == 0:
        cfg["final_projection_dimension"] = draw(st.sampled_from((1, 2, 3, 8, 13)))
    lim = draw(st.sampled_from(("none",) * 12 + (
        "d0", "dneg", "R0", "k31", "kneg", "kNone", "kbool", "kfloat", "seed_hi", "seed_lo", "enc", "proj",
        "ams_no_dp", "identity_dp", "fill_query", "final0", "final_neg", "fill_int", "k30_small", "k26_final",
        "k20", "huge_L", "dp_2^31", "final_2^31")))
    big = None
    if lim == "d0":
        cfg["dimension"] = 0
    elif lim == "dneg":
        cfg["dimension"] = -3
    elif lim == "R0":
        cfg["num_repetitions"] = 0
    elif lim == "k31":
        cfg["num_simhash_projections"] = 31
    elif lim == "kneg":
        cfg["num_simhash_projections"] = -1
    elif lim == "kNone":
        cfg["num_simhash_projections"] = None
    elif lim == "kbool":
        cfg["num_simhash_projections"] = True
    elif lim == "kfloat":
        cfg["num_simhash_projections"] = 2.0
    elif lim == "seed_hi":
        cfg["seed"] = 2**32
    elif lim == "seed_lo":
        cfg["seed"] = -(2**31) - 1
    elif lim == "enc":
        cfg["encoding_type"] = "docs"
    elif lim == "proj":
        cfg["projection_type"] = "gaussian"
    elif lim == "ams_no_dp":
        cfg["projection_type"] = "ams_sketch"
        cfg.pop("projection_dimension", None)
    elif lim == "identity_dp":
        cfg.pop("projection_type", None)
        cfg["projection_dimension"] = d + 1
    elif lim == "fill_query":
        cfg["encoding_type"] = "query"
        cfg["fill_empty_partitions"] = True
    elif lim == "final0":
        cfg["final_projection_dimension"] = 0
    elif lim == "final_neg":
        cfg["final_projection_dimension"] = -2
    elif lim == "fill_int":
        cfg["encoding_type"] = "document"
        cfg["fill_empty_partitions"] = 1
    elif lim == "k30_small":  # 2^30 partitions of 1 float: 4 GiB per document
        cfg.update(dimension=1, num_repetitions=1, num_simhash_projections=30)
        cfg.pop("projection_type", None)
        cfg.pop("projection_dimension", None)
        cfg.pop("final_projection_dimension", None)
        big = "soft"
    elif lim == "k26_final":  # issue 7 defect 1: an 8-float output from 2^26 partitions
        cfg.update(dimension=1, num_repetitions=1, num_simhash_projections=26, final_projection_dimension=8)
        cfg.pop("projection_type", None)
        cfg.pop("projection_dimension", None)
        big = "soft"
    elif lim == "k20":
        cfg.update(num_simhash_projections=20, num_repetitions=1, final_projection_dimension=16)
        big = "soft"
    elif lim == "huge_L":  # R * 2^k * d_p = 2^38 values per encoding: > 100 GB per document
        cfg.update(num_simhash_projections=30, num_repetitions=4, projection_type="ams_sketch",
                   projection_dimension=64)
        big = "huge"
    elif lim == "dp_2^31":
        cfg.update(projection_type="ams_sketch", projection_dimension=draw(st.sampled_from((2**31 - 1, 2**31,
                                                                                           2**32 - 1, 2**32))),
                   num_simhash_projections=0, num_repetitions=1)
        big = "huge"
    elif lim == "final_2^31":
        cfg["final_projection_dimension"] = draw(st.sampled_from((2**31 - 1, 2**31, 2**32)))
        big = "huge"
    if lim in ("d0", "dneg", "R0", "k31", "kneg", "kNone", "kbool", "kfloat", "seed_hi", "seed_lo", "enc",
               "proj", "ams_no_dp", "identity_dp", "fill_query", "final0", "final_neg", "fill_int"):
        faults.append(f"config: {lim}")
    return cfg, big


@st.composite
def ragged_input(draw, d, faults, big):
    """One of the three input forms, numpy or torch, with its faults."""
    lib = draw(st.sampled_from(("numpy", "torch")))
    form = draw(st.sampled_from(("csr", "csr", "list", "padded")))
    B = draw(st.integers(0, 5)) if big is None else draw(st.sampled_from((0, 1, 4)))
    lens = [draw(st.integers(0, 6)) if big is None else 1 for _ in range(B)]
    N = sum(lens)
    dt = draw(st.sampled_from(POINT_DTYPES))
    if lib == "numpy" and dt == "bfloat16":
        dt = "float32"
    width = d
    pf = draw(st.sampled_from(("none",) * 10 + ("dtype", "width", "nan", "inf", "f64_overflow", "3d")))
    special = ()
    if pf == "dtype":
        dt = draw(st.sampled_from(BAD_POINT_DTYPES))
        faults.append(f"points: dtype {dt}")
    elif pf == "width" and (form != "list" or B):
        width = d + 1
        faults.append("points: width != config.dimension")
    elif pf in ("nan", "inf") and N:
        special = ((draw(st.integers(0, 1000)), pf),)
        # in the padded form the value may land in the padding, which is never read
        faults.append(f"soft:points: {pf} in padding?" if form == "padded" else f"points: {pf}")
    elif pf == "f64_overflow" and N:
        dt = "float64"
        faults.append("points: float64 beyond float32 range")
    views = ("contig", "contig", "transposed", "offset", "stride2", "expand")
    spec = {"form": form, "B": B}
    scale = 1e300 if pf == "f64_overflow" else 1.0  # every value beyond float32's range
    if form == "list":
        spec["parts"] = [draw(tspec((n, width), dt, lib=lib, views=views, specials=False, scale=scale,
                                    special=special)) for n in lens]
        if pf == "3d" and B:
            spec["parts"][0] = draw(tspec((1, lens[0], width), dt, lib=lib, specials=False))
            faults.append("points[0]: 3-d")
        return spec
    if form == "padded":
        Lmax = max(lens, default=0) + draw(st.integers(0, 2))
        spec["points"] = draw(tspec((B, Lmax, width), dt, lib=lib, views=("contig", "offset", "expand"),
                                    specials=False, scale=scale, special=special))
        lf = draw(st.sampled_from(("none",) * 6 + ("neg", "long", "float", "shape")))
        lvals = list(lens)
        ldt = "int64"
        if lf == "neg" and B:
            lvals[0] = -1
            faults.append("lengths: negative")
        elif lf == "long" and B:
            lvals[-1] = Lmax + 1
            faults.append("lengths: beyond the padded length")
        elif lf == "float":
            ldt = "float32"
            faults.append("lengths: float dtype")
        elif lf == "shape":
            lvals = lvals + [0]
            faults.append("lengths: wrong length")
        as_list = draw(st.booleans())
        if ldt == "float32" and as_list:
            if lvals:
                lvals = [float(x) for x in lvals]  # a list of floats: the list form of a float dtype
            else:
                as_list = False  # [] carries no dtype (it is empty int64 lengths): the float32 array then
        spec["lengths"] = {"raw": lvals} if as_list else _int_array(lvals, ldt, lib)
        if pf == "3d":
            pass
        return spec
    # CSR
    shape = (N, width) if pf != "3d" else (1, N, width)
    if pf == "3d":
        faults.append("points: 3-d")
    spec["points"] = draw(tspec(shape, dt, lib=lib, views=views, specials=False, scale=scale, special=special))
    off = [0]
    for n in lens:
        off.append(off[-1] + n)
    of = draw(st.sampled_from(("none",) * 8 + ("nonmono", "start", "end", "dtype", "empty", "2d", "2^40", "neg")))
    odt = draw(st.sampled_from(("int64", "int64", "int32", "uint8", "int16")))
    if of == "nonmono" and B >= 2:
        off[1] = off[-1] + 1
        faults.append("offsets: non-monotone")
    elif of == "start":
        off[0] = draw(st.sampled_from((1, -1)))
        odt = "int64"
        faults.append("offsets: offsets[0] != 0")
    elif of == "end":
        off[-1] += 1
        faults.append("offsets: offsets[-1] != N")
    elif of == "dtype":
        odt = draw(st.sampled_from(("float32", "bool", "complex64")))
        faults.append(f"offsets: dtype {odt}")
    elif of == "empty":
        off = []
        faults.append("offsets: empty")
    elif of == "2d":
        spec["offsets"] = {"raw": [[0, N]]}
        faults.append("offsets: 2-d")
    elif of == "2^40":
        off[-1] = 2**40
        odt = "int64"
        faults.append("offsets: 2^40")
    elif of == "neg" and B >= 1:
        off = [0] + [-1] * (len(off) - 1)
        odt = "int64"
        faults.append("offsets: negative")
    if odt == "uint8" and max(off, default=0) > 255:
        odt = "int64"
    if "offsets" not in spec:
        spec["offsets"] = {"raw": off} if draw(st.integers(0, 3)) == 0 else _int_array(off, odt, lib)
    return spec


def _int_array(vals, dt, lib):
    # exact values: a tensor spec cannot carry them, so the worker gets a raw numpy array or list-built tensor
    import numpy as np
    import torch

    from _fuzz_cases import DTYPES, NP_DTYPES

    if lib == "numpy":
        return {"raw": np.array(vals, NP_DTYPES[dt])}
    return {"raw": torch.tensor(vals, dtype=DTYPES[dt])}


@st.composite
def encode_case(draw):
    faults = []
    cfg, big = draw(config(faults))
    d = cfg["dimension"] if isinstance(cfg["dimension"], int) and cfg["dimension"] > 0 else 2
    inp = draw(ragged_input(d, faults, big))
    if big == "huge" and inp["B"] > 0:
        faults.append("config: output beyond 100 GB")
    elif big is not None:
        faults.append("soft:config at a size limit")
    fn = draw(st.sampled_from(("fde_encode", "fde_encode", "fde_encode", "FDEEncoder.encode",
                               "FDEEncoder.encode_queries", "FDEEncoder.encode_documents",
                               "FDEEncoder.encode_corpus")))
    # the NumPy reference loops over 2^k partitions in Python: large k only on the fast paths
    backend = draw(st.sampled_from(BACKENDS if big is None else (None, "cpu")))
    spec = {"fn": fn, "config": cfg, "input": inp, "backend": backend, "faults": faults}
    if fn in ("fde_encode", "FDEEncoder.encode_corpus") and draw(st.booleans()) and big is None:
        of = draw(st.sampled_from(("none",) * 4 + ("int32", "float64", "shape", "fortran", "readonly", "kind",
                                                   "raw")))
        out = {"kind": "auto"}
        if of == "int32":
            out["dtype"] = "int32"
            faults.append("out: int32")
        elif of == "float64":
            out["dtype"] = "float64"
            faults.append("out: float64")
        elif of == "shape":
            out["shape"] = (inp["B"] + 1, 1)
            faults.append("out: wrong shape")
        elif of == "fortran" and inp["B"] > 1:
            out["fortran"] = True
            faults.append("soft:out: Fortran order" if fn.endswith("corpus") else "out: Fortran order")
        elif of == "readonly":
            out["readonly"] = True
            out["kind"] = "numpy"
            faults.append("out: read-only")
        elif of == "kind":
            out["kind"] = "torch"
            faults.append("soft:out: a torch tensor" if fn.endswith("corpus") else "out: a tensor for numpy input")
        elif of == "raw":
            out = {"kind": "raw", "value": "buffer"}
            faults.append("out: a str")
        if fn.endswith("corpus") and out.get("kind") == "auto":
            out["kind"] = "numpy"
        spec["out"] = out
    if draw(st.integers(0, 25)) == 0:
        spec["backend"] = "cuda "
        faults.append("backend: unknown")
    return spec


@given(encode_case())
def test_fuzz_fde_encode(spec):
    timeout = 60 if any("size limit" in f or "100 GB" in f for f in spec["faults"]) else None
    H.check("fde_public", spec, timeout=timeout)


@st.composite
def chamfer_case(draw):
    faults = []
    lib = draw(st.sampled_from(("numpy", "torch")))
    dim = draw(st.integers(1, 5))
    Bq, Bd = draw(st.integers(0, 4)), draw(st.integers(0, 5))
    ql = [draw(st.integers(0, 4)) for _ in range(Bq)]
    dl = [draw(st.integers(0, 4)) for _ in range(Bd)]
    qdt = draw(st.sampled_from(("float32", "float32", "float64", "float16")))
    ddt = draw(st.sampled_from(("float32", "float32", "float64")))
    pf = draw(st.sampled_from(("none",) * 8 + ("qdtype", "width", "nan", "3d")))
    dwidth = dim
    if pf == "qdtype":
        qdt = "int32"
        faults.append("q_points: int dtype")
    elif pf == "width":
        dwidth = dim + 1
        faults.append("d_points: width differs")
    q = draw(tspec((sum(ql), dim), qdt, lib=lib, specials=False, ties=draw(st.booleans())))
    d = draw(tspec((sum(dl), dwidth), ddt, lib=lib, specials=False, ties=True))
    if pf == "nan" and sum(dl):
        d["special"] = ((0, "nan"),)
        faults.append("soft:d_points: NaN")
    if pf == "3d":
        q["shape"] = (1,) + tuple(q["shape"])
        faults.append("q_points: 3-d")

    def offs(lens, name):
        o = [0]
        for n in lens:
            o.append(o[-1] + n)
        f = draw(st.sampled_from(("none",) * 8 + ("nonmono", "end", "start", "float")))
        if f == "nonmono" and len(lens) >= 2:
            o[1] = o[-1] + 1
            faults.append(f"{name}: non-monotone")
        elif f == "end":
            o[-1] += 1
            faults.append(f"{name}: end != N")
        elif f == "start":
            o[0] = 1
            faults.append(f"{name}: start != 0")
        elif f == "float":
            return _int_array(o, "float32", lib), o
        return _int_array(o, "int64", lib), o

    qo, _ = offs(ql, "q_offsets")
    if qo["raw"].dtype.__str__().startswith(("float", "torch.float")):
        faults.append("q_offsets: float dtype")
    do, _ = offs(dl, "d_offsets")
    if str(do["raw"].dtype).startswith(("float", "torch.float")):
        faults.append("d_offsets: float dtype")
    fn = draw(st.sampled_from(("chamfer", "chamfer_rerank")))
    spec = {"fn": fn, "q_points": q, "q_offsets": qo, "d_points": d, "d_offsets": do, "faults": faults}
    if fn == "chamfer":
        dc = draw(st.sampled_from(("default", "default", 1, 2, 3, 4096, 0, -1, True, 2.0, None)))
        spec["doc_chunk"] = dc
        if isinstance(dc, bool):
            faults.append(f"soft:doc_chunk: {dc!r}")
        elif dc in (0, -1, None) or isinstance(dc, float):
            faults.append(f"doc_chunk: {dc!r}")
    else:
        C = draw(st.integers(0, 4)) if Bd else 0
        cf = draw(st.sampled_from(("none",) * 6 + ("hi", "neg", "float", "shape")))
        import numpy as np

        rng = np.random.default_rng(draw(st.integers(0, 1000)))
        cand = rng.integers(0, max(Bd, 1), size=(Bq, C)) if Bd else np.zeros((Bq, 0), np.int64)
        if cf == "hi" and cand.size:
            cand[0, 0] = Bd
            faults.append("candidates: id >= Bd")
        elif cf == "neg" and cand.size:
            cand[-1, -1] = -1
            faults.append("candidates: negative id")
        elif cf == "float":
            cand = cand.astype(np.float32)
            faults.append("candidates: float dtype")
        elif cf == "shape":
            cand = cand[None]
            faults.append("candidates: 3-d")
        if lib == "torch":
            import torch

            cand = torch.from_numpy(np.ascontiguousarray(cand))
        spec["candidates"] = {"raw": cand}
        kf = draw(st.sampled_from(("none",) * 6 + ("big", "neg", "bool", "float")))
        k = draw(st.integers(0, C))
        if kf == "big":
            k = C + 1
            faults.append("k: > C")
        elif kf == "neg":
            k = -1
            faults.append("k: negative")
        elif kf == "bool":
            k = True
            faults.append("k: bool")
        elif kf == "float":
            k = 1.0
            faults.append("k: float")
        spec["k"] = k
    return spec


@given(chamfer_case())
def test_fuzz_chamfer(spec):
    H.check("chamfer_public", spec)
