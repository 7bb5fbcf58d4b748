#!/usr/bin/env python3
"""Compile the relative-attention Triton kernels for an NVIDIA target without a GPU.

Triton's ahead-of-time path (``triton.compile`` with a ``GPUTarget``) runs the
whole pipeline down to a cubin with the ptxas shipped in the triton wheel, so
a machine with no device can still check that the kernels lower for the GPU
(the tests there run them through the interpreter only). It prints the shared
memory each kernel needs; the limit is 227 KiB per block on sm_90.

    python benchmarks/gpu/compile_rel_attention.py              # bf16, T = 64, d = 64 (about a minute)
    python benchmarks/gpu/compile_rel_attention.py --all        # every dtype / tile / head-dim class _cfg picks

Compiling is CPU-bound, tens of seconds per kernel; it starts no GPU work.
"""

from __future__ import annotations

import argparse
import inspect
import sys

FP32_BUFFERS = ("lse", "delta", "dup", "dRp", "dSp", "dwp")


def _signature(fn, dtype: str, const: dict) -> dict:
    sig = {}
    for n in inspect.signature(fn.fn).parameters:
        if n in const:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            sig[n] = "*fp32" if n[:-4] in FP32_BUFFERS else f"*{dtype}"
        elif n == "scale":
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    return sig


def compile_kernel(fn, dtype: str, const: dict, arch: int, warps: int, stages: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(inspect.signature(fn.fn).parameters)
    src = ASTSource(fn, _signature(fn, dtype, const), constexprs={(names.index(k),): v for k, v in const.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100 / H200)")
    ap.add_argument("--all", action="store_true", help="every (dtype, T, d) class of the launcher's _cfg")
    args = ap.parse_args()

    from embkern.triton_kernels import rel_conv_attention as m

    # (dtype, T, padded d): what _cfg picks on the GPU -- T = 64 up to d = 128 (16-bit) / 64 (fp32), else 32
    configs = [("bf16", 64, 64)]
    if args.all:
        configs += [("fp16", 64, 128), ("bf16", 32, 256), ("fp32", 64, 64), ("fp32", 32, 128), ("fp32", 32, 256)]
    attention = [("forward", m._fwd_kernel), ("backward dk dv", m._bwd_kv_kernel), ("backward dq", m._bwd_q_kernel),
                 ("backward dR dS", m._bwd_rel_kernel)]
    failed = 0
    for dtype, T, bd in configs:
        const = dict(CAUSAL=True, T=T, BW=2 * T, BD=bd, BDV=bd, UPCAST=False, IEEE=dtype == "fp32")
        for name, fn in attention:
            try:
                k = compile_kernel(fn, dtype, const, args.arch, 4, 2)
                print(f"sm_{args.arch} {dtype} T={T} d<={bd} {name}: cubin {len(k.asm['cubin'])} bytes, "
                      f"shared memory {k.metadata.shared / 1024:.1f} KiB", flush=True)
            except Exception as exc:  # report every kernel, not the first failure only
                failed += 1
                print(f"sm_{args.arch} {dtype} T={T} d<={bd} {name}: FAILED {type(exc).__name__}: {exc}", flush=True)
    for name, fn, const in (("conv forward", m._conv_fwd_kernel, dict(HAS_B=True, BT=64, BC=64)),
                            ("conv backward", m._conv_bwd_kernel, dict(BT=64, BC=64))):
        try:
            k = compile_kernel(fn, "bf16", const, args.arch, 4, 1)
            print(f"sm_{args.arch} bf16 {name}: cubin {len(k.asm['cubin'])} bytes", flush=True)
        except Exception as exc:
            failed += 1
            print(f"sm_{args.arch} bf16 {name}: FAILED {type(exc).__name__}: {exc}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
