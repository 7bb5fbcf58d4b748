"""Runtime ISA dispatch of the C++ CPU kernels (generic / avx2 / avx512).

Every level this CPU runs is exercised in one process through
``embkern._C.set_isa``; the exact ops must give the same bits at every level
(FDE, the hypercomplex products, scores and so ranks and top-k indices),
the rest stays within the numerics contract. The environment variable
``EMBKERN_CPU_ISA`` is checked in subprocesses (it is read once per process).
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import embkern
from embkern.reference import hypercomplex as ref
from helpers import assert_same_bits, cpu_isa, cpu_threads

C = embkern._backends.cpu_module()
INFO = dict(C.isa_info())
LEVELS = list(INFO["available"])


@pytest.fixture
def at_level():
    """Yields a setter; restores the process's level afterwards."""
    before = C.isa_info()["active"]
    yield C.set_isa
    C.set_isa(before)


def _per_level(at_level, fn):
    out = {}
    for level in LEVELS:
        at_level(level)
        out[level] = fn()
    return out


def _bits(x):
    x = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return x.view(np.uint32 if x.dtype == np.float32 else np.uint64 if x.dtype == np.float64 else x.dtype)


def test_info_names_levels_and_env_var():
    assert INFO["env_var"] == "EMBKERN_CPU_ISA"
    # portable builds have every level up from generic; EMBKERN_ARCH=native builds have one, `native`
    assert INFO["compiled"] in (["native"], ["generic"], ["generic", "avx2", "avx512"]), INFO["compiled"]
    assert INFO["available"] and INFO["available"] == INFO["compiled"][:len(INFO["available"])]
    assert set(INFO["available"]) <= set(INFO["compiled"])
    if not os.environ.get("EMBKERN_CPU_ISA"):
        assert INFO["active"] == INFO["best"] == LEVELS[-1]
    from embkern._env import collect_info, format_info
    text = format_info(collect_info())
    assert "EMBKERN_CPU_ISA" in text and "active " + str(C.isa_info()["active"]) in text


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("score", ["inner", "distance"])
def test_hypercomplex_exact_at_every_level(at_level, dtype, score):
    g = torch.Generator().manual_seed(3)
    B, N, d = 70, 1003, 13  # crosses the 64-row query block and the 96-entity block
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    h, r, E = mk(B, 4 * d), mk(B, 4 * d), mk(N, 4 * d)
    bh, bt = (mk(B), mk(N)) if score == "distance" else (None, None)
    t = torch.randint(0, N, (B,), generator=g)
    filt = [torch.randint(0, N, (5,), generator=g).tolist() for _ in range(B)]
    kw = dict(score=score, bias_h=bh, bias_t=bt, backend="cpu")

    def run():
        q = embkern.hamilton_product(h, r, layout="interleaved", normalize=True, backend="cpu")
        S = embkern.score_all(h, r, E, **kw)
        ranks = embkern.rank_all(h, r, E, t, filter_index=filt, **kw)
        vals, ids = embkern.topk_all(h, r, E, 7, filter_index=filt, **kw)
        loss = embkern.one_to_n_loss(h, r, E, t, reduction="none", **kw)
        return q, S, ranks, vals, ids, loss

    res = _per_level(at_level, run)
    base = res[LEVELS[0]]
    assert torch.equal(base[0], ref.query(h, r, "quaternion", "interleaved", True))
    for level, got in res.items():
        for name, a, b in zip(("product", "scores", "ranks", "topk values", "topk ids"), got[:5], base[:5]):
            assert torch.equal(a, b), f"{name} at {level} differ from {LEVELS[0]}"
        # the loss uses a vectorised exp at avx2 and above: within the contract, not exact
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(got[5], base[5], rtol=tol, atol=tol)


def test_fde_exact_at_every_level(at_level):
    rng = np.random.default_rng(8)
    cfgs = [embkern.FDEConfig(dimension=64, num_repetitions=4, num_simhash_projections=4, seed=5,
                              encoding_type="document", fill_empty_partitions=True),
            embkern.FDEConfig(dimension=32, num_repetitions=3, num_simhash_projections=3, seed=9,
                              encoding_type="query", projection_type="ams_sketch", projection_dimension=8,
                              final_projection_dimension=300)]
    lens = rng.integers(0, 40, size=9)
    off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    for cfg in cfgs:
        X = rng.standard_normal((int(off[-1]), cfg.dimension)).astype(np.float32)
        res = _per_level(at_level, lambda: embkern.fde_encode(X, off, cfg, backend="cpu"))
        want = embkern.fde_encode(X, off, cfg, backend="reference")
        for level, got in res.items():
            np.testing.assert_array_equal(_bits(got), _bits(want), err_msg=f"FDE at {level}")


def test_set_isa_rejects_unknown_and_unbuilt_levels(at_level):
    with pytest.raises(ValueError, match="expected one of generic, avx2, avx512"):
        C.set_isa("sse9")
    missing = [lv for lv in ("generic", "avx2", "avx512", "native") if lv not in INFO["available"]]
    with pytest.raises(ValueError, match="isa: this (build has no|CPU cannot run)"):
        C.set_isa(missing[-1])


def _run_with_env(value, code):
    env = dict(os.environ, EMBKERN_CPU_ISA=value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


_CALL = ("import torch, embkern, embkern._C as C\n"
         "print('active', C.isa_info()['active'])\n"
         "embkern.hamilton_product(torch.randn(2, 8), torch.randn(2, 8), backend='cpu')\n"
         "print('ran')\n")


@pytest.mark.parametrize("level", LEVELS)
def test_env_var_forces_a_level(level):
    p = _run_with_env(level, _CALL)
    assert p.returncode == 0, p.stderr
    assert f"active {level}" in p.stdout and "ran" in p.stdout


def test_env_var_unknown_level_errors_at_first_use():
    p = _run_with_env("avx9000", _CALL)
    assert "active None" in p.stdout  # import and info still work
    assert p.returncode != 0 and "ran" not in p.stdout
    assert "ValueError: EMBKERN_CPU_ISA: expected one of generic, avx2, avx512, auto; got 'avx9000'" in p.stderr


def test_env_var_level_this_cpu_lacks_errors_at_first_use():
    lacking = [lv for lv in ("avx2", "avx512") if lv in INFO["compiled"] and lv not in INFO["available"]]
    if not lacking:
        pytest.skip(f"this CPU runs every compiled level ({', '.join(INFO['compiled'])})")
    p = _run_with_env(lacking[0], _CALL)
    assert p.returncode != 0 and f"EMBKERN_CPU_ISA={lacking[0]}: this CPU lacks" in p.stderr


def test_set_num_threads_bounds():
    before = C.get_num_threads()
    try:
        for bad in (0, -1, 10**6, 2**40):
            with pytest.raises(ValueError, match=r"num_threads: expected 1 <= num_threads <= \d+"):
                C.set_num_threads(bad)
        with pytest.raises(TypeError):
            C.set_num_threads(1.5)
        C.set_num_threads(1)
        assert C.get_num_threads() == 1
    finally:
        C.set_num_threads(before)


def test_kernels_share_torchs_openmp_runtime():
    """One thread pool per process: _C runs on the OpenMP runtime torch loaded."""
    rt = C.build_info()["openmp_runtime"]
    maps = [line.split()[-1] for line in open("/proc/self/maps") if "gomp" in line or "iomp" in line]
    if rt == "linked at build time":
        pytest.skip("this build links its own OpenMP library (EMBKERN_OPENMP=linked or not Linux/GCC)")
    assert rt in maps, (rt, maps)
    assert len(set(p for p in maps if "gomp" in p)) == 1, f"more than one libgomp loaded: {sorted(set(maps))}"
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert C.get_num_threads() == 1  # torch's setting reaches the embkern kernels
        C.set_num_threads(2)
        assert torch.get_num_threads() in (1, 2)  # torch keeps its own copy of the count
    finally:
        torch.set_num_threads(before)
        C.set_num_threads(before)


def test_openmp_runtime_override_and_clear_error():
    code = "import embkern._C as C; print(C.build_info()['openmp_runtime'])"
    p = _run_with_env_var("EMBKERN_OPENMP_LIB", "libgomp.so.1", code)
    if "linked at build time" in p.stdout:
        pytest.skip("this build links its own OpenMP library")
    assert p.returncode == 0 and p.stdout.strip() == "libgomp.so.1", p.stderr
    p = _run_with_env_var("EMBKERN_OPENMP_LIB", "/nonexistent/libgomp.so.1", code)
    assert p.returncode != 0
    assert "ImportError: embkern._C: EMBKERN_OPENMP_LIB=/nonexistent/libgomp.so.1 could not be loaded" in p.stderr


def _run_with_env_var(name, value, code):
    env = dict(os.environ, **{name: value})
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_same_bits_helper_catches_one_ulp_and_restores_settings():
    """helpers.assert_same_bits fails on one ulp, a dtype or a shape; cpu_isa / cpu_threads restore the
    settings active before them (not the best level), even when the block raises."""
    a = torch.linspace(0, 1, 7)
    b = a.clone()
    b[3] = torch.nextafter(b[3], torch.tensor(2.0))
    assert_same_bits({"x": (a, a.numpy()), "y": (a.clone(), a.numpy().copy())})
    for other in (b, a.double(), a[None]):
        with pytest.raises(AssertionError, match="x vs y: result 0 differs"):
            assert_same_bits({"x": [a], "y": [other]})
    with pytest.raises(AssertionError, match="result 1 differs"):
        assert_same_bits({"x": (a, a.numpy()), "y": (a, b.numpy())})
    level, threads = C.isa_info()["active"], C.get_num_threads()
    lowest = C.isa_info()["available"][0]
    with pytest.raises(RuntimeError, match="inside"):
        with cpu_isa(lowest), cpu_threads(threads + 1):
            assert C.isa_info()["active"] == lowest and C.get_num_threads() == threads + 1
            raise RuntimeError("inside")
    assert (C.isa_info()["active"], C.get_num_threads()) == (level, threads)
