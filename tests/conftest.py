"""Shared fixtures: the real MNIST folder, the test references (PyTorch), and whether a CUDA device is usable."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

REQUIRE_DATA = "BACKPROP_XP_REQUIRE_DATA"
REQUIRE_REFERENCES = "BACKPROP_XP_REQUIRE_REFERENCES"


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def _require_data() -> bool:
    # CI sets this: there, missing MNIST is a failure, not a skip.
    return _flag(REQUIRE_DATA)


def reference_missing(message: str) -> NoReturn:
    """A test reference (PyTorch, NVRTC...) is unavailable: skip with ``message``, or fail where CI requires it.

    CI (.ci/run) installs every reference and sets BACKPROP_XP_REQUIRE_REFERENCES=1,
    so there a broken install fails the run instead of quietly skipping the
    comparisons. Use it through the ``reference_missing`` fixture (a conftest is
    not reliably importable by name when tests/ and bench/ run together).
    """
    if _flag(REQUIRE_REFERENCES):
        pytest.fail(f"{message}, but {REQUIRE_REFERENCES} is set (CI installs every test reference)", pytrace=False)
    pytest.skip(message)


def import_reference(module: str, why: str) -> ModuleType:
    """``import module`` for a test reference; ``reference_missing`` if it cannot be imported."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        reference_missing(f"{module} cannot be imported ({exc}): {why}")


@pytest.fixture(scope="session", name="reference_missing")
def reference_missing_fixture():
    """The ``reference_missing(message)`` function: skip, or fail under BACKPROP_XP_REQUIRE_REFERENCES."""
    return reference_missing


@pytest.fixture(scope="session")
def torch():
    """PyTorch, the reference for the gradient and optimizer comparisons (skip, or fail in CI, without it)."""
    return import_reference("torch", "the PyTorch reference comparisons need it (pip install torch==2.13.0)")


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The folder named by BACKPROP_XP_DATA (real MNIST); skips where it is unset."""
    folder = os.environ.get("BACKPROP_XP_DATA")
    if not folder or not Path(folder).is_dir():
        message = f"real MNIST not available (BACKPROP_XP_DATA={folder!r})"
        if _require_data():
            pytest.fail(message + f" but {REQUIRE_DATA} is set")
        pytest.skip(message)
    return Path(os.path.abspath(folder))  # the README's ../shared/mnist is relative: tests that chdir pass it on


@pytest.fixture(scope="session")
def mnist(mnist_dir):
    """(x_train, y_train, x_test, y_test) of real MNIST, loaded once per test session."""
    from backprop_xp import load_mnist

    return load_mnist(mnist_dir, download=False)


def _cupy_reason() -> str | None:
    """None when CuPy imports and a device is usable, else why not."""
    try:
        from backprop_xp.backend import BackendError, get_backend

        get_backend("cupy")
    except BackendError as exc:
        return str(exc)
    return None


_CUPY_REASON = _cupy_reason()


@pytest.fixture(scope="session")
def cupy():
    """The cupy module; skips the test with the reason when no usable CUDA device exists.

    ``BACKPROP_XP_REQUIRE_GPU=1`` (set by scripts/gpu_check.sh where
    nvidia-smi lists a GPU) turns that skip into a failure: on a GPU machine
    a backend that refuses CuPy is a defect, not a reason to test nothing.
    """
    if _CUPY_REASON is not None:
        if os.environ.get("BACKPROP_XP_REQUIRE_GPU", "") not in ("", "0"):
            pytest.fail(f"{_CUPY_REASON} but BACKPROP_XP_REQUIRE_GPU is set")
        pytest.skip(_CUPY_REASON)
    import cupy

    return cupy


def _require_fast() -> bool:
    # CI installs the [fast] extra and sets this: there, a missing Numba is a failure, not a skip.
    return os.environ.get("BACKPROP_XP_REQUIRE_FAST", "") not in ("", "0")


@pytest.fixture(params=["numpy", "fast"])
def cpu_path(request):
    """Runs the test on the plain NumPy CPU path and on the fused Numba one (``backprop_xp.cpu.numba_loops``)."""
    from backprop_xp.cpu import numba_loops

    if request.param == "fast" and not numba_loops.available():
        message = "Numba not installed: the fast CPU path (pip install 'backprop-xp[fast]') is not tested"
        if _require_fast():
            pytest.fail(message + " but BACKPROP_XP_REQUIRE_FAST is set")
        pytest.skip(message)
    previous = numba_loops.set_enabled(request.param == "fast")
    yield request.param
    numba_loops.set_enabled(previous)


def pytest_terminal_summary(terminalreporter):
    """End the run with one line per group of skipped tests: why, and how to run them (skip_reasons.py)."""
    from skip_reasons import summary_lines

    reasons = [
        report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        for report in terminalreporter.stats.get("skipped", [])
    ]
    if reasons:
        terminalreporter.write_sep("-", "skipped tests: what they need")
        for line in summary_lines(reasons):
            terminalreporter.write_line(line)
