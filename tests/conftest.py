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
