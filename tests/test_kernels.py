"""Softmax + cross-entropy and the activations: exact values, stability, gradients, bad labels."""

from __future__ import annotations

import math

import numpy as np
import pytest

import backprop_xp as bx
from backprop_xp.activations import ACTIVATIONS, activation_derivative, activation_forward_
from backprop_xp.gradcheck import numeric_gradient, relative_error


def reference_loss(z: np.ndarray, y: np.ndarray) -> float:
    """Mean −log softmax in float64 via log-sum-exp, independent of the library."""
    z = z.astype(np.float64)
    m = z.max(axis=1, keepdims=True)
    logsumexp = m[:, 0] + np.log(np.exp(z - m).sum(axis=1))
    return float(np.mean(logsumexp - z[np.arange(len(y)), y]))


def test_gradient_matches_central_differences():
    rng = np.random.default_rng(0)
    z, y = rng.normal(size=(8, 10)), rng.integers(0, 10, size=8)
    _, dlogits = bx.softmax_cross_entropy(z, y)
    err = relative_error(numeric_gradient(lambda: bx.softmax_cross_entropy(z, y)[0], z), dlogits)
    assert err < 1e-6


def test_value_and_gradient_are_exact():
    z = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    y = np.array([2, 0])
    loss, dlogits = bx.softmax_cross_entropy(z, y)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    assert loss == pytest.approx(-(np.log(p[0, 2]) + np.log(p[1, 0])) / 2, rel=1e-14)
    np.testing.assert_allclose(dlogits, (p - np.eye(3)[y]) / 2, rtol=1e-14)
    np.testing.assert_allclose(dlogits.sum(axis=1), 0, atol=1e-16)  # softmax − onehot sums to 0


@pytest.mark.parametrize("k", [2, 10, 37])
def test_uniform_logits_give_log_k(k):
    loss, _ = bx.softmax_cross_entropy(np.full((5, k), 3.25, np.float32), np.arange(5) % k)
    assert loss == pytest.approx(math.log(k), rel=1e-6)


def test_huge_logits_stay_finite_and_correct_in_float32():
    z = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, 1e4], [1e4, 1e4, -1e4]], np.float32)
    y = np.array([1, 2, 0])
    loss, dlogits = bx.softmax_cross_entropy(z, y)
    assert np.isfinite(loss) and np.isfinite(dlogits).all()
    assert dlogits.dtype == np.float32
    assert loss == pytest.approx(reference_loss(z, y), rel=1e-6)  # (2e4 + 0 + log 2) / 3
    np.testing.assert_allclose(dlogits[2], [-1 / 6, 1 / 6, 0], atol=1e-7)  # two tied winners


def test_input_is_left_unchanged_and_dtype_kept():
    z = np.random.default_rng(1).normal(size=(4, 10)).astype(np.float32)
    saved = z.copy()
    loss, dlogits = bx.softmax_cross_entropy(z, [1, 2, 3, 4])
    np.testing.assert_array_equal(z, saved)
    assert dlogits.dtype == np.float32 and not np.shares_memory(z, dlogits)
    assert loss == pytest.approx(reference_loss(z, np.array([1, 2, 3, 4])), rel=1e-6)


@pytest.mark.parametrize(
    "labels, message",
    [
        ([0, 1, 10], "label 10 is outside"),
        ([0, -1, 2], "label -1 is outside"),  # must not wrap around to the last class
        ([0, 1], r"labels must have shape \(3,\)"),
        ([0.0, 1.0, 2.0], "labels must be integers"),
    ],
)
def test_bad_labels_raise(labels, message):
    with pytest.raises(ValueError, match=message):
        bx.softmax_cross_entropy(np.zeros((3, 10)), labels)


def test_bad_logits_raise():
    with pytest.raises(ValueError, match="2-D float array"):
        bx.softmax_cross_entropy(np.zeros(10), [1])
    with pytest.raises(ValueError, match="2-D float array"):
        bx.softmax_cross_entropy(np.zeros((2, 3), dtype=np.int64), [0, 1])
    with pytest.raises(ValueError, match="at least one row"):
        bx.softmax_cross_entropy(np.zeros((0, 3)), np.zeros(0, np.int64))


def test_matches_pytorch_cross_entropy(torch):
    rng = np.random.default_rng(2)
    z, y = (rng.normal(size=(64, 10)) * 5).astype(np.float32), rng.integers(0, 10, size=64)
    loss, dlogits = bx.softmax_cross_entropy(z, y)
    t = torch.tensor(z, requires_grad=True)
    ref = torch.nn.functional.cross_entropy(t, torch.tensor(y))
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-6)
    np.testing.assert_allclose(dlogits, t.grad.numpy(), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_derivative_from_output_matches_finite_differences(activation):
    z = np.linspace(-4, 4, 81) + 0.05  # + 0.05 keeps ReLU's kink away from the grid
    a = activation_forward_(z.copy(), activation)
    eps = 1e-6
    numeric = (activation_forward_(z + eps, activation) - activation_forward_(z - eps, activation)) / (2 * eps)
    np.testing.assert_allclose(activation_derivative(a, activation, out=np.empty_like(a)), numeric, atol=1e-8)


def test_activation_values():
    z = np.array([-2.0, 0.0, 3.0])
    np.testing.assert_array_equal(activation_forward_(z.copy(), "relu"), [0, 0, 3])
    np.testing.assert_allclose(activation_forward_(z.copy(), "sigmoid"), 1 / (1 + np.exp(-z)), rtol=1e-15)
    np.testing.assert_allclose(activation_forward_(z.copy(), "tanh"), np.tanh(z), rtol=1e-15)
    # sigmoid of very negative float32 inputs underflows cleanly to 0, with no warning
    with np.errstate(all="raise"):
        assert activation_forward_(np.array([-1e4], np.float32), "sigmoid")[0] == 0.0
