"""Choosing the array module ``xp``: NumPy on the CPU or CuPy on a CUDA GPU.

The rest of the library never asks "am I on a GPU?". It is handed one array
module, ``xp``, chosen here once, and writes ``xp.matmul``, ``xp.exp`` and so on.
NumPy and CuPy share that API, so the same forward/backward/update code runs on
both. CuPy is imported lazily, only when asked for, so that importing
``backprop_xp`` works on a machine without CuPy or without a GPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

log = logging.getLogger("backprop_xp")

BACKENDS = ("auto", "numpy", "cupy")
DTYPES = ("float32", "float64")
# CUDA majors with an extra of their own in pyproject.toml (cuda12, cuda13): CuPy, its toolkit, nvmath-python
GPU_EXTRAS = (12, 13)
INSTALL_GPU = "pip install 'backprop-xp[cuda12]' or 'backprop-xp[cuda13]', matching the CUDA driver"
# cudaErrorInsufficientDriver: the CUDA runtime is newer than the driver, or there is no driver
CUDA_ERROR_INSUFFICIENT_DRIVER = 35


class BackendError(RuntimeError):
    """The requested backend cannot work on this machine (the message says why)."""


@dataclass(frozen=True)
class Backend:
    """An array module and how it was chosen.

    Attributes
    ----------
    name : {"numpy", "cupy"}
        The backend actually in use.
    xp : module
        ``numpy`` or ``cupy``.
    reason : str
        One line saying why this backend was chosen (shown by ``auto``).
    """

    name: str
    xp: ModuleType
    reason: str

    @property
    def is_gpu(self) -> bool:
        return self.name == "cupy"


def _import_cupy() -> ModuleType:
    """Import CuPy and check that it can run a kernel and a matrix product; raise BackendError saying why not.

    nvmath-python is not needed here: only the fused training step calls it,
    and without it that step runs eagerly (``training.step.make_step``).
    """
    try:
        import cupy
    except ImportError as exc:
        raise BackendError(f"backend 'cupy' needs CuPy, which is not installed ({INSTALL_GPU})") from exc
    except Exception as exc:  # a broken install (missing CUDA libraries) fails here
        raise BackendError(f"backend 'cupy': CuPy is installed but fails to import: {exc}") from exc
    runtime = cupy.cuda.runtime
    try:
        n_devices = runtime.getDeviceCount()
    except Exception as exc:
        raise BackendError(f"backend 'cupy': {_device_count_problem(runtime, exc)}") from exc
    if n_devices < 1:
        raise BackendError("backend 'cupy': CuPy is installed but there is no CUDA device")
    try:
        driver = runtime.driverGetVersion()
        built_for = runtime.runtimeGetVersion()
    except Exception as exc:
        raise BackendError(f"backend 'cupy': cannot query the CUDA driver ({error_line(exc)})") from exc
    problem = cuda_version_problem(driver, built_for)
    if problem is not None:
        raise BackendError(f"backend 'cupy': {problem}")
    try:  # the first real allocation and launch: catches a device that exists but cannot be used
        (cupy.arange(4, dtype=cupy.float32) * 2).sum().item()
    except Exception as exc:
        raise BackendError(f"backend 'cupy': the CUDA device cannot run a kernel ({error_line(exc)})") from exc
    try:  # CuPy loads cuBLAS at its first product: make it now, not inside the first forward pass
        ones = cupy.ones((2, 2), dtype=cupy.float32)
        (ones @ ones).sum().item()
    except Exception as exc:
        raise BackendError(f"backend 'cupy': CuPy cannot multiply matrices with cuBLAS ({error_line(exc)})") from exc
    return cupy


def _device_count_problem(runtime: Any, exc: BaseException) -> str:
    """Why ``cudaGetDeviceCount`` failed, in words: no driver, a driver too old, or no usable device.

    A CUDA runtime newer than the driver fails right there, with
    cudaErrorInsufficientDriver (as does a machine with no driver at all),
    before any version can be compared: say which versions, and what to install.
    """
    if getattr(exc, "status", None) != CUDA_ERROR_INSUFFICIENT_DRIVER and "cudaErrorInsufficientDriver" not in str(exc):
        return f"no usable CUDA device ({error_line(exc)})"
    try:  # both answer without a usable driver (cudaDriverGetVersion gives 0 when there is none)
        driver, built_for = runtime.driverGetVersion(), runtime.runtimeGetVersion()
    except Exception:
        return f"the NVIDIA driver is missing or too old for this CuPy ({error_line(exc)}); install or update it"
    if driver == 0:
        return (
            f"no NVIDIA driver is installed (CuPy was built for CUDA {_cuda_version(built_for)}); "
            "install the NVIDIA driver for the GPU"
        )
    return driver_too_old(driver, built_for)


def cuda_version_problem(driver: int, runtime: int) -> str | None:
    """Why a CUDA runtime cannot work on a driver, or None when it can.

    Versions are CUDA's integers (13020 is 13.2). CUDA's minor-version
    compatibility lets every 13.x runtime run on any 13.x driver (pip wheels
    track the newest minor, drivers lag behind), so only a lower *major*
    version is refused; a kernel launch afterwards is the real test.

    >>> cuda_version_problem(13000, 13020) is None   # 13.2 runtime on a 13.0 driver: fine
    True
    >>> problem = cuda_version_problem(12080, 13000)
    >>> problem.split("; ")[0]
    'the CUDA driver is too old (driver supports CUDA 12.8, CuPy was built for CUDA 13.0)'
    >>> problem.split("; ")[1]
    "update the NVIDIA driver, or use CuPy for CUDA 12: pip uninstall cupy-cuda13x, then pip install 'backprop-xp[cuda12]'"
    """
    if driver // 1000 >= runtime // 1000:
        return None
    return driver_too_old(driver, runtime)


def driver_too_old(driver: int, runtime: int) -> str:
    """What to tell a user whose NVIDIA driver cannot run this CuPy's CUDA runtime (versions as CUDA's integers).

    >>> driver_too_old(12000, 12080)   # same major, yet refused by the driver: only an update helps
    'the CUDA driver is too old (driver supports CUDA 12.0, CuPy was built for CUDA 12.8); update the NVIDIA driver'
    """
    line = (
        f"the CUDA driver is too old (driver supports CUDA {_cuda_version(driver)}, CuPy was built for "
        f"CUDA {_cuda_version(runtime)}); update the NVIDIA driver"
    )
    major = driver // 1000
    if major < runtime // 1000 and major in GPU_EXTRAS:  # the driver runs the CuPy built for its own major
        line += (
            f", or use CuPy for CUDA {major}: pip uninstall cupy-cuda{runtime // 1000}x, "
            f"then pip install 'backprop-xp[cuda{major}]'"
        )
    return line


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def error_line(exc: BaseException, *, with_type: bool = False) -> str:
    """The first line of an exception's message (and its type, if asked): what a one-line notice shows."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    if with_type:
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text or type(exc).__name__


def get_backend(name: str = "numpy") -> Backend:
    """Return the backend called ``name``.

    Parameters
    ----------
    name : {"numpy", "cupy", "auto"}
        ``"auto"`` picks CuPy when it imports and a CUDA device is usable, else
        NumPy, and logs which it picked and why (``Backend.reason``).

    Raises
    ------
    ValueError
        ``name`` is not one of the three.
    BackendError
        ``"cupy"`` was asked for and cannot work; the message says why.
    """
    if isinstance(name, Backend):
        return name
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if name == "numpy":
        return Backend("numpy", np, "asked for numpy")
    if name == "cupy":
        return Backend("cupy", _import_cupy(), "asked for cupy")
    try:
        backend = Backend("cupy", _import_cupy(), "auto: CuPy imports and a CUDA device is usable")
    except BackendError as exc:
        backend = Backend("numpy", np, f"auto: using numpy because {exc}")
    log.info("backend: %s (%s)", backend.name, backend.reason)
    return backend


def resolve_dtype(dtype: Any) -> np.dtype:
    """Return ``float32`` or ``float64`` as a NumPy dtype; anything else is a ValueError."""
    try:
        dt = None if dtype is None else np.dtype(dtype)  # np.dtype(None) would mean float64
    except TypeError:
        dt = None
    if dt is None or dt.name not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}: choose float32 or float64")
    return dt


def array_module(a: Any) -> ModuleType:
    """The array module an array belongs to (NumPy for anything that is not a CuPy array)."""
    module = type(a).__module__
    if module.startswith("cupy"):
        import cupy

        return cupy
    return np


def to_numpy(a: Any) -> np.ndarray:
    """A NumPy copy (or view) of ``a``, whichever backend it lives on."""
    if array_module(a) is np:
        return np.asarray(a)
    return a.get()


def synchronize(xp: ModuleType) -> None:
    """Wait for the device to finish queued work (a no-op on NumPy); used only around timings."""
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()
