"""Lazy discovery of embkern's compiled and Triton backends.

Nothing here raises at import time. Every probe returns an ``Availability``:
whether the backend can run, and if not, why not (the text `embkern info`
prints and the error a user gets when they ask for that backend explicitly).

Backends:

* ``reference`` -- pure PyTorch, always available, any device, any dtype.
* ``cpu``       -- the C++ extension ``embkern._C`` (CPU tensors).
* ``triton``    -- ``embkern.triton_kernels`` on CUDA tensors, or on CPU
                   tensors when ``TRITON_INTERPRET=1`` (the interpreter; slow,
                   for testing, never chosen automatically).
* ``cuda``      -- the CUDA extension ``embkern._C_cuda`` (CUDA tensors).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:  # pragma: no cover - convenience
        return self.ok


@functools.lru_cache(maxsize=None)
def _load_cpu():
    try:
        return importlib.import_module("embkern._C"), ""
    except Exception as exc:  # ImportError, or a broken build
        return None, f"embkern._C failed to import ({type(exc).__name__}: {exc}); rebuild with `pip install .`"


@functools.lru_cache(maxsize=None)
def _load_cuda():
    try:
        mod = importlib.import_module("embkern._C_cuda")
    except Exception as exc:
        return None, (
            "embkern._C_cuda is not built (no CUDA compiler at build time, or EMBKERN_CUDA=OFF)"
            if isinstance(exc, ModuleNotFoundError)
            else f"embkern._C_cuda failed to import ({type(exc).__name__}: {exc})"
        )
    return mod, ""


def cpu_module():
    """The compiled CPU module, or raise RuntimeError saying why it is missing."""
    mod, why = _load_cpu()
    if mod is None:
        raise RuntimeError(why)
    return mod


def cuda_module():
    mod, why = _load_cuda()
    if mod is None:
        raise RuntimeError(why)
    return mod


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_import() -> Availability:
    if importlib.util.find_spec("triton") is None:
        return Availability(False, "triton is not installed (pip install 'embkern[test]' or triton)")
    try:
        importlib.import_module("triton")
    except Exception as exc:
        return Availability(False, f"triton failed to import ({type(exc).__name__}: {exc})")
    return Availability(True)


def cpu_status() -> Availability:
    mod, why = _load_cpu()
    return Availability(mod is not None, why)


def cuda_status() -> Availability:
    mod, why = _load_cuda()
    if mod is None:
        return Availability(False, why)
    n, err = mod.device_count()
    if n == 0:
        return Availability(False, f"no CUDA device visible ({err or 'device count is 0'})")
    return Availability(True)


def triton_status(device: Optional[torch.device] = None) -> Availability:
    imp = _triton_import()
    if not imp.ok:
        return imp
    dev_type = device.type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if dev_type == "cuda":
        if not torch.cuda.is_available():
            return Availability(False, "torch sees no CUDA device")
        return Availability(True)
    if dev_type == "cpu":
        if triton_interpret():
            return Availability(True, "interpreter mode (TRITON_INTERPRET=1): correct but slow")
        return Availability(False, "CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)")
    return Availability(False, f"device type {dev_type!r} is not supported by Triton")


def status(backend: str, device: Optional[torch.device] = None) -> Availability:
    if backend == "reference":
        return Availability(True)
    if backend == "cpu":
        if device is not None and device.type != "cpu":
            return Availability(False, f"the C++ CPU kernels take CPU tensors, got device {device}")
        return cpu_status()
    if backend == "cuda":
        if device is not None and device.type != "cuda":
            return Availability(False, f"the CUDA kernels take CUDA tensors, got device {device}")
        return cuda_status()
    if backend == "triton":
        return triton_status(device)
    return Availability(False, f"unknown backend {backend!r}; expected one of {BACKENDS}")


# ---------------------------------------------------------------------------
# Backend resolution shared by every op


@dataclass(frozen=True)
class OpSupport:
    """What one backend of one op supports, beyond the backend being loaded."""

    dtypes: frozenset
    devices: frozenset  # device types: "cpu", "cuda"
    # name of the attribute in the compiled module (cpu/cuda backends), or of
    # the Triton launcher module; None = implemented in Python.
    symbol: Optional[str] = None
    note: str = ""


def _has_symbol(backend: str, symbol: Optional[str]) -> Availability:
    if symbol is None:
        return Availability(True)
    if backend in ("cpu", "cuda"):
        mod, why = (_load_cpu() if backend == "cpu" else _load_cuda())
        if mod is None:
            return Availability(False, why)
        obj = mod
        for part in symbol.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                return Availability(False, f"{backend} kernel {symbol!r} is not implemented in this build")
        return Availability(True)
    if backend == "triton":
        modname, _, fn = symbol.rpartition(".")
        try:
            mod = importlib.import_module(f"embkern.triton_kernels.{modname}")
        except Exception as exc:
            return Availability(False, f"embkern.triton_kernels.{modname} failed to import ({exc})")
        if not hasattr(mod, fn):
            return Availability(False, f"Triton kernel {symbol!r} is not implemented")
        return Availability(True)
    return Availability(True)


def check(op: str, backend: str, support: dict, device: torch.device, dtype: torch.dtype) -> Availability:
    """Can `backend` run `op` on tensors of this device and dtype?"""
    if backend not in BACKENDS:
        return Availability(False, f"unknown backend {backend!r}; expected one of {BACKENDS}")
    spec: Optional[OpSupport] = support.get(backend)
    if spec is None:
        return Availability(False, f"{op} has no {backend} kernel")
    if device.type not in spec.devices:
        return Availability(False, f"{backend} runs {op} on {sorted(spec.devices)} tensors, got {device.type}")
    if dtype not in spec.dtypes:
        names = ", ".join(sorted(str(d).replace("torch.", "") for d in spec.dtypes))
        return Availability(False, f"{backend} supports dtypes {{{names}}} for {op}, got {str(dtype).replace('torch.', '')}")
    st = status(backend, device)
    if not st.ok:
        return st
    return _has_symbol(backend, spec.symbol)


def auto_order(device: torch.device) -> Sequence[str]:
    # Triton on CPU (the interpreter) is a testing tool, never an automatic choice.
    if device.type == "cuda":
        return ("cuda", "triton", "reference")
    return ("cpu", "reference")


def resolve(op: str, backend: Optional[str], support: dict, device: torch.device, dtype: torch.dtype) -> str:
    """Pick the backend for one call, or raise saying why each was rejected."""
    if backend is not None:
        if not isinstance(backend, str):
            raise TypeError(f"backend: expected None or one of {BACKENDS}, got {type(backend).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected None or one of {BACKENDS}, got {backend!r}")
        st = check(op, backend, support, device, dtype)
        if not st.ok:
            raise RuntimeError(f"embkern.{op}: backend={backend!r} is unavailable: {st.reason}")
        return backend
    rejected = []
    for name in auto_order(device):
        st = check(op, name, support, device, dtype)
        if st.ok:
            return name
        rejected.append(f"{name}: {st.reason}")
    raise RuntimeError(f"embkern.{op}: no backend can run on {device} {dtype}; rejected " + "; ".join(rejected))


def available(op: str, support: dict, devices: Iterable[str] = ("cpu", "cuda")) -> dict:
    """For `embkern info`: backend -> Availability on its natural device, fp32."""
    out = {}
    for name in BACKENDS:
        spec = support.get(name)
        if spec is None:
            out[name] = Availability(False, "no kernel for this op")
            continue
        dev = "cuda" if name in ("cuda",) or (name == "triton" and not triton_interpret()) else "cpu"
        if name == "reference":
            dev = "cpu"
        out[name] = check(op, name, support, torch.device(dev), torch.float32)
    return out


@functools.lru_cache(maxsize=4096)
def _resolve_many_cached(public: str, kernels: tuple, support_fn, backend: Optional[str], device_type: str,
                         dtype: torch.dtype) -> str:
    device = torch.device(device_type)
    if backend is not None:
        for k in kernels:
            resolve(f"{public} ({k})", backend, support_fn(k), device, dtype)
        return backend
    rejected = []
    for name in auto_order(device):
        bad = [f"{k}: {st.reason}" for k in kernels
               for st in [check(k, name, support_fn(k), device, dtype)] if not st.ok]
        if not bad:
            return name
        rejected.append(f"{name} ({bad[0]})")
    raise RuntimeError(f"embkern.{public}: no backend can run on {device_type} {dtype}; rejected " + "; ".join(rejected))


@torch.compiler.assume_constant_result
def resolve_many(public: str, kernels: tuple, support_fn, backend: Optional[str], device_type: str,
                 dtype: torch.dtype) -> str:
    """The backend for a call that needs every kernel in `kernels` (each looked up with
    support_fn(kernel)); raise naming each rejected backend and why.

    Cached per (call, device type, dtype) and constant under torch.compile: the
    answer depends only on what is installed, which does not change in a process
    (TRITON_INTERPRET is read once, before triton is imported).
    """
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend: expected None or one of {BACKENDS}, got {type(backend).__name__}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend: expected None or one of {BACKENDS}, got {backend!r}")
    return _resolve_many_cached(public, kernels, support_fn, backend, device_type, dtype)
