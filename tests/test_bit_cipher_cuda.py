"""CUDA bit-cipher counting (src/cuda/bit_cipher.cu) against the CPU kernel, bit for bit.

Tests marked ``cuda`` need an NVIDIA GPU and skip without one. Three run on any
machine: the code-mask packing the kernel reads, the compiled boundary's
checks (where embkern._C_cuda is built; every call is rejected before a
pointer is used), and the CUDA source run on host threads (emulation).
"""

from __future__ import annotations

import importlib.util
import itertools
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import embkern
from embkern import _backends
from embkern.ops import _bit_cipher_cuda

_NO_GPU = "needs an NVIDIA GPU (torch.cuda.is_available() is False)"


def cuda_test(fn):
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason=_NO_GPU)(fn))


def corpus(V, N, seed):
    rng = np.random.default_rng(seed)
    lens = rng.choice([0, 1, 2, 5, 40, 300], size=N // 20 + 1)
    off = np.concatenate([[0], np.cumsum(lens)])
    off = off[off <= N]
    off = np.append(off, N) if off[-1] != N else off
    ids = np.minimum(rng.zipf(1.2, N) - 1, V - 1).astype(np.int64)
    return ids, off.astype(np.int64)


def test_code_mask_packing():
    codes = embkern.cipher_patterns(300, 70).numpy()
    m = _bit_cipher_cuda.code_mask(codes)
    assert m.shape == (300, 2) and m.dtype == np.uint64
    for t in (0, 5, 69, 70, 299):
        for j in range(70):
            assert ((int(m[t, j // 64]) >> (j % 64)) & 1) == codes[t, j]


GRID = list(itertools.product(["sum", "concat"], ["none", "inv", "cos2"], [True, False]))


@cuda_test
@pytest.mark.parametrize("mode,weight,noise", GRID, ids=str)
@pytest.mark.parametrize("window", [1, 5, 400])
def test_cuda_equals_cpu_bit_for_bit(mode, weight, noise, window):
    ids, off = corpus(300, 5000, seed=window)
    c = embkern.BitCipher.fit(ids, vocab_size=300, bits=70, noise=noise)  # b = 70: two mask words
    kw = dict(window=window, mode=mode, weight=weight)
    cpu = embkern.CooccurrenceCounts(c, backend="cpu", **kw).update(ids, off)
    gpu = embkern.CooccurrenceCounts(c, backend="cuda", **kw).update(ids, off)
    assert_same_words(gpu.A.cpu(), cpu.A)
    assert torch.equal(gpu.vectors(), cpu.vectors())


def assert_same_words(got, want):
    """Equal (V, nb, b + 2, 2) sums; else say how many words differ and where the first is (type, block,
    entry, lo/hi), which tells a wrong element from a wrong row or an unwritten array."""
    assert got.shape == want.shape, (got.shape, want.shape)
    bad = (got != want).nonzero()
    if len(bad):
        t, blk, e, w = bad[0].tolist()
        rows = torch.unique(bad[:, 0]).numel()
        raise AssertionError(f"{len(bad)} of {got.numel()} words differ, in {rows} of {got.shape[0]} types; first at "
                             f"type {t} block {blk} entry {e} word {w}: got {int(got[t, blk, e, w])}, "
                             f"want {int(want[t, blk, e, w])}; nonzero words got {int((got != 0).sum())}, "
                             f"want {int((want != 0).sum())}")


@cuda_test
def test_cuda_chunked_equals_one_pass():
    ids, off = corpus(500, 20_000, seed=3)
    c = embkern.BitCipher.fit(ids, vocab_size=500)
    one = embkern.CooccurrenceCounts(c, 5, backend="cuda").update(ids, off)
    seq = embkern.CooccurrenceCounts(c, 5, backend="cuda")
    cut = len(off) // 2
    seq.update(ids[:off[cut]], off[:cut + 1])
    seq.update(ids[off[cut]:], off[cut:] - off[cut])
    assert torch.equal(seq.A, one.A)
    cpu = embkern.CooccurrenceCounts(c, 5, backend="cpu").update(ids, off)
    assert torch.equal(one.A.cpu(), cpu.A)


@cuda_test
def test_cuda_empty_chunk():
    c = embkern.BitCipher.fit(np.array([0, 1, 1]), vocab_size=3)
    g = embkern.CooccurrenceCounts(c, 2, backend="cuda").update(np.zeros(0, dtype=np.int64), np.array([0, 0]))
    assert torch.count_nonzero(g.A) == 0


def test_binding_rechecks():
    cmod, why = _backends._load_cuda()
    if cmod is None:
        pytest.skip(why)
    mod = cmod.bit_cipher

    def view(ptr, numel, dtype):
        return mod.ArrayView(ptr, numel, dtype)

    base = dict(tokens=view(8, 10, "int32"), doc_offsets=view(8, 3, "int64"),
                doc_offsets_host=np.array([0, 4, 10], np.int64), code_mask=view(8, 5, "uint64"),
                wa=view(8, 15, "int64"), ws=None, wpad=view(8, 3, "int64"), deltas=view(8, 3, "int64"),
                deltas_host=np.array([-1, 0, 1], np.int64), concat=False, vocab_size=5, bits=4,
                A=view(8, 60, "int64"))

    def run(**change):
        mod.count(mod.Problem(**{**base, **change}), workspace=0, workspace_bytes=0, device=0, stream=0)

    cases = [
        (dict(doc_offsets_host=np.array([0, 5, 4], np.int64)), ValueError, "doc_offsets"),
        (dict(doc_offsets_host=np.array([0, 4, 9], np.int64)), ValueError, "doc_offsets"),
        (dict(doc_offsets=view(8, 2, "int64")), ValueError, "doc_offsets"),
        (dict(code_mask=view(8, 4, "uint64")), ValueError, "code_mask"),
        (dict(wa=view(8, 15, "float32")), TypeError, "wa"),
        (dict(wa=view(8, 15, "float64")), TypeError, "wa: expected dtype int64"),
        (dict(A=view(8, 59, "int64")), ValueError, "A"),
        (dict(A=view(8, 60, "float64")), TypeError, "A: expected dtype int64"),
        (dict(A=view(0, 60, "int64")), ValueError, "A: null data pointer"),
        (dict(deltas_host=np.array([-(1 << 41), 0, 1], np.int64)), ValueError, "deltas"),
        (dict(vocab_size=0), ValueError, "vocab_size"),
        (dict(concat=True), ValueError, "A"),
        (dict(tokens=None), ValueError, "tokens"),
    ]
    for change, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            run(**change)
    with pytest.raises(ValueError, match="numel"):
        view(1, -1, "int32")


@pytest.mark.slow
def test_cuda_source_on_host_emulation(tmp_path):
    """src/cuda/bit_cipher.cu's host code and kernels, on host threads with a host stand-in for CUB's sort,
    equal the CPU kernel word for word (benchmarks/gpu/bit_cipher_cuda_emulate.py): the kernels' logic is
    checked without a GPU; CUB, the device launch and the launcher's device buffers are not."""
    root = Path(__file__).resolve().parents[1]
    harness = root / "benchmarks" / "gpu" / "bit_cipher_cuda_emulate.py"
    if not harness.exists() or not (root / "src" / "cuda" / "bit_cipher.cu").exists():
        pytest.skip("needs the source tree (benchmarks/gpu/bit_cipher_cuda_emulate.py, src/cuda/bit_cipher.cu)")
    if shutil.which("g++") is None:
        pytest.skip("g++ not found")
    spec = importlib.util.spec_from_file_location("bit_cipher_cuda_emulate", harness)
    emu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(emu)
    try:
        lib = emu.build(str(tmp_path))
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"g++ cannot build the emulation (needs C++20 <barrier>): {exc}")
    rng = np.random.default_rng(7)
    for case in range(8):
        ok, desc = emu.run_case(lib, rng, case)
        assert ok, desc


def test_info_says_the_cuda_backend_is_unverified(monkeypatch):
    """Until a GPU run passes the bit-for-bit tests, `embkern info` says so where the backend is active."""
    from embkern.ops import bit_cipher as bc

    ok = _backends.Availability(True, "")
    monkeypatch.setattr(_backends, "check", lambda *a, **k: ok)
    rep = _backends.report(bc.DESCRIPTOR)
    assert rep["cuda"]["active"] == "yes" and "unverified" in rep["cuda"]["reason"]
    assert rep["cpu"]["reason"] == ""
