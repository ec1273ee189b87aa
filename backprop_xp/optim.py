"""Gradient descent: the update rule ``w ← w − η ∂L/∂w``, with momentum and weight decay.

The optimizer works on the model's flat parameter and gradient buffers (every
parameter is a view into one array), so one step is a handful of whole-buffer
operations whatever the number of parameters: few calls on the CPU, few kernel
launches on the GPU.
"""

from __future__ import annotations

from typing import Any

from . import fused_cpu
from .backend import array_module
from .checks import FRACTION, NON_NEGATIVE, POSITIVE, check


def sgd_update(w: Any, grad: Any, lr: float, *, scratch: Any = None) -> Any:
    """The gradient-descent update ``w ← w − η ∂L/∂w``, in place; returns ``w``.

    ``scratch``, an array like ``w``, receives ``η ∂L/∂w`` on the way, so that
    the update allocates nothing (the optimizer keeps one for every step).

    The lab report's scalar example: a neuron ``y = w x`` with squared error
    ``L = (target − y)²``, so ``∂L/∂w = −2 (target − w x) x``. With ``x = 2``,
    ``target = 10``, ``w = 3`` and ``η = 0.01`` the gradient is −16 and one step
    gives ``w = 3.16``:

    >>> import numpy as np
    >>> w, x, target = np.array([3.0]), 2.0, 10.0
    >>> grad = -2 * (target - w * x) * x
    >>> sgd_update(w, grad, lr=0.01)
    array([3.16])
    """
    xp = array_module(w)
    w -= xp.multiply(grad, lr, dtype=w.dtype, out=scratch)
    return w


class SGD:
    """Stochastic gradient descent with optional momentum and weight decay.

    With momentum ``μ`` and weight decay ``λ`` (PyTorch's convention, so the two
    can be compared step for step)::

        g ← ∂L/∂w + λ w
        v ← μ v + g
        w ← w − η v

    Parameters
    ----------
    model : MLP
        The model whose ``flat_params`` are updated from its ``flat_grads``.
    lr : float
        Learning rate ``η`` (> 0). May be changed between steps (schedules do).
    momentum : float, default 0
        ``μ`` in ``[0, 1)``.
    weight_decay : float, default 0
        ``λ >= 0``, an L2 penalty ``λ/2 ‖w‖²`` on every parameter.
    """

    def __init__(self, model: Any, lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        if not hasattr(model, "flat_params"):
            raise TypeError(f"SGD needs the model to train (an MLP), got {type(model).__name__}")
        check("learning rate", lr, POSITIVE)
        check("momentum", momentum, FRACTION)
        check("weight decay", weight_decay, NON_NEGATIVE)
        self.model = model
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        xp = model.xp
        self.velocity = xp.zeros_like(model.flat_params) if momentum else None
        # Room for η v (and λ w): with it a step is four in-place passes over
        # the parameters and allocates nothing.
        self._scratch = xp.empty_like(model.flat_params)

    def step(self) -> None:
        """Apply one update from the gradients currently in ``model.flat_grads``.

        Weight decay is added into the gradient buffer itself (it is recomputed
        by the next backward pass anyway).
        """
        xp = self.model.xp
        w, g, scratch = self.model.flat_params, self.model.flat_grads, self._scratch
        if fused_cpu.active(xp):  # the same arithmetic in one multi-core pass, bit for bit
            if self.velocity is not None:
                fused_cpu.momentum_update_(w, g, self.velocity, self.lr, self.momentum, self.weight_decay)
            else:
                fused_cpu.sgd_update_(w, g, self.lr, self.weight_decay)
            return
        if self.weight_decay:
            g += xp.multiply(w, self.weight_decay, dtype=w.dtype, out=scratch)  # g ← ∂L/∂w + λ w
        if self.velocity is not None:
            # dtype=: a float64 μ must not widen the pass
            xp.multiply(self.velocity, self.momentum, dtype=w.dtype, out=self.velocity)
            self.velocity += g  # v ← μ v + g
            g = self.velocity
        sgd_update(w, g, self.lr, scratch=scratch)  # w ← w − η v
