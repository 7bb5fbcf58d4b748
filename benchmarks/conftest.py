"""pytest-benchmark suites of embkern (not shipped): size sweeps per op and backend.

Run:  pytest benchmarks/ --benchmark-only                 (modest sweep, a few minutes on 2 cores)
      pytest benchmarks/ --benchmark-only --sweep=full    (the whole grid; large points are slow)
      pytest benchmarks/ --benchmark-disable              (each case once: a smoke test)

Markers: ``hypercomplex`` (op), ``large`` (a point of the full grid only),
``cuda`` (CUDA tensors; skipped without a GPU). Timings are recorded, never
asserted. Like tests/, this runs against the INSTALLED embkern; sweep.py
times every point with the bench's own measurement code.
"""

import os

import pytest
import torch


MARKERS = {
    "hypercomplex": "hypercomplex KG scoring sweeps",
    "large": "points of the full sweep only (--sweep=full)",
    "cuda": "needs an NVIDIA GPU (skipped without one)",
}


def pytest_addoption(parser):
    parser.addoption("--sweep", choices=("modest", "full"), default=os.environ.get("EMBKERN_SWEEP", "modest"),
                     help="size grid of the embkern sweeps (default modest; env EMBKERN_SWEEP)")


def pytest_configure(config):
    for name, doc in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {doc}")


def pytest_collection_modifyitems(config, items):
    full = config.getoption("--sweep") == "full"
    skip_large = pytest.mark.skip(reason="part of the full grid only; run with --sweep=full")
    skip_cuda = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "large" in item.keywords and not full:
            item.add_marker(skip_large)
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)

