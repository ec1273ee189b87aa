"""The elementwise building blocks of the network: activations and softmax + cross-entropy.

Every function here is written once against the array module of its arguments
(NumPy or CuPy), works in place on buffers the caller owns, and is the
reference the tests check everything else against. The fused CUDA versions of
the same operations (one kernel launch each) live beside these in
``cuda/kernels.py`` and are compared with these functions by the GPU tests.

Why in place: the training step reuses the same few buffers every step, so the
hot loop allocates nothing of size batch x hidden (see ``model.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from .backend import array_module
from .checks import check_choice

# --------------------------------------------------------------------------- activations
# The table: one entry per activation, scikit-learn's ACTIVATIONS/DERIVATIVES in one.
# a = f(z) is computed in place. The derivative f'(z) is written in terms of the
# output a = f(z), which the backward pass already has, so the forward pass
# need not keep z1 alive: relu' = [a > 0], sigmoid' = a(1 - a), tanh' = 1 - a²,
# leaky_relu' = 1 where a > 0, else α. A new activation is one entry here, its
# CUDA device functions under the same name in cuda/kernels.py
# (``ACTIVATION_SOURCES[name]``: ``act_forward(z)``, ``act_derivative(a)``), and
# the tests, which take every name in this table.


def _relu(z: Any) -> Any:
    return array_module(z).maximum(z, 0, out=z)


def _relu_and_mask(z: Any, fprime: Any) -> Any:
    """ReLU with its derivative for free: ``a = z ⊙ [z > 0]`` computes the mask the backward pass needs anyway;
    ``greater`` + ``multiply`` is cheaper than NumPy's NaN-aware ``maximum`` on data of random sign
    (measured in ``bench/NOTES.md``)."""
    xp = array_module(z)
    xp.greater(z, 0, out=fprime)  # relu'(z) = [z > 0]
    return xp.multiply(z, fprime, out=z)  # relu(z) = z ⊙ [z > 0]


def _relu_derivative(a: Any, out: Any) -> Any:
    return array_module(a).greater(a, 0, out=out)  # the subgradient at 0 is taken as 0, like PyTorch


def _sigmoid(z: Any) -> Any:
    # 1 / (1 + exp(-z)); exp(-z) may overflow to inf for z << 0, which gives
    # exactly 0, the right limit, so no clipping is needed.
    xp = array_module(z)
    with np.errstate(over="ignore"):
        xp.negative(z, out=z)
        xp.exp(z, out=z)
    z += 1
    return xp.reciprocal(z, out=z)


def _sigmoid_derivative(a: Any, out: Any) -> Any:
    xp = array_module(a)
    xp.subtract(1, a, out=out)
    return xp.multiply(out, a, out=out)  # σ' = (1 − a) a


def _tanh(z: Any) -> Any:
    return array_module(z).tanh(z, out=z)


def _tanh_derivative(a: Any, out: Any) -> Any:
    xp = array_module(a)
    xp.multiply(a, a, out=out)
    return xp.subtract(1, out, out=out)  # tanh' = 1 − a²


LEAKY_SLOPE = 0.01  # α, PyTorch's LeakyReLU default; the CUDA source writes the same number


def _leaky_relu(z: Any) -> Any:
    xp = array_module(z)
    return xp.maximum(z, xp.multiply(z, LEAKY_SLOPE), out=z)  # f(z) = max(z, α z): z if z > 0, else α z (0 < α < 1)


def _leaky_relu_derivative(a: Any, out: Any) -> Any:
    xp = array_module(a)
    xp.greater(a, 0, out=out)  # [a > 0] (a > 0 exactly where z > 0)
    return xp.maximum(out, LEAKY_SLOPE, out=out)  # f' = 1 where a > 0, else α


def _leaky_relu_and_slope(z: Any, fprime: Any) -> Any:
    """Leaky ReLU with its derivative, as ReLU's: ``f'(z) = max([z > 0], α)``, then ``a = z ⊙ f'(z)``."""
    xp = array_module(z)
    xp.greater(z, 0, out=fprime)
    xp.maximum(fprime, LEAKY_SLOPE, out=fprime)  # f'(z) = 1 where z > 0, else α
    return xp.multiply(z, fprime, out=z)  # f(z) = z ⊙ f'(z): z if z > 0, else α z


def he_normal(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """He et al. (2015): ``N(0, 2 / fan_in)``, which keeps the variance of ReLU layers' outputs steady."""
    return rng.normal(0.0, math.sqrt(2.0 / shape[1]), size=shape)


def glorot_uniform(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Glorot & Bengio (2010): ``U(−l, l)``, ``l = √(6 / (fan_in + fan_out))``, for sigmoid and tanh."""
    limit = math.sqrt(6.0 / (shape[0] + shape[1]))
    return rng.uniform(-limit, limit, size=shape)


class Activation(NamedTuple):
    """One row of the table: what the network needs of an activation function."""

    forward: Callable[[Any], Any]  # z ← f(z), in place; returns z
    derivative: Callable[[Any, Any], Any]  # out ← f'(z), computed from a = f(z); returns out
    init: Callable[[np.random.Generator, tuple[int, int]], np.ndarray]  # the weights' first draw, (fan_out, fan_in)
    forward_and_derivative: Callable[[Any, Any], Any] | None = None  # (z, fprime): both in one go, where cheaper


ACTIVATIONS: dict[str, Activation] = {
    "relu": Activation(_relu, _relu_derivative, he_normal, _relu_and_mask),
    "sigmoid": Activation(_sigmoid, _sigmoid_derivative, glorot_uniform),
    "tanh": Activation(_tanh, _tanh_derivative, glorot_uniform),
    # He's draw: its factor for a slope α, 1 / (1 + α²), is 0.9999 at α = 0.01
    "leaky_relu": Activation(_leaky_relu, _leaky_relu_derivative, he_normal, _leaky_relu_and_slope),
}


def activation_forward_(z: Any, activation: str, fprime: Any = None) -> Any:
    """Overwrite ``z`` with ``f(z)`` and return it; also write ``f'(z)`` into ``fprime`` if given.

    The training step passes ``fprime``: the backward pass needs ``f'(z1)``,
    and for ReLU the forward pass gets it for free (``forward_and_derivative``).
    The other activations derive ``f'`` from ``a`` afterwards, as
    ``activation_derivative`` does.
    """
    entry = ACTIVATIONS[check_choice("activation", activation, ACTIVATIONS)]
    if fprime is not None and entry.forward_and_derivative is not None:
        return entry.forward_and_derivative(z, fprime)
    entry.forward(z)
    if fprime is not None:
        entry.derivative(z, fprime)
    return z


def activation_derivative(a: Any, activation: str, out: Any) -> Any:
    """``f'(z)`` from the activation's output ``a = f(z)``, written into ``out``."""
    return ACTIVATIONS[check_choice("activation", activation, ACTIVATIONS)].derivative(a, out)


# --------------------------------------------------------------------------- softmax + cross-entropy


def check_labels(labels: Any, n_rows: int, n_classes: int) -> None:
    """Raise ValueError unless ``labels`` is ``n_rows`` integers in ``[0, n_classes)``.

    A label out of range must never wrap around (NumPy's negative indexing would
    silently pick another class) or read past the end of a row.
    """
    if labels.ndim != 1 or labels.shape[0] != n_rows:
        raise ValueError(f"labels must have shape ({n_rows},), got {tuple(labels.shape)}")
    if labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if n_rows == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= n_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"label {bad} is outside [0, {n_classes}) for {n_classes} classes")


def softmax_(z: Any) -> Any:
    """Overwrite ``z`` with ``ŷ = softmax(z)`` row by row (max-subtracted: no overflow); return it."""
    xp = array_module(z)
    z -= z.max(axis=1, keepdims=True)
    xp.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def softmax_cross_entropy_(logits: Any, labels: Any, out: Any, *, rows: Any = None) -> Any:
    """Mean cross-entropy of ``softmax(logits)`` against ``labels``, and its gradient.

    Writes ``δ2 = (ŷ − y) / B`` into ``out`` (which may be ``logits`` itself) and
    returns the loss ``mean_b −log ŷ_b[label_b]`` as a 0-d array on the same
    backend, so that a GPU caller does not wait for the device. Labels are
    trusted here; ``softmax_cross_entropy`` checks them. ``rows`` may pass a
    cached ``arange(B)`` (the training step keeps one per batch size).

    Stable for any finite logits: subtracting each row's max makes every
    exponent <= 0, and the log-probability of the label is taken as
    ``(z_y − max) − log Σ exp(z − max)`` instead of ``log`` of a probability
    that may have underflowed to 0.

    Any memory layout works. The model passes ``(B, K)`` views of ``(K, B)``
    buffers: the per-row reductions over K = 10 classes then run along the
    long contiguous axis, several times faster in NumPy than ten-element rows.
    """
    xp = array_module(logits)
    batch = logits.shape[0]
    if rows is None:
        rows = xp.arange(batch)
    xp.subtract(logits, logits.max(axis=1, keepdims=True), out=out)  # z − max(z) <= 0
    label_logit = out[rows, labels]  # z_y − max, taken before exp overwrites it
    xp.exp(out, out=out)
    row_sum = out.sum(axis=1, keepdims=True)
    loss = (xp.log(row_sum[:, 0]) - label_logit).sum() / batch  # −log ŷ_y = log Σ exp − (z_y − max)
    row_sum *= batch  # one division gives ŷ / B, the mean over the batch
    out /= row_sum  # ŷ / B, ŷ = softmax(z)
    out[rows, labels] -= 1.0 / batch  # (ŷ − y) / B, y one-hot
    return loss


def softmax_cross_entropy(logits: Any, labels: Any) -> tuple[float, Any]:
    """Mean softmax cross-entropy and its gradient with respect to the logits.

    Parameters
    ----------
    logits : array of shape (B, K), float32 or float64, NumPy or CuPy
        Unnormalised scores ``z2``.
    labels : integer array of shape (B,)
        Classes in ``[0, K)``; converted to the backend of ``logits``.

    Returns
    -------
    loss : float
        ``mean_b −log softmax(z_b)[label_b]``.
    dlogits : array like ``logits``
        ``(softmax(z) − onehot(labels)) / B``; ``logits`` is left unchanged.

    Raises
    ------
    ValueError
        Logits that are not a 2-D float array, or labels of the wrong shape,
        type or range.
    """
    xp = array_module(logits)
    if logits.ndim != 2 or logits.dtype.kind != "f":
        raise ValueError(f"logits must be a 2-D float array, got shape {tuple(logits.shape)} dtype {logits.dtype}")
    labels = xp.asarray(labels)
    check_labels(labels, logits.shape[0], logits.shape[1])
    if logits.shape[0] == 0:
        raise ValueError("softmax_cross_entropy needs at least one row")
    dlogits = xp.empty_like(logits)
    loss = softmax_cross_entropy_(logits, labels, out=dlogits)
    return float(loss), dlogits
