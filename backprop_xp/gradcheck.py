"""Checking hand-derived gradients against central finite differences.

``∂L/∂w ≈ (L(w + ε) − L(w − ε)) / 2ε`` has error O(ε²); in float64 with
ε = 1e-6 it agrees with a correct analytic gradient to about 1e-9 relative,
while a wrong formula is off by order 1. The tests and ``scripts/gradcheck.py``
use this on every parameter of a small network.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def relative_error(numeric: np.ndarray, analytic: np.ndarray) -> float:
    """``‖numeric − analytic‖ / (‖numeric‖ + ‖analytic‖)``, 0 when both are 0."""
    numeric, analytic = np.asarray(numeric, np.float64), np.asarray(analytic, np.float64)
    scale = np.linalg.norm(numeric) + np.linalg.norm(analytic)
    return float(np.linalg.norm(numeric - analytic) / scale) if scale > 0 else 0.0


def numeric_gradient(loss: Callable[[], float], p: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences of ``loss()`` for every entry of the array ``p``.

    ``loss`` is called with ``p`` perturbed in place, one entry at a time; each
    entry is restored exactly afterwards. Use float64: in float32 the
    difference quotient is dominated by rounding.

    >>> import backprop_xp as bx
    >>> m = bx.MLP(3, 4, 2, dtype="float64")
    >>> x, y = np.ones((2, 3)), np.array([0, 1])
    >>> numeric = numeric_gradient(lambda: m.loss_and_grads(x, y)[0], m.params["W2"])
    >>> relative_error(numeric, m.loss_and_grads(x, y)[1]["W2"]) < 1e-6
    True
    """
    grad = np.zeros(p.shape)
    for idx in np.ndindex(p.shape):
        saved = p[idx].item()
        p[idx] = saved + eps
        up = loss()
        p[idx] = saved - eps
        down = loss()
        p[idx] = saved
        grad[idx] = (up - down) / (2 * eps)
    return grad
