"""The hidden layer's activation functions, as a table: ``ACTIVATIONS[name]`` holds ``f``, ``f'``, the first draw, and both in CUDA C.

scikit-learn's ``ACTIVATIONS``/``DERIVATIVES`` in one table. Every function
is written once against the array module of its arguments (NumPy or CuPy) and
works in place on buffers the caller owns: the training step reuses the same
few buffers every step, so the hot loop allocates nothing of size batch x
hidden (see ``model.py``). The CUDA kernels' device functions for the same
names (the ``cuda`` field, built into ``cuda/output_layer.cu``) are checked against these lines.
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
# leaky_relu' = 1 where a > 0, else α. A new activation is one entry here (its
# forward, derivative, initialisation and the same two lines in CUDA C, which
# cuda/output_layer.cu wraps) and the tests, which take every name in this table.


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


def _elu(z: Any) -> Any:
    """ELU (Clevert et al. 2016, α = 1): ``f(z) = z`` if ``z > 0``, else ``eᶻ − 1`` (``expm1``: exact near 0)."""
    xp = array_module(z)
    negative_part = xp.expm1(xp.minimum(z, 0))  # eᶻ − 1 where z ≤ 0, exactly 0 where z > 0
    xp.maximum(z, 0, out=z)
    z += negative_part  # z + 0 where z > 0 (exact), 0 + (eᶻ − 1) elsewhere
    return z


def _elu_derivative(a: Any, out: Any) -> Any:
    xp = array_module(a)
    xp.add(a, 1, out=out)  # eᶻ = a + 1 where z ≤ 0
    return xp.minimum(out, 1, out=out)  # f' = 1 where a > 0 (a + 1 > 1 there), else a + 1


def _elu_and_derivative(z: Any, fprime: Any) -> Any:
    """ELU with its derivative and no scratch array: ``fprime`` holds ``eᶻ − 1`` on the way."""
    xp = array_module(z)
    xp.minimum(z, 0, out=fprime)
    xp.expm1(fprime, out=fprime)
    xp.maximum(z, 0, out=z)
    z += fprime  # f(z), as _elu computes it
    _elu_derivative(z, fprime)  # then f' from a = f(z)
    return z


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
    # The same f(z) and f'(a) for the GPU: two C expressions in the kernel's float type T (z or a its argument),
    # which cuda/output_layer.cu wraps into its device functions. Same values as the lines above; for the
    # derivative, the same operations in the same order.
    cuda: tuple[str, str]
    forward_and_derivative: Callable[[Any, Any], Any] | None = None  # (z, fprime): both in one go, where cheaper


ACTIVATIONS: dict[str, Activation] = {
    "relu": Activation(
        _relu, _relu_derivative, he_normal, ("z < T(0) ? T(0) : z", "a > T(0) ? T(1) : T(0)"), _relu_and_mask
    ),
    "sigmoid": Activation(_sigmoid, _sigmoid_derivative, glorot_uniform, ("T(1) / (T(1) + exp(-z))", "(T(1) - a) * a")),
    "tanh": Activation(_tanh, _tanh_derivative, glorot_uniform, ("tanh(z)", "T(1) - a * a")),
    # He's draw: its factor for a slope α, 1 / (1 + α²), is 0.9999 at α = 0.01. On the GPU α z is rounded
    # in T, as NumPy's float32 times a Python float is.
    "leaky_relu": Activation(
        _leaky_relu,
        _leaky_relu_derivative,
        he_normal,
        (f"z > T(0) ? z : T({LEAKY_SLOPE!r}) * z", f"a > T(0) ? T(1) : T({LEAKY_SLOPE!r})"),
        _leaky_relu_and_slope,
    ),
    # He's draw, as the ELU paper's. f'(a) = min(a + 1, 1): the same value as "a > 0 ? 1 : a + 1".
    "elu": Activation(
        _elu, _elu_derivative, he_normal, ("z > T(0) ? z : expm1(z)", "a > T(0) ? T(1) : a + T(1)"), _elu_and_derivative
    ),
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
