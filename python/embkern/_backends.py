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
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

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
# The op protocol: one descriptor per op, one resolver for every op


@dataclass(frozen=True)
class BackendSupport:
    """What one backend of one op supports, beyond the backend being loaded.

    ``symbol`` is a template with ``{kernel}``: the attribute path in the
    compiled module (cpu/cuda, e.g. ``"hypercomplex.{kernel}"``) or
    ``"<module>.{kernel}"`` in ``embkern.triton_kernels``; None means the
    backend is implemented in Python. ``kernels`` names the kernels this
    backend implements (None: all of the op's kernels).
    """

    dtypes: frozenset
    devices: frozenset  # device types: "cpu", "cuda"
    symbol: Optional[str] = None
    kernels: Optional[frozenset] = None
    note: str = ""


@dataclass(frozen=True, eq=False)  # hashed by identity: one descriptor object per op, usable as a cache key
class OpDescriptor:
    """Everything the resolver, ``embkern info`` and the bench need to know about one op.

    name:        the op's file stem ("hypercomplex", "fde", ...).
    kernels:     the kernel names every backend may implement.
    backends:    backend name -> :class:`BackendSupport`.
    entry_points: public function name -> the kernels one call of it needs (a
                 backend serves the call only if it implements all of them).
    """

    name: str
    kernels: Tuple[str, ...]
    backends: Mapping[str, BackendSupport]
    entry_points: Mapping[str, Tuple[str, ...]] = field(default_factory=dict)

    def symbol(self, backend: str, kernel: str) -> Optional[str]:
        spec = self.backends.get(backend)
        return None if spec is None or spec.symbol is None else spec.symbol.format(kernel=kernel)

    def kernels_of(self, entry: str) -> Tuple[str, ...]:
        try:
            return tuple(self.entry_points[entry])
        except KeyError:
            raise KeyError(f"{self.name}: no entry point {entry!r}; known: {sorted(self.entry_points)}") from None


def _dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def _missing_symbols(desc: OpDescriptor, backend: str, kernels: Sequence[str]) -> List[str]:
    """Why each of `kernels` is missing from a loaded backend (empty: all present)."""
    spec = desc.backends[backend]
    out = []
    for k in kernels:
        if spec.kernels is not None and k not in spec.kernels:
            out.append(f"{desc.name} has no {backend} kernel {k!r}")
            continue
        symbol = desc.symbol(backend, k)
        if symbol is None:
            continue
        if backend in ("cpu", "cuda"):
            mod, why = (_load_cpu() if backend == "cpu" else _load_cuda())
            if mod is None:
                return [why]
            obj = mod
            for part in symbol.split("."):
                obj = getattr(obj, part, None)
                if obj is None:
                    break
            if obj is None:
                out.append(f"{backend} kernel {symbol!r} is not implemented in this build")
        elif backend == "triton":
            modname, _, fn = symbol.rpartition(".")
            try:
                mod = importlib.import_module(f"embkern.triton_kernels.{modname}")
            except Exception as exc:
                return [f"embkern.triton_kernels.{modname} failed to import ({type(exc).__name__}: {exc})"]
            if not hasattr(mod, fn):
                out.append(f"Triton kernel {symbol!r} is not implemented")
    return out


def check(desc: OpDescriptor, backend: str, kernels: Sequence[str], device_type: str,
          dtype: torch.dtype) -> Availability:
    """Can `backend` run every kernel in `kernels` of this op on tensors of this device type and
    dtype? On no, ``reason`` gives every reason, joined by "; "."""
    if backend not in BACKENDS:
        return Availability(False, f"unknown backend {backend!r}; expected one of {BACKENDS}")
    spec = desc.backends.get(backend)
    if spec is None:
        return Availability(False, f"{desc.name} has no {backend} kernels")
    reasons = []
    if device_type not in spec.devices:
        reasons.append(f"runs on {sorted(spec.devices)} tensors, got {device_type}")
    if dtype not in spec.dtypes:
        names = ", ".join(sorted(_dtype_name(d) for d in spec.dtypes))
        reasons.append(f"supports dtypes {{{names}}}, got {_dtype_name(dtype)}")
    st = status(backend, torch.device(device_type)) if device_type in ("cpu", "cuda") else \
        Availability(False, f"device type {device_type!r} is not supported")
    if not st.ok:
        reasons.append(st.reason)
    elif backend != "reference":
        reasons.extend(_missing_symbols(desc, backend, kernels))
    if reasons:
        return Availability(False, "; ".join(dict.fromkeys(reasons)))
    return Availability(True, st.reason)


def auto_order(device_type: str) -> Sequence[str]:
    # Triton on CPU (the interpreter) is a testing tool, never an automatic choice.
    if device_type == "cuda":
        return ("cuda", "triton", "reference")
    return ("cpu", "reference")


def check_backend_arg(backend) -> Optional[str]:
    """The ``backend=`` argument every public function takes: None or one of BACKENDS."""
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend: expected None or one of {BACKENDS}, got {type(backend).__name__}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend: expected None or one of {BACKENDS}, got {backend!r}")
    return backend


@functools.lru_cache(maxsize=4096)
def _resolve_cached(desc: OpDescriptor, entry: str, backend: Optional[str], device_type: str,
                    dtype: torch.dtype) -> str:
    kernels = desc.kernels_of(entry)
    if device_type == "meta":
        # Shapes only: the ops' fake kernels (and the reference's torch ops) run on meta tensors, whatever
        # the backend asked for, as torch's own ops do (model init on "meta", shape propagation)
        return "reference"
    if backend is not None:
        st = check(desc, backend, kernels, device_type, dtype)
        if not st.ok:
            raise RuntimeError(f"embkern.{entry}: backend={backend!r} is unavailable for {device_type} "
                               f"{_dtype_name(dtype)} tensors: {st.reason}")
        return backend
    order = auto_order(device_type)
    rejected = []
    for name in order:
        st = check(desc, name, kernels, device_type, dtype)
        if st.ok:
            return name
        rejected.append(f"{name}: {st.reason}")
    for name in BACKENDS:  # the backends never chosen automatically, for a complete picture
        if name not in order:
            st = check(desc, name, kernels, device_type, dtype)
            rejected.append(f"{name}: " + (st.reason if not st.ok else f"not chosen automatically; pass "
                                           f"backend={name!r}"))
    raise RuntimeError(f"embkern.{entry}: no backend can run on {device_type} {_dtype_name(dtype)} tensors; "
                       "rejected " + " | ".join(rejected))


@torch.compiler.assume_constant_result
def resolve(desc: OpDescriptor, entry: str, backend: Optional[str], device_type: str,
            dtype: torch.dtype) -> str:
    """The backend that runs one call of the public function `entry` of op `desc`.

    A backend qualifies only if it implements every kernel the call needs
    (``desc.entry_points[entry]``) for this device type and dtype. With
    ``backend`` given, that one or a RuntimeError saying every reason it cannot;
    with None, the first of :func:`auto_order` that qualifies, or a RuntimeError
    listing every rejected backend with every reason.

    Cached per (op, call, backend, device type, dtype) and constant under
    torch.compile: the answer depends only on what is installed, which does not
    change in a process (TRITON_INTERPRET is read once, before triton is imported).
    """
    return _resolve_cached(desc, entry, check_backend_arg(backend), device_type, dtype)


def _natural_device(backend: str) -> str:
    if backend == "cuda" or (backend == "triton" and not triton_interpret()):
        return "cuda"
    return "cpu"


def report(desc: OpDescriptor) -> Dict[str, Any]:
    """For `embkern info`: {backend: {"active": "yes"|"no"|"partial", "reason": str,
    "kernels": {kernel: [ok, reason]}}}, each backend on its natural device, fp32."""
    out: Dict[str, Any] = {}
    for be in BACKENDS:
        dev = _natural_device(be)
        ks = {}
        for k in desc.kernels:
            st = check(desc, be, (k,), dev, torch.float32)
            ks[k] = [bool(st.ok), st.reason]
        n_ok = sum(ok for ok, _ in ks.values())
        if n_ok == len(ks):
            active = "yes"
            reason = "; ".join(sorted({r for _, r in ks.values() if r} | ({desc.backends[be].note} - {""}
                                                                         if be in desc.backends else set())))
        elif n_ok == 0:
            active = "no"
            reasons = list(dict.fromkeys(r for _, r in ks.values()))
            reason = reasons[0] if len(reasons) == 1 else f"0/{len(ks)} kernels available; first: {reasons[0]}"
        else:
            active = "partial"
            missing = [k for k, (ok, _) in ks.items() if not ok]
            reason = f"{n_ok}/{len(ks)} kernels; missing {', '.join(missing)}"
        out[be] = {"active": active, "reason": reason, "kernels": ks}
    return out


def route(op, implementations: Mapping[str, Any], pre: Optional[Callable] = None, adapt: Optional[Callable] = None):
    """Register the cpu and cuda kernels of a torch.library op whose last argument is the
    resolved backend name: the call runs ``implementations[backend]``.

    implementations: backend -> callable, or ``"module:attribute"`` imported on first use
        (so that importing embkern never imports triton).
    pre:   ``pre(*args)`` runs first on every backend (a value check they all share).
    adapt: ``adapt(*args) -> args`` turns the op's flat schema arguments into the
        implementation's (e.g. rebuild a config object).
    """
    resolved: Dict[str, Callable] = {}

    def impl(backend: str) -> Callable:
        fn = resolved.get(backend)
        if fn is None:
            target = implementations.get(backend)
            if target is None:
                raise RuntimeError(f"{op}: no {backend!r} implementation")
            if isinstance(target, str):
                modname, _, attr = target.partition(":")
                target = getattr(importlib.import_module(modname), attr)
            fn = resolved[backend] = target
        return fn

    def body(*args):
        *rest, backend = args
        if pre is not None:
            pre(*rest)
        if adapt is not None:
            rest = adapt(*rest)
        return impl(backend)(*rest)

    op.register_kernel("cpu")(body)
    op.register_kernel("cuda")(body)
    return body
