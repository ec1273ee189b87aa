"""One training step and one epoch: ``make_step`` (the one place the loop looks at the backend) and ``run_epoch``.

Two rules shape the loop:

* No host synchronisation per step. The loss and the number of correct
  predictions of every step stay on the device in two small arrays (one slot
  per step) and are read back once per epoch. On a GPU the Python loop can
  run ahead of the device; on the CPU it costs two scalar stores per step.
* The step on NumPy is the definition: ``model.backprop`` then
  ``optimizer.step()``. On CuPy it is ``cuda.step.make_gpu_step``, the same
  math fused and captured as a CUDA graph, checked against this one (or,
  without nvmath-python, this one run eagerly).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from ..backend import GPU_EXTRAS, INSTALL_GPU, array_module, to_numpy
from ..files import check_interrupt
from ..kernels import softmax_cross_entropy_
from ..model import MLP
from ..optim import SGD, Optimizer

# --------------------------------------------------------------------------- one step, one epoch


def make_step(
    model: MLP, optimizer: Optimizer, *, graphs: bool = True, tf32: bool = False, checked: bool = True
) -> Callable[[Any, Any], tuple[Any, Any]]:
    """The training step ``step(xb, yb) -> (loss, n_correct)`` for this model's backend.

    The definition is ``model.backprop`` then ``optimizer.step()``, and that
    is the step on NumPy. On CuPy, for the ``SGD`` update, it is the same
    math fused and captured as CUDA graphs (``cuda/step.py``, with TF32
    matrix products if ``tf32``), checked against this definition by the GPU
    tests; an optimizer with a ``step()`` of its own (``Nesterov``, ``Adam``,
    ``AdamW``: ``optim.OPTIMIZERS``) keeps the definition on CuPy too, so its
    update is never silently replaced. On the fused CPU path the same holds:
    ``model.backprop`` runs the fused loops, and each ``step()`` chooses its
    own update (``SGD`` and ``Adam``/``AdamW`` have fused loops bit-identical
    to their ``xp`` lines; ``Nesterov`` runs its ``xp`` lines). Without nvmath-python
    (the fused step's cuBLAS calls), or where it cannot open cuBLAS, CuPy
    still trains with the definition, run eagerly on CuPy's own products: the
    process says once why graphs are off and what to install, and the step's
    ``mode`` is "eager", as the fused step's is when capture fails. Both results are 0-d
    arrays left on the device (no synchronisation). This is the one place the
    training loop looks at the backend.

    On NumPy, ``checked`` (the default) makes each call check its batch as
    ``loss_and_grads`` does: a label out of range would read past the end of
    a row in the compiled kernels. The training loop, whose batches come from
    data checked once when it was loaded, passes ``checked=False``. On CuPy
    the batch is not checked (that would read the labels back every step).
    """
    graphs_off = None  # why a CuPy model's SGD step is the definition below, when it is
    if model.xp is not np and type(optimizer).step is SGD.step:
        from ..cuda.cublas import CublasUnavailable  # imported only on CuPy: the CPU path never needs them
        from ..cuda.step import make_gpu_step, set_tf32

        try:  # tf32=False leaves CuPy's global setting alone (a CUPY_TF32=1 the user set stays); the step is float32
            return make_gpu_step(model, optimizer, graphs=graphs, tf32=True if tf32 else None)
        except CublasUnavailable as exc:  # CuPy still trains: the definition, eagerly, with CuPy's own cuBLAS
            graphs_off = str(exc)
            say_once(f"backprop-xp: the GPU training step runs eagerly, without CUDA graphs: {exc} ({_install(model)})")
            if tf32:
                set_tf32(True)
    backprop, update = model.backprop, optimizer.step

    def step(xb: Any, yb: Any) -> tuple[Any, Any]:
        if checked:
            xb = model.as_input(xb)
            yb = model.as_labels(yb, xb.shape[0])
        loss, n_correct = backprop(xb, yb)
        update()
        return loss, n_correct

    if graphs_off is not None:  # what the GPU step reports about itself (the bench records it)
        step.mode, step.capture_error = "eager", graphs_off
    return step


_SAID: set[str] = set()  # notices already given by this process


def say_once(line: str) -> None:
    """Print ``line`` to stderr the first time this process says it (a sweep builds a step per run)."""
    if line not in _SAID:
        _SAID.add(line)
        print(line, file=sys.stderr)


def _install(model: MLP) -> str:
    """The pip command that brings nvmath-python and cuBLAS for the CUDA major this CuPy was built for."""
    try:
        major = model.xp.cuda.runtime.runtimeGetVersion() // 1000
    except Exception:  # noqa: BLE001 - only the advice depends on it
        major = None
    if major in GPU_EXTRAS:
        return f"pip install 'backprop-xp[cuda{major}]'"
    return INSTALL_GPU


def warm_up(model: MLP, optimizer: Optimizer, batch_size: int) -> None:
    """One step of a throwaway twin of ``model`` and ``optimizer``, so that no epoch's time holds one-time loading.

    On the fused CPU path the first call of each compiled kernel loads it
    (Numba's on-disk cache: about 0.7 s), which made a short run's first epoch
    look ten times slower than the others. The twin has the same sizes and
    settings, so it loads exactly the kernels the run will call; the run's own
    parameters are not touched.
    """
    from .. import fused_cpu

    if not fused_cpu.active(model.xp):
        return
    twin = MLP(model.n_inputs, model.n_hidden, model.n_outputs, activation=model.activation, dtype=model.dtype.name)
    rule = type(optimizer)(twin, optimizer.lr, **optimizer.settings())  # the same update, so the same kernels
    make_step(twin, rule, checked=False)(
        np.zeros((batch_size, model.n_inputs), model.dtype), np.zeros(batch_size, np.int64)
    )


class EpochSums(NamedTuple):
    """What one pass over the minibatches adds up to (host numbers)."""

    loss_sum: float  # Σ over steps of (mean batch loss × batch size); NaN if any step diverged
    n_correct: int
    n_samples: int
    first_bad_step: int | None  # index of the first step whose loss was NaN or infinite


def run_epoch(
    step: Callable[[Any, Any], tuple[Any, Any]],
    batches: Any,
    epoch: int,
    *,
    progress: Callable[[int, float], None] | None = None,
    progress_every: int = 20,
    stop_at_nonfinite: bool = False,
) -> EpochSums:
    """Run ``step`` over every minibatch of ``batches.epoch(epoch)``; read the sums once, at the end.

    Each step's loss and correct count are stored into a slot of two small
    device arrays (no host synchronisation); they are copied to the host
    after the last step, which is also what makes the epoch's wall time
    honest on a GPU. ``progress(n_samples, running_loss)`` is called every
    ``progress_every`` steps with the mean loss of those steps (that call does
    read from the device, so it is only made when a progress bar is shown).
    With ``stop_at_nonfinite`` the epoch ends at the first step whose loss is
    NaN or infinite; that check reads each loss, so it is for the CPU, where
    the loss is already on the host (on a GPU it would wait for the device
    every step, and the check happens once, at the end of the epoch).
    Before each step ``files.check_interrupt()`` raises KeyboardInterrupt if
    another thread asked this one to stop (a sweep run on a Dask worker).
    """
    n_steps = len(batches)
    sizes = np.zeros(n_steps, np.int64)
    losses = corrects = None
    done, since = 0, 0
    for i, (xb, yb) in enumerate(batches.epoch(epoch)):
        check_interrupt()  # a run on a thread other than the main one is stopped here, between steps
        loss, n_correct = step(xb, yb)
        if losses is None:  # allocated on the step's backend, once per epoch
            xp = array_module(xb)
            losses = xp.zeros(n_steps, xp.float64)
            corrects = xp.zeros(n_steps, xp.int64)
        losses[i] = loss
        corrects[i] = n_correct
        sizes[i] = xb.shape[0]
        done = i + 1
        if stop_at_nonfinite and not math.isfinite(loss):
            break
        if progress is not None and done % progress_every == 0:
            progress(int(sizes[since:done].sum()), float(losses[since:done].mean()))
            since = done
    if losses is None:
        return EpochSums(0.0, 0, 0, None)
    loss_host = to_numpy(losses[:done])  # the epoch's one device-to-host copy
    n_correct = int(to_numpy(corrects[:done]).sum())
    if progress is not None and since < done:
        progress(int(sizes[since:done].sum()), float(loss_host[since:].mean()))
    bad = np.flatnonzero(~np.isfinite(loss_host))
    loss_sum = float(loss_host @ sizes[:done].astype(np.float64))
    return EpochSums(loss_sum, n_correct, int(sizes[:done].sum()), int(bad[0]) if bad.size else None)


# --------------------------------------------------------------------------- evaluation


def evaluate(model: MLP, x: Any, labels: Any) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, labels)``, in large batches.

    ``x`` and ``labels`` may already live on the model's backend (the training
    loop copies the test set there once); the logits come from ``model.logits``.
    """
    xp = model.xp
    z = model.logits(x)
    labels = xp.asarray(labels)
    n = z.shape[0]
    if n == 0:
        raise ValueError("evaluate needs at least one example")
    accuracy = int(xp.count_nonzero(z.argmax(axis=1) == labels)) / n
    loss = float(softmax_cross_entropy_(z, labels, out=z))  # the training step's own loss (z is scratch now)
    return loss, accuracy


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, n_classes: int | None = None) -> np.ndarray:
    """Counts ``C[true, predicted]``; ``n_classes`` defaults to the largest class seen plus one.

    >>> confusion_matrix(np.array([0, 1, 1]), np.array([0, 1, 0]), 2)
    array([[1, 0],
           [1, 1]])
    """
    labels, predicted = np.asarray(labels, np.int64), np.asarray(predicted, np.int64)
    if n_classes is None:
        n_classes = int(max(labels.max(initial=0), predicted.max(initial=0))) + 1
    return np.bincount(labels * n_classes + predicted, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
