"""The fast paths compute exactly what the plain formulas say, and allocate nothing large.

``MLP.backprop`` is written for speed (buffers reused, the output layer stored
transposed, ReLU's mask kept from the forward pass, bias gradients as BLAS
products, the update in place). Here it is checked against the textbook
formulas written naively, and the training step is checked to allocate no
array the size of a batch's activations.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import backprop_xp as bx
from backprop_xp.activations import ACTIVATIONS, activation_forward_

pytestmark = pytest.mark.usefixtures("cpu_path")  # the NumPy and the fused CPU paths alike


def textbook_step(params: dict, x: np.ndarray, y: np.ndarray, activation: str) -> tuple[float, dict, int]:
    """The README's formulas, one NumPy expression each, in float64."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    x = x.astype(np.float64)
    f = {"relu": lambda z: np.maximum(z, 0), "sigmoid": lambda z: 1 / (1 + np.exp(-z)), "tanh": np.tanh,
         "leaky_relu": lambda z: np.where(z > 0, z, 0.01 * z),
         "elu": lambda z: np.where(z > 0, z, np.expm1(np.minimum(z, 0)))}[activation]  # fmt: skip
    df = {
        "relu": lambda z: (z > 0) * 1.0,
        "leaky_relu": lambda z: np.where(z > 0, 1.0, 0.01),
        "elu": lambda z: np.where(z > 0, 1.0, np.exp(np.minimum(z, 0))),
        "sigmoid": lambda z: f(z) * (1 - f(z)),
        "tanh": lambda z: 1 - np.tanh(z) ** 2,
    }
    z1 = x @ p["W1"].T + p["b1"]
    a1 = f(z1)
    z2 = a1 @ p["W2"].T + p["b2"]
    yhat = np.exp(z2 - z2.max(axis=1, keepdims=True))
    yhat /= yhat.sum(axis=1, keepdims=True)
    onehot = np.eye(z2.shape[1])[y]
    loss = -np.mean(np.log(yhat[np.arange(len(y)), y]))
    d2 = (yhat - onehot) / len(y)
    d1 = d2 @ p["W2"] * df[activation](z1)
    grads = {"W2": d2.T @ a1, "b2": d2.sum(axis=0), "W1": d1.T @ x, "b1": d1.sum(axis=0)}
    return loss, grads, int((z2.argmax(axis=1) == y).sum())


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("n", [1, 7, 64])
def test_backprop_matches_the_textbook_formulas(activation, n):
    m = bx.MLP(784, 48, 10, activation=activation, seed=1)
    rng = np.random.default_rng(n)
    m.params["b1"][...] = rng.normal(scale=0.3, size=48)
    m.params["b2"][...] = rng.normal(scale=0.3, size=10)
    x, y = rng.random((n, 784), dtype=np.float32), rng.integers(0, 10, size=n)
    want_loss, want_grads, want_correct = textbook_step(m.params, x, y, activation)
    for _ in range(2):  # the second call runs on the reused workspace
        loss, n_correct = m.backprop(x, y)
        assert float(loss) == pytest.approx(want_loss, rel=1e-5)
        assert int(n_correct) == want_correct
        for name, want in want_grads.items():
            np.testing.assert_allclose(m.grads[name], want, rtol=2e-4, atol=1e-7, err_msg=name)


def test_workspace_sizes_do_not_mix():
    """A full batch, then a short last batch, then a full one again: each uses its own buffers."""
    m = bx.MLP(784, 32, 10, seed=2)
    rng = np.random.default_rng(0)
    x, y = rng.random((100, 784), dtype=np.float32), rng.integers(0, 10, size=100)
    want = {n: textbook_step(m.params, x[:n], y[:n], "relu")[1]["W1"] for n in (64, 36)}
    for n in (64, 36, 64):
        m.backprop(x[:n], y[:n])
        np.testing.assert_allclose(m.grads["W1"], want[n], rtol=2e-4, atol=1e-7)


def test_relu_forward_with_mask_equals_maximum_and_keeps_the_derivative():
    z = np.random.default_rng(3).normal(size=(50, 40)).astype(np.float32)
    z[0, :5] = [0.0, -0.0, 1e-30, -1e-30, np.float32(3e38)]
    plain = activation_forward_(z.copy(), "relu")
    mask = np.empty_like(z)
    fast = activation_forward_(z.copy(), "relu", fprime=mask)
    np.testing.assert_array_equal(fast, plain)
    np.testing.assert_array_equal(mask, (z > 0).astype(np.float32))


@pytest.mark.parametrize("activation", ["sigmoid", "tanh"])
def test_forward_derivative_equals_the_derivative_from_the_output(activation):
    from backprop_xp.activations import activation_derivative

    z = np.random.default_rng(4).normal(size=(20, 30))
    fprime = np.empty_like(z)
    a = activation_forward_(z.copy(), activation, fprime=fprime)
    np.testing.assert_array_equal(fprime, activation_derivative(a, activation, out=np.empty_like(a)))


def test_sgd_with_momentum_and_weight_decay_matches_the_formulas():
    m = bx.MLP(784, 16, 10, seed=5)
    opt = bx.SGD(m, lr=0.05, momentum=0.9, weight_decay=1e-3)
    rng = np.random.default_rng(5)
    w = m.flat_params.astype(np.float64)
    v = np.zeros_like(w)
    for _ in range(3):
        m.flat_grads[...] = rng.normal(size=m.flat_grads.shape)
        g = m.flat_grads.astype(np.float64) + 1e-3 * w
        v = 0.9 * v + g
        w = w - 0.05 * v
        opt.step()
    np.testing.assert_allclose(m.flat_params, w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(opt.velocity, v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_training_step_allocates_no_batch_sized_array(activation):
    """After the first step, forward + backward + update reuse their buffers, whatever the activation.

    NumPy reports its array memory to tracemalloc. One ``(batch, hidden)``
    float32 array here is 256 KiB; the step may allocate only small things
    (per-example vectors of the softmax, NumPy's fixed 32 KiB ufunc buffer).
    """
    batch, hidden = 128, 512
    m = bx.MLP(784, hidden, 10, activation=activation)
    opt = bx.SGD(m, lr=0.1, momentum=0.9, weight_decay=1e-4)
    rng = np.random.default_rng(0)
    x, y = rng.random((batch, 784), dtype=np.float32), rng.integers(0, 10, size=batch)
    m.backprop(x, y)
    opt.step()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        for _ in range(3):
            m.backprop(x, y)
            opt.step()
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    one_activation = batch * hidden * 4
    assert peak < one_activation // 4, f"the step allocated {peak} bytes at its peak"
