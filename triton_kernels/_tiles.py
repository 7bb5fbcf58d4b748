"""Tile helpers the attention kernels share (selective_attention, rel_conv_attention).

Host side: launch options, the device context, and whether the interpreter
needs bf16 upcasts. Device side: ``_dot``, the one matmul every tile product
goes through, so both ops follow the same precision rules:

* fp32 operands use ``input_precision="ieee"`` (no TF32: the same contract as
  the references' fp32 matmuls);
* fp16 / bf16 go to tensor cores with fp32 accumulation;
* the interpreter keeps bf16 as raw 16-bit integers and its tl.dot would
  multiply those, so there bf16 operands are upcast to fp32 first (exact: a
  bf16 x bf16 product is exact in fp32).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .. import _checks


def pow2(n: int) -> int:
    """The padded tile width for a head dim: a power of two, at least 16 (the tl.dot minimum)."""
    return max(16, triton.next_power_of_2(max(int(n), 1)))


def launch_opts(t: torch.Tensor, warps: int, stages: int) -> dict:
    opts = dict(num_warps=warps, num_stages=stages)
    if t.device.type == "cuda":
        opts["enable_fp_fusion"] = True
    return opts


def upcast(t: torch.Tensor) -> bool:
    """True where the interpreter runs bf16 tiles (see the module docstring)."""
    return t.device.type != "cuda" and t.dtype == torch.bfloat16


def head_stride(t: torch.Tensor, packed: int):
    """(t, elements from one (batch, head) to the next) with t (B, H, L, width) read in place when each
    head's rows are packed and the (batch, head) dims step as one index (a slice along L of a decoding
    cache's buffer), else a contiguous copy; ``packed`` = L * width."""
    if not _checks.packed_below(t, 2):
        return t.contiguous(), packed
    B, H = t.shape[:2]
    return t, (t.stride(1) if H > 1 else t.stride(0) if B > 1 else packed)


def device_ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _softmax_step(s, v, m_i, l_i, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """One key tile of the online softmax. ``s`` (BM, BN): the tile's scores, ``-inf`` where a key is hidden;
    ``v`` (BN, BDV); ``m_i``, ``l_i`` (BM,) and ``acc`` (BM, BDV) fp32, the running max, sum and P V.
    Returns the updated (m_i, l_i, acc). A row that has seen only hidden keys keeps m = -inf and l = 0: its
    max is taken as 0 for the exponentials, so exp(-inf - 0) = 0 and never exp(-inf - -inf) = NaN."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, IEEE)
    return m_new, l_i, acc


@triton.jit
def _softmax_finish(m_i, l_i, acc):
    """(out, lse) of the online softmax after the last key tile. A row that saw no key (l = 0) gives zeros and
    lse = -inf; a NaN l (a NaN score) goes on into both, never dropped as if its key were masked."""
    seen = l_i != 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
    return out, lse


__all__ = ["pow2", "launch_opts", "upcast", "device_ctx", "_dot", "_softmax_step", "_softmax_finish"]
