"""What several test files share: backend parameters and the skip policy, data
builders, and the outside oracles (muvfde, PyKEEN).

Skip policy (one for the whole suite):

* the C++ CPU module is built by ``make test``: a missing cpu kernel is a
  failure, never a skip (:func:`require_backend`, :func:`cpu_module`);
* triton not installed, no GPU, or a dtype/device the backend does not claim in
  its op descriptor: a skip with the resolver's reason;
* an outside oracle that is not installed: a skip naming the package
  (:func:`oracle`), unless ``EMBKERN_TEST_STRICT=1`` (set by ``make test``,
  which installs them all), where it is a failure.

``TRITON_INTERPRET`` is set once, in conftest.py, before anything imports triton.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from typing import Any, Callable, Iterable, List, Optional, Sequence

import numpy as np

import pytest
import torch

from embkern import _backends, testing
from embkern.bench.timing import AtIsa

HAS_CUDA = torch.cuda.is_available()
STRICT = os.environ.get("EMBKERN_TEST_STRICT", "0") == "1"

leaf = testing.leaf


# --------------------------------------------------------------------------- backends


def backend_params(*names):
    """pytest params for backends, with the triton marker on 'triton' and the cuda marker on 'cuda'."""
    out = []
    for n in names:
        marks = [pytest.mark.triton] if n == "triton" else [pytest.mark.cuda] if n == "cuda" else []
        out.append(pytest.param(n, marks=marks, id=n))
    return out


def device_of(backend: str) -> str:
    """Where a backend's tensors live: Triton compiles for the GPU when one is present,
    else it runs on CPU tensors through the interpreter."""
    return "cuda" if backend in ("triton", "cuda") and HAS_CUDA else "cpu"


def require_backend(desc, kernel: str, backend: str, device, dtype) -> None:
    """Skip when the backend is legitimately absent here; fail otherwise (see the policy above)."""
    st = _backends.check(desc, backend, (kernel,), torch.device(device).type, dtype)
    if st.ok:
        return
    if backend == "triton" and not _backends._triton_import().ok:
        pytest.skip(st.reason)
    if backend == "cuda" and not HAS_CUDA:
        pytest.skip(st.reason)
    if desc.backends.get(backend) is None or "supports dtypes" in st.reason or "tensors, got" in st.reason:
        pytest.skip(st.reason)
    pytest.fail(f"backend {backend} unavailable: {st.reason}")


def cpu_module():
    """embkern._C, or a test failure saying why it did not import (never a skip)."""
    st = _backends.cpu_status()
    if not st.ok:
        pytest.fail(f"embkern._C is not available: {st.reason}")
    return _backends.cpu_module()


# --------------------------------------------------------------------------- process-wide cpu settings
#
# The ISA level and the thread count of embkern._C are process-wide. A test
# that changes one restores what was active before it, not the CPU's best
# level: `make test` runs the exactness files again under EMBKERN_CPU_ISA=avx2
# and generic, and a restore to "best" silently ran every later test of that
# process at avx512 (conftest's guard now fails a test that leaves either
# setting changed).

# cpu_isa(level): the block runs at that level, the active one is restored after
# (the context manager `bench --cpu-isa` uses).
cpu_isa = AtIsa


@contextlib.contextmanager
def cpu_threads(n: int):
    """Run the block with ``n`` OpenMP threads in embkern._C; the count before is restored after."""
    C = cpu_module()
    before = C.get_num_threads()
    C.set_num_threads(n)
    try:
        yield
    finally:
        C.set_num_threads(before)


def at_each(setting: Callable, values: Iterable, fn: Callable[[], Any]) -> dict:
    """{value: fn() run inside ``setting(value)``} (``setting`` is cpu_isa or cpu_threads)."""
    out = {}
    for value in values:
        with setting(value):
            out[value] = fn()
    return out


def _as_list(x) -> list:
    return list(x) if isinstance(x, (tuple, list)) else [x]


def assert_same_bits(results: dict) -> None:
    """Every entry of ``results`` (tensors, arrays, or tuples of them) equals the first one bit for bit."""
    (k0, first), *rest = results.items()
    for key, got in rest:
        a_all, b_all = _as_list(first), _as_list(got)
        assert len(a_all) == len(b_all), f"{k0} vs {key}: {len(a_all)} results vs {len(b_all)}"
        for i, (a, b) in enumerate(zip(a_all, b_all)):
            if isinstance(a, torch.Tensor):
                same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
            else:
                a, b = np.asarray(a), np.asarray(b)
                same = a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
            assert same, f"{k0} vs {key}: result {i} differs"


# --------------------------------------------------------------------------- data


def in_cache_buffer(t: torch.Tensor, capacity: int) -> torch.Tensor:
    """t (B, H, L, ...) as the slice [:, :, :L] of a (B, H, capacity, ...) buffer on t's device whose other
    rows are NaN, as a decode cache keeps it: a kernel that reads past a head's L rows shows it in its output."""
    buf = torch.full(t.shape[:2] + (capacity,) + t.shape[3:], float("nan"), dtype=t.dtype, device=t.device)
    buf[:, :, :t.shape[2]] = t
    return buf[:, :, :t.shape[2]]


def kg_triples(B: int, N: int, d: int, dtype=torch.float64, seed: int = 0, device="cpu"):
    """[h (B, 4d), r (B, 4d), E (N, 4d), bias_h (B,), bias_t (N,)]: standard normal draws
    in float64 from ``seed`` (the same values for every dtype), cast to dtype."""
    h, r, E = testing.randn((B, 4 * d), (B, 4 * d), (N, 4 * d), dtype=torch.float64, seed=seed)
    bh, bt = testing.randn((B,), (N,), dtype=torch.float64, seed=seed + 1)
    return [t.to(dtype=dtype, device=device) for t in (h, r, E, bh, bt)]


def filter_rows(B: int, N: int, g: torch.Generator, max_per_row: int = 3, dups: str = "repeat",
                targets: Optional[torch.Tensor] = None, dense_row: Optional[int] = None) -> List[torch.Tensor]:
    """Per-row known-tail lists for filtered ranking: up to ``max_per_row`` random ids per row,
    duplicated (``dups="repeat"``: every id twice; ``"first"``: the first id once more;
    ``"none"``), with the row's target appended to every third row (b % 3 == 1) when
    ``targets`` is given, and row ``dense_row`` filtering every 4th and 8th id (several
    per tile, duplicated; its target removed)."""
    rows = []
    for b in range(B):
        n = int(torch.randint(0, min(N, max_per_row) + 1, (1,), generator=g))
        f = torch.randint(0, N, (n,), generator=g)
        if dups == "repeat":
            f = f.repeat(2)
        elif dups == "first" and n:
            f = torch.cat([f, f[:1]])
        if targets is not None and b % 3 == 1:
            f = torch.cat([f, targets[b:b + 1].cpu()])
        rows.append(f)
    if dense_row is not None and B > dense_row:
        row = torch.cat([torch.arange(0, N, 4), torch.arange(0, N, 8)])
        if targets is not None:
            row = row[row != int(targets[dense_row])]
        rows[dense_row] = row
    return rows


def to_csr(rows: Sequence[torch.Tensor], device="cpu"):
    """(offsets (B+1,) int64, index (nnz,) int64) of per-row id lists."""
    off = torch.zeros(len(rows) + 1, dtype=torch.int64)
    if rows:
        off[1:] = torch.cumsum(torch.tensor([len(x) for x in rows]), 0)
    idx = torch.cat([torch.as_tensor(x, dtype=torch.int64) for x in rows]) if rows else torch.zeros(0, dtype=torch.int64)
    return off.to(device), idx.to(device)


# --------------------------------------------------------------------------- outside oracles

_ORACLES = {
    "muvfde": "muvfde (Google's MUVERA reference bindings; the `test` extra)",
    "pykeen": "pykeen (installed by `make test` without its dependencies; its data files and modules)",
    "transformers": "transformers (the `test` extra)",
    "gensim": "gensim (its test data; installed by `make test` without its dependencies)",
    "distributed": "dask[distributed] (the `distributed` extra, part of the `test` extra)",
    "dask": "dask[distributed] (the `distributed` extra, part of the `test` extra)",
}


def oracle(module: str):
    """Import an outside oracle (a module of a package in ``_ORACLES``): skip when it is
    missing, or fail under EMBKERN_TEST_STRICT=1, where `make test` installed it."""
    pkg = module.split(".")[0]
    what = _ORACLES.get(pkg, pkg)
    try:
        return importlib.import_module(module)
    except Exception as exc:  # ImportError, or a package whose import fails on a missing dependency
        why = f"outside oracle {module} is not importable ({type(exc).__name__}: {exc}); needs {what}"
        if STRICT:
            pytest.fail(why)
        pytest.skip(why, allow_module_level=True)  # called at module level by the test files
