"""Time the CUDA FDE encoder on the paper's document workload; print one markdown row.

Workload: R=20, k=5, d=128, identity projection, documents (AVERAGE) with
fill_empty_partitions, 80 tokens each, B=4096 documents (float32 N(0,1)
points). The output is B * R * 2^k * d * 4 bytes = 1.34 GB, so the encoder is
bound by writing it: the row reports that bound (output bytes / peak HBM
bandwidth) and how close the kernels come to it.

  kernels  embkern._C_cuda.fde.encode with prepared arguments (the kernels
           plus launch overhead; tables, output and workspace preallocated)
  api      embkern.fde_encode(points, offsets, config, backend="cuda")
           (adds validation, the offsets' device-to-host copy and allocation)

Peak bandwidth by device name: H100 SXM (HBM3) 3.35e12 B/s, H200 4.8e12 B/s;
any other device: measured with a 1 GiB device-to-device torch copy.

    python benchmarks/gpu/fde_cuda_bench.py [--docs 4096] [--tokens 80] [--header]

Runs in ~10 s on an H100 (most of it the CPU cross-check of 64 documents).
"""

from __future__ import annotations

import argparse
import re
import sys

import torch


def peak_bandwidth(name: str) -> tuple:
    if "H200" in name:
        return 4.8e12, "table"
    if "H100" in name and ("HBM3" in name or "SXM" in name):
        return 3.35e12, "table"
    from triton.testing import do_bench

    n = 1 << 28  # 1 GiB of float32
    a = torch.empty(n, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=25, rep=100)
    return 2 * a.numel() * 4 / (ms * 1e-3), "measured copy"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=80)
    ap.add_argument("--header", action="store_true", help="print the table header first")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("fde_cuda_bench: needs an NVIDIA GPU", file=sys.stderr)
        return 2
    from triton.testing import do_bench

    import embkern
    from embkern import _backends
    from embkern.ops import _fde_cuda
    from embkern.ops import fde as fde_ops

    dev = torch.device("cuda", torch.cuda.current_device())
    name = torch.cuda.get_device_name(dev)
    cfg = embkern.FDEConfig(dimension=128, num_repetitions=20, num_simhash_projections=5, seed=42,
                            encoding_type="document", fill_empty_partitions=True)
    B, n, d = args.docs, args.tokens, cfg.dimension
    gen = torch.Generator(device=dev).manual_seed(0)
    points = torch.randn(B * n, d, device=dev, generator=gen)
    offsets = torch.arange(0, B * n + 1, n, dtype=torch.int64, device=dev)
    offsets_host = offsets.cpu().numpy()
    tables = fde_ops.tables(cfg).cuda_tables(dev)
    L = cfg.output_dimension
    out = torch.empty(B, L, device=dev)

    # Cross-check the first 64 documents against the CPU kernel, bit for bit.
    check = 64
    got = embkern.fde_encode(points[:check * n], offsets[:check + 1], cfg, backend="cuda").cpu()
    want = embkern.fde_encode(points[:check * n].cpu(), offsets[:check + 1].cpu(), cfg, backend="cpu")
    mismatches = int((got.view(torch.int32) != want.view(torch.int32)).sum())

    mod = _backends.cuda_module().fde
    problem = dict(points=points.data_ptr(), num_points=B * n, dimension=d, offsets=offsets.data_ptr(),
                   offsets_host=offsets_host, num_repetitions=cfg.num_repetitions,
                   num_simhash_projections=cfg.num_simhash_projections, projection_dim=d, is_document=True,
                   fill_empty_partitions=True, final_projection_dimension=None,
                   simhash=tables["simhash"].data_ptr(), simhash_numel=tables["simhash"].numel(),
                   chunk_budget_bytes=_fde_cuda.DEFAULT_CHUNK_BUDGET)
    ws_bytes = mod.workspace_size(**problem)
    ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=dev)
    stream = torch.cuda.current_stream(dev).cuda_stream

    def kernels():
        mod.encode(**problem, out=out.data_ptr(), out_numel=out.numel(), workspace=ws.data_ptr(),
                   workspace_bytes=ws_bytes, device=dev.index, stream=stream)

    def api():
        embkern.fde_encode(points, offsets, cfg, backend="cuda")

    ms_kernels = do_bench(kernels, warmup=25, rep=200)
    ms_api = do_bench(api, warmup=25, rep=200)
    bw, bw_src = peak_bandwidth(name)
    out_bytes = B * L * 4
    bound_ms = out_bytes / bw * 1e3
    if args.header:
        print("| device | workload | kernels ms | kernels docs/s | api ms | api docs/s | write bound ms "
              "(peak B/s) | % of bound | bit-exact vs cpu (64 docs) |")
        print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {name} | R20 k5 d128 doc fill, {n} tok, B={B} | {ms_kernels:.3f} | {B / ms_kernels * 1e3:,.0f} | "
          f"{ms_api:.3f} | {B / ms_api * 1e3:,.0f} | {bound_ms:.3f} ({bw:.3g}, {bw_src}) | "
          f"{100 * bound_ms / ms_kernels:.0f}% | {'yes' if mismatches == 0 else f'NO: {mismatches} values differ'} |")
    breakdown = kernel_breakdown(kernels, calls=10)
    if breakdown:
        print()
        print(f"Per-kernel GPU time (torch.profiler, mean of 10 calls, B={B}): " + "; ".join(
            f"`{k}` {ms:.3f} ms ({100 * ms / sum(breakdown.values()):.0f}%)" for k, ms in breakdown.items()))
    return 0 if mismatches == 0 else 1


def kernel_breakdown(fn, calls: int) -> dict:
    """{kernel name: mean ms per call} of the CUDA kernels `fn` launches (torch.profiler /
    CUPTI). Tells which stage (codes, write, count sketch) to work on; {} if profiling fails."""
    try:
        from torch.profiler import ProfilerActivity, profile

        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
        out = {}
        for ev in prof.key_averages():
            us = getattr(ev, "device_time_total", None)
            if us is None:
                us = getattr(ev, "cuda_time_total", 0.0)
            if us and ev.count >= calls:
                m = re.search(r"(\w+)(<[^()]*>)?\(", ev.key.replace("(anonymous namespace)::", ""))
                short = (m.group(1) + (m.group(2) or "")) if m else ev.key[:60]
                out[short] = out.get(short, 0.0) + us / 1e3 / calls
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))
    except Exception as exc:  # report, never fail the bench
        print(f"(kernel breakdown unavailable: {type(exc).__name__}: {exc})", file=sys.stderr)
        return {}


if __name__ == "__main__":
    sys.exit(main())
