"""The activation table: every entry's forward and derivative, checked by finite differences; Leaky ReLU end to end."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import backprop_xp as bx
from backprop_xp.activations import ACTIVATIONS, LEAKY_SLOPE, activation_derivative, activation_forward_
from backprop_xp.gradcheck import numeric_gradient, relative_error

# The functions themselves, written independently of the table (one NumPy expression each).
FORMULAS = {
    "relu": lambda z: np.maximum(z, 0.0),
    "sigmoid": lambda z: 1 / (1 + np.exp(-z)),
    "tanh": np.tanh,
    "leaky_relu": lambda z: np.where(z > 0, z, 0.01 * z),
    "elu": lambda z: np.where(z > 0, z, np.expm1(np.minimum(z, 0))),
}


def test_every_entry_has_its_parts_and_an_independent_formula():
    assert set(FORMULAS) == set(ACTIVATIONS)  # a new entry needs its formula here, and its tests
    for name, entry in ACTIVATIONS.items():
        assert callable(entry.forward) and callable(entry.derivative) and callable(entry.init), name


def _points(seed=0):
    """float64 points of both signs, none within 1e-3 of 0 (where ReLU's kinks make differences meaningless)."""
    z = np.random.default_rng(seed).normal(0, 2, size=(7, 9))
    z[np.abs(z) < 1e-3] = 0.5
    return z


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_forward_is_the_formula(activation):
    z = _points()
    for fprime in (None, np.empty_like(z)):  # the training step's call, and the plain one
        a = activation_forward_(z.copy(), activation, fprime=fprime)
        np.testing.assert_allclose(a, FORMULAS[activation](z), rtol=1e-15, atol=1e-300)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_derivative_from_the_output_equals_finite_differences(activation):
    """``f'(z)`` computed from ``a = f(z)`` against central differences of ``Σ r ⊙ f(z)`` (gradcheck.py)."""
    z, r = _points(1), np.random.default_rng(2).normal(size=(7, 9))
    analytic = r * activation_derivative(FORMULAS[activation](z), activation, out=np.empty_like(z))
    numeric = numeric_gradient(lambda: float((r * FORMULAS[activation](z)).sum()), z)
    assert relative_error(numeric, analytic) < 1e-8
    fprime = np.empty_like(z)
    activation_forward_(z.copy(), activation, fprime=fprime)  # the forward pass's own f'
    assert relative_error(numeric, r * fprime) < 1e-8


def test_leaky_relu_network_gradients_equal_finite_differences():
    m = bx.MLP(6, 5, 3, activation="leaky_relu", dtype="float64", seed=3)
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(8, 6)), rng.integers(0, 3, size=8)
    _, grads = m.loss_and_grads(x, y)
    grads = {k: v.copy() for k, v in grads.items()}
    assert (x @ m.params["W1"].T + m.params["b1"] < 0).any()  # the slope α is used
    for name, p in m.params.items():
        numeric = numeric_gradient(lambda: m.loss_and_grads(x, y)[0], p)
        assert relative_error(numeric, grads[name]) < 1e-7, name


def test_leaky_relu_trains_and_is_saved_by_name(tmp_path):
    m = bx.MLP(20, 16, 3, activation="leaky_relu", seed=0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 20)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0)
    opt = bx.SGD(m, lr=0.1, momentum=0.9)
    first = float(m.loss_and_grads(x, y)[0])
    for _ in range(100):
        m.backprop(x, y)
        opt.step()
    assert float(m.loss_and_grads(x, y)[0]) < 0.5 * first
    m.save(tmp_path / "m.npz")
    assert bx.MLP.load(tmp_path / "m.npz").activation == "leaky_relu"


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")
@pytest.mark.parametrize("dtype, batch, n_hidden", [("float32", 128, 64), ("float64", 37, 45)])
def test_leaky_relu_cuda_source_matches_its_xp_lines_on_the_emulator(dtype, batch, n_hidden):
    """The output-layer kernel built with ACTIVATIONS["leaky_relu"].cuda, run on the CPU (cuda_emulator),
    against its NumPy twin; a1 = f(z1 + b1) must be equal bit for bit (one product, rounded the same way)."""
    from kernel_references import output_layer_reference
    from test_cuda_emulated import case, close, run_output_layer

    z1, params, labels = case(np.random.default_rng(batch), batch, n_hidden, 10, dtype)
    assert (z1 + params["b1"] < 0).any()
    expected = output_layer_reference(z1, labels, params, "leaky_relu")
    got = run_output_layer(z1, params, labels, "leaky_relu", 10)[0]  # (the outputs, then counts)
    np.testing.assert_array_equal(got["a1"], expected["a1"])
    for name in ("delta2", "delta1", "W2"):
        close(got[name], expected[name], dtype)
    close(got["b1"], expected["b1"], dtype, atol_scale=10)
    assert LEAKY_SLOPE == 0.01  # the number FORMULAS and PyTorch's default use
