"""Timing and peak memory of one call: the measurement code every embkern timing harness shares.

Used by ``python -m embkern bench`` (:mod:`embkern.bench.runner`), the
pytest-benchmark sweeps under ``benchmarks/`` (their :func:`sync` and peak
meters) and ``benchmarks/gpu/timing.py`` (CPU smoke timings and CUDA peaks).

* time (:func:`time_call`): one warm-up call (two for calls under 50 ms:
  first-call caches, lazy inits, thread pools), then ``repeat`` samples. A
  sample averages enough back-to-back calls to last >= 1 ms (sub-millisecond
  cases would otherwise measure the timer). Rows whose warm-up call takes
  > 1 s (or that are marked slow) take at most 3 samples, so multi-second
  baselines such as PyKEEN's einsum cost ~4 calls, not 8. :func:`summary`
  gives min / median / max; times are reported, never asserted.
* peak extra memory of one more call (:func:`peak_meter`):

  - CPU (:class:`CpuPeak`): the process's peak resident set, re-armed around
    the call. We ``gc.collect()``, return freed heap pages to the kernel with
    glibc's ``malloc_trim(0)`` (otherwise memory freed by an earlier row
    would be reused invisibly and the peak under-counted), write ``5`` to
    ``/proc/self/clear_refs`` (Linux >= 4.0: resets VmHWM to the current
    RSS), read VmRSS, call, and report VmHWM - VmRSS. It counts everything
    the call touches -- outputs, temporaries, OpenMP thread buffers -- at
    page granularity; it cannot see memory already resident before the
    call. Without /proc (macOS, restricted containers) it reports None.
    A subprocess per row would be cleaner but costs a torch import (~2 s)
    and a second copy of the inputs per row.
  - CUDA (:class:`CudaPeak`): ``torch.cuda.max_memory_allocated()`` after
    ``reset_peak_memory_stats()``, minus the allocation before the call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import math
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

SLOW_CALL_S = 1.0
MIN_SAMPLE_S = 1e-3
MAX_INNER = 1000
SLOW_REPEAT = 3
MEM_FLOOR = 64 * 1024  # bytes; ratios against a near-zero peak are reported against this floor

TIMING_METHOD = ("warm-up, then {repeat} samples (<= %d for calls over %g s); each sample >= %.0f ms of back-to-back "
                 "calls" % (SLOW_REPEAT, SLOW_CALL_S, MIN_SAMPLE_S * 1e3))


class CpuPeak:
    """Peak extra resident memory of one call (see the module docstring); ``ok`` False: not measurable here."""

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
        gc.collect(1)  # young generations only: the runner froze the import-time heap (gc.freeze)
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


class CudaPeak:
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




def sync(device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on the CPU. ``device``: a torch.device or its name."""
    if getattr(device, "type", device) == "cuda":
        import torch

        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], device, repeat: int, slow: bool = False) -> List[float]:
    """Seconds per call, ``repeat`` samples: warm-up, then each sample averages >= 1 ms of calls.

    Rows marked ``slow`` or whose first call takes over 1 s get at most 3 samples (module docstring)."""
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    first = time.perf_counter() - t0
    del out
    if first < 0.05:  # a second warm-up for cheap calls: first-call caches, lazy inits, thread pools
        fn()
        sync(device)
    if slow or first > SLOW_CALL_S:
        repeat = min(repeat, SLOW_REPEAT)
    inner = 1 if first >= MIN_SAMPLE_S else min(MAX_INNER, max(1, int(math.ceil(MIN_SAMPLE_S / max(first, 1e-7)))))
    samples = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn()
        sync(device)
        samples.append((time.perf_counter() - t0) / inner)
        del out
    return samples




def summary(samples: Sequence[float]) -> Dict[str, float]:
    """min / median / max of timing samples (seconds)."""
    return {"min_s": min(samples), "median_s": statistics.median(samples), "max_s": max(samples)}


def peak_meter(device):
    """The peak-memory meter for inputs on ``device`` (:class:`CudaPeak` or :class:`CpuPeak`)."""
    return CudaPeak() if getattr(device, "type", device) == "cuda" else CpuPeak()


class AtIsa:
    """Runs the C++ kernels at one ISA level inside the block (``bench --cpu-isa``); None: as they are."""

    def __init__(self, level: Optional[str]):
        self.level, self.before = level, None

    def __enter__(self):
        if self.level:
            from .. import _backends

            mod = _backends.cpu_module()
            self.before = mod.isa_info()["active"]
            mod.set_isa(self.level)

    def __exit__(self, *exc):
        if self.level and self.before:
            from .. import _backends

            _backends.cpu_module().set_isa(self.before)


def set_threads(n: int) -> Dict[str, Any]:
    """torch's and embkern's OpenMP thread count (``bench --threads``)."""
    import torch

    from .. import _backends

    if n < 1:
        raise ValueError(f"--threads: expected >= 1, got {n}")
    torch.set_num_threads(n)
    mod, _ = _backends._load_cpu()
    if mod is not None and hasattr(mod, "set_num_threads"):
        mod.set_num_threads(n)
    return {"threads": n}
