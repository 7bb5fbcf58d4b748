"""Crash isolation for the fuzz suite: every case runs in a worker process.

The parent (pytest) sends a case -- the name of an executor in
``_fuzz_cases`` and a plain-data spec (dicts, tuples, numbers, strings, small
numpy arrays) -- to one long-lived worker and waits for its verdict. The
worker builds the inputs from the spec, makes the call, checks the property
and answers ``("ok", note)`` or ``("fail", message)``. If the worker dies (a
signal: SIGSEGV, SIGABRT, ...) or does not answer within the case timeout,
the parent restarts it and the case FAILS with its spec and the tail of the
worker's stderr, so a crash is a test failure that prints the input, never a
dead test run.

The worker limits its address space (``EMBKERN_FUZZ_MEM_GB``, default 6 GiB;
0 turns the limit off, as it must be under ASan) so that a claimed size the
library fails to refuse up front cannot take the machine's memory: the
allocation fails instead and the property check reports it.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CASE_TIMEOUT_S = float(os.environ.get("EMBKERN_FUZZ_CASE_TIMEOUT", "30"))

STATS = {"cases": 0, "failed": 0, "crashed": 0, "timed_out": 0, "restarts": 0, "by_executor": {}}


def _send(fd, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    msg = struct.pack("<Q", len(data)) + data
    view = memoryview(msg)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_exact(fd, n: int, deadline: float):
    buf = bytearray()
    while len(buf) < n:
        left = None if deadline == float("inf") else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise TimeoutError
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            raise TimeoutError
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def _recv(fd, deadline: float):
    (n,) = struct.unpack("<Q", _read_exact(fd, 8, deadline))
    return pickle.loads(_read_exact(fd, n, deadline))


def _signame(rc: int) -> str:
    if rc is None:
        return "still running"
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exited with status {rc}"


class Worker:
    """One worker process; restarted after a crash or a timeout."""

    def __init__(self):
        self.proc = None
        self.err = None

    def start(self):
        self.err = tempfile.TemporaryFile()
        env = dict(os.environ)
        env.setdefault("TRITON_INTERPRET", "1")
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "_fuzz_worker.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.err, env=env, cwd=HERE)
        # the worker says hello once embkern is imported
        msg = _recv(self.proc.stdout.fileno(), time.monotonic() + 120)
        if msg != ("ready",):
            raise RuntimeError(f"fuzz worker failed to start: {msg!r}")

    def stderr_tail(self, n: int = 3000) -> str:
        if self.err is None:
            return ""
        self.err.seek(0, os.SEEK_END)
        size = self.err.tell()
        self.err.seek(max(0, size - n))
        return self.err.read().decode("utf-8", "replace")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def _kill(self):
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
        rc = self.proc.returncode if self.proc is not None else None
        self.proc = None
        STATS["restarts"] += 1
        return rc

    def run(self, executor: str, spec, timeout: float | None = None):
        """('ok'|'fail'|'crash'|'timeout', message)."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        # mark where this case's stderr starts
        self.err.seek(0, os.SEEK_END)
        start = self.err.tell()
        try:
            _send(self.proc.stdin.fileno(), (executor, spec))
            return _recv(self.proc.stdout.fileno(), time.monotonic() + (timeout or CASE_TIMEOUT_S))
        except TimeoutError:
            rc = self._kill()
            return ("timeout", f"no answer within {timeout or CASE_TIMEOUT_S:.0f} s ({_signame(rc)}); stderr:\n"
                    + self._err_since(start))
        except (EOFError, BrokenPipeError, OSError):
            time.sleep(0.05)
            rc = self._kill()
            return ("crash", f"worker {_signame(rc)}; stderr:\n" + self._err_since(start))

    def _err_since(self, start: int) -> str:
        self.err.seek(start)
        text = self.err.read().decode("utf-8", "replace")
        return text[-4000:]


_WORKER = None


def worker() -> Worker:
    global _WORKER
    if _WORKER is None:
        _WORKER = Worker()
    return _WORKER


def shutdown():
    if _WORKER is not None:
        _WORKER.stop()


def check(executor: str, spec, timeout: float | None = None) -> None:
    """Run one case in the worker; raise AssertionError (with the spec) unless the property held."""
    STATS["cases"] += 1
    STATS["by_executor"][executor] = STATS["by_executor"].get(executor, 0) + 1
    status, msg = worker().run(executor, spec, timeout)
    if status == "ok":
        return
    STATS["failed"] += 1
    if status == "crash":
        STATS["crashed"] += 1
    if status == "timeout":
        STATS["timed_out"] += 1
    raise AssertionError(f"[{status.upper()}] {executor}\n  spec = {spec!r}\n  {msg}")
