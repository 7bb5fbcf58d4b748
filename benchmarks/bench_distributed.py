#!/usr/bin/env python3
"""embkern.distributed throughput at 1 and 2 Dask workers against one process on the same data.

    python benchmarks/bench_distributed.py [--quick] [--workers 1,2] [--repeat 3] [--out PATH.md]

FDE: a synthetic multi-vector corpus (default 200,000 documents of 32 points,
d = 128, Gaussian, in .npz CSR shards of 10,000 documents, written once under
--data-dir and reused) encoded with R = 20, k = 5, fill, final projection 10240
(the MUVERA paper's document setting). Rows:

- one process, the C++ kernel at 1 and at 2 OpenMP threads, reading the same
  shard files in a loop (what a user without Dask writes);
- encode_corpus on a LocalCluster of n single-threaded worker processes,
  writing .npy shards (out=directory) — the cluster start is timed apart,
  since a long job pays it once.

Each job runs --repeat times; min / median / max seconds, documents/s and the
scaling ratio (median rate / one-process 1-thread rate). Every Dask output is
checked bit-equal to the one-process output.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import sys
import time

import numpy as np

import embkern
from embkern import _env
from embkern.bench import report, timing


def fde_data(data_dir: str, n_docs: int, n_points: int, d: int, shard_docs: int, seed: int = 0):
    """The shard paths of the synthetic corpus, writing the missing ones (deterministic per shard)."""
    root = os.path.join(data_dir, f"fde-n{n_docs}-p{n_points}-d{d}-s{shard_docs}")
    os.makedirs(root, exist_ok=True)
    paths = []
    for s, start in enumerate(range(0, n_docs, shard_docs)):
        n = min(shard_docs, n_docs - start)
        p = os.path.join(root, f"shard-{s:05d}.npz")
        if not os.path.exists(p):
            rng = np.random.default_rng([seed, s])
            pts = rng.standard_normal((n * n_points, d), dtype=np.float32)
            off = np.arange(0, (n + 1) * n_points, n_points, dtype=np.int64)
            tmp = p + ".tmp.npz"
            np.savez(tmp, points=pts, offsets=off)
            os.replace(tmp, p)
        paths.append(p)
    return paths


def one_process(paths, config, threads: int):
    timing.set_threads(threads)
    enc = embkern.FDEEncoder(config, backend="cpu")

    def batches():
        for p in paths:
            with np.load(p) as z:
                yield z["points"], z["offsets"]

    return enc.encode_corpus(batches(), progress=False)


def times(fn, repeat):
    """(output, seconds per run) of ``repeat`` runs after one untimed warm-up (tables, page cache, imports)."""
    out, samples = fn(), []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        samples.append(time.perf_counter() - t0)
    return out, samples


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="20,000 documents (a smoke run, not the issue's size)")
    ap.add_argument("--docs", type=int, default=None)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--data-dir", default=os.path.join("build", "bench-data"))
    ap.add_argument("--out", default=None, help="also write the markdown report here")
    args = ap.parse_args(argv)
    from distributed import Client, LocalCluster

    n_docs = args.docs or (20_000 if args.quick else 200_000)
    n_points, d, shard_docs = 32, 128, 10_000
    config = embkern.FDEConfig(dimension=d, num_repetitions=20, num_simhash_projections=5, seed=42,
                               encoding_type="document", fill_empty_partitions=True,
                               final_projection_dimension=10240)
    t0 = time.perf_counter()
    paths = fde_data(args.data_dir, n_docs, n_points, d, shard_docs)
    print(f"data: {len(paths)} shards ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    rows, base = [], None
    want = None
    for threads in (1, 2):
        want, s = times(lambda: one_process(paths, config, threads), args.repeat)
        med = statistics.median(s)
        base = base or med
        rows.append([f"one process, {threads} thread{'s' if threads > 1 else ''}", "-",
                     *(report.fmt_time(x) for x in (min(s), med, max(s))), f"{n_docs / med:,.0f}",
                     f"{base / med:.2f}", "-"])
        print(rows[-1], file=sys.stderr)
    out_dir = os.path.join(args.data_dir, "fde-out")
    for n in (int(x) for x in args.workers.split(",")):
        t0 = time.perf_counter()
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address=None, silence_logs=40)
        client = Client(cluster)
        client.wait_for_workers(n)
        client.run(lambda: __import__("embkern").FDEEncoder)  # import torch + embkern on every worker
        start_s = time.perf_counter() - t0
        try:
            _, s = times(lambda: embkern.distributed.encode_corpus(paths, config, out_dir, client=client,
                                                                  overwrite=True, progress=False), args.repeat)
            equal = np.array_equal(embkern.distributed.read_encodings(out_dir), want)
        finally:
            client.close()
            cluster.close()
        med = statistics.median(s)
        rows.append([f"encode_corpus, LocalCluster", str(n), *(report.fmt_time(x) for x in (min(s), med, max(s))),
                     f"{n_docs / med:,.0f}", f"{base / med:.2f}", f"{start_s:.1f} s; bit-equal: {equal}"])
        print(rows[-1], file=sys.stderr)
    shutil.rmtree(out_dir, ignore_errors=True)
    head = (f"# embkern.distributed: FDE encode_corpus\n\n{_env.cpu_model()}, {os.cpu_count()} cores; "
            f"{dt.date.today()}; {n_docs:,} documents x {n_points} points, d = {d}, {len(paths)} .npz shards of "
            f"{shard_docs:,}; R = 20, k = 5, fill, final projection 10240; {args.repeat} runs each\n")
    table = report.table(["job", "workers", "min", "median", "max", "docs/s", "x one process (1 thread)",
                          "cluster start; output"], rows, right=(1, 2, 3, 4, 5, 6), markdown=True)
    text = head + "\n" + table + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
