"""``python -m embkern bench``: reference vs fast backends vs outside anchors, one table.

Every op with a workload module in :mod:`embkern._bench` contributes cases
(``workloads(quick, device)``); each case runs every available embkern
backend and every anchor on the same inputs and records:

* time: one warm-up call, then ``repeat`` samples (default 7, ``--quick`` 3);
  min / median / max are reported, never asserted. A sample averages enough
  back-to-back calls to last >= 1 ms (sub-millisecond cases would otherwise
  measure the timer). Rows whose warm-up call takes > 1 s (or that the case
  marks slow) take at most 3 samples, so multi-second baselines such as
  PyKEEN's einsum cost ~4 calls, not 8.
* peak extra memory of one more call:

  - CPU: the process's peak resident set, re-armed around the call. We
    ``gc.collect()``, return freed heap pages to the kernel with glibc's
    ``malloc_trim(0)`` (otherwise memory freed by an earlier row would be
    reused invisibly and the peak under-counted), write ``5`` to
    ``/proc/self/clear_refs`` (Linux >= 4.0: resets VmHWM to the current
    RSS), read VmRSS, call, and report VmHWM - VmRSS. It counts everything
    the call touches -- outputs, temporaries, OpenMP thread buffers -- at
    page granularity; it cannot see memory already resident before the
    call. Without /proc (macOS, restricted containers) the column is "n/a".
    A subprocess per row would be cleaner but costs a torch import (~2 s)
    and a second copy of the inputs per row.
  - CUDA: ``torch.cuda.max_memory_allocated()`` after
    ``reset_peak_memory_stats()``, minus the allocation before the call.
* max error: max |output - reference run in float64 on upcast inputs|, by
  the case's error function (e.g. values only for top-k).

Output: the table on stdout, ``bench.json`` (``--json``), a PNG chart
(``--plot``; matplotlib Agg): median time per case and speedup vs the
reference, on log axes, plus any panels the ops' ``extra_report`` add.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

SLOW_CALL_S = 1.0
MIN_SAMPLE_S = 1e-3
MAX_INNER = 1000
SLOW_REPEAT = 3
MEM_FLOOR = 64 * 1024  # bytes; ratios against a near-zero peak are reported against this floor


# ---------------------------------------------------------------------------
# Peak memory


class _CpuPeak:
    """Peak extra resident memory of one call (see the module docstring)."""

    def __init__(self):
        self.reason = ""
        self.ok = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._status()
            self.ok = True
        except OSError as exc:
            self.reason = f"/proc/self/clear_refs not writable ({exc.strerror or exc}); peak memory not measured"
        self._trim = None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            self._trim = libc.malloc_trim
            self._trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            self._trim = None  # not glibc: freed heap may be reused unseen (peaks can read low)

    @staticmethod
    def _status() -> Dict[str, int]:
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    key, val = line.split(":", 1)
                    out[key] = int(val.split()[0]) * 1024
        return out

    def measure(self, fn: Callable[[], Any]) -> Tuple[Any, Optional[int]]:
        if not self.ok:
            return fn(), None
        gc.collect(1)  # young generations only: run() froze the import-time heap (gc.freeze)
        if self._trim is not None:
            self._trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = self._status()["VmRSS"]
        out = fn()
        peak = self._status()["VmHWM"]
        return out, max(0, peak - base)

    method = ("CPU: peak RSS re-armed around one call (gc + malloc_trim(0), write 5 to "
              "/proc/self/clear_refs, VmHWM - VmRSS)")


class _CudaPeak:
    ok = True
    reason = ""
    method = "CUDA: torch.cuda.max_memory_allocated() - memory_allocated() before the call"

    def measure(self, fn):
        import torch

        torch.cuda.synchronize()
        gc.collect(1)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return out, max(0, torch.cuda.max_memory_allocated() - base)


# ---------------------------------------------------------------------------
# Timing


def _sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], device, repeat: int, slow: bool = False) -> List[float]:
    """Seconds per call: warm-up, then `repeat` samples (fewer for slow rows; see module doc)."""
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    first = time.perf_counter() - t0
    del out
    if first < 0.05:  # a second warm-up for cheap calls: first-call caches, lazy inits, thread pools
        fn()
        _sync(device)
    if slow or first > SLOW_CALL_S:
        repeat = min(repeat, SLOW_REPEAT)
    inner = 1 if first >= MIN_SAMPLE_S else min(MAX_INNER, max(1, int(math.ceil(MIN_SAMPLE_S / max(first, 1e-7)))))
    samples = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn()
        _sync(device)
        samples.append((time.perf_counter() - t0) / inner)
        del out
    return samples


# ---------------------------------------------------------------------------
# Running


def _progress(total: int, enabled: bool):
    class _Text:
        def __init__(self):
            self.i = 0

        def set(self, text):
            if enabled:
                print(f"  [{self.i + 1}/{total}] {text}", file=sys.stderr, flush=True)

        def update(self):
            self.i += 1

        def close(self):
            pass

    if not enabled:
        return _Text()
    try:
        from tqdm.auto import tqdm
    except Exception:
        return _Text()

    class _Tqdm:
        def __init__(self):
            self.bar = tqdm(total=total, file=sys.stderr, unit="row", dynamic_ncols=True, leave=False)

        def set(self, text):
            self.bar.set_postfix_str(text[:60], refresh=True)

        def update(self):
            self.bar.update(1)

        def close(self):
            self.bar.close()

    return _Tqdm()


class _AtIsa:
    """Runs the C++ kernels at one ISA level inside the block (``--cpu-isa``)."""

    def __init__(self, level: Optional[str]):
        self.level, self.before = level, None

    def __enter__(self):
        if self.level:
            from . import _backends

            mod = _backends.cpu_module()
            self.before = mod.isa_info()["active"]
            mod.set_isa(self.level)

    def __exit__(self, *exc):
        if self.level and self.before:
            from . import _backends

            _backends.cpu_module().set_isa(self.before)


def run_workload(op: str, w, device, repeat: int, peak, bar, cpu_isa: Sequence[str] = ()) -> List[dict]:
    """Rows (dicts) for one case: each backend, each anchor, each skip.

    ``cpu_isa``: ISA levels to time the ``cpu`` backend at, one row each
    (``cpu[avx2]``...); empty: one ``cpu`` row at the active level.
    """
    rows = []
    ref64_box: Dict[str, Any] = {}

    def ref64():
        if "v" not in ref64_box:
            ref64_box["v"] = w.reference64() if w.reference64 is not None else None
        return ref64_box["v"]

    if w.setup is not None:
        w.setup()
    entries = []
    for n, fn in w.backends.items():
        kind = "reference" if n == "reference" else "backend"
        if n == "cpu" and cpu_isa:
            entries += [(kind, f"cpu[{lv}]", fn, lv) for lv in cpu_isa]
        else:
            entries.append((kind, n, fn, None))
    entries += [("anchor", n, fn, None) for n, fn in w.anchors.items()]
    try:
        for kind, label, fn, level in entries:
            name = "cpu" if level else label  # the workload's own per-backend settings
            bar.set(f"{op}: {w.name} / {label}")
            row = {"op": op, "workload": w.name, "group": w.group, "backend": label, "kind": kind,
                   "status": "ok", "reason": "", "params": w.params}
            if level:
                row["cpu_isa"] = level
            try:
                with _AtIsa(level):
                    times = time_call(fn, device, repeat, slow=name in w.slow)
                    out, nbytes = peak.measure(fn)
                _sync(device)
                row.update(times_s=times, median_s=statistics.median(times), min_s=min(times),
                           max_s=max(times), peak_extra_bytes=nbytes, max_abs_error=None)
                err_fn = w.row_error.get(name, w.error)
                if name not in w.no_error and err_fn is not None and w.reference64 is not None:
                    try:
                        e = err_fn(out, ref64())
                        row["max_abs_error"] = None if e is None else float(e)
                    except Exception as exc:  # an error function that cannot compare is not a timing failure
                        row["max_abs_error"] = None
                        row["reason"] = f"error not computed ({type(exc).__name__}: {exc})"
                del out
            except Exception as exc:
                row.update(status="error", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
            rows.append(row)
            bar.update()
    finally:
        ref64_box.clear()
        if w.teardown is not None:
            w.teardown()
    for name, why in w.skipped.items():
        kind = "anchor" if name in w.anchors else ("reference" if name == "reference" else "backend")
        rows.append({"op": op, "workload": w.name, "group": w.group, "backend": name, "kind": kind,
                     "status": "skipped", "reason": why, "params": w.params})
    _derive(rows, w)
    return rows


def _derive(rows: List[dict], w) -> None:
    ok = {r["backend"]: r for r in rows if r["status"] == "ok"}
    ref = ok.get("reference")
    anchor = w.anchor_name()
    anc = ok.get(anchor) if anchor else None
    for r in rows:
        r["anchor"] = anchor
        if r["status"] != "ok":
            continue
        t = r["median_s"]
        r["throughput"] = (w.work / t) if (w.work and t > 0) else None
        r["throughput_unit"] = w.work_unit if w.work else None
        r["speedup_vs_reference"] = (ref["median_s"] / t) if ref is not None else None
        r["speedup_vs_anchor"] = (anc["median_s"] / t) if anc is not None and r["backend"] != anchor else None
        r["vs_anchors"] = {a: ok[a]["median_s"] / t for a in w.anchors if a in ok and a != r["backend"]}


def evaluate_targets(rows: List[dict], w) -> List[dict]:
    ok = {r["backend"]: r for r in rows if r["status"] == "ok"}
    out = []
    for tgt in w.targets:
        for r in rows:
            if r["status"] != "ok" or r["kind"] == "anchor":
                continue
            key = "median_s" if tgt.metric == "time" else "peak_extra_bytes"
            mine = r.get(key)
            if tgt.other.startswith("bytes:"):
                other = w.sizes.get(tgt.other[len("bytes:"):])
            else:
                other = ok.get(tgt.other, {}).get(key)
            if mine is None or other is None:
                continue
            if tgt.metric == "memory":
                mine_f, other_f = max(mine, MEM_FLOOR), max(other, MEM_FLOOR)
            else:
                mine_f, other_f = mine, other
            value = mine_f / other_f if tgt.mode == "ratio" else other_f / mine_f
            met = value <= tgt.goal if tgt.mode == "ratio" else value >= tgt.goal
            out.append({"op": r["op"], "workload": w.name, "backend": r["backend"], "target": tgt.label,
                        "value": value, "goal": tgt.goal, "mode": tgt.mode, "met": bool(met)})
    return out


# ---------------------------------------------------------------------------
# Formatting


def _fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} us"


def _fmt_x(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:.0f}x" if x >= 100 else f"{x:.2f}x" if x < 10 else f"{x:.1f}x"


def _fmt_num(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.3g}"


def _fmt_mem(b: Optional[int]) -> str:
    if b is None:
        return "n/a"
    return f"{b / 2**20:.1f}"


def _fmt_err(e) -> str:
    return "-" if e is None else f"{e:.1e}"


def _table(headers: List[str], rows: List[List[str]], right: Tuple[int, ...] = ()) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells))

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep] + [line(r) for r in rows])


def format_results(rows: List[dict]) -> str:
    headers = ["op", "workload", "backend", "median", "min..max", "throughput", "vs ref", "vs anchor",
               "peak +MiB", "max err"]
    body = []
    for r in rows:
        if r["status"] == "skipped":
            continue
        name = r["backend"] if r["kind"] != "anchor" else f"[{r['backend']}]"
        if r["status"] == "error":
            body.append([r["op"], r["workload"], name, "FAILED", r["reason"][:60], "", "", "", "", ""])
            continue
        thr = "-" if r.get("throughput") is None else f"{_fmt_num(r['throughput'])} {r['throughput_unit']}"
        va = _fmt_x(r.get("speedup_vs_anchor"))
        if r.get("speedup_vs_anchor") is not None:
            va += f" ({r['anchor']})"
        body.append([r["op"], r["workload"], name, _fmt_time(r["median_s"]),
                     f"{_fmt_time(r['min_s'])}..{_fmt_time(r['max_s'])}", thr,
                     _fmt_x(r.get("speedup_vs_reference")), va, _fmt_mem(r.get("peak_extra_bytes")),
                     _fmt_err(r.get("max_abs_error"))])
    return _table(headers, body, right=(3, 5, 6, 8, 9))


def format_skips(rows: List[dict]) -> str:
    by: Dict[Tuple[str, str, str], List[str]] = {}
    for r in rows:
        if r["status"] == "skipped":
            by.setdefault((r["op"], r["backend"], r["reason"]), []).append(r["workload"])
    lines = []
    for (op, be, why), wls in by.items():
        where = wls[0] if len(wls) == 1 else f"{len(wls)} cases"
        lines.append(f"  {op} / {be} ({where}): {why}")
    return "\n".join(lines)


def format_targets(targets: List[dict]) -> str:
    if not targets:
        return ""
    body = [[t["workload"], t["backend"], t["target"], f"{t['value']:.3g}", "met" if t["met"] else "missed"]
            for t in targets]
    return _table(["workload", "backend", "target", "value", ""], body, right=(3,))


def format_extra(op: str, extra: dict) -> str:
    lines = [f"{op}: {extra.get('title', 'extra report')}"]
    rows = extra.get("rows") or []
    if rows:
        keys: List[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        if extra.get("columns"):  # the columns to print; the JSON keeps every key
            keys = [k for k in extra["columns"] if k in keys]

        def cell(v):
            return f"{v:.4f}" if isinstance(v, float) else str(v)

        lines.append(_table(keys, [[cell(r.get(k, "")) for k in keys] for r in rows]))
    for n in extra.get("notes") or []:
        lines.append(f"  note: {n}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Chart


def plot(path: str, rows: List[dict], extras: Dict[str, dict]) -> Optional[str]:
    """Write the PNG; return None, or why no chart was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        return f"matplotlib unavailable ({type(exc).__name__}: {exc}); no chart written"
    ok = [r for r in rows if r["status"] == "ok"]
    multi = len({r["op"] for r in ok}) > 1
    key = (lambda r: f"{r['op']}: {r['workload']}") if multi else (lambda r: r["workload"])
    all_cases = list(dict.fromkeys(key(r) for r in ok))
    names = list(dict.fromkeys((r["backend"] if r["kind"] != "anchor" else f"[{r['backend']}]") for r in ok))
    panels = [p for ex in extras.values() for p in (ex.get("panels") or [])]
    width = max(10.0, 0.75 * len(all_cases) + 3)
    fig, axes = plt.subplots(2 + len(panels), 1, figsize=(width, 4.2 * (2 + len(panels))), squeeze=False)
    axes = [a[0] for a in axes]
    cmap = plt.get_cmap("tab10")

    def grouped(ax, metric, title, ylabel, ref_line=None):
        # only the cases that have this metric (no speedup bars where the reference was not run)
        cases = [c for c in all_cases if any(key(r) == c and r.get(metric) for r in ok)]
        n = max(1, len(names))
        bw = 0.8 / n
        drawn = False
        for j, nm in enumerate(names):
            xs, ys = [], []
            for i, c in enumerate(cases):
                for r in ok:
                    label = r["backend"] if r["kind"] != "anchor" else f"[{r['backend']}]"
                    if label == nm and key(r) == c and r.get(metric):
                        xs.append(i - 0.4 + bw * (j + 0.5))
                        ys.append(r[metric])
            if xs:
                ax.bar(xs, ys, width=bw, label=nm, color=cmap(j % 10))
                drawn = True
        if drawn:
            ax.set_yscale("log")
        if ref_line is not None:
            ax.axhline(ref_line, color="k", lw=0.8, ls="--")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=7)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        if drawn:
            ax.legend(fontsize=7, ncol=min(4, n), loc="best", framealpha=0.6)
        ax.grid(axis="y", which="both", alpha=0.3)

    grouped(axes[0], "median_s", "median time per call (log; lower is better)", "seconds")
    grouped(axes[1], "speedup_vs_reference", "speedup vs embkern reference (log; higher is better)",
            "x reference", ref_line=1.0)
    for ax, p in zip(axes[2:], panels):
        xs = list(p.get("x") or [])
        series = p.get("series") or {}
        if p.get("kind", "line") == "bar":
            n = max(1, len(series))
            bw = 0.8 / n
            for j, (nm, ys) in enumerate(series.items()):
                ax.bar([i - 0.4 + bw * (j + 0.5) for i in range(len(ys))],
                       [0 if y is None else y for y in ys], width=bw, label=nm, color=cmap(j % 10))
            ax.set_xticks(range(len(xs)))
            ax.set_xticklabels([str(x) for x in xs], fontsize=8)
        else:
            for j, (nm, ys) in enumerate(series.items()):
                ax.plot(xs, ys, marker="o", label=nm, color=cmap(j % 10))
        if p.get("logx"):
            ax.set_xscale("log")
        if p.get("logy"):
            ax.set_yscale("log")
        ax.set_title(p.get("title", ""))
        ax.set_xlabel(p.get("xlabel", ""))
        ax.set_ylabel(p.get("ylabel", ""))
        if series:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ---------------------------------------------------------------------------
# CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--op", action="append", default=None, metavar="OP",
                   help="benchmark only this op (repeatable); default: every op in embkern.ops.OPS")
    p.add_argument("--quick", action="store_true", help="3 samples, B=1024 only for score_all, no slow baselines "
                                                        "there (~2 min on 2 cores)")
    p.add_argument("--json", default="bench.json", metavar="PATH", help="where to write results (default bench.json)")
    p.add_argument("--plot", default="bench.png", metavar="PATH", help="where to write the PNG chart "
                                                                       "(default bench.png; '' for none)")
    p.add_argument("--repeat", type=int, default=None, metavar="N", help="timed samples per row (default 7, --quick 3)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch and OpenMP threads (default: leave as is)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device of the inputs (default cpu)")
    p.add_argument("--cpu-isa", default=None, metavar="LEVELS",
                   help="time the cpu backend at each of these ISA levels, one row each: a comma list of "
                        "generic,avx2,avx512, or 'all' for every level this CPU runs (default: the active level)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--no-extra", action="store_true", help="skip the ops' extra reports (real-data runs)")
    # test-suite sizes: every case shrinks so the whole bench runs in seconds
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)


def _set_threads(n: int) -> Dict[str, Any]:
    import torch

    from . import _backends

    if n < 1:
        raise ValueError(f"--threads: expected >= 1, got {n}")
    torch.set_num_threads(n)
    mod, _ = _backends._load_cpu()
    if mod is not None and hasattr(mod, "set_num_threads"):
        mod.set_num_threads(n)
    return {"threads": n}


def _env_info(device) -> Dict[str, Any]:
    import torch

    import embkern

    from . import _backends

    info = {"embkern": embkern.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "device": str(device), "torch_threads": torch.get_num_threads()}
    mod, why = _backends._load_cpu()
    if mod is not None:
        try:
            bi = dict(mod.build_info())
            info["omp_threads"] = int(mod.get_num_threads()) if hasattr(mod, "get_num_threads") else bi.get(
                "omp_max_threads")
            info["cpu_isa"] = dict(bi.get("isa", {})).get("active")
        except Exception as exc:
            info["cpu_module"] = f"build_info failed: {exc}"
    else:
        info["cpu_module"] = why
    try:
        from .__main__ import cpu_model

        info["cpu"] = cpu_model()
    except Exception:
        info["cpu"] = platform.processor()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run(args: argparse.Namespace) -> int:
    if args.tiny:
        from ._bench import TINY_ENV

        os.environ[TINY_ENV] = "1"
    import torch

    from . import _bench

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.threads is not None:
        _set_threads(args.threads)
    repeat = args.repeat if args.repeat is not None else (3 if args.quick else 7)
    if repeat < 1:
        print(f"bench: --repeat: expected >= 1, got {repeat}", file=sys.stderr)
        return 2
    cpu_isa: List[str] = []
    if args.cpu_isa:
        from . import _backends

        try:
            runnable = list(_backends.cpu_module().isa_info()["available"])
        except RuntimeError as exc:
            print(f"bench: --cpu-isa: {exc}", file=sys.stderr)
            return 2
        cpu_isa = runnable if args.cpu_isa == "all" else [x.strip() for x in args.cpu_isa.split(",") if x.strip()]
        bad = [x for x in cpu_isa if x not in runnable]
        if bad or not cpu_isa:
            print(f"bench: --cpu-isa: expected levels this CPU runs ({', '.join(runnable)}) or 'all', got "
                  f"{args.cpu_isa!r}", file=sys.stderr)
            return 2
    try:
        mods, missing = _bench.discover(args.op)
    except ValueError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    peak = _CudaPeak() if device.type == "cuda" else _CpuPeak()
    started = time.time()

    cases = []
    for op, mod in mods.items():
        try:
            cases += [(op, w) for w in mod.workloads(args.quick, device)]
        except Exception as exc:
            missing[op] = f"workloads() failed ({type(exc).__name__}: {exc})"
    total = sum(len(w.backends) + len(w.anchors) + (len(cpu_isa) - 1 if cpu_isa and "cpu" in w.backends else 0)
                for _, w in cases)
    # torch (+ dynamo, pykeen, matplotlib) leave ~10^6 long-lived objects: a full gc.collect()
    # then costs ~0.6 s on 2 cores. Freezing them keeps the per-row collections cheap.
    gc.collect()
    gc.freeze()
    print(f"embkern bench: {len(cases)} cases, {total} timed rows, device {device}, repeat {repeat}"
          + (" (quick)" if args.quick else "") + (" (tiny sizes)" if _bench.tiny() else ""), file=sys.stderr)
    bar = _progress(total, not args.no_progress)
    rows: List[dict] = []
    targets: List[dict] = []
    notes: Dict[str, List[str]] = {}
    try:
        while cases:
            op, w = cases.pop(0)  # drop each case (and its inputs) once it has run
            r = run_workload(op, w, device, repeat, peak, bar, cpu_isa)
            rows += r
            targets += evaluate_targets(r, w)
            for n in w.notes:
                if n not in notes.setdefault(op, []):
                    notes[op].append(n)
            del w
    finally:
        bar.close()
        # Unfrozen, the objects are collected at exit as usual (frozen, extension modules such
        # as triton's nanobind bindings report them as leaks).
        gc.unfreeze()

    extras: Dict[str, dict] = {}
    if not args.no_extra:
        for op, mod in mods.items():
            fn = getattr(mod, "extra_report", None)
            if fn is None:
                continue
            print(f"embkern bench: {op} extra report ...", file=sys.stderr)
            try:
                extras[op] = fn(args.quick)
            except Exception as exc:
                extras[op] = {"title": "extra report", "rows": [], "panels": [],
                              "notes": [f"failed ({type(exc).__name__}: {exc})"]}

    elapsed = time.time() - started
    env = _env_info(device)
    print()
    print(f"embkern {env['embkern']} | torch {env['torch']} | {env.get('cpu', '')} | device {device} | "
          f"torch threads {env['torch_threads']}, OpenMP threads {env.get('omp_threads', '-')} | "
          f"repeat {repeat} | {elapsed:.0f} s")
    print(format_results(rows))
    print("\n[name] = anchor (outside baseline). vs ref / vs anchor: speedup (>1 = faster). peak +MiB: "
          + ("n/a: " + peak.reason if not peak.ok else peak.method) + ". max err: vs float64 reference.")
    skips = format_skips(rows)
    if skips:
        print("\nNot timed:\n" + skips)
    if missing:
        print("\nOps without benchmarks:\n" + "\n".join(f"  {op}: {why}" for op, why in missing.items()))
    t = format_targets(targets)
    if t:
        print("\nTargets (not asserted; they are goals for the fused backends, reference rows are context):\n" + t)
    for op, ns in notes.items():
        print(f"\nNotes ({op}):\n" + "\n".join(f"  - {n}" for n in ns))
    for op, ex in extras.items():
        print("\n" + format_extra(op, ex))

    result = {
        "schema": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "env": env,
        "options": {"ops": list(mods), "quick": bool(args.quick), "repeat": repeat, "device": str(device),
                    "tiny": _bench.tiny(), "threads": args.threads, "cpu_isa": cpu_isa or None},
        "memory_method": peak.method if peak.ok else f"n/a: {peak.reason}",
        "timing_method": (f"warm-up, then {repeat} samples (<= {SLOW_REPEAT} for calls over {SLOW_CALL_S} s); "
                          f"each sample >= {MIN_SAMPLE_S * 1e3:.0f} ms of back-to-back calls"),
        "elapsed_s": elapsed,
        "results": rows,
        "targets": targets,
        "notes": notes,
        "missing_ops": missing,
        "extra": extras,
    }
    if args.json:
        d = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(d, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(_clean(result), f, indent=1, default=_json_default, allow_nan=False)
        print(f"\nwrote {args.json}")
    if args.plot:
        why = plot(args.plot, rows, extras)
        print(f"wrote {args.plot}" if why is None else f"no chart: {why}")
    return 0


def _clean(o):
    """inf / NaN -> None, recursively (JSON has neither)."""
    if isinstance(o, float):
        return None if (math.isinf(o) or math.isnan(o)) else o
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def _json_default(o):
    try:
        import torch

        if isinstance(o, torch.Tensor):
            return o.tolist()
        if isinstance(o, (torch.dtype, torch.device)):
            return str(o)
    except Exception:
        pass
    return str(o)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m embkern bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
