"""What a benchmark case is (:class:`Workload`, :class:`Target`) and where the cases come from.

One module per op in this package, named after the op's key in
:data:`embkern.ops.OPS` (``embkern.bench.hypercomplex``, ``embkern.bench.fde``,
...). Each exposes::

    def workloads(quick: bool, device: torch.device) -> list[Workload]: ...
    def extra_report(quick: bool) -> dict: ...        # optional

``workloads`` builds the timed cases; it should keep tensors lazy or shared
(a dozen FB15k-237-sized cases would otherwise hold hundreds of MB at once)
and list the backends it cannot run in ``Workload.skipped`` with the reason.
``extra_report`` returns things that are not timings (real-data metrics);
see :class:`Extra` for the keys the bench prints and plots.

Test runs set ``EMBKERN_BENCH_TINY=1`` (the hidden ``--tiny`` flag): op
modules then shrink every size so the whole bench finishes in seconds; read
it with :func:`tiny`.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

TINY_ENV = "EMBKERN_BENCH_TINY"


def tiny() -> bool:
    """True when the bench runs at test sizes (``--tiny`` / ``EMBKERN_BENCH_TINY=1``)."""
    return os.environ.get(TINY_ENV, "0") not in ("", "0")


@dataclass
class Target:
    """A goal a backend row is measured against (printed as met / missed, never asserted).

    ``mode="ratio"``:   value = backend / other       (met when value <= goal)
    ``mode="speedup"``: value = other / backend       (met when value >= goal)
    ``metric`` is ``"time"`` (median seconds) or ``"memory"`` (peak extra bytes).
    ``other`` names an anchor of the same workload, or ``"bytes:<label>"`` with
    the byte count in ``Workload.sizes[<label>]`` (e.g. a B x N buffer).
    """

    label: str
    other: str
    metric: str = "time"
    mode: str = "speedup"
    goal: float = 1.0


@dataclass
class Workload:
    """One timed case: every backend and anchor runs the same inputs.

    Attributes:
        name: short, unique within the op, e.g. ``"score_all inner/quaternion B=128"``.
        group: the API function it times (``"score_all"``); the chart groups by it.
        description: one line for the JSON (shapes, dtype, what is timed).
        backends: embkern backend name -> zero-arg callable running it. The
            ``"reference"`` entry is the baseline of the "vs ref" column.
        anchors: outside baseline name -> zero-arg callable (torch.mm of the
            same GEMM, PyKEEN's formulation, ...).
        primary_anchor: the anchor of the "vs anchor" column (default: first).
        reference64: zero-arg callable returning the float64 reference output.
        error: (output, reference64 output) -> max abs error. Applied to
            backends and anchors alike; an anchor whose output is not
            comparable leaves it None (see ``no_error``).
        row_error: name -> error function overriding ``error`` for that row
            (e.g. an anchor with the opposite sign convention).
        work: amount of work per call in ``work_unit`` (throughput = work / median s).
        work_unit: e.g. ``"GFLOP/s"`` (work in GFLOP) or ``"Mitems/s"``.
        params: sizes for the JSON (B, N, K, dtype...).
        sizes: named byte counts that targets can compare memory against.
        targets: goals printed after the table.
        skipped: backend or anchor name -> why it is not timed here.
        notes: free text printed under the table.
        no_error: names whose output is not comparable to the reference
            (e.g. a bare GEMM anchor).
        slow: names that run at most ``slow_repeat`` times (multi-second baselines).
        setup / teardown: optional zero-arg callables run around the case, so
            a module can allocate its inputs lazily and free them after.
    """

    name: str
    group: str
    description: str
    backends: Dict[str, Callable[[], Any]]
    anchors: Dict[str, Callable[[], Any]] = field(default_factory=dict)
    primary_anchor: Optional[str] = None
    reference64: Optional[Callable[[], Any]] = None
    error: Optional[Callable[[Any, Any], float]] = None
    row_error: Dict[str, Callable[[Any, Any], float]] = field(default_factory=dict)
    work: float = 0.0
    work_unit: str = "GFLOP/s"
    params: Dict[str, Any] = field(default_factory=dict)
    sizes: Dict[str, int] = field(default_factory=dict)
    targets: List[Target] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    no_error: Tuple[str, ...] = ()
    slow: Tuple[str, ...] = ()
    setup: Optional[Callable[[], None]] = None
    teardown: Optional[Callable[[], None]] = None

    def anchor_name(self) -> Optional[str]:
        if self.primary_anchor is not None:
            return self.primary_anchor
        return next(iter(self.anchors), None)


# What `extra_report` returns (plain dict, JSON-serialisable):
#   {"title": str,
#    "rows": [ {column: value, ...}, ... ],         # printed as a table after the timings
#    "notes": [str, ...],                            # printed under it (skips, reasons)
#    "columns": [str, ...],                          # optional: the row keys to print (JSON keeps all)
#    "panels": [ {"title": str, "kind": "bar"|"line", "x": [..], "series": {name: [..]},
#                 "xlabel": str, "ylabel": str, "logx": bool, "logy": bool}, ... ]}  # extra chart panels
Extra = Dict[str, Any]


def op_names() -> List[str]:
    from ..ops import OPS

    return list(OPS)


def discover(ops: Optional[List[str]] = None) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """(op -> workload module, op -> why it has none) for the ops in embkern.ops.OPS."""
    names = op_names()
    if ops:
        unknown = [o for o in ops if o not in names]
        if unknown:
            raise ValueError(f"op: expected one of {names}, got {unknown[0]!r}")
        names = [o for o in names if o in ops]
    found, missing = {}, {}
    for name in names:
        modname = f"{__package__}.{name}"
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name == modname:
                missing[name] = f"no workload module {modname} yet"
                continue
            missing[name] = f"{modname} failed to import ({type(exc).__name__}: {exc})"
            continue
        except Exception as exc:  # a broken workload module must not stop the other ops
            missing[name] = f"{modname} failed to import ({type(exc).__name__}: {exc})"
            continue
        if not callable(getattr(mod, "workloads", None)):
            missing[name] = f"{modname} has no workloads(quick, device) function"
            continue
        found[name] = mod
    return found, missing


__all__ = ["Workload", "Target", "Extra", "discover", "op_names", "tiny", "TINY_ENV"]
