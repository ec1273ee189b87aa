"""The NumPy twins of the CUDA kernels in backprop_xp/cuda/: what each kernel must equal, for the tests only.

Written with the reference functions of ``activations.py`` and ``loss.py`` so
that there is one definition of the math. They work on NumPy or CuPy arrays:
``tests/test_kernel_twins.py`` checks them against ``MLP.backprop`` on the
CPU, ``tests/test_cuda_emulated.py`` runs the kernels' own source against
them on the CPU (``cuda_emulator.py``), and ``tests/test_gpu.py`` runs the
kernels against them on a device. The update kernels' twins are the
optimizers' own ``step()``.
"""

from __future__ import annotations

from typing import Any

from backprop_xp.activations import activation_derivative, activation_forward_
from backprop_xp.backend import array_module
from backprop_xp.loss import softmax_cross_entropy_


def bias_activation_reference(z: Any, bias: Any, activation: str) -> Any:
    """``z ← f(z + bias)`` with ``activations.activation_forward_`` (the output-layer kernel's first line)."""
    z += bias
    return activation_forward_(z, activation)


def activation_backward_reference(a: Any, delta: Any, activation: str) -> Any:
    """``delta ← delta ⊙ f'(z)`` with ``activations.activation_derivative`` (the output-layer kernel's δ1)."""
    delta *= activation_derivative(a, activation, out=array_module(a).empty_like(a))
    return delta


def output_layer_reference(z1: Any, labels: Any, params: dict[str, Any], activation: str) -> dict[str, Any]:
    """Twin of ``cuda_kernels.output_layer_step``, with the functions of ``activations.py``/``loss.py``: every
    array it writes, by name. ``z1`` is left unchanged; the returned ``"a1"`` is ``f(z1 + b1)``."""
    xp = array_module(z1)
    a1 = bias_activation_reference(z1.copy(), params["b1"], activation)
    z2 = a1 @ params["W2"].T + params["b2"]
    n_correct = xp.count_nonzero(z2.argmax(axis=1) == labels)
    delta2 = xp.empty_like(z2)
    loss = softmax_cross_entropy_(z2, labels, out=delta2)  # δ2 = (ŷ − y) / B
    delta1 = activation_backward_reference(a1, delta2 @ params["W2"], activation)  # δ1 = δ2 W2 ⊙ f'(z1)
    return {
        "a1": a1, "delta2": delta2, "delta1": delta1, "loss": loss, "n_correct": n_correct,
        "W2": delta2.T @ a1, "b1": delta1.sum(axis=0), "b2": delta2.sum(axis=0),
    }  # fmt: skip
