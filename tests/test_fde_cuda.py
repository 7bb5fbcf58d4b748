"""CUDA FDE encoder (src/cuda/fde.cu) against the CPU kernel and the reference.

The tests marked ``cuda`` need an NVIDIA GPU and the CUDA extension and skip
without them. Outputs are compared bit for bit (int32 views, so -0 vs +0
counts as a difference): the AMS projection and the final count sketch follow
the same float32 summation order as the CPU kernel, like the identity path.

Two tests run without a GPU: the compiled boundary's size checks (where
embkern._C_cuda is built), and ``test_cuda_source_on_host_emulation``, which
compiles src/cuda/fde.cu as C++ with host threads standing in for CUDA threads
(benchmarks/gpu/fde_cuda_emulate.py) and checks its kernels' logic against the
reference on every machine with g++ >= 11.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import embkern
from embkern import _backends
from embkern.reference import fde as ref

_NO_GPU = "needs an NVIDIA GPU (torch.cuda.is_available() is False)"


def cuda_test(fn):
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason=_NO_GPU)(fn))


@pytest.fixture(scope="module", autouse=True)
def _cuda_backend():
    if not torch.cuda.is_available():
        return
    st = _backends.cuda_status()
    if not st.ok:
        pytest.fail(f"a GPU is visible but the CUDA backend is unavailable: {st.reason}")
    if getattr(_backends.cuda_module(), "fde", None) is None or not hasattr(_backends.cuda_module().fde, "encode"):
        pytest.fail("embkern._C_cuda.fde.encode is missing from this build")


def _fde_cuda():
    from embkern.ops import _fde_cuda
    return _fde_cuda


def _bits(a) -> np.ndarray:
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    return np.ascontiguousarray(a, np.float32).view(np.int32)


def assert_bitwise(got, want, what: str) -> None:
    g, w = _bits(got), _bits(want)
    assert g.shape == w.shape, f"{what}: shape {g.shape} != {w.shape}"
    bad = np.argwhere(g != w)
    if len(bad):
        gf, wf = g.view(np.float32), w.view(np.float32)
        first = [tuple(int(v) for v in b) for b in bad[:4]]
        raise AssertionError(f"{what}: {len(bad)} of {g.size} values differ, first at {first}: "
                             f"got {[float(gf[b]) for b in first]}, want {[float(wf[b]) for b in first]}")


def _config(d, R, k, seed, doc, fill=False, ams_dp=None, final=None):
    return embkern.FDEConfig(dimension=d, num_repetitions=R, num_simhash_projections=k, seed=seed,
                             encoding_type="document" if doc else "query",
                             projection_type="ams_sketch" if ams_dp else "identity",
                             projection_dimension=ams_dp, fill_empty_partitions=fill,
                             final_projection_dimension=final)


def _ragged(rng, lengths, d, adversarial_g=None):
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    pts = rng.standard_normal((int(offsets[-1]), d)).astype(np.float32)
    if adversarial_g is not None and len(pts):
        # points orthogonal (in float64) to one hyperplane: the float32 dot is
        # rounding noise, so its sign depends on the summation order
        G = adversarial_g.astype(np.float64)
        for q in range(len(pts)):
            g = G[rng.integers(0, G.shape[0]), :, rng.integers(0, G.shape[2])]
            x = pts[q].astype(np.float64)
            pts[q] = (x - (x @ g) / (g @ g) * g).astype(np.float32)
    return pts, offsets


def _tables(cfg, device):
    """The random tables of cfg as the CUDA launcher takes them (from the numpy reference)."""
    t = ref.Tables(cfg)
    out = {"simhash": torch.from_numpy(np.ascontiguousarray(t.simhash)).to(device)}
    if t.ams_index is not None:
        out["ams_index"] = torch.from_numpy(np.ascontiguousarray(t.ams_index, np.int32)).to(device)
        out["ams_sign"] = torch.from_numpy(np.ascontiguousarray(t.ams_sign, np.float32)).to(device)
    if cfg.final_projection_dimension is not None:
        off, mem, sg = ref.count_sketch_csr(t.cs_bucket, t.cs_sign, cfg.final_projection_dimension)
        out["cs_bucket_offsets"] = torch.from_numpy(off).to(device)
        out["cs_bucket_members"] = torch.from_numpy(mem).to(device)
        out["cs_bucket_signs"] = torch.from_numpy(sg).to(device)
    return t, out


def _launch(cfg, pts, offsets, tables, **kw):
    return _fde_cuda().encode_cuda(
        pts, offsets, tables, num_repetitions=cfg.num_repetitions,
        num_simhash_projections=cfg.num_simhash_projections, projection_dim=cfg.projection_dim,
        is_document=cfg.is_document, fill_empty_partitions=bool(cfg.fill_empty_partitions),
        final_projection_dimension=cfg.final_projection_dimension, **kw)


# ---------------------------------------------------------------------------
# Random configurations: CUDA == CPU kernel == reference, bit for bit


def _random_case(seed):
    rng = np.random.default_rng(1000 + seed)
    d = int(rng.choice([3, 8, 17, 64, 128, 130, 700]))
    R = int(rng.integers(1, 6))
    k = int(rng.choice([0, 1, 2, 3, 4, 5, 6]))
    doc = bool(rng.integers(0, 2))
    fill = doc and bool(rng.integers(0, 2))
    ams_dp = int(rng.choice([1, 5, 8, 16])) if rng.integers(0, 3) == 0 else None
    final = int(rng.choice([1, 13, 256])) if rng.integers(0, 3) == 0 else None
    # lengths: 0 (empty), 1 (Eigen GEMV order), multiples of 8 and ragged rows
    lengths = [int(rng.choice([0, 1, 2, 7, 8, 13, 32, 57, 80, 101])) for _ in range(int(rng.integers(1, 9)))]
    cfg = _config(d, R, k, int(rng.integers(0, 2**32)), doc, fill, ams_dp, final)
    adv = ref.simhash_table(cfg.seed, d, k, R) if (k and rng.integers(0, 2)) else None
    pts, offsets = _ragged(rng, lengths, d, adv)
    return cfg, pts, offsets


@cuda_test
@pytest.mark.parametrize("seed", range(24))
def test_cuda_matches_cpu_and_reference(seed):
    cfg, pts, offsets = _random_case(seed)
    want_ref = ref.encode(pts, offsets, cfg)
    want_cpu = embkern.fde_encode(torch.from_numpy(pts), torch.from_numpy(offsets), cfg, backend="cpu")
    got = embkern.fde_encode(torch.from_numpy(pts).cuda(), torch.from_numpy(offsets).cuda(), cfg, backend="cuda")
    assert got.device.type == "cuda"
    assert_bitwise(got, want_cpu, f"cuda vs cpu {cfg}")
    assert_bitwise(got, want_ref, f"cuda vs reference {cfg}")


@cuda_test
def test_benchmark_shape_matches_cpu():
    """R20 k5 d128 document fill, 512 documents of 80 tokens (plus ragged ones)."""
    rng = np.random.default_rng(7)
    cfg = _config(128, 20, 5, 42, True, True)
    lengths = [80] * 500 + [int(v) for v in rng.integers(1, 200, 12)]
    pts, offsets = _ragged(rng, lengths, 128)
    want = embkern.fde_encode(torch.from_numpy(pts), torch.from_numpy(offsets), cfg, backend="cpu")
    got = embkern.fde_encode(torch.from_numpy(pts).cuda(), torch.from_numpy(offsets).cuda(), cfg, backend="cuda")
    assert_bitwise(got, want, "R20 k5 d128 fill")


# ---------------------------------------------------------------------------
# Test vectors (docs/ops/fde.md), encoded on the GPU


def _spec_points(n, d, salt):
    p = np.arange(n, dtype=np.uint64)[:, None]
    i = np.arange(d, dtype=np.uint64)[None, :]
    m = np.uint64(0xFFFFFFFF)
    h = (p * np.uint64(1000003) + i * np.uint64(7919) + np.uint64(salt * 104729)) & m
    h = (h * np.uint64(2654435761)) & m
    h ^= h >> np.uint64(16)
    return (((h % np.uint64(2001)).astype(np.float64) - 1000.0) / 1024.0).astype(np.float32)


SPEC = [  # id, n, d, salt, R, k, seed, doc, ams d_p, fill, final, len, sha256[:16], sum
    ("T1", 5, 8, 1, 2, 3, 1, False, None, False, None, 128, "3ee816214bfdeb9d", 6.13476562),
    ("T2", 5, 8, 1, 2, 3, 1, True, None, True, None, 128, "31ad306b47f06b32", 0.916015625),
    ("T3", 80, 128, 2, 20, 5, 42, True, None, True, None, 81920, "2bbbb17210401164", 938.041889),
    ("T4", 32, 128, 3, 20, 5, 42, False, None, False, None, 81920, "dfb8ea893a59bcbb", -771.894531),
    ("T5", 80, 128, 2, 20, 5, 42, True, 16, True, None, 10240, "0833a5c8e9a5d885", 109.329958),
    ("T6", 80, 128, 2, 40, 6, 42, True, None, True, 10240, 10240, "8cda679bd55ad5da", -71.6009776),
    ("T7", 32, 128, 3, 40, 6, 42, False, None, False, 10240, 10240, "b6b578c8fffe5411", 291.425781),
    ("T8", 3, 4, 4, 2, 0, 7, True, None, False, None, 8, "384661811ba03e63", 1.06380212),
]


@cuda_test
@pytest.mark.parametrize("case", SPEC, ids=[c[0] for c in SPEC])
def test_spec_vectors(case):
    _, n, d, salt, R, k, seed, doc, dp, fill, final, length, sha, total = case
    cfg = _config(d, R, k, seed, doc, fill, dp, final)
    pts = torch.from_numpy(_spec_points(n, d, salt)).cuda()
    out = embkern.fde_encode(pts, torch.tensor([0, n], dtype=torch.int64, device="cuda"), cfg, backend="cuda")
    v = out.cpu().numpy()[0]
    assert v.shape == (length,)
    assert hashlib.sha256(v.astype("<f4").tobytes()).hexdigest()[:16] == sha
    assert abs(float(v.astype(np.float64).sum()) - total) <= 1e-5 * max(1.0, abs(total))


def test_spec_points_generator():
    assert _spec_points(5, 8, 1)[0, :4].tolist() == [0.349609375, -0.390625, 0.8203125, -0.49609375]


# ---------------------------------------------------------------------------
# The launcher: every element written, chunking, streams, empty inputs


@cuda_test
@pytest.mark.parametrize("final", [None, 64])
@pytest.mark.parametrize("ams_dp", [None, 8])
def test_every_element_written_and_chunking_invariant(final, ams_dp):
    rng = np.random.default_rng(11)
    cfg = _config(40, 3, 4, 5, True, True, ams_dp, final)
    pts, offsets = _ragged(rng, [0, 9, 1, 33, 0, 70, 16], 40)
    t, tables = _tables(cfg, "cuda")
    want = ref.encode(pts, offsets, cfg, t)
    X, off = torch.from_numpy(pts).cuda(), torch.from_numpy(offsets).cuda()
    for budget in (1, 5000, 1 << 27):  # one document per chunk .. one chunk
        out = torch.full((len(offsets) - 1, cfg.output_dimension), float("nan"), device="cuda")
        got = _launch(cfg, X, off, tables, out=out, chunk_budget_bytes=budget)
        assert got.data_ptr() == out.data_ptr()
        assert not bool(torch.isnan(got).any()), f"unwritten outputs with chunk budget {budget}"
        assert_bitwise(got, want, f"chunk budget {budget}")


@cuda_test
def test_side_stream_and_cpu_offsets():
    rng = np.random.default_rng(12)
    cfg = _config(16, 2, 3, 9, False)
    pts, offsets = _ragged(rng, [5, 12, 3], 16)
    _, tables = _tables(cfg, "cuda")
    X = torch.from_numpy(pts).cuda()
    want = ref.encode(pts, offsets, cfg)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = _launch(cfg, X, torch.from_numpy(offsets), tables)  # CPU offsets are accepted
    torch.cuda.current_stream().wait_stream(s)
    assert_bitwise(got, want, "side stream")


@cuda_test
def test_non_contiguous_points_are_copied():
    rng = np.random.default_rng(13)
    cfg = _config(8, 2, 2, 3, True, True)
    pts, offsets = _ragged(rng, [4, 6], 8)
    wide = torch.zeros(pts.shape[0], 16, device="cuda")
    wide[:, ::2] = torch.from_numpy(pts).cuda()
    _, tables = _tables(cfg, "cuda")
    got = _launch(cfg, wide[:, ::2], torch.from_numpy(offsets).cuda(), tables)
    assert_bitwise(got, ref.encode(pts, offsets, cfg), "strided points")


@cuda_test
def test_empty_inputs():
    cfg = _config(8, 2, 3, 1, True, True, None, None)
    _, tables = _tables(cfg, "cuda")
    X = torch.zeros(0, 8, device="cuda")
    out = _launch(cfg, X, torch.zeros(1, dtype=torch.int64, device="cuda"), tables)
    assert out.shape == (0, cfg.output_dimension)
    out = _launch(cfg, X, torch.zeros(4, dtype=torch.int64, device="cuda"), tables)
    assert out.shape == (3, cfg.output_dimension)
    assert bool((out == 0).all()), "empty documents encode to zeros (docs/ops/fde.md edge cases)"
    cfg0 = _config(4, 2, 0, 7, True)  # k = 0: the reference divides 0 by 0 here
    _, t0 = _tables(cfg0, "cuda")
    out = _launch(cfg0, torch.zeros(0, 4, device="cuda"), torch.zeros(2, dtype=torch.int64, device="cuda"), t0)
    assert bool((out == 0).all())


# ---------------------------------------------------------------------------
# Bad input: ValueError / TypeError naming the argument, never a crash


def _bad_setup():
    cfg = _config(8, 2, 3, 1, True, False, 4, 16)
    rng = np.random.default_rng(3)
    pts, offsets = _ragged(rng, [3, 5], 8)
    _, tables = _tables(cfg, "cuda")
    return cfg, torch.from_numpy(pts).cuda(), torch.from_numpy(offsets).cuda(), tables


def _call(cfg, X, off, tables, **over):
    kw = dict(num_repetitions=cfg.num_repetitions, num_simhash_projections=cfg.num_simhash_projections,
              projection_dim=cfg.projection_dim, is_document=cfg.is_document,
              fill_empty_partitions=bool(cfg.fill_empty_partitions),
              final_projection_dimension=cfg.final_projection_dimension)
    kw.update(over)
    return _fde_cuda().encode_cuda(X, off, tables, **kw)


@cuda_test
def test_bad_inputs_name_the_argument():
    cfg, X, off, tables = _bad_setup()
    _call(cfg, X, off, tables)  # the baseline call is valid
    cases = [
        (dict(X=X.cpu()), ValueError, "points"),
        (dict(X=X.double()), TypeError, "points"),
        (dict(X=X[:, :5]), ValueError, "simhash"),
        (dict(off=off.int()), TypeError, "offsets"),
        (dict(off=torch.tensor([0, 5, 3], device="cuda")), ValueError, "offsets"),
        (dict(off=torch.tensor([0, 3, 7], device="cuda")), ValueError, "offsets"),
        (dict(off=torch.tensor([1, 3, 8], device="cuda")), ValueError, "offsets"),
        (dict(tables={k: v for k, v in tables.items() if k != "ams_sign"}), ValueError, "ams"),
        (dict(tables={**tables, "simhash": tables["simhash"][:1]}), ValueError, "simhash"),
        (dict(tables={**tables, "ams_index": tables["ams_index"] + 4}), ValueError, "ams_index"),
        (dict(tables={**tables, "cs_bucket_members": tables["cs_bucket_members"].flip(0)}), ValueError,
         "cs_bucket_members"),
        (dict(over=dict(is_document=False, fill_empty_partitions=True)), ValueError, "fill_empty_partitions"),
        (dict(over=dict(num_simhash_projections=31)), ValueError, "num_simhash_projections"),
        (dict(over=dict(final_projection_dimension=0)), ValueError, "final_projection_dimension"),
        (dict(over=dict(projection_dim=0)), ValueError, "projection_dim"),
    ]
    for change, exc, name in cases:
        args = dict(X=X, off=off, tables=tables, over={})
        args.update(change)
        with pytest.raises(exc, match=name):
            _call(cfg, args["X"], args["off"], args["tables"], **args["over"])
    # the encoder still works after the rejected calls
    assert_bitwise(_call(cfg, X, off, tables), _call(cfg, X, off, tables), "after bad inputs")


def test_binding_rechecks_sizes():
    """The compiled boundary re-checks what the Python launcher already checked.

    Host-only checks: runs wherever embkern._C_cuda is built, GPU or not (the
    pointers are never dereferenced: every call is rejected first).
    """
    cmod, why = _backends._load_cuda()
    if cmod is None:
        pytest.skip(why)
    mod = cmod.fde

    def view(ptr, numel, dtype):
        return mod.ArrayView(ptr, numel, dtype)

    base = dict(points=view(4096, 32, "float32"), num_points=4, dimension=8, offsets=view(0, 2, "int64"),
                offsets_host=np.array([0, 4], np.int64), num_repetitions=2, num_simhash_projections=3,
                projection_dim=8, is_document=True, fill_empty_partitions=False, simhash=view(1, 48, "float32"))

    def size(**change):
        return mod.workspace_size(mod.Problem(**{**base, **change}))

    with pytest.raises(ValueError, match="offsets"):  # null device offsets
        size()
    base["offsets"] = view(1, 2, "int64")
    with pytest.raises(ValueError, match="simhash"):
        size(simhash=view(1, 47, "float32"))
    with pytest.raises(ValueError, match="offsets"):
        size(offsets_host=np.array([0, 5], np.int64))
    with pytest.raises(TypeError, match="offsets_host"):
        size(offsets_host=np.array([0, 4], np.int32))
    with pytest.raises(ValueError, match="projection_dim"):
        size(projection_dim=4)
    with pytest.raises(ValueError, match="out"):
        mod.encode(mod.Problem(**base), out=view(0, 10, "float32"), workspace=view(0, 0, "uint8"), device=0,
                   stream=0)
    with pytest.raises(ValueError, match="numel"):
        view(1, -1, "float32")


@pytest.mark.slow
def test_cuda_source_on_host_emulation(tmp_path, monkeypatch):
    """The CUDA kernels' indexing, chunking, Eigen order, fill, AMS and count sketch, on host threads."""
    root = Path(__file__).resolve().parents[1]
    harness, source = root / "benchmarks" / "gpu" / "fde_cuda_emulate.py", root / "src" / "cuda" / "fde.cu"
    if not harness.exists() or not source.exists():
        pytest.skip("needs the source tree (benchmarks/gpu/fde_cuda_emulate.py, src/cuda/fde.cu)")
    if shutil.which("g++") is None:
        pytest.skip("g++ not found")
    spec = importlib.util.spec_from_file_location("fde_cuda_emulate", harness)
    emu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(emu)
    try:
        lib = emu.build(str(tmp_path), str(source))
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"g++ cannot build the emulation (needs C++20 <barrier>): {exc}")
    rng = np.random.default_rng(2024)
    results = []

    def run():
        for case in range(12):
            os.environ["EMU_SMS"] = str(1 + case % 4)  # launch geometry: rep / partition splits
            budget = (1, 4096, 128 << 20)[case % 3]  # one document per chunk .. one chunk
            results.append(emu.run_case(lib, ref, rng, case, budget))

    # A warp collective that not all 32 lanes reach would block the emulated
    # warp forever (on a GPU it is undefined behaviour): fail instead of hanging.
    monkeypatch.setenv("EMU_SMS", "1")
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=600)
    assert not worker.is_alive(), f"emulation stalled after {len(results)} cases (divergent warp collective?)"
    assert len(results) == 12, "emulation raised (see the thread's traceback above)"
    for ok, desc in results:
        assert ok, desc
