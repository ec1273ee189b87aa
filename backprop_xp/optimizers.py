"""The optimizers, as a table: ``OPTIMIZERS = {"sgd": SGD, "nesterov": Nesterov, "adam": Adam, "adamw": AdamW}``.

Each entry is one small class holding its update (``step``), the arrays it
carries from step to step (``STATE``, saved by ``state_dict()``) and the
settings it reads from a ``TrainConfig`` (``SETTINGS``). A new optimizer is
one class, one entry here, its settings' rules in ``training/config.py`` and
its tests (``tests/test_optimizers.py``).

Every optimizer works on the model's flat parameter and gradient buffers (every
parameter is a view into one array), so one step is a handful of whole-buffer
operations whatever the number of parameters: few calls on the CPU, few kernel
launches on the GPU. Each update is written once against ``xp`` and follows
PyTorch's conventions, so that the tests compare them step for step with
``torch.optim``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .backend import array_module, to_numpy
from .checks import FRACTION, NON_NEGATIVE, POSITIVE, POSITIVE_FRACTION, check, check_choice


def sgd_update_(w: Any, grad: Any, lr: float, *, scratch: Any = None) -> Any:
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
    >>> sgd_update_(w, grad, lr=0.01)
    array([3.16])
    """
    xp = array_module(w)
    w -= xp.multiply(grad, lr, dtype=w.dtype, out=scratch)
    return w


class Optimizer:
    """What every optimizer shares: its model, learning rate, and saving and restoring its state.

    ``STATE`` names the attributes the update carries from one step to the
    next (arrays shaped like ``model.flat_params``, or an int step count);
    ``SETTINGS`` names its hyperparameters, which are ``TrainConfig`` fields
    of the same name (``make_optimizer`` reads them from there).
    """

    STATE: tuple[str, ...] = ()
    SETTINGS: tuple[str, ...] = ()

    def __init__(self, model: Any, lr: float) -> None:
        if not hasattr(model, "flat_params"):
            raise TypeError(f"{type(self).__name__} needs the model to train (an MLP), got {type(model).__name__}")
        check("learning rate", lr, POSITIVE)
        self.model = model
        self.lr = float(lr)
        # Room for intermediate terms: with it a step allocates nothing.
        self._scratch = model.xp.empty_like(model.flat_params)

    def settings(self) -> dict[str, float]:
        """The hyperparameters other than the learning rate, by name (a twin is ``type(opt)(model, lr, **these)``)."""
        return {name: getattr(self, name) for name in self.SETTINGS}

    def state_dict(self) -> dict[str, np.ndarray]:
        """The state, as host arrays by name (an unused momentum buffer is an empty array; a count a 0-d int64)."""
        state = {}
        for name in self.STATE:
            value = getattr(self, name)
            if value is None:
                state[name] = np.zeros(0, self.model.dtype)
            elif isinstance(value, int):
                state[name] = np.int64(value)
            else:
                state[name] = to_numpy(value).copy()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put ``state`` (from ``state_dict()``) back; ValueError naming the entry that is missing or misshapen."""
        for name in self.STATE:
            if name not in state:
                raise ValueError(f"{type(self).__name__} state has no {name!r}")
            value, mine = np.asarray(state[name]), getattr(self, name)
            if isinstance(mine, int):
                setattr(self, name, int(value))
                continue
            shape = (0,) if mine is None else mine.shape
            if value.shape != shape:
                raise ValueError(f"{type(self).__name__} state {name!r} has shape {value.shape}, expected {shape}")
            if mine is not None:
                mine[...] = self.model.xp.asarray(value)


class SGD(Optimizer):
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

    STATE = ("velocity",)
    SETTINGS = ("momentum", "weight_decay")

    def __init__(self, model: Any, lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        super().__init__(model, lr)
        check("momentum", momentum, FRACTION)
        check("weight decay", weight_decay, NON_NEGATIVE)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        # None without momentum; the scratch holds η v (and λ w): a step is four in-place passes.
        self.velocity = model.xp.zeros_like(model.flat_params) if momentum else None

    def step(self) -> None:
        """Apply one update from the gradients currently in ``model.flat_grads``.

        Weight decay is added into the gradient buffer itself (it is recomputed
        by the next backward pass anyway).
        """
        xp = self.model.xp
        w, g, scratch = self.model.flat_params, self.model.flat_grads, self._scratch
        if self.weight_decay:
            g += xp.multiply(w, self.weight_decay, dtype=w.dtype, out=scratch)  # g ← ∂L/∂w + λ w
        if self.velocity is not None:
            # dtype=: a float64 μ must not widen the pass
            xp.multiply(self.velocity, self.momentum, dtype=w.dtype, out=self.velocity)
            self.velocity += g  # v ← μ v + g
            g = self.velocity
        sgd_update_(w, g, self.lr, scratch=scratch)  # w ← w − η v


class Nesterov(SGD):
    """SGD with Nesterov momentum (PyTorch's ``SGD(nesterov=True)``): the step looks ahead along ``v``.

    The gradient is that at ``w``, and the step is taken from where momentum
    alone would carry ``w`` next (Sutskever et al. 2013, in PyTorch's form)::

        g ← ∂L/∂w + λ w
        v ← μ v + g
        w ← w − η (g + μ v)

    ``momentum`` must be > 0 (without it this is plain SGD). There is no fused
    CPU loop or CUDA kernel for it: every step runs the ``xp`` lines below
    (``step.make_step`` never replaces an update it has no fused form of).
    """

    def __init__(self, model: Any, lr: float, momentum: float = 0.9, weight_decay: float = 0.0) -> None:
        check("momentum", momentum, POSITIVE_FRACTION)
        super().__init__(model, lr, momentum, weight_decay)

    def step(self) -> None:
        """Apply one update from ``model.flat_grads`` (weight decay is added into that buffer)."""
        xp = self.model.xp
        w, g, v, scratch = self.model.flat_params, self.model.flat_grads, self.velocity, self._scratch
        if self.weight_decay:
            g += xp.multiply(w, self.weight_decay, dtype=w.dtype, out=scratch)  # g ← ∂L/∂w + λ w
        xp.multiply(v, self.momentum, dtype=w.dtype, out=v)
        v += g  # v ← μ v + g
        g += xp.multiply(v, self.momentum, dtype=w.dtype, out=scratch)  # g + μ v, the look-ahead direction
        sgd_update_(w, g, self.lr, scratch=scratch)  # w ← w − η (g + μ v)


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015), with PyTorch's conventions; weight decay as an L2 term in the gradient.

    With step count ``t`` (1 at the first step), ``β₁, β₂`` the decay rates of
    the two running moments, ``ε`` a floor under the denominator::

        g ← ∂L/∂w + λ w
        m ← β₁ m + (1 − β₁) g          (running mean of g)
        v ← β₂ v + (1 − β₂) g²         (running mean of g², elementwise)
        m̂ = m / (1 − β₁ᵗ),  v̂ = v / (1 − β₂ᵗ)   (both start at 0: undo that bias)
        w ← w − η m̂ / (√v̂ + ε)

    Each parameter moves by about ``η`` at most, whatever its gradient's
    scale: the usual learning rate is 1e-3, not SGD's 0.1. The last line is
    computed as PyTorch does, ``w − (η / (1 − β₁ᵗ)) m / (√v / √(1 − β₂ᵗ) + ε)``.
    ``AdamW`` decouples the weight decay. The fused steps run the same
    arithmetic in one pass (``cpu/numba_loops.py``'s ``adam_loop_``, bit for bit).
    """

    STATE = ("m", "v", "t")
    SETTINGS = ("beta1", "beta2", "eps", "weight_decay")
    DECOUPLED = False  # AdamW's weight decay (``decay``) instead of the L2 term

    def __init__(
        self, model: Any, lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:  # fmt: skip
        super().__init__(model, lr)
        check("beta1", beta1, FRACTION)
        check("beta2", beta2, FRACTION)
        check("eps", eps, POSITIVE)
        check("weight decay", weight_decay, NON_NEGATIVE)
        self.beta1, self.beta2, self.eps, self.weight_decay = (
            float(beta1),
            float(beta2),
            float(eps),
            float(weight_decay),
        )
        xp = model.xp
        self.m = xp.zeros_like(model.flat_params)
        self.v = xp.zeros_like(model.flat_params)
        self.t = 0

    def step(self) -> None:
        """Apply one update from ``model.flat_grads`` (weight decay, if any, is added into that buffer)."""
        xp, dtype = self.model.xp, self.model.dtype
        w, g, scratch = self.model.flat_params, self.model.flat_grads, self._scratch
        b1, b2 = self.beta1, self.beta2
        self.t += 1
        self.decay(w, g)
        self.m *= b1
        self.m += xp.multiply(g, 1 - b1, dtype=dtype, out=scratch)  # m ← β₁ m + (1 − β₁) g
        self.v *= b2
        xp.multiply(g, g, out=scratch)
        self.v += xp.multiply(scratch, 1 - b2, dtype=dtype, out=scratch)  # v ← β₂ v + (1 − β₂) g²
        denominator = xp.sqrt(self.v, out=scratch)
        denominator /= math.sqrt(1 - b2**self.t)
        denominator += self.eps  # √v̂ + ε
        step = xp.divide(self.m, denominator, out=scratch)
        step *= self.lr / (1 - b1**self.t)  # η m̂ / (√v̂ + ε), with m̂'s correction folded into η
        w -= step  # w ← w − η m̂ / (√v̂ + ε)

    def fused_hyper(self) -> np.ndarray:
        """The numbers step ``t`` multiplies by, in the parameters' dtype, for the fused steps' one-pass update."""
        b1, b2, lr, t, wd = self.beta1, self.beta2, self.lr, self.t, self.weight_decay
        decay = 1 - lr * wd if self.DECOUPLED else wd
        numbers = (b1, 1 - b1, b2, 1 - b2, math.sqrt(1 - b2**t), self.eps, lr / (1 - b1**t), decay)
        return np.array(numbers, dtype=self.model.dtype)

    def decay(self, w: Any, g: Any) -> None:
        """Adam's weight decay: the L2 term into the gradient, ``g ← ∂L/∂w + λ w``."""
        if self.weight_decay:
            g += self.model.xp.multiply(w, self.weight_decay, dtype=w.dtype, out=self._scratch)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019; PyTorch's ``AdamW``).

    The decay shrinks the weights directly instead of entering the gradient,
    so it is not rescaled by ``1/(√v̂ + ε)`` (every weight decays at the same
    rate)::

        w ← w − η λ w          (then Adam's update, from g = ∂L/∂w alone)
    """

    DECOUPLED = True

    def __init__(
        self, model: Any, lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:  # fmt: skip
        super().__init__(model, lr, beta1, beta2, eps, weight_decay)

    def decay(self, w: Any, g: Any) -> None:
        """AdamW's weight decay: ``w ← w (1 − η λ)``, before the update; the gradient is left alone."""
        if self.weight_decay:
            w *= 1 - self.lr * self.weight_decay


# The table: the name ``train --optimizer`` takes -> the class holding the update and its state.
OPTIMIZERS: dict[str, type[Optimizer]] = {"sgd": SGD, "nesterov": Nesterov, "adam": Adam, "adamw": AdamW}


def make_optimizer(name: str, model: Any, lr: float, settings: Any) -> Optimizer:
    """The optimizer ``name`` for ``model``, its hyperparameters read from ``settings`` (a ``TrainConfig``).

    >>> from backprop_xp import MLP, TrainConfig
    >>> opt = make_optimizer("adam", MLP(4, 3, 2), 1e-3, TrainConfig(beta2=0.99))
    >>> type(opt).__name__, opt.beta2
    ('Adam', 0.99)
    """
    rule = OPTIMIZERS[check_choice("optimizer", name, tuple(OPTIMIZERS))]
    return rule(model, lr, **{setting: getattr(settings, setting) for setting in rule.SETTINGS})
