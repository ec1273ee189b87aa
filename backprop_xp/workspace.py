"""The arrays one batch size needs, allocated once: ``Workspace``, and ``PerBatchSize``, the cache that keeps them.

Every step (the textbook ``MLP.backprop``, the fused CPU step, the fused GPU
step) and the model's evaluation write into a ``Workspace`` of their batch
size, so the training loop allocates nothing large per step. This is the one
buffer type: the fused steps keep what only they need in its ``scratch``
slot, and the GPU step its CUDA graphs, which point into these arrays and so
must live and die with them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


class PerBatchSize(dict):
    """Workspaces kept per batch size, built on first use by ``build(batch)``.

    A training run uses two sizes (the full batch and the epoch's last,
    partial one) and evaluation a few chunk sizes, so a handful are kept; a
    new size beyond ``limit`` starts the cache afresh rather than growing it
    without bound (a dropped workspace takes its graphs with it).
    """

    def __init__(self, build: Callable[[int], Any], limit: int = 4) -> None:
        super().__init__()
        self.build, self.limit = build, limit

    def __call__(self, batch: int) -> Any:
        if batch not in self:  # (a builder may return None for "nothing needed at this size": kept too)
            if len(self) >= self.limit:
                self.clear()
            self[batch] = self.build(batch)
        return self[batch]


class Workspace:
    """Activations, deltas and constants for one batch size, reused every step.

    Evaluation needs ``a1``, ``fprime`` and ``z2``; training (``training=True``)
    also the backward pass's ``delta1``, ``delta2``, ``ones``, ``rows`` and
    ``row_loss``, and the 0-d ``loss`` and ``n_correct`` a fused step writes.

    With ``class_major`` (the default) the output layer's arrays are ``(B, K)``
    views of ``(K, B)`` buffers (K = 10 classes): the softmax's per-example
    max and sum, and the argmax, then reduce along the long contiguous axis
    instead of over ten-element rows, which NumPy does several times faster.
    The math does not see the layout. The CUDA kernel indexes rows of ``K``
    values, so the GPU step asks for ``class_major=False``.
    """

    def __init__(
        self, xp: Any, batch: int, n_hidden: int, n_outputs: int, dtype: np.dtype, *, training: bool,
        class_major: bool = True,
    ) -> None:  # fmt: skip
        def outputs() -> Any:
            return xp.empty((n_outputs, batch), dtype).T if class_major else xp.empty((batch, n_outputs), dtype)

        self.a1 = xp.empty((batch, n_hidden), dtype)  # holds z1, then a1 = f(z1) in place
        self.fprime = xp.empty((batch, n_hidden), dtype)  # f'(z1), written by the forward pass
        self.z2 = outputs()
        self.scratch: Any = None  # a fused step's own buffers for this size (the GPU output layer's partial sums)
        self.graphs: dict[Any, Any] = {}  # CUDA graphs captured on these arrays (the GPU step's), by input address
        self.steps = 0  # training steps run on these buffers (the GPU step captures from the second)
        if training:  # the backward pass's buffers; evaluation needs none of them
            self.delta1 = xp.empty((batch, n_hidden), dtype)
            self.delta2 = outputs()
            self.ones = xp.ones(batch, dtype)  # Σ_b v = 1ᵀ v, a matrix-vector product for BLAS
            self.rows = xp.arange(batch)  # the row index of each label, for the softmax
            self.row_loss = xp.empty(batch, dtype)  # −log ŷ_y of each row (the fused CPU loops')
            self.loss = xp.zeros((), dtype)  # the fused GPU step's outputs, left on the device
            self.n_correct = xp.zeros((), np.int64)
