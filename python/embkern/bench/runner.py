"""``python -m embkern bench``: reference vs fast backends vs outside anchors, one table.

Every op with a workload module in :mod:`embkern.bench` contributes cases
(``workloads(quick, device)``, :mod:`embkern.bench.workload`); each case runs
every available embkern backend and every anchor on the same inputs and
records, per row:

* time: min / median / max of ``repeat`` samples (default 7, ``--quick`` 3),
  measured as :mod:`embkern.bench.timing` describes; reported, never asserted.
* peak extra memory of one more call (:mod:`embkern.bench.timing`).
* max error: max |output - reference run in float64 on upcast inputs|, by
  the case's error function (e.g. values only for top-k).

Output (:mod:`embkern.bench.report`): the table on stdout, ``bench.json``
(``--json``), a PNG chart (``--plot``; matplotlib Agg): median time per case
and speedup vs the reference, on log axes, plus any panels the ops'
``extra_report`` add.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from .. import _env
from .._progress import Progress
from . import report, timing, workload


# ---------------------------------------------------------------------------
# One case


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
                with timing.AtIsa(level):
                    times = timing.time_call(fn, device, repeat, slow=name in w.slow)
                    out, nbytes = peak.measure(fn)
                timing.sync(device)
                row.update(times_s=times, **timing.summary(times), peak_extra_bytes=nbytes, max_abs_error=None)
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
                mine_f, other_f = max(mine, timing.MEM_FLOOR), max(other, timing.MEM_FLOOR)
            else:
                mine_f, other_f = mine, other
            value = mine_f / other_f if tgt.mode == "ratio" else other_f / mine_f
            met = value <= tgt.goal if tgt.mode == "ratio" else value >= tgt.goal
            out.append({"op": r["op"], "workload": w.name, "backend": r["backend"], "target": tgt.label,
                        "value": value, "goal": tgt.goal, "mode": tgt.mode, "met": bool(met)})
    return out


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


def run(args: argparse.Namespace) -> int:
    if args.tiny:
        os.environ[workload.TINY_ENV] = "1"
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.threads is not None:
        timing.set_threads(args.threads)
    repeat = args.repeat if args.repeat is not None else (3 if args.quick else 7)
    if repeat < 1:
        print(f"bench: --repeat: expected >= 1, got {repeat}", file=sys.stderr)
        return 2
    cpu_isa: List[str] = []
    if args.cpu_isa:
        from .. import _backends

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
        mods, missing = workload.discover(args.op)
    except ValueError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    peak = timing.peak_meter(device)
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
          + (" (quick)" if args.quick else "") + (" (tiny sizes)" if workload.tiny() else ""), file=sys.stderr)
    bar = Progress(total, desc="bench", unit="row", enabled=not args.no_progress, leave=False)
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
    env = _env.bench_env(device)
    print()
    print(f"embkern {env['embkern']} | torch {env['torch']} | {env.get('cpu', '')} | device {device} | "
          f"torch threads {env['torch_threads']}, OpenMP threads {env.get('omp_threads', '-')} | "
          f"repeat {repeat} | {elapsed:.0f} s")
    print(report.format_results(rows))
    print("\n[name] = anchor (outside baseline). vs ref / vs anchor: speedup (>1 = faster). peak +MiB: "
          + ("n/a: " + peak.reason if not peak.ok else peak.method) + ". max err: vs float64 reference.")
    skips = report.format_skips(rows)
    if skips:
        print("\nNot timed:\n" + skips)
    if missing:
        print("\nOps without benchmarks:\n" + "\n".join(f"  {op}: {why}" for op, why in missing.items()))
    t = report.format_targets(targets)
    if t:
        print("\nTargets (not asserted; they are goals for the fused backends, reference rows are context):\n" + t)
    for op, ns in notes.items():
        print(f"\nNotes ({op}):\n" + "\n".join(f"  - {n}" for n in ns))
    for op, ex in extras.items():
        print("\n" + report.format_extra(op, ex))

    result = {
        "schema": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "env": env,
        "options": {"ops": list(mods), "quick": bool(args.quick), "repeat": repeat, "device": str(device),
                    "tiny": workload.tiny(), "threads": args.threads, "cpu_isa": cpu_isa or None},
        "memory_method": peak.method if peak.ok else f"n/a: {peak.reason}",
        "timing_method": timing.TIMING_METHOD.format(repeat=repeat),
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
            json.dump(report.clean(result), f, indent=1, default=report.json_default, allow_nan=False)
        print(f"\nwrote {args.json}")
    if args.plot:
        why = report.plot(args.plot, rows, extras)
        print(f"wrote {args.plot}" if why is None else f"no chart: {why}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m embkern bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
