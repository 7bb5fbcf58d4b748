"""Size sweeps of hypercomplex 1-vs-all scoring and filtered ranking, per backend.

Grid (K = 4d = 400, fp32, quaternion inner score):
  modest (default): B in {32, 256, 2048} at N = 14,505 (FB15k-237), and
                    N in {1,000, 50,000} at B = 256;
  full (--sweep=full): every B in {32, 128, 512, 2048} x N in {1,000, 5,000, 14,505, 50,000}.
Each point times the embkern reference, every fast backend that runs on the
device, and ``torch.mm`` of the same GEMM (the floor); benchmarks of one point
share a pytest-benchmark group, so the report compares them directly.
``extra_info`` carries GFLOP/s (2BNK per call).
"""

import pytest
import torch

import embkern
from embkern import _backends
from embkern.ops import hypercomplex as hc_ops

from sweep import run_benchmark

K = 400
N_FILTER = 5
MODEST = [(32, 14_505), (256, 14_505), (2048, 14_505), (256, 1_000), (256, 50_000)]
FULL = [(b, n) for b in (32, 128, 512, 2048) for n in (1_000, 5_000, 14_505, 50_000)]
POINTS = [pytest.param(b, n, id=f"B{b}-N{n}") for b, n in MODEST] + [
    pytest.param(b, n, id=f"B{b}-N{n}", marks=pytest.mark.large) for b, n in FULL if (b, n) not in MODEST]


DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]
# per device: the embkern backends worth timing (Triton on CPU is the interpreter: not a benchmark)
BACKENDS = {"cpu": ("reference", "cpu"), "cuda": ("reference", "triton")}

_cache = {}


def _tensors(B, N, device):
    key = (B, N, device)
    if key not in _cache:
        _cache.clear()  # one point at a time: the largest holds ~0.1 GB of inputs
        g = torch.Generator().manual_seed(B * 100_003 + N)
        h = (torch.randn(B, K, generator=g) * 0.1).to(device)
        r = torch.randn(B, K, generator=g).to(device)
        E = (torch.randn(N, K, generator=g) * 0.1).to(device)
        t = torch.randint(0, N, (B,), generator=g).to(device)
        fo = torch.arange(0, (B + 1) * N_FILTER, N_FILTER, dtype=torch.int64).to(device)
        fi = torch.randint(0, N, (B * N_FILTER,), generator=g).to(device)
        _cache[key] = (h, r, E, t, fo, fi)
    return _cache[key]


def _run(benchmark, fn, device, B, N, group):
    flops = 2.0 * B * N * K
    # Big points run ~seconds per call on 2 cores: fewer rounds there.
    return run_benchmark(benchmark, fn, device, group=group, rounds=3 if flops > 4e9 else 7, work=flops / 1e9,
                         work_key="gflops_per_s", B=B, N=N, K=K, gflop=flops / 1e9)


def _need(backend, group, device):
    st = _backends.check(hc_ops.DESCRIPTOR, backend, hc_ops.DESCRIPTOR.kernels_of(group), device, torch.float32)
    if not st.ok:
        pytest.skip(f"{backend}: {st.reason}")


@pytest.mark.hypercomplex
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,N", POINTS)
@pytest.mark.parametrize("backend", ["reference", "fast", "torch.mm"])
def test_score_all(benchmark, backend, B, N, device):
    h, r, E, *_ = _tensors(B, N, device)
    if backend == "torch.mm":
        out = _run(benchmark, lambda: torch.mm(h, E.T), device, B, N, f"score_all {device} B={B} N={N}")
        assert out.shape == (B, N)
        return
    be = backend if backend == "reference" else BACKENDS[device][1]
    _need(be, "score_all", device)
    out = _run(benchmark, lambda: embkern.score_all(h, r, E, backend=be), device, B, N,
               f"score_all {device} B={B} N={N}")
    assert out.shape == (B, N) and bool(torch.isfinite(out).all())


@pytest.mark.hypercomplex
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,N", POINTS)
@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_rank_all_filtered(benchmark, backend, B, N, device):
    h, r, E, t, fo, fi = _tensors(B, N, device)
    be = backend if backend == "reference" else BACKENDS[device][1]
    _need(be, "rank_all", device)
    out = _run(benchmark, lambda: embkern.rank_all(h, r, E, t, (fo, fi), backend=be), device, B, N,
               f"rank_all {device} B={B} N={N}")
    # ranks are 1-based and at most N minus the filtered (realistic ties: halves)
    assert out.shape == (B,) and bool((out >= 1).all()) and bool((out <= N).all())
