"""The fuzz worker: reads (executor, spec) cases from stdin, answers verdicts on stdout.

Started by ``_fuzz_harness.Worker``; not a test module. Protocol: 8-byte
little-endian length + pickle, both ways. File descriptor 1 is moved away
from the protocol pipe first, so C-level prints cannot corrupt it.
"""

import os
import resource
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    proto_out = os.dup(1)
    os.dup2(2, 1)  # stray prints go to stderr
    proto_in = 0
    mem_gb = float(os.environ.get("EMBKERN_FUZZ_MEM_GB", "6"))
    if "asan" in os.environ.get("LD_PRELOAD", ""):
        mem_gb = 0  # ASan reserves terabytes of shadow address space
    if mem_gb > 0:
        lim = int(mem_gb * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    sys.path.insert(0, HERE)
    import _fuzz_harness as h  # noqa: E402  (framing helpers)

    try:
        import _fuzz_cases as cases  # noqa: E402  (imports torch, numpy, embkern)
    except BaseException:
        h._send(proto_out, ("import failed", traceback.format_exc()))
        return
    h._send(proto_out, ("ready",))
    while True:
        try:
            executor, spec = h._recv(proto_in, float("inf"))
        except EOFError:
            return
        try:
            note = cases.EXECUTORS[executor](spec)
            verdict = ("ok", note)
        except AssertionError as e:
            verdict = ("fail", str(e))
        except BaseException:  # a bug in the harness or an escaped exception: a failure, with its traceback
            verdict = ("fail", "unexpected exception escaped the property check:\n" + traceback.format_exc()[-3000:])
        finally:
            cases.restore_globals()
        h._send(proto_out, verdict)


if __name__ == "__main__":
    main()
