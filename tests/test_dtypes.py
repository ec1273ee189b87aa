"""float32 stays float32: no array of the training step silently widens to float64.

A float64 temporary in the hot loop would double its memory traffic and halve
BLAS speed without any visible error, so every buffer the step touches is
checked, for every activation, with and without momentum and weight decay, and
with float64 input handed to a float32 model.
"""

from __future__ import annotations

import numpy as np
import pytest

import backprop_xp as bx
from backprop_xp.activations import ACTIVATIONS

pytestmark = pytest.mark.usefixtures("cpu_path")  # the NumPy and the fused CPU paths alike


def hot_path_arrays(model: bx.MLP, optimizer: bx.SGD) -> dict[str, np.ndarray]:
    """Every floating-point array one training step reads or writes, by name."""
    arrays = {"flat_params": model.flat_params, "flat_grads": model.flat_grads}
    arrays.update({f"params[{k}]": v for k, v in model.params.items()})
    arrays.update({f"grads[{k}]": v for k, v in model.grads.items()})
    if optimizer.velocity is not None:
        arrays["velocity"] = optimizer.velocity
    arrays.update({f"optimizer.{k}": v for k, v in vars(optimizer).items() if isinstance(v, np.ndarray)})
    for batch, ws in model._workspaces.items():
        arrays.update({f"workspace[{batch}].{k}": v for k, v in vars(ws).items() if isinstance(v, np.ndarray)})
    return arrays


def batch(n: int = 24, dtype=np.float32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, 784)).astype(dtype), rng.integers(0, 10, size=n)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.9, 1e-3)])
def test_training_step_keeps_every_array_float32(activation, momentum, weight_decay):
    m = bx.MLP(784, 32, 10, activation=activation, dtype="float32")
    opt = bx.SGD(m, lr=0.1, momentum=momentum, weight_decay=weight_decay)
    x, y = batch()
    for _ in range(2):  # the second step reuses the workspace and the velocity
        loss, n_correct = m.backprop(x, y)
        opt.step()
    assert loss.dtype == np.float32, "the loss widened"
    assert 0 <= int(n_correct) <= len(y)
    arrays = hot_path_arrays(m, opt)
    assert any(name.startswith("workspace") for name in arrays)  # the step's buffers are really checked
    widened = {name: a.dtype for name, a in arrays.items() if a.dtype.kind == "f" and a.dtype != np.float32}
    assert not widened, f"float64 crept into the hot path: {widened}"


def test_float64_input_does_not_widen_a_float32_model():
    m = bx.MLP(784, 32, 10, dtype="float32")
    opt = bx.SGD(m, lr=0.1, momentum=0.9)
    x64, y = batch(dtype=np.float64)
    loss, grads = m.loss_and_grads(x64, y)
    opt.step()
    assert isinstance(loss, float) and np.isfinite(loss)
    assert {g.dtype for g in grads.values()} == {np.dtype(np.float32)}
    assert m.as_input(x64).dtype == np.float32
    assert m.logits(x64).dtype == np.float32
    assert m.predict_proba(x64).dtype == np.float32
    widened = {n: a.dtype for n, a in hot_path_arrays(m, opt).items() if a.dtype.kind == "f" and a.dtype != np.float32}
    assert not widened, f"float64 input widened: {widened}"


def test_float64_learning_rate_and_numpy_scalars_do_not_widen():
    """Hyperparameters arrive as Python or NumPy float64 scalars (schedules compute them).

    The update must still be float32 arithmetic, not float64 arithmetic cast
    back (twice the memory traffic, and other rounding): it must equal, bit for
    bit, the same formulas computed with float32 scalars.
    """
    m = bx.MLP(784, 16, 10, dtype="float32")
    opt = bx.SGD(m, lr=0.1, momentum=0.9, weight_decay=1e-4)
    x, y = batch()
    m.backprop(x, y)
    opt.step()  # a non-zero velocity
    m.backprop(x, y)
    w, v, g = m.flat_params.copy(), opt.velocity.copy(), m.flat_grads.copy()
    lr, mu, wd = np.float32(0.05), np.float32(0.8), np.float32(1e-4)
    g += w * wd
    v = v * mu + g
    expected = w - v * lr
    opt.lr, opt.momentum, opt.weight_decay = np.float64(0.05), np.float64(0.8), np.float64(1e-4)
    opt.step()
    assert m.flat_params.dtype == np.float32 and opt.velocity.dtype == np.float32
    np.testing.assert_array_equal(opt.velocity, v)
    np.testing.assert_array_equal(m.flat_params, expected)


def test_float64_model_stays_float64():
    """The other direction: a float64 model (the gradient checks use one) is never narrowed."""
    m = bx.MLP(784, 16, 10, dtype="float64")
    opt = bx.SGD(m, lr=0.1, momentum=0.9)
    x, y = batch(dtype=np.float32)
    loss, _ = m.backprop(m.as_input(x), y)
    opt.step()
    assert loss.dtype == np.float64
    kinds = {n: a.dtype for n, a in hot_path_arrays(m, opt).items() if a.dtype.kind == "f"}
    assert set(kinds.values()) == {np.dtype(np.float64)}, kinds
