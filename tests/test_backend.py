"""Choosing NumPy or CuPy: auto, clear errors where CuPy cannot work, no eager CuPy import."""

from __future__ import annotations

import subprocess
import sys
import types

import numpy as np
import pytest

import backprop_xp as bx
from backprop_xp.backend import BackendError, cuda_version_problem, get_backend, resolve_dtype


def fake_cupy(device_count=1, driver=12040, runtime=12020, count_error=None, matmul_error=None):
    """A stand-in module with the few CuPy calls the backend makes (``matmul_error``: CuPy's cuBLAS fails to load)."""

    def get_device_count():
        if count_error is not None:
            raise count_error
        return device_count

    runtime_api = types.SimpleNamespace(
        getDeviceCount=get_device_count, driverGetVersion=lambda: driver, runtimeGetVersion=lambda: runtime
    )
    ones = np.ones if matmul_error is None else (lambda shape, dtype: NoCublas(matmul_error))
    return types.SimpleNamespace(
        cuda=types.SimpleNamespace(runtime=runtime_api), arange=np.arange, ones=ones, float32=np.float32
    )


class NoCublas:
    """An array whose matrix product fails as CuPy's does when libcublas cannot be loaded."""

    def __init__(self, error):
        self.error = error

    def __matmul__(self, other):
        raise self.error


class CudaRuntimeError(RuntimeError):
    """CuPy's CUDARuntimeError: the status code, and 'name: description' as its message."""

    def __init__(self, status, text):
        self.status = status
        super().__init__(text)


INSUFFICIENT_DRIVER = CudaRuntimeError(
    35, "cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version"
)


@pytest.fixture
def no_nvmath(monkeypatch):
    """nvmath-python's import fails: the backend must not need it (only the fused training step does)."""
    monkeypatch.setitem(sys.modules, "nvmath", None)


def test_numpy_backend():
    backend = get_backend("numpy")
    assert backend.xp is np and backend.name == "numpy" and not backend.is_gpu


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'gpu': choose one of auto, numpy, cupy"):
        get_backend("gpu")


@pytest.mark.parametrize(
    "module, message",
    [
        (None, "CuPy, which is not installed"),
        (fake_cupy(device_count=0), "no CUDA device"),
        (
            fake_cupy(count_error=RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")),
            "no usable CUDA device",
        ),
        (
            fake_cupy(driver=11080, runtime=12020),
            r"driver is too old \(driver supports CUDA 11.8, CuPy was built for CUDA 12.2\)",
        ),
    ],
)
def test_cupy_that_cannot_work_says_why(monkeypatch, module, message):
    monkeypatch.setitem(sys.modules, "cupy", module)  # None makes `import cupy` raise ImportError
    with pytest.raises(BackendError, match=message):
        get_backend("cupy")
    auto = get_backend("auto")
    assert auto.name == "numpy" and auto.xp is np
    assert "auto: using numpy because" in auto.reason
    assert message.split(" (")[0].replace("\\", "") in auto.reason


@pytest.mark.parametrize(
    "driver, runtime, accepted",
    [
        (13000, 13020, True),  # a newer minor runtime on an older minor driver: CUDA minor-version compatibility
        (12040, 12080, True),
        (13000, 13000, True),
        (13020, 12080, True),  # a newer driver runs older runtimes
        (12080, 13000, False),  # a lower major version: refused
        (11080, 12020, False),
    ],
)
def test_cuda_versions_compare_by_major_version(monkeypatch, no_nvmath, driver, runtime, accepted):
    assert (cuda_version_problem(driver, runtime) is None) == accepted
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(driver=driver, runtime=runtime))
    if accepted:
        assert get_backend("cupy").is_gpu
    else:
        with pytest.raises(BackendError, match="driver is too old .*; update the NVIDIA driver"):
            get_backend("cupy")


@pytest.mark.parametrize(
    "driver, runtime, message",
    [
        (  # a CUDA 13 CuPy on a CUDA 12 driver: the cuda12 extra would run
            12080,
            13000,
            "backend 'cupy': the CUDA driver is too old (driver supports CUDA 12.8, CuPy was built for CUDA 13.0); "
            "update the NVIDIA driver, or use CuPy for CUDA 12: pip uninstall cupy-cuda13x, "
            "then pip install 'backprop-xp[cuda12]'",
        ),
        (  # no extra of ours runs on CUDA 11: only a driver update helps
            11080,
            12090,
            "backend 'cupy': the CUDA driver is too old (driver supports CUDA 11.8, CuPy was built for CUDA 12.9); "
            "update the NVIDIA driver",
        ),
        (  # same major, below the runtime's minimum driver (525 for CUDA 12)
            12000,
            12080,
            "backend 'cupy': the CUDA driver is too old (driver supports CUDA 12.0, CuPy was built for CUDA 12.8); "
            "update the NVIDIA driver",
        ),
        (  # cudaDriverGetVersion gives 0 where there is no driver at all
            0,
            13000,
            "backend 'cupy': no NVIDIA driver is installed (CuPy was built for CUDA 13.0); "
            "install the NVIDIA driver for the GPU",
        ),
    ],
)
def test_insufficient_driver_names_both_versions_and_what_to_install(monkeypatch, driver, runtime, message):
    """A runtime newer than the driver fails at cudaGetDeviceCount already, before any version is compared."""
    cupy = fake_cupy(driver=driver, runtime=runtime, count_error=INSUFFICIENT_DRIVER)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    with pytest.raises(BackendError) as refused:
        get_backend("cupy")
    assert str(refused.value) == message
    assert get_backend("auto").reason == f"auto: using numpy because {message}"


def test_other_device_count_errors_still_say_no_usable_device(monkeypatch):
    error = CudaRuntimeError(100, "cudaErrorNoDevice: no CUDA-capable device is detected")
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(count_error=error))
    with pytest.raises(BackendError, match=r"^backend 'cupy': no usable CUDA device \(cudaErrorNoDevice: no CUDA"):
        get_backend("cupy")


def test_cupy_without_nvmath_is_accepted(monkeypatch, no_nvmath):
    """nvmath-python is for the fused training step only (tests/test_step_without_nvmath.py): CuPy works without it."""
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy())
    assert get_backend("cupy").is_gpu
    assert get_backend("auto").name == "cupy"


def test_cupy_whose_cublas_cannot_load_says_so(monkeypatch, no_nvmath):
    """Evaluation and the generic step multiply with CuPy's cuBLAS: a CuPy that cannot load it is refused up front."""
    error = RuntimeError("libcublas.so.12: cannot open shared object file: No such file or directory")
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(matmul_error=error))
    with pytest.raises(BackendError, match=r"CuPy cannot multiply matrices with cuBLAS \(libcublas.so.12: cannot open"):
        get_backend("cupy")
    assert "cannot multiply matrices" in get_backend("auto").reason


def test_auto_picks_a_working_cupy(monkeypatch, no_nvmath):
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy())
    backend = get_backend("auto")
    assert backend.name == "cupy" and backend.is_gpu


def test_mlp_reports_the_backend_it_uses(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    m = bx.MLP(4, 3, 2, backend="auto")
    assert m.backend.name == "numpy" and m.config["backend"] == "numpy"


def test_import_does_not_import_cupy():
    """Nothing GPU-related is imported by the package or a NumPy model (CuPy, nvmath-python, CUDA bindings)."""
    code = (
        "import sys, backprop_xp; m = backprop_xp.MLP(4, 3, 2); "
        "print(sorted({n.split('.')[0] for n in sys.modules} & {'cupy', 'cupy_backends', 'nvmath', 'cuda'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    "dtype, name",
    [
        ("float32", "float32"),
        ("float64", "float64"),
        (np.float32, "float32"),
        (np.dtype("float64"), "float64"),
        (np.dtype("float32"), "float32"),
        (np.float64, "float64"),
    ],
)
def test_supported_dtypes(dtype, name):
    resolved = resolve_dtype(dtype)
    assert isinstance(resolved, np.dtype) and resolved == np.dtype(name) and resolved.name == name


@pytest.mark.parametrize("dtype", ["float16", "int32", "bogus", None])
def test_unsupported_dtypes(dtype):
    with pytest.raises(ValueError, match="unsupported dtype"):
        resolve_dtype(dtype)
