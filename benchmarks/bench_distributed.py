#!/usr/bin/env python3
"""embkern.distributed throughput at 1 and 2 Dask workers against one process on the same data.

    python benchmarks/bench_distributed.py [--quick] [--job fde,cipher] [--workers 1,2] [--repeat N] [--out PATH.md]

FDE: a synthetic multi-vector corpus (default 200,000 documents of 32 points,
d = 128, Gaussian, in .npz CSR shards of 10,000 documents, written once under
--data-dir and reused) encoded with R = 20, k = 5, fill, final projection 10240
(the MUVERA paper's document setting). Rows:

- one process, the C++ kernel at 1 and at 2 OpenMP threads, reading the same
  shard files in a loop (what a user without Dask writes);
- encode_corpus on a LocalCluster of n single-threaded worker processes,
  writing .npy shards (out=directory) — the cluster start is timed apart,
  since a long job pays it once.

Bit cipher: a synthetic text file (default 200M tokens: Zipf(1.1) truncated to 50k
words "w0".."w49999", 100 tokens a line, one document per line), raw text to
b = 64 sum-mode vectors (window 5, cos2). One process: tokenize_file (the
vocabulary pass) + BitCipher.fit + cooccurrence_vectors over lazy 10M-token
chunks at 1 and 2 threads; Dask: fit_cipher + cooccurrence_vectors over 64 MiB
blocks. Both phases are timed apart (vocabulary, co-occurrence).

Each job runs --repeat times (default 3 with --quick, 1 at the full sizes);
min / median / max seconds, rate and the scaling ratio (median rate /
one-process 1-thread rate). Every Dask output is checked bit-equal to the
one-process output.
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


def times(fn, repeat, warm=None):
    """(output, seconds per run) of ``repeat`` runs, after ``warm()`` (untimed: tables, page cache, imports)."""
    if warm is not None:
        warm()
    out, samples = None, []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        samples.append(time.perf_counter() - t0)
    return out, samples


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


def one_process(paths, config, threads: int, out=None):
    timing.set_threads(threads)
    enc = embkern.FDEEncoder(config, backend="cpu")

    def batches():
        for p in paths:
            with np.load(p) as z:
                yield z["points"], z["offsets"]

    return enc.encode_corpus(batches(), out, progress=False)


def text_data(data_dir: str, n_tokens: int, V: int = 50_000, line: int = 100, seed: int = 0) -> str:
    """A synthetic corpus file (written once): Zipf(1.1) word ids truncated to V types (the bench's
    zipf_ids), ``line`` words a line."""
    from embkern.bench.bit_cipher import zipf_ids

    p = os.path.join(data_dir, f"text-zipf-n{n_tokens}-V{V}.txt")
    if os.path.exists(p):
        return p
    os.makedirs(data_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(V)]
    tmp = p + ".tmp"
    with open(tmp, "w") as f:
        for start in range(0, n_tokens, 1_000_000):
            ids = zipf_ids(rng, V, min(1_000_000, n_tokens - start)).tolist()
            f.write("\n".join(" ".join(map(words.__getitem__, ids[i:i + line])) for i in range(0, len(ids), line)))
            f.write("\n")
    os.replace(tmp, p)
    return p


def _stats(s):
    return [report.fmt_time(x) for x in (min(s), statistics.median(s), max(s))]


def _cluster(n):
    from distributed import Client, LocalCluster

    t0 = time.perf_counter()
    cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address=None, silence_logs=40)
    client = Client(cluster)
    client.wait_for_workers(n)
    client.run(lambda: __import__("embkern").FDEEncoder)  # import torch + embkern on every worker
    return cluster, client, time.perf_counter() - t0


def bench_fde(args, repeat):
    n_docs = args.docs or (20_000 if args.quick else 200_000)
    n_points, d, shard_docs = 32, 128, 10_000
    config = embkern.FDEConfig(dimension=d, num_repetitions=20, num_simhash_projections=5, seed=42,
                               encoding_type="document", fill_empty_partitions=True,
                               final_projection_dimension=2048)
    t0 = time.perf_counter()
    paths = fde_data(args.data_dir, n_docs, n_points, d, shard_docs)
    print(f"fde data: {len(paths)} shards ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    rows, base, want = [], None, None
    mm_path = os.path.join(args.data_dir, "fde-one-process.f32")
    for threads in (1, 2):
        out = np.memmap(mm_path, np.float32, "w+", shape=(n_docs, config.output_dimension))
        _, s = times(lambda: one_process(paths, config, threads, out), repeat,
                     warm=lambda: one_process(paths[:1], config, threads))
        want = np.array(out)
        del out
        med = statistics.median(s)
        base = base or med
        rows.append([f"one process, {threads} thread{'s' if threads > 1 else ''} (np.memmap out)", "-", *_stats(s),
                     f"{n_docs / med:,.0f}", f"{base / med:.2f}", "-"])
        print(rows[-1], file=sys.stderr)
    os.remove(mm_path)
    out_dir = os.path.join(args.data_dir, "fde-out")
    for n in args.workers:
        cluster, client, start_s = _cluster(n)
        try:
            _, s = times(lambda: embkern.distributed.encode_corpus(paths, config, out_dir, client=client,
                                                                  overwrite=True, progress=False), repeat,
                         warm=lambda: embkern.distributed.encode_corpus(paths[:n], config, client=client,
                                                                       progress=False))
            equal = np.array_equal(embkern.distributed.read_encodings(out_dir), want)
        finally:
            client.close()
            cluster.close()
        med = statistics.median(s)
        rows.append(["encode_corpus (.npy shards out)", str(n), *_stats(s), f"{n_docs / med:,.0f}",
                     f"{base / med:.2f}", f"{start_s:.1f} s; bit-equal: {equal}"])
        print(rows[-1], file=sys.stderr)
    shutil.rmtree(out_dir, ignore_errors=True)
    head = (f"## FDE encode_corpus\n\n{n_docs:,} documents x {n_points} points, d = {d}, {len(paths)} .npz shards "
            f"of {shard_docs:,}; R = 20, k = 5, fill, final projection 2048; {repeat} run(s) each after a warm-up\n")
    table = report.table(["job", "workers", "min", "median", "max", "docs/s", "x one process (1 thread)",
                          "cluster start; output"], rows, right=(1, 2, 3, 4, 5, 6), markdown=True)
    return head + "\n" + table + "\n"


def bench_cipher(args, repeat):
    n_tokens = args.tokens or (10_000_000 if args.quick else 200_000_000)
    t0 = time.perf_counter()
    path = text_data(args.data_dir, n_tokens)
    print(f"cipher data: {os.path.getsize(path) / 1e6:.0f} MB ready in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)
    kw = dict(window=5, mode="sum", weight="cos2")
    rows, base, want = [], None, None
    for threads in (() if args.dask_only else (1, 2)):
        timing.set_threads(threads)
        p1, p2 = [], []
        for _ in range(repeat):
            t0 = time.perf_counter()
            chunks, _, vocab = embkern.tokenize_file(path, chunk_tokens=10_000_000)
            cipher = embkern.BitCipher.fit(chunks, vocab_size=len(vocab))
            t1 = time.perf_counter()
            want = embkern.cooccurrence_vectors(chunks, None, cipher, progress=False, **kw)
            p1.append(t1 - t0)
            p2.append(time.perf_counter() - t1)
        tot = [a + b for a, b in zip(p1, p2)]
        med = statistics.median(tot)
        base = base or med
        rows.append([f"one process, {threads} thread{'s' if threads > 1 else ''}", "-", *_stats(p1), *_stats(p2),
                     *_stats(tot), f"{n_tokens / med / 1e6:.2f}", f"{base / med:.2f}", "-"])
        print(rows[-1], file=sys.stderr)
    for n in args.workers:
        cluster, client, start_s = _cluster(n)
        try:
            p1, p2 = [], []
            for _ in range(repeat):
                t0 = time.perf_counter()
                cipher, vocab = embkern.distributed.fit_cipher(path, client=client, progress=False)
                t1 = time.perf_counter()
                got = embkern.distributed.cooccurrence_vectors(path, cipher, vocab, client=client, progress=False,
                                                               **kw)
                p1.append(t1 - t0)
                p2.append(time.perf_counter() - t1)
            equal = "not checked" if want is None else bool(got.shape == want.shape and (got == want).all())
        finally:
            client.close()
            cluster.close()
        tot = [a + b for a, b in zip(p1, p2)]
        med = statistics.median(tot)
        rows.append(["fit_cipher + cooccurrence_vectors", str(n), *_stats(p1), *_stats(p2), *_stats(tot),
                     f"{n_tokens / med / 1e6:.2f}", f"{base / med:.2f}" if base else "-",
                     f"{start_s:.1f} s; bit-equal: {equal}"])
        print(rows[-1], file=sys.stderr)
    head = (f"## Bit-cipher vectors from raw text\n\n{n_tokens:,} tokens ({os.path.getsize(path) / 1e6:.0f} MB, "
            f"one file, Zipf(1.1) over 50k words, 100 a line), b = 64 (default bits), sum mode, window 5, cos2; "
            f"Dask blocks of 64 MiB; {repeat} run(s) each\n")
    table = report.table(["job", "workers", "vocab min", "vocab med", "vocab max", "counts min", "counts med",
                          "counts max", "total min", "total med", "total max", "M tokens/s",
                          "x one process (1 thread)", "cluster start; output"], rows,
                         right=tuple(range(1, 13)), markdown=True)
    return head + "\n" + table + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="20,000 documents and 10M tokens (not the issue's sizes)")
    ap.add_argument("--job", default="fde,cipher")
    ap.add_argument("--docs", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--data-dir", default=os.path.join("build", "bench-data"))
    ap.add_argument("--out", default=None, help="also write the markdown report here")
    ap.add_argument("--dask-only", action="store_true",
                    help="cipher job: only the Dask rows (no one-process baseline, so no bit-equality check)")
    args = ap.parse_args(argv)
    args.workers = [int(x) for x in args.workers.split(",")]
    repeat = args.repeat or (3 if args.quick else 1)
    jobs = [j.strip() for j in args.job.split(",")]
    for j in jobs:
        if j not in ("fde", "cipher"):
            raise SystemExit(f"--job: expected fde and/or cipher, got {j!r}")
    parts = [f"# embkern.distributed\n\n{_env.cpu_model()}, {os.cpu_count()} cores, {dt.date.today()}; "
             "LocalCluster workers are single-threaded processes on this machine\n"]
    if "fde" in jobs:
        parts.append(bench_fde(args, repeat))
    if "cipher" in jobs:
        parts.append(bench_cipher(args, repeat))
    text = "\n".join(parts)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
