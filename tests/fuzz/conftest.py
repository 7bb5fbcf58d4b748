"""Fuzz-suite settings: a derandomized hypothesis profile with a fixed example budget, the worker
process, and the case count printed at the end of the session.

``EMBKERN_FUZZ_EXAMPLES`` sets max_examples per test (default 200: the whole
suite in well under 4 minutes on 2 cores); ``EMBKERN_FUZZ_SHRINK=1`` turns on
shrinking (off by default: a crash costs a worker restart per shrink step);
``EMBKERN_FUZZ_MEM_GB`` the worker's address-space limit (default 3; 0 = none).
"""

import os
import sys

import pytest
from hypothesis import HealthCheck, Phase, settings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _fuzz_harness  # noqa: E402

EXAMPLES = int(os.environ.get("EMBKERN_FUZZ_EXAMPLES", "200"))
_phases = (Phase.explicit, Phase.reuse, Phase.generate, Phase.target)
if os.environ.get("EMBKERN_FUZZ_SHRINK") == "1":
    _phases = _phases + (Phase.shrink,)

settings.register_profile(
    "embkern-fuzz",
    derandomize=True,
    deadline=None,
    max_examples=EXAMPLES,
    database=None,
    phases=_phases,
    print_blob=False,
    suppress_health_check=(HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much),
)
settings.load_profile(os.environ.get("EMBKERN_FUZZ_PROFILE", "embkern-fuzz"))

os.environ.setdefault("EMBKERN_FUZZ_MEM_GB", "3")


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.fuzz)


def pytest_sessionfinish(session, exitstatus):
    _fuzz_harness.shutdown()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    s = _fuzz_harness.STATS
    if not s["cases"]:
        return
    tr = terminalreporter
    tr.section("embkern fuzz")
    tr.write_line(f"fuzz cases run: {s['cases']} (failed {s['failed']}: crashed {s['crashed']}, timed out "
                  f"{s['timed_out']}; worker restarts {s['restarts']}; {EXAMPLES} examples per test)")
    for name, n in sorted(s["by_executor"].items()):
        tr.write_line(f"  {name}: {n}")
