"""What the bench prints and draws: the result table, skips, targets, extra reports, the PNG chart, JSON.

Every embkern table goes through :func:`table` (text or markdown): the bench,
``python -m embkern info`` and ``benchmarks/gpu/timing.py``.
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple


def fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} us"


def fmt_x(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:.0f}x" if x >= 100 else f"{x:.2f}x" if x < 10 else f"{x:.1f}x"


def fmt_num(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.3g}"


def fmt_mem(b: Optional[int]) -> str:
    if b is None:
        return "n/a"
    return f"{b / 2**20:.1f}"


def fmt_err(e) -> str:
    return "-" if e is None else f"{e:.1e}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Tuple[int, ...] = (),
          markdown: bool = False) -> str:
    """The one table formatter: aligned text columns, or a GitHub markdown table (``markdown=True``).

    ``right``: indices of right-aligned columns (numbers). Cells are ``str()``-ed;
    in markdown a ``|`` inside a cell is escaped.
    """
    cells = [[str(c) for c in r] for r in rows]
    if markdown:
        esc = [[c.replace("|", "\\|") for c in r] for r in cells]
        out = ["| " + " | ".join(headers) + " |",
               "|" + "|".join("---:" if i in right else "---" for i in range(len(headers))) + "|"]
        return "\n".join(out + ["| " + " | ".join(r) + " |" for r in esc])
    widths = [max([len(h)] + [len(r[i]) for r in cells if i < len(r)]) for i, h in enumerate(headers)]

    def line(cs):
        return "  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cs)).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep] + [line(r) for r in cells])


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
        thr = "-" if r.get("throughput") is None else f"{fmt_num(r['throughput'])} {r['throughput_unit']}"
        va = fmt_x(r.get("speedup_vs_anchor"))
        if r.get("speedup_vs_anchor") is not None:
            va += f" ({r['anchor']})"
        body.append([r["op"], r["workload"], name, fmt_time(r["median_s"]),
                     f"{fmt_time(r['min_s'])}..{fmt_time(r['max_s'])}", thr,
                     fmt_x(r.get("speedup_vs_reference")), va, fmt_mem(r.get("peak_extra_bytes")),
                     fmt_err(r.get("max_abs_error"))])
    return table(headers, body, right=(3, 5, 6, 8, 9))


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
    return table(["workload", "backend", "target", "value", ""], body, right=(3,))


def _rows_table(rows: List[dict], columns=None) -> str:
    keys: List[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    if columns:  # the columns to print; the JSON keeps every key
        keys = [k for k in columns if k in keys]

    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    return table(keys, [[cell(r.get(k, "")) for k in keys] for r in rows])


def format_extra(op: str, extra: dict) -> str:
    """An extra report: its rows, then each of its ``tables`` ({"title", "rows"}: a second table with
    other columns), then its notes."""
    lines = [f"{op}: {extra.get('title', 'extra report')}"]
    rows = extra.get("rows") or []
    if rows:
        lines.append(_rows_table(rows, extra.get("columns")))
    for t in extra.get("tables") or []:
        if t.get("rows"):
            lines.append(f"{op}: {t.get('title', '')}")
            lines.append(_rows_table(t["rows"], t.get("columns")))
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
# JSON


def clean(o):
    """inf / NaN -> None, recursively (JSON has neither)."""
    if isinstance(o, float):
        return None if (math.isinf(o) or math.isnan(o)) else o
    if isinstance(o, dict):
        return {str(k): clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [clean(v) for v in o]
    return o


def json_default(o):
    """``json.dump(default=)``: tensors as lists, dtypes and devices as names, anything else as str()."""
    try:
        import torch

        if isinstance(o, torch.Tensor):
            return o.tolist()
        if isinstance(o, (torch.dtype, torch.device)):
            return str(o)
    except Exception:
        pass
    return str(o)
