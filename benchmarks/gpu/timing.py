#!/usr/bin/env python3
"""Time every embkern GPU kernel against its anchor with triton.testing.do_bench.

Called by benchmarks/gpu/check.sh after the CUDA build and the GPU tests;
runs alone too:  python benchmarks/gpu/timing.py [--out PATH] [--budget S]

selective attention (Triton): B = 4, H = 16, L = 4096, d = 64 and 128, causal, bf16
  and fp32, forward and forward + backward, against SDPA on the pre-scaled inputs.
relative attention (Triton): B = 4, H = 8, L = 1024 and 4096, d = 64, causal, bf16, forward and
  forward + backward (all six gradients), against SDPA at the same shape without the relative terms
  (the ceiling) and, at L = 1024, the embkern reference; max_distance 4096.
hypercomplex (Triton), FB15k-237 scale: N = 14,505 entities, K = 4d = 400,
B = 128 and 1024, fp32 (plus bf16 score_all at B = 1024):
  score_all (inner/quaternion, distance/dihedron with biases), rank_all
  (filtered, 5 known tails per row), topk_all (k = 10), one_to_n_loss
  forward + backward; each against torch.mm / cuBLAS of the same M, N, K
  (fp32 with TF32 off, and TF32 -- Triton's fp32 tl.dot may use TF32, so
  both floors are shown), the embkern reference (torch), and for the
  fused epilogues the plain-torch pipeline (mm + topk, mm + cross_entropy).
fde (CUDA): benchmarks/gpu/fde_cuda_bench.py when present, run as a
  subprocess with --header; its stdout (a markdown table) is embedded verbatim.

Columns: median / p20 / p80 ms (do_bench quantiles), TFLOP/s (2BNK per
GEMM pass), "x mm" = time / torch.mm fp32 time of the same GEMM (the fused
target is <= 1.3), "vs ref" = reference time / time, peak extra MiB
(torch.cuda.max_memory_allocated around one call), max |err| against the
reference run in float64. Every case runs in try/except: a failure is a row,
not an abort. Output: markdown on stdout and in
benchmarks/results/<device-name-slug>.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from typing import Callable, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

N_ENT, D = 14_505, 100
K = 4 * D
BATCHES = (128, 1024)
N_FILTER = 5
TOPK = 10


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown-device"


class Rows:
    def __init__(self):
        self.rows: List[dict] = []

    def add(self, **kw):
        self.rows.append(kw)


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="markdown path (default benchmarks/results/<device>.md)")
    ap.add_argument("--steps", default=None, help="TSV of check.sh steps (name, status, seconds, note)")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds for the hypercomplex cases + fde")
    ap.add_argument("--only", default="", help="comma-separated sections to time (hypercomplex, "
                    "selective_attention, bit_cipher, relative_attention, fde); default all")
    ap.add_argument("--allow-cpu", action="store_true",
                    help="smoke-test the script without a GPU (tiny sizes, perf_counter timing, no Triton)")
    args = ap.parse_args()
    t_start = time.time()
    deadline = t_start + args.budget

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("timing.py: torch sees no CUDA device; nothing to time (use --allow-cpu for a smoke test)",
              file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    only = [x.strip() for x in args.only.split(",") if x.strip()]

    def selected(section: str) -> bool:
        """Whether --only (empty: everything) names this section (a prefix of its name)."""
        return not only or any(section.startswith(x) for x in only)
    dev_name = torch.cuda.get_device_name(0) if cuda else f"cpu-smoke-{platform.machine()}"
    out_path = args.out or os.path.join(ROOT, "benchmarks", "results", f"{slug(dev_name)}.md")

    env_lines = [f"- device: {dev_name}"]
    if cuda:
        cap = torch.cuda.get_device_capability(0)
        props = torch.cuda.get_device_properties(0)
        env_lines.append(f"- capability sm_{cap[0]}{cap[1]}, {props.multi_processor_count} SMs, "
                         f"{props.total_memory / 2**30:.0f} GiB; torch CUDA {torch.version.cuda}")
    env_lines.append(f"- torch {torch.__version__}, python {platform.python_version()}, {platform.platform()}")
    try:
        import triton

        env_lines.append(f"- triton {triton.__version__}")
        do_bench = triton.testing.do_bench if cuda else None
    except Exception as exc:
        env_lines.append(f"- triton unavailable: {exc}")
        do_bench = None
    try:
        import embkern
        from embkern.bench import timing as ek_timing
        from embkern.bench.report import table
    except Exception as exc:
        print(f"timing.py: embkern does not import: {exc}", file=sys.stderr)
        return 2
    env_lines.append(f"- embkern {embkern.__version__} from {os.path.dirname(embkern.__file__)}")
    env_lines.append(f"- date {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}")

    def timeit(fn: Callable) -> List[float]:
        """[median, p20, p80] in ms: do_bench on the GPU; the bench's time_call (5 samples) in the CPU smoke run."""
        if do_bench is not None:
            return list(do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8]))
        ts = sorted(t * 1e3 for t in ek_timing.time_call(fn, device, repeat=5))  # a slow call may give fewer
        n = len(ts)
        return [ts[n // 2], ts[int(0.2 * (n - 1))], ts[int(round(0.8 * (n - 1)))]]

    peak = ek_timing.peak_meter(device) if cuda else None  # the bench's CUDA peak meter

    def peak_mib(fn) -> Optional[float]:
        if peak is None:
            return None
        _, nbytes = peak.measure(fn)
        return None if nbytes is None else nbytes / 2**20

    rows = Rows()
    failures: List[str] = []

    state = {"fde_md": "(not run yet: the report is rewritten after every case)"}

    def write_report(final: bool = False) -> str:
        fde_md = state["fde_md"]
        md = [f"# embkern GPU check: {dev_name}", "", *env_lines, ""]
        if args.steps and os.path.exists(args.steps):
            steps = []
            with open(args.steps) as f:
                for line in f:
                    parts = line.rstrip("\n").split("\t")
                    if len(parts) >= 3:
                        steps.append((parts + [""])[:4])
            if steps:
                md += ["## Steps (check.sh)", "", table(["step", "status", "seconds", "note"], steps, markdown=True), ""]
        body = []
        for r in rows.rows:
            if r["status"] != "ok":
                body.append([r["section"], r["case"], r["impl"], r["status"], "", "", "", "", "", ""])
                continue
            body.append([r["section"], r["case"], r["impl"], _fmt(r["med"], ".3f"),
                         f"{r['p20']:.3f}..{r['p80']:.3f}", _fmt(r["tflops"], ".2f"), _fmt(r["x_mm"], ".2f"),
                         _fmt(r["vs_ref"], ".1f"), _fmt(r["peak"], ".1f"),
                         _fmt(r["err"], ".1e") + (f" ({r['note']})" if r.get("note") else "")])
        md += ["## hypercomplex (Triton) vs cuBLAS and the reference", "",
               "x mm: time / torch.mm fp32 (TF32 off) of the same GEMM (fused target <= 1.3). vs ref: reference time / "
               "time. peak: extra MiB allocated during one call. err: max |out - fp64 reference| (ranks: positions; "
               "top-k: values).", "",
               table(["section", "case", "impl", "median ms", "p20..p80 ms", "TFLOP/s", "x mm", "vs ref",
                      "peak MiB", "max err"], body, markdown=True), ""]
        md += ["Selective attention rows: x mm is time / SDPA (flash backend on CUDA) on the pre-scaled inputs, the "
               "exact anchor; target: the Triton kernels at >= 90% of its TFLOP/s in bf16 (x mm <= 1.11).", ""]
        md += ["Relative attention rows: x mm is time / SDPA (flash backend on CUDA) at the same shape without the "
               "relative terms, the ceiling; TFLOP/s count plain attention's FLOPs; target: the Triton kernels at >= 60% "
               "of SDPA's throughput in bf16 (x mm <= 1.67). peak: extra MiB of one call (O(L d) for the fused "
               "kernels; the reference holds (B, H, L, 2L) relative scores).", ""]
        md += ["## fde (CUDA)", "", fde_md, ""]
        if failures:
            md += ["## Failures", "", "```", *[f.rstrip() for f in failures], "```", ""]
        md.append(f"_timing.py took {time.time() - t_start:.0f} s_" if final else
                  f"_partial report after {time.time() - t_start:.0f} s_")
        text = "\n".join(md) + "\n"
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(out_path, "w") as f:
            f.write(text)
        return text

    def case(section, name, impl, fn, flops, mm_ms=None, ref_ms=None, err_fn=None, note=""):
        if not selected(section):
            rows.add(section=section, case=name, impl=impl, status="not run (not in --only)")
            return None
        if time.time() > deadline:
            rows.add(section=section, case=name, impl=impl, status="not run (time budget spent)")
            write_report()
            return None
        print(f"[{time.time() - t_start:6.1f} s] {section} / {name} / {impl}", file=sys.stderr, flush=True)
        try:
            med, p20, p80 = timeit(fn)
            pk = peak_mib(fn)
            err = None
            if err_fn is not None:
                err = err_fn(fn())
            rows.add(section=section, case=name, impl=impl, status="ok", med=med, p20=p20, p80=p80,
                     tflops=flops / (med * 1e-3) / 1e12 if flops else None,
                     x_mm=(med / mm_ms) if mm_ms else None, vs_ref=(ref_ms / med) if ref_ms else None,
                     peak=pk, err=err, note=note)
            write_report()
            return med
        except Exception as exc:
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            rows.add(section=section, case=name, impl=impl, status=f"FAILED: {msg}")
            failures.append(f"{name} / {impl}: {traceback.format_exc(limit=3)}")
            write_report()
            return None

    # ---------------------------------------------------------------- hypercomplex
    from embkern import _backends
    from embkern.ops import hypercomplex as hc_ops
    from embkern.reference import hypercomplex as ref

    n_ent, d = (N_ENT, D) if cuda else (500, 16)
    kk = 4 * d
    batches = BATCHES if cuda else (32,)

    def fast_for(group):
        """["triton"] when it implements every kernel `group` needs; else a row saying why not."""
        bad = [f"{k}: {st.reason}" for k in hc_ops.DESCRIPTOR.kernels_of(group)
               for st in [_backends.check(hc_ops.DESCRIPTOR, "triton", (k,), device.type, torch.float32)]
               if not st.ok]
        if bad:
            if group not in reported:
                rows.add(section="hypercomplex", case=group, impl="triton", status="not available: " + bad[0])
                reported.add(group)
            return []
        return ["triton"]

    reported = set()
    g = torch.Generator().manual_seed(0)
    E = (torch.randn(n_ent, kk, generator=g) * 0.1).to(device)
    bt = (torch.randn(n_ent, generator=g) * 0.1).to(device)
    E64, bt64 = E.double(), bt.double()

    def maxerr(ref64):
        def f(out):
            outs = out if isinstance(out, (tuple, list)) else (out,)
            refs = ref64 if isinstance(ref64, (tuple, list)) else (ref64,)
            return max(float((o.double() - r).abs().max()) for o, r in zip(outs, refs) if o is not None)
        return f

    for B in batches:
        h = (torch.randn(B, kk, generator=g) * 0.1).to(device)
        r = torch.randn(B, kk, generator=g).to(device)
        bh = (torch.randn(B, generator=g) * 0.1).to(device)
        tg = torch.randint(0, n_ent, (B,), generator=g).to(device)
        fo = torch.arange(0, (B + 1) * N_FILTER, N_FILTER, dtype=torch.int64, device=device)
        fi = torch.randint(0, n_ent, (B * N_FILTER,), generator=g).to(device)
        h64, r64, bh64 = h.double(), r.double(), bh.double()
        gemm = 2.0 * B * n_ent * kk
        sec = f"hypercomplex B={B}"
        shape = f"M={B} N={n_ent} K={kk}"

        torch.backends.cuda.matmul.allow_tf32 = False
        mm = case(sec, f"GEMM {shape}", "torch.mm fp32 (cuBLAS, TF32 off)", lambda: torch.mm(h, E.T), gemm)
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            case(sec, f"GEMM {shape}", "torch.mm TF32 (cuBLAS)", lambda: torch.mm(h, E.T), gemm, mm_ms=mm)
            torch.backends.cuda.matmul.allow_tf32 = False

        for score, alg in (("inner", "quaternion"), ("distance", "dihedron")):
            b1, b2 = (bh, bt) if score == "distance" else (None, None)
            s64 = ref.score_all(h64, r64, E64, alg, score, True, *((bh64, bt64) if b1 is not None else
                                                                   (None, None)))
            name = f"score_all {score}/{alg}"
            fast = fast_for("score_all")
            rt = case(sec, name, "reference (torch)",
                      lambda: embkern.score_all(h, r, E, alg, score, True, b1, b2, backend="reference"),
                      gemm, mm_ms=mm, err_fn=maxerr(s64))
            for be in fast:
                case(sec, name, be, lambda: embkern.score_all(h, r, E, alg, score, True, b1, b2, backend=be),
                     gemm, mm_ms=mm, ref_ms=rt, err_fn=maxerr(s64))
            del s64

        fast = fast_for("rank_all")
        rk64 = ref.rank_all(h64, r64, E64, tg, fo, fi, "realistic")
        rt = case(sec, "rank_all filtered", "reference (torch)",
                  lambda: embkern.rank_all(h, r, E, tg, (fo, fi), backend="reference"), gemm, mm_ms=mm,
                  err_fn=maxerr(rk64))
        for be in fast:
            case(sec, "rank_all filtered", be, lambda: embkern.rank_all(h, r, E, tg, (fo, fi), backend=be),
                 gemm, mm_ms=mm, ref_ms=rt, err_fn=maxerr(rk64))

        k = min(TOPK, n_ent)
        fast = fast_for("topk_all")
        tk64 = ref.topk_from_scores(ref.score_all(h64, r64, E64), k)[0]
        case(sec, f"topk_all k={k}", "torch.mm + torch.topk",
             lambda: torch.topk(torch.mm(ref.query(h, r), E.T), k, dim=1), gemm, mm_ms=mm,
             err_fn=lambda o: float((o[0].double() - tk64).abs().max()))
        rt = case(sec, f"topk_all k={k}", "reference (torch)",
                  lambda: embkern.topk_all(h, r, E, k, backend="reference"), gemm, mm_ms=mm,
                  err_fn=lambda o: float((o[0].double() - tk64).abs().max()))
        for be in fast:
            case(sec, f"topk_all k={k}", be, lambda: embkern.topk_all(h, r, E, k, backend=be), gemm, mm_ms=mm,
                 ref_ms=rt, err_fn=lambda o: float((o[0].double() - tk64).abs().max()))

        def loss_fn(be, dtype=torch.float32):
            src = (h, r, E) if dtype == torch.float32 else (h64, r64, E64)
            leaves = [t.detach().clone().requires_grad_(True) for t in src]

            def f():
                for t in leaves:
                    t.grad = None
                if be == "torch":
                    q = ref.query(*leaves[:2])
                    loss = torch.nn.functional.cross_entropy(torch.mm(q, leaves[2].T), tg)
                elif be == "ref64":
                    loss = ref.one_to_n_loss(*leaves, tg)
                else:
                    loss = embkern.one_to_n_loss(*leaves, tg, backend=be)
                loss.backward()
                return (loss.detach(),) + tuple(t.grad for t in leaves)
            return f

        fast = fast_for("one_to_n_loss")
        l64 = loss_fn("ref64", torch.float64)()
        name = "one_to_n_loss fwd+bwd"
        case(sec, name, "torch autograd (mm + cross_entropy)", loss_fn("torch"), 3 * gemm, mm_ms=None,
             err_fn=maxerr(l64), note="3 GEMM passes")
        rt = case(sec, name, "reference (torch)", loss_fn("reference"), 3 * gemm, err_fn=maxerr(l64))
        for be in fast:
            case(sec, name, be, loss_fn(be), 3 * gemm, ref_ms=rt, err_fn=maxerr(l64))
        del l64, rk64, tk64

        fast = fast_for("score_all")
        if cuda and B == batches[-1]:
            hb, rb, Eb = h.bfloat16(), r.bfloat16(), E.bfloat16()
            s64 = ref.score_all(h64, r64, E64)
            mmb = case(sec, f"GEMM {shape} bf16", "torch.mm bf16 (cuBLAS)", lambda: torch.mm(hb, Eb.T), gemm)
            for be in fast:
                case(sec, "score_all inner/quaternion bf16", be,
                     lambda: embkern.score_all(hb, rb, Eb, backend=be), gemm, mm_ms=mmb, err_fn=maxerr(s64),
                     note="x mm vs bf16 GEMM")
            del s64, hb, rb, Eb
        del h64, r64, bh64
        if cuda:
            torch.cuda.empty_cache()

    # ---------------------------------------------------------------- selective attention (Triton)
    from embkern.ops import selective_attention as ssa_ops
    from embkern.reference import selective_attention as ssa_ref

    st = _backends.check(ssa_ops.DESCRIPTOR, "triton", ssa_ops.DESCRIPTOR.kernels, device.type, torch.float32)
    ssa_cases = [(4, 16, 4096, 64), (4, 16, 4096, 128)] if cuda else [(1, 2, 64, 16)]
    for Bs, Hs, Ls, ds in ssa_cases:
        sec = f"selective_attention B={Bs} H={Hs} L={Ls} d={ds}"
        if not st.ok:
            rows.add(section=sec, case="forward", impl="triton", status="not available: " + st.reason)
            break
        g = torch.Generator().manual_seed(7)
        for sdt in ((torch.bfloat16, torch.float32) if cuda else (torch.float32,)):
            qs, ks, vs = ((torch.randn(Bs, Hs, Ls, ds, generator=g) * 0.5).to(device, sdt) for _ in range(3))
            tqs = (0.5 + torch.rand(Bs, Hs, Ls, generator=g)).to(device)
            tvs = (0.5 + torch.rand(Bs, Hs, Ls, generator=g)).to(device)
            flops = 4.0 * Bs * Hs * Ls * Ls * ds / 2  # causal
            name = str(sdt).replace("torch.", "")

            def sdpa(q, k, v, tq, tv):
                return torch.nn.functional.scaled_dot_product_attention(
                    q * tq[..., None].to(q.dtype), k, v * tv[..., None].to(v.dtype), is_causal=True)

            def ssa(q, k, v, tq, tv):
                return embkern.selective_attention(q, k, v, tq, tv, backend="triton")

            o64 = ssa_ref.attention(qs.double(), ks.double(), vs.double(), tqs.double(), tvs.double()) \
                if Ls <= 2048 else None
            err = maxerr(o64) if o64 is not None else None
            base = case(sec, f"forward {name}", "sdpa(q*tau_q, v*tau_v)", lambda: sdpa(qs, ks, vs, tqs, tvs), flops,
                        err_fn=err)
            case(sec, f"forward {name}", "triton", lambda: ssa(qs, ks, vs, tqs, tvs), flops, mm_ms=base, err_fn=err,
                 note="x mm = time / sdpa")

            def fb(fn):
                leaves = [t.detach().clone().requires_grad_(True) for t in (qs, ks, vs, tqs, tvs)]
                go = torch.randn_like(qs)

                def f():
                    for t in leaves:
                        t.grad = None
                    fn(*leaves).backward(go)
                    return tuple(t.grad for t in leaves)
                return f

            base = case(sec, f"fwd+bwd {name}", "sdpa(q*tau_q, v*tau_v)", fb(sdpa), 3.5 * flops)
            case(sec, f"fwd+bwd {name}", "triton", fb(ssa), 3.5 * flops, mm_ms=base, note="x mm = time / sdpa")
            del qs, ks, vs, tqs, tvs, o64
        if cuda:
            torch.cuda.empty_cache()

    # ---------------------------------------------------------------- bit_cipher (CUDA) vs the CPU kernel
    if cuda and _backends.check(embkern.ops.bit_cipher.DESCRIPTOR, "cuda", ("count",), "cuda", torch.float32).ok:
        from embkern.bench.bit_cipher import zipf_chunk

        n_tok = 2_000_000
        tok, off = zipf_chunk(50_000, n_tok, seed=1)
        bc = embkern.BitCipher.fit(tok, vocab_size=50_000, bits=64)
        for mode in ("sum", "concat"):
            cpu_c = embkern.CooccurrenceCounts(bc, 5, mode, "cos2", backend="cpu").update(tok, off)
            gpu_c = embkern.CooccurrenceCounts(bc, 5, mode, "cos2", backend="cuda")
            tok_d, off_d = tok.to(device), off.to(device)

            def run_gpu(gpu_c=gpu_c, tok_d=tok_d, off_d=off_d):
                # the timed call is the update alone: the sums keep growing over the repeats
                # (128-bit, no overflow), and zeroing A here (580 MB in concat) was timed with it
                gpu_c.update(tok_d, off_d)
                return gpu_c.A

            def one_pass_err(_, gpu_c=gpu_c, cpu_c=cpu_c, tok_d=tok_d, off_d=off_d):
                gpu_c.A.zero_()
                gpu_c.update(tok_d, off_d)
                return float((gpu_c.A.cpu() - cpu_c.A).abs().max())

            # err: max |A_gpu - A_cpu| of one pass from zero; 0 = bit-equal to the CPU
            med = case(f"bit_cipher b=64 {mode}", f"zipf {n_tok} tokens V=50k", "cuda", run_gpu, None,
                       err_fn=one_pass_err, note="err = max |A_gpu - A_cpu|")
            if med:
                rows.rows[-1]["note"] += f"; {n_tok / (med * 1e-3) / 1e6:.0f} Mtokens/s"
            del cpu_c, gpu_c
        torch.cuda.empty_cache()
    else:
        rows.add(section="bit_cipher", case="count", impl="cuda", status="not available: no GPU / no cuda kernel")
    # ---------------------------------------------------------------- relative attention (Triton)
    from embkern.ops import rel_conv_attention as rca_ops
    from embkern.reference import rel_conv_attention as rca_ref

    rdt = torch.bfloat16 if cuda else torch.float32  # the CPU smoke run: fp32 through the interpreter
    st = _backends.check(rca_ops.DESCRIPTOR, "triton", rca_ops.DESCRIPTOR.kernels_of("relative_attention"),
                         device.type, rdt)
    rca_cases = [(4, 8, 1024, 64), (4, 8, 4096, 64)] if cuda else [(1, 2, 48, 16)]
    P_rel = 4096 if cuda else 64  # max_distance: the tables hold 2P rows; L <= P
    for Br, Hr, Lr, dr in rca_cases:
        sec = f"relative_attention B={Br} H={Hr} L={Lr} d={dr}"
        if not st.ok:
            rows.add(section=sec, case="forward", impl="triton", status="not available: " + st.reason)
            break
        g = torch.Generator().manual_seed(11)
        qr, kr, vr = ((torch.randn(Br, Hr, Lr, dr, generator=g) * 0.5).to(device, rdt) for _ in range(3))
        Rr = (torch.randn(2 * P_rel, Hr, dr, generator=g) * 0.1).to(device, rdt)
        Sr = (torch.randn(2 * P_rel, Hr, generator=g) * 0.1).to(device, rdt)
        ur = (torch.randn(Hr, dr, generator=g) * 0.1).to(device, rdt)
        ins = (qr, kr, vr, Rr, Sr, ur)
        flops = 4.0 * Br * Hr * Lr * Lr * dr / 2  # plain causal attention's: TFLOP/s comparable with SDPA's
        name = str(rdt).replace("torch.", "")

        def sdpa(q, k, v, R, S, u):  # the ceiling: the same attention without the relative terms
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

        from embkern.triton_kernels import rel_conv_attention as rca_tk

        def rel(be):
            def f(q, k, v, R, S, u):
                return embkern.relative_attention(q, k, v, R, S, u, max_distance=P_rel, backend=be)
            return f

        # the fp64 reference holds (B, H, L, 2L) relative scores: for the error column up to L = 2048 only
        o64 = rca_ref.attention(*(t.double() for t in ins)) if Lr <= 2048 else None
        err = maxerr(o64) if o64 is not None else None
        impls = [("triton", rel("triton"))] + ([("reference (torch)", rel("reference"))] if Lr <= 1024 else [])
        if cuda:  # the anchor: FlexAttention (compiled) with the (B, H, L, L) q . R + S bias precomputed
            from embkern.bench.rel_conv_attention import flex_relative_attention

            impls.append(("flexattention + precomputed q.R bias", flex_relative_attention))
        base = case(sec, f"forward {name}", "sdpa (no relative terms)", lambda: sdpa(*ins), flops)
        for label, fn in impls:
            case(sec, f"forward {name}", label, lambda: fn(*ins), flops, mm_ms=base, err_fn=err,
                 note="x mm = time / sdpa")
        del o64

        def fb(fn, schedule=None):
            leaves = [t.detach().clone().requires_grad_(True) for t in ins]
            go = torch.randn_like(qr)

            def f():
                for t in leaves:
                    t.grad = None
                rca_tk.SCHEDULE = schedule  # the Triton backward's schedule ("fused" / "split"; None: default)
                try:
                    fn(*leaves).backward(go)
                finally:
                    rca_tk.SCHEDULE = None
                return tuple(t.grad for t in leaves[:3])
            return f

        base = case(sec, f"fwd+bwd {name}", "sdpa (no relative terms)", fb(sdpa), 3.5 * flops)
        # both backward schedules (the autograd backward runs inside fn's call: the schedule is read then)
        default = rca_tk.schedule(qr, dr)
        other = "split" if default == "fused" else "fused"
        for label, fn, sched in ([(f"triton ({default} backward)", impls[0][1], None),
                                  (f"triton ({other} backward)", impls[0][1], other)]
                                 + [(lb, f, None) for lb, f in impls[1:]]):
            case(sec, f"fwd+bwd {name}", label, fb(fn, sched), 3.5 * flops, mm_ms=base, note="x mm = time / sdpa")
        del qr, kr, vr, Rr, Sr, ur, ins
        if cuda:
            torch.cuda.empty_cache()

    # ---------------------------------------------------------------- fde (CUDA): fde_cuda_bench.py
    fde_md = ""
    fde_script = os.path.join(HERE, "fde_cuda_bench.py")
    if os.path.exists(fde_script) and selected("fde"):
        left = max(10.0, deadline - time.time())
        try:
            # it prints one markdown table row; --header adds the header lines above it
            p = subprocess.run([sys.executable, fde_script, "--header"], capture_output=True, text=True,
                               timeout=left, cwd=ROOT)
            fde_md = p.stdout.strip()
            if p.returncode != 0:
                fde_md += f"\n\n**fde_cuda_bench.py exited {p.returncode}**\n\n```\n{p.stderr[-2000:]}\n```"
                failures.append(f"fde_cuda_bench.py exit {p.returncode}")
        except subprocess.TimeoutExpired:
            fde_md = f"**fde_cuda_bench.py: timed out after {left:.0f} s (time budget)**"
            failures.append("fde_cuda_bench.py timed out")
    else:
        fde_md = "benchmarks/gpu/fde_cuda_bench.py is not present: no FDE timings."

    state["fde_md"] = fde_md
    text = write_report(final=True)
    print(text)
    print(f"wrote {out_path}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
