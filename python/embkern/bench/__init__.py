"""``python -m embkern bench``: the benchmark package.

* :mod:`embkern.bench.workload`: what a case is (:class:`Workload`,
  :class:`Target`) and :func:`discover`, which finds one workload module per op;
* :mod:`embkern.bench.timing`: timing and peak memory of one call, shared with
  the pytest-benchmark sweeps and the GPU check under ``benchmarks/``;
* :mod:`embkern.bench.report`: the table, chart and JSON;
* :mod:`embkern.bench.runner`: the CLI (``add_arguments``, ``run``, ``main``);
* ``embkern.bench.<op>``: each op's workloads (``hypercomplex``, ``fde``, ...).
"""

from .runner import add_arguments, main, run  # noqa: F401
from .workload import TINY_ENV, Extra, Target, Workload, discover, op_names, tiny  # noqa: F401

__all__ = ["Workload", "Target", "Extra", "discover", "op_names", "tiny", "TINY_ENV", "add_arguments", "run", "main"]
