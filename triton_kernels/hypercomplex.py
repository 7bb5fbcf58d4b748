"""Triton kernels for hypercomplex (quaternion / dihedron) KG scoring.

Launchers called by ``embkern.ops.hypercomplex`` (backend ``"triton"``), with
contiguous torch tensors on CUDA, or on the CPU under ``TRITON_INTERPRET=1``.
Shapes (K = 4d reals per entity, ``[a|b|c|d]`` or interleaved ``(d, 4)``):

==============  =====================================================  ==========================================
launcher        inputs                                                 returns
==============  =====================================================  ==========================================
query_forward   h, r (B, K); algebra, layout, normalize                q (B, K)
query_backward  grad_q, h, r (B, K); algebra, layout, normalize        grad_h, grad_r (B, K)
score_forward   q (B, K), E (N, K), bias_h (B,)|None, bias_t (N,)|None S (B, N) in q.dtype
rank            ... targets (B,) int64, filter CSR|None, ties          ranks (B,) float64
topk            ... k, filter CSR|None                                 values (B, k) q.dtype, indices (B, k) int64
ce_forward      ... targets                                            loss (B,), lse (B,) float32
ce_backward     grad_loss (B,), ... targets, lse (B,)                  grad_q (B,K), grad_E (N,K), grad_bias_h (B,),
                                                                       grad_bias_t (N,)
==============  =====================================================  ==========================================

Design. Every score S[b, n] is produced by one tile routine, :func:`_score_tile`:
a (BLOCK_B x BLOCK_N) tile of q E^T with a K loop of ``tl.dot`` (fp32
accumulation; ``input_precision="ieee"`` for fp32 inputs so no TF32 enters),
then the epilogue in registers (distance: ``2 qE^T - |q|^2 - |E|^2 + b_h + b_t``
with the squared norms precomputed once in fp32). Scores are rounded to the
input dtype before rank / top-k compare them, so the fused kernels see exactly
the value ``score_forward`` stores (the reference ranks the materialised
matrix in the input dtype too). ``score_forward``, ``rank`` and ``topk`` run
the same K loop (same BLOCK_K, same constexprs, FMA contraction on), and
``tl.dot`` gives each output element the same k-order wherever it sits in a
tile, so the score of (b, n) is bit-identical across the three.

* The fused sweeps run over (row blocks x N splits) programs: one program
  per row block would give 2 programs at B = 128, leaving a GPU idle. Each split
  covers a contiguous range of N tiles (``_n_split``: about 264 programs, at
  least 4 tiles a split, fixed by (B, N) and not by the device), and the
  per-split partials are combined in torch in a fixed order.
* ``rank``: never a B x N buffer. A first launch computes each target score
  with the very tile that ``score_forward`` would use for it (one program per
  distinct target tile of a row block; the launcher sorts the queries by
  target so a block's targets share tiles). The second sweeps each split's
  tiles counting ``s > s_t`` and ``s >= s_t``; the int32 counts of the splits
  are summed exactly. Filtered ids are masked inside each tile: the launcher
  sorts each CSR row and finds where every split's columns begin in it
  (``searchsorted``), the kernel keeps a per-row cursor and marks the ids that
  fall in the current tile, so duplicates and a filtered target cost nothing
  extra and no filtered score is ever recomputed on a different arithmetic path.
* ``topk``: each (row block, split) program keeps a running top-KP list
  (KP = next power of two >= k) of 64-bit keys (order-preserving score bits,
  then the complement of the entity id, so equal scores put the lower id
  first); each tile is reduced with ``tl.topk`` and merged with a bitonic
  merge, and tiles with no key above the running minimum are skipped. The
  splits' lists are merged with ``torch.topk`` on the keys (distinct, so the
  merge is exact). Filtered ids are never selected. For KP > min(64, BLOCK_N)
  (k > 64 on the GPU, k > 16 in the interpreter) a two-stage fallback
  materialises (rows_chunk, N) scores with ``score_forward``, at most 2^24 of
  them per chunk, and sorts them in torch.
* ``ce_forward``: online logsumexp over each split's tiles, (max, sum, s_t)
  partials combined in torch.
* ``ce_backward``: G = grad_loss (softmax - onehot) is recomputed in fp32 on
  score_forward's tile for a chunk of rows at a time (at most 2^22 values,
  16 MiB, so memory is O(chunk x N) and never B x N), then grad_q = G E and
  grad_E += G^T q_chunk are IEEE fp32 products (``_mm``: one program per
  output tile, the reduction split between programs when tiles are few and
  the splits summed in torch). No atomics: results do not depend on
  scheduling.
* ``query_forward`` / ``query_backward``: elementwise over the (B, d)
  coordinates, both layouts, fp32 arithmetic.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

_ALG = {"quaternion": 0, "dihedron": 1}
_LAY = {"component": 0, "interleaved": 1}
_SCORE = {"inner": 0, "distance": 1}

# Above this many padded top-k slots, the running list and the tile's best
# (2 x 64 x KP int64 keys: 64 KiB per program at KP = 64, already ~400 B per
# thread of spills on sm_90) no longer fit in registers next to the score
# tile; the chunked fallback takes over.
_TOPK_FUSED_MAX = 64
_FALLBACK_CHUNK = 1 << 24  # scores materialised per fallback chunk (64 MiB in fp32)

# The fused sweeps (rank, topk, ce) split the N tiles between programs as well
# as the row blocks: one program per row block gives 2 programs at B = 128
# (BLOCK_B = 64), far fewer than a GPU's SMs. Aim for about two waves of an
# H100's 132 SMs. The figure is fixed, not read
# from the device, so a (B, N) is split the same way on every GPU and the
# float partials of ce (the only non-integer ones) combine identically.
_SPLIT_PROGRAMS = 264
_MIN_SPLIT_TILES = 4  # N tiles per split at least (rank/topk redo a little per split)


def _n_split(programs: int, n_tiles: int) -> Tuple[int, int]:
    """(splits, tiles per split) for a sweep over n_tiles with `programs` programs per split."""
    want = max(1, -(-_SPLIT_PROGRAMS // max(programs, 1)))
    s = max(1, min(want, n_tiles // max(_MIN_SPLIT_TILES, 1)))
    tps = -(-n_tiles // s)
    return -(-n_tiles // tps), tps


def _cfg(t: torch.Tensor) -> dict:
    """Tile shapes per device and dtype.

    The interpreter runs every program in Python: 16-wide tiles (the tl.dot
    minimum) keep the tests fast. On the GPU (sm_90): the score tile of
    score_forward, rank, topk and ce_forward -- one shape, so one MMA
    instruction family and the same per-element arithmetic -- is 64 x 128 x 64
    on tensor cores for fp16/bf16 with 8 warps, and 64 x 64 x 32 with ieee
    FMA for fp32 with 4 warps; ce_backward's G kernel uses it too. The fused
    rank / topk sweeps carry extra state and spill ~400 B per thread at these
    shapes. Throughput per dtype against cuBLAS is in benchmarks/results/.
    """
    if t.device.type != "cuda":
        return dict(BB=16, BN=16, BK=16, warps=1, stages=1)
    if t.dtype == torch.float32:
        return dict(BB=64, BN=64, BK=32, warps=4, stages=3)
    return dict(BB=64, BN=128, BK=64, warps=8, stages=3)


def _prec(t: torch.Tensor) -> str:
    # "ieee" keeps fp32 products exact-rounded (no TF32); fp16/bf16 inputs go
    # to tensor cores with fp32 accumulation whatever this says.
    return "ieee"


def _launch(t: torch.Tensor, c: dict) -> dict:
    """Launch options. FMA contraction is requested explicitly (Triton 3.9 warns
    when it is left to its changing default); it is on for every kernel, so the
    score of one (b, n) is the same instruction sequence in every launch."""
    opts = dict(num_warps=c["warps"], num_stages=c["stages"])
    if t.device.type == "cuda":
        opts["enable_fp_fusion"] = True
    return opts


def _f32dot(t: torch.Tensor) -> bool:
    # The interpreter keeps bf16 as raw uint16 and its tl.dot multiplies those
    # integers; bf16 -> fp32 is exact and a bf16 x bf16 product is exact in
    # fp32 (8 + 8 significant bits), so upcasting there computes what tensor
    # cores compute on the GPU.
    return t.device.type != "cuda" and t.dtype == torch.bfloat16


def _device_ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


# ---------------------------------------------------------------------------
# query = h (x) r_hat, elementwise over (B, d) coordinates


@triton.jit
def _coord_offsets(idx, d, LAYOUT: tl.constexpr):
    """Offsets of the four components of coordinate idx = b * d + i."""
    b = idx // d
    i = idx - b * d
    if LAYOUT == 0:  # [a | b | c | d]: components d apart
        o0 = b * (4 * d) + i
        o1 = o0 + d
    else:  # (d, 4): components adjacent
        o0 = b * (4 * d) + 4 * i
        o1 = o0 + 1
    step = o1 - o0
    return o0, o1, o1 + step, o1 + 2 * step


@triton.jit
def _load4(ptr, o0, o1, o2, o3, m, fill):
    a = tl.load(ptr + o0, mask=m, other=fill).to(tl.float32)
    b = tl.load(ptr + o1, mask=m, other=fill).to(tl.float32)
    c = tl.load(ptr + o2, mask=m, other=fill).to(tl.float32)
    e = tl.load(ptr + o3, mask=m, other=fill).to(tl.float32)
    return a, b, c, e


@triton.jit
def _inv_norm(a2, b2, c2, d2):
    # correctly rounded sqrt and division: the query is an fp32 elementwise
    # kernel, so the cost is nil and the result matches torch.rsqrt to ~1 ulp.
    n2 = a2 * a2 + b2 * b2 + c2 * c2 + d2 * d2
    return tl.div_rn(tl.full(n2.shape, 1.0, tl.float32), tl.sqrt_rn(n2))


@triton.jit
def _query_fwd_kernel(h_ptr, r_ptr, q_ptr, n_coord, d,
                      ALG: tl.constexpr, LAYOUT: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = idx < n_coord
    o0, o1, o2, o3 = _coord_offsets(idx, d, LAYOUT)
    a1, b1, c1, d1 = _load4(h_ptr, o0, o1, o2, o3, m, 0.0)
    # padding lanes read r = 1 so their 4-norm is finite (no 1/0 in unused lanes)
    a2, b2, c2, d2 = _load4(r_ptr, o0, o1, o2, o3, m, 1.0)
    if NORMALIZE:
        inv = _inv_norm(a2, b2, c2, d2)
        a2 = a2 * inv
        b2 = b2 * inv
        c2 = c2 * inv
        d2 = d2 * inv
    if ALG == 0:  # Hamilton: i^2 = j^2 = k^2 = ijk = -1
        x0 = a1 * a2 - b1 * b2 - c1 * c2 - d1 * d2
        x1 = a1 * b2 + b1 * a2 + c1 * d2 - d1 * c2
        x2 = a1 * c2 - b1 * d2 + c1 * a2 + d1 * b2
        x3 = a1 * d2 + b1 * c2 - c1 * b2 + d1 * a2
    else:  # dihedron: i^2 = -1, j^2 = k^2 = +1
        x0 = a1 * a2 - b1 * b2 + c1 * c2 + d1 * d2
        x1 = a1 * b2 + b1 * a2 - c1 * d2 + d1 * c2
        x2 = a1 * c2 + c1 * a2 + d1 * b2 - b1 * d2
        x3 = a1 * d2 + d1 * a2 + b1 * c2 - c1 * b2
    ty = q_ptr.dtype.element_ty
    tl.store(q_ptr + o0, x0.to(ty), mask=m)
    tl.store(q_ptr + o1, x1.to(ty), mask=m)
    tl.store(q_ptr + o2, x2.to(ty), mask=m)
    tl.store(q_ptr + o3, x3.to(ty), mask=m)


@triton.jit
def _query_bwd_kernel(g_ptr, h_ptr, r_ptr, gh_ptr, gr_ptr, n_coord, d,
                      ALG: tl.constexpr, LAYOUT: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = idx < n_coord
    o0, o1, o2, o3 = _coord_offsets(idx, d, LAYOUT)
    g0, g1, g2, g3 = _load4(g_ptr, o0, o1, o2, o3, m, 0.0)
    a1, b1, c1, d1 = _load4(h_ptr, o0, o1, o2, o3, m, 0.0)
    # padding lanes read r = 1 so their 4-norm is finite (no 1/0 in unused lanes)
    a2, b2, c2, d2 = _load4(r_ptr, o0, o1, o2, o3, m, 1.0)
    inv = tl.full(a2.shape, 1.0, tl.float32)
    if NORMALIZE:
        inv = _inv_norm(a2, b2, c2, d2)
        a2 = a2 * inv
        b2 = b2 * inv
        c2 = c2 * inv
        d2 = d2 * inv
    # d/dh and d/dr_hat of sum_c g_c (h (x) r_hat)_c, read off the product tables.
    if ALG == 0:
        ha = g0 * a2 + g1 * b2 + g2 * c2 + g3 * d2
        hb = -g0 * b2 + g1 * a2 - g2 * d2 + g3 * c2
        hc = -g0 * c2 + g1 * d2 + g2 * a2 - g3 * b2
        hd = -g0 * d2 - g1 * c2 + g2 * b2 + g3 * a2
        ra = g0 * a1 + g1 * b1 + g2 * c1 + g3 * d1
        rb = -g0 * b1 + g1 * a1 + g2 * d1 - g3 * c1
        rc = -g0 * c1 - g1 * d1 + g2 * a1 + g3 * b1
        rd = -g0 * d1 + g1 * c1 - g2 * b1 + g3 * a1
    else:
        ha = g0 * a2 + g1 * b2 + g2 * c2 + g3 * d2
        hb = -g0 * b2 + g1 * a2 - g2 * d2 + g3 * c2
        hc = g0 * c2 - g1 * d2 + g2 * a2 - g3 * b2
        hd = g0 * d2 + g1 * c2 + g2 * b2 + g3 * a2
        ra = g0 * a1 + g1 * b1 + g2 * c1 + g3 * d1
        rb = -g0 * b1 + g1 * a1 + g2 * d1 - g3 * c1
        rc = g0 * c1 + g1 * d1 + g2 * a1 + g3 * b1
        rd = g0 * d1 - g1 * c1 - g2 * b1 + g3 * a1
    if NORMALIZE:
        # r_hat = r / |r|:  grad_r = (grad_r_hat - r_hat <grad_r_hat, r_hat>) / |r|
        dot = ra * a2 + rb * b2 + rc * c2 + rd * d2
        ra = (ra - a2 * dot) * inv
        rb = (rb - b2 * dot) * inv
        rc = (rc - c2 * dot) * inv
        rd = (rd - d2 * dot) * inv
    th = gh_ptr.dtype.element_ty
    tr = gr_ptr.dtype.element_ty
    tl.store(gh_ptr + o0, ha.to(th), mask=m)
    tl.store(gh_ptr + o1, hb.to(th), mask=m)
    tl.store(gh_ptr + o2, hc.to(th), mask=m)
    tl.store(gh_ptr + o3, hd.to(th), mask=m)
    tl.store(gr_ptr + o0, ra.to(tr), mask=m)
    tl.store(gr_ptr + o1, rb.to(tr), mask=m)
    tl.store(gr_ptr + o2, rc.to(tr), mask=m)
    tl.store(gr_ptr + o3, rd.to(tr), mask=m)


def _elementwise_cfg(t: torch.Tensor) -> Tuple[int, int]:
    return (64, 1) if t.device.type != "cuda" else (512, 4)


def query_forward(h: torch.Tensor, r: torch.Tensor, algebra: str, layout: str, normalize: bool) -> torch.Tensor:
    """q = h (x) r_hat. h, r: (B, 4d) contiguous, same dtype -> q (B, 4d) in that dtype."""
    h, r = h.contiguous(), r.contiguous()
    q = torch.empty_like(h)
    B, K = h.shape
    n_coord = B * (K // 4)
    if n_coord == 0:
        return q
    BLOCK, warps = _elementwise_cfg(h)
    with _device_ctx(h):
        _query_fwd_kernel[(triton.cdiv(n_coord, BLOCK),)](
            h, r, q, n_coord, K // 4, ALG=_ALG[algebra], LAYOUT=_LAY[layout], NORMALIZE=bool(normalize),
            BLOCK=BLOCK, **_launch(h, dict(warps=warps, stages=1)))
    return q


def query_backward(grad_q: torch.Tensor, h: torch.Tensor, r: torch.Tensor, algebra: str, layout: str,
                   normalize: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(grad_h, grad_r), both (B, 4d) in the dtypes of h and r, from grad_q (B, 4d)."""
    grad_q, h, r = grad_q.contiguous(), h.contiguous(), r.contiguous()
    gh = torch.empty_like(h)
    gr = torch.empty_like(r)
    B, K = h.shape
    n_coord = B * (K // 4)
    if n_coord == 0:
        return gh, gr
    BLOCK, warps = _elementwise_cfg(h)
    with _device_ctx(h):
        _query_bwd_kernel[(triton.cdiv(n_coord, BLOCK),)](
            grad_q, h, r, gh, gr, n_coord, K // 4, ALG=_ALG[algebra], LAYOUT=_LAY[layout],
            NORMALIZE=bool(normalize), BLOCK=BLOCK, **_launch(h, dict(warps=warps, stages=1)))
    return gh, gr


# ---------------------------------------------------------------------------
# The score tile: every S[b, n] any kernel below sees comes from here.


@triton.jit
def _score_tile(q_ptr, e_ptr, qq_ptr, ee_ptr, bh_ptr, bt_ptr, rows, rmask, cols, cmask, K,
                SCORE: tl.constexpr, HAS_BH: tl.constexpr, HAS_BT: tl.constexpr,
                BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, F32DOT: tl.constexpr):
    """fp32 (BB, BN) scores of query rows `rows` against entities `cols`.

    Masked rows/columns are computed from zero operands (finite values); the
    callers mask them out of every reduction and store.
    """
    acc = tl.zeros((BB, BN), dtype=tl.float32)
    rk = rows.to(tl.int64) * K
    ck = cols.to(tl.int64) * K
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        km = ks < K
        a = tl.load(q_ptr + rk[:, None] + ks[None, :], mask=rmask[:, None] & km[None, :], other=0.0)
        b = tl.load(e_ptr + ck[:, None] + ks[None, :], mask=cmask[:, None] & km[None, :], other=0.0)
        if F32DOT:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC)
    if SCORE == 1:
        qq = tl.load(qq_ptr + rows, mask=rmask, other=0.0)
        ee = tl.load(ee_ptr + cols, mask=cmask, other=0.0)
        # the reference's order: 2 qE^T - |q|^2 - |E|^2 + b_h + b_t
        acc = 2.0 * acc - qq[:, None] - ee[None, :]
        if HAS_BH:
            acc = acc + tl.load(bh_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[:, None]
        if HAS_BT:
            acc = acc + tl.load(bt_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return acc


def _sqnorms(q: torch.Tensor, E: torch.Tensor, score: str):
    """fp32 |q|^2 (B,) and |E|^2 (N,), computed once per launch (distance score)."""
    if score != "distance":
        return q, E  # unused placeholders: any valid pointer
    qf, ef = q.float(), E.float()
    return (qf * qf).sum(1).contiguous(), (ef * ef).sum(1).contiguous()


def _opt(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return like if t is None else t.contiguous()


@triton.jit
def _score_fwd_kernel(q_ptr, e_ptr, qq_ptr, ee_ptr, bh_ptr, bt_ptr, s_ptr, B, N, K,
                      SCORE: tl.constexpr, HAS_BH: tl.constexpr, HAS_BT: tl.constexpr,
                      BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, F32DOT: tl.constexpr):
    rows = tl.program_id(0) * BB + tl.arange(0, BB)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    rmask = rows < B
    cmask = cols < N
    s = _score_tile(q_ptr, e_ptr, qq_ptr, ee_ptr, bh_ptr, bt_ptr, rows, rmask, cols, cmask, K,
                    SCORE, HAS_BH, HAS_BT, BB, BN, BK, PREC, F32DOT)
    out = s_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(out, s.to(s_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


def score_forward(q: torch.Tensor, E: torch.Tensor, bias_h: Optional[torch.Tensor], bias_t: Optional[torch.Tensor],
                  score: str) -> torch.Tensor:
    """S (B, N) in q.dtype from q (B, K), E (N, K); biases (B,), (N,) for the distance score."""
    q, E = q.contiguous(), E.contiguous()
    B, K = q.shape
    N = E.shape[0]
    S = torch.empty(B, N, dtype=q.dtype, device=q.device)
    if B == 0 or N == 0:
        return S
    qq, ee = _sqnorms(q, E, score)
    c = _cfg(q)
    grid = (triton.cdiv(B, c["BB"]), triton.cdiv(N, c["BN"]))
    with _device_ctx(q):
        _score_fwd_kernel[grid](q, E, qq, ee, _opt(bias_h, q), _opt(bias_t, q), S, B, N, K,
                                SCORE=_SCORE[score], HAS_BH=bias_h is not None, HAS_BT=bias_t is not None,
                                BB=c["BB"], BN=c["BN"], BK=c["BK"], PREC=_prec(q), F32DOT=_f32dot(q),
                                **_launch(q, c))
    return S


# ---------------------------------------------------------------------------
# Filter mask of one tile from a row-sorted CSR list


@triton.jit
def _filter_tile(fi_ptr, cur, end, cols, n_hi, BB: tl.constexpr, BN: tl.constexpr):
    """Mark filtered ids of tile columns `cols` (all < n_hi) for each row.

    cur (BB,) is each row's cursor into its sorted CSR slice [.., end): every
    id below the tile's first column was consumed by earlier tiles, so one
    load per id and row over the whole sweep. Duplicates just set the same
    bit twice. Returns (mask (BB, BN), advanced cursor).
    """
    BIG: tl.constexpr = 1 << 62
    fid = tl.load(fi_ptr + cur, mask=cur < end, other=BIG)
    act = fid < n_hi
    fmask = tl.zeros((BB, BN), dtype=tl.int32) != 0
    while tl.max(act.to(tl.int32), axis=0) > 0:
        fmask = fmask | ((fid[:, None] == cols[None, :]) & act[:, None])
        cur = cur + act.to(tl.int64)
        fid = tl.load(fi_ptr + cur, mask=cur < end, other=BIG)
        act = fid < n_hi
    return fmask, cur


def _sorted_filter(fo: Optional[torch.Tensor], fi: Optional[torch.Tensor], B: int, N: int, like: torch.Tensor):
    """CSR with every row's ids sorted ascending (rows stay in place), or placeholders."""
    if fo is None or fi is None:
        z = torch.zeros(B + 1, dtype=torch.int64, device=like.device)
        return z, z, False
    fo = fo.to(torch.int64).contiguous()
    fi = fi.to(torch.int64).contiguous()
    if fi.numel() == 0:
        return fo, torch.zeros(1, dtype=torch.int64, device=like.device), True
    rows = torch.repeat_interleave(torch.arange(B, device=fi.device), fo[1:] - fo[:-1])
    key = rows * N + fi  # B * N < 2^63: rows keep their segment, ids sort within it
    return fo, fi[torch.argsort(key)].contiguous(), True


def _split_cursors(fo: torch.Tensor, fi: torch.Tensor, has_f: bool, B: int, N: int, splits: int,
                   first_col: int) -> torch.Tensor:
    """(splits, B) int64: where each row's sorted filter ids reach column s * first_col,
    so split s starts its cursor there instead of walking the ids of earlier splits."""
    if not has_f or splits == 1:
        return fo[:B].expand(splits, B).contiguous()
    rows = torch.repeat_interleave(torch.arange(B, device=fo.device), fo[1:] - fo[:-1])
    key = rows * N + fi[:rows.numel()]  # sorted: rows ascending, ids ascending within a row
    c0 = torch.arange(splits, device=fo.device, dtype=torch.int64) * first_col
    want = torch.arange(B, device=fo.device, dtype=torch.int64)[None, :] * N + c0[:, None]
    return torch.searchsorted(key, want.reshape(-1)).reshape(splits, B).contiguous()


# ---------------------------------------------------------------------------
# rank


@triton.jit
def _rank_target_kernel(q_ptr, e_ptr, qq_ptr, ee_ptr, bh_ptr, bt_ptr, t_ptr, perm_ptr, st_ptr, B, N, K,
                        SCORE: tl.constexpr, HAS_BH: tl.constexpr, HAS_BT: tl.constexpr,
                        BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                        PREC: tl.constexpr, F32DOT: tl.constexpr):
    """s_t of every row, from the very tile score_forward would compute it in.

    Program (i, r): the tile of row block i that holds the target of slot r,
    computed only by the first slot of the block with that tile (queries are
    sorted by target, so slots sharing a target tile are adjacent); it stores
    s_t for every row of the block whose target is in it.
    """
    blk = tl.program_id(0)
    r = tl.program_id(1)
    me = blk * BB + r
    if me < B:
        slot = blk * BB + tl.arange(0, BB)
        rmask = slot < B
        rows = tl.load(perm_ptr + slot, mask=rmask, other=0)
        tgt = tl.load(t_ptr + rows, mask=rmask, other=0)
        my_tile = tl.load(t_ptr + tl.load(perm_ptr + me)) // BN
        prev_tile = tl.load(t_ptr + tl.load(perm_ptr + tl.maximum(me - 1, 0))) // BN
        if (r == 0) | (prev_tile != my_tile):
            cols = my_tile * BN + tl.arange(0, BN)
            s = _score_tile(q_ptr, e_ptr, qq_ptr, ee_ptr, bh_ptr, bt_ptr, rows, rmask, cols, cols < N, K,
                            SCORE, HAS_BH, HAS_BT, BB, BN, BK, PREC, F32DOT)
            s = s.to(q_ptr.dtype.element_ty).to(tl.float32)
            sel = cols[None, :] == tgt[:, None]
            st = tl.sum(tl.where(sel, s, 0.0), axis=1)
            tl.store(st_ptr + rows, st, mask=rmask & (tgt // BN == my_tile))


@triton.jit
def _rank_count_kernel(q_ptr, e_ptr, qq_ptr, ee_ptr, bh_ptr, bt_ptr, t_ptr, perm_ptr, st_ptr,
                       fo_ptr, fs_ptr, fi_ptr, gt_ptr, ge_ptr, B, N, K, TPS,
                       SCORE: tl.constexpr, HAS_BH: tl.constexpr, HAS_BT: tl.constexpr, HAS_FILTER: tl.constexpr,
                       BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                       PREC: tl.constexpr, F32DOT: tl.constexpr):
    """Counts of s > s_t and s >= s_t over split program_id(1)'s N tiles."""
    slot = tl.program_id(0) * BB + tl.arange(0, BB)
    sp = tl.program_id(1)
    rmask = slot < B
    rows = tl.load(perm_ptr + slot, mask=rmask, other=0)
    tgt = tl.load(t_ptr + rows, mask=rmask, other=0)
    st = tl.load(st_ptr + rows, mask=rmask, other=0.0)
    ty = q_ptr.dtype.element_ty
    j0 = sp * TPS
    j1 = tl.minimum(j0 + TPS, tl.cdiv(N, BN))
    if HAS_FILTER:
        cur = tl.load(fs_ptr + sp * B + rows, mask=rmask, other=0)
        end = tl.load(fo_ptr + rows + 1, mask=rmask, other=0)
    gt = tl.zeros((BB,), dtype=tl.int32)
    ge = tl.zeros((BB,), dtype=tl.int32)
    for j in range(j0, j1):
        cols = j * BN + tl.arange(0, BN)
        cmask = cols < N
        s = _score_tile(q_ptr, e_ptr, qq_ptr, ee_ptr, bh_ptr, bt_ptr, rows, rmask, cols, cmask, K,
                        SCORE, HAS_BH, HAS_BT, BB, BN, BK, PREC, F32DOT)
        s = s.to(ty).to(tl.float32)
        keep = cmask[None, :] & (cols[None, :].to(tl.int64) != tgt[:, None])
        if HAS_FILTER:
            fmask, cur = _filter_tile(fi_ptr, cur, end, cols.to(tl.int64), (j + 1) * BN, BB, BN)
            keep = keep & (fmask == 0)
        gt += tl.sum((keep & (s > st[:, None])).to(tl.int32), axis=1)
        ge += tl.sum((keep & (s >= st[:, None])).to(tl.int32), axis=1)
    tl.store(gt_ptr + sp * B + rows, gt, mask=rmask)
    tl.store(ge_ptr + sp * B + rows, ge, mask=rmask)


def rank(q, E, bias_h, bias_t, targets, filter_offsets, filter_index, score: str, ties: str) -> torch.Tensor:
    """Filtered ranks (B,) float64 of targets (B,) int64 among the N entities; no (B, N) buffer.

    optimistic = 1 + #{n: s_n > s_t}, pessimistic = 1 + #{n != t: s_n >= s_t},
    realistic = their mean; ids in the CSR filter (duplicates and the target
    allowed) never count. Two launches: the target scores (one tile per
    distinct target tile of a row block), then the counts over (row blocks x
    N splits) programs, summed per row in int64 (exact, so the split does not
    change the result). Extra memory O(splits * B + nnz).
    """
    q, E = q.contiguous(), E.contiguous()
    B, K = q.shape
    N = E.shape[0]
    out = torch.empty(B, dtype=torch.float64, device=q.device)
    if B == 0:
        return out
    t = targets.to(torch.int64).contiguous()
    perm = torch.argsort(t, stable=True).contiguous()
    fo, fi, has_f = _sorted_filter(filter_offsets, filter_index, B, N, q)
    qq, ee = _sqnorms(q, E, score)
    c = _cfg(q)
    BB, BN = c["BB"], c["BN"]
    blocks = triton.cdiv(B, BB)
    splits, tps = _n_split(blocks, triton.cdiv(N, BN))
    fs = _split_cursors(fo, fi, has_f, B, N, splits, tps * BN)
    st = torch.zeros(B, dtype=torch.float32, device=q.device)
    gt = torch.empty(splits, B, dtype=torch.int32, device=q.device)
    ge = torch.empty(splits, B, dtype=torch.int32, device=q.device)
    flags = dict(SCORE=_SCORE[score], HAS_BH=bias_h is not None, HAS_BT=bias_t is not None,
                 BB=BB, BN=BN, BK=c["BK"], PREC=_prec(q), F32DOT=_f32dot(q), **_launch(q, c))
    bh, bt = _opt(bias_h, q), _opt(bias_t, q)
    with _device_ctx(q):
        _rank_target_kernel[(blocks, BB)](q, E, qq, ee, bh, bt, t, perm, st, B, N, K, **flags)
        _rank_count_kernel[(blocks, splits)](q, E, qq, ee, bh, bt, t, perm, st, fo, fs, fi, gt, ge, B, N, K, tps,
                                             HAS_FILTER=has_f, **flags)
    opt = 1.0 + gt.sum(0, dtype=torch.int64).to(torch.float64)
    pes = 1.0 + ge.sum(0, dtype=torch.int64).to(torch.float64)
    if ties == "optimistic":
        return opt
    if ties == "pessimistic":
        return pes
    return 0.5 * (opt + pes)


# ---------------------------------------------------------------------------
# top-k


@triton.jit
def _score_key(s, cols):
    """Order-preserving int64 key = k32 * 2^32 + (2^31 - 1 - id), k32 the score's
    bits mapped to a signed order (negative floats: magnitude bits flipped).
    Descending keys = descending score, then lower id first (ids < 2^31).
    NaN sorts first (as torch.sort descending does), -0 == +0. Every constant
    fits int32, so no unsigned literal enters the int64 arithmetic."""
    s = tl.where(s == 0.0, 0.0, s)
    bits = s.to(tl.int32, bitcast=True)
    k32 = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    k32 = tl.where(s != s, 0x7FFFFFFF, k32)
    low = 2147483647 - cols.to(tl.int64)
    return (k32.to(tl.int64) << 32) + low


@triton.jit
def _topk_kernel(q_ptr, e_ptr, qq_ptr, ee_ptr, bh_ptr, bt_ptr, fo_ptr, fs_ptr, fi_ptr, key_ptr,
                 B, N, K, TPS,
                 SCORE: tl.constexpr, HAS_BH: tl.constexpr, HAS_BT: tl.constexpr, HAS_FILTER: tl.constexpr,
                 KP: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 PREC: tl.constexpr, F32DOT: tl.constexpr):
    """Running top-KP keys of split program_id(1)'s N tiles -> key_ptr[split, row, :KP]."""
    rows = tl.program_id(0) * BB + tl.arange(0, BB)
    sp = tl.program_id(1)
    rmask = rows < B
    ty = q_ptr.dtype.element_ty
    NONE: tl.constexpr = -9223372036854775807 - 1  # below every real key
    run = tl.full((BB, KP), NONE, dtype=tl.int64)
    j0 = sp * TPS
    j1 = tl.minimum(j0 + TPS, tl.cdiv(N, BN))
    if HAS_FILTER:
        cur = tl.load(fs_ptr + sp * B + rows, mask=rmask, other=0)
        end = tl.load(fo_ptr + rows + 1, mask=rmask, other=0)
    for j in range(j0, j1):
        cols = j * BN + tl.arange(0, BN)
        cmask = cols < N
        s = _score_tile(q_ptr, e_ptr, qq_ptr, ee_ptr, bh_ptr, bt_ptr, rows, rmask, cols, cmask, K,
                        SCORE, HAS_BH, HAS_BT, BB, BN, BK, PREC, F32DOT)
        s = s.to(ty).to(tl.float32)
        keep = cmask[None, :] & rmask[:, None]
        if HAS_FILTER:
            fmask, cur = _filter_tile(fi_ptr, cur, end, cols.to(tl.int64), (j + 1) * BN, BB, BN)
            keep = keep & (fmask == 0)
        key = tl.where(keep, _score_key(s, cols[None, :]), NONE)
        # most tiles hold nothing above the running k-th key once the list fills
        thr = tl.min(run, axis=1)
        if tl.max((key > thr[:, None]).to(tl.int32)) > 0:
            best = tl.topk(key, KP, dim=1)  # (BB, KP) descending
            # top-KP of two descending lists: max against the reversed other list
            # gives a bitonic sequence holding exactly the top KP; sort it.
            run = tl.bitonic_merge(tl.maximum(run, tl.flip(best, 1)), descending=True)
    slots = tl.arange(0, KP)
    off = (sp * B + rows).to(tl.int64)[:, None] * KP + slots[None, :]
    tl.store(key_ptr + off, run, mask=rmask[:, None])


def _decode_keys(keys: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inverse of _score_key: (values in `dtype`, int64 ids) of int64 keys."""
    hi = keys >> 32  # arithmetic shift: floor(key / 2^32) = k32
    idx = 2147483647 - (keys - (hi << 32))
    k32 = hi.to(torch.int32)
    bits = torch.where(k32 >= 0, k32, k32 ^ 0x7FFFFFFF)
    return bits.view(torch.float32).to(dtype), idx


def _topk_chunked(q, E, bias_h, bias_t, k, fo, fi, score):
    """Fallback for large k: (chunk, N) scores from score_forward, stable sorts in torch.
    Memory O(min(B, 2^24 / N) * N); filtered ids are placed after every other id."""
    B, N = q.shape[0], E.shape[0]
    step = max(1, _FALLBACK_CHUNK // max(N, 1))
    vals, idxs = [], []
    for b0 in range(0, B, step):
        b1 = min(B, b0 + step)
        S = score_forward(q[b0:b1], E, None if bias_h is None else bias_h[b0:b1], bias_t, score)
        filt = torch.zeros(b1 - b0, N, dtype=torch.bool, device=q.device)
        if fo is not None:
            lo, hi = int(fo[b0]), int(fo[b1])
            counts = fo[b0 + 1:b1 + 1] - fo[b0:b1]
            r = torch.repeat_interleave(torch.arange(b1 - b0, device=q.device), counts)
            filt[r, fi[lo:hi].long()] = True
        order = torch.sort(S, dim=1, descending=True, stable=True).indices
        # second stable pass: unfiltered first, keeping score order and id order within ties
        order = order.gather(1, torch.sort(filt.gather(1, order).to(torch.int8), dim=1, stable=True).indices)
        order = order[:, :k]
        vals.append(S.gather(1, order))
        idxs.append(order)
    return torch.cat(vals), torch.cat(idxs)


def topk(q, E, bias_h, bias_t, k: int, filter_offsets, filter_index, score: str):
    """Top-k per row: values (B, k) in q.dtype, indices (B, k) int64; descending
    score, equal scores by lower id; filtered ids (CSR) never selected.

    Fused (no (B, N) buffer; extra memory O(B + nnz)) while the padded list
    KP = next_pow2(k) fits min(64, BLOCK_N); beyond that a chunked two-stage
    fallback materialises at most 2^24 scores (64 MiB in fp32) at a time.
    Requires k <= N - (filtered count of the row), as the public API checks.
    """
    q, E = q.contiguous(), E.contiguous()
    B, K = q.shape
    N = E.shape[0]
    vals = torch.empty(B, k, dtype=q.dtype, device=q.device)
    idx = torch.empty(B, k, dtype=torch.int64, device=q.device)
    if B == 0 or k == 0:
        return vals, idx
    c = _cfg(q)
    KP = max(2, triton.next_power_of_2(k))
    BN = c["BN"]
    if KP > min(_TOPK_FUSED_MAX, BN):  # tl.topk of a tile needs KP <= BN
        return _topk_chunked(q, E, bias_h, bias_t, k, filter_offsets, filter_index, score)
    fo, fi, has_f = _sorted_filter(filter_offsets, filter_index, B, N, q)
    qq, ee = _sqnorms(q, E, score)
    # Same BB/BN/warps as score_forward: a smaller row block would move sm_90
    # from wgmma to mma.sync, and the two need not round alike.
    BB = c["BB"]
    blocks = triton.cdiv(B, BB)
    splits, tps = _n_split(blocks, triton.cdiv(N, BN))
    fs = _split_cursors(fo, fi, has_f, B, N, splits, tps * BN)
    keys = torch.empty(splits, B, KP, dtype=torch.int64, device=q.device)
    with _device_ctx(q):
        _topk_kernel[(blocks, splits)](
            q, E, qq, ee, _opt(bias_h, q), _opt(bias_t, q), fo, fs, fi, keys, B, N, K, tps,
            SCORE=_SCORE[score], HAS_BH=bias_h is not None, HAS_BT=bias_t is not None, HAS_FILTER=has_f,
            KP=KP, BB=BB, BN=BN, BK=c["BK"], PREC=_prec(q), F32DOT=_f32dot(q), **_launch(q, c))
    # Keys are distinct (the id is in the low bits), so merging the splits' lists
    # with torch.topk is exact and its order is the key order whatever the split.
    top = torch.topk(keys.permute(1, 0, 2).reshape(B, splits * KP), k, dim=1).values
    v, i = _decode_keys(top, q.dtype)
    vals.copy_(v)
    idx.copy_(i)
    return vals, idx


# ---------------------------------------------------------------------------
# 1-N cross-entropy


@triton.jit
def _ce_fwd_kernel(q_ptr, e_ptr, qq_ptr, ee_ptr, bh_ptr, bt_ptr, t_ptr, m_ptr, l_ptr, st_ptr, B, N, K, TPS,
                   SCORE: tl.constexpr, HAS_BH: tl.constexpr, HAS_BT: tl.constexpr,
                   BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, F32DOT: tl.constexpr):
    """Online (max, sum of exp, target score) over split program_id(1)'s N tiles."""
    rows = tl.program_id(0) * BB + tl.arange(0, BB)
    sp = tl.program_id(1)
    rmask = rows < B
    tgt = tl.load(t_ptr + rows, mask=rmask, other=0)
    m = tl.full((BB,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BB,), dtype=tl.float32)
    st = tl.zeros((BB,), dtype=tl.float32)
    j0 = sp * TPS
    j1 = tl.minimum(j0 + TPS, tl.cdiv(N, BN))
    for j in range(j0, j1):
        cols = j * BN + tl.arange(0, BN)
        cmask = cols < N
        s = _score_tile(q_ptr, e_ptr, qq_ptr, ee_ptr, bh_ptr, bt_ptr, rows, rmask, cols, cmask, K,
                        SCORE, HAS_BH, HAS_BT, BB, BN, BK, PREC, F32DOT)
        s = tl.where(cmask[None, :], s, float("-inf"))
        sel = cols[None, :].to(tl.int64) == tgt[:, None]
        st += tl.sum(tl.where(sel, s, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        # rows whose scores are all -inf so far: keep the shift finite
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - shift) + tl.sum(tl.exp(s - shift[:, None]), axis=1)
        m = m_new
    out = sp * B + rows
    tl.store(m_ptr + out, m, mask=rmask)
    tl.store(l_ptr + out, l, mask=rmask)
    tl.store(st_ptr + out, st, mask=rmask)


def ce_forward(q, E, bias_h, bias_t, targets, score: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(loss (B,), lse (B,)) float32: loss_b = logsumexp_n S[b, n] - S[b, t_b], S in fp32."""
    q, E = q.contiguous(), E.contiguous()
    B, K = q.shape
    N = E.shape[0]
    if B == 0:
        return (torch.empty(B, dtype=torch.float32, device=q.device),
                torch.empty(B, dtype=torch.float32, device=q.device))
    t = targets.to(torch.int64).contiguous()
    qq, ee = _sqnorms(q, E, score)
    c = _cfg(q)
    blocks = triton.cdiv(B, c["BB"])
    splits, tps = _n_split(blocks, triton.cdiv(N, c["BN"]))
    m, l, st = (torch.empty(splits, B, dtype=torch.float32, device=q.device) for _ in range(3))
    with _device_ctx(q):
        _ce_fwd_kernel[(blocks, splits)](
            q, E, qq, ee, _opt(bias_h, q), _opt(bias_t, q), t, m, l, st, B, N, K, tps,
            SCORE=_SCORE[score], HAS_BH=bias_h is not None, HAS_BT=bias_t is not None,
            BB=c["BB"], BN=c["BN"], BK=c["BK"], PREC=_prec(q), F32DOT=_f32dot(q), **_launch(q, c))
    # Combine the splits in a fixed order (the split depends on (B, N) only).
    mx = m.max(0).values
    shift = torch.where(mx == float("-inf"), torch.zeros_like(mx), mx)
    lse = mx + torch.log((l * torch.exp(m - shift)).sum(0))
    return lse - st.sum(0), lse


@triton.jit
def _ce_grad_tile(q_ptr, e_ptr, qq_ptr, ee_ptr, bh_ptr, bt_ptr, gl_ptr, lse_ptr, t_ptr,
                  rows, rmask, cols, cmask, K,
                  SCORE: tl.constexpr, HAS_BH: tl.constexpr, HAS_BT: tl.constexpr,
                  BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, F32DOT: tl.constexpr):
    """G = grad_loss (softmax - onehot) on one (BB, BN) tile, zero outside the valid box."""
    s = _score_tile(q_ptr, e_ptr, qq_ptr, ee_ptr, bh_ptr, bt_ptr, rows, rmask, cols, cmask, K,
                    SCORE, HAS_BH, HAS_BT, BB, BN, BK, PREC, F32DOT)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    gl = tl.load(gl_ptr + rows, mask=rmask, other=0.0)
    tgt = tl.load(t_ptr + rows, mask=rmask, other=-1)
    p = tl.exp(s - lse[:, None])
    p = p - (cols[None, :].to(tl.int64) == tgt[:, None]).to(tl.float32)
    G = gl[:, None] * p
    return tl.where(rmask[:, None] & cmask[None, :], G, 0.0)


@triton.jit
def _ce_g_kernel(q_ptr, e_ptr, qq_ptr, ee_ptr, bh_ptr, bt_ptr, gl_ptr, lse_ptr, t_ptr, g_ptr, row0, M, N, K,
                 SCORE: tl.constexpr, HAS_BH: tl.constexpr, HAS_BT: tl.constexpr,
                 BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, F32DOT: tl.constexpr):
    """G[r, n] (fp32) for the M query rows row0.. of one chunk, on score_forward's tile."""
    local = tl.program_id(0) * BB + tl.arange(0, BB)
    rows = row0 + local
    rmask = local < M
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    cmask = cols < N
    G = _ce_grad_tile(q_ptr, e_ptr, qq_ptr, ee_ptr, bh_ptr, bt_ptr, gl_ptr, lse_ptr, t_ptr,
                      rows, rmask, cols, cmask, K, SCORE, HAS_BH, HAS_BT, BB, BN, BK, PREC, F32DOT)
    off = local.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(g_ptr + off, G, mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _mm_kernel(a_ptr, b_ptr, c_ptr, M, NC, R, sam, sak, sbk, sbn, RPS,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """C[split] (M, NC) fp32 = A (M, R) @ B (R, NC) over split program_id(2)'s range of R.

    Strided A and B (A = G or G^T), both read as fp32 with IEEE products (G
    stays fp32: rounding it to bf16 for tensor cores would cost ~3 decimal
    digits on small softmax probabilities). One program owns each output
    tile of its split, and the splits are summed in torch: no atomics.
    """
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    sp = tl.program_id(2)
    mm = rm < M
    nm = rn < NC
    k_lo = sp * RPS
    k_hi = tl.minimum(k_lo + RPS, R)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        rk = k0 + tl.arange(0, BK)
        km = rk < k_hi
        a = tl.load(a_ptr + rm.to(tl.int64)[:, None] * sam + rk.to(tl.int64)[None, :] * sak,
                    mask=mm[:, None] & km[None, :], other=0.0).to(tl.float32)
        b = tl.load(b_ptr + rk.to(tl.int64)[:, None] * sbk + rn.to(tl.int64)[None, :] * sbn,
                    mask=km[:, None] & nm[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    off = (sp * M + rm).to(tl.int64)[:, None] * NC + rn[None, :]
    tl.store(c_ptr + off, acc, mask=mm[:, None] & nm[None, :])


def _mm_cfg(t: torch.Tensor) -> dict:
    if t.device.type != "cuda":
        return dict(BM=16, BN=16, BK=16, warps=1, stages=1)
    return dict(BM=64, BN=64, BK=32, warps=4, stages=3)


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp32 a @ b (IEEE products, fixed summation order) for a fp32 (M, R) with any strides
    and b (R, NC) of any float dtype; R is split between programs when the output tiles
    are too few to fill the GPU."""
    M, R = a.shape
    NC = b.shape[1]
    c = _mm_cfg(a)
    tiles = triton.cdiv(M, c["BM"]) * triton.cdiv(NC, c["BN"])
    splits, tps = _n_split(tiles, triton.cdiv(R, c["BK"]))
    out = torch.empty(splits, M, NC, dtype=torch.float32, device=a.device)
    if M == 0 or NC == 0:
        return out.sum(0)
    opts = dict(num_warps=c["warps"], num_stages=c["stages"])
    if a.device.type == "cuda":
        opts["enable_fp_fusion"] = True
    with _device_ctx(a):
        _mm_kernel[(triton.cdiv(M, c["BM"]), triton.cdiv(NC, c["BN"]), splits)](
            a, b, out, M, NC, R, a.stride(0), a.stride(1), b.stride(0), b.stride(1), tps * c["BK"],
            BM=c["BM"], BN=c["BN"], BK=c["BK"], **opts)
    return out[0] if splits == 1 else out.sum(0)


# Rows of G materialised per chunk in ce_backward: 2^22 fp32 (16 MiB, inside
# an H100's 50 MB L2) whatever B is, so memory stays O(chunk x N), never B x N.
_CE_CHUNK = 1 << 22


def ce_backward(grad_loss, q, E, bias_h, bias_t, targets, lse, score: str):
    """(grad_q (B, K), grad_E (N, K), grad_bias_h (B,), grad_bias_t (N,)) of sum_b grad_loss_b loss_b.

    G[b, n] = grad_loss[b] (exp(S[b, n] - lse[b]) - [n == t_b]) is recomputed in fp32
    on score_forward's tile for a chunk of rows at a time (at most 2^22 values), then
    grad_q = G E and grad_E += G^T q_chunk are two IEEE fp32 products (one program per
    output tile, no atomics; chunks added in order). The fused version that kept G in
    registers recomputed S once per 64-wide K chunk of the output (7 times at K = 400),
    which made it slower than unfused torch autograd.
    grad_bias_h / grad_bias_t are the row / column sums of G (always returned),
    all in q.dtype.
    """
    q, E = q.contiguous(), E.contiguous()
    B, K = q.shape
    N = E.shape[0]
    if B == 0 or N == 0:
        return (torch.zeros_like(q), torch.zeros_like(E), torch.zeros(B, dtype=q.dtype, device=q.device),
                torch.zeros(N, dtype=q.dtype, device=q.device))
    gl = grad_loss.to(torch.float32).contiguous()
    ls = lse.to(torch.float32).contiguous()
    t = targets.to(torch.int64).contiguous()
    qq, ee = _sqnorms(q, E, score)
    c = _cfg(q)
    BB, BN = c["BB"], c["BN"]
    flags = dict(SCORE=_SCORE[score], HAS_BH=bias_h is not None, HAS_BT=bias_t is not None, BB=BB, BN=BN,
                 BK=c["BK"], PREC=_prec(q), F32DOT=_f32dot(q), **_launch(q, c))
    bh, bt = _opt(bias_h, q), _opt(bias_t, q)
    rows = max(BB, (_CE_CHUNK // max(N, 1)) // BB * BB)
    gq = torch.empty(B, K, dtype=torch.float32, device=q.device)
    rsum = torch.empty(B, dtype=torch.float32, device=q.device)
    gE = None
    csum = None
    for b0 in range(0, B, rows):
        m = min(rows, B - b0)
        G = torch.empty(m, N, dtype=torch.float32, device=q.device)
        with _device_ctx(q):
            _ce_g_kernel[(triton.cdiv(m, BB), triton.cdiv(N, BN))](q, E, qq, ee, bh, bt, gl, ls, t, G, b0, m, N, K,
                                                                   **flags)
        gq[b0:b0 + m] = _mm(G, E)
        part = _mm(G.t(), q[b0:b0 + m])
        gE = part if gE is None else gE.add_(part)
        rsum[b0:b0 + m] = G.sum(1)
        cs = G.sum(0)
        csum = cs if csum is None else csum.add_(cs)
    if score == "distance":
        gq = 2.0 * gq - 2.0 * q.float() * rsum[:, None]
        gE = 2.0 * gE - 2.0 * E.float() * csum[:, None]
    return gq.to(q.dtype), gE.to(E.dtype), rsum.to(q.dtype), csum.to(q.dtype)
