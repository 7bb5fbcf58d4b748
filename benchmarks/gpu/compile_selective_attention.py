#!/usr/bin/env python3
"""Compile the selective-attention Triton kernels for an NVIDIA target without a GPU.

The same ahead-of-time path as compile_rel_attention.py (``triton.compile`` with a
``GPUTarget``, then ``ptxas -v`` on the PTX): for each kernel at the tiles the
launcher's ``_cfg`` picks, the shared memory, registers and spills a thread, and
how many tensor-core instructions the products became. It is how the fp32 tiles
were chosen: IEEE fp32 products are FMA loops, and past ptxas' 255-register
budget the kernel compiles to 32 registers with 10-40 KB of spills a thread.

    python benchmarks/gpu/compile_selective_attention.py          # fp32 and bf16 at d = 64
    python benchmarks/gpu/compile_selective_attention.py --all    # d = 64, 128, 256
    python benchmarks/gpu/compile_selective_attention.py --tiles 64x64x4   # one tile for all three kernels

Tens of seconds per kernel on the CPU; it starts no GPU work.
"""

from __future__ import annotations

import argparse
import os
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from compile_rel_attention import _usage, compile_kernel, mma_counts  # noqa: E402

# buffers the launcher passes as fp32 whatever the input dtype
FP32_BUFFERS = ("tq", "tv", "lse", "delta", "dtq", "dtv")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100 / H200)")
    ap.add_argument("--all", action="store_true", help="head dims 64, 128 and 256 (default: 64)")
    ap.add_argument("--dtype", choices=("fp32", "bf16", "both"), default="both")
    ap.add_argument("--tiles", help="BMxBNxWARPS for all three kernels instead of _cfg's")
    args = ap.parse_args()

    import torch

    from embkern.triton_kernels import selective_attention as m

    torch_dtype = dict(bf16=torch.bfloat16, fp32=torch.float32)
    dtypes = ("fp32", "bf16") if args.dtype == "both" else (args.dtype,)
    kernels = (("fwd", m._fwd_kernel), ("kv", m._bwd_kv_kernel), ("q", m._bwd_q_kernel))
    failed = 0
    for dtype in dtypes:
        for d in ((64, 128, 256) if args.all else (64,)):
            fake = types.SimpleNamespace(device=types.SimpleNamespace(type="cuda"), dtype=torch_dtype[dtype])
            cfg = m._cfg(fake, d)
            for name, fn in kernels:
                BM, BN, warps = (tuple(int(x) for x in args.tiles.split("x")) if args.tiles else cfg[name])
                const = dict(HAS_TV=True, CAUSAL=True, BM=BM, BN=BN, BD=d, BDV=d, UPCAST=False,
                             IEEE=dtype == "fp32")
                tag = f"sm_{args.arch} {dtype} d={d} {name} {BM}x{BN} ({warps} warps)"
                try:
                    k = compile_kernel(fn, dtype, const, args.arch, warps, cfg["stages"], FP32_BUFFERS)
                    print(f"{tag}: shared memory {k.metadata.shared / 1024:.1f} KiB, {_usage(k, args.arch)}; "
                          f"{mma_counts(k)}", flush=True)
                except Exception as exc:  # report every kernel, not the first failure only
                    failed += 1
                    print(f"{tag}: FAILED {type(exc).__name__}: {exc}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
