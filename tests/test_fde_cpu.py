"""The C++ FDE encoder at its edges: large k, memory limits, plan ownership,
bounds of the raw ``embkern._C.fde`` functions, one wording per check.

Crash-prone cases run in a child process (``_run_child``) so that an abort or
a segfault is a test failure that prints the input, not a dead test run.
Parity is checked against the shipped reference (``backend="reference"``) at
sizes where it is cheap, and bit for bit across the ISA levels.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import embkern
from embkern.reference import fde as ref
from helpers import assert_same_bits, at_each, cpu_isa

C = embkern._backends.cpu_module()
F = C.fde
LEVELS = list(dict(C.isa_info())["available"])


def _run_child(code: str, timeout: int = 240) -> str:
    """Runs `code` in a fresh interpreter; fails with its input and output unless it exits 0."""
    code = textwrap.dedent(code)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                       env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2")))
    if p.returncode != 0:
        how = f"signal {-p.returncode}" if p.returncode < 0 else f"exit {p.returncode}"
        pytest.fail(f"child died ({how}) on:\n{code}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-3000:]}")
    return p.stdout


def _bits(x):
    return np.ascontiguousarray(np.asarray(x, np.float32)).view(np.uint32)


def _docs(lengths, d, seed, dup=False):
    """Points of documents with the given lengths; dup repeats each document's first point (shared partitions)."""
    rng = np.random.default_rng(seed)
    parts = []
    for n in lengths:
        x = rng.standard_normal((n, d)).astype(np.float32)
        if dup and n > 1:
            x[1::2] = x[0]
        parts.append(x)
    pts = np.concatenate(parts) if parts else np.zeros((0, d), np.float32)
    off = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return pts, off


def _config(d, R, k, mode, ams, fill, final, seed=3):
    return ref.FDEConfig(dimension=d, num_repetitions=R, num_simhash_projections=k, seed=seed,
                         encoding_type=mode, projection_type="ams_sketch" if ams else "identity",
                         projection_dimension=(5 if d > 3 else 3) if ams else None,
                         fill_empty_partitions=fill, final_projection_dimension=final)


# ---------------------------------------------------------------------------
# Defect 1: large k works on occupied partitions only, same bits.

# k from 3 to 12 with 0..9 points: both the counting-sort path (2^k <= 4 n)
# and the sorted-keys path (2^k > 4 n), duplicates sharing a partition.
MODES = [("query", False), ("document", False), ("document", True)]


@pytest.mark.parametrize("mode,fill", MODES)
@pytest.mark.parametrize("ams", [False, True])
@pytest.mark.parametrize("final", [None, 7])
@pytest.mark.parametrize("k,lengths", [(3, [0, 1, 2, 5, 9]), (5, [1, 3, 4, 8, 9]), (9, [0, 1, 2, 6]),
                                       (12, [1, 3, 5])])
def test_matches_reference_dense_and_sparse_buckets(mode, fill, ams, final, k, lengths):
    d = 4
    c = _config(d, 2, k, mode, ams, fill, final)
    pts, off = _docs(lengths, d, seed=k, dup=True)
    got = embkern.fde_encode(pts, off, c, backend="cpu")
    want = embkern.fde_encode(pts, off, c, backend="reference")
    assert got.shape == want.shape
    if ams:  # spec: AMS within a few ulp of the reference; on these sizes exact, but do not promise it
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)
    else:
        np.testing.assert_array_equal(_bits(got), _bits(want))


def test_zero_blocks_with_nonfinite_count_sketch_signs_still_add():
    """An inf sign times an empty block's 0 is NaN in the reference: empty blocks are not skipped then."""
    d, R, k, final = 2, 1, 6, 4
    L = R * (1 << k) * d
    G = F.simhash_table(1, d, k, R)
    bucket = (np.arange(L) % final).astype(np.int32)
    sign = np.full(L, 0.5, np.float32)
    sign[-1] = np.inf  # the last block's last entry: its partition is empty for one point
    plan = F.Plan(d, R, k, d, True, False, final, G, None, None, bucket, sign)
    pts = np.array([[1.0, -2.0]], np.float32)
    out = np.zeros((1, final), np.float32)
    F.encode(plan, pts, np.array([0, 1], np.int64), out)
    # the reference: sketch of the full row (one block holds the point, the rest are +0)
    row = np.zeros(L, np.float32)
    dots = pts @ G[0]
    bits = (dots[0] > 0).astype(np.int64)
    P = 0
    for b in bits:
        P = (P << 1) | (int(b) ^ (P & 1))
    row[P * d:(P + 1) * d] = pts[0]
    with np.errstate(invalid="ignore"):
        want = np.zeros(final, np.float32)
        for i in range(L):
            want[bucket[i]] = np.float32(want[bucket[i]] + np.float32(sign[i] * row[i]))
    np.testing.assert_array_equal(_bits(out[0]), _bits(want))
    assert np.isnan(out[0, bucket[-1]]) == (P != (1 << k) - 1)


@pytest.mark.parametrize("mode,fill", MODES)
@pytest.mark.parametrize("final", [None, 16])
def test_large_k_same_bits_at_every_isa_level(mode, fill, final):
    c = _config(3, 2, 12, mode, False, fill, final)
    pts, off = _docs([1, 2, 7, 0, 3], 3, seed=5, dup=True)
    assert_same_bits(at_each(cpu_isa, LEVELS, lambda: _bits(embkern.fde_encode(pts, off, c, backend="cpu"))))


@pytest.mark.address_space
def test_k26_one_point_documents_under_3gib_address_space():
    """The issue's case: was SIGABRT under ulimit -v 3145728 (std::bad_alloc in the parallel region), 3.1 GB."""
    out = _run_child("""
        import resource, time
        resource.setrlimit(resource.RLIMIT_AS, (3145728 * 1024, resource.RLIM_INFINITY))
        import numpy as np, embkern
        from embkern.reference import fde as ref
        F = embkern._backends.cpu_module().fde
        c = ref.FDEConfig(dimension=1, num_repetitions=1, num_simhash_projections=26,
                          encoding_type="document", final_projection_dimension=8)
        pts = np.array([[0.5], [-1.25], [3.0], [-0.0]], np.float32)
        off = np.arange(5, dtype=np.int64)
        t = time.perf_counter()
        got = np.asarray(embkern.fde_encode(pts, off, c, backend="cpu"))
        dt = time.perf_counter() - t
        # expected: each one-point document's FDE row holds x / 1 in its partition P only
        # (zeros elsewhere add nothing), so out[bucket[P]] = sign[P] * x
        G = F.simhash_table(1, 1, 26, 1)[0, 0]
        want = np.zeros((4, 8), np.float32)
        parts = []
        for b, x in enumerate(pts[:, 0]):
            P = 0
            for g in G:
                P = (P << 1) | (int(np.float32(x * g) > 0) ^ (P & 1))
            parts.append(P)
        bucket, sign = F.count_sketch_table(1, max(parts) + 1, 8)
        for b, P in enumerate(parts):
            want[b, bucket[P]] = np.float32(0) + sign[P] * pts[b, 0]
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (got, want)
        print("OK", round(dt, 2), file=__import__("sys").stdout)
    """)
    assert out.startswith("OK"), out
    assert float(out.split()[1]) < 10.0, f"encode of 4 one-point documents took {out.split()[1]} s"


def test_large_k_fill_matches_reference():
    """Fill at k = 14 walks all 16384 partitions, 3 of them occupied; one- and two-point documents."""
    c = _config(2, 1, 14, "document", False, True, None)
    pts, off = _docs([1, 2], 2, seed=9)
    got = embkern.fde_encode(pts, off, c, backend="cpu")
    want = embkern.fde_encode(pts, off, c, backend="reference")
    np.testing.assert_array_equal(_bits(got), _bits(want))


# ---------------------------------------------------------------------------
# Allocation failure and sizes up front: MemoryError naming the size, never an abort.

@pytest.mark.address_space
def test_encode_scratch_beyond_address_space_is_memory_error():
    """AMS d_p 2^20 with 600 points needs 2.5 GB of projected points a thread (was: abort in the region)."""
    out = _run_child("""
        import resource
        import numpy as np, embkern
        F = embkern._backends.cpu_module().fde
        d, R, k, dp = 1, 1, 0, 1 << 20
        G = F.simhash_table(1, d, k, R)
        ai, asg = F.ams_table(1, d, dp, R)
        plan = F.Plan(d, R, k, dp, True, False, 0, G, ai, asg)
        pts = np.ones((600, d), np.float32)
        off = np.array([0, 600], np.int64)
        out = np.zeros((1, dp), np.float32)
        F.encode(plan, pts[:1], np.array([0, 1], np.int64), out)   # warm the thread pool
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, resource.RLIM_INFINITY))
        try:
            F.encode(plan, pts, off, out)
            print("NO ERROR")
        except MemoryError as e:
            print("MemoryError", e)
    """)
    assert out.startswith("MemoryError"), out
    assert "GB" in out and "projection_dimension 1048576" in out, out


@pytest.mark.address_space
def test_plan_tables_beyond_address_space_is_memory_error():
    """An identity plan of d = 2^28 (zero-size k = 0 SimHash) needs 8.6 GB of padded tables."""
    out = _run_child("""
        import resource
        import numpy as np, embkern
        F = embkern._backends.cpu_module().fde
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, resource.RLIM_INFINITY))
        d = 1 << 28
        try:
            F.Plan(d, 1, 0, d, False, False, 0, np.zeros((1, d, 0), np.float32))
            print("NO ERROR")
        except MemoryError as e:
            print("MemoryError", e)
    """)
    assert out.startswith("MemoryError"), out
    assert "GB" in out and "dimension 268435456" in out, out


def test_row_length_overflow_is_value_error():
    # R * 2^k * d_p = 2^33 * 2^30 * 1: past 2^61 (zero-size SimHash table, k = 30 needs (R, d, 30) though)
    R = 1 << 33
    with pytest.raises(ValueError, match=r"R \* 2\^k \* d_p"):
        F.Plan(1, R, 30, 1, False, False, 0, np.zeros((0,), np.float32).reshape(0, 1, 30))


# ---------------------------------------------------------------------------
# Defect 2: the plan owns what it reads.

def test_plan_owns_count_sketch_tables_array_resized_and_mutated():
    """Signs that are not +-1 (no packed copy): the plan read the caller's arrays (SIGSEGV once resized)."""
    out = _run_child("""
        import array, gc
        import numpy as np, embkern
        F = embkern._backends.cpu_module().fde
        d, R, k, D = 16, 4, 10, 32
        L = R * (1 << k) * d                      # 65536 entries: 256 KB, mmap-backed
        G = F.simhash_table(1, d, k, R)
        rng = np.random.default_rng(0)
        b_np = rng.integers(0, D, L).astype(np.int32)
        s_np = rng.uniform(-2, 2, L).astype(np.float32)
        bucket, sign = array.array("i", b_np.tobytes()), array.array("f", s_np.tobytes())
        plan = F.Plan(d, R, k, d, True, True, D, G, None, None, bucket, sign)
        pts = rng.standard_normal((40, d)).astype(np.float32)
        off = np.array([0, 7, 20, 40], np.int64)
        first = np.zeros((3, D), np.float32)
        F.encode(plan, pts, off, first)
        plan2 = F.Plan(d, R, k, d, True, True, D, G, None, None, b_np, s_np)
        ref_out = np.zeros((3, D), np.float32)
        F.encode(plan2, pts, off, ref_out)
        assert np.array_equal(first.view(np.uint32), ref_out.view(np.uint32))
        # mutate, then resize (moves the buffer; the old one is unmapped) and free
        for i in range(L):
            bucket[i] = 2**31 - 1
        sign[0] = float("nan")
        bucket.extend(range(4 * L)); sign.extend([1.0] * (4 * L))
        del bucket, sign
        b_np[:] = -5; s_np[:] = np.nan
        b_np.resize(1, refcheck=False); s_np.resize(1, refcheck=False)
        del b_np, s_np
        gc.collect()
        again = np.zeros((3, D), np.float32)
        F.encode(plan, pts, off, again)
        F.encode(plan2, pts, off, again)
        assert np.array_equal(again.view(np.uint32), first.view(np.uint32))
        print("OK")
    """)
    assert out.startswith("OK"), out


# ---------------------------------------------------------------------------
# Defect 10 and one wording per bound.

def test_ams_table_projection_dimension_bound():
    with pytest.raises(ValueError, match=r"projection_dimension: expected in \[1, 2\^31 - 1 = 2147483647\]"):
        F.ams_table(1, 16, 2**32 - 1, 1)
    with pytest.raises(ValueError, match=r"projection_dimension: expected in \[1, 2\^31 - 1"):
        F.ams_table(1, 16, 2**31, 1)
    idx, sgn = F.ams_table(1, 16, 2**31 - 1, 1)  # the largest allowed: indices stay non-negative int32
    assert idx.dtype == np.int32 and (idx >= 0).all() and set(np.unique(sgn)) <= {-1.0, 1.0}


def test_projection_limit_is_one_bound_everywhere():
    G = F.simhash_table(1, 4, 2, 1)
    msgs = []
    for call in (lambda: F.ams_table(1, 4, 2**31, 1),
                 lambda: F.Plan(4, 1, 2, 2**31, False, False, 0, G, np.zeros((1, 4), np.int32),
                                np.ones((1, 4), np.float32)),
                 lambda: F.count_sketch_table(1, 4, 2**31),
                 lambda: F.count_sketch_csr(np.zeros(4, np.int32), 2**31),
                 lambda: F.Plan(4, 1, 2, 4, False, False, 2**31, G)):
        with pytest.raises(ValueError) as e:
            call()
        msgs.append(str(e.value).split(": ", 1)[1])
    assert len(set(msgs)) == 1, msgs


def test_k_limit_one_wording():
    msgs = []
    for call in (lambda: F.simhash_table(1, 4, 31, 1),
                 lambda: F.Plan(4, 1, 31, 4, False, False, 0, np.zeros((1, 4, 31), np.float32))):
        with pytest.raises(ValueError, match=r"num_simhash_projections: expected 0 <= k <= 30, got 31") as e:
            call()
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1]


# ---------------------------------------------------------------------------
# Defect 11 (C++ part): the NaN message is true whoever gave the output buffer.

def test_nan_message_does_not_claim_a_user_out():
    G = F.simhash_table(1, 2, 3, 1)
    plan = F.Plan(2, 1, 3, 2, False, False, 0, G)
    pts = np.array([[1, 2], [3, np.nan], [5, 6]], np.float32)
    out = np.zeros((2, 16), np.float32)
    with pytest.raises(ValueError) as e:
        F.encode(plan, pts, np.array([0, 1, 3], np.int64), out)
    msg = str(e.value)
    assert msg.startswith("points: expected finite values") and "row 1" in msg
    assert "the output buffer is left partly written" in msg and "out is left" not in msg


# ---------------------------------------------------------------------------
# One CSR offsets check, one wording, FDE points and hypercomplex filters alike.

@pytest.mark.parametrize("bad,what", [([1, 1, 3], "{n}[0] == 0, got 1"),
                                      ([0, 2, 1, 3], "non-decreasing offsets, got {n}[2] = 1 < {n}[1] = 2"),
                                      ([0, 1, 2], "{n}[-1] == ")])
def test_csr_offsets_check_shared(bad, what):
    G = F.simhash_table(1, 2, 3, 1)
    plan = F.Plan(2, 1, 3, 2, False, False, 0, G)
    pts = np.ones((3, 2), np.float32)
    B = len(bad) - 1
    with pytest.raises(ValueError, match="^offsets: expected " + _re(what.format(n="offsets"))):
        F.encode(plan, pts, np.array(bad, np.int64), np.zeros((B, 16), np.float32))
    H = C.hypercomplex
    q = np.ones((B, 4), np.float32)
    E = np.ones((5, 4), np.float32)
    with pytest.raises(ValueError, match="^filter_offsets: expected " + _re(what.format(n="filter_offsets"))):
        H.rank(q, E, None, None, np.zeros(B, np.int64), np.array(bad, np.int64), np.zeros(3, np.int64),
               np.zeros(B), 0, 0)


def _re(s):
    import re
    return re.escape(s)


def test_read_only_out_is_named():
    o = np.zeros((1, 4), np.float32)
    o.flags.writeable = False
    C = embkern._backends.cpu_module()
    plan = C.fde.Plan(2, 1, 1, 2, True, False, 0, C.fde.simhash_table(1, 2, 1, 1))
    with pytest.raises(ValueError, match="out: expected a writable buffer, got a read-only one"):
        C.fde.encode(plan, np.ones((3, 2), np.float32), np.array([0, 3]), o)
