"""The NumPy twins of the CUDA kernels against the model itself, on the CPU.

The GPU tests compare each fused kernel with its twin in ``cuda/kernels.py``;
these tests make sure the twins compute what ``MLP.backprop`` computes, so a
kernel that matches its twin matches the model.
"""

from __future__ import annotations

import numpy as np
import pytest

import backprop_xp as bx
from backprop_xp.cuda import kernels as kc


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
    twin = kc.output_layer_reference(z1, y, m.params, activation)
    np.testing.assert_array_equal(z1, x @ m.params["W1"].T)  # the twin leaves z1 alone
    np.testing.assert_allclose(twin["loss"], loss, rtol=1e-12)
    assert int(twin["n_correct"]) == int(n_correct)
    for name in ("W2", "b1", "b2"):
        np.testing.assert_allclose(twin[name], m.grads[name], rtol=1e-12, atol=1e-15)
    # ∂L/∂W1 = δ1ᵀ x from the twin's δ1: what the step's last product computes
    np.testing.assert_allclose(twin["delta1"].T @ x, m.grads["W1"], rtol=1e-12, atol=1e-15)


def test_xent_step_twin_equals_backprop_output_layer():
    rng = np.random.default_rng(1)
    m = bx.MLP(12, 9, 10, dtype="float64")
    m.params["b2"][...] = rng.normal(0, 1, 10)
    x, y = rng.random((15, 12)), rng.integers(0, 10, 15)
    loss, n_correct = m.backprop(x, y)
    a1 = np.maximum(x @ m.params["W1"].T + m.params["b1"], 0)
    delta, bias_grad, twin_loss, twin_correct = kc.softmax_xent_step_reference(a1 @ m.params["W2"].T, m.params["b2"], y)
    np.testing.assert_allclose(twin_loss, loss, rtol=1e-12)
    assert int(twin_correct) == int(n_correct)
    np.testing.assert_allclose(bias_grad, m.grads["b2"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(delta.T @ a1, m.grads["W2"], rtol=1e-12, atol=1e-15)


def test_output_layer_grid_and_shared_memory():
    """Every row is in exactly one block, blocks are capped, and the shared-memory check counts W2 and δ2."""
    for batch in (1, 15, 16, 17, 128, 511, 512, 513, 4096, 60_000):
        rows, blocks = kc.output_layer_grid(batch)
        assert rows >= kc.OUTPUT_LAYER_MIN_ROWS and blocks <= kc.OUTPUT_LAYER_MAX_BLOCKS
        assert (blocks - 1) * rows < batch <= blocks * rows
    limit = 227 * 1024  # an H100's opt-in shared memory per block
    assert kc.output_layer_shared_bytes(128, 800, 10, "float32") == (10 * 800 + 16 * 10) * 4
    assert kc.output_layer_fits(128, 2048, 10, "float64", limit)  # 160 KiB of W2
    assert not kc.output_layer_fits(128, 4096, 10, "float64", limit)
    assert not kc.output_layer_fits(128, 64, kc.OUTPUT_LAYER_MAX_CLASSES + 1, "float32", limit)
