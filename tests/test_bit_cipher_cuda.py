"""CUDA bit-cipher counting (src/cuda/bit_cipher.cu) against the CPU kernel, bit for bit.

Tests marked ``cuda`` need an NVIDIA GPU and skip without one. Three run on any
machine: the code-mask packing the kernel reads, the compiled boundary's
checks (where embkern._C_cuda is built; every call is rejected before a
pointer is used), and the CUDA source run on host threads (emulation).
On a GPU, test_cuda_stages_equal_numpy reads the kernels' workspace back and
names the first stage (positions, sort, segments, counts) that goes wrong.
"""

from __future__ import annotations

import importlib.util
import itertools
import shutil
import subprocess
import sys
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


def assert_stage(stage, got, want, hint=""):
    """got == want element for element; else fail naming the stage, how many elements differ and the first
    (its index, both values and its neighbours), plus an optional hint."""
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        raise AssertionError(f"stage {stage}: shape {got.shape}, want {want.shape}{hint}")
    g, w = got.reshape(-1), want.reshape(-1)
    bad = np.flatnonzero(g != w)
    if len(bad):
        i = int(bad[0])
        at = tuple(int(k) for k in np.unravel_index(i, got.shape)) if got.ndim > 1 else i
        lo, hi = max(i - 3, 0), i + 4
        raise AssertionError(f"stage {stage}: {len(bad)} of {g.size} elements differ; first at index {at}: got "
                             f"{g[i]}, want {w[i]} (flat [{lo}:{hi}] got {g[lo:hi].tolist()}, want "
                             f"{w[lo:hi].tolist()}){hint}")


def workspace_array(buf, layout, name, count):
    """The int32 array `name` of a count() workspace copied to the host (uint8), `count` elements long."""
    at = int(layout[name])
    return buf[at:at + 4 * count].view(np.int32)


def cuda_counts(cipher, *args, **kw):
    """CooccurrenceCounts(backend="cuda"), whose one known warning is expected."""
    with pytest.warns(RuntimeWarning, match="unverified"):
        return embkern.CooccurrenceCounts(cipher, *args, backend="cuda", **kw)


def launch(g, ids, off, A, debug=None):
    """g's tables and `ids`, `off` through the launcher into A (on g's device), synchronised; a launch or
    kernel error fails as stage 'launch'."""
    dev = g.A.device
    tok = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int32)).to(dev)
    doff = torch.from_numpy(np.ascontiguousarray(off, dtype=np.int64)).to(dev)
    try:
        _bit_cipher_cuda.count(tok, doff, g._bit_offsets, g._wa, g._ws, g._wpad, g._deltas, A,
                               g.mode == "concat", debug=debug)
        torch.cuda.synchronize(dev)
    except Exception as exc:  # RuntimeError from the binding; torch's error type from the synchronise
        raise AssertionError(f"stage launch: {type(exc).__name__}: {exc}") from exc


@cuda_test
def test_cuda_stages_equal_numpy():
    """One case of the bit-for-bit grid (V 300, N 5000, b 70, window 5, sum, cos2, noise) through the launcher
    with its workspace handed back, checked stage by stage after a synchronise; it fails at the first wrong
    stage: the tables on the device, the layout, doc_of and pos (positions kernel), keys and spos (CUB's
    stable radix sort), the sort's inputs left unchanged, start and end (segments kernel), A (count kernel,
    against the cpu kernel), then the same chunk through CooccurrenceCounts.update (the op dispatch)."""
    V, N, b, window, mode, weight = 300, 5000, 70, 5, "sum", "cos2"
    ids, off = corpus(V, N, seed=window)
    c = embkern.BitCipher.fit(ids, vocab_size=V, bits=b, noise=True)
    cpu = embkern.CooccurrenceCounts(c, window, mode, weight, backend="cpu").update(ids, off)
    g = cuda_counts(c, window, mode, weight)
    dev = g.A.device
    index = dev.index if dev.index is not None else torch.cuda.current_device()

    # 0. the tables as the kernels read them (host -> device copies, the uint64 view of the mask)
    mask = g._bit_offsets.view(torch.int64).cpu().numpy().view(np.uint64)
    assert_stage("inputs: code mask (V, W) uint64", mask, _bit_cipher_cuda.code_mask(c.reference_cipher().codes))
    for name in ("_wa", "_ws", "_wpad", "_deltas"):
        assert_stage(f"inputs: {name[1:]}", getattr(g, name).cpu().numpy(), getattr(cpu, name).numpy())
    assert g._bit_offsets.dtype == torch.uint64 and g._bit_offsets.is_contiguous(), g._bit_offsets.dtype

    debug = {}
    launch(g, ids, off, g.A, debug)

    # 1. the layout: 256-byte aligned, disjoint, in the order of the header, inside the workspace
    L = debug["layout"]
    sizes = dict(pos=4 * N, keys=4 * N, spos=4 * N, doc_of=4 * N, start=4 * V, end=4 * V, cub=int(L["cub_bytes"]))
    at = 0
    for name, size in sizes.items():
        assert L[name] % 256 == 0 and L[name] >= at, f"stage layout: {name} at {L[name]} (after {at}): {L}"
        at = L[name] + size
    nbytes = _bit_cipher_cuda._mod().workspace_bytes(N, V, index)
    assert at <= L["total"] == nbytes <= debug["workspace"].numel(), \
        f"stage layout: ends at {at}, total {L['total']}, workspace_bytes {nbytes}, workspace " \
        f"{debug['workspace'].numel()} bytes: {L}"
    buf = debug["workspace"].cpu().numpy()
    arr = lambda name, n: workspace_array(buf, L, name, n)  # noqa: E731

    # 2. positions kernel: doc_of[i] = the document of position i; pos[i] = i (the sort's input values,
    #    which CUB must leave as they were)
    i = np.arange(N)
    assert_stage("positions: doc_of", arr("doc_of", N), np.searchsorted(off, i, side="right") - 1)
    assert_stage("positions: pos (the sort's input values; written by the positions kernel, read-only to CUB)",
                 arr("pos", N), i)

    # 3. CUB's stable radix sort of (tokens, pos) on bits [0, 9)
    order = np.argsort(ids, kind="stable")
    keys, spos = arr("keys", N), arr("spos", N)
    assert_stage("sort: keys (tokens in ascending order)", keys, ids[order])
    ok_perm = bool(np.array_equal(np.sort(spos), i))
    ok_pair = bool(ok_perm and np.array_equal(ids[spos], keys))
    assert_stage("sort: spos (stable argsort of tokens)", spos, order,
                 hint=f"; spos is a permutation of 0..N-1: {ok_perm}; tokens[spos] == keys: {ok_pair}")
    assert_stage("sort: tokens (the sort's input keys, read-only to CUB)", debug["tokens"].cpu().numpy(), ids)

    # 4. segments kernel: [start[t], end[t]) the run of type t in keys; 0, 0 for an absent type
    types = np.arange(V)
    present = np.bincount(ids, minlength=V) > 0
    want_start = np.where(present, np.searchsorted(ids[order], types, side="left"), 0)
    want_end = np.where(present, np.searchsorted(ids[order], types, side="right"), 0)
    assert_stage("segments: start", arr("start", V), want_start)
    assert_stage("segments: end", arr("end", V), want_end)

    # 5. count kernel: A against the cpu kernel (and, on a mismatch, which of the two the reference agrees with)
    got = g.A.cpu()
    try:
        assert_same_words(got, cpu.A)
    except AssertionError as exc:
        ref = embkern.CooccurrenceCounts(c, window, mode, weight, backend="reference").update(ids, off)
        raise AssertionError(f"stage counts (A): {exc}; the reference equals the cpu kernel: "
                             f"{torch.equal(ref.A, cpu.A)}, the cuda kernel: {torch.equal(ref.A, got)}") from None

    # 6. the same chunk through the public path (the custom op's dispatch to the launcher)
    op = cuda_counts(c, window, mode, weight).update(ids, off)
    try:
        assert_same_words(op.A.cpu(), got)
    except AssertionError as exc:
        raise AssertionError(f"stage op (CooccurrenceCounts.update vs the launcher): {exc}") from None


@cuda_test
def test_cuda_launcher_is_deterministic():
    """Two launches on fresh zero counts give the same words (one thread owns each element: no atomics)."""
    ids, off = corpus(300, 5000, seed=5)
    c = embkern.BitCipher.fit(ids, vocab_size=300, bits=70, noise=True)
    for mode in ("sum", "concat"):
        g = cuda_counts(c, 5, mode, "cos2")
        runs = []
        for _ in range(2):
            A = torch.zeros_like(g.A)
            launch(g, ids, off, A)
            runs.append(A.cpu())
        assert_same_words(runs[1], runs[0])


@cuda_test
def test_cuda_counts_warn_unverified_only():
    """CooccurrenceCounts(backend="cuda") raises nothing and warns only the known RuntimeWarning."""
    c = embkern.BitCipher.fit(np.array([0, 1, 1, 2]), vocab_size=3)
    torch.zeros(1, device="cuda")  # whatever torch says when CUDA starts is not the constructor's
    with pytest.warns(RuntimeWarning, match="unverified") as rec:
        g = embkern.CooccurrenceCounts(c, 2, backend="cuda")
    others = [f"{w.category.__name__}: {w.message}" for w in rec
              if not (issubclass(w.category, RuntimeWarning) and "unverified" in str(w.message))]
    assert not others, others
    assert g.backend == "cuda" and g.A.device.type == "cuda", (g.backend, g.A.device)


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


def valid_problem_fields(mod) -> dict:
    """The fields of a bit_cipher.Problem that passes every check of the binding (V = 5, b = 4, 10 tokens in
    two documents, window 1, sum mode): fake device addresses, so only the checks can run on it."""
    v = mod.ArrayView
    return dict(tokens=v(8, 10, "int32"), doc_offsets=v(8, 3, "int64"),
                doc_offsets_host=np.array([0, 4, 10], np.int64), code_mask=v(8, 5, "uint64"),
                wa=v(8, 15, "int64"), ws=None, wpad=v(8, 3, "int64"), deltas=v(8, 3, "int64"),
                deltas_host=np.array([-1, 0, 1], np.int64), concat=False, vocab_size=5, bits=4,
                A=v(8, 60, "int64"))


def test_binding_rechecks():
    cmod, why = _backends._load_cuda()
    if cmod is None:
        pytest.skip(why)
    mod = cmod.bit_cipher

    def view(ptr, numel, dtype):
        return mod.ArrayView(ptr, numel, dtype)

    base = valid_problem_fields(mod)

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
    for query in (mod.workspace_bytes, mod.workspace_layout):  # checked before any CUDA call
        for args, msg in [((-1, 5, 0), "num_tokens"), ((1 << 31, 5, 0), "num_tokens"), ((10, 0, 0), "vocab_size"),
                          ((10, 1 << 31, 0), "vocab_size")]:
            with pytest.raises(ValueError, match=msg):
                query(*args)


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


_VALID_CALL = """
import sys
sys.path.insert(0, sys.argv[1])
from embkern import _backends
from test_bit_cipher_cuda import valid_problem_fields
mod = _backends._load_cuda()[0].bit_cipher
try:
    mod.count(mod.Problem(**valid_problem_fields(mod)), workspace=8, workspace_bytes=1 << 20, device=0, stream=0)
except RuntimeError as exc:
    print("RuntimeError:", exc)
"""


def test_binding_passes_checks_then_calls_cuda_without_python():
    """A call that passes every check reaches the CUDA runtime with the GIL released. Without a device the
    runtime refuses cudaSetDevice, which must come back as a RuntimeError. The binding once converted the
    workspace address inside the release; pybind11 3 then calls PyErr_Occurred with no thread state and the
    process died (SIGSEGV) at the first launch of every GPU test. Run in a child process so a crash is a
    failure here, not the end of the test run."""
    cmod, why = _backends._load_cuda()
    if cmod is None:
        pytest.skip(why)
    if cmod.device_count()[0] > 0:
        pytest.skip("a CUDA device is visible: the call would launch on fake pointers; the cuda tests run this path")
    r = subprocess.run([sys.executable, "-c", _VALID_CALL, str(Path(__file__).resolve().parent)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, f"the child died (rc {r.returncode}): {r.stderr[-2000:]}"
    assert "RuntimeError:" in r.stdout and "cudaSetDevice" in r.stdout, r.stdout + r.stderr
