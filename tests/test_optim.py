"""The update rule and SGD with momentum and weight decay, against PyTorch's SGD."""

from __future__ import annotations

import numpy as np
import pytest

import backprop_xp as bx

pytestmark = pytest.mark.usefixtures("cpu_path")  # the NumPy and the fused CPU paths alike


def test_sgd_update_is_the_textbook_rule():
    w = np.array([1.0, -2.0], np.float32)
    out = bx.sgd_update_(w, np.array([0.5, 0.25], np.float32), lr=0.1)
    assert out is w and w.dtype == np.float32
    np.testing.assert_allclose(w, [0.95, -2.025], rtol=1e-7)


@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.9, 5e-4), (0.0, 1e-2)])
def test_sgd_matches_pytorch(momentum, weight_decay, torch):
    m = bx.MLP(20, 8, 3, dtype="float64", seed=1)
    opt = bx.SGD(m, lr=0.05, momentum=momentum, weight_decay=weight_decay)
    tparams = [torch.tensor(m.params[k].copy(), requires_grad=True) for k in ("W1", "b1", "W2", "b2")]
    topt = torch.optim.SGD(tparams, lr=0.05, momentum=momentum, weight_decay=weight_decay)
    rng = np.random.default_rng(0)
    for _ in range(5):
        x, y = rng.normal(size=(16, 20)), rng.integers(0, 3, size=16)
        _, grads = m.loss_and_grads(x, y)
        for t, name in zip(tparams, ("W1", "b1", "W2", "b2")):
            t.grad = torch.tensor(grads[name])
        opt.step()
        topt.step()
    for t, name in zip(tparams, ("W1", "b1", "W2", "b2")):
        np.testing.assert_allclose(m.params[name], t.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_learning_rate_can_change_between_steps():
    m = bx.MLP(4, 3, 2, dtype="float64")
    opt = bx.SGD(m, lr=0.1)
    w = m.params["W1"].copy()
    m.flat_grads[...] = 1.0
    opt.lr = 0.25
    opt.step()
    np.testing.assert_allclose(m.params["W1"], w - 0.25)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": 0}, "learning rate must be a finite number > 0"),
        ({"lr": -1}, "learning rate must be a finite number > 0"),
        ({"lr": float("nan")}, "learning rate must be a finite number > 0"),
        ({"lr": float("inf")}, "learning rate must be a finite number > 0"),
        ({"lr": 0.1, "momentum": 1.0}, r"momentum must be in \[0, 1\)"),
        ({"lr": 0.1, "weight_decay": -1e-4}, "weight decay must be a finite number >= 0"),
        ({"lr": 0.1, "weight_decay": float("inf")}, "weight decay must be a finite number >= 0"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bx.SGD(bx.MLP(4, 3, 2), **kwargs)


def test_sgd_without_a_model_says_so():
    with pytest.raises(TypeError, match="SGD needs the model to train \\(an MLP\\), got NoneType"):
        bx.SGD(None, lr=0.1)
