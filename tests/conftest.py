"""Shared fixtures: the real MNIST folder, and whether a CUDA device is usable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _require_data() -> bool:
    # CI sets this: there, missing MNIST is a failure, not a skip.
    return os.environ.get("BACKPROP_XP_REQUIRE_DATA", "") not in ("", "0")


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The folder named by BACKPROP_XP_DATA (real MNIST); skips where it is unset."""
    folder = os.environ.get("BACKPROP_XP_DATA")
    if not folder or not Path(folder).is_dir():
        message = f"real MNIST not available (BACKPROP_XP_DATA={folder!r})"
        if _require_data():
            pytest.fail(message + " but BACKPROP_XP_REQUIRE_DATA is set")
        pytest.skip(message)
    return Path(folder)


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
    """The cupy module; skips the test with the reason when no usable CUDA device exists."""
    if _CUPY_REASON is not None:
        pytest.skip(_CUPY_REASON)
    import cupy

    return cupy


def _require_fast() -> bool:
    # CI installs the [fast] extra and sets this: there, a missing Numba is a failure, not a skip.
    return os.environ.get("BACKPROP_XP_REQUIRE_FAST", "") not in ("", "0")


@pytest.fixture(params=["numpy", "fast"])
def cpu_path(request):
    """Runs the test on the plain NumPy CPU path and on the fused Numba one (``backprop_xp.fused_cpu``)."""
    from backprop_xp import fused_cpu

    if request.param == "fast" and not fused_cpu.available():
        message = "Numba not installed: the fast CPU path (pip install 'backprop-xp[fast]') is not tested"
        if _require_fast():
            pytest.fail(message + " but BACKPROP_XP_REQUIRE_FAST is set")
        pytest.skip(message)
    previous = fused_cpu.set_enabled(request.param == "fast")
    yield request.param
    fused_cpu.set_enabled(previous)
