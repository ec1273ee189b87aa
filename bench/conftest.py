"""Fixtures for the pytest-benchmark suite in this folder.

Quick mode (``--benchmark-disable``, or ``BACKPROP_XP_BENCH_QUICK=1``) runs every
benchmark once on a few batches: that is what CI does, so the benchmark code
cannot rot. The real numbers come from ``python bench/compare.py`` (see
``bench/NOTES.md``), which also runs the two libraries in separate processes.
"""

from __future__ import annotations

import importlib
import os

import pytest

REQUIRE_REFERENCES = "BACKPROP_XP_REQUIRE_REFERENCES"


@pytest.fixture(scope="session")
def torch():
    """PyTorch, the other contestant: a skip where it is missing, a failure where CI requires it.

    The same rule as ``tests/conftest.py``'s ``import_reference`` (one conftest
    cannot import the other's helpers by name when both folders run together).
    """
    try:
        return importlib.import_module("torch")
    except ImportError as exc:
        message = f"torch cannot be imported ({exc}): the comparison benchmarks need it (pip install torch==2.13.0)"
        if os.environ.get(REQUIRE_REFERENCES, "") not in ("", "0"):
            pytest.fail(f"{message}, but {REQUIRE_REFERENCES} is set (CI installs every test reference)", pytrace=False)
        pytest.skip(message)


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
