"""Fixtures for the pytest-benchmark suite in this folder.

Quick mode (``--benchmark-disable``, or ``BACKPROP_XP_BENCH_QUICK=1``) runs every
benchmark once on a few batches: that is what CI does, so the benchmark code
cannot rot. The real numbers come from ``python bench/compare.py`` (see
``bench/NOTES.md``), which also runs the two libraries in separate processes.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def quick(request) -> bool:
    """True when the benchmarks only need to run, not to be timed well."""
    disabled = bool(request.config.getoption("benchmark_disable", default=False))
    return disabled or os.environ.get("BACKPROP_XP_BENCH_QUICK", "") not in ("", "0")


@pytest.fixture(scope="session")
def epoch_data(quick):
    """MNIST-shaped training data: 60,000 examples, or 1,024 in quick mode."""
    import workloads

    return workloads.mnist_shaped(1024 if quick else 60_000, seed=0)
