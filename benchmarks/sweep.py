"""How every sweep point is timed: pytest-benchmark rounds plus what ``python -m embkern bench`` records.

The device sync and the peak-memory meter are the bench's own
(:mod:`embkern.bench.timing`), so a sweep point and a bench row measure the
same thing.
"""

import torch

from embkern.bench import timing


def run_benchmark(benchmark, fn, device, *, group, rounds, work=None, work_key=None, **info):
    """Time ``fn`` with pytest-benchmark (``rounds`` rounds, one warm-up) and record what the bench records.

    ``extra_info`` gets ``info``, the peak extra memory of one more call
    (``peak_extra_mib``, :func:`embkern.bench.timing.peak_meter`; None where it
    cannot be measured) and, with ``work`` (units per call) and ``work_key``
    (e.g. ``"gflops_per_s"``), the throughput at the median time.
    """

    def call():
        out = fn()
        timing.sync(device)
        return out

    benchmark.group = group
    benchmark.extra_info.update(info)
    out = benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
    stats = getattr(benchmark, "stats", None)
    median = getattr(getattr(stats, "stats", None), "median", None)
    if work is not None and median:
        benchmark.extra_info[work_key] = work / median
    if getattr(benchmark, "enabled", True):  # --benchmark-disable: one smoke call, nothing to record
        _, nbytes = timing.peak_meter(torch.device(device)).measure(call)
        benchmark.extra_info["peak_extra_mib"] = None if nbytes is None else nbytes / 2**20
    return out
