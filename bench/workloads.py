"""The benchmark workloads, written once and used by ``compare.py`` and ``test_bench_cpu.py``.

Three contestants run the same work on MNIST-shaped data (784 inputs, 10
classes, float32):

* ``Ours``: backprop-xp on NumPy, through the code path the ``train`` command
  uses (``train.make_step`` + ``train.run_epoch`` + ``data.Minibatches`` when
  those exist, else the equivalent loop written here).
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

import time
from collections.abc import Callable
from typing import Any

import numpy as np

import backprop_xp as bx
from backprop_xp.data import Minibatches
from backprop_xp.training import make_step, run_epoch

N_INPUTS, N_OUTPUTS = 784, 10
HIDDEN_SIZES = (128, 800)
BATCH_SIZES = (32, 128, 512)
LR, MOMENTUM = 0.01, 0.9


def mnist_shaped(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random images in [0, 1) (float32, C-contiguous ``(n, 784)``) and int64 labels.

    Speed does not depend on the pixel values (dense BLAS, no data-dependent
    branches), so random data stands in for MNIST and needs no files.
    """
    rng = np.random.default_rng(seed)
    x = rng.random((n, N_INPUTS), dtype=np.float32)
    y = rng.integers(0, N_OUTPUTS, size=n, dtype=np.int64)
    return x, y


# --------------------------------------------------------------------------- ours


class Ours:
    """backprop-xp on NumPy: the model, its optimizer and the train command's loop."""

    name = "backprop-xp"

    def __init__(self, hidden: int, seed: int = 0) -> None:
        self.model = bx.MLP(N_INPUTS, hidden, N_OUTPUTS, activation="relu", backend="numpy", dtype="float32", seed=seed)
        self.optimizer = bx.SGD(self.model, lr=LR, momentum=MOMENTUM)
        self._step = make_step(self.model, self.optimizer)  # the train command's own step

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
        self.net = torch.nn.Sequential(
            torch.nn.Linear(N_INPUTS, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, N_OUTPUTS)
        )
        init = bx.MLP(N_INPUTS, hidden, N_OUTPUTS, activation="relu", dtype="float32", seed=seed).params
        with torch.no_grad():  # the very same initial parameters as ours (He normal, zero biases)
            self.net[0].weight.copy_(torch.from_numpy(init["W1"]))
            self.net[0].bias.copy_(torch.from_numpy(init["b1"]))
            self.net[2].weight.copy_(torch.from_numpy(init["W2"]))
            self.net[2].bias.copy_(torch.from_numpy(init["b2"]))
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


# --------------------------------------------------------------------------- the bound


class GemmBound:
    """The five matrix products of a training step, alone, into preallocated buffers.

    Forward ``x W1ᵀ`` and ``a1 W2ᵀ``; backward ``δ2ᵀ a1``, ``δ2 W2`` and ``δ1ᵀ x``.
    ``forward_only`` keeps the first two (the bound for inference).
    """

    def __init__(self, hidden: int, batch: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        f32 = np.float32
        self.x = rng.random((batch, N_INPUTS), dtype=f32)
        self.w1 = rng.random((hidden, N_INPUTS), dtype=f32)
        self.w2 = rng.random((N_OUTPUTS, hidden), dtype=f32)
        self.a1 = np.empty((batch, hidden), f32)
        self.z2 = np.empty((batch, N_OUTPUTS), f32)
        self.delta2 = rng.random((batch, N_OUTPUTS), dtype=f32)
        self.delta1 = np.empty((batch, hidden), f32)
        self.g1 = np.empty((hidden, N_INPUTS), f32)
        self.g2 = np.empty((N_OUTPUTS, hidden), f32)

    def forward(self, x: np.ndarray | None = None) -> None:
        """The forward products on ``x`` (a batch of the run's data; default: a fixed one)."""
        x = self.x if x is None else x
        np.matmul(x, self.w1.T, out=self.a1)
        np.matmul(self.a1, self.w2.T, out=self.z2)

    def step(self, x: np.ndarray | None = None) -> None:
        """The five products of a training step on ``x``.

        Timed over the same batches as the step itself, so that the bound pays
        the same cache misses on fresh input rows as the step does.
        """
        x = self.x if x is None else x
        np.matmul(x, self.w1.T, out=self.a1)
        np.matmul(self.a1, self.w2.T, out=self.z2)
        np.matmul(self.delta2.T, self.a1, out=self.g2)
        np.matmul(self.delta2, self.w2, out=self.delta1)
        np.matmul(self.delta1.T, x, out=self.g1)


# --------------------------------------------------------------------------- timing


def seconds_per_call(
    fn: Callable[[], Any], *, min_seconds: float = 0.2, min_calls: int = 3, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Time of one call of ``fn``: the median over as many calls as fit in ``min_seconds`` (wall time).

    ``clock`` is ``time.perf_counter`` (wall time) or ``time.thread_time``
    (CPU time of this thread: immune to other processes, valid with one thread).
    """
    fn()  # warm up: buffers, caches, thread pools
    times = []
    start_all = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start_all < min_seconds:
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return float(np.median(times))


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
