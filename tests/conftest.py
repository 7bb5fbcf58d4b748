"""Shared test set-up: tests run against the INSTALLED embkern package.

Triton kernels run on the CPU through the Triton interpreter when no GPU is
present; TRITON_INTERPRET must be set before triton is first imported.
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


def backend_params(*names):
    """pytest params for backends, with the triton marker on 'triton'."""
    out = []
    for n in names:
        marks = [pytest.mark.triton] if n == "triton" else [pytest.mark.cuda] if n == "cuda" else []
        out.append(pytest.param(n, marks=marks, id=n))
    return out


def require_backend(desc, kernel, backend, device, dtype):
    """Skip when the backend is legitimately absent (no triton, no GPU); fail otherwise.

    The C++ CPU module is built by `make test`, so a missing cpu kernel is a failure,
    not a skip.
    """
    st = _backends.check(desc, backend, (kernel,), torch.device(device).type, dtype)
    if st.ok:
        return
    if backend == "triton" and not _backends._triton_import().ok:
        pytest.skip(st.reason)
    if backend == "cuda" and not HAS_CUDA:
        pytest.skip(st.reason)
    if desc.backends.get(backend) is None or "supports dtypes" in st.reason or "tensors, got" in st.reason:
        pytest.skip(st.reason)
    pytest.fail(f"backend {backend} unavailable: {st.reason}")
