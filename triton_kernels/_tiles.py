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


def device_ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


__all__ = ["pow2", "launch_opts", "upcast", "device_ctx", "_dot"]
