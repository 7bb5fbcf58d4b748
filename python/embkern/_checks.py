"""Input validation shared by the public functions.

Every check raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong
shape, range, device or value) naming the argument, what was expected and what
was given, before any kernel runs.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTS = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _dt(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def float_tensor(x, name: str, ndim: Optional[int] = None) -> torch.Tensor:
    tensor(x, name)
    if x.dtype not in FLOATS:
        raise TypeError(f"{name}: expected a floating tensor ({', '.join(map(_dt, FLOATS))}), got {_dt(x.dtype)}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d tensor, got shape {tuple(x.shape)}")
    return x


def int_tensor(x, name: str, ndim: Optional[int] = None) -> torch.Tensor:
    tensor(x, name)
    if x.dtype not in INTS:
        raise TypeError(f"{name}: expected an integer tensor, got {_dt(x.dtype)}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d tensor, got shape {tuple(x.shape)}")
    return x


def choice(value, name: str, options: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name}: expected one of {tuple(options)}, got {value!r}")
    return value


def same_device(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_b}: expected device {a.device} (the device of {name_a}), got {b.device}")


def same_dtype(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.dtype != b.dtype:
        raise TypeError(f"{name_b}: expected dtype {_dt(a.dtype)} (the dtype of {name_a}), got {_dt(b.dtype)}")


def _data_checks_off() -> bool:
    # Value-dependent checks (ranges, NaN, CSR monotonicity) would force a graph
    # break under torch.compile; there the public functions route the same
    # checks through the ``embkern::check_*`` ops below, whose bodies run them
    # on the real tensors when the compiled graph executes.
    return torch.compiler.is_compiling()


def no_values(x: torch.Tensor) -> bool:
    """True for a meta tensor: shapes only, so the value checks (ranges, NaN, CSR order) have nothing to
    read; the shape-only ops run their fake kernels on it, as torch's own ops do."""
    return x.device.type == "meta"


def _range_error(x: torch.Tensor, name: str, upper: int) -> None:
    if x.numel() == 0 or no_values(x):
        return
    lo, hi = int(x.min()), int(x.max())
    if lo < 0 or hi >= upper:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name}: expected indices in [0, {upper}), got {bad}")


def index_range(x: torch.Tensor, name: str, upper: int) -> None:
    """Eager range check (skipped while tracing; use :func:`ids` where compiled calls must check too)."""
    if x.numel() == 0 or _data_checks_off():
        return
    _range_error(x, name, upper)


def all_finite(x: torch.Tensor) -> bool:
    """True when no element of ``x`` is NaN or +-inf (True for integer and empty tensors).

    One ``aminmax`` reduction (NaN propagates into both results, an infinity
    is the min or the max): no bool tensor of x's size is written. On a
    (4, 8, 4096) fp32 temperature it takes ~15 us against ~140 us for
    ``isfinite(x).all()`` (2 threads; ~6% of an SSA decode step at that size).
    """
    if x.numel() == 0 or not x.is_floating_point() or no_values(x):
        return True
    # An expanded view repeats its stored elements: index 0 of every stride-0 dim reads each of them
    # once (a (2^28, 2, 1024) view of one value would otherwise be reduced, or copied, in full).
    if 0 in x.stride():
        x = x[tuple(0 if st == 0 else slice(None) for st in x.stride())]
    try:
        lo, hi = torch.aminmax(x.detach())
    except (RuntimeError, NotImplementedError):  # a dtype without aminmax (float8 kinds)
        return bool(torch.isfinite(x).all())
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def finite(x: torch.Tensor, name: str) -> None:
    if not _data_checks_off() and not all_finite(x):
        raise ValueError(f"{name}: expected finite values, found NaN or inf")


def positive_int(value, name: str, minimum: int = 1) -> int:
    """An int (numpy integers too, bool never) >= ``minimum``: chunk and batch sizes."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {int(value)}")
    return int(value)


def positive_float(value, name: str, what: str = "a finite float > 0") -> float:
    """A finite real > 0 (Python or numpy ints and floats; bool never): scales, epsilons."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name}: expected {what}, got {value!r}")
    if not math.isfinite(float(value)) or not value > 0:
        raise ValueError(f"{name}: expected {what}, got {value!r}")
    return float(value)


def integer(value, name: str) -> int:
    """A Python or numpy integer (bool never): sizes such as top-k's k."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    return int(value)


def array_or_tensor(x, name: str) -> Tuple[torch.Tensor, bool]:
    """(tensor, came_from_numpy) for a numpy array (shared, no copy when contiguous) or a CPU/CUDA tensor."""
    if isinstance(x, torch.Tensor):
        return real_device(x, name), False
    if isinstance(x, np.ndarray):
        if x.dtype == object:
            raise TypeError(f"{name}: expected a numeric array, got dtype object")
        return torch.from_numpy(np.ascontiguousarray(x)), True
    raise TypeError(f"{name}: expected a numpy array or torch.Tensor, got {type(x).__name__}")


_WIDE_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)


def integer_array(x, name: str, what: str = "an integer array") -> torch.Tensor:
    """A tensor of integers from a tensor, numpy array or (nested) list; floats and bools are a TypeError.

    An empty list is an empty int64 array (``torch.as_tensor([])`` would say float32). uint16 / uint32 /
    uint64 arrays (numpy ids often are) come back as int64: torch has no min / max / compare on those
    dtypes, so every range check downstream would fail with a NotImplementedError; a uint64 value
    >= 2^63 is a ValueError naming ``name``."""
    if isinstance(x, (list, tuple)):
        t = torch.as_tensor(x)
        if t.numel() == 0 and t.dtype.is_floating_point:
            t = t.to(torch.int64)
    else:
        t = array_or_tensor(x, name)[0]
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name}: expected {what}, got {_dt(t.dtype)}")
    if t.dtype in _WIDE_UNSIGNED:
        if t.dtype == torch.uint64 and t.numel():
            hi = int(t.cpu().numpy().max())
            if hi > np.iinfo(np.int64).max:
                raise ValueError(f"{name}: expected values below 2^63 (int64), got {hi}")
        t = t.to(torch.int64)
    return t


def offsets_array(o, name: str, total: int, device) -> torch.Tensor:
    """CSR row offsets (B+1,) as int64 on ``device``: from 0, non-decreasing, ending at ``total``
    (checked in eager mode, and by an op in compiled graphs)."""
    o = integer_array(o, name)
    if o.dim() != 1 or o.numel() < 1:
        raise ValueError(f"{name}: expected a 1-d (B+1,) array with B+1 >= 1, got shape {tuple(o.shape)}")
    return offsets(o.to(device=device, dtype=torch.int64).contiguous(), total, name)


def out_array(out, as_numpy: bool, device, shape: Tuple[int, ...], dtype: torch.dtype = torch.float32) -> None:
    """A preallocated ``out``: C-contiguous, writable, of ``shape`` and ``dtype``, a numpy array
    when the input was numpy, else a tensor on the input's device that does not require grad."""
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype
    if as_numpy:
        if not isinstance(out, np.ndarray):
            raise TypeError(f"out: expected a numpy array (the input is numpy), got {type(out).__name__}")
        if out.dtype != np_dtype:
            raise TypeError(f"out: expected dtype {_dt(dtype)}, got {out.dtype}")
        if not out.flags.writeable:
            raise ValueError("out: expected a writable array, got a read-only one")
        contiguous = out.flags.c_contiguous
    else:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out: expected a torch.Tensor (the input is a tensor), got {type(out).__name__}")
        if out.dtype != dtype:
            raise TypeError(f"out: expected dtype {_dt(dtype)}, got {_dt(out.dtype)}")
        if out.device != torch.device(device):
            raise ValueError(f"out: expected a tensor on {device} (the input's device), got {out.device}")
        if out.requires_grad:
            raise ValueError("out: expected a tensor that does not require grad")
        contiguous = out.is_contiguous()
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out: expected shape {tuple(shape)}, got {tuple(out.shape)}")
    if not contiguous:
        raise ValueError("out: expected a C-contiguous array")


def real_device(x: torch.Tensor, name: str) -> torch.Tensor:
    """Reject tensors without storage (meta) or on devices no backend runs on."""
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: expected a CPU or CUDA tensor (with data), got a tensor on device "
                         f"{x.device.type!r}")
    return x


# ---------------------------------------------------------------------------
# CSR lists (filter_index)


def _int_ids(x, name: str, device, one_d: bool = True, kind: str = "entity id") -> torch.Tensor:
    """A 1-d integer tensor from a tensor, numpy array or list of Python/numpy ints (``kind``: what one is,
    for the messages).

    Floats, bools, strings and nested lists are a TypeError naming the first bad
    element (``torch.as_tensor`` would truncate floats or fail with its own message)."""
    if isinstance(x, torch.Tensor):
        t = x
    elif isinstance(x, np.ndarray):
        if x.dtype == object:
            raise TypeError(f"{name}: expected integer {kind}s, got a numpy array of dtype object")
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, (list, tuple, range)):
        for j, v in enumerate(x):
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"{name}[{j}]: expected an integer {kind}, got {type(v).__name__} {v!r}")
        try:
            t = torch.tensor(list(x), dtype=torch.int64) if len(x) else torch.zeros(0, dtype=torch.int64)
        except (RuntimeError, OverflowError, ValueError):
            raise ValueError(f"{name}: expected ids that fit in int64 (|id| < 2**63), got a larger one") from None
    else:
        raise TypeError(f"{name}: expected a list, numpy array or torch.Tensor of integer ids, "
                        f"got {type(x).__name__}")
    if t.dtype not in INTS:
        raise TypeError(f"{name}: expected integer ids, got dtype {_dt(t.dtype)}")
    if one_d and t.dim() != 1:
        raise ValueError(f"{name}: expected a 1-d list of ids, got shape {tuple(t.shape)}")
    if device is not None and t.device != torch.device(device):
        t = t.to(device)
    return t.to(torch.int64).contiguous()


def _csr_values(offsets: torch.Tensor, index: torch.Tensor, rows: int, upper: int, name: str) -> None:
    if no_values(offsets) or no_values(index):
        return
    if int(offsets[0]) != 0:
        raise ValueError(f"{name} offsets: expected offsets[0] == 0, got {int(offsets[0])}")
    if rows > 0 and bool((offsets[1:] < offsets[:-1]).any()):
        i = int(torch.nonzero(offsets[1:] < offsets[:-1])[0, 0])
        raise ValueError(f"{name} offsets: expected non-decreasing offsets, got offsets[{i + 1}] = "
                         f"{int(offsets[i + 1])} < offsets[{i}] = {int(offsets[i])}")
    if int(offsets[-1]) != index.numel():
        raise ValueError(f"{name} offsets: expected offsets[-1] == len(index) = {index.numel()}, got {int(offsets[-1])}")
    _range_error(index, f"{name} index", upper)


def csr(
    offsets, index, rows: int, upper: int, name: str = "filter_index", device=None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Validate a CSR list (offsets (rows+1,), index (nnz,)) and return int64 contiguous copies.

    Under torch.compile the value checks run in the ``embkern::check_csr`` op."""
    offsets = _int_ids(offsets, f"{name} offsets", device, kind="offset")
    index = _int_ids(index, f"{name} index", device)
    if offsets.numel() != rows + 1:
        raise ValueError(f"{name} offsets: expected {rows + 1} entries (rows + 1), got {offsets.numel()}")
    if _data_checks_off():
        return tuple(torch.ops.embkern.check_csr(offsets, index, upper, name))
    _csr_values(offsets, index, rows, upper, name)
    return offsets, index


FILTER_FORMS = ("filter_index: expected None, an (offsets, index) CSR tuple, or a list of B per-row id lists "
                "(a list, not a tuple: a tuple is always read as a CSR pair)")


def filter_to_csr(filter_index, rows: int, upper: int, device) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Normalise ``filter_index`` to an int64 CSR pair (or (None, None)).

    Accepted forms, told apart by their Python type only (never by their length):

    * ``None``: no filter;
    * a **tuple** ``(offsets, index)``: CSR, ``offsets`` (rows + 1,) non-decreasing
      from 0 to ``len(index)``, ``index`` (nnz,) ids; each a tensor, numpy array
      or list of ints;
    * a **list** of ``rows`` per-row id collections (each a list of ints, a 1-d
      integer tensor or numpy array).

    Ids must be integers in [0, upper): floats, bools, strings and nested lists
    are a TypeError in every form.
    """
    if filter_index is None:
        return None, None
    if isinstance(filter_index, tuple):
        if len(filter_index) != 2:
            raise ValueError(f"{FILTER_FORMS}; got a tuple of length {len(filter_index)}")
        off, idx = filter_index
        return csr(off, idx, rows, upper, "filter_index", device)
    if isinstance(filter_index, list):
        if len(filter_index) != rows:
            raise ValueError(f"filter_index: expected {rows} per-row lists (one per query), got {len(filter_index)}")
        parts = []
        for i, f in enumerate(filter_index):
            if not isinstance(f, (list, tuple, range, torch.Tensor, np.ndarray)):
                raise TypeError(f"filter_index[{i}]: expected the id list of row {i} (a list, 1-d tensor or array "
                                f"of ints), got {type(f).__name__} {f!r}")
            parts.append(_int_ids(f, f"filter_index[{i}]", None).cpu())
        off = torch.zeros(rows + 1, dtype=torch.int64)
        if rows:
            off[1:] = torch.cumsum(torch.tensor([p.numel() for p in parts], dtype=torch.int64), 0)
        idx = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
        return csr(off.to(device), idx.to(device), rows, upper, "filter_index", device)
    raise TypeError(f"{FILTER_FORMS}; got {type(filter_index).__name__}")


def max_filtered(fo: Optional[torch.Tensor], fi: Optional[torch.Tensor], rows: int, upper: int) -> int:
    """The largest number of distinct filtered ids in one row (duplicates skip nothing extra)."""
    if fo is None or rows == 0 or fi.numel() == 0:
        return 0
    row = torch.repeat_interleave(torch.arange(rows, device=fo.device), fo[1:] - fo[:-1])
    return int(torch.unique(row * upper + fi).div(upper, rounding_mode="floor").bincount(minlength=rows).max())


def topk_bound(k: int, fo, fi, rows: int, upper: int) -> None:
    m = 0 if fo is not None and no_values(fo) else max_filtered(fo, fi, rows, upper)
    if k < 0 or k > upper - m:
        raise ValueError(f"k: expected 0 <= k <= {upper - m} (entities minus the most filtered in a row), got {k}")


# ---------------------------------------------------------------------------
# The same value checks as ops, so that compiled graphs run them too. Each
# returns fresh copies of what it checked, which the caller then uses, so the
# compiler cannot drop the check as dead code.


@torch.library.custom_op("embkern::check_ids", mutates_args=())
def _check_ids_op(x: torch.Tensor, upper: int, name: str) -> torch.Tensor:
    _range_error(x, name, upper)
    return x.clone()


@_check_ids_op.register_fake
def _(x, upper, name):
    return torch.empty_like(x)


@torch.library.custom_op("embkern::check_csr", mutates_args=())
def _check_csr_op(offsets: torch.Tensor, index: torch.Tensor, upper: int,
                  name: str) -> Tuple[torch.Tensor, torch.Tensor]:
    _csr_values(offsets, index, offsets.numel() - 1, upper, name)
    return offsets.clone(), index.clone()


@_check_csr_op.register_fake
def _(offsets, index, upper, name):
    return torch.empty_like(offsets), torch.empty_like(index)


@torch.library.custom_op("embkern::check_topk", mutates_args=())
def _check_topk_op(offsets: torch.Tensor, index: torch.Tensor, k: int, upper: int) -> torch.Tensor:
    topk_bound(k, offsets, index, offsets.numel() - 1, upper)
    return index.clone()


@_check_topk_op.register_fake
def _(offsets, index, k, upper):
    return torch.empty_like(index)


@torch.library.custom_op("embkern::check_offsets", mutates_args=())
def _check_offsets_op(offsets: torch.Tensor, total: int, name: str) -> torch.Tensor:
    offsets_values(offsets, total, name)
    return offsets.clone()


@_check_offsets_op.register_fake
def _(offsets, total, name):
    return torch.empty_like(offsets)


@torch.library.custom_op("embkern::check_finite", mutates_args=())
def _check_finite_op(x: torch.Tensor, name: str, why: str) -> torch.Tensor:
    finite_values(x, name, why)
    return x.clone()


@_check_finite_op.register_fake
def _(x, name, why):
    return torch.empty_like(x)


# The checked tensor may be a differentiable input (SSA's temperatures): the check is the
# identity, so is its gradient.
torch.library.register_autograd("embkern::check_finite", lambda ctx, grad: (grad, None, None))


def ids(x: torch.Tensor, name: str, upper: int) -> torch.Tensor:
    """Range-check integer ids in eager mode and in compiled graphs; returns the ids to use."""
    if _data_checks_off():
        return torch.ops.embkern.check_ids(x, upper, name)
    _range_error(x, name, upper)
    return x


def topk_k(k: int, fo, fi, rows: int, upper: int):
    """Check 0 <= k <= N - (most distinct filtered ids in a row); returns the filter index to use."""
    if _data_checks_off() and fo is not None:
        if k < 0 or k > upper:
            raise ValueError(f"k: expected 0 <= k <= {upper} (entities minus the most filtered in a row), got {k}")
        return torch.ops.embkern.check_topk(fo, fi, k, upper)
    topk_bound(k, fo, fi, rows, upper)
    return fi


def offsets_values(o: torch.Tensor, total: int, name: str) -> None:
    """offsets (B+1,) int64: starts at 0, non-decreasing, ends at ``total``."""
    if no_values(o):
        return
    oc = o.cpu()
    if int(oc[0]) != 0:
        raise ValueError(f"{name}: expected offsets[0] == 0, got {int(oc[0])}")
    if oc.numel() > 1 and bool((oc[1:] < oc[:-1]).any()):
        i = int(torch.nonzero(oc[1:] < oc[:-1])[0, 0])
        raise ValueError(f"{name}: expected non-decreasing offsets, got offsets[{i + 1}] = {int(oc[i + 1])} < "
                         f"offsets[{i}] = {int(oc[i])}")
    if int(oc[-1]) != total:
        raise ValueError(f"{name}: expected offsets[-1] == N_total = {total}, got {int(oc[-1])}")


def offsets(o: torch.Tensor, total: int, name: str) -> torch.Tensor:
    if _data_checks_off():
        return torch.ops.embkern.check_offsets(o, total, name)
    offsets_values(o, total, name)
    return o


def finite_values(x: torch.Tensor, name: str, why: str = "") -> None:
    if not all_finite(x):
        raise ValueError(f"{name}: expected finite values, found NaN or inf{why}")


def finite_checked(x: torch.Tensor, name: str, why: str = "") -> torch.Tensor:
    """NaN/inf check in eager mode and in compiled graphs; returns the tensor to use."""
    if _data_checks_off():
        return torch.ops.embkern.check_finite(x, name, why)
    finite_values(x, name, why)
    return x


# ---------------------------------------------------------------------------
# Sizes up front

_SMALL = 256 << 20  # below this, an allocation is left to the allocator without asking the OS


def _address_space_left() -> Optional[int]:
    """What RLIMIT_AS (ulimit -v) still lets this process map, or None when unlimited."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY or soft < 0:
            return None
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return max(int(soft) - int(line.split()[1]) * 1024, 0)
    except (ImportError, OSError, ValueError, IndexError):
        pass
    return None


def _available_host_bytes() -> Optional[int]:
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError, AttributeError):
            avail = None
    left = _address_space_left()
    if left is not None:
        avail = left if avail is None else min(avail, left)
    return avail


def available_bytes(device) -> Optional[int]:
    """Memory a new allocation on ``device`` can get (None when unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
            cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            return int(free) + max(int(cached), 0)
        except (RuntimeError, AssertionError):
            return None
    if device.type == "cpu":
        return _available_host_bytes()
    return None


def gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.3g} GB"


def contiguous(t: torch.Tensor, name: str) -> torch.Tensor:
    """``t.contiguous()``, with the copy's size checked first (an expanded
    (2^34, 4) view is 64 bytes of storage but a 256 GB copy)."""
    if t.is_contiguous():
        return t
    fits(t.numel() * t.element_size(), t.device, f"{name}: a contiguous copy of the {tuple(t.shape)} "
         f"{_dt(t.dtype)} input (it is not contiguous)")
    return t.contiguous()


def packed_below(t: torch.Tensor, lead: int) -> bool:
    """True when dims >= ``lead`` of ``t`` are C-contiguous and dims < ``lead`` step as one index
    (size-1 dims ignored; strides >= 0): what the C++ kernels that take a lead stride read in place
    (``view(..., lead)`` in csrc/common.h). A slice ``[:, :, :L]`` of a contiguous (B, H, capacity, d)
    cache is one; a transposed tensor is not."""
    shape, stride = t.shape, t.stride()
    expect = 1
    for i in range(t.dim() - 1, lead - 1, -1):
        if shape[i] > 1 and stride[i] != expect:
            return False
        expect *= shape[i]
    first = True
    for i in range(lead - 1, -1, -1):
        if shape[i] <= 1:
            continue
        if (stride[i] < 0) if first else (stride[i] != expect):
            return False
        first = False
        expect = stride[i] * shape[i]
    return True


def copy_bytes(*tensors: Optional[torch.Tensor]) -> int:
    """Bytes of the contiguous copies ``.contiguous()`` makes of these tensors (0 for None and contiguous ones)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None and not t.is_contiguous())


def batch_index(index, batch: int, device) -> torch.Tensor:
    """``index`` (a 1-d list, numpy array or integer tensor of rows of a batch of ``batch``; repeats allowed,
    as beam search keeps a beam twice) as an int64 tensor on ``device``, or an error naming ``index``."""
    t = _int_ids(index, "index", None, kind="batch row")
    if not no_values(t):
        _range_error(t, "index", batch)
    return t.to(device=device, dtype=torch.int64)


def layer_input(x: torch.Tensor, name: str, weight: torch.Tensor) -> None:
    """x (B, L, d_model) of a layer against its input projection's weight (out, d_model): width, dtype and
    device, each error naming ``name``."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{name}: expected shape (B, L, d_model) = (B, L, {weight.shape[1]}), got {tuple(x.shape)}")
    same_dtype("the layer's weights", weight, name, x)
    same_device("the layer's weights", weight, name, x)


def fits(nbytes: int, device, what: str) -> None:
    """Raise MemoryError naming ``what`` (the config or shape) when ``nbytes`` exceed the memory available.

    Skipped while tracing (sizes may be symbolic there)."""
    if _data_checks_off() or nbytes <= _SMALL:
        return
    avail = available_bytes(device)
    if avail is not None and nbytes > avail:
        raise MemoryError(f"{what} needs {gb(nbytes)} on {torch.device(device)}, more than the {gb(avail)} "
                          "available")
