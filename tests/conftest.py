"""Shared test set-up: tests run against the INSTALLED embkern package.

Triton kernels run on the CPU through the Triton interpreter when no GPU is
present; TRITON_INTERPRET is set here, once, before triton is first imported.
Helpers shared by test files (backends, skip policy, data, oracles) are in
helpers.py.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import embkern  # noqa: E402
from embkern import _backends  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_report_header(config):
    info = embkern._backends.cpu_status()
    return [f"embkern {embkern.__version__} from {os.path.dirname(embkern.__file__)}; _C: "
            f"{'ok' if info.ok else info.reason}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"]


# make test-sanitize preloads ASan, whose shadow memory needs terabytes of
# address space: an RLIMIT_AS child cannot even start under it. Those tests
# run in the plain `make test`.
UNDER_ASAN = "libasan" in os.environ.get("LD_PRELOAD", "")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    skip_asan = pytest.mark.skip(reason="RLIMIT_AS child under ASan (terabytes of shadow memory): run by make test")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)
        if "address_space" in item.keywords and UNDER_ASAN:
            item.add_marker(skip_asan)


def _cpu_settings():
    st = _backends.cpu_status()
    if not st.ok:
        return None
    C = _backends.cpu_module()
    return C, C.isa_info()["active"], C.get_num_threads()


@pytest.fixture(autouse=True)
def _cpu_settings_unchanged():
    """Fail a test that leaves embkern._C's ISA level or thread count changed (and restore them).

    Both are process-wide: under `make test`'s EMBKERN_CPU_ISA=avx2 / generic runs, a
    test that restored the CPU's best level instead of the active one ran every later
    test of the process at avx512 (helpers.cpu_isa / cpu_threads restore correctly).
    """
    before = _cpu_settings()
    yield
    if before is None:
        return
    C, isa, threads = before
    now_isa, now_threads = C.isa_info()["active"], C.get_num_threads()
    if (now_isa, now_threads) != (isa, threads):
        C.set_isa(isa)
        C.set_num_threads(threads)
        pytest.fail(f"the test left embkern._C at ISA level {now_isa!r} and {now_threads} threads; it started "
                    f"at {isa!r} and {threads} (use helpers.cpu_isa / helpers.cpu_threads)")
