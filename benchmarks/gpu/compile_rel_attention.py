#!/usr/bin/env python3
"""Compile the relative-attention Triton kernels for an NVIDIA target without a GPU.

Triton's ahead-of-time path (``triton.compile`` with a ``GPUTarget``) runs the
whole pipeline down to a cubin with the ptxas shipped in the triton wheel, so
a machine with no device can still check that the kernels lower for the GPU
(the tests there run them through the interpreter only). For each kernel at the
tiles the launcher's ``_cfg`` gives it, it prints the shared memory (the limit is
227 KiB per block on sm_90), the registers and spills a thread (ptxas -v) and
the tensor-core instructions the products became (wgmma / mma.sync).

    python benchmarks/gpu/compile_rel_attention.py              # bf16, d = 64
    python benchmarks/gpu/compile_rel_attention.py --all        # every dtype / tile / head-dim class _cfg picks

Compiling is CPU-bound, tens of seconds per kernel; it starts no GPU work.
"""

from __future__ import annotations

import argparse
import inspect
import sys

FP32_BUFFERS = ("lse", "delta", "dup", "dqp", "dRp", "dSp", "dwp")


def _signature(fn, dtype: str, const: dict, fp32_buffers=FP32_BUFFERS) -> dict:
    sig = {}
    for n in inspect.signature(fn.fn).parameters:
        if n in const:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            sig[n] = "*fp32" if n[:-4] in fp32_buffers else f"*{dtype}"
        elif n == "scale":
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    return sig


def compile_kernel(fn, dtype: str, const: dict, arch: int, warps: int, stages: int, fp32_buffers=FP32_BUFFERS):
    """The kernel compiled for sm_<arch>; pointer arguments are ``*dtype`` except those named in
    fp32_buffers (``<name>_ptr``), which the launcher always passes as fp32."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(inspect.signature(fn.fn).parameters)
    src = ASTSource(fn, _signature(fn, dtype, const, fp32_buffers), constexprs={(names.index(k),): v for k, v in const.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages))


def _usage(k, arch: int) -> str:
    """Registers and spills per thread, from ptxas -v on the kernel's PTX (a loaded kernel reports them, but
    loading needs a GPU)."""
    import os
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas
    try:
        ptxas = get_ptxas(arch).path
    except TypeError:  # triton before 3.5 takes no arch
        ptxas = get_ptxas().path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(k.asm["ptx"])
        sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        run = subprocess.run([ptxas, "-v", f"-arch={sm}", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    log = run.stdout + run.stderr
    # one kernel, but ptxas may report several entries (e.g. a libdevice helper): the largest is the kernel
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", log)]
    spill = [(int(a), int(b)) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)]
    if not regs:
        return "registers: ptxas -v gave no count (" + log.strip().splitlines()[-1][:200] + ")"
    out = f"{max(regs)} registers"
    if spill:
        out += f", spills {max(a for a, _ in spill)} B stored / {max(b for _, b in spill)} B loaded"
    return out


def mma_counts(k) -> str:
    """Which tensor-core instructions a compiled kernel's products became (the warpgroup MMA takes
    M = 64 / 128 on sm_90; mma.sync is the older warp-level one)."""
    ptx = k.asm["ptx"]
    return f"wgmma {ptx.count('wgmma.mma_async')}, mma.sync {ptx.count('mma.sync')}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100 / H200)")
    ap.add_argument("--all", action="store_true", help="every (dtype, tile, d) class of the launcher's _cfg")
    ap.add_argument("--ttgir", action="store_true", help="also write each attention kernel's TTGIR to the current folder")
    args = ap.parse_args()

    from embkern.triton_kernels import rel_conv_attention as m

    # (dtype, padded d): one case of each tile class of the launcher's _cfg; every kernel takes the tiles and
    # warps _cfg gives it (forward FBM x FBN with `warps`, fused backward BM x BN with `bwd_warps`, the split
    # kernels their `split` entry or else the backward's)
    configs = [("bf16", 64)]
    if args.all:
        configs += [("fp16", 128), ("bf16", 256), ("fp32", 64), ("fp32", 128), ("fp32", 256)]
    attention = [("forward", m._fwd_kernel), ("backward", m._bwd_kernel), ("split kv", m._bwd_kv_kernel),
                 ("split q", m._bwd_q_kernel), ("split rel", m._bwd_rel_kernel)]
    import types

    import torch

    torch_dtype = dict(bf16=torch.bfloat16, fp16=torch.float16, fp32=torch.float32)
    split_key = {"split kv": "kv", "split q": "q", "split rel": "rel"}
    failed = 0
    for dtype, bd in configs:
        # the tiles _cfg gives a CUDA tensor of this dtype and head dim (it reads only .device.type and .dtype)
        cfg = m._cfg(types.SimpleNamespace(device=types.SimpleNamespace(type="cuda"), dtype=torch_dtype[dtype]), bd)
        for name, fn in attention:
            if name == "forward":
                BM, BN, warps = cfg.get("FBM", cfg["BM"]), cfg.get("FBN", cfg["BN"]), cfg["warps"]
            elif name in split_key and cfg.get("split"):
                BM, BN, warps = cfg["split"][split_key[name]]  # the split kernels' own tiles
            else:
                BM, BN, warps = cfg["BM"], cfg["BN"], cfg["bwd_warps"]
            const = dict(CAUSAL=True, BM=BM, BN=BN, BD=bd, BDV=bd, UPCAST=False, IEEE=dtype == "fp32")
            if name == "split rel":  # table-row blocks of BT = BN rows (the launcher's default)
                const["BT"] = const.pop("BN")
            tag = f"sm_{args.arch} {dtype} {BM}x{BN} d<={bd} {name} ({warps} warps)"
            try:
                k = compile_kernel(fn, dtype, const, args.arch, warps, cfg["stages"])
                print(f"{tag}: cubin {len(k.asm['cubin'])} bytes, shared memory {k.metadata.shared / 1024:.1f} KiB, "
                      f"{_usage(k, args.arch)}; {mma_counts(k)}", flush=True)
                if args.ttgir:
                    with open(f"{fn.fn.__name__}-{dtype}-{BM}x{BN}-d{bd}.ttgir", "w") as f:
                        f.write(k.asm["ttgir"])
            except Exception as exc:  # report every kernel, not the first failure only
                failed += 1
                print(f"{tag}: FAILED {type(exc).__name__}: {exc}", flush=True)
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
