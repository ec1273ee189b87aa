"""The workloads of the pytest-benchmark suite (``test_bench_cpu.py``): single operations, one process.

The comparison between libraries is ``backprop-xp bench`` (``backprop_xp.speed``,
which ``compare.py`` calls); this module shares its pieces (the GEMM bound, the
random MNIST-shaped data, PyTorch's network with our initial parameters) and
wraps them for pytest-benchmark. Three contestants run the same work on
MNIST-shaped data (784 inputs, 10 classes, float32):

* ``Ours``: backprop-xp on NumPy, through the code path the ``train`` command
  uses (``training.make_step`` + ``training.run_epoch`` + ``data.Minibatches``).
* ``TorchNet``: the same network in PyTorch on the CPU: same architecture, the
  same initial parameters (He normal, zero biases: copied from ours), SGD with
  momentum, cross-entropy, the same count of correct predictions per step, the
  same number of threads.
* ``GemmBound``: the five matrix products of one training step alone, at the
  same shapes, into preallocated buffers, with the same BLAS NumPy uses. A
  step cannot be faster than this, so ``t_gemm / t_step`` says what fraction of
  what the hardware (and this BLAS) allows the whole step reaches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

import backprop_xp as bx
from backprop_xp.data import Minibatches
from backprop_xp.speed.engines import GemmBound, mnist_shaped, seconds_per_call, torch_mlp
from backprop_xp.training import make_step, run_epoch

__all__ = ["GemmBound", "Ours", "TorchNet", "batches_of", "mnist_shaped", "run_all", "run_all_x", "seconds_per_call"]

N_INPUTS, N_OUTPUTS = 784, 10
HIDDEN_SIZES = (128, 800)
BATCH_SIZES = (32, 128, 512)
LR, MOMENTUM = 0.01, 0.9


# --------------------------------------------------------------------------- ours


class Ours:
    """backprop-xp on NumPy: the model, its optimizer and the train command's loop."""

    name = "backprop-xp"

    def __init__(self, hidden: int, seed: int = 0) -> None:
        self.model = bx.MLP(N_INPUTS, hidden, N_OUTPUTS, activation="relu", backend="numpy", dtype="float32", seed=seed)
        self.optimizer = bx.SGD(self.model, lr=LR, momentum=MOMENTUM)
        self._step = make_step(self.model, self.optimizer, checked=False)  # the train command's own step

    def step(self, xb: np.ndarray, yb: np.ndarray) -> None:
        """One training step (forward, backward, update) on one batch."""
        self._step(xb, yb)

    def epoch_runner(self, x: np.ndarray, y: np.ndarray, batch: int) -> Callable[[int], None]:
        """A function running one whole training epoch (shuffled minibatches) on ``(x, y)``, as ``train`` does."""
        batches = Minibatches(x, y, batch, xp=np, seed=0, shuffle=True)

        def run(epoch: int) -> None:
            run_epoch(self._step, batches, epoch)

        return run

    def infer(self, xb: np.ndarray) -> np.ndarray:
        """Predicted labels of one batch."""
        return self.model.predict(xb)


# --------------------------------------------------------------------------- PyTorch


class TorchNet:
    """The same network, initialisation and optimizer in PyTorch on the CPU."""

    name = "PyTorch"

    def __init__(self, hidden: int, seed: int = 0) -> None:
        import torch

        self.torch = torch
        self.net = torch_mlp(
            torch, hidden, seed=seed
        )  # the very same initial parameters as ours (He normal, zero biases)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=LR, momentum=MOMENTUM)

    def _step(self, xb: Any, yb: Any) -> tuple[Any, Any]:
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.net(xb)
        loss = self.torch.nn.functional.cross_entropy(logits, yb)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), (logits.detach().argmax(dim=1) == yb).sum()  # as ours: loss and n_correct

    def step(self, xb: Any, yb: Any) -> None:
        self._step(xb, yb)

    def epoch_runner(self, x: np.ndarray, y: np.ndarray, batch: int) -> Callable[[int], None]:
        torch = self.torch
        x_all, y_all = torch.from_numpy(x), torch.from_numpy(y)
        xs, ys = torch.empty_like(x_all), torch.empty_like(y_all)

        def run(epoch: int) -> None:
            # The idiomatic fast loop (a DataLoader would be slower): one shuffled
            # copy per epoch, then contiguous slices; loss and accuracy summed as ours.
            order = torch.from_numpy(np.random.default_rng([0, epoch]).permutation(len(x)))
            torch.index_select(x_all, 0, order, out=xs)
            torch.index_select(y_all, 0, order, out=ys)
            total_loss, total_correct = 0.0, 0
            for start in range(0, len(x), batch):
                loss, n_correct = self._step(xs[start : start + batch], ys[start : start + batch])
                total_loss += loss.item()
                total_correct += n_correct.item()

        return run

    def infer(self, xb: Any) -> Any:
        """Predicted labels of one batch (a tensor)."""
        with self.torch.inference_mode():
            return self.net(xb).argmax(dim=1)

    def as_batch(self, x: np.ndarray, y: np.ndarray) -> tuple[Any, Any]:
        return self.torch.from_numpy(x), self.torch.from_numpy(y)


# --------------------------------------------------------------------------- helpers


def batches_of(x: np.ndarray, y: np.ndarray, batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Contiguous slices of ``batch`` rows (the last may be shorter)."""
    return [(x[s : s + batch], y[s : s + batch]) for s in range(0, len(x), batch)]


def run_all(step: Callable[..., Any], batches: list[tuple[Any, Any]]) -> Callable[[], None]:
    """A function calling ``step(xb, yb)`` once for every batch."""

    def run() -> None:
        for xb, yb in batches:
            step(xb, yb)

    return run


def run_all_x(fn: Callable[[Any], Any], batches: list[tuple[Any, Any]]) -> Callable[[], None]:
    def run() -> None:
        for xb, _ in batches:
            fn(xb)

    return run
