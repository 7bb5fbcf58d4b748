"""Triton kernels for Transformer-XL relative attention and RCMHA's causal conv (docs/ops/rel_conv_attention.md).

Launchers called by ``embkern.ops.rel_conv_attention`` (backend ``"triton"``)
with torch tensors on CUDA, or on the CPU under ``TRITON_INTERPRET=1``:

=============  ===========================================================  ====================================
launcher       inputs                                                       returns
=============  ===========================================================  ====================================
forward        q (B,H,Lq,d), k (B,H,Lk,d), v (B,H,Lk,dv), R (2P,H,d),       O (B,H,Lq,dv) q.dtype, lse (B,H,Lq)
               S (2P,H), u (H,d), causal, q_offset                          fp32
backward       grad_out, the same, O, lse                                   dq, dk, dv, dR, dS, du
conv_forward   x (..., T, C), weight (C, K), bias (C,) | None               y (..., T, C)
conv_backward  grad_y, x, weight, has_bias                                  dx, dweight, dbias (or empty)
=============  ===========================================================  ====================================

Scores: ``s_ij = [(q_i + u).k_j + q_i.R[r] + S[r]] / sqrt(d)``, ``r = P + j - i - q_offset``.

The relative term inside a flash tile. For query rows ``m0 + ii`` and keys
``n0 + jj`` (ii < BM, jj < BN) the table rows read are ``r0 + w`` with
``r0 = P + n0 - m0 - q_offset - (BM - 1)`` and ``w = jj - ii + BM - 1`` in
``0 .. BM + BN - 2``: one window of BM + BN - 1 contiguous rows, taken as two
power-of-two pieces (BN rows, then BM). The kernel multiplies the query tile
by each, ``Q R1^T + S1`` and ``Q R2^T + S2``, and takes the diagonal band
``[ii, jj - ii + BM - 1]`` with ``tl.gather`` along the window axis (a
register / shared-memory shuffle on the GPU, ``take_along_axis`` in the
interpreter). ``u . k_j`` is one fp32 number per key. Rows of the window
outside the table (only ever read by masked pairs) load as zeros.

* forward: one program per (query block, batch x head), flash-attention 2
  with the online softmax in fp32; key blocks past the causal limit of the
  block's last row are never visited; a row that sees no key gives O = 0,
  lse = -inf (no NaN), as in the selective-attention kernel.
* backward: ``D_i = sum_d dO_i O_i`` in torch, then one of two schedules, none with atomics, P recomputed
  from lse (``schedule``: ``_cfg``'s ``bwd``, "fused" everywhere for now; ``SCHEDULE`` overrides it):

  - "fused": one kernel, a program per (chunk c, batch x head) walking key blocks c, c + nC, ... against
    every query block that sees them; dk, dv and ``sum_i dS_ij`` stay in registers per key block, dq and
    the window gradients ``G^T Q``, ``sum G`` are added into the program's own slice of (nC, B, H, ...)
    partial buffers (read-modify-write behind a barrier), then summed in torch;
  - "split": three kernels whose sums all stay in registers and are stored once -- dk, dv and the du
    partial per (key block, batch x head); dq per (query block, batch x head), ``scale * (dS K + G Rw)``
    with ``G[ii, w] = dS[ii, w + ii - (BM - 1)]`` the band put back into window coordinates; dR, dS per
    (block of BT table rows, batch x head), where the pairs reading those rows are a diagonal band whose
    relative term is the plain product ``Q R_blk^T`` and whose content term and dP are bands of products
    against a span of BT + BM keys, so ``dR_blk = G^T Q`` needs no gather. The key-block kernel holds its
    tile transposed (keys x queries, as flash-attention 2's Triton backward does), so that its products have
    the 128 keys as M. Each kernel has its own tiles (``_cfg``'s ``split``: kv 32 x 128, q and rel 64 x 64 on
    sm_90-class GPUs, M = 64 / 128 in every product of size, the shapes the warpgroup MMA takes). It
    recomputes the scores three times: per pair, 5.25 + 7 + 6 = 18.25 units of d multiply-adds at those
    tiles (15.25 with all three at 32 x 128) against the fused kernel's 8.75, in exchange for independent
    programs, no partial-buffer traffic and tensor-core-sized products.

  The du partials (B, H, nN, d) are summed over batch and key blocks in torch, the dR / dS partials over
  chunks and batch. Results are bit-identical from run to run (no float atomics; every sum has a fixed
  order) and depend on the schedule and the tiles (fixed per device type, dtype and head dim, no
  autotuning), not on the GPU model's SM count or the scheduling of programs.
* precision: every product goes through ``_tiles._dot`` (fp32 IEEE, no TF32;
  fp16 / bf16 on tensor cores with fp32 accumulation). P is rounded to the
  input dtype before P V and P^T dO, dS (and its window form G) before dS K,
  dS^T Q, G Rw and G^T Q, as flash-attention does; ``u . k``, the softmax,
  ``sum G`` and the u terms of dk / du stay fp32.
* causal depthwise conv: one program per (sequence, time block, channel
  block) in fp32; dweight from per-program partials summed in torch.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._tiles import _dot, _softmax_finish, _softmax_step, device_ctx, head_stride, launch_opts, pow2, upcast


def _cfg(t: torch.Tensor, d: int) -> dict:
    """Tiles of BM query rows by BN keys, BM <= BN: a tile reads BM + BN - 1 window rows, taken as two
    power-of-two products (BN rows, then BM), so the relative term costs (BN + BM) / BN of ``Q K^T``:
    1.25x at 32 x 128 on the GPU (64 x 64 would cost 2x), 1.5x at 16 x 32 in the interpreter (16 is the
    tl.dot minimum; every program runs in Python there). fp16 / bf16 heads above d = 128 take 16 x 64 to stay
    inside sm_90's 227 KiB of shared memory; fp32 takes 16 x 32 or 16 x 16 to stay inside ptxas' register
    budget (below; benchmarks/gpu/compile_rel_attention.py --all prints what each needs). FBM x FBN, where
    given, are the forward's tiles (measured faster; see below). Fixed: no autotuning, so the rounding of every
    sum is the same on every run and every GPU."""
    if t.device.type != "cuda":
        return dict(BM=16, BN=32, warps=1, bwd_warps=1, stages=1)
    if t.dtype == torch.float32:
        # IEEE fp32 products are FMA loops; past ptxas' 255-register budget the kernel compiles to 32
        # registers a thread and 10-50 KB of spills (sm_90, ptxas 12.9 and 13.x): the bf16 tiles did
        # (64 x 64 forward 33 KB of spill stores, 32 x 128 backward 34 KB), and whether a tile tips over is not
        # monotone in its size (16 x 32 at d = 128: 3.9 KB with 4 warps, the fallback with 8). These are the
        # tiles tried that stay under it, spill stores fwd / bwd: 88 / 544 B at d = 64, 632 / 712 B at 128,
        # 652 / 480 B at 256 (benchmarks/gpu/compile_rel_attention.py --all). Not yet timed on a GPU.
        if d <= 64:
            return dict(BM=16, BN=32, warps=4, bwd_warps=8, stages=2,
                        split=dict(kv=(32, 64, 8), q=(16, 32, 4), rel=(16, 16, 4)))  # 404 / 164 / 736 B
        return dict(BM=16, BN=16, warps=4 if d <= 128 else 8, bwd_warps=4 if d <= 128 else 8, stages=2)
    if d <= 128:
        # the forward takes 64 x 64 (relative term 2x of Q K^T, but M = 64 tiles run on sm_90's warpgroup MMA):
        # 1.13 ms against 2.10 ms at 32 x 128 on an H200 (B 4, H 8, L 4096, d 64, bf16, causal;
        # benchmarks/gpu/tune_rel_attention.py). The backward measured best at 32 x 128 with 8 warps
        # (fwd+bwd 11.1 ms; 64 x 64: 16.2, 32 x 64: 12.8). lse is per row, so the two need not share tiles.
        # split: each of the three kernels its own (rows, columns, warps), picked so that every product of size
        # has M = 64 or 128 and compiles to sm_90's warpgroup MMA (ptxas' PTX: the kv kernel at 32 x 128 with
        # keys as M, q and rel at 64 x 64); unmeasured on a GPU, so not the default schedule
        return dict(BM=32, BN=128, FBM=64, FBN=64, warps=4, bwd_warps=8, stages=2,
                    split=dict(kv=(32, 128, 8), q=(64, 64, 4), rel=(64, 64, 4)))
    return dict(BM=16, BN=64, warps=4, bwd_warps=4, stages=2)


# ---------------------------------------------------------------------------
# device helpers


@triton.jit
def _window(R_ptr, S_ptr, r0, h, H, P2, od, d, BW: tl.constexpr):
    """Rows r0 .. r0 + BW - 1 of R (BW, BD) and S (BW,) fp32 for head h; rows outside 0..2P-1 are zero."""
    wr = r0 + tl.arange(0, BW)
    wm = (wr >= 0) & (wr < P2)
    Rw = tl.load(R_ptr + (wr * H + h)[:, None] * d + od[None, :], mask=wm[:, None] & (od < d)[None, :], other=0.0)
    Sw = tl.load(S_ptr + wr * H + h, mask=wm, other=0.0).to(tl.float32)
    return Rw, Sw


@triton.jit
def _query_rows(q_ptr, do_ptr, lse_ptr, delta_ptr, bh, rows, Lq, od, d, odv, dv):
    """q, dO, the saved lse (-inf past Lq) and D of query rows ``rows`` of batch x head bh."""
    q = _load_rows(q_ptr, bh * Lq, rows, Lq, od, d)
    do = _load_rows(do_ptr, bh * Lq, rows, Lq, odv, dv)
    lse = tl.load(lse_ptr + bh * Lq + rows, mask=rows < Lq, other=float("-inf"))
    dlt = tl.load(delta_ptr + bh * Lq + rows, mask=rows < Lq, other=0.0)
    return q, do, lse, dlt


@triton.jit
def _tile_windows(R_ptr, S_ptr, P, n0, m0, q_offset, h, H, od, d, BM: tl.constexpr, BN: tl.constexpr):
    """The (query block m0, key block n0) tile's window start r0 and its two pieces (BN rows, then BM)."""
    r0 = P + n0 - m0 - q_offset - (BM - 1)
    R1, S1 = _window(R_ptr, S_ptr, r0, h, H, 2 * P, od, d, BN)
    R2, S2 = _window(R_ptr, S_ptr, r0 + BN, h, H, 2 * P, od, d, BM)
    return r0, R1, S1, R2, S2


@triton.jit
def _scores(q, k, uk, R1, S1, R2, S2, scale, BM: tl.constexpr, BN: tl.constexpr, UPCAST: tl.constexpr,
            IEEE: tl.constexpr):
    """(BM, BN) fp32 unmasked scores of one tile: content, u . k, and the diagonal band of the two window
    products ``Q R1^T + S1`` (window offsets 0 .. BN - 1) and ``Q R2^T + S2`` (BN .. BN + BM - 1)."""
    qk = _dot(q, tl.trans(k), UPCAST, IEEE)
    qr1 = _dot(q, tl.trans(R1), UPCAST, IEEE) + S1[None, :]
    qr2 = _dot(q, tl.trans(R2), UPCAST, IEEE) + S2[None, :]
    band = tl.arange(0, BN)[None, :] - tl.arange(0, BM)[:, None] + (BM - 1)
    lo = tl.gather(qr1, tl.minimum(band, BN - 1), 1)
    hi = tl.gather(qr2, tl.maximum(band - BN, 0), 1)
    return (qk + uk[None, :] + tl.where(band < BN, lo, hi)) * scale


@triton.jit
def _band_to_window(ds, off, BM: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr):
    """G (BM, BW): G[ii, w] = ds[ii, off + w + ii - (BM - 1)] where that key column exists, else 0."""
    c = off + tl.arange(0, BW)[None, :] + tl.arange(0, BM)[:, None] - (BM - 1)
    ok = (c >= 0) & (c < BN)
    g = tl.gather(ds, tl.where(ok, c, 0), 1)
    return tl.where(ok, g, 0.0)


@triton.jit
def _visible(rows, cols, Lq, Lk, q_offset, CAUSAL: tl.constexpr):
    ok = (rows < Lq)[:, None] & (cols < Lk)[None, :]
    if CAUSAL:
        ok = ok & (cols[None, :] <= rows[:, None] + q_offset)
    return ok


@triton.jit
def _load_rows(ptr, base, rows, n_rows, o, width):
    return tl.load(ptr + (base + rows)[:, None] * width + o[None, :],
                   mask=(rows < n_rows)[:, None] & (o < width)[None, :], other=0.0)


@triton.jit
def _uk(k, u):
    """u . k_j for every key of the tile, fp32."""
    return tl.sum(k.to(tl.float32) * u[None, :], 1)


@triton.jit
def _store_kv_grads(dk_ptr, dv_ptr, dup_ptr, dk, dva, csum, u, k, bh, n, nN, cols, Lk, od, d, odv, dv):
    """The end of a key block's backward: ``dk += (sum_i dS_ij) u``, then dk and dv stored, and the block's
    du partial ``sum_j (sum_i dS_ij) k_j`` into fp32 (B, H, nN, d), which the launcher sums over batch and n."""
    dk += csum[:, None] * u[None, :]
    cmask = cols < Lk
    tl.store(dk_ptr + (bh * Lk + cols)[:, None] * d + od[None, :], dk.to(dk_ptr.dtype.element_ty),
             mask=cmask[:, None] & (od < d)[None, :])
    tl.store(dv_ptr + (bh * Lk + cols)[:, None] * dv + odv[None, :], dva.to(dv_ptr.dtype.element_ty),
             mask=cmask[:, None] & (odv < dv)[None, :])
    du = tl.sum(csum[:, None] * k.to(tl.float32), 0)
    tl.store(dup_ptr + (bh * nN + n) * d + od, du, mask=od < d)


# ---------------------------------------------------------------------------
# kernels


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, R_ptr, S_ptr, u_ptr, o_ptr, lse_ptr,
                H, Lq, Lk, d, dv, P, scale, q_offset, k_hs, v_hs,
                CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                UPCAST: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    h = bh % H
    m0 = pid_m * BM
    rows = m0 + tl.arange(0, BM)
    od = tl.arange(0, BD)
    odv = tl.arange(0, BDV)
    q = _load_rows(q_ptr, bh * Lq, rows, Lq, od, d)
    u = tl.load(u_ptr + h * d + od, mask=od < d, other=0.0).to(tl.float32)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BDV], tl.float32)
    hi = Lk
    if CAUSAL:
        hi = tl.minimum(Lk, m0 + BM + q_offset)
    for n0 in range(0, hi, BN):
        cols = n0 + tl.arange(0, BN)
        # (batch, head) bh starts k_hs / v_hs elements in (Lk d / Lk dv when packed; more for a cache slice)
        k = _load_rows(k_ptr + bh * k_hs, 0, cols, Lk, od, d)
        v = _load_rows(v_ptr + bh * v_hs, 0, cols, Lk, odv, dv)
        r0, R1, S1, R2, S2 = _tile_windows(R_ptr, S_ptr, P, n0, m0, q_offset, h, H, od, d, BM, BN)
        s = _scores(q, k, _uk(k, u), R1, S1, R2, S2, scale, BM, BN, UPCAST, IEEE)
        s = tl.where(_visible(rows, cols, Lq, Lk, q_offset, CAUSAL), s, float("-inf"))
        m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, UPCAST, IEEE)
    out, lse = _softmax_finish(m_i, l_i, acc)
    rmask = rows < Lq
    tl.store(o_ptr + (bh * Lq + rows)[:, None] * dv + odv[None, :], out.to(o_ptr.dtype.element_ty),
             mask=rmask[:, None] & (odv < dv)[None, :])
    tl.store(lse_ptr + bh * Lq + rows, lse, mask=rmask)


@triton.jit
def _add_to(ptr, offs, mask, x):
    """``*ptr[offs] += x`` in fp32. Only safe because the calling program is the one writer of these addresses
    (its own slice of a partial buffer) and puts a barrier between one tile's store and the next tile's load."""
    tl.store(ptr + offs, tl.load(ptr + offs, mask=mask, other=0.0) + x, mask=mask)


@triton.jit
def _tile_p_ds(q, do, lse, dlt, k, v, uk, R1, S1, R2, S2, rows, cols, Lq, Lk, q_offset, scale,
               CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """P (BM, BN) recomputed from the saved row log-sum-exp, and dS = P (dP - D) * scale, both fp32."""
    s = _scores(q, k, uk, R1, S1, R2, S2, scale, BM, BN, UPCAST, IEEE)
    ok = _visible(rows, cols, Lq, Lk, q_offset, CAUSAL) & (lse != float("-inf"))[:, None]
    lse_safe = tl.where(lse == float("-inf"), 0.0, lse)
    p = tl.where(ok, tl.exp(s - lse_safe[:, None]), 0.0)
    dp = _dot(do, tl.trans(v), UPCAST, IEEE)
    return p, p * (dp - dlt[:, None]) * scale


@triton.jit
def _bwd_kernel(q_ptr, k_ptr, v_ptr, R_ptr, S_ptr, u_ptr, do_ptr, lse_ptr, delta_ptr,
                dk_ptr, dv_ptr, dup_ptr, dqp_ptr, dRp_ptr, dSp_ptr,
                H, Lq, Lk, d, dv, P, scale, q_offset, nN, nC, BHn, NR, rbase,
                CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """One program per (chunk c, batch x head): key blocks c, c + nC, c + 2 nC, ... in turn, each against every
    query block that sees it. dk, dv stay in registers per key block; dq and the window gradients dR, dS are added
    into the program's own slice of the (nC, B H, ...) partial buffers (a tile reads the window rows
    r0 .. r0 + BN + BM - 1 with r0 = P + n0 - m0 - q_offset - (BM - 1), buffer row r0 - rbase)."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    h = bh % H
    od = tl.arange(0, BD)
    odv = tl.arange(0, BDV)
    u = tl.load(u_ptr + h * d + od, mask=od < d, other=0.0).to(tl.float32)
    dq_base = (c * BHn + bh) * Lq
    dr_base = (c * BHn + bh) * NR
    for n in range(c, nN, nC):
        n0 = n * BN
        cols = n0 + tl.arange(0, BN)
        k = _load_rows(k_ptr, bh * Lk, cols, Lk, od, d)
        v = _load_rows(v_ptr, bh * Lk, cols, Lk, odv, dv)
        uk = _uk(k, u)
        dk = tl.zeros([BN, BD], tl.float32)
        dva = tl.zeros([BN, BDV], tl.float32)
        csum = tl.zeros([BN], tl.float32)  # sum_i dS_ij * scale, per key
        lo = 0
        if CAUSAL:  # the first query row that sees key n0 is n0 - q_offset
            lo = tl.maximum(0, n0 - q_offset)
            lo = (lo // BM) * BM
        for m0 in range(lo, Lq, BM):
            rows = m0 + tl.arange(0, BM)
            q, do, lse, dlt = _query_rows(q_ptr, do_ptr, lse_ptr, delta_ptr, bh, rows, Lq, od, d, odv, dv)
            r0, R1, S1, R2, S2 = _tile_windows(R_ptr, S_ptr, P, n0, m0, q_offset, h, H, od, d, BM, BN)
            p, ds = _tile_p_ds(q, do, lse, dlt, k, v, uk, R1, S1, R2, S2, rows, cols, Lq, Lk, q_offset, scale,
                               CAUSAL, BM, BN, UPCAST, IEEE)
            dva += _dot(tl.trans(p.to(do.dtype)), do, UPCAST, IEEE)
            dsl = ds.to(q.dtype)
            dk += _dot(tl.trans(dsl), q, UPCAST, IEEE)
            csum += tl.sum(ds, 0)
            g1 = _band_to_window(ds, 0, BM, BN, BN)
            g2 = _band_to_window(ds, BN, BM, BN, BM)
            g1l = g1.to(q.dtype)
            g2l = g2.to(q.dtype)
            dq = _dot(dsl, k, UPCAST, IEEE)
            dq += _dot(g1l, R1, UPCAST, IEEE)
            dq += _dot(g2l, R2, UPCAST, IEEE)
            dmask = (od < d)[None, :]
            _add_to(dqp_ptr, (dq_base + rows)[:, None] * d + od[None, :], (rows < Lq)[:, None] & dmask, dq)
            w1 = dr_base + r0 - rbase + tl.arange(0, BN)
            w2 = dr_base + r0 + BN - rbase + tl.arange(0, BM)
            _add_to(dRp_ptr, w1[:, None] * d + od[None, :], dmask, _dot(tl.trans(g1l), q, UPCAST, IEEE))
            _add_to(dRp_ptr, w2[:, None] * d + od[None, :], dmask, _dot(tl.trans(g2l), q, UPCAST, IEEE))
            _add_to(dSp_ptr, w1, w1 < dr_base + NR, tl.sum(g1, 0))  # always inside the slice: r0 - rbase + BN + BM <= NR
            _add_to(dSp_ptr, w2, w2 < dr_base + NR, tl.sum(g2, 0))
            # the next tile's window overlaps this one by BN rows and a later key block revisits these dq rows:
            # every thread's stores must land before any thread reloads them
            tl.debug_barrier()
        _store_kv_grads(dk_ptr, dv_ptr, dup_ptr, dk, dva, csum, u, k, bh, n, nN, cols, Lk, od, d, odv, dv)


# The split backward: three kernels, each sum in registers and stored once (no read-modify-write of global
# memory, no barrier, no atomics). Against the fused kernel it recomputes the scores three times
# (5.25 + 5.5 + 4.5 = 15.25 units of BM x BN x d multiply-adds a tile at 32 x 128, against 8.75), but runs
# nN x B H, nM x B H and nT x B H independent programs instead of chunks x B H programs that each walk a
# chain of dependent tiles.


@triton.jit
def _bwd_kv_kernel(q_ptr, k_ptr, v_ptr, R_ptr, S_ptr, u_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dup_ptr,
                   H, Lq, Lk, d, dv, P, scale, q_offset, nN,
                   CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                   UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """dk, dv and the du partial of one key block (program (n, batch x head)), over the query blocks that see it:
    ``dk_j = sum_i dS_ij q_i + (sum_i dS_ij) u``, ``du_n = sum_j (sum_i dS_ij) k_j`` (dS already scaled).

    The tile is held transposed, (BN keys, BM queries), as flash-attention 2's Triton backward holds it: every
    product then has the key block as its M dimension (K Q^T, R1 Q^T, V dO^T, P^T dO, dS^T Q: M = BN = 128 at
    32 x 128), which sm_90 runs on the warpgroup MMA (M a multiple of 64); the (BM, BN) form puts 32 rows in
    M and compiles those products to mma.sync (52 of 56 products at 32 x 128 by ptxas' PTX). The relative term
    transposed: ``rel^T[jj, ii] = (Rw Q^T)[jj - ii + BM - 1, ii]``, the band gathered along axis 0."""
    n = tl.program_id(0)
    bh = tl.program_id(1)
    h = bh % H
    od = tl.arange(0, BD)
    odv = tl.arange(0, BDV)
    u = tl.load(u_ptr + h * d + od, mask=od < d, other=0.0).to(tl.float32)
    n0 = n * BN
    cols = n0 + tl.arange(0, BN)
    k = _load_rows(k_ptr, bh * Lk, cols, Lk, od, d)
    v = _load_rows(v_ptr, bh * Lk, cols, Lk, odv, dv)
    uk = _uk(k, u)
    dk = tl.zeros([BN, BD], tl.float32)
    dva = tl.zeros([BN, BDV], tl.float32)
    csum = tl.zeros([BN], tl.float32)
    # window offset of (key jj, query ii): jj - ii + BM - 1, in 0 .. BN + BM - 2
    band = tl.arange(0, BN)[:, None] - tl.arange(0, BM)[None, :] + (BM - 1)
    lo = 0
    if CAUSAL:  # the first query row that sees key n0 is n0 - q_offset
        lo = tl.maximum(0, n0 - q_offset)
        lo = (lo // BM) * BM
    for m0 in range(lo, Lq, BM):
        rows = m0 + tl.arange(0, BM)
        q, do, lse, dlt = _query_rows(q_ptr, do_ptr, lse_ptr, delta_ptr, bh, rows, Lq, od, d, odv, dv)
        r0, R1, S1, R2, S2 = _tile_windows(R_ptr, S_ptr, P, n0, m0, q_offset, h, H, od, d, BM, BN)
        qt = tl.trans(q)
        kq = _dot(k, qt, UPCAST, IEEE)
        x1 = _dot(R1, qt, UPCAST, IEEE) + S1[:, None]
        x2 = _dot(R2, qt, UPCAST, IEEE) + S2[:, None]
        rel = tl.where(band < BN, tl.gather(x1, tl.minimum(band, BN - 1), 0), tl.gather(x2, tl.maximum(band - BN, 0), 0))
        st = (kq + uk[:, None] + rel) * scale
        ok = (cols < Lk)[:, None] & (rows < Lq)[None, :] & (lse != float("-inf"))[None, :]
        if CAUSAL:
            ok = ok & (cols[:, None] <= rows[None, :] + q_offset)
        lse_safe = tl.where(lse == float("-inf"), 0.0, lse)
        pt = tl.where(ok, tl.exp(st - lse_safe[None, :]), 0.0)
        dva += _dot(pt.to(do.dtype), do, UPCAST, IEEE)
        dpt = _dot(v, tl.trans(do), UPCAST, IEEE)
        dst = pt * (dpt - dlt[None, :]) * scale
        dk += _dot(dst.to(q.dtype), q, UPCAST, IEEE)
        csum += tl.sum(dst, 1)
    _store_kv_grads(dk_ptr, dv_ptr, dup_ptr, dk, dva, csum, u, k, bh, n, nN, cols, Lk, od, d, odv, dv)


@triton.jit
def _bwd_q_kernel(q_ptr, k_ptr, v_ptr, R_ptr, S_ptr, u_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
                  H, Lq, Lk, d, dv, P, scale, q_offset,
                  CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                  UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """dq of one query block (program (m, batch x head)) over the key blocks it sees:
    ``dq_i = sum_j dS_ij k_j + sum_w G[i, w] Rw[w]``, G the tile's band in window coordinates."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    h = bh % H
    m0 = pid_m * BM
    rows = m0 + tl.arange(0, BM)
    od = tl.arange(0, BD)
    odv = tl.arange(0, BDV)
    u = tl.load(u_ptr + h * d + od, mask=od < d, other=0.0).to(tl.float32)
    q, do, lse, dlt = _query_rows(q_ptr, do_ptr, lse_ptr, delta_ptr, bh, rows, Lq, od, d, odv, dv)
    dq = tl.zeros([BM, BD], tl.float32)
    hi = Lk
    if CAUSAL:
        hi = tl.minimum(Lk, m0 + BM + q_offset)
    for n0 in range(0, hi, BN):
        cols = n0 + tl.arange(0, BN)
        k = _load_rows(k_ptr, bh * Lk, cols, Lk, od, d)
        v = _load_rows(v_ptr, bh * Lk, cols, Lk, odv, dv)
        r0, R1, S1, R2, S2 = _tile_windows(R_ptr, S_ptr, P, n0, m0, q_offset, h, H, od, d, BM, BN)
        p, ds = _tile_p_ds(q, do, lse, dlt, k, v, _uk(k, u), R1, S1, R2, S2, rows, cols, Lq, Lk, q_offset,
                           scale, CAUSAL, BM, BN, UPCAST, IEEE)
        g1 = _band_to_window(ds, 0, BM, BN, BN).to(q.dtype)
        g2 = _band_to_window(ds, BN, BM, BN, BM).to(q.dtype)
        dq += _dot(ds.to(q.dtype), k, UPCAST, IEEE)
        dq += _dot(g1, R1, UPCAST, IEEE)
        dq += _dot(g2, R2, UPCAST, IEEE)
    tl.store(dq_ptr + (bh * Lq + rows)[:, None] * d + od[None, :], dq.to(dq_ptr.dtype.element_ty),
             mask=(rows < Lq)[:, None] & (od < d)[None, :])


@triton.jit
def _load_span(ptr, base, idx, n_rows, o, width):
    """Rows idx (any integers) of a (n_rows, width) slab at row offset base; rows outside 0..n_rows-1 are zero."""
    return tl.load(ptr + (base + idx)[:, None] * width + o[None, :],
                   mask=((idx >= 0) & (idx < n_rows))[:, None] & (o < width)[None, :], other=0.0)


@triton.jit
def _band_of(x1, x2, kk, BT: tl.constexpr):
    """y[ii, w] = [x1 | x2][ii, kk[ii, w]]: the band of a (BM, BT + BM) tile held as two pieces."""
    lo = tl.gather(x1, tl.minimum(kk, BT - 1), 1)
    hi = tl.gather(x2, tl.maximum(kk - BT, 0), 1)
    return tl.where(kk < BT, lo, hi)


@triton.jit
def _bwd_rel_kernel(q_ptr, k_ptr, v_ptr, R_ptr, S_ptr, u_ptr, do_ptr, lse_ptr, delta_ptr, dRp_ptr, dSp_ptr,
                    H, Lq, Lk, d, dv, P, scale, q_offset, rlo, NRT,
                    CAUSAL: tl.constexpr, BM: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                    BDV: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """dR, dS of table rows rho0 .. rho0 + BT - 1 (program (t, batch x head), rho0 = rlo + t BT) over every query
    block. In diagonal coordinates the pairs of query rows m0 + ii reading row rho0 + w are the keys
    ``js + ii + w`` (js = rho0 - P + q_offset + m0), so the relative term is a plain product Q R_blk^T and
    ``dR_blk = G^T Q`` with G[ii, w] = dS of that pair; the content term and dP become the band of a
    (BM, BT + BM) product against the key span js .. js + BT + BM - 1."""
    t = tl.program_id(0)
    bh = tl.program_id(1)
    h = bh % H
    rho0 = rlo + t * BT
    od = tl.arange(0, BD)
    odv = tl.arange(0, BDV)
    w = tl.arange(0, BT)
    ii = tl.arange(0, BM)
    kk = ii[:, None] + w[None, :]  # the pair's key within the span
    u = tl.load(u_ptr + h * d + od, mask=od < d, other=0.0).to(tl.float32)
    Rb, Sb = _window(R_ptr, S_ptr, rho0, h, H, 2 * P, od, d, BT)
    row_ok = (rho0 + w >= 0) & (rho0 + w < 2 * P)
    if CAUSAL:
        row_ok = row_ok & (rho0 + w <= P)  # j <= i + q_offset
    jb = rho0 - P + q_offset  # the key of (query 0, w = 0)
    m_lo = tl.maximum(0, -jb - (BT - 1))  # a query below it pairs only with keys < 0
    m_lo = (m_lo // BM) * BM
    m_hi = tl.minimum(Lq, Lk - jb)  # a query from here on pairs only with keys >= Lk
    dR = tl.zeros([BT, BD], tl.float32)
    dSa = tl.zeros([BT], tl.float32)
    for m0 in range(m_lo, m_hi, BM):
        rows = m0 + ii
        q, do, lse, dlt = _query_rows(q_ptr, do_ptr, lse_ptr, delta_ptr, bh, rows, Lq, od, d, odv, dv)
        js = jb + m0
        c1 = js + tl.arange(0, BT)
        c2 = js + BT + tl.arange(0, BM)
        k1 = _load_span(k_ptr, bh * Lk, c1, Lk, od, d)
        k2 = _load_span(k_ptr, bh * Lk, c2, Lk, od, d)
        x1 = _dot(q, tl.trans(k1), UPCAST, IEEE) + _uk(k1, u)[None, :]
        x2 = _dot(q, tl.trans(k2), UPCAST, IEEE) + _uk(k2, u)[None, :]
        s = (_band_of(x1, x2, kk, BT) + _dot(q, tl.trans(Rb), UPCAST, IEEE) + Sb[None, :]) * scale
        cols = js + kk
        ok = (rows < Lq)[:, None] & (cols >= 0) & (cols < Lk) & row_ok[None, :] & (lse != float("-inf"))[:, None]
        lse_safe = tl.where(lse == float("-inf"), 0.0, lse)
        p = tl.where(ok, tl.exp(s - lse_safe[:, None]), 0.0)
        v1 = _load_span(v_ptr, bh * Lk, c1, Lk, odv, dv)
        v2 = _load_span(v_ptr, bh * Lk, c2, Lk, odv, dv)
        dp = _band_of(_dot(do, tl.trans(v1), UPCAST, IEEE), _dot(do, tl.trans(v2), UPCAST, IEEE), kk, BT)
        ds = p * (dp - dlt[:, None]) * scale
        dR += _dot(tl.trans(ds.to(q.dtype)), q, UPCAST, IEEE)
        dSa += tl.sum(ds, 0)
    out = bh * NRT + t * BT + w
    tl.store(dRp_ptr + out[:, None] * d + od[None, :], dR, mask=(od < d)[None, :])
    tl.store(dSp_ptr + out, dSa)


# ---------------------------------------------------------------------------
# launchers


def _consts(q, v, causal, fwd=False):
    d = q.shape[-1]
    c = _cfg(q, d)
    BM, BN = (c.get("FBM", c["BM"]), c.get("FBN", c["BN"])) if fwd else (c["BM"], c["BN"])
    return dict(CAUSAL=bool(causal), BM=BM, BN=BN, BD=pow2(d), BDV=pow2(v.shape[-1]),
                UPCAST=upcast(q), IEEE=q.dtype == torch.float32), c


def _prep(q, k, v, R, S, u):
    return tuple(t.contiguous() for t in (q, k, v, R, S, u))


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, R: torch.Tensor, S: torch.Tensor, u: torch.Tensor,
            causal: bool, q_offset: int) -> Tuple[torch.Tensor, torch.Tensor]:
    B, H, Lq, d = q.shape
    Lk, dv, P = k.shape[2], v.shape[-1], R.shape[0] // 2
    # k and v read in place when packed within each (batch, head): embkern.nn.RelConvCache's window
    (k, k_hs), (v, v_hs) = head_stride(k, Lk * d), head_stride(v, Lk * dv)
    q, R, S, u = (t.contiguous() for t in (q, R, S, u))
    out = torch.zeros(B, H, Lq, dv, dtype=q.dtype, device=q.device)
    lse = torch.full((B, H, Lq), float("-inf"), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or Lk == 0:
        return out, lse
    kw, c = _consts(q, v, causal, fwd=True)
    with device_ctx(q):
        _fwd_kernel[(triton.cdiv(Lq, kw["BM"]), B * H)](
            q, k, v, R, S, u, out, lse, H, Lq, Lk, d, dv, P, d ** -0.5, int(q_offset), k_hs, v_hs, **kw,
            **launch_opts(q, c["warps"], c["stages"]))
    return out, lse


def chunks(n_key_blocks: int) -> int:
    """How many programs share one (batch, head) in the backward: a function of the key-block count only, so
    the rounding of dq, dR, dS does not depend on the batch, the GPU or the scheduling; at most MAX_CHUNKS, so
    the partial buffers stay MAX_CHUNKS x O(L d)."""
    return max(1, min(int(n_key_blocks), MAX_CHUNKS))


MAX_CHUNKS = 4


def schedule(q: torch.Tensor, d: int) -> str:
    """The backward's schedule: ``SCHEDULE`` if set ("fused" or "split"), else ``_cfg``'s ``bwd`` ("fused")."""
    return SCHEDULE or _cfg(q, d).get("bwd", "fused")


SCHEDULE: Optional[str] = None  # tests and benchmarks/gpu/tune_rel_attention.py set it; the library never does


def _backward_split(q, k, v, R, S, u, do, lse, delta, dk, dvv, causal: bool, q_offset: int):
    """The three-kernel backward (dk dv du per key block, dq per query block, dR dS per block of table rows);
    writes dk, dvv in place and returns dq, du, dR, dS. The dR / dS partials are (B H, NRT) rows, summed over
    the batch in torch (a fixed order); O(L d) memory."""
    B, H, Lq, d = q.shape
    Lk, dv, P = k.shape[2], v.shape[-1], R.shape[0] // 2
    kw, c = _consts(q, v, causal)
    # each kernel's (rows, columns, warps): _cfg's "split" entry, else the backward's tiles for all three
    tiles = dict(kv=(kw["BM"], kw["BN"], c["bwd_warps"]), q=(kw["BM"], kw["BN"], c["bwd_warps"]),
                 rel=(kw["BM"], c.get("BT", kw["BN"]), c["bwd_warps"]))
    tiles.update(c.get("split") or {})
    base = {n: x for n, x in kw.items() if n not in ("BM", "BN")}
    f32 = dict(dtype=torch.float32, device=q.device)
    args = (H, Lq, Lk, d, dv, P, d ** -0.5, q_offset)
    kvM, kvN, kvW = tiles["kv"]
    qM, qN, qW = tiles["q"]
    rM, BT, rW = tiles["rel"]
    nN = triton.cdiv(Lk, kvN)
    dup = torch.empty(B, H, nN, d, **f32)
    dq = torch.empty_like(q)
    # the table rows visible pairs read: r = P + j - i - q_offset over i < Lq, j < Lk (j <= i + q_offset causal)
    rlo = max(0, P - (Lq - 1) - q_offset)
    rhi = min(2 * P, P + Lk - q_offset, P + 1 if causal else 2 * P)
    nT = triton.cdiv(max(rhi - rlo, 0), BT)
    NRT = nT * BT
    dRp = torch.empty(B, H, NRT, d, **f32)
    dSp = torch.empty(B, H, NRT, **f32)
    with device_ctx(q):
        _bwd_kv_kernel[(nN, B * H)](q, k, v, R, S, u, do, lse, delta, dk, dvv, dup, *args, nN, BM=kvM, BN=kvN,
                                    **base, **launch_opts(q, kvW, c["stages"]))
        _bwd_q_kernel[(triton.cdiv(Lq, qM), B * H)](q, k, v, R, S, u, do, lse, delta, dq, *args, BM=qM, BN=qN,
                                                     **base, **launch_opts(q, qW, c["stages"]))
        if nT:
            _bwd_rel_kernel[(nT, B * H)](q, k, v, R, S, u, do, lse, delta, dRp, dSp, *args, rlo, NRT, BM=rM, BT=BT,
                                         **base, **launch_opts(q, rW, c["stages"]))
    dR = torch.zeros(R.shape, **f32)
    dS = torch.zeros(S.shape, **f32)
    hi = min(rlo + NRT, 2 * P)
    if hi > rlo:  # rows of the last block past the table only ever saw masked pairs
        dR[rlo:hi] = dRp.sum(0)[:, :hi - rlo].transpose(0, 1)
        dS[rlo:hi] = dSp.sum(0)[:, :hi - rlo].T
    return dq, dup.sum(dim=(0, 2)), dR, dS


def backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, R: torch.Tensor,
             S: torch.Tensor, u: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, causal: bool, q_offset: int):
    B, H, Lq, d = q.shape
    Lk, dv, P = k.shape[2], v.shape[-1], R.shape[0] // 2
    q, k, v, R, S, u = _prep(q, k, v, R, S, u)
    do = grad_out.to(q.dtype).contiguous()
    lse = lse.to(torch.float32).contiguous()
    delta = (do.to(torch.float32) * out.to(torch.float32)).sum(-1).contiguous()
    dq, dk, dvv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dR = torch.zeros(R.shape, dtype=torch.float32, device=q.device)
    dS = torch.zeros(S.shape, dtype=torch.float32, device=q.device)
    du = torch.zeros(u.shape, dtype=torch.float32, device=q.device)
    if q.numel() and k.numel() and schedule(q, d) == "split":
        dq, du, dR, dS = _backward_split(q, k, v, R, S, u, do, lse, delta, dk, dvv, causal, int(q_offset))
    elif q.numel() and k.numel():
        kw, c = _consts(q, v, causal)
        BM, BN = kw["BM"], kw["BN"]
        nM, nN = triton.cdiv(Lq, BM), triton.cdiv(Lk, BN)
        nC = chunks(nN)
        # window rows run from rbase (n0 = 0, last query block) to rbase + NR - 1 (last key block, m0 = 0)
        rbase = P - (nM - 1) * BM - int(q_offset) - (BM - 1)
        NR = nN * BN + nM * BM
        f32 = dict(dtype=torch.float32, device=q.device)
        dup = torch.empty(B, H, nN, d, **f32)
        dqp = torch.zeros(nC, B, H, Lq, d, **f32)
        dRp = torch.zeros(nC, B, H, NR, d, **f32)
        dSp = torch.zeros(nC, B, H, NR, **f32)
        with device_ctx(q):
            _bwd_kernel[(nC, B * H)](q, k, v, R, S, u, do, lse, delta, dk, dvv, dup, dqp, dRp, dSp,
                                     H, Lq, Lk, d, dv, P, d ** -0.5, int(q_offset), nN, nC, B * H, NR, rbase, **kw,
                                     **launch_opts(q, c["bwd_warps"], c["stages"]))
        # fixed-order reductions of the partials (chunks, then batch, then key blocks): no float atomics
        dq = dqp.sum(0).to(q.dtype)
        du = dup.sum(dim=(0, 2))
        rows_R = dRp.sum(dim=(0, 1))  # (H, NR, d): buffer row i is table row rbase + i
        rows_S = dSp.sum(dim=(0, 1))
        lo, hi = max(rbase, 0), min(rbase + NR, 2 * P)
        if hi > lo:  # rows outside the table only ever saw masked pairs: their partials are zeros
            dR[lo:hi] = rows_R[:, lo - rbase:hi - rbase].transpose(0, 1)
            dS[lo:hi] = rows_S[:, lo - rbase:hi - rbase].T
    return dq, dk, dvv, dR.to(R.dtype), dS.to(S.dtype), du.to(u.dtype)


# ---------------------------------------------------------------------------
# causal depthwise conv: y[t, c] = sum_k w[c, k] x[t - K + 1 + k, c] + b[c], x[t < 0] = 0


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, L, C, K, HAS_B: tl.constexpr, BT: tl.constexpr,
                     BC: tl.constexpr):
    pt = tl.program_id(0)
    pc = tl.program_id(1)
    n = tl.program_id(2)
    t = pt * BT + tl.arange(0, BT)
    c = pc * BC + tl.arange(0, BC)
    cm = c < C
    acc = tl.zeros([BT, BC], tl.float32)
    for kk in range(0, K):  # the reference's order: taps oldest first, then the bias
        src = t - (K - 1 - kk)
        xv = tl.load(x_ptr + (n * L + src)[:, None] * C + c[None, :],
                     mask=((src >= 0) & (src < L))[:, None] & cm[None, :], other=0.0)
        wv = tl.load(w_ptr + c * K + kk, mask=cm, other=0.0).to(tl.float32)
        acc += xv.to(tl.float32) * wv[None, :]
    if HAS_B:
        acc += tl.load(b_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + (n * L + t)[:, None] * C + c[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(t < L)[:, None] & cm[None, :])


@triton.jit
def _conv_bwd_kernel(g_ptr, x_ptr, w_ptr, dx_ptr, dwp_ptr, L, C, K, nT, BT: tl.constexpr, BC: tl.constexpr):
    """dx for one (time block, channel block, sequence), and that block's partial of dweight (K, BC)."""
    pt = tl.program_id(0)
    pc = tl.program_id(1)
    n = tl.program_id(2)
    t = pt * BT + tl.arange(0, BT)
    c = pc * BC + tl.arange(0, BC)
    cm = c < C
    tm = t < L
    g = tl.load(g_ptr + (n * L + t)[:, None] * C + c[None, :], mask=tm[:, None] & cm[None, :],
                other=0.0).to(tl.float32)
    dx = tl.zeros([BT, BC], tl.float32)
    for kk in range(0, K):
        shift = K - 1 - kk  # y[t] reads x[t - shift] through tap kk
        wv = tl.load(w_ptr + c * K + kk, mask=cm, other=0.0).to(tl.float32)
        later = t + shift
        gs = tl.load(g_ptr + (n * L + later)[:, None] * C + c[None, :], mask=(later < L)[:, None] & cm[None, :],
                     other=0.0).to(tl.float32)
        dx += wv[None, :] * gs
        src = t - shift
        xs = tl.load(x_ptr + (n * L + src)[:, None] * C + c[None, :],
                     mask=((src >= 0) & tm)[:, None] & cm[None, :], other=0.0).to(tl.float32)
        tl.store(dwp_ptr + ((n * nT + pt) * K + kk) * C + c, tl.sum(g * xs, 0), mask=cm)
    tl.store(dx_ptr + (n * L + t)[:, None] * C + c[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=tm[:, None] & cm[None, :])


def _conv_cfg(x: torch.Tensor, C: int) -> dict:
    """64 time steps x up to 64 channels per program on the GPU (16 x 16 in the interpreter)."""
    bt = 64 if x.device.type == "cuda" else 16
    return dict(BT=bt, BC=min(bt, triton.next_power_of_2(max(C, 1))))


def conv_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    L, C, K = x.shape[-2], x.shape[-1], weight.shape[-1]
    xc = x.contiguous()
    y = torch.empty_like(xc)
    N = xc.numel() // max(L * C, 1) if L * C else 0
    if y.numel() == 0:
        return y
    c = _conv_cfg(x, C)
    wc = weight.contiguous()
    b = bias.contiguous() if bias is not None else wc  # unread without HAS_B
    with device_ctx(x):
        _conv_fwd_kernel[(triton.cdiv(L, c["BT"]), triton.cdiv(C, c["BC"]), N)](
            xc, wc, b, y, L, C, K, HAS_B=bias is not None, **c, **launch_opts(x, 4, 1))
    return y


def conv_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, has_bias: bool):
    L, C, K = x.shape[-2], x.shape[-1], weight.shape[-1]
    xc = x.contiguous()
    g = grad_y.to(x.dtype).contiguous()
    dx = torch.zeros_like(xc)
    dw = torch.zeros(C, K, dtype=torch.float32, device=x.device)
    db = torch.zeros(C, dtype=torch.float32, device=x.device)
    if xc.numel():
        N = xc.numel() // (L * C)
        c = _conv_cfg(x, C)
        nT = triton.cdiv(L, c["BT"])
        dwp = torch.empty(N, nT, K, C, dtype=torch.float32, device=x.device)
        with device_ctx(x):
            _conv_bwd_kernel[(nT, triton.cdiv(C, c["BC"]), N)](g, xc, weight.contiguous(), dx, dwp, L, C, K, nT, **c,
                                                             **launch_opts(x, 4, 1))
        dw = dwp.sum(dim=(0, 1)).T  # a fixed-order reduction of the per-block partials: no atomics
        db = g.to(torch.float32).reshape(-1, C).sum(0)
    return dx, dw.to(weight.dtype).contiguous(), (db.to(weight.dtype) if has_bias else weight.new_empty(0))


__all__ = ["forward", "backward", "conv_forward", "conv_backward"]
