"""The NumPy twins of the CUDA kernels against the model itself, and the elementwise bodies against theirs, on the CPU.

The GPU tests compare each fused kernel with its twin in ``tests/kernel_references.py``;
these tests make sure the twins compute what ``MLP.backprop`` computes, so a
kernel that matches its twin matches the model. The elementwise bodies (the
SGD update) run here too, compiled by g++ (``tests/cuda_emulator.py``), bit
for bit against ``optimizers.SGD.step``; ``tests/test_cuda_emulated.py`` does the
same for the output-layer kernel.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from cuda_emulator import EmulatedElementwise
from kernel_references import output_layer_reference

import backprop_xp as bx
from backprop_xp.cuda import cuda_kernels as kc


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
@pytest.mark.parametrize("n_classes", [10, 3])
def test_output_layer_twin_equals_backprop(activation, n_classes):
    rng = np.random.default_rng(0)
    m = bx.MLP(30, 17, n_classes, activation=activation, dtype="float64", seed=2)
    m.params["b1"][...] = rng.normal(0, 0.3, 17)
    m.params["b2"][...] = rng.normal(0, 0.3, n_classes)
    x, y = rng.random((23, 30)), rng.integers(0, n_classes, 23)
    loss, n_correct = m.backprop(x, y)
    z1 = x @ m.params["W1"].T
    twin = output_layer_reference(z1, y, m.params, activation)
    np.testing.assert_array_equal(z1, x @ m.params["W1"].T)  # the twin leaves z1 alone
    np.testing.assert_allclose(twin["loss"], loss, rtol=1e-12)
    assert int(twin["n_correct"]) == int(n_correct)
    for name in ("W2", "b1", "b2"):
        np.testing.assert_allclose(twin[name], m.grads[name], rtol=1e-12, atol=1e-15)
    # ∂L/∂W1 = δ1ᵀ x from the twin's δ1: what the step's last product computes
    np.testing.assert_allclose(twin["delta1"].T @ x, m.grads["W1"], rtol=1e-12, atol=1e-15)


def test_output_layer_grid_and_shared_memory():
    """Every row is in exactly one block, at most one block per SM, and the shared-memory check counts W2 and δ2."""
    for sms in (1, 32, 108, 132):
        for batch in (1, 15, 16, 17, 128, 511, 512, 513, 4096, 60_000):
            rows, blocks = kc.output_layer_grid(batch, sms)
            assert rows >= kc.OUTPUT_LAYER_MIN_ROWS and blocks <= sms
            assert (blocks - 1) * rows < batch <= blocks * rows
            if batch >= kc.OUTPUT_LAYER_MIN_ROWS * sms:
                assert blocks >= sms - sms // kc.OUTPUT_LAYER_MIN_ROWS  # a large batch keeps (nearly) every SM busy
    assert kc.output_layer_grid(4096, 132) == (32, 128)  # an H100: 128 blocks, not 32
    limit = 227 * 1024  # an H100's opt-in shared memory per block
    assert kc.output_layer_shared_bytes(128, 800, 10, "float32", 132) == (10 * 800 + 16 * 10) * 4
    assert kc.output_layer_fits(128, 2048, 10, "float64", limit, 132)  # 160 KiB of W2
    assert not kc.output_layer_fits(128, 4096, 10, "float64", limit, 132)
    assert not kc.output_layer_fits(128, 64, kc.OUTPUT_LAYER_MAX_CLASSES + 1, "float32", limit, 132)


# --------------------------------------------------------------------------- the elementwise bodies, on the CPU
# Each ElementwiseKernel body the package ships, compiled by g++ (tests/cuda_emulator.py) and run on the CPU
# against its twin, bit for bit: the update's twin is optimizers.SGD.step itself.

_ELEMENTWISE: list = []


def elementwise():
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed")
    if not _ELEMENTWISE:
        _ELEMENTWISE.append(EmulatedElementwise(kc.elementwise_specs()))
    return _ELEMENTWISE[0]


def test_every_elementwise_body_has_a_cpu_twin_test():
    """A new body in elementwise_specs() must be added to the twin tests below."""
    assert sorted(spec.name for spec in kc.elementwise_specs()) == [
        "adam",
        "sgd_momentum",
        "sgd_plain",
    ]  # adam: test_cuda_adam.py


def stepped_sgd(dtype: str, momentum: float, weight_decay: float) -> tuple[bx.SGD, np.ndarray, np.ndarray, np.ndarray]:
    """``optimizers.SGD`` stepped once, the reference of the update kernels: ``(optimizer, w, g, v)``, the
    weights, gradients and velocity it started from (its model and velocity hold the result)."""
    rng = np.random.default_rng(6)
    model = bx.MLP(30, 20, 10, backend="numpy", dtype=dtype)
    opt = bx.SGD(model, lr=0.037, momentum=momentum, weight_decay=weight_decay)
    n = model.flat_params.size
    w, g, v = (rng.normal(0, 1, n).astype(dtype) for _ in range(3))
    model.flat_params[...], model.flat_grads[...] = w, g
    if momentum:
        opt.velocity[...] = v
    opt.step()  # the optimizer itself, no re-derivation of its rule
    return opt, w, g, v


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.9, 5e-4), (0.0, 1e-3)])
def test_sgd_bodies_equal_optim_sgd_bit_for_bit(dtype, momentum, weight_decay):
    """The update kernels' bodies (sgd_momentum, sgd_plain) on the CPU against optimizers.SGD.step, to the bit."""
    opt, w, g, v = stepped_sgd(dtype, momentum, weight_decay)
    model = opt.model
    before = w.copy()
    hyper = np.array([opt.lr, momentum, weight_decay], dtype)
    if momentum:  # the argument order of sgd_momentum_: g, hyper, then w and v written in place
        elementwise().run("sgd_momentum", dtype, g, hyper, w, v)
        np.testing.assert_array_equal(v, opt.velocity)
    else:
        elementwise().run("sgd_plain", dtype, g, hyper, w)
    np.testing.assert_array_equal(w, model.flat_params)
    assert not np.array_equal(w, before)  # the body did update the weights


# --------------------------------------------------------------------------- the shared-memory opt-in, per device


class _FakeKernel:
    """A stand-in for cupy.RawKernel: CuPy sets max_dynamic_shared_size_bytes on the current device's function only."""

    def __init__(self, device):
        self.device, self.allowed = device, {}  # device -> bytes allowed there

    @property
    def max_dynamic_shared_size_bytes(self):
        return self.allowed.get(self.device[0], 48 * 1024)

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value):
        self.allowed[self.device[0]] = value

    def __call__(self, grid, block, args, shared_mem=0):
        assert shared_mem <= self.max_dynamic_shared_size_bytes, f"launch above the limit on device {self.device[0]}"


def test_shared_memory_opt_in_is_made_on_every_device(monkeypatch):
    """One kernel object, launched on device 0 then device 1: each device gets its own opt-in above 48 KiB."""
    device = [0]
    kernel = _FakeKernel(device)
    monkeypatch.setattr(kc, "_output_layer_kernel", lambda *args: kernel)
    monkeypatch.setattr(kc, "current_device", lambda: device[0])
    monkeypatch.setattr(kc, "_SHARED_OPT_IN", {})
    batch, n_hidden, n_classes = 64, 2048, 10
    scratch = kc.OutputLayerScratch(np, batch, n_hidden, n_classes, "float64", 132)
    assert scratch.shared_bytes > 48 * 1024  # W2 alone is 160 KiB
    a1, d2 = np.zeros((batch, n_hidden)), np.zeros((batch, n_classes))
    params = grads = {"b1": None, "W2": None, "b2": None}
    for device[0] in (0, 1, 0, 1):
        kc.output_layer_step(a1, None, params, grads, d2, a1, None, None, scratch, "relu")
    assert kernel.allowed == {0: scratch.shared_bytes, 1: scratch.shared_bytes}
