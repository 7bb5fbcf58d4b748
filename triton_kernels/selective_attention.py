"""Triton kernels for selective self-attention (docs/ops/selective_attention.md).

Launchers called by ``embkern.ops.selective_attention`` (backend ``"triton"``)
with torch tensors on CUDA, or on the CPU under ``TRITON_INTERPRET=1``:

==========  ===========================================================  =====================================
launcher    inputs                                                       returns
==========  ===========================================================  =====================================
forward     q (B,Hq,Lq,d), k (B,Hkv,Lk,d), v (B,Hkv,Lk,dv), tau_q         O (B,Hq,Lq,dv) q.dtype, lse (B,Hq,Lq)
            (B,Hq,Lq), tau_v (B,Hkv,Lk)|None, causal, scale, q_offset    fp32
backward    grad_out, the same, O, lse                                   dq, dk, dv, dtau_q, dtau_v (or empty)
==========  ===========================================================  =====================================

Design (flash-attention 2 with the temperatures folded in):

* forward: one program per (query block, batch x query head). The row scale
  ``tau_q[i] * scale`` multiplies the q.k tile (exact: it depends on the row
  only) and ``tau_v[j]`` multiplies the V tile as it is loaded; online
  softmax in fp32; key blocks past the causal limit of the block's last row
  are never visited. A row that sees no key keeps ``l = 0``: O = 0,
  lse = -inf (no NaN: the running max is replaced by 0 while it is -inf).
* backward: ``D_i = sum_d dO_i O_i`` in torch, then two kernels without
  atomics (results do not depend on scheduling): dk / dv' per (key block,
  batch x kv head), looping over the group's query heads and the query blocks
  that can see the keys; dq' per (query block, batch x query head). P is
  recomputed from lse in both. Epilogues: ``dv = tau_v dv'``,
  ``dtau_v = sum_d dv' v``, ``dq = tau_q dq'``, ``dtau_q = sum_d dq' q``.
* precision: every tile product goes through ``_tiles._dot`` (fp32 IEEE, no
  TF32; fp16 / bf16 on tensor cores with fp32 accumulation; bf16 upcast in the
  interpreter). P is rounded to the input dtype before P V and dS before
  dS K / dS^T Q, as flash-attention does.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import _checks
from ._tiles import _dot, _softmax_finish, _softmax_step, launch_opts
from ._tiles import device_ctx as _device_ctx, head_stride as _head_stride, pow2 as _pow2, upcast as _upcast


def _cfg(t: torch.Tensor, d: int) -> dict:
    """Each kernel's (BM query rows, BN keys, warps): ``fwd``, ``kv`` (dk / dv per key block) and ``q``
    (dq per query block), plus the pipeline ``stages``. The three need not agree: lse and D are per row.

    Interpreter: 16 x 16 (the tl.dot minimum; every program runs in Python). GPU, fp16 / bf16: 128 x 64
    with 8 warps for all three up to d = 128; smaller above, for shared memory (below). GPU, fp32: IEEE
    products are FMA loops, and once a tile's demand is well past ptxas' 255-register budget, ptxas (12.9
    and 13.x, sm_90) compiles the kernel to 32 registers a thread and spills 10-40 KB: 64 x 64 with 4 warps
    did (fwd 13 KB, kv 38 KB, q 24 KB of spill stores). The fp32 tiles below are the largest tried that
    compile under the budget (spill stores at d = 64 / 128 / 256: fwd 0 / 184 / 0 B, kv 44 / 944 / 960 B,
    q 32 / 388 / 360 B). ``python benchmarks/gpu/compile_selective_attention.py --all`` prints every
    kernel's shared memory, registers and spills. Not yet timed on a GPU."""
    if t.device.type != "cuda":
        one = (16, 16, 1)
        return dict(fwd=one, kv=one, q=one, stages=1)
    if t.dtype == torch.float32:
        if d <= 64:
            return dict(fwd=(64, 32, 8), kv=(32, 32, 8), q=(32, 32, 8), stages=2)
        if d <= 128:
            return dict(fwd=(32, 32, 8), kv=(16, 32, 8), q=(16, 32, 8), stages=2)
        return dict(fwd=(16, 32, 8), kv=(16, 16, 8), q=(16, 16, 8), stages=2)
    if d <= 128:
        return dict(fwd=(128, 64, 8), kv=(128, 64, 8), q=(128, 64, 8), stages=2)
    # 128 x 32 for all three needed 290 KiB of shared memory in the key-block kernel (sm_90 has 227):
    # kv 64 x 64 takes 137 KiB with every product on wgmma, q 64 x 32 96 KiB (2.7 KB of spills at 128 x 32)
    return dict(fwd=(128, 32, 8), kv=(64, 64, 8), q=(64, 32, 8), stages=2)


def _opts(t: torch.Tensor, c: dict, kernel: str) -> dict:
    return launch_opts(t, c[kernel][2], c["stages"])


@triton.jit
def _load_kv(k_ptr, v_ptr, tv_ptr, hk, k_hs, v_hs, tv_hs, cols, cmask, od, odv, d, dv, HAS_TV: tl.constexpr):
    """The key tile and the value tile scaled by tau_v (as it is loaded), rows ``cols`` of kv head ``hk``;
    kv heads start every k_hs / v_hs / tv_hs elements (Lk d, Lk dv, Lk when packed), each head's rows packed."""
    k = tl.load(k_ptr + hk * k_hs + cols[:, None] * d + od[None, :], mask=cmask[:, None] & (od < d)[None, :],
                other=0.0)
    v = tl.load(v_ptr + hk * v_hs + cols[:, None] * dv + odv[None, :], mask=cmask[:, None] & (odv < dv)[None, :],
                other=0.0)
    if HAS_TV:
        tv = tl.load(tv_ptr + hk * tv_hs + cols, mask=cmask, other=0.0).to(tl.float32)
        v = (v.to(tl.float32) * tv[:, None]).to(v.dtype)
    return k, v


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, tq_ptr, tv_ptr, o_ptr, lse_ptr,
                Hq, groups, Lq, Lk, d, dv, scale, q_offset, k_hs, v_hs, tv_hs,
                HAS_TV: tl.constexpr, CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                BD: tl.constexpr, BDV: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = b * (Hq // groups) + h // groups  # flat (batch, kv head)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < Lq
    od = tl.arange(0, BD)
    odv = tl.arange(0, BDV)
    q = tl.load(q_ptr + (bh * Lq + rows)[:, None] * d + od[None, :], mask=rmask[:, None] & (od < d)[None, :],
                other=0.0)
    rs = tl.load(tq_ptr + bh * Lq + rows, mask=rmask, other=1.0).to(tl.float32) * scale
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BDV], tl.float32)
    hi = Lk
    if CAUSAL:
        hi = tl.minimum(Lk, pid_m * BM + BM - 1 + q_offset + 1)
    for n0 in range(0, hi, BN):
        cols = n0 + tl.arange(0, BN)
        cmask = cols < Lk
        k, v = _load_kv(k_ptr, v_ptr, tv_ptr, hk, k_hs, v_hs, tv_hs, cols, cmask, od, odv, d, dv, HAS_TV)
        s = _dot(q, tl.trans(k), UPCAST, IEEE) * rs[:, None]
        ok = cmask[None, :]
        if CAUSAL:
            ok = ok & (cols[None, :] <= rows[:, None] + q_offset)
        s = tl.where(ok, s, float("-inf"))
        m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, UPCAST, IEEE)
    out, lse = _softmax_finish(m_i, l_i, acc)
    tl.store(o_ptr + (bh * Lq + rows)[:, None] * dv + odv[None, :], out.to(o_ptr.dtype.element_ty),
             mask=rmask[:, None] & (odv < dv)[None, :])
    tl.store(lse_ptr + bh * Lq + rows, lse, mask=rmask)


@triton.jit
def _bwd_kv_kernel(q_ptr, k_ptr, v_ptr, tq_ptr, tv_ptr, do_ptr, lse_ptr, delta_ptr,
                   dk_ptr, dv_ptr, dtv_ptr,
                   Hkv, groups, Lq, Lk, d, dv, scale, q_offset,
                   HAS_TV: tl.constexpr, CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   BD: tl.constexpr, BDV: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    pid_n = tl.program_id(0)
    bk = tl.program_id(1)  # flat (batch, kv head)
    b = bk // Hkv
    hk = bk % Hkv
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < Lk
    od = tl.arange(0, BD)
    odv = tl.arange(0, BDV)
    k = tl.load(k_ptr + (bk * Lk + cols)[:, None] * d + od[None, :], mask=cmask[:, None] & (od < d)[None, :],
                other=0.0)
    v = tl.load(v_ptr + (bk * Lk + cols)[:, None] * dv + odv[None, :], mask=cmask[:, None] & (odv < dv)[None, :],
                other=0.0)
    vs = v
    if HAS_TV:
        tv = tl.load(tv_ptr + bk * Lk + cols, mask=cmask, other=0.0).to(tl.float32)
        vs = (v.to(tl.float32) * tv[:, None]).to(v.dtype)
    dk = tl.zeros([BN, BD], tl.float32)
    dvp = tl.zeros([BN, BDV], tl.float32)
    lo = 0
    if CAUSAL:  # the first query row that sees key pid_n * BN is pid_n * BN - q_offset
        lo = tl.maximum(0, pid_n * BN - q_offset)
        lo = (lo // BM) * BM
    for g in range(0, groups):
        bh = (b * Hkv + hk) * groups + g  # flat (batch, query head)
        for m0 in range(lo, Lq, BM):
            rows = m0 + tl.arange(0, BM)
            rmask = rows < Lq
            q = tl.load(q_ptr + (bh * Lq + rows)[:, None] * d + od[None, :],
                        mask=rmask[:, None] & (od < d)[None, :], other=0.0)
            rs = tl.load(tq_ptr + bh * Lq + rows, mask=rmask, other=0.0).to(tl.float32) * scale
            do = tl.load(do_ptr + (bh * Lq + rows)[:, None] * dv + odv[None, :],
                         mask=rmask[:, None] & (odv < dv)[None, :], other=0.0)
            lse = tl.load(lse_ptr + bh * Lq + rows, mask=rmask, other=float("-inf"))
            dlt = tl.load(delta_ptr + bh * Lq + rows, mask=rmask, other=0.0)
            s = _dot(q, tl.trans(k), UPCAST, IEEE) * rs[:, None]
            ok = cmask[None, :] & rmask[:, None] & (lse != float("-inf"))[:, None]
            if CAUSAL:
                ok = ok & (cols[None, :] <= rows[:, None] + q_offset)
            lse_safe = tl.where(lse == float("-inf"), 0.0, lse)
            p = tl.where(ok, tl.exp(s - lse_safe[:, None]), 0.0)
            dvp += _dot(tl.trans(p.to(do.dtype)), do, UPCAST, IEEE)
            dp = _dot(do, tl.trans(vs), UPCAST, IEEE)
            ds = p * (dp - dlt[:, None]) * rs[:, None]  # dS scaled by the row's tau_q * scale
            dk += _dot(tl.trans(ds.to(q.dtype)), q, UPCAST, IEEE)
    dv_out = dvp
    if HAS_TV:
        dv_out = dvp * tv[:, None]
        dtv = tl.sum(dvp * v.to(tl.float32), 1)
        tl.store(dtv_ptr + bk * Lk + cols, dtv, mask=cmask)
    tl.store(dk_ptr + (bk * Lk + cols)[:, None] * d + od[None, :], dk.to(dk_ptr.dtype.element_ty),
             mask=cmask[:, None] & (od < d)[None, :])
    tl.store(dv_ptr + (bk * Lk + cols)[:, None] * dv + odv[None, :], dv_out.to(dv_ptr.dtype.element_ty),
             mask=cmask[:, None] & (odv < dv)[None, :])


@triton.jit
def _bwd_q_kernel(q_ptr, k_ptr, v_ptr, tq_ptr, tv_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dtq_ptr,
                  Hq, groups, Lq, Lk, d, dv, scale, q_offset,
                  HAS_TV: tl.constexpr, CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                  BD: tl.constexpr, BDV: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = b * (Hq // groups) + h // groups
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < Lq
    od = tl.arange(0, BD)
    odv = tl.arange(0, BDV)
    q = tl.load(q_ptr + (bh * Lq + rows)[:, None] * d + od[None, :], mask=rmask[:, None] & (od < d)[None, :],
                other=0.0)
    tq = tl.load(tq_ptr + bh * Lq + rows, mask=rmask, other=0.0).to(tl.float32)
    rs = tq * scale
    do = tl.load(do_ptr + (bh * Lq + rows)[:, None] * dv + odv[None, :], mask=rmask[:, None] & (odv < dv)[None, :],
                 other=0.0)
    lse = tl.load(lse_ptr + bh * Lq + rows, mask=rmask, other=float("-inf"))
    dlt = tl.load(delta_ptr + bh * Lq + rows, mask=rmask, other=0.0)
    lse_safe = tl.where(lse == float("-inf"), 0.0, lse)
    dqp = tl.zeros([BM, BD], tl.float32)
    hi = Lk
    if CAUSAL:
        hi = tl.minimum(Lk, pid_m * BM + BM - 1 + q_offset + 1)
    for n0 in range(0, hi, BN):
        cols = n0 + tl.arange(0, BN)
        cmask = cols < Lk
        k, v = _load_kv(k_ptr, v_ptr, tv_ptr, hk, Lk * d, Lk * dv, Lk, cols, cmask, od, odv, d, dv, HAS_TV)
        s = _dot(q, tl.trans(k), UPCAST, IEEE) * rs[:, None]
        ok = cmask[None, :] & (lse != float("-inf"))[:, None]
        if CAUSAL:
            ok = ok & (cols[None, :] <= rows[:, None] + q_offset)
        p = tl.where(ok, tl.exp(s - lse_safe[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), UPCAST, IEEE)
        ds = p * (dp - dlt[:, None])
        dqp += _dot(ds.to(k.dtype), k, UPCAST, IEEE)
    dqp = dqp * scale
    dtq = tl.sum(dqp * q.to(tl.float32), 1)
    tl.store(dq_ptr + (bh * Lq + rows)[:, None] * d + od[None, :], (dqp * tq[:, None]).to(dq_ptr.dtype.element_ty),
             mask=rmask[:, None] & (od < d)[None, :])
    tl.store(dtq_ptr + bh * Lq + rows, dtq, mask=rmask)


def _prep(q, k, v, tau_q, tau_v):
    q, k, v = (t.contiguous() for t in (q, k, v))
    tq = tau_q.to(torch.float32).contiguous()
    tv = tau_v.to(torch.float32).contiguous() if tau_v is not None else tq  # unread when HAS_TV is False
    return q, k, v, tq, tv


def _consts(q, k, v, tau_v, causal):
    """The constexprs every kernel shares (its own BM / BN come from ``_cfg``) and the config."""
    B, Hq, Lq, d = q.shape
    c = _cfg(q, d)
    return dict(HAS_TV=tau_v is not None, CAUSAL=bool(causal), BD=_pow2(d), BDV=_pow2(v.shape[-1]),
                UPCAST=_upcast(q), IEEE=q.dtype == torch.float32), c


def _tile(c: dict, kernel: str) -> dict:
    BM, BN, _ = c[kernel]
    return dict(BM=BM, BN=BN)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tau_q: torch.Tensor, tau_v: Optional[torch.Tensor],
            causal: bool, scale: float, q_offset: int) -> Tuple[torch.Tensor, torch.Tensor]:
    B, Hq, Lq, d = q.shape
    Hkv, Lk, dv = k.shape[1], k.shape[2], v.shape[-1]
    q = q.contiguous()
    (k, k_hs), (v, v_hs) = _head_stride(k, Lk * d), _head_stride(v, Lk * dv)
    tq = tau_q.to(torch.float32).contiguous()
    tv, tv_hs = _head_stride(tau_v.to(torch.float32), Lk) if tau_v is not None else (tq, 0)  # tq: unread
    out = torch.zeros(B, Hq, Lq, dv, dtype=q.dtype, device=q.device)
    lse = torch.full((B, Hq, Lq), float("-inf"), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or Lk == 0:
        return out, lse
    kw, c = _consts(q, k, v, tau_v, causal)
    t = _tile(c, "fwd")
    with _device_ctx(q):
        _fwd_kernel[(triton.cdiv(Lq, t["BM"]), B * Hq)](
            q, k, v, tq, tv, out, lse, Hq, Hq // Hkv, Lq, Lk, d, dv, float(scale), int(q_offset), k_hs, v_hs, tv_hs,
            **kw, **t, **_opts(q, c, "fwd"))
    return out, lse


def backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tau_q: torch.Tensor,
             tau_v: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float,
             q_offset: int):
    B, Hq, Lq, d = q.shape
    Hkv, Lk, dv = k.shape[1], k.shape[2], v.shape[-1]
    q, k, v, tq, tv = _prep(q, k, v, tau_q, tau_v)
    do = grad_out.to(q.dtype).contiguous()
    lse = lse.to(torch.float32).contiguous()
    delta = (do.to(torch.float32) * out.to(torch.float32)).sum(-1).contiguous()
    dq = torch.zeros_like(q)
    dk = torch.zeros_like(k)
    dvv = torch.zeros_like(v)
    dtq = torch.zeros(B, Hq, Lq, dtype=torch.float32, device=q.device)
    dtv = torch.zeros(B, Hkv, Lk, dtype=torch.float32, device=q.device)
    if q.numel() and k.numel():
        kw, c = _consts(q, k, v, tau_v, causal)
        tkv, tq_ = _tile(c, "kv"), _tile(c, "q")
        with _device_ctx(q):
            _bwd_kv_kernel[(triton.cdiv(Lk, tkv["BN"]), B * Hkv)](
                q, k, v, tq, tv, do, lse, delta, dk, dvv, dtv, Hkv, Hq // Hkv, Lq, Lk, d, dv, float(scale),
                int(q_offset), **kw, **tkv, **_opts(q, c, "kv"))
            _bwd_q_kernel[(triton.cdiv(Lq, tq_["BM"]), B * Hq)](
                q, k, v, tq, tv, do, lse, delta, dq, dtq, Hq, Hq // Hkv, Lq, Lk, d, dv, float(scale),
                int(q_offset), **kw, **tq_, **_opts(q, c, "q"))
    dtau_q = dtq.to(tau_q.dtype)
    dtau_v = dtv.to(tau_v.dtype) if tau_v is not None else tau_q.new_empty(0)
    return dq, dk, dvv, dtau_q, dtau_v


__all__ = ["forward", "backward"]
