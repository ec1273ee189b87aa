"""The fused CPU training step: ``MLP.backprop`` then the optimizer's update, in Numba's compiled loops.

``FusedCpuStep(model, optimizer)`` is ``step(x, labels) -> (loss, n_correct)``
doing what the textbook step does (``step.TextbookStep``), in fewer passes::

    z1 = x W1ᵀ                                    NumPy's BLAS
    a1 = relu(z1 + b1), z2, softmax, loss,        relu_output_layer_loop_   (ReLU; the GPU's output-layer
      δ2, ∂L/∂W2, ∂L/∂b2, δ1, ∂L/∂b1                                         kernel's twin)
    ∂L/∂W1 = δ1ᵀ x                                NumPy's BLAS
    w ← the optimizer's update                    its loop in FUSED_UPDATES  (one pass over every parameter)

Up to ``HIDDEN_MAJOR_MAX_BATCH`` rows the ReLU lines run with ``a1`` and ``δ1``
stored hidden-major, ``(H, B)`` (``cpu/hidden_major.py``: the same products,
faster on OpenBLAS, and the same loop for that layout, split over the threads
where NumPy's BLAS runs on them too: ``cpu/blas_pool.py``). Other activations keep
the model's forward and backward lines and fuse the softmax and loss alone
(``output_layer_loop_``). An optimizer without a loop
here (``Nesterov``, or any class not in ``FUSED_UPDATES``) runs its own
``step()``. It writes into the model's own workspaces (``model.workspace``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..model import MLP
from ..optimizers import SGD, Adam, AdamW, Optimizer
from . import numba_loops
from .hidden_major import hidden_major_backprop

# Up to this batch size the ReLU step keeps a1 and δ1 hidden-major (cpu/hidden_major.py): its two large
# products then run 7-20% faster on one OpenBLAS thread at batch 32 and 128; at 4096 it measured 1% slower.
HIDDEN_MAJOR_MAX_BATCH = 1024


def _sgd(opt: SGD) -> None:
    """``SGD.step`` in one pass (bit for bit): momentum's loop, or the plain one without momentum.

    The momentum loop sets subnormal velocities to zero (``numba_loops.momentum_flushed_loop_``: the same
    bits otherwise; a multiply on a subnormal number costs about a hundred cycles).
    """
    w, g = opt.model.flat_params, opt.model.flat_grads
    if opt.velocity is not None:
        numba_loops.momentum_flushed_loop_(w, g, opt.velocity, opt.lr, opt.momentum, opt.weight_decay)
    else:
        numba_loops.plain_sgd_loop_(w, g, opt.lr, opt.weight_decay)


def _adam(opt: Adam) -> None:
    """``Adam.step`` (and ``AdamW``'s) in one pass (bit for bit)."""
    opt.t += 1
    numba_loops.adam_loop_(opt.model.flat_params, opt.model.flat_grads, opt.m, opt.v, opt.fused_hyper(), opt.DECOUPLED)


# The table: an optimizer class -> its update in one compiled pass. Exact classes: a subclass may change step().
FUSED_UPDATES: dict[type[Optimizer], Callable[[Any], None]] = {SGD: _sgd, Adam: _adam, AdamW: _adam}


class FusedCpuStep:
    """``step(x, labels) -> (loss, n_correct)`` on NumPy arrays, in fused loops (see the module docstring).

    With ``checked`` each call checks its batch as ``model.loss_and_grads``
    does: a label out of range would read past the end of a row in the
    compiled loops (the training loop's data was checked once, on loading).
    """

    mode = "fused-cpu"
    capture_error = None

    def __init__(self, model: MLP, optimizer: Optimizer, *, checked: bool = True) -> None:
        if model.xp is not np:
            raise ValueError(f"the fused CPU step needs a NumPy model, got backend {model.backend.name!r}")
        self.model, self.optimizer, self.checked = model, optimizer, checked
        fused = FUSED_UPDATES.get(type(optimizer))
        self.update = optimizer.step if fused is None else (lambda: fused(optimizer))

    def __call__(self, x: Any, labels: Any) -> tuple[Any, Any]:
        model = self.model
        if self.checked:
            x = model.as_input(x)
            labels = model.as_labels(labels, x.shape[0])
        if x.ndim != 2 or labels.shape != (x.shape[0],):  # the loops would read past the labels
            raise ValueError(f"step needs x (batch, {model.n_inputs}) and labels (batch,), got "
                             f"{tuple(x.shape)} and {tuple(labels.shape)}")  # fmt: skip
        with numba_loops.sharing_blas(np):  # NumPy's OpenBLAS on the loops' threads for this step (cpu/blas_pool.py)
            loss, n_correct = self.backprop(x, labels)
            self.update()
        return loss, n_correct

    def backprop(self, x: Any, labels: Any) -> tuple[Any, Any]:
        """``model.backprop(x, labels)``'s gradients and results, the lines between the two large products fused."""
        model, p, g = self.model, self.model.params, self.model.grads
        if model.activation == "relu" and x.shape[0] <= HIDDEN_MAJOR_MAX_BATCH:
            return hidden_major_backprop(model, x, labels)  # the same lines, a1 and δ1 stored (H, B)
        ws = model.workspace(x.shape[0])
        if model.activation == "relu":
            np.matmul(x, p["W1"].T, out=ws.a1)  # z1 = x W1ᵀ
            loss, n_correct = numba_loops.relu_output_layer_loop_(p, g, labels, ws)
            np.matmul(ws.delta1.T, x, out=g["W1"])  # ∂L/∂W1 = δ1ᵀ x
            return loss, n_correct
        model.forward_into(x, ws, keep_fprime=True)
        loss, n_correct = numba_loops.output_layer_loop_(ws.z2, labels, ws.delta2, ws.row_loss)  # ŷ, L, δ2
        model.backward_into(x, ws)
        return loss, n_correct
