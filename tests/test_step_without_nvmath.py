"""CuPy without nvmath-python: the backend accepts it, and training runs the generic step eagerly, saying why once.

Only the fused GPU step calls cuBLAS through nvmath-python; evaluation,
prediction and ``model.backprop`` + ``optimizer.step()`` use CuPy's own
products. Here CuPy is a stand-in computing with NumPy (no GPU on this
machine) and nvmath-python's import fails, as on a machine without it, or
its cuBLAS cannot be opened. The stand-in's results are compared with the
same model trained on NumPy: the fallback must be the definition itself.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from backprop_xp import MLP, SGD, get_backend
from backprop_xp import step as step_module
from backprop_xp.cuda import cuda_kernels
from backprop_xp.training import evaluate, make_step

SHARED_MEMORY_OPT_IN = 232448  # an H100's, for the fused step's set-up before it asks for cuBLAS


class NumpyAsCupy(types.ModuleType):
    """A stand-in for CuPy (built for CUDA 13) whose arrays are NumPy's: enough for MLP, SGD and evaluate."""

    def __init__(self) -> None:
        super().__init__("cupy")
        self.cuda = types.SimpleNamespace(
            runtime=types.SimpleNamespace(
                getDeviceCount=lambda: 1,
                driverGetVersion=lambda: 13000,
                runtimeGetVersion=lambda: 13000,
                getDevice=lambda: 0,
                deviceGetAttribute=lambda attribute, device: SHARED_MEMORY_OPT_IN,
            )
        )

    def __getattr__(self, name: str):
        return getattr(np, name)


@pytest.fixture
def cupy_without_nvmath(monkeypatch):
    """The CuPy stand-in installed, nvmath-python's import failing, and no notice given yet in this process."""
    cupy = NumpyAsCupy()
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    # `import nvmath...` raises ImportError, also where an earlier test imported nvmath.bindings (a submodule
    # already in sys.modules is found there without importing its parent)
    for name in ["nvmath", *[n for n in sys.modules if n.startswith("nvmath.")]]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(step_module, "_SAID", set())
    cuda_kernels.device_limits.cache_clear()  # the stand-in's limits must not outlive it (a real GPU's tests follow)
    yield cupy
    cuda_kernels.device_limits.cache_clear()


def train_three_steps(model, *, graphs=True):
    optimizer = SGD(model, lr=0.1, momentum=0.9, weight_decay=1e-4)
    step = make_step(model, optimizer, graphs=graphs, checked=False)
    rng = np.random.default_rng(1)
    results = []
    for _ in range(3):
        x = rng.normal(size=(16, 6))
        y = rng.integers(0, 3, size=16).astype(np.int64)
        loss, n_correct = step(x, y)
        results.append((float(loss), int(n_correct)))
    return step, results


def test_cupy_trains_with_the_generic_step_eagerly_and_says_why_once(cupy_without_nvmath, capsys):
    backend = get_backend("cupy")  # accepted: nothing the backend checks needs nvmath-python
    assert backend.is_gpu and backend.xp is cupy_without_nvmath
    on_gpu = MLP(6, 5, 3, activation="tanh", dtype="float64", backend=backend)
    on_cpu = MLP(6, 5, 3, activation="tanh", dtype="float64", backend="numpy")

    step, results = train_three_steps(on_gpu)
    _, expected = train_three_steps(on_cpu)
    assert results == expected  # the definition itself: the same losses, counts and parameters as on NumPy
    for name, value in on_cpu.params.items():
        np.testing.assert_array_equal(on_gpu.params[name], value, err_msg=name)
    assert step.mode == "eager" and "nvmath-python" in step.capture_error

    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "backprop-xp: the GPU training step runs eagerly, without CUDA graphs: nvmath-python (the fused step's "
        "cuBLAS calls) is not installed (pip install 'backprop-xp[cuda13]')"
    ]
    train_three_steps(MLP(6, 5, 3, backend=backend))  # a second run in the same process (a sweep): said once
    assert capsys.readouterr().err == ""

    x = np.random.default_rng(2).normal(size=(40, 6))
    labels = np.arange(40) % 3
    assert evaluate(on_gpu, x, labels) == evaluate(on_cpu, x, labels)
    np.testing.assert_array_equal(on_gpu.predict(x), on_cpu.predict(x))


def test_cupy_whose_nvmath_cannot_open_cublas_trains_eagerly_and_says_so(cupy_without_nvmath, monkeypatch, capsys):
    def no_library():
        raise RuntimeError("libcublas.so.13: cannot open shared object file")

    cublas = types.SimpleNamespace(create=no_library, destroy=lambda handle: None, sgemm=None, dgemm=None)
    bindings = types.SimpleNamespace(cublas=cublas)
    monkeypatch.setitem(sys.modules, "nvmath", types.SimpleNamespace(bindings=bindings))
    monkeypatch.setitem(sys.modules, "nvmath.bindings", bindings)
    monkeypatch.setitem(sys.modules, "nvmath.bindings.cublas", cublas)
    step, _ = train_three_steps(MLP(6, 5, 3, backend=get_backend("cupy")))
    assert step.mode == "eager"
    assert (
        "nvmath-python cannot open cuBLAS (libcublas.so.13: cannot open shared object file)" in capsys.readouterr().err
    )
