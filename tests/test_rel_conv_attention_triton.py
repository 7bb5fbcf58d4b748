"""The Triton relative-attention and causal-conv kernels (triton_kernels/rel_conv_attention.py) beyond what
test_rel_conv_attention.py checks for every backend: shapes around the 16 x 32 interpreter tiles (so both window
products, partial blocks and backward chunks walking several key blocks are all exercised), all six gradients in fp16 / bf16, table edges, queries that see
no key, and bit-identical reruns (the dR / dS / du / dweight partials are reduced in a fixed order, no atomics),
each backward test under both schedules (fused and split).

On a machine without a GPU these run through the Triton interpreter on CPU tensors (TRITON_INTERPRET=1)."""

import pytest
import torch

import embkern
from embkern import testing
from embkern.ops import rel_conv_attention as ops
from embkern.reference import rel_conv_attention as ref
from helpers import device_of, require_backend

pytestmark = pytest.mark.triton


@pytest.fixture(params=["fused", "split", "split-mixed"])
def schedule(request, monkeypatch):
    """Both backward schedules: the fused chunked kernel and the three-kernel split (its own tiling of the
    table rows, so every case also checks the dR / dS row blocks, their edges and the batch sum); and the
    split with a different tile per kernel, as ``_cfg``'s ``split`` entry gives them on the GPU (here the
    key-block kernel 16 x 32, the query-block kernel 32 x 16 -- more rows than keys, the window's second
    piece the larger -- and table-row blocks of 16 against 32 query rows)."""
    from embkern.triton_kernels import rel_conv_attention as tk

    sched = request.param
    monkeypatch.setattr(tk, "SCHEDULE", sched.split("-")[0])
    if sched == "split-mixed":
        base = tk._cfg
        monkeypatch.setattr(tk, "_cfg", lambda t, d: dict(base(t, d), split=dict(kv=(16, 32, 1), q=(32, 16, 1),
                                                                                  rel=(32, 16, 1))))
    return sched

DEV = device_of("triton")
P = 96


def _inputs(B, H, Lq, Lk, d, dv, dtype=torch.float32, seed=0, P=P):
    g = torch.Generator().manual_seed(seed)

    def rn(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype).to(DEV)

    return (rn(B, H, Lq, d), rn(B, H, Lk, d), rn(B, H, Lk, dv), rn(2 * P, H, d, s=0.5), rn(2 * P, H, s=0.5),
            rn(H, d, s=0.5))


def _fns(causal, qo, P=P):
    def fast(*a):
        return embkern.relative_attention(*a, causal=causal, q_offset=qo, max_distance=P, backend="triton")

    def slow(*a):
        return ref.attention(*a, causal=causal, q_offset=qo)

    return fast, slow


CASES = [  # B, H, Lq, Lk, d, dv, causal, q_offset
    (1, 2, 1, 1, 16, 16, True, None),       # one query, one key
    (1, 1, 1, 70, 16, 16, True, None),      # decode: one query over 69 memory keys (five key tiles)
    (2, 1, 17, 17, 8, 24, True, None),      # head dims below the 16-wide tile, dv != d
    (1, 2, 17, 45, 16, 16, False, None),    # memory M = 28, not causal: every diagonal of the tile grid
    (1, 1, 33, 33, 32, 16, False, 5),       # not causal, q_offset > 0 without memory
    (1, 2, 20, 20, 16, 16, True, -3),       # the first three queries see no key: zeros, zero gradients
    (1, 1, 47, 64, 16, 16, True, 17),       # q_offset = M, 47 rows end mid-tile
    (1, 1, 40, 230, 16, 16, True, None),    # 8 key blocks: each of the 4 backward chunks walks two of them
    (1, 2, 33, 161, 16, 16, False, None),   # 6 key blocks over 4 chunks, not causal: chunks of unequal length
]


def _id(c):
    return "x".join(map(str, c[:6])) + f"-c{int(c[6])}-o{c[7]}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_values_and_all_six_gradients_fp32(case, schedule):
    require_backend(ops.DESCRIPTOR, "backward", "triton", DEV, torch.float32)
    *dims, causal, qo = case
    p = max(P, dims[3])  # tables long enough for every key
    fast, slow = _fns(causal, qo, P=p)
    args = _inputs(*dims, P=p)
    testing.assert_parity(fast, slow, args)
    reports = testing.assert_grad_parity(fast, slow, args)
    assert len(reports) == 6  # q, k, v, R, S, u


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[4], CASES[6]], ids=_id)
@pytest.mark.parametrize("sched", ["fused", "split"])
def test_square_tiles_as_fp32_takes_on_the_gpu(case, sched, monkeypatch):
    """BM = BN (16 x 16, what _cfg gives fp32 above d = 64 on the GPU): the window's two pieces are the
    same size; split with the fp32 d <= 64 entry's shapes (kv 32 x 64, q 16 x 32, table rows 16 x 16)."""
    from embkern.triton_kernels import rel_conv_attention as tk

    require_backend(ops.DESCRIPTOR, "backward", "triton", DEV, torch.float32)
    monkeypatch.setattr(tk, "SCHEDULE", sched)
    monkeypatch.setattr(tk, "_cfg", lambda t, d: dict(BM=16, BN=16, warps=1, bwd_warps=1, stages=1, split=dict(
        kv=(32, 64, 1), q=(16, 32, 1), rel=(16, 16, 1))))
    *dims, causal, qo = case
    p = max(P, dims[3])
    fast, slow = _fns(causal, qo, P=p)
    args = _inputs(*dims, P=p)
    testing.assert_parity(fast, slow, args)
    assert len(testing.assert_grad_parity(fast, slow, args)) == 6


def test_gpu_tiles_keep_the_window_layout():
    """Every tile _cfg gives a CUDA tensor: powers of two from 16, BM <= BN for the forward and the fused
    backward (the window is BN rows then BM), warps 4 or 8, and the split entry's three shapes likewise."""
    import types

    from embkern.triton_kernels import rel_conv_attention as tk

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for d in (8, 16, 32, 64, 65, 128, 129, 256):
            c = tk._cfg(types.SimpleNamespace(device=types.SimpleNamespace(type="cuda"), dtype=dtype), d)
            shapes = [(c.get("FBM", c["BM"]), c.get("FBN", c["BN"])), (c["BM"], c["BN"])]
            for BM, BN in shapes:
                assert BM <= BN, (dtype, d, c)
            shapes += [(a, b) for a, b, _ in (c.get("split") or {}).values()]
            for BM, BN in shapes:
                assert BM >= 16 and BN >= 16 and BM & (BM - 1) == 0 and BN & (BN - 1) == 0, (dtype, d, c)
            assert {c["warps"], c["bwd_warps"]} <= {4, 8}, (dtype, d, c)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_values_and_all_six_gradients_low_precision(dtype, causal, schedule):
    require_backend(ops.DESCRIPTOR, "backward", "triton", DEV, dtype)
    fast, slow = _fns(causal, None)
    args = _inputs(2, 2, 17, 40, 32, 16, dtype, seed=1)
    testing.assert_parity(fast, slow, args)
    assert len(testing.assert_grad_parity(fast, slow, args)) == 6


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_tables_used_up_to_their_edges(causal, schedule):
    # max_distance = Lk: the causal pairs read rows 1..P, the full ones rows 1..2P - 1 (the last table row),
    # so the windows of the corner tiles hang over both ends of the table
    require_backend(ops.DESCRIPTOR, "backward", "triton", DEV, torch.float32)
    L = 23
    fast, slow = _fns(causal, None, P=L)
    args = _inputs(1, 2, L, L, 16, 16, P=L, seed=2)
    testing.assert_parity(fast, slow, args)
    testing.assert_grad_parity(fast, slow, args)


def test_rows_no_pair_reads_get_exactly_zero_table_gradients(schedule):
    require_backend(ops.DESCRIPTOR, "backward", "triton", DEV, torch.float32)
    q, k, v, R, S, u = (testing.leaf(t) for t in _inputs(1, 2, 9, 21, 16, 16))
    out = embkern.relative_attention(q, k, v, R, S, u, max_distance=P, backend="triton")
    out.square().sum().backward()
    lo, hi = P - (9 - 1 + 12), P  # causal, q_offset = M = 12: distances j - i_a from -20 to 0
    assert torch.all(R.grad[:lo] == 0) and torch.all(R.grad[hi + 1:] == 0)
    assert torch.all(S.grad[:lo] == 0) and torch.all(S.grad[hi + 1:] == 0)
    assert torch.all(R.grad[lo:hi + 1].abs().sum(-1) > 0)


def _run_all(args, causal, qo):
    leaves = [testing.leaf(t) for t in args]
    out = embkern.relative_attention(*leaves, causal=causal, q_offset=qo, max_distance=P, backend="triton")
    g = torch.Generator().manual_seed(7)
    out.backward(torch.randn(out.shape, generator=g).to(out))
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_two_runs_are_bit_identical(dtype, schedule):
    require_backend(ops.DESCRIPTOR, "backward", "triton", DEV, dtype)
    args = _inputs(2, 1, 37, 53, 16, 16, dtype, seed=3)
    for causal, qo in ((True, None), (False, 4)):
        first, second = _run_all(args, causal, qo), _run_all(args, causal, qo)
        for name, a, b in zip(("out", "dq", "dk", "dv", "dR", "dS", "du"), first, second):
            assert torch.equal(a, b), name


def test_batch_elements_are_independent_and_table_gradients_add_up(schedule):
    # dR, dS and du sum over the batch; each batch element alone gives its own share
    require_backend(ops.DESCRIPTOR, "backward", "triton", DEV, torch.float32)
    q, k, v, R, S, u = _inputs(3, 2, 18, 18, 16, 16, seed=4)
    whole = _run_all((q, k, v, R, S, u), True, None)
    g = torch.Generator().manual_seed(7)
    grad_out = torch.randn(whole[0].shape, generator=g)  # the one _run_all used
    parts = [None] * 3
    for b in range(3):  # each element alone, with its slice of the same output gradient
        leaves = [testing.leaf(t) for t in (q[b:b + 1], k[b:b + 1], v[b:b + 1], R, S, u)]
        out = embkern.relative_attention(*leaves, max_distance=P, backend="triton")
        out.backward(grad_out[b:b + 1].to(out))
        parts[b] = [out.detach()] + [t.grad for t in leaves]
    torch.testing.assert_close(whole[0], torch.cat([p[0] for p in parts]), rtol=0, atol=0)
    for i in (4, 5, 6):  # dR, dS, du
        torch.testing.assert_close(whole[i], sum(p[i] for p in parts), rtol=1e-5, atol=1e-5)


def test_conv_low_precision_and_bit_identical_reruns():
    require_backend(ops.DESCRIPTOR, "conv_backward", "triton", DEV, torch.bfloat16)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 37, 24, generator=g).to(torch.bfloat16).to(DEV)
    w = torch.randn(24, 3, generator=g).to(torch.bfloat16).to(DEV)
    b = torch.randn(24, generator=g).to(torch.bfloat16).to(DEV)

    def conv(*a):
        return embkern.causal_depthwise_conv(*a, backend="triton")

    testing.assert_parity(conv, ref.causal_depthwise_conv, (x, w, b))
    testing.assert_grad_parity(conv, ref.causal_depthwise_conv, (x, w, b))
    runs = []
    for _ in range(2):
        leaves = [testing.leaf(t) for t in (x, w, b)]
        conv(*leaves).float().square().sum().backward()
        runs.append([t.grad for t in leaves])
    for a, c in zip(*runs):
        assert torch.equal(a, c)
