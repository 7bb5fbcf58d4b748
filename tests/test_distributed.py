"""embkern.distributed on a real LocalCluster: 2 worker processes on loopback,
started and closed by the fixture, every wait bounded."""

from __future__ import annotations

import faulthandler
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import embkern
from helpers import oracle

distributed = oracle("distributed")
dask = oracle("dask")
import dask.bag as db  # noqa: E402

from embkern.distributed import _fde, encode_corpus, read_encodings  # noqa: E402

JOB_TIMEOUT_S = 240  # a hung job dumps the stacks and ends the run instead of blocking CI


@pytest.fixture(scope="module")
def client():
    faulthandler.dump_traceback_later(JOB_TIMEOUT_S * 3, exit=True)
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                       dashboard_address=None, silence_logs=40)
    c = distributed.Client(cluster, timeout=60)
    try:
        c.wait_for_workers(2, timeout=120)
        yield c
    finally:
        c.close()
        cluster.close()
        faulthandler.cancel_dump_traceback_later()


CONFIG = embkern.FDEConfig(dimension=16, num_repetitions=3, num_simhash_projections=3, seed=7,
                           encoding_type="document", fill_empty_partitions=True, final_projection_dimension=96)


def _docs(n, seed, d=16, max_len=9):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((int(rng.integers(1, max_len)), d)).astype(np.float32) for _ in range(n)]


def _write_shards(tmp_path, n_shards, docs_per_shard, d=16, padded_every=0):
    paths, docs = [], []
    for s in range(n_shards):
        part = _docs(docs_per_shard, 100 + s, d)
        if padded_every and s % padded_every == 0:  # a (n_docs, L, d) .npy: every document has L points
            L = 5
            arr = np.stack([np.resize(x, (L, d)) for x in part]).astype(np.float32)
            p = tmp_path / f"shard{s}.npy"
            np.save(p, arr)
            docs.extend(list(arr))
        else:
            off = np.concatenate([[0], np.cumsum([len(x) for x in part])]).astype(np.int64)
            p = tmp_path / f"shard{s}.npz"
            np.savez(p, points=np.concatenate(part), offsets=off)
            docs.extend(part)
        paths.append(str(p))
    return paths, docs


def _single_process(docs, config=CONFIG):
    return embkern.FDEEncoder(config).encode_corpus([docs], progress=False)


def _gate_workers(client, module, name, key, released, release_file):
    """Make ``module.name`` in every worker process wait for ``release_file`` unless
    ``key(*args)`` is in ``released``. The kill tests use it so that the kill always lands
    while work is left: without it a fast machine finished all 16 FDE shards between two
    polls of the output folder and the test failed. The task functions look the loader up
    by name when they run, so patching the module attribute reaches them; a worker the
    nanny restarts runs the plain loader."""

    def install(dask_worker=None):
        import importlib
        import os as _os
        import time as _time

        mod = importlib.import_module(module)
        plain = getattr(mod, "_ungated_" + name, None) or getattr(mod, name)

        def gated(*args, **kwargs):
            if key(*args) not in released:
                t_end = _time.monotonic() + JOB_TIMEOUT_S
                while not _os.path.exists(release_file) and _time.monotonic() < t_end:
                    _time.sleep(0.01)
            return plain(*args, **kwargs)

        setattr(mod, "_ungated_" + name, plain)
        setattr(mod, name, gated)

    def remove(dask_worker=None):
        import importlib

        mod = importlib.import_module(module)
        plain = getattr(mod, "_ungated_" + name, None)
        if plain is not None:
            setattr(mod, name, plain)
            delattr(mod, "_ungated_" + name)

    client.run(install)
    return remove


def test_shard_files_equal_one_process(client, tmp_path):
    paths, docs = _write_shards(tmp_path, 5, 37, padded_every=3)
    out = encode_corpus(paths, CONFIG, tmp_path / "out", client=client, progress=False)
    got = read_encodings(out)
    want = _single_process(docs)
    assert got.shape == (len(docs), CONFIG.output_dimension)
    assert np.array_equal(got, want)  # bit for bit, whatever worker encoded which shard
    parts = read_encodings(out, mmap=True)
    assert [p.shape[0] for p in parts] == [37] * 5
    # in memory (out=None) gives the same bits
    assert np.array_equal(encode_corpus(paths, CONFIG, client=client, progress=False), want)


def test_delayed_and_bag_inputs_equal_one_process(client):
    docs = _docs(120, 3)
    batches = [docs[i:i + 25] for i in range(0, len(docs), 25)]
    delayed = [dask.delayed(lambda b: b)(b) for b in batches]
    want = _single_process(docs)
    assert np.array_equal(encode_corpus(delayed, CONFIG, client=client, progress=False), want)
    bag = db.from_sequence(docs, npartitions=7)
    assert np.array_equal(encode_corpus(bag, CONFIG, client=client, progress=False), want)
    # a (points, offsets) batch and a (padded, lengths) batch
    off = np.concatenate([[0], np.cumsum([len(x) for x in docs])]).astype(np.int64)
    pts = np.concatenate(docs)
    L = max(len(x) for x in docs)
    padded = np.zeros((len(docs), L, 16), np.float32)
    for i, x in enumerate(docs):
        padded[i, :len(x)] = x
    lengths = np.array([len(x) for x in docs])
    for batch in ((pts, off), (padded, lengths)):
        got = encode_corpus([dask.delayed(lambda b: b)(batch)], CONFIG, client=client, progress=False)
        assert np.array_equal(got, want)


def test_tables_built_once_per_worker(client, tmp_path):
    cfg = CONFIG.replace(seed=12345)  # a config no earlier test used: the count starts from this job
    before = client.run(lambda: _fde._BUILDS)
    paths, _ = _write_shards(tmp_path, 12, 10)
    encode_corpus(paths, cfg, client=client, progress=False)
    after = client.run(lambda: _fde._BUILDS)
    new = {w: after[w] - before.get(w, 0) for w in after}
    assert sum(new.values()) <= len(after)  # 12 tasks, at most one table build per worker
    assert all(n <= 1 for n in new.values()), new


def test_killed_worker_is_retried_and_exact(client, tmp_path):
    paths, docs = _write_shards(tmp_path, 16, 300)
    want = _single_process(docs)
    pids = client.run(os.getpid)
    victim = sorted(pids)[0]
    release = str(tmp_path / "release")
    # shards 0 and 1 load at once, the other 14 wait for the release file: at the kill
    # both workers are busy (encoding or waiting to load) and at most 2 shards are done
    ungate = _gate_workers(client, "embkern.distributed._fde", "_load_shard", os.path.basename,
                           {os.path.basename(p) for p in paths[:2]}, release)
    result = {}

    def job():
        try:
            result["out"] = encode_corpus(paths, CONFIG, tmp_path / "out", client=client, progress=False)
        except BaseException as exc:  # reported below
            result["error"] = exc

    t = threading.Thread(target=job)
    t.start()
    try:
        out_dir = tmp_path / "out"
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline and not (out_dir.exists() and any(p.name.startswith("part-")
                                                                             for p in out_dir.iterdir())):
            time.sleep(0.02)
        done_at_kill = sum(1 for p in out_dir.iterdir() if p.name.startswith("part-") and p.suffix == ".npy"
                           and ".tmp" not in p.name) if out_dir.exists() else 0
        os.kill(pids[victim], signal.SIGKILL)  # mid-job: its running task is lost
    finally:
        open(release, "w").close()
    t.join(JOB_TIMEOUT_S)
    assert not t.is_alive(), "encode_corpus did not finish after a worker was killed"
    assert "error" not in result, result.get("error")
    got = read_encodings(result["out"])
    assert np.array_equal(got, want)
    assert done_at_kill <= 2, f"{done_at_kill} shards were done before the gate opened"
    print("shards done when the worker was killed:", done_at_kill, "of", len(paths))
    client.wait_for_workers(2, timeout=120)  # the nanny restarts the killed worker for the next tests
    assert pids[victim] not in client.run(os.getpid).values()  # it really died and was replaced
    client.run(ungate)  # the surviving worker still holds the gate


def test_bad_input_fails_fast(client, tmp_path):
    paths, _ = _write_shards(tmp_path, 2, 4)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        encode_corpus(paths + [str(tmp_path / "missing.npz")], CONFIG, client=client, progress=False)
    with pytest.raises(ValueError, match=r"config.dimension = 32"):
        encode_corpus(paths, CONFIG.replace(dimension=32), client=client, progress=False)
    with pytest.raises(TypeError, match="config: expected embkern.FDEConfig"):
        encode_corpus(paths, {"dimension": 16}, client=client, progress=False)
    with pytest.raises(TypeError, match="wrap it in a list"):
        encode_corpus(paths[0], CONFIG, client=client, progress=False)
    with pytest.raises(TypeError, match="doc_batches: expected"):
        encode_corpus(42, CONFIG, client=client, progress=False)
    out = encode_corpus(paths, CONFIG, tmp_path / "o", client=client, progress=False)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        encode_corpus(paths, CONFIG, out, client=client, progress=False)
    encode_corpus(paths, CONFIG, out, client=client, progress=False, overwrite=True)
    # a batch that only turns out wrong on the worker: its error comes back with the shard, not a hang
    bad = [dask.delayed(lambda: _docs(3, 1, d=8))()]
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"doc_batches\[0\].*16"):
        encode_corpus(bad, CONFIG, client=client, progress=False)
    assert time.monotonic() - t0 < JOB_TIMEOUT_S
    with pytest.raises(FileNotFoundError, match="index.json"):
        read_encodings(tmp_path)


def test_import_embkern_does_not_import_dask():
    code = "import sys, embkern; embkern.fde_encode; print(any(m == 'dask' or m.startswith('dask.') for m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


# --------------------------------------------------------------------------- bit-cipher co-occurrence


def _text_corpus(tmp_path, n_files=2, lines=300, seed=0, blank_blocks=False):
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(120)] + ["Alpha", "beta,", "Gamma!", "ünï", "x_y"]
    paths = []
    for f in range(n_files):
        out = []
        for i in range(lines):
            n = int(rng.integers(0, 12))
            line = " ".join(words[min(int(rng.zipf(1.3)) - 1, len(words) - 1)] for _ in range(n))
            if blank_blocks and rng.random() < 0.2:
                line = ""  # a blank line ends a blank-line document
            out.append(line)
        p = tmp_path / f"text{f}.txt"
        p.write_text("\n".join(out) + ("\r\n" if f % 2 else "\n"), encoding="utf-8")
        paths.append(str(p))
    return paths


def _one_process(paths, blank_line_docs=False, min_count=1, **kw):
    ids, offs, vocab = [], [0], None
    # one corpus over the files in order: tokenize the concatenation
    cat = os.path.join(os.path.dirname(paths[0]), "all.txt")
    with open(cat, "wb") as out:
        for p in paths:
            with open(p, "rb") as f:
                data = f.read()
            out.write(data if data.endswith(b"\n") else data + b"\n")
            if blank_line_docs:
                out.write(b"\n")  # documents never run across files
    t, o, vocab = embkern.tokenize_file(cat, min_count=min_count, blank_line_docs=blank_line_docs)
    cipher = embkern.BitCipher.fit(t, vocab_size=len(vocab))
    return cipher, vocab, embkern.cooccurrence_vectors(t, o, cipher, progress=False, **kw)


@pytest.mark.parametrize("blank", [False, True])
def test_cipher_jobs_equal_one_process_any_blocksize(client, tmp_path, blank):
    from embkern import distributed as dist

    paths = _text_corpus(tmp_path, blank_blocks=blank)
    want_cipher, want_vocab, want = _one_process(paths, blank_line_docs=blank, min_count=2, mode="concat",
                                                 window=3)
    for bs in (97, 1000, 1 << 20):  # many blocks, a few, one per file
        cipher, vocab = dist.fit_cipher(paths, client=client, min_count=2, blank_line_docs=blank, blocksize=bs,
                                        progress=False)
        assert vocab == want_vocab
        assert torch.equal(cipher.codes, want_cipher.codes) and torch.equal(cipher.rank, want_cipher.rank)
        got = dist.cooccurrence_vectors(paths, cipher, vocab, client=client, window=3, mode="concat",
                                        blank_line_docs=blank, blocksize=bs, progress=False)
        assert torch.equal(got, want), f"blocksize {bs}"


def test_cipher_bad_input(client, tmp_path):
    from embkern import distributed as dist

    paths = _text_corpus(tmp_path, n_files=1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dist.fit_cipher(paths + [str(tmp_path / "nope.txt")], client=client, progress=False)
    cipher, vocab = dist.fit_cipher(paths, client=client, progress=False)
    with pytest.raises(ValueError, match="vocab: has"):
        dist.cooccurrence_vectors(paths, cipher, vocab[:-1], client=client, progress=False)
    with pytest.raises(ValueError, match="blocksize"):
        dist.cooccurrence_vectors(paths, cipher, vocab, client=client, blocksize=0, progress=False)
    with pytest.raises(ValueError, match="window"):
        dist.cooccurrence_vectors(paths, cipher, vocab, client=client, window=0, progress=False)


def test_cipher_counts_survive_a_killed_worker(client, tmp_path):
    from embkern import distributed as dist

    paths = _text_corpus(tmp_path, n_files=2, lines=6000, seed=4)
    want_cipher, want_vocab, want = _one_process(paths, mode="concat", window=4)
    cipher, vocab = dist.fit_cipher(paths, client=client, blocksize=4096, progress=False)
    assert vocab == want_vocab
    pids = client.run(os.getpid)
    victim = pids[sorted(pids)[0]]
    blocks = dist._cipher._blocks([os.path.abspath(p) for p in paths], 4096, False)
    release = str(tmp_path / "release")
    # the first 3 blocks are read at once, the rest wait for the release file: at the kill
    # both workers are busy and at most 3 blocks are counted
    ungate = _gate_workers(client, "embkern.distributed._cipher", "_block_bytes",
                           lambda path, start, end: (os.path.basename(path), start),
                           {(os.path.basename(p), a) for p, a, _ in blocks[:3]}, release)
    result = {}

    def job():
        try:
            result["v"] = dist.cooccurrence_vectors(paths, cipher, vocab, client=client, window=4, mode="concat",
                                                   blocksize=4096, progress=False)
        except BaseException as exc:  # reported below
            result["error"] = exc

    def done_tasks(dask_scheduler):
        return sum(1 for ts in dask_scheduler.tasks.values() if ts.state == "memory" and "count_task" in str(ts.key))

    t = threading.Thread(target=job)
    t.start()
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline and client.run_on_scheduler(done_tasks) < 1:
            time.sleep(0.02)
        at_kill = client.run_on_scheduler(done_tasks)
        os.kill(victim, signal.SIGKILL)  # its block results in memory and its running task are lost and recomputed
    finally:
        open(release, "w").close()
    t.join(JOB_TIMEOUT_S)
    assert not t.is_alive(), "cooccurrence_vectors did not finish after a worker was killed"
    assert "error" not in result, result.get("error")
    assert torch.equal(result["v"], want)
    assert len(blocks) > 3 and at_kill <= 3, f"{at_kill} of {len(blocks)} blocks were counted before the gate opened"
    print("blocks counted when the worker was killed:", at_kill, "of", len(blocks))
    client.wait_for_workers(2, timeout=120)
    client.run(ungate)


def test_dashboard_note(capsys):
    from embkern.distributed import _cluster

    class WithLink:
        dashboard_link = "http://127.0.0.1:8787/status"

    class NoDashboard:
        @property
        def dashboard_link(self):
            raise KeyError("dashboard")  # what a scheduler without bokeh gives

    _cluster.dashboard_note(WithLink(), True)
    assert "Dask dashboard at http://127.0.0.1:8787/status" in capsys.readouterr().err
    _cluster.dashboard_note(WithLink(), False)
    _cluster.dashboard_note(NoDashboard(), True)
    assert capsys.readouterr().err == ""
