"""Choosing NumPy or CuPy: auto, clear errors where CuPy cannot work, no eager CuPy import."""

from __future__ import annotations

import subprocess
import sys
import types

import numpy as np
import pytest

import backprop_xp as bx
from backprop_xp.backend import BackendError, cuda_version_problem, get_backend, resolve_dtype


def fake_cupy(device_count=1, driver=12040, runtime=12020, count_error=None):
    """A stand-in module with the few CuPy runtime calls the backend makes."""

    def get_device_count():
        if count_error is not None:
            raise count_error
        return device_count

    runtime_api = types.SimpleNamespace(
        getDeviceCount=get_device_count, driverGetVersion=lambda: driver, runtimeGetVersion=lambda: runtime
    )
    return types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime_api), arange=np.arange, float32=np.float32)


@pytest.fixture
def nvmath_installed(monkeypatch):
    """Stand-ins for nvmath-python's cuBLAS bindings, which a working GPU backend also needs."""
    cublas = types.SimpleNamespace(create=lambda: 1, destroy=lambda handle: None)
    bindings = types.SimpleNamespace(cublas=cublas)
    monkeypatch.setitem(sys.modules, "nvmath", types.SimpleNamespace(bindings=bindings))
    monkeypatch.setitem(sys.modules, "nvmath.bindings", bindings)
    monkeypatch.setitem(sys.modules, "nvmath.bindings.cublas", cublas)


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
def test_cuda_versions_compare_by_major_version(monkeypatch, nvmath_installed, driver, runtime, accepted):
    assert (cuda_version_problem(driver, runtime) is None) == accepted
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(driver=driver, runtime=runtime))
    if accepted:
        assert get_backend("cupy").is_gpu
    else:
        with pytest.raises(BackendError, match=f"driver is too old .*install cupy-cuda{driver // 1000}x"):
            get_backend("cupy")


def test_cupy_without_nvmath_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy())
    monkeypatch.setitem(sys.modules, "nvmath", None)
    with pytest.raises(BackendError, match=r"needs nvmath-python .*backprop-xp\[cuda12\]"):
        get_backend("cupy")
    assert "nvmath-python" in get_backend("auto").reason


def test_cupy_whose_cublas_cannot_load_says_so(monkeypatch, nvmath_installed):
    def no_library():
        raise RuntimeError("libcublas.so.13: cannot open shared object file")

    monkeypatch.setitem(sys.modules, "cupy", fake_cupy())
    monkeypatch.setattr(sys.modules["nvmath.bindings.cublas"], "create", no_library)
    with pytest.raises(BackendError, match="cannot open cuBLAS .*libcublas.so.13"):
        get_backend("cupy")


def test_auto_picks_a_working_cupy(monkeypatch, nvmath_installed):
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
