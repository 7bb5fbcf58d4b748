"""CUDA launcher of the FDE encoder (``embkern._C_cuda.fde``).

``encode_cuda`` is what ``embkern.ops.fde`` calls for CUDA inputs with
backend ``"cuda"``. The random tables come from the CPU side (the bit-exact
RNG of docs/ops/fde.md), already on the device; this module checks them,
allocates the output and a workspace through torch (so both live in torch's
caching allocator and follow its stream semantics), and enqueues the kernels
on the current stream of the points' device. The compiled code is
torch-free: it receives one ``Problem`` object whose device buffers are
``ArrayView`` s (data pointer, element count, dtype name), a host copy of the
offsets, and the stream handle.

Output is bit-identical to the CPU kernel and ``embkern.reference.fde`` for
every projection (src/cuda/fde.cu follows the reference's float32 summation
order; see the comment at the top of that file).
"""

from __future__ import annotations

import weakref
from typing import Dict, Optional

import torch
from torch import Tensor

from .. import _backends, _checks
from .._checks import _dt
from ..reference import fde as ref

# Per-chunk scratch cap (sign codes + unprojected rows for the count sketch):
# 128 MiB keeps one chunk for 4096 documents x 80 points x R=40 codes (52 MB),
# and ~100 documents per chunk for R=40, k=6, d=128 before a final projection
# (1.3 MB each).
DEFAULT_CHUNK_BUDGET = 128 << 20

# id(tensor) -> (weakref, _version, what was checked): index-range checks of a
# table need a device reduction and a sync, so each table is checked once per
# content version rather than on every call.
_CHECKED: Dict[int, tuple] = {}


def _module():
    return _backends.cuda_module().fde


def _device_tensor(t, name: str, dtype: torch.dtype, shape: tuple, device: torch.device) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {_dt(dtype)}, got {_dt(t.dtype)}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device} (the device of points), got {t.device}")
    return t.contiguous()


def _once(t: Tensor, what: tuple, check) -> None:
    key = id(t)
    hit = _CHECKED.get(key)
    if hit is not None and hit[0]() is t and hit[1] == t._version and hit[2] == what:
        return
    check()
    if len(_CHECKED) > 256:
        for k in [k for k, v in _CHECKED.items() if v[0]() is None]:
            del _CHECKED[k]
    _CHECKED[key] = (weakref.ref(t), t._version, what)


def _check_ams_index(t: Tensor, dp: int) -> None:
    def check():
        if t.numel():
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= dp:
                raise ValueError(f"tables['ams_index']: expected values in [0, {dp}), got {lo if lo < 0 else hi}")
    _once(t, ("ams_index", dp), check)


def _check_count_sketch(off: Tensor, mem: Tensor, L: int, D: int) -> None:
    def check_offsets():
        o = off.cpu()
        if int(o[0]) != 0 or int(o[-1]) != L:
            raise ValueError(f"tables['cs_bucket_offsets']: expected offsets[0] == 0 and offsets[-1] == {L}, "
                             f"got {int(o[0])} and {int(o[-1])}")
        if bool((o[1:] < o[:-1]).any()):
            raise ValueError("tables['cs_bucket_offsets']: expected non-decreasing offsets")
    _once(off, ("cs_bucket_offsets", L, D), check_offsets)

    def check_members():
        if mem.numel() == 0:
            return
        lo, hi = int(mem.min()), int(mem.max())
        if lo < 0 or hi >= L:
            raise ValueError(f"tables['cs_bucket_members']: expected input indices in [0, {L}), "
                             f"got {lo if lo < 0 else hi}")
        # ascending within each bucket (the exactness rule's summation order)
        counts = (off[1:] - off[:-1]).to(mem.device)
        bucket = torch.repeat_interleave(torch.arange(D, device=mem.device), counts)
        same = bucket[1:] == bucket[:-1]
        if bool(((mem[1:] <= mem[:-1]) & same).any()):
            raise ValueError("tables['cs_bucket_members']: expected strictly ascending input indices within "
                             "each bucket")
    _once(mem, ("cs_bucket_members", L, D, id(off), off._version), check_members)


def encode_cuda(
    points: Tensor,
    offsets: Tensor,
    tables: dict,
    *,
    num_repetitions: int,
    num_simhash_projections: int,
    projection_dim: int,
    is_document: bool,
    fill_empty_partitions: bool,
    final_projection_dimension: Optional[int],
    out: Optional[Tensor] = None,
    chunk_budget_bytes: int = DEFAULT_CHUNK_BUDGET,
) -> Tensor:
    """FDEs of B point clouds on the GPU.

    Args:
        points: float32 (N_total, d) on a CUDA device (a non-contiguous tensor
            is copied).
        offsets: int64 (B+1,) CSR offsets into points (CUDA or CPU); offsets[0]
            == 0, non-decreasing, offsets[B] == N_total. Read once on the host
            (one small device-to-host copy) to plan chunks and check them.
        tables: CUDA tensors on points' device: "simhash" float32 (R, d, k);
            "ams_index" int32 (R, d) and "ams_sign" float32 (R, d), or absent
            for the identity projection; with a final projection
            "cs_bucket_offsets" int64 (D+1,), "cs_bucket_members" int64 (L,)
            ascending within each bucket, "cs_bucket_signs" float32 (L,),
            L = R * 2^k * projection_dim.
        num_repetitions, num_simhash_projections, projection_dim: R, k, d_p
            (d_p == d for the identity projection).
        is_document: AVERAGE (documents) instead of SUM (queries).
        fill_empty_partitions: documents only.
        final_projection_dimension: D, or None for no final projection.
        out: optional preallocated float32 (B, D_out) contiguous CUDA output.
        chunk_budget_bytes: cap on the per-chunk scratch (>= one document).

    Returns:
        float32 (B, D_out) on points' device, D_out = D if a final projection
        is set, else R * 2^k * d_p. Enqueued on the current stream; not synchronised.
    """
    mod = _module()
    if not isinstance(points, Tensor):
        raise TypeError(f"points: expected a torch.Tensor, got {type(points).__name__}")
    if points.device.type != "cuda":
        raise ValueError(f"points: expected a CUDA tensor, got device {points.device}")
    if points.dtype != torch.float32:
        raise TypeError(f"points: expected dtype float32, got {_dt(points.dtype)}")
    if points.dim() != 2:
        raise ValueError(f"points: expected a 2-d tensor (N_total, d), got shape {tuple(points.shape)}")
    device = points.device
    N, d = points.shape
    if d == 0:
        raise ValueError("points: expected d > 0 columns, got 0")
    points = points.contiguous()
    if not isinstance(offsets, Tensor):
        raise TypeError(f"offsets: expected a torch.Tensor, got {type(offsets).__name__}")
    if offsets.dtype != torch.int64:
        raise TypeError(f"offsets: expected dtype int64, got {_dt(offsets.dtype)}")
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"offsets: expected a 1-d tensor of B+1 >= 1 values, got shape {tuple(offsets.shape)}")
    if offsets.device.type not in ("cuda", "cpu") or (offsets.device.type == "cuda" and offsets.device != device):
        raise ValueError(f"offsets: expected device {device} (the device of points) or cpu, got {offsets.device}")
    offsets_host = offsets.detach().to("cpu").contiguous()
    offsets_dev = offsets.detach().to(device).contiguous()
    B = offsets_host.numel() - 1

    for name, v in (("num_repetitions", num_repetitions), ("num_simhash_projections", num_simhash_projections),
                    ("projection_dim", projection_dim)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    R, k, dp = num_repetitions, num_simhash_projections, projection_dim
    if R < 1:
        raise ValueError(f"num_repetitions: expected >= 1, got {R}")
    if not 0 <= k <= ref.MAX_SIMHASH:
        raise ValueError(f"num_simhash_projections: expected 0 <= k <= {ref.MAX_SIMHASH}, got {k}")
    if dp < 1:
        raise ValueError(f"projection_dim: expected >= 1, got {dp}")
    if fill_empty_partitions and not is_document:
        raise ValueError("fill_empty_partitions: queries cannot fill empty partitions (documents only)")
    D = final_projection_dimension
    if D is not None and (isinstance(D, bool) or not isinstance(D, int) or D <= 0):
        raise ValueError(f"final_projection_dimension: expected None or an int > 0, got {D!r}")
    if not isinstance(tables, dict):
        raise TypeError(f"tables: expected a dict of CUDA tensors, got {type(tables).__name__}")
    L = mod.row_length(R, k, dp)
    width = D if D is not None else L

    if "simhash" not in tables:
        raise ValueError("tables: missing 'simhash'")
    simhash = _device_tensor(tables["simhash"], "tables['simhash']", torch.float32, (R, d, k), device)
    has_ams = "ams_index" in tables or "ams_sign" in tables
    ams_index = ams_sign = None
    if has_ams:
        if "ams_index" not in tables or "ams_sign" not in tables:
            raise ValueError("tables: 'ams_index' and 'ams_sign' must both be present or both absent")
        ams_index = _device_tensor(tables["ams_index"], "tables['ams_index']", torch.int32, (R, d), device)
        ams_sign = _device_tensor(tables["ams_sign"], "tables['ams_sign']", torch.float32, (R, d), device)
        _check_ams_index(ams_index, dp)
    elif dp != d:
        raise ValueError(f"projection_dim: the identity projection needs projection_dim == d = {d}, got {dp}")
    cs_off = cs_mem = cs_sgn = None
    if D is not None:
        for key in ("cs_bucket_offsets", "cs_bucket_members", "cs_bucket_signs"):
            if key not in tables:
                raise ValueError(f"tables: missing {key!r} (needed with final_projection_dimension={D})")
        cs_off = _device_tensor(tables["cs_bucket_offsets"], "tables['cs_bucket_offsets']", torch.int64, (D + 1,),
                                device)
        cs_mem = _device_tensor(tables["cs_bucket_members"], "tables['cs_bucket_members']", torch.int64, (L,), device)
        cs_sgn = _device_tensor(tables["cs_bucket_signs"], "tables['cs_bucket_signs']", torch.float32, (L,), device)
        _check_count_sketch(cs_off, cs_mem, L, D)

    if out is not None:
        _device_tensor(out, "out", torch.float32, (B, width), device)
        if not out.is_contiguous():
            raise ValueError("out: expected a contiguous tensor")

    def view(t: Optional[Tensor]):
        return None if t is None else mod.ArrayView(t.data_ptr(), t.numel(), _dt(t.dtype))

    problem = mod.Problem(
        points=view(points), num_points=N, dimension=d, offsets=view(offsets_dev), offsets_host=offsets_host.numpy(),
        num_repetitions=R, num_simhash_projections=k, projection_dim=dp, is_document=bool(is_document),
        fill_empty_partitions=bool(fill_empty_partitions), final_projection_dimension=D,
        simhash=view(simhash), ams_index=view(ams_index), ams_sign=view(ams_sign),
        cs_bucket_offsets=view(cs_off), cs_bucket_members=view(cs_mem), cs_bucket_signs=view(cs_sgn),
        chunk_budget_bytes=int(chunk_budget_bytes),
    )
    ws_bytes = mod.workspace_size(problem)
    need = max(ws_bytes, 1) + (B * width * 4 if out is None else 0)
    _checks.fits(need, device, f"fde_encode (cuda): the ({B}, {width}) float32 output and a {_checks.gb(ws_bytes)} "
                 f"workspace (R={R}, k={k}, projection_dim={dp}, final_projection_dimension={D})")
    if out is None:
        out = torch.empty((B, width), dtype=torch.float32, device=device)
    workspace = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    with torch.cuda.device(index):
        stream = torch.cuda.current_stream(index).cuda_stream
        mod.encode(problem, out=view(out), workspace=view(workspace), device=index, stream=stream)
    return out
