"""Corpus-scale FDE encoding on Dask: one task per shard, written by the worker."""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
import zipfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .._progress import Progress
from ..ops.fde import FDEConfig, FDEEncoder
from . import _cluster

INDEX_FILE = "index.json"
FORMAT = "embkern-fde-shards/1"

# ---------------------------------------------------------------------------
# Worker side. These functions run in the worker processes; the module-level
# cache lives once per process, so the FDE tables (simhash, AMS, count sketch)
# are built once per worker and reused by every task it runs, not once per task.

_ENCODERS: Dict[tuple, FDEEncoder] = {}
_BUILDS = 0  # how many encoders this process has built (the tests read it on each worker)


def _encoder(config: FDEConfig, backend: Optional[str]) -> FDEEncoder:
    global _BUILDS
    key = (config, backend)
    enc = _ENCODERS.get(key)
    if enc is None:
        enc = _ENCODERS[key] = FDEEncoder(config, backend=backend)
        _BUILDS += 1
    return enc


def _load_shard(path: str):
    """A shard file as (points, offsets) or a padded (n_docs, L, d) array."""
    if path.endswith(".npz"):
        with np.load(path) as z:
            return z["points"], z["offsets"]
    return np.load(path)


def _encode_batch(batch, config: FDEConfig, backend: Optional[str]) -> np.ndarray:
    enc = _encoder(config, backend)
    if isinstance(batch, str):
        batch = _load_shard(batch)
    if isinstance(batch, tuple) and len(batch) == 2 and not isinstance(batch[0], (list, tuple)):
        pts, second = batch
        out = enc.encode_documents(pts, lengths=second) if getattr(pts, "ndim", 0) == 3 else \
            enc.encode_documents(pts, second)
    elif isinstance(batch, np.ndarray) and batch.ndim == 3:  # (n_docs, L, d): every document has L points
        out = enc.encode_documents(batch, lengths=np.full(batch.shape[0], batch.shape[1], np.int64))
    else:
        out = enc.encode_documents(list(batch))
    return np.ascontiguousarray(out.detach().cpu().numpy() if hasattr(out, "detach") else out, dtype=np.float32)


def _task(batch, config: FDEConfig, backend: Optional[str], out_dir: Optional[str], shard: int):
    """Encode one shard; write it to ``out_dir`` (returning its row count) or return the rows."""
    rows = _encode_batch(batch, config, backend)
    if out_dir is None:
        return rows
    final = os.path.join(out_dir, _shard_name(shard))
    # A task whose worker died may run again elsewhere (and the first attempt may
    # still be writing): each attempt writes its own temporary file and renames
    # it into place, which is atomic, so the shard is whole whichever attempt wins.
    tmp = f"{final}.{uuid.uuid4().hex}.tmp"
    np.save(tmp, rows)  # np.save appends .npy to a name without it
    os.replace(tmp + ".npy", final)
    return int(rows.shape[0])


def _shard_name(i: int) -> str:
    return f"part-{i:06d}.npy"


# ---------------------------------------------------------------------------
# Client side: inputs and output are checked before anything is submitted.


def _npy_header(f) -> Tuple[tuple, np.dtype]:
    version = np.lib.format.read_magic(f)
    reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if reader is None:
        raise ValueError(f"unsupported .npy format version {version}")
    shape, _, dtype = reader(f)
    return shape, dtype


def _check_shard_file(path: str, d: int) -> None:
    """Shapes from the headers only (a shard is not read here): a wrong dimension fails before the job starts."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"doc_batches: shard file {path!r} does not exist")
    if path.endswith(".npz"):
        try:
            with zipfile.ZipFile(path) as z:
                names = set(z.namelist())
                if not {"points.npy", "offsets.npy"} <= names:
                    raise ValueError(f"doc_batches: {path!r} must hold arrays 'points' (N, d) and 'offsets' "
                                     f"(n_docs + 1,), has {sorted(n[:-4] for n in names)}")
                with z.open("points.npy") as f:
                    shape, dtype = _npy_header(f)
        except zipfile.BadZipFile as exc:
            raise ValueError(f"doc_batches: {path!r} is not an .npz file ({exc})") from exc
        if len(shape) != 2 or shape[1] != d:
            raise ValueError(f"doc_batches: {path!r}: points must be (N, {d}) for config.dimension = {d}, "
                             f"got {shape}")
    elif path.endswith(".npy"):
        with open(path, "rb") as f:
            try:
                shape, dtype = _npy_header(f)
            except ValueError as exc:
                raise ValueError(f"doc_batches: {path!r} is not a readable .npy file ({exc})") from exc
        if len(shape) != 3 or shape[2] != d:
            raise ValueError(f"doc_batches: {path!r} must be a (n_docs, L, {d}) array for config.dimension = {d}, "
                             f"got {shape}")
    else:
        raise ValueError(f"doc_batches: shard files are .npz (points, offsets) or .npy (n_docs, L, d), got {path!r}")
    if not np.issubdtype(dtype, np.floating):
        raise TypeError(f"doc_batches: {path!r}: expected floating point values, got {dtype}")


def _inputs(doc_batches, d: int) -> Tuple[List[object], str]:
    """(one item per task: a path, a Delayed or a bag partition, what kind they are)."""
    try:
        import dask.bag as db
        from dask.delayed import Delayed
    except ImportError:
        _cluster._import_distributed()  # raises the install hint
        raise
    if isinstance(doc_batches, db.Bag):
        return list(doc_batches.to_delayed()), "bag partition"
    if isinstance(doc_batches, (str, os.PathLike)):
        raise TypeError("doc_batches: expected a list of shard files, a list of dask.delayed batches or a "
                        f"dask.bag, got one path {os.fspath(doc_batches)!r} (wrap it in a list)")
    if not isinstance(doc_batches, (list, tuple)):
        raise TypeError("doc_batches: expected a dask.bag, a list of dask.delayed batches or a list of .npy/.npz "
                        f"shard files, got {type(doc_batches).__name__}")
    items = list(doc_batches)
    if all(isinstance(x, (str, os.PathLike)) for x in items):
        paths = [os.path.abspath(os.fspath(x)) for x in items]
        for p in paths:
            _check_shard_file(p, d)
        return paths, "shard file"
    if all(isinstance(x, Delayed) for x in items):
        return items, "delayed batch"
    kinds = sorted({type(x).__name__ for x in items})
    raise TypeError(f"doc_batches: a list must hold only shard file paths or only dask.delayed batches, got {kinds}")


def _prepare_out(out, overwrite: bool) -> Optional[str]:
    if out is None:
        return None
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out: expected a directory path (a directory of .npy shards) or None, got "
                        f"{type(out).__name__}")
    path = os.path.abspath(os.fspath(out))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"out: {path!r} exists and is not a directory")
    os.makedirs(path, exist_ok=True)
    old = [n for n in os.listdir(path) if n == INDEX_FILE or (n.startswith("part-") and ".npy" in n)]
    if old:
        if not overwrite:
            raise FileExistsError(f"out: {path!r} already holds FDE shards ({len(old)} files); pass overwrite=True "
                                  "or an empty directory")
        for n in old:
            os.remove(os.path.join(path, n))
    return path


def encode_corpus(doc_batches, config: FDEConfig, out=None, client=None, *, n_workers: Optional[int] = None,
                  backend: Optional[str] = None, overwrite: bool = False, progress: bool = True):
    """FDE document encodings of a corpus, one Dask task per shard; equal to one process bit for bit.

    Args:
        doc_batches: the corpus in shards, in order. One of
            - a list of shard files, each ``.npz`` with ``points`` float (N, d)
              and ``offsets`` int (n_docs + 1,) (CSR), or ``.npy`` float
              (n_docs, L, d) (every document has L points). Workers read them,
              so on a cluster they must be on storage every worker sees;
            - a list of ``dask.delayed`` objects, each computing one batch in
              any form :meth:`embkern.FDEEncoder.encode_corpus` takes (a list
              of (n, d) arrays, ``(points, offsets)`` or ``(padded, lengths)``);
            - a ``dask.bag`` whose elements are documents ((n, d) arrays); each
              partition is one shard.
        config: :class:`embkern.FDEConfig`; documents are encoded with its
            document settings (AVERAGE, its ``fill_empty_partitions``), as
            ``FDEEncoder(config).encode_corpus`` does.
        out: a directory (created if missing) that receives one
            ``part-NNNNNN.npy`` float32 (rows, D) per shard, written by the
            worker that encoded it, plus ``index.json`` (config, rows per
            shard) written last. A directory of ``.npy`` files rather than a
            zarr array: shard row counts are only known once a shard is read,
            each task writes one whole file with an atomic rename (so a task
            retried after a worker died cannot leave a torn shard), no extra
            dependency is needed, and ``np.load(mmap_mode="r")`` reads a shard
            without copying. ``None``: the rows travel back to this process
            and one (num_docs, D) array is returned.
        client: a ``distributed.Client`` (its cluster runs the job) or None (a
            LocalCluster of ``n_workers`` processes is started and closed).
        backend: the FDE backend on the workers (None: the fastest there).
        overwrite: replace shards already in ``out`` (otherwise an error).
        progress: a bar over documents (and the dashboard link, when the
            cluster serves one) on stderr.
    Returns:
        ``out`` (the directory path) when given, else the (num_docs, D)
        float32 array. :func:`read_encodings` reads a directory back.
    Raises:
        TypeError / ValueError: bad ``doc_batches``, ``config`` or ``out``; a
            shard file whose shape does not match ``config.dimension`` (found
            from the file headers, before any task runs).
        FileNotFoundError: a shard file that does not exist.
        ValueError / TypeError from a task: re-raised with the shard's index as
            soon as it happens; the other tasks are cancelled.
    """
    if not isinstance(config, FDEConfig):
        raise TypeError(f"config: expected embkern.FDEConfig, got {type(config).__name__}")
    items, kind = _inputs(doc_batches, config.dimension)
    out_dir = _prepare_out(out, overwrite)
    D = config.output_dimension
    with _cluster.client_for(client, n_workers) as c:
        _cluster.dashboard_note(c, progress)
        futures = []
        for i, item in enumerate(items):
            if kind == "shard file":
                futures.append(c.submit(_task, item, config, backend, out_dir, i, pure=False))
            else:  # a Delayed: its graph goes with the task, the batch never passes through this process
                futures.append(c.compute(_delayed_task(item, config, backend, out_dir, i)))
        labels = [f"doc_batches[{i}] ({kind}{' ' + repr(items[i]) if kind == 'shard file' else ''})"
                  for i in range(len(items))]
        with Progress(None, desc="encode_corpus", unit="document", enabled=progress) as bar:
            results = _cluster.gather_in_order(
                c, futures, labels, bar, units=(lambda r: r) if out_dir is not None else (lambda r: r.shape[0]))
    if out_dir is None:
        return np.concatenate(results) if results else np.zeros((0, D), np.float32)
    index = {"format": FORMAT, "config": dataclasses.asdict(config), "dimension": D,
             "shards": [{"file": _shard_name(i), "rows": int(n)} for i, n in enumerate(results)],
             "rows": int(sum(results))}
    tmp = os.path.join(out_dir, INDEX_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(index, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, INDEX_FILE))
    return out_dir


def _delayed_task(item, config, backend, out_dir, i):
    import dask

    return dask.delayed(_task, pure=False)(item, config, backend, out_dir, i)


def read_encodings(out, *, mmap: bool = False):
    """The (num_docs, D) float32 encodings in an ``encode_corpus`` output directory, in corpus order.

    ``mmap=True`` returns the list of per-shard ``np.memmap`` arrays (read-only,
    nothing loaded) instead of one concatenated array.
    """
    path = os.fspath(out)
    index_path = os.path.join(path, INDEX_FILE)
    if not os.path.isfile(index_path):
        raise FileNotFoundError(f"out: {path!r} has no {INDEX_FILE} (not an encode_corpus output, or the job did "
                                "not finish)")
    with open(index_path) as f:
        index = json.load(f)
    if index.get("format") != FORMAT:
        raise ValueError(f"out: {index_path!r} has format {index.get('format')!r}, expected {FORMAT!r}")
    parts = [np.load(os.path.join(path, s["file"]), mmap_mode="r") for s in index["shards"]]
    for s, p in zip(index["shards"], parts):
        if p.shape != (s["rows"], index["dimension"]):
            raise ValueError(f"out: shard {s['file']} has shape {p.shape}, the index says "
                             f"({s['rows']}, {index['dimension']})")
    if mmap:
        return parts
    return np.concatenate(parts) if parts else np.zeros((0, index["dimension"]), np.float32)
