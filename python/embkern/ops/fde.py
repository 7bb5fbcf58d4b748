"""MUVERA fixed dimensional encodings (FDE) + Chamfer reranking: torch.library op and public API.

Op (namespace ``embkern``; ``backend`` is resolved before the op is called):

==============  ====================================================  ==========
op              computes                                              backward
==============  ====================================================  ==========
fde_encode      FDE of B ragged point clouds (B, D_out) float32       -- (hashing)
==============  ====================================================  ==========

Backends: ``reference`` (NumPy, ``embkern.reference.fde``; any device, via the
host), ``cpu`` (``embkern._C.fde``), ``cuda`` (``embkern._C_cuda.fde`` through
``embkern.ops._fde_cuda``). The identity projection is bit-identical across
all three; see the reference's docstring for the summation-order contract.

Inputs: float tensors / arrays of any floating dtype are converted to float32
(the reference's arithmetic); non-finite points raise ``ValueError`` (the
reference would hash NaN to bit 0 and propagate it; we refuse instead). The
cpu backend checks each document's points in C++ as it encodes them (naming
the lowest bad row); a preallocated ``out`` is then left partly written.
Other backends check the whole batch first. Non-contiguous inputs are copied.
"""

from __future__ import annotations

import importlib
from typing import Iterable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .. import _backends, _checks
from .._backends import BackendSupport, OpDescriptor
from .._progress import Progress
from ..reference import fde as ref
from ..reference.fde import FDEConfig

_F32 = frozenset({torch.float32})
DESCRIPTOR = OpDescriptor(
    name="fde",
    kernels=("encode",),
    backends={
        # the reference is NumPy on the host: any device, through a host copy
        "reference": BackendSupport(_F32, frozenset({"cpu", "cuda"})),
        "cpu": BackendSupport(_F32, frozenset({"cpu"}), symbol="fde.{kernel}"),
        "cuda": BackendSupport(_F32, frozenset({"cuda"}), symbol="fde.{kernel}"),
    },
    entry_points={"fde_encode": ("encode",)},
)
KERNELS = DESCRIPTOR.kernels


# ---------------------------------------------------------------------------
# Tables: generated once per table-determining key, shared by every encoder


def _table_key(c: FDEConfig) -> tuple:
    return (int(c.seed) & 0xFFFFFFFF, c.dimension, c.num_repetitions, c.num_simhash_projections,
            c.projection_type, c.projection_dim, c.final_projection_dimension)


class _Tables:
    """The random tables (docs/ops/fde.md, "Random tables") of one key (numpy), the CPU plan and per-device CUDA copies, built lazily."""

    def __init__(self, c: FDEConfig):
        seed = int(c.seed) & 0xFFFFFFFF
        cpu = _backends.cpu_module().fde if _backends.cpu_status().ok and hasattr(_cpu_mod(), "simhash_table") else None
        d, R, k, dp = c.dimension, c.num_repetitions, c.num_simhash_projections, c.projection_dim
        if cpu is not None:  # the C++ generators run the same algorithms ~100x faster
            self.simhash = cpu.simhash_table(seed, d, k, R)
        else:
            self.simhash = ref.simhash_table(seed, d, k, R)
        self.ams_index = self.ams_sign = None
        if c.projection_type == "ams_sketch":
            self.ams_index, self.ams_sign = (cpu.ams_table(seed, d, dp, R) if cpu is not None
                                             else ref.ams_table(seed, d, dp, R))
        self.cs_bucket = self.cs_sign = None
        self.final_dim = c.final_projection_dimension
        if self.final_dim is not None:
            L = c.fde_dimension_before_projection
            self.cs_bucket, self.cs_sign = (cpu.count_sketch_table(seed, L, self.final_dim) if cpu is not None
                                            else ref.count_sketch_table(seed, L, self.final_dim))
        self._csr = None
        self._plans = {}
        self._cuda = {}
        self._ref = None

    def csr(self):
        """Count-sketch bucket -> input CSR: (offsets int64 (D+1,), members int64 (L,), signs float32 (L,))."""
        if self._csr is None and self.final_dim is not None:
            self._csr = ref.count_sketch_csr(self.cs_bucket, self.cs_sign, self.final_dim)
        return self._csr

    def reference_tables(self, c: FDEConfig) -> ref.Tables:
        if self._ref is None:
            t = ref.Tables.__new__(ref.Tables)
            t.config = c
            t.simhash = self.simhash
            t.ams_index, t.ams_sign = self.ams_index, self.ams_sign
            t.ams_dense = None
            if self.ams_index is not None:
                R, d = self.ams_index.shape
                dense = np.zeros((R, d, c.projection_dim), np.float32)
                r_i, d_i = np.meshgrid(np.arange(R), np.arange(d), indexing="ij")
                dense[r_i, d_i, self.ams_index] = self.ams_sign
                t.ams_dense = dense
            t.cs_bucket, t.cs_sign = self.cs_bucket, self.cs_sign
            self._ref = t
        return self._ref

    def cpu_plan(self, c: FDEConfig):
        key = (c.is_document, bool(c.fill_empty_partitions))
        if key not in self._plans:
            self._plans[key] = _cpu_mod().Plan(
                c.dimension, c.num_repetitions, c.num_simhash_projections, c.projection_dim, c.is_document,
                bool(c.fill_empty_partitions), c.final_projection_dimension or 0, self.simhash, self.ams_index,
                self.ams_sign, self.cs_bucket, self.cs_sign)
        return self._plans[key]

    def cuda_tables(self, device: torch.device) -> dict:
        key = str(device)
        if key not in self._cuda:
            t = {"simhash": torch.from_numpy(self.simhash).to(device)}
            if self.ams_index is not None:
                t["ams_index"] = torch.from_numpy(self.ams_index).to(device)
                t["ams_sign"] = torch.from_numpy(self.ams_sign).to(device)
            if self.final_dim is not None:
                off, mem, sg = self.csr()
                t["cs_bucket_offsets"] = torch.from_numpy(off).to(device)
                t["cs_bucket_members"] = torch.from_numpy(mem).to(device)
                t["cs_bucket_signs"] = torch.from_numpy(sg).to(device)
            self._cuda[key] = t
        return self._cuda[key]


def _cpu_mod():
    return _backends.cpu_module().fde


_TABLE_CACHE: "dict[tuple, _Tables]" = {}
_TABLE_CACHE_MAX = 32


def tables(config: FDEConfig) -> _Tables:
    """The cached random tables of a config (shared across encoding types and fill settings)."""
    key = _table_key(config)
    t = _TABLE_CACHE.get(key)
    if t is None:
        if len(_TABLE_CACHE) >= _TABLE_CACHE_MAX:  # drop the oldest entry
            _TABLE_CACHE.pop(next(iter(_TABLE_CACHE)))
        t = _TABLE_CACHE[key] = _Tables(config)
    return t


# ---------------------------------------------------------------------------
# The op


def _config_from_args(dimension, num_repetitions, num_simhash, seed, is_document, projection_dim, ams, fill,
                      final_dim) -> FDEConfig:
    return FDEConfig(dimension, num_repetitions, num_simhash, seed, "document" if is_document else "query",
                     "ams_sketch" if ams else "identity", projection_dim if ams else None, fill,
                     final_dim if final_dim > 0 else None)


def _encode_reference(points: Tensor, offsets: Tensor, c: FDEConfig) -> Tensor:
    t = tables(c).reference_tables(c)
    out = ref.encode(points.detach().cpu().numpy(), offsets.detach().cpu().numpy(), c, t)
    return torch.from_numpy(out).to(points.device)


def _encode_cpu(points: Tensor, offsets: Tensor, c: FDEConfig) -> Tensor:
    plan = tables(c).cpu_plan(c)
    out = torch.empty(offsets.shape[0] - 1, c.output_dimension, dtype=torch.float32)
    _cpu_mod().encode(plan, points.detach().contiguous().numpy(), offsets.detach().contiguous().numpy(), out.numpy())
    return out


def _encode_cuda(points: Tensor, offsets: Tensor, c: FDEConfig) -> Tensor:
    mod = importlib.import_module("embkern.ops._fde_cuda")
    return mod.encode_cuda(points.contiguous(), offsets.contiguous(), tables(c).cuda_tables(points.device),
                           num_repetitions=c.num_repetitions, num_simhash_projections=c.num_simhash_projections,
                           projection_dim=c.projection_dim, is_document=c.is_document,
                           fill_empty_partitions=bool(c.fill_empty_partitions),
                           final_projection_dimension=c.final_projection_dimension)


_IMPL = {"reference": _encode_reference, "cpu": _encode_cpu, "cuda": _encode_cuda}


@torch.library.custom_op("embkern::fde_encode", mutates_args=())
def fde_encode_op(points: Tensor, offsets: Tensor, dimension: int, num_repetitions: int, num_simhash: int,
                  seed: int, is_document: bool, projection_dim: int, ams: bool, fill: bool, final_dim: int,
                  backend: str) -> Tensor:
    """FDE of B point clouds. points (N, d) float32, offsets (B+1,) int64 -> (B, D_out) float32."""
    c = _config_from_args(dimension, num_repetitions, num_simhash, seed, is_document, projection_dim, ams, fill,
                          final_dim)
    return _encode_reference(points, offsets, c)


_backends.route(fde_encode_op, _IMPL,
                adapt=lambda points, offsets, *cfg: (points, offsets, _config_from_args(*cfg)))


@fde_encode_op.register_fake
def _(points, offsets, dimension, num_repetitions, num_simhash, seed, is_document, projection_dim, ams, fill,
      final_dim, backend):
    D = final_dim if final_dim > 0 else num_repetitions * (1 << num_simhash) * projection_dim
    return points.new_empty(offsets.shape[0] - 1, D, dtype=torch.float32)


def _op_args(c: FDEConfig) -> tuple:
    return (c.dimension, c.num_repetitions, c.num_simhash_projections, int(c.seed) & 0xFFFFFFFF, c.is_document,
            c.projection_dim, c.projection_type == "ams_sketch", bool(c.fill_empty_partitions),
            c.final_projection_dimension or 0)


# ---------------------------------------------------------------------------
# Input handling


_NAN_WHY = " (NaN would hash to bit 0 and propagate into its partition)"


def _check_finite(x: Tensor, name: str) -> Tensor:
    """The finite check, in eager mode and (as an op) in compiled graphs; returns the tensor to use."""
    return _checks.finite_checked(x, name, _NAN_WHY)


_F32_MAX = float(np.finfo(np.float32).max)


def _overflow(points, name: str = "points") -> Optional[str]:
    """On the error path only: why finite wider-than-float32 input became inf (None if it did not)."""
    srcs = points if isinstance(points, (list, tuple)) else [points]
    worst = 0.0
    for p in srcs:
        if isinstance(p, np.ndarray) and p.dtype.kind == "f" and p.dtype.itemsize > 4 and p.size:
            a = np.abs(p[np.isfinite(p)])
            worst = max(worst, float(a.max()) if a.size else 0.0)
        elif isinstance(p, Tensor) and p.is_floating_point() and p.element_size() > 4 and p.numel() \
                and p.device.type in ("cpu", "cuda"):
            a = p.detach().abs()[torch.isfinite(p.detach())]
            worst = max(worst, float(a.max()) if a.numel() else 0.0)
    if worst <= _F32_MAX:
        return None
    return (f"{name}: expected values within float32 range (|x| <= {_F32_MAX:.4g}), got a finite value of "
            f"magnitude {worst:.4g}: FDE computes in float32, where it overflows to inf")


def _points_f32(x: Tensor, name: str, d: int, check_finite: bool = True) -> Tensor:
    if not (x.is_floating_point()):
        raise TypeError(f"{name}: expected a floating dtype (converted to float32), got {_checks._dt(x.dtype)}")
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a 2-d (N, {d}) array, got shape {tuple(x.shape)}")
    if x.shape[1] != d:
        raise ValueError(f"{name}: expected shape (N, {d}) (config.dimension = {d}), got {tuple(x.shape)}")
    x = x.to(torch.float32).contiguous()
    if check_finite:
        x = _check_finite(x, name)
    return x


def _ragged(points, offsets, lengths, d: int, name: str = "points",
            check_finite: bool = True) -> Tuple[Tensor, Tensor, bool]:
    """Normalise the three input forms to (points (N, d) f32, offsets (B+1,) i64, numpy_output).
    check_finite=False leaves the NaN/inf check to the caller (the C++ encoder does it per document)."""
    if isinstance(points, (list, tuple)):
        if offsets is not None or lengths is not None:
            raise ValueError(f"{name}: a list of point clouds carries its own lengths; pass offsets=None, lengths=None")
        parts, was_np = [], None
        for i, p in enumerate(points):
            t, from_np = _checks.array_or_tensor(p, f"{name}[{i}]")
            was_np = from_np if was_np is None else was_np
            if t.dim() == 1 and t.numel() == 0:
                t = t.reshape(0, d)
            parts.append(_points_f32(t, f"{name}[{i}]", d, check_finite))
        devs = {p.device for p in parts}
        if len(devs) > 1:
            raise ValueError(f"{name}: expected every point cloud on one device, got {sorted(map(str, devs))}")
        dev = parts[0].device if parts else torch.device("cpu")
        X = torch.cat(parts) if parts else torch.zeros(0, d)
        off = torch.zeros(len(parts) + 1, dtype=torch.int64)
        if parts:
            off[1:] = torch.cumsum(torch.tensor([p.shape[0] for p in parts]), 0)
        return X, off.to(dev), bool(was_np) if was_np is not None else True
    X, was_np = _checks.array_or_tensor(points, name)
    if lengths is not None:
        if offsets is not None:
            raise ValueError("offsets: pass either offsets (CSR points) or lengths (padded points), not both")
        if X.dim() != 3:
            raise ValueError(f"{name}: with lengths, expected a padded (B, L, {d}) array, got shape {tuple(X.shape)}")
        Lt = _checks.integer_array(lengths, "lengths", "integers")
        if Lt.shape != (X.shape[0],):
            raise ValueError(f"lengths: expected shape ({X.shape[0]},), got {tuple(Lt.shape)}")
        Lt = Lt.to(torch.int64).cpu()
        if X.shape[0] and (int(Lt.min()) < 0 or int(Lt.max()) > X.shape[1]):
            raise ValueError(f"lengths: expected values in [0, {X.shape[1]}], got [{int(Lt.min())}, {int(Lt.max())}]")
        if X.shape[2] != d:
            raise ValueError(f"{name}: expected shape (B, L, {d}) (config.dimension = {d}), got {tuple(X.shape)}")
        mask = torch.arange(X.shape[1])[None, :] < Lt[:, None]
        flat = X[mask.to(X.device)]
        off = torch.zeros(X.shape[0] + 1, dtype=torch.int64)
        off[1:] = torch.cumsum(Lt, 0)
        return _points_f32(flat, name, d, check_finite), off.to(X.device), was_np
    if offsets is None:
        raise ValueError("offsets: required with CSR points (N_total, d); or pass a list of arrays, "
                         "or a padded (B, L, d) array with lengths")
    X = _points_f32(X, name, d, check_finite)
    return X, _checks.offsets_array(offsets, "offsets", X.shape[0], X.device), was_np


def _check_config(config) -> FDEConfig:
    if not isinstance(config, FDEConfig):
        raise TypeError(f"config: expected embkern.FDEConfig, got {type(config).__name__}")
    return config


def fde_encode(points, offsets=None, config: Optional[FDEConfig] = None, backend: Optional[str] = None, *,
               lengths=None, out=None):
    """MUVERA fixed dimensional encodings of a batch of point clouds.

    Args:
        points: float32 (N_total, d) CSR rows with ``offsets`` int (B+1,); or a
            list of B (n_b, d) arrays/tensors (offsets None); or a padded
            (B, L, d) array with ``lengths`` (B,). numpy or torch (CPU / CUDA).
        config: :class:`FDEConfig`.
        backend: None (auto: cuda for CUDA tensors, else cpu, else reference)
            or "reference" | "cpu" | "cuda".
        out: optional preallocated C-contiguous float32 (B, config.output_dimension),
            numpy for numpy input, else a tensor on the input's device. The cpu
            backend writes into it directly (no allocation, no copy); reusing
            one buffer also skips the page faults of a fresh output.
    Returns:
        (B, config.output_dimension) float32 (``out`` when given), numpy for
        numpy input, else a tensor on the input's device.
    Raises:
        ValueError: bad shapes, offsets or non-finite points (also inside
            ``torch.compile(fullgraph=True)``, where the checks run as ops); a
            float64 value beyond float32 range is reported as such.
        MemoryError: the (B, D) output is larger than the memory available.
    """
    try:
        return _fde_encode(points, offsets, config, backend, lengths, out)
    except ValueError as e:
        if "NaN or inf" in str(e) and not torch.compiler.is_compiling():
            why = _overflow(points)
            if why is not None:
                raise ValueError(why) from e
        raise


def _fde_encode(points, offsets, config, backend, lengths, out):
    c = _check_config(config)
    X, off, as_np = _ragged(points, offsets, lengths, c.dimension, check_finite=False)
    be = _backends.resolve(DESCRIPTOR, "fde_encode", backend, X.device.type, X.dtype)
    if be != "cpu":  # the C++ encoder checks each document's points as it reads them
        X = _check_finite(X, "points")
    B, D = off.shape[0] - 1, c.output_dimension
    if out is not None:
        _checks.out_array(out, as_np, X.device, (B, D))
        if be == "cpu" and not torch.compiler.is_compiling():
            dst = out if as_np else out.detach().numpy()
            _cpu_mod().encode(tables(c).cpu_plan(c), X.detach().contiguous().numpy(),
                              off.detach().contiguous().numpy(), dst)
            return out
        res = fde_encode_op(X, off, *_op_args(c), be)
        if as_np:
            out[...] = res.cpu().numpy()
        else:
            out.copy_(res)
        return out
    _checks.fits(B * D * 4, X.device, f"fde_encode: the ({B}, {D}) float32 output of {_config_text(c)}")
    res = fde_encode_op(X, off, *_op_args(c), be)
    return res.cpu().numpy() if as_np else res


def _config_text(c: FDEConfig) -> str:
    return (f"FDEConfig(dimension={c.dimension}, num_repetitions={c.num_repetitions}, "
            f"num_simhash_projections={c.num_simhash_projections}, projection_dim={c.projection_dim}, "
            f"final_projection_dimension={c.final_projection_dimension})")


class FDEEncoder:
    """Encoder with the config's random tables cached (simhash, AMS, count sketch + its bucket CSR).

    ``encode_queries`` uses SUM without fill, ``encode_documents`` uses AVERAGE
    with the config's ``fill_empty_partitions``; both share one set of tables,
    so query and document encodings are compatible whatever ``encoding_type``
    the config names.
    """

    def __init__(self, config: FDEConfig, backend: Optional[str] = None):
        self.config = _check_config(config)
        self.backend = backend
        self.query_config = config.replace(encoding_type="query", fill_empty_partitions=False)
        self.document_config = config.replace(encoding_type="document")
        self.tables = tables(config)

    @property
    def output_dimension(self) -> int:
        return self.config.output_dimension

    def encode(self, points, offsets=None, *, lengths=None):
        return fde_encode(points, offsets, self.config, self.backend, lengths=lengths)

    def encode_queries(self, points, offsets=None, *, lengths=None):
        return fde_encode(points, offsets, self.query_config, self.backend, lengths=lengths)

    def encode_documents(self, points, offsets=None, *, lengths=None):
        return fde_encode(points, offsets, self.document_config, self.backend, lengths=lengths)

    def encode_corpus(self, batches: Iterable, out=None, *, total: Optional[int] = None, progress: bool = True):
        """Stream document batches into ``out`` (an array or ``np.memmap`` (num_docs, D)) and return it.

        Each batch is a list of (n, d) arrays, a ``(points, offsets)`` pair or a
        ``(padded, lengths)`` pair with a 3-d first element. Rows are written in
        order; ``out=None`` collects the batches into one array. ``total``
        (documents) sizes the progress bar (tqdm when installed, else a line on
        stderr every ~2 s).

        ``out`` is checked before any batch is encoded: a writable float32
        numpy array (``np.memmap`` opened ``"w+"``/``"r+"`` included) of shape
        (num_docs, D); torch tensors, other dtypes and read-only arrays are
        rejected (TypeError / ValueError).
        """
        D = self.output_dimension
        _corpus_out(out, D)
        if out is None and total is not None:
            _checks.positive_int(total, "total", 0)
            _checks.fits(int(total) * D * 4, "cpu", f"encode_corpus: the ({int(total)}, {D}) float32 corpus of "
                         f"{_config_text(self.config)}")
        bar = Progress(total if total is not None else (out.shape[0] if out is not None else None), desc="encode_corpus",
                       unit="document", enabled=progress)
        row, collected = 0, []
        try:
            for i, batch in enumerate(batches):
                if isinstance(batch, tuple) and len(batch) == 2 and not isinstance(batch[0], (list, tuple)):
                    pts, second = batch
                    if getattr(pts, "ndim", 0) == 3:
                        enc = self.encode_documents(pts, lengths=second)
                    else:
                        enc = self.encode_documents(pts, second)
                else:
                    enc = self.encode_documents(list(batch))
                enc = enc.detach().cpu().numpy() if isinstance(enc, Tensor) else enc
                if out is None:
                    collected.append(enc)
                else:
                    if row + enc.shape[0] > out.shape[0]:
                        raise ValueError(f"out: has {out.shape[0]} rows, batch {i} would write rows up to "
                                         f"{row + enc.shape[0]}")
                    out[row:row + enc.shape[0]] = enc
                row += enc.shape[0]
                bar.update(enc.shape[0])
        finally:
            bar.close()
        if out is None:
            _checks.fits(row * D * 4, "cpu", f"encode_corpus: the ({row}, {D}) float32 corpus of "
                         f"{_config_text(self.config)}")
            return np.concatenate(collected) if collected else np.zeros((0, D), np.float32)
        if hasattr(out, "flush"):
            out.flush()
        return out


def _corpus_out(out, D: int) -> None:
    """encode_corpus's ``out``: checked up front, not after the first batch."""
    if out is None:
        return
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out: expected a numpy array or np.memmap of float32 (num_docs, {D}), got "
                        f"{type(out).__name__}")
    if out.dtype != np.float32:
        raise TypeError(f"out: expected dtype float32 (the encodings are float32; other dtypes would round or "
                        f"truncate them), got {out.dtype}")
    if out.ndim != 2 or out.shape[1] != D:
        raise ValueError(f"out: expected a 2-d (num_docs, {D}) array, got shape {out.shape}")
    if not out.flags.writeable:
        raise ValueError("out: expected a writable array, got a read-only one (a np.memmap opened with mode='r'? "
                         "use 'r+' or 'w+')")


# ---------------------------------------------------------------------------
# Chamfer (MaxSim) on torch ops: one code path for CPU and CUDA tensors


def _points_any(x, name):
    t, was_np = _checks.array_or_tensor(x, name)
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating dtype, got {_checks._dt(t.dtype)}")
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-d (N, d) array, got shape {tuple(t.shape)}")
    return t.to(torch.float32).contiguous(), was_np


def _chamfer_block(q: Tensor, q_off: Tensor, x: Tensor, x_off: Tensor) -> Tensor:
    Bq, Bd = q_off.numel() - 1, x_off.numel() - 1
    S = torch.zeros(Bq, Bd, dtype=torch.float32, device=q.device)
    if Bq == 0 or Bd == 0 or q.shape[0] == 0:
        return S
    doc_of = torch.repeat_interleave(torch.arange(Bd, device=q.device), x_off[1:] - x_off[:-1])
    qry_of = torch.repeat_interleave(torch.arange(Bq, device=q.device), q_off[1:] - q_off[:-1])
    sim = q @ x.T if x.shape[0] else q.new_zeros(q.shape[0], 0)  # (Nq, Nd)
    best = torch.full((q.shape[0], Bd), float("-inf"), dtype=torch.float32, device=q.device)
    if x.shape[0]:
        best = best.scatter_reduce(1, doc_of[None, :].expand(q.shape[0], -1), sim, "amax", include_self=True)
    return S.index_add(0, qry_of, best)


def _chamfer_inputs(q_points, q_offsets, d_points, d_offsets):
    """Validated (q, q_offsets, d, d_offsets, numpy_in) on the queries' device, shared by chamfer and rerank."""
    q, as_np = _points_any(q_points, "q_points")
    x, _ = _points_any(d_points, "d_points")
    if x.shape[1] != q.shape[1]:
        raise ValueError(f"d_points: expected shape (N, {q.shape[1]}) (the width of q_points), got {tuple(x.shape)}")
    x = x.to(q.device)
    qo = _checks.offsets_array(q_offsets, "q_offsets", q.shape[0], q.device)
    xo = _checks.offsets_array(d_offsets, "d_offsets", x.shape[0], q.device)
    return q, qo, x, xo, as_np


def chamfer(q_points, q_offsets, d_points, d_offsets, *, doc_chunk: int = 4096):
    """Chamfer (MaxSim) similarity of every query with every document.

    S[a, b] = sum over query a's points of max over document b's points of <q, x>
    (float32 GEMM). An empty query scores 0 against everything; an empty
    document scores -inf against a non-empty query.

    Args:
        q_points (Nq, d), q_offsets (Bq+1,); d_points (Nd, d), d_offsets (Bd+1,).
        doc_chunk: documents per block (an int >= 1); a block holds an
            (Nq, its document points) float32 similarity matrix.
    Returns:
        (Bq, Bd) float32; numpy for numpy input.
    Raises:
        MemoryError: the output plus the largest block exceed the memory available.
    """
    doc_chunk = _checks.positive_int(doc_chunk, "doc_chunk")
    q, qo, x, xo, as_np = _chamfer_inputs(q_points, q_offsets, d_points, d_offsets)
    Bq, Bd = qo.numel() - 1, xo.numel() - 1
    if Bd:
        edges = xo[torch.cat([torch.arange(0, Bd, doc_chunk, device=xo.device),
                              torch.tensor([Bd], device=xo.device)])]
        block_pts = int((edges[1:] - edges[:-1]).max())
    else:
        block_pts = 0
    need = 4 * (Bq * Bd + q.shape[0] * (block_pts + 2 * min(doc_chunk, Bd)) + Bq * min(doc_chunk, Bd))
    _checks.fits(need, q.device, f"chamfer: the ({Bq}, {Bd}) float32 output and blocks of {min(doc_chunk, Bd)} "
                 f"documents ({q.shape[0]} x {block_pts} similarities)")
    parts = []
    for b0 in range(0, max(Bd, 1), doc_chunk):
        b1 = min(b0 + doc_chunk, Bd)
        lo, hi = int(xo[b0]), int(xo[b1]) if Bd else 0
        parts.append(_chamfer_block(q, qo, x[lo:hi], xo[b0:b1 + 1] - lo))
    S = torch.cat(parts, 1) if parts else torch.zeros(qo.numel() - 1, 0)
    return S.cpu().numpy() if as_np else S


def chamfer_rerank(q_points, q_offsets, candidates, d_points, d_offsets, k: int):
    """Exact MaxSim reranking of FDE candidates.

    Args:
        candidates: (Bq, C) integer document ids per query (e.g. FDE top-C).
        k: 0 <= k <= C results to keep.
    Returns:
        (scores (Bq, k) float32, ids (Bq, k) int64): descending Chamfer score,
        ties broken by the earlier candidate position; numpy for numpy input.
    """
    q, qo, x, xo, as_np = _chamfer_inputs(q_points, q_offsets, d_points, d_offsets)
    cand = _checks.integer_array(candidates, "candidates")
    Bq, Bd = qo.numel() - 1, xo.numel() - 1
    if cand.dim() != 2 or cand.shape[0] != Bq:
        raise ValueError(f"candidates: expected shape ({Bq}, C), got {tuple(cand.shape)}")
    cand = cand.to(device=q.device, dtype=torch.int64)
    if cand.numel() and (int(cand.min()) < 0 or int(cand.max()) >= Bd):
        raise ValueError(f"candidates: expected ids in [0, {Bd}), got [{int(cand.min())}, {int(cand.max())}]")
    k = _checks.integer(k, "k")
    if not 0 <= k <= cand.shape[1]:
        raise ValueError(f"k: expected 0 <= k <= {cand.shape[1]} (the number of candidates), got {k}")
    scores = torch.empty(Bq, cand.shape[1], dtype=torch.float32, device=q.device)
    for a in range(Bq):
        ids = cand[a]
        lens = xo[ids + 1] - xo[ids]
        rows = torch.cat([torch.arange(int(xo[i]), int(xo[i + 1]), device=q.device) for i in ids.tolist()]) \
            if ids.numel() else torch.zeros(0, dtype=torch.int64, device=q.device)
        sub_off = torch.zeros(ids.numel() + 1, dtype=torch.int64, device=q.device)
        sub_off[1:] = torch.cumsum(lens, 0)
        scores[a] = _chamfer_block(q[int(qo[a]):int(qo[a + 1])], torch.tensor([0, int(qo[a + 1] - qo[a])],
                                   device=q.device), x[rows], sub_off)[0]
    # stable descending sort: ties keep the earlier candidate position
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    top_s = torch.gather(scores, 1, order)
    top_i = torch.gather(cand, 1, order)
    if as_np:
        return top_s.cpu().numpy(), top_i.cpu().numpy()
    return top_s, top_i


__all__ = ["FDEConfig", "FDEEncoder", "fde_encode", "chamfer", "chamfer_rerank", "DESCRIPTOR", "KERNELS", "tables"]
