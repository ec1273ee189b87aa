"""One epoch of training steps (``run_epoch``), and evaluation (``evaluate``, ``confusion_matrix``).

The step itself, and which one runs on which backend, is ``step.make_step``.
Two rules shape the loop:

* No host synchronisation per step. The loss and the number of correct
  predictions of every step stay on the device in two small arrays (one slot
  per step) and are read back once per epoch. On a GPU the Python loop can
  run ahead of the device; on the CPU it costs two scalar stores per step.
* The loop never looks at the backend: whether a loss can be checked every
  step depends on whether the step returned it on the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from ..backend import array_module, to_numpy
from ..files import check_interrupt
from ..loss import softmax_cross_entropy_
from ..model import MLP

# --------------------------------------------------------------------------- one epoch

HOST_NUMBERS = (float, np.generic, np.ndarray)  # a loss of these types is already on the host: checking it is free


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
    stop_at_nonfinite: bool | None = False,
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
    every step, and the check happens once, at the end of the epoch). With
    None (what ``train`` passes) the loop stops there wherever the step's loss
    comes back as a host number (NumPy's), so no backend is named here.
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
        if (stop_at_nonfinite or (stop_at_nonfinite is None and isinstance(loss, HOST_NUMBERS))) and not math.isfinite(
            loss
        ):
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


def per_class_tables(counts: np.ndarray, names: Sequence[str]) -> str:
    """evaluate's tables: each class's accuracy, and the confusion matrix ``counts``, classes by name.

    Digits fit a column each; longer names (Fashion-MNIST's) get a row each,
    and the matrix's columns are numbered as its rows. Starts with an empty line.

    >>> print(per_class_tables(np.array([[3, 1], [0, 2]]), ["0", "1"]))
    <BLANKLINE>
    per-class accuracy (%):
      class         0      1
      accuracy  75.00 100.00
    <BLANKLINE>
    confusion matrix (rows: true class, columns: predicted class):
      true\\pred     0     1
              0     3     1
              1     0     2
    """
    k_all = range(len(names))
    numbers = list(names) == [str(k) for k in k_all]
    accuracy = [100 * counts[k, k] / max(counts[k].sum(), 1) for k in k_all]
    lines = ["", "per-class accuracy (%):"]
    if numbers:
        lines.append("  class    " + " ".join(f"{k:>6d}" for k in k_all))
        lines.append("  accuracy " + " ".join(f"{a:6.2f}" for a in accuracy))
    else:
        width = max(len(name) for name in names)
        lines += [f"  {name:<{width}}  {a:6.2f}" for name, a in zip(names, accuracy)]
    lines.append("")
    rows = [str(k) if numbers else f"{k} {name}" for k, name in zip(k_all, names)]
    width = max(9, *(len(row) for row in rows))
    columns = "" if numbers else ", numbered as the rows"
    lines.append(f"confusion matrix (rows: true class, columns: predicted class{columns}):")
    align = ">" if numbers else "<"  # numbers line up on the right, names on the left
    lines.append(f"  {'true' + chr(92) + 'pred':{align}{width}} " + " ".join(f"{k:>5d}" for k in k_all))
    lines += [f"  {row:{align}{width}} " + " ".join(f"{c:>5d}" for c in counts[k]) for k, row in zip(k_all, rows)]
    return "\n".join(lines)
