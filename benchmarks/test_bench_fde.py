"""Size sweeps of MUVERA FDE document encoding (cpu backend; muvfde as the anchor).

Grid (d = 128 Gaussian points, R = 20, k = 5, identity projection, fill;
every document has the same number of points):
  modest (default): points per document n in {32, 64, 128, 256} at B = 256;
  full (--sweep=full): also B = 2048 for every n, and R = 40, k = 6 with the
                       final projection to 10,240 at B = 256.
Each point times embkern's cpu backend (OpenMP, current thread count) and,
when importable, ``muvfde`` (the reference C++, one document per call, one
thread) on the same documents; both share a pytest-benchmark group, so the
report compares them directly. ``extra_info`` carries documents/s and
points/s. Timings are recorded, never asserted; each benchmark checks its
output's shape and, on the first document, bit-equality with muvfde.
"""

import numpy as np
import pytest
import torch

import embkern
from embkern import _backends
from embkern.bench.fde import muvfde_config
from embkern.ops import fde as fde_ops

from sweep import run_benchmark

D = 128
TOKENS = (32, 64, 128, 256)
MODEST = [(n, 256, False) for n in TOKENS]
FULL = [(n, 2048, False) for n in TOKENS] + [(n, 256, True) for n in TOKENS]
POINTS = [pytest.param(n, b, f, id=f"n{n}-B{b}{'-final' if f else ''}") for n, b, f in MODEST] + [
    pytest.param(n, b, f, id=f"n{n}-B{b}{'-final' if f else ''}", marks=pytest.mark.large) for n, b, f in FULL]

_cache = {}


def _docs(n, B):
    key = (n, B)
    if key not in _cache:
        _cache.clear()  # one point at a time: the largest holds 2048 x 256 x 128 floats (268 MB)
        rng = np.random.default_rng(n * 100_003 + B)
        X = rng.standard_normal((B * n, D), dtype=np.float32)
        off = np.arange(0, (B + 1) * n, n, dtype=np.int64)
        _cache[key] = (X, off, [X[i * n:(i + 1) * n] for i in range(B)])
    return _cache[key]


def _config(final):
    if final:
        return embkern.FDEConfig(D, 40, 6, 42, "document", fill_empty_partitions=True,
                                 final_projection_dimension=10240)
    return embkern.FDEConfig(D, 20, 5, 42, "document", fill_empty_partitions=True)


def _run(benchmark, fn, n, B, final):
    # ~0.5-2 ms per document: a B = 2048 call takes seconds, so fewer rounds there
    rounds = 3 if B * n >= 2048 * 128 else 7
    out = run_benchmark(benchmark, fn, "cpu", group=f"fde documents n={n} B={B}{' final 10240' if final else ''}",
                        rounds=rounds, work=B, work_key="docs_per_s", points_per_doc=n, B=B, d=D, final=final)
    if benchmark.extra_info.get("docs_per_s"):
        benchmark.extra_info["points_per_s"] = benchmark.extra_info["docs_per_s"] * n
    return out


@pytest.mark.parametrize("n,B,final", POINTS)
def test_fde_documents_cpu(benchmark, n, B, final):
    st = _backends.check(fde_ops.DESCRIPTOR, "cpu", ("encode",), "cpu", torch.float32)
    if not st.ok:
        pytest.skip(f"cpu: {st.reason}")
    X, off, docs = _docs(n, B)
    c = _config(final)
    out = _run(benchmark, lambda: embkern.fde_encode(X, off, c, backend="cpu"), n, B, final)
    assert out.shape == (B, c.output_dimension) and out.dtype == np.float32
    try:
        import muvfde
    except ImportError:
        return
    want = np.asarray(muvfde.generate_fixed_dimensional_encoding(docs[0], muvfde_config(muvfde, c)))
    assert np.array_equal(out[0].view(np.uint32), want.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("n,B,final", POINTS)
def test_fde_documents_muvfde(benchmark, n, B, final):
    muvfde = pytest.importorskip("muvfde", reason="muvfde (the wrapped reference C++) is not installed")
    _, _, docs = _docs(n, B)
    c = _config(final)
    m = muvfde_config(muvfde, c)
    gen = muvfde.generate_fixed_dimensional_encoding
    out = _run(benchmark, lambda: [gen(x, m) for x in docs], n, B, final)
    assert len(out) == B and np.asarray(out[0]).shape == (c.output_dimension,)
