"""The Dask plumbing both jobs share: the client, progress, task errors."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, List, Optional, Sequence

from .._progress import Progress


def _import_distributed():
    try:
        import dask  # noqa: F401
        import distributed
    except ImportError as exc:  # the extra is optional: say how to get it
        raise ImportError("embkern.distributed needs Dask: pip install 'embkern[distributed]' "
                          f"(or 'dask[distributed]'); {exc}") from exc
    return distributed


@contextlib.contextmanager
def client_for(client=None, n_workers: Optional[int] = None) -> Iterator[object]:
    """``client`` itself, or a Client of a fresh LocalCluster that is closed on exit.

    The LocalCluster has ``n_workers`` (default: the usable cores) worker
    processes of one thread each: embkern's kernels are single-task compute, so
    one process per core keeps the GIL out of the way, and the nanny sets
    OMP_NUM_THREADS=1 before each worker starts, so workers do not oversubscribe
    the cores with OpenMP threads. The cluster listens on loopback only.
    """
    distributed = _import_distributed()
    if client is not None:
        if not isinstance(client, distributed.Client):
            raise TypeError(f"client: expected a distributed.Client or None, got {type(client).__name__}")
        if n_workers is not None:
            raise ValueError("n_workers: only for client=None (the LocalCluster embkern starts); a given client "
                             "runs on the workers its cluster has")
        yield client
        return
    if n_workers is None:
        n_workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not isinstance(n_workers, int) or isinstance(n_workers, bool) or n_workers < 1:
        raise ValueError(f"n_workers: expected an int >= 1, got {n_workers!r}")
    import logging

    cluster = distributed.LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                       host="127.0.0.1", dashboard_address=":0", silence_logs=logging.ERROR)
    try:
        with distributed.Client(cluster) as c:
            yield c
    finally:
        cluster.close()


def dashboard_note(client, enabled: bool) -> None:
    """Print the dashboard link to stderr when the cluster serves one (it needs bokeh)."""
    if not enabled:
        return
    try:
        link = client.dashboard_link
    except Exception:  # no dashboard (bokeh missing, or a scheduler started without one)
        link = None
    if link:
        print(f"embkern.distributed: Dask dashboard at {link}", file=sys.stderr, flush=True)


def gather_in_order(client, futures: Sequence, labels: Sequence[str], bar: Progress, units=None,
                    keep: bool = True) -> List[object]:
    """Wait for every future, updating ``bar`` as each finishes; return results in submission order.

    A task that raised is reported at once with its label (the remaining
    futures are cancelled), so a bad shard ends the job instead of leaving it
    waiting. ``units(result)`` is what each result adds to the bar (default 1).
    ``keep=False`` leaves the results on the workers (for a reduction there)
    and returns Nones.
    """
    distributed = _import_distributed()
    index = {f.key: i for i, f in enumerate(futures)}
    results: List[object] = [None] * len(futures)
    try:
        for fut in distributed.as_completed(futures):
            i = index[fut.key]
            if fut.status == "error":
                exc = fut.exception()
                if isinstance(exc, (ValueError, TypeError, OSError)):
                    raise type(exc)(f"{labels[i]}: {exc}") from exc
                raise exc
            if keep:
                results[i] = fut.result()
            bar.update(units(results[i]) if units is not None and keep else 1)
    except BaseException:
        client.cancel(list(futures))
        raise
    return results
