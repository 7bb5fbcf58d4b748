"""Input validation shared by the public functions.

Every check raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong
shape, range, device or value) naming the argument, what was expected and what
was given, before any kernel runs.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

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
    # break under torch.compile; there the kernels' own boundary checks apply.
    return torch.compiler.is_compiling()


def index_range(x: torch.Tensor, name: str, upper: int) -> None:
    if x.numel() == 0 or _data_checks_off():
        return
    lo, hi = int(x.min()), int(x.max())
    if lo < 0 or hi >= upper:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name}: expected indices in [0, {upper}), got {bad}")


def finite(x: torch.Tensor, name: str) -> None:
    if x.numel() and not _data_checks_off() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: expected finite values, found NaN or inf")


def csr(
    offsets, index, rows: int, upper: int, name: str = "filter_index", device=None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Validate a CSR list (offsets (rows+1,), index (nnz,)) and return int64 contiguous copies."""
    offsets = int_tensor(torch.as_tensor(offsets, device=device) if not isinstance(offsets, torch.Tensor) else offsets,
                         f"{name} offsets", 1)
    index = int_tensor(torch.as_tensor(index, dtype=torch.int64, device=device) if not isinstance(index, torch.Tensor) else index,
                       f"{name} index", 1)
    if offsets.numel() != rows + 1:
        raise ValueError(f"{name} offsets: expected {rows + 1} entries (rows + 1), got {offsets.numel()}")
    offsets = offsets.to(torch.int64).contiguous()
    index = index.to(torch.int64).contiguous()
    if _data_checks_off():
        return offsets, index
    if int(offsets[0]) != 0:
        raise ValueError(f"{name} offsets: expected offsets[0] == 0, got {int(offsets[0])}")
    if rows > 0 and bool((offsets[1:] < offsets[:-1]).any()):
        i = int(torch.nonzero(offsets[1:] < offsets[:-1])[0, 0])
        raise ValueError(f"{name} offsets: expected non-decreasing offsets, got offsets[{i + 1}] = "
                         f"{int(offsets[i + 1])} < offsets[{i}] = {int(offsets[i])}")
    if int(offsets[-1]) != index.numel():
        raise ValueError(f"{name} offsets: expected offsets[-1] == len(index) = {index.numel()}, got {int(offsets[-1])}")
    index_range(index, f"{name} index", upper)
    return offsets, index


def filter_to_csr(filter_index, rows: int, upper: int, device) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Accept None, a (offsets, index) pair, or a length-`rows` sequence of per-row index lists."""
    if filter_index is None:
        return None, None
    if isinstance(filter_index, tuple) and len(filter_index) == 2 and not isinstance(filter_index[0], (list, tuple)):
        off, idx = filter_index
        return csr(off, idx, rows, upper, "filter_index", device)
    if isinstance(filter_index, (list, tuple)):
        if len(filter_index) != rows:
            raise ValueError(f"filter_index: expected {rows} per-row lists (one per query), got {len(filter_index)}")
        parts = [torch.as_tensor(f, dtype=torch.int64).reshape(-1) for f in filter_index]
        off = torch.zeros(rows + 1, dtype=torch.int64)
        if rows:
            off[1:] = torch.cumsum(torch.tensor([p.numel() for p in parts]), 0)
        idx = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
        return csr(off.to(device), idx.to(device), rows, upper, "filter_index", device)
    raise TypeError("filter_index: expected None, an (offsets, index) CSR pair, or a list of per-row index lists, "
                    f"got {type(filter_index).__name__}")
