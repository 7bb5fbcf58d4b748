#!/usr/bin/env python3
"""Sweep the Triton relative-attention backward's schedule, chunk count and tile shapes on a GPU.

Two schedules: "fused" (one kernel, chunks of key blocks, partial sums read-modify-written per tile) and
"split" (three kernels: dk dv per key block, dq per query block, dR dS per block of table rows; every sum in
registers, stored once).

The fused backward runs one program per (chunk, batch x head); ``MAX_CHUNKS`` caps the chunks, so it trades
parallelism (programs = chunks x B x H against the GPU's SMs) for partial-buffer memory (chunks x O(L d)).
The tiles (BM query rows x BN keys) set the relative term's cost, (BN + BM) / BN of Q K^T, and the
register / shared-memory pressure. This script times forward + backward for each setting against SDPA at the
same shape (no relative terms: the ceiling), reports the extra peak memory, and checks every setting's output
and gradients against the float64 reference at a small shape, so a fast setting that is wrong shows up.

    python benchmarks/gpu/tune_rel_attention.py [--budget S] [--out PATH]

Nothing here changes the library: it patches the module's SCHEDULE / MAX_CHUNKS / _cfg in this process only.
Timings are reported, never asserted. ``--allow-cpu`` runs a tiny smoke test in the Triton interpreter.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=150.0, help="seconds; no new setting starts after it")
    ap.add_argument("--out", default=None, help="also write the markdown here")
    ap.add_argument("--allow-cpu", action="store_true", help="smoke test in the interpreter (tiny shapes)")
    args = ap.parse_args()
    t0 = time.time()
    if args.allow_cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("tune_rel_attention.py: no CUDA device (use --allow-cpu for a smoke test)", file=sys.stderr)
        return 2
    import embkern
    from embkern.reference import rel_conv_attention as ref
    from embkern.triton_kernels import rel_conv_attention as tk

    dev = torch.device("cuda" if cuda else "cpu")
    dt = torch.bfloat16 if cuda else torch.float32
    B, H, L, d = (4, 8, 4096, 64) if cuda else (1, 2, 80, 16)
    Lc = 1024 if cuda else 40  # the fp64 check: the reference holds (B, H, Lc, 2 Lc) scores
    P = L
    default_cfg = tk._cfg
    default_chunks = tk.MAX_CHUNKS

    if cuda:
        import triton

        def bench(fn):
            return triton.testing.do_bench(fn, warmup=10, rep=60, quantiles=[0.5, 0.2, 0.8])
    else:
        def bench(fn):
            ts = []
            for _ in range(3):
                s = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - s) * 1e3)
            ts.sort()
            return ts[1], ts[0], ts[2]

    def inputs(Lx, seed=3):
        g = torch.Generator().manual_seed(seed)
        q, k, v = ((torch.randn(B, H, Lx, d, generator=g) * 0.5) for _ in range(3))
        R = torch.randn(2 * P, H, d, generator=g) * 0.1
        S = torch.randn(2 * P, H, generator=g) * 0.1
        u = torch.randn(H, d, generator=g) * 0.1
        go = torch.randn(B, H, Lx, d, generator=g)
        return [q, k, v, R, S, u], go

    def fwd_bwd(ins, go, backend):
        leaves = [t.detach().clone().requires_grad_(True) for t in ins]

        def f():
            for t in leaves:
                t.grad = None
            if backend == "sdpa":
                o = torch.nn.functional.scaled_dot_product_attention(*leaves[:3], is_causal=True)
            else:
                o = embkern.relative_attention(*leaves, max_distance=P, backend=backend)
            o.backward(go)
            return [o.detach()] + [t.grad for t in leaves]
        return f

    def peak_mib(fn):
        if not cuda:
            return None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    big, gbig = inputs(L)
    big = [t.to(dev, dt) for t in big]
    gbig = gbig.to(dev, dt)
    small, gsmall = inputs(Lc, seed=5)
    exact = [t.cpu() for t in fwd_bwd([t.to(dev, torch.float64) for t in small], gsmall.to(dev, torch.float64),
                                    "reference")()]
    small = [t.to(dev, dt) for t in small]
    gsmall = gsmall.to(dev, dt)
    names = ["out", "dq", "dk", "dv", "dR", "dS", "du"]

    def errors():
        got = fwd_bwd(small, gsmall, "triton")()
        return {n: float((a.double().cpu() - b).abs().max()) for n, a, b in zip(names, got, exact)}

    rows = []
    sd = bench(fwd_bwd(big, gbig, "sdpa"))
    rows.append(["sdpa (no relative terms)", "-", "-", f"{sd[0]:.3f}", f"{sd[1]:.3f}..{sd[2]:.3f}", "1.00",
                 f"{peak_mib(fwd_bwd(big, gbig, 'sdpa')) or 0:.0f}", "-"])
    fl = 3.5 * 4.0 * B * H * L * L * d / 2

    tiles = [None] if not cuda else [None, (64, 64, 4, 8), (32, 64, 4, 4), (32, 128, 4, 4), (64, 128, 4, 8)]
    chunk_sweep = [1, 4, 8, 32] if not cuda else [4, 8, 16, 32]
    # the split backward first (three kernels, no partial read-modify-write; never measured on a GPU yet): its
    # own per-kernel tiles (_cfg's "split"), then one tile for all three kernels; then the fused kernel, whose
    # default was measured (2026-12-04, H200), then its other chunks and tiles -- so a short budget still
    # compares the two schedules
    settings = ([(None, default_chunks, "split")] + [(t, default_chunks, "split") for t in tiles[1:]]
                + [(None, c, "fused") for c in chunk_sweep] + [(t, default_chunks, "fused") for t in tiles[1:]])
    for tile, ch, sched in settings:
        if time.time() - t0 > args.budget:
            rows.append([f"{tile or 'default'} {sched}", str(ch), "-", "not run (budget)", "", "", "", ""])
            continue
        if tile is None:
            tk._cfg = default_cfg
        else:
            BM, BN, w, bw = tile
            tk._cfg = lambda t, dd, BM=BM, BN=BN, w=w, bw=bw: dict(BM=BM, BN=BN, warps=w, bwd_warps=bw, stages=2)
        tk.MAX_CHUNKS = ch
        tk.SCHEDULE = sched
        c = tk._cfg(big[0], d)
        label = f"{c['BM']}x{c['BN']} fwd {c['warps']}w bwd {c['bwd_warps']}w {sched}"
        if sched == "split" and c.get("split"):  # the three kernels' own tiles
            label = f"{c.get('FBM', c['BM'])}x{c.get('FBN', c['BN'])} fwd {c['warps']}w; split " + ", ".join(
                f"{n} {a}x{b} {w}w" for n, (a, b, w) in c["split"].items())
        try:
            s = time.time()
            fb = fwd_bwd(big, gbig, "triton")
            fb()  # compile
            comp = time.time() - s
            t = bench(fb)
            fo = bench(lambda: embkern.relative_attention(*big, max_distance=P, backend="triton"))
            pk = peak_mib(fb)
            e = errors()
            err = ", ".join(f"{n} {v:.1e}" for n, v in e.items())
            rows.append([label, str(tk.chunks(-(-L // c["BN"]))) if sched == "fused" else "-", f"{comp:.0f}", f"{t[0]:.3f}",
                         f"{t[1]:.3f}..{t[2]:.3f}", f"{t[0] / sd[0]:.2f}", f"{pk or 0:.0f}",
                         f"fwd {fo[0]:.3f} ms; {fl / (t[0] * 1e-3) / 1e12:.1f} TFLOP/s; {err}"])
        except Exception as exc:
            rows.append([label, str(ch), "-", f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}",
                         "", "", "", ""])
            traceback.print_exc()
        finally:
            tk._cfg = default_cfg
            tk.MAX_CHUNKS = default_chunks
            tk.SCHEDULE = None
            if cuda:
                torch.cuda.empty_cache()

    head = ["tiles", "chunks", "compile s", "fwd+bwd median ms", "p20..p80", "x sdpa", "peak MiB", "notes"]
    md = [f"## relative attention backward sweep: B={B} H={H} L={L} d={d} causal {str(dt)[6:]}, max_distance {P}",
          "", f"device: {torch.cuda.get_device_name(0) if cuda else 'cpu (interpreter smoke)'}; x sdpa = time / "
          "SDPA fwd+bwd at the same shape without the relative terms; errors: max |x - fp64 reference| at "
          f"L={Lc} (same B, H, d).", "",
          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md.append("")
    md.append(f"_tune_rel_attention.py took {time.time() - t0:.0f} s_")
    text = "\n".join(md) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
