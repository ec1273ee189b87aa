"""Training: the epoch loop, learning-rate schedules, evaluation, checkpoints, resume, divergence.

One training step is ``model.backprop`` then ``optimizer.step()`` (``make_step``);
one epoch is that step over every minibatch (``run_epoch``); a run is epochs
with a learning-rate schedule, an evaluation after each, a checkpoint after
each, and the files a person looks at afterwards (``train``).

Two rules shape the loop:

* No host synchronisation per step. The loss and the number of correct
  predictions of every step stay on the device in two small arrays (one slot
  per step) and are read back once per epoch. On a GPU the Python loop can
  run ahead of the device; on the CPU it costs two scalar stores per step.
* Bit-exact resume on NumPy. A checkpoint holds the parameters, the momentum
  buffer, the epoch reached, the config and the metrics so far; the shuffling
  order depends only on (seed, epoch) and the learning rate only on
  (epoch, epochs, lr). So "k epochs, stop, resume to N" ends with exactly the
  parameters of "N epochs straight".
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .backend import BACKENDS, DTYPES, array_module, synchronize, to_numpy
from .files import atomic_write, make_out_dir, read_npz
from .kernels import ACTIVATIONS, softmax_cross_entropy_

CHECKPOINT = "checkpoint.npz"
METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
MODEL = "model.npz"
BEST = "best.npz"  # with --keep-best: the parameters of the best validation epoch so far
DIVERGED_EXIT_CODE = 3


# --------------------------------------------------------------------------- schedules
# Plain functions of (epoch, total epochs, base lr); epoch counts from 0. The
# rate is set once per epoch, so it depends on nothing a resume could lose.


def constant_lr(epoch: int, epochs: int, lr: float) -> float:
    """The same rate every epoch.

    >>> constant_lr(7, 10, 0.1)
    0.1
    """
    return lr


def step_lr(epoch: int, epochs: int, lr: float) -> float:
    """Divide the rate by 10 after half the epochs and again after three quarters.

    >>> [round(step_lr(e, 4, 0.1), 6) for e in range(4)]
    [0.1, 0.1, 0.01, 0.001]
    """
    return lr * 0.1 ** ((epoch >= epochs / 2) + (epoch >= epochs * 3 / 4))


def cosine_lr(epoch: int, epochs: int, lr: float) -> float:
    """Half a cosine from ``lr`` at the first epoch towards 0 after the last.

    >>> [round(cosine_lr(e, 4, 1.0), 4) for e in range(4)]
    [1.0, 0.8536, 0.5, 0.1464]
    """
    return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


SCHEDULES: dict[str, Callable[[int, int, float], float]] = {
    "constant": constant_lr,
    "step": step_lr,
    "cosine": cosine_lr,
}


# --------------------------------------------------------------------------- config


class SettingError(ValueError):
    """A setting that cannot work (``--batch-size`` larger than the training set, say): exit 2 on the command line."""


def plural(n: int, word: str) -> str:
    """``"1 epoch"``, ``"2 epochs"``.

    >>> plural(1, "epoch"), plural(3, "run")
    ('1 epoch', '3 runs')
    """
    return f"{n} {word}" + ("" if n == 1 else "s")


@dataclass
class TrainConfig:
    """Every setting of a training run (the ``train`` command's flags).

    The defaults are the measured default recipe: 784-512-10 with ReLU, SGD
    with momentum 0.9, batch 128, learning rate 0.1 decayed by a
    cosine over 10 epochs. See the README's "Results" for its accuracy and time.
    """

    hidden: int = 512
    activation: str = "relu"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    val_size: int = 0
    train_size: int = 0  # 0 = every training image; otherwise the first N (quick experiments, tests)
    augment: bool = False  # distort the training images afresh every epoch (augment.py)
    tf32: bool = False  # TF32 tensor-core matrix products on a GPU (gpu_step.set_tf32); no effect on NumPy
    keep_best: bool = False  # model.npz gets the parameters of the epoch with the best validation accuracy
    patience: int = 0  # stop after this many epochs without a better validation accuracy; 0 = never
    seed: int = 0
    dtype: str = "float32"
    backend: str = "auto"
    dataset: str = "mnist"
    data_dir: str | None = None

    # settings that change the result; a resume must not change them (except epochs: see train)
    MATH_FIELDS = (
        "hidden", "activation", "epochs", "batch_size", "lr", "momentum", "weight_decay",
        "lr_schedule", "val_size", "train_size", "augment", "tf32", "keep_best", "patience", "seed", "dtype",
        "dataset",
    )  # fmt: skip

    def validate(self) -> None:
        """Raise SettingError (a ValueError) naming the first setting that cannot work."""
        from .data import DATASETS

        def positive_int(name: str, minimum: int = 1) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
                raise SettingError(f"{name.replace('_', '-')} must be an integer >= {minimum}, got {value!r}")

        positive_int("hidden")
        positive_int("epochs")
        positive_int("batch_size")
        positive_int("val_size", 0)
        positive_int("train_size", 0)
        positive_int("seed", 0)
        positive_int("patience", 0)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise SettingError(f"lr must be a finite number > 0, got {self.lr!r}")
        for name in ("augment", "tf32", "keep_best"):
            if not isinstance(getattr(self, name), bool):
                raise SettingError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not (isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1):
            raise SettingError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not (isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise SettingError(f"weight-decay must be a finite number >= 0, got {self.weight_decay!r}")
        for name, allowed in (
            ("activation", ACTIVATIONS),
            ("lr_schedule", tuple(SCHEDULES)),
            ("dtype", DTYPES),
            ("backend", BACKENDS),
            ("dataset", tuple(DATASETS)),
        ):
            if getattr(self, name) not in allowed:
                raise SettingError(f"{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.train_size and self.val_size >= self.train_size:
            raise SettingError(f"--val-size {self.val_size} leaves no training images (--train-size is {self.train_size})")
        if (self.keep_best or self.patience) and not self.val_size:
            flag = "keep-best" if self.keep_best else "patience"
            raise SettingError(f"{flag} chooses by validation accuracy: give it a validation set with --val-size N (e.g. 5000)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """A config from a dict, ignoring keys that are not settings (backend_used, versions...)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


# --------------------------------------------------------------------------- one step, one epoch


def make_step(
    model: Any, optimizer: Any, *, graphs: bool = True, tf32: bool = False
) -> Callable[[Any, Any], tuple[Any, Any]]:
    """The training step ``step(xb, yb) -> (loss, n_correct)`` for this model's backend.

    Both results are 0-d arrays left on the device (no synchronisation). On
    NumPy the step is ``model.backprop`` then ``optimizer.step()``; on CuPy it
    is the fused, optionally CUDA-graph-captured step of ``gpu_step.py``, with
    TF32 matrix products if ``tf32``. This is the one place the training loop
    looks at the backend.
    """
    if model.xp is np:
        backprop, update = model.backprop, optimizer.step

        def step(xb: Any, yb: Any) -> tuple[Any, Any]:
            loss, n_correct = backprop(xb, yb)
            update()
            return loss, n_correct

        return step
    from .gpu_step import make_gpu_step  # imported only on CuPy: the CPU path never needs it

    # tf32=False leaves CuPy's global setting alone (a CUPY_TF32=1 the user set stays); the step itself is float32
    return make_gpu_step(model, optimizer, graphs=graphs, tf32=True if tf32 else None)


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
    """
    n_steps = len(batches)
    sizes = np.zeros(n_steps, np.int64)
    losses = corrects = None
    done, since = 0, 0
    for i, (xb, yb) in enumerate(batches.epoch(epoch)):
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


def evaluate(model: Any, x: Any, labels: Any) -> tuple[float, float]:
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


# --------------------------------------------------------------------------- a whole run


class Diverged(RuntimeError):
    """Training diverged: the loss became NaN or infinite, or exploded, or learning stopped at chance.

    ``reason`` says which, ``step`` is the first bad step (None when the
    whole epoch's numbers gave it away), ``lr`` the rate the epoch ran at and
    ``suggested_lr`` a ``--lr`` worth trying: at least 10 times smaller than
    the base rate and never above the default's.
    """

    def __init__(self, epoch: int, reason: str, lr: float, out_dir: str, *, step: int | None = None, base_lr: float | None = None) -> None:
        self.epoch, self.reason, self.step, self.lr, self.out_dir = epoch, reason, step, lr, out_dir
        base_lr = lr if base_lr is None else base_lr
        # lr / 10 of an absurd rate is still absurd (1e29 for 1e30): never suggest more than the default.
        self.suggested_lr = min(base_lr / 10, TrainConfig.lr)
        checkpoint = os.path.join(out_dir, CHECKPOINT)
        kept = (
            f"the last good checkpoint is kept in {checkpoint}"
            if os.path.exists(checkpoint)
            else "no epoch had finished, so there is no checkpoint"
        )
        where = f"epoch {epoch}, step {step}" if step is not None else f"epoch {epoch}"
        super().__init__(
            f"training diverged at {where}: {reason} (learning rate {lr:g}); "
            f"try --lr {self.suggested_lr:g} or smaller; {kept}"
        )


def divergence(row: dict[str, Any], first_loss: float | None, n_classes: int, chance: float) -> str | None:
    """Why an epoch whose loss stayed finite still counts as diverged, or None if it does not.

    A finite loss can explode (lr 50: loss 1e6, accuracy 10%) or the network
    can stop learning altogether (dead units: loss stuck at guessing level).
    Thresholds are far from any run that learns: guessing uniformly costs
    ln(K); a run 10 times worse than that, or 10 times worse than its own
    first epoch, is exploding; and after a whole epoch of learning, accuracy
    no better than always naming the most frequent class with a loss no better
    than guessing, and no better than the first epoch's, means nothing is
    being learned.

    >>> divergence({"epoch": 2, "train_loss": 1e6, "train_accuracy": 0.1}, 3.0, 10, 0.11)
    'the training loss 1e+06 is more than 10 times that of guessing (2.3)'
    >>> divergence({"epoch": 2, "train_loss": 0.3, "train_accuracy": 0.9}, 0.5, 10, 0.11) is None
    True
    >>> divergence({"epoch": 3, "train_loss": 2.31, "train_accuracy": 0.1}, 2.30, 10, 0.11)[:33]
    'training accuracy 10.0% is at cha'
    >>> divergence({"epoch": 2, "train_loss": 2.29, "train_accuracy": 0.1}, 2.33, 10, 0.11) is None  # slow, still falling
    True
    """
    loss, accuracy, guess = row["train_loss"], row["train_accuracy"], math.log(n_classes)
    if loss > 10 * guess:
        return f"the training loss {loss:.3g} is more than 10 times that of guessing ({guess:.2g})"
    if row["epoch"] >= 2 and first_loss is not None and loss > 10 * first_loss:
        return f"the training loss {loss:.3g} is more than 10 times the first epoch's ({first_loss:.3g})"
    # "Stopped learning" needs a loss that got worse than the first epoch's too: a small or short run
    # that is merely slow to start (loss still falling from ln K) must not be stopped as diverged.
    stuck = first_loss is not None and loss >= first_loss
    if row["epoch"] >= 2 and stuck and accuracy <= chance + 0.01 and loss >= 0.98 * guess:
        return (
            f"training accuracy {accuracy:.1%} is at chance level (always naming the most frequent class "
            f"gives {chance:.1%}) and the loss {loss:.3g} no better than guessing"
        )
    return None


def environment(backend: Any) -> dict[str, Any]:
    """Versions and machine: what a reader needs to compare two runs' timings."""
    from . import __version__

    info = {
        "backprop_xp": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "hostname": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    if backend.is_gpu:
        xp = backend.xp
        info["cupy"] = xp.__version__
        try:
            props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
            info["gpu"] = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        except Exception:  # a name is nice to have, never worth failing a run for
            pass
    return info


def default_out_dir(config: TrainConfig, root: str = "runs") -> str:
    """A new folder name under ``runs/``: date, time and the network size."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = os.path.join(root, f"{stamp}-h{config.hidden}")
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    return path


def read_checkpoint(out_dir: str | os.PathLike) -> tuple[TrainConfig, dict[str, Any]]:
    """The config and metrics saved in ``out_dir/checkpoint.npz``; ValueError naming the file if unreadable."""
    path = os.path.join(out_dir, CHECKPOINT)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no checkpoint to resume from (is {out_dir} the --out folder of a run?)")
    arrays = read_npz(path, "a backprop-xp checkpoint")
    try:
        config = json.loads(str(arrays["train.config"]))
        metrics = json.loads(str(arrays["train.metrics"]))
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path}: not a backprop-xp checkpoint (no readable {exc})") from exc
    return TrainConfig.from_dict(config), metrics


def _write_metrics(out_dir: Path, metrics: dict[str, Any]) -> None:
    with atomic_write(out_dir / METRICS_JSON) as f:
        json.dump(metrics, f, indent=2)
        f.write("\n")
    rows = metrics["epochs"]
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns or ["epoch"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(out_dir / METRICS_CSV) as f:
        f.write(text.getvalue())


def _save_checkpoint(out_dir: Path, model: Any, optimizer: Any, epochs_done: int, config: dict, metrics: dict) -> None:
    velocity = optimizer.velocity
    model.save(
        out_dir / CHECKPOINT,
        **{
            "train.epochs_done": np.int64(epochs_done),
            "train.velocity": to_numpy(velocity) if velocity is not None else np.zeros(0, model.dtype),
            "train.config": json.dumps(config),
            "train.metrics": json.dumps(metrics),
        },
    )


def _progress_bar(enabled: bool, total: int, epoch: int, epochs: int) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"epoch {epoch}/{epochs}", unit="img", unit_scale=True, leave=False, dynamic_ncols=True)


def train(
    config: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    echo: Callable[[str], None] | None = print,
    progress: bool | None = None,
    pictures: bool = True,
    stop_after: int | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Train a network as ``config`` says, writing everything into ``out_dir``; return the metrics.

    Parameters
    ----------
    config : TrainConfig
        Every setting. With ``resume=True`` it must agree with the checkpoint's
        settings (``MATH_FIELDS``), else ValueError; only ``epochs`` may grow
        (the schedule is then recomputed for the new count from the next epoch on).
    out_dir : path
        Receives ``metrics.json``, ``metrics.csv``, ``checkpoint.npz`` (every
        epoch), ``best.npz`` (with ``keep_best``), ``model.npz`` and the
        pictures (at the end).
    resume : bool
        Continue from ``out_dir/checkpoint.npz``. A finished run (and no more
        epochs asked for) is left as it is.
    echo : callable or None
        Where the lines go (None: nowhere); the last is ``summary_line``.
    progress : bool or None
        Show a progress bar; None means "when stderr is a terminal".
    pictures : bool
        Draw the PNG files at the end.
    stop_after : int or None
        Stop (as if interrupted) once this many epochs are done; the
        checkpoint lets ``resume=True`` finish the run. The returned metrics
        then have status "stopped".
    verbose : bool
        Also echo the full reason for the backend choice (always in metrics.json).

    Raises
    ------
    Diverged
        The loss became NaN or infinite or exploded (metrics.json then says
        so, and the last good checkpoint is kept).
    SettingError
        A setting that cannot work with this data (a batch larger than the training set, say).
    KeyboardInterrupt
        Passed on after metrics.json says "interrupted".
    """
    from .backend import get_backend
    from .data import Minibatches, load_dataset, train_val_split
    from .model import MLP
    from .optim import SGD

    started = time.perf_counter()
    config.validate()
    out = Path(out_dir)
    say = echo or (lambda line: None)
    if progress is None:
        progress = sys.stderr.isatty()

    if resume:
        saved, metrics = read_checkpoint(out)
        conflicts = [
            f"{name.replace('_', '-')} {getattr(config, name)!r} (the run has {getattr(saved, name)!r})"
            for name in TrainConfig.MATH_FIELDS
            if name != "epochs" and getattr(config, name) != getattr(saved, name)
        ]
        if conflicts:
            raise ValueError(f"cannot resume {out}: different settings: {'; '.join(conflicts)}")
        done_before = len(metrics["epochs"])
        if config.epochs < done_before:
            raise SettingError(f"cannot resume {out} with --epochs {config.epochs}: it has already done {done_before}")
        on_disk = load_metrics(out) or {}
        if on_disk.get("status") == "finished" and config.epochs == saved.epochs:
            say(f"{out} is already finished ({plural(on_disk['config']['epochs'], 'epoch')}); nothing was changed (give --epochs N to train further)")
            return on_disk
        if config.data_dir is not None and not os.path.isdir(config.data_dir):
            raise FileNotFoundError(
                f"the data folder of {out}, {config.data_dir}, does not exist (from {os.getcwd()}); "
                "pass --data-dir with the folder of its data set"
            )
    elif (out / CHECKPOINT).exists():
        raise ValueError(f"{out} already holds a run; resume it with --resume {out} or choose another --out")
    else:
        make_out_dir(out)  # before the data is loaded: a folder that cannot be written fails at once
    if config.data_dir is not None:  # absolute, so that --resume works from any folder
        config = dataclasses.replace(config, data_dir=os.path.abspath(config.data_dir))

    backend = get_backend(config.backend)
    xp = backend.xp
    x_train, y_train, x_test, y_test = load_dataset(config.dataset, config.data_dir)
    n_inputs = int(x_train.shape[1])  # the network's sizes come from the data, never from constants
    n_classes = int(max(y_train.max(), y_test.max())) + 1
    if config.train_size:
        if config.train_size > len(x_train):
            raise SettingError(f"--train-size {config.train_size} is more than the {len(x_train)} training images")
        x_train, y_train = x_train[: config.train_size], y_train[: config.train_size]
    chance = float(np.bincount(y_train, minlength=n_classes).max() / len(y_train))  # always naming the commonest class
    x_val = y_val = None
    if config.val_size:
        if config.val_size >= len(x_train):
            raise SettingError(f"--val-size {config.val_size} leaves no training images (there are {len(x_train)})")
        x_train, y_train, x_val, y_val = train_val_split(x_train, y_train, config.val_size, seed=config.seed)
    if config.batch_size > len(x_train):
        held = f" after --val-size {config.val_size}" if config.val_size else ""
        raise SettingError(
            f"--batch-size {config.batch_size} is larger than the training set ({len(x_train)} images{held}); "
            f"use at most {len(x_train)}"
        )

    if resume:
        model = MLP.load(out / CHECKPOINT, backend=backend.name)
    else:
        model = MLP(n_inputs, config.hidden, n_classes, activation=config.activation, backend=backend.name, dtype=config.dtype, seed=config.seed)
    optimizer = SGD(model, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if resume:
        epochs_done = _restore_state(out / CHECKPOINT, model, optimizer)
        if config.epochs != saved.epochs:  # the schedule's length changes from the next epoch on
            metrics.setdefault("epochs_changed", []).append({"after_epoch": epochs_done, "from": saved.epochs, "to": config.epochs})
        metrics["config"].update(epochs=config.epochs, data_dir=config.data_dir)
    else:
        epochs_done = 0
        run_config = config.to_dict()
        run_config.update(
            backend_used=backend.name,
            backend_reason=backend.reason,
            n_inputs=n_inputs,
            n_outputs=n_classes,
            n_train=int(len(x_train)),
            n_val=int(len(x_val)) if x_val is not None else 0,
            n_test=int(len(x_test)),
            environment=environment(backend),
        )
        metrics = {"config": run_config, "status": "running", "epochs": []}
    metrics["config"]["backend_used"] = backend.name  # a resume may move a run to another backend
    metrics["status"] = "running"
    metrics["epochs"] = metrics["epochs"][:epochs_done]

    if config.augment:  # each epoch's distorted copy is written here, then served by a fresh Minibatches
        x_distorted = np.empty_like(x_train)
    else:
        batches = Minibatches(x_train, y_train, config.batch_size, xp=xp, seed=config.seed, dtype=model.dtype)
    test_x, test_y = model.as_input(x_test), xp.asarray(y_test)  # on the device once, not every epoch
    val = (model.as_input(x_val), xp.asarray(y_val)) if x_val is not None else None
    step = make_step(model, optimizer, tf32=config.tf32)
    schedule = SCHEDULES[config.lr_schedule]
    say(f"backend {backend.name} ({_backend_note(config.backend, backend)})")
    if verbose:
        say(f"backend choice: {backend.reason}")
    sizes = f"{n_inputs}-{config.hidden}-{n_classes}"
    if epochs_done == 0:
        say(
            f"training {sizes} ({config.activation}) on {len(x_train)} {config.dataset} images: "
            f"{plural(config.epochs, 'epoch')}, batch {config.batch_size}, lr {config.lr:g} ({config.lr_schedule}), "
            f"momentum {config.momentum:g}{', augmented' if config.augment else ''}; writing to {out}"
        )
    else:
        say(f"resuming {out} after epoch {epochs_done} of {config.epochs}")

    best_epoch, best_acc = _best_val(metrics["epochs"])
    last_epoch = config.epochs if stop_after is None else min(config.epochs, stop_after)
    stopped_early = None
    try:
        for epoch in range(epochs_done, last_epoch):
            if config.patience and best_epoch is not None and epoch - best_epoch >= config.patience:
                stopped_early = {"after_epoch": epoch, "best_epoch": best_epoch, "patience": config.patience}
                break
            optimizer.lr = schedule(epoch, config.epochs, config.lr)
            augment_seconds = 0.0
            if config.augment:
                from .augment import distort

                start = time.perf_counter()
                distort(x_train, np.random.default_rng([config.seed, epoch, 1]), out=x_distorted)
                batches = Minibatches(x_distorted, y_train, config.batch_size, xp=xp, seed=config.seed, dtype=model.dtype)
                augment_seconds = time.perf_counter() - start
            bar = _progress_bar(progress, len(x_train), epoch + 1, config.epochs)
            report = None
            if bar is not None:

                def report(n: int, loss: float, bar: Any = bar) -> None:
                    bar.update(n)
                    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

            synchronize(xp)
            start = time.perf_counter()
            with np.errstate(over="ignore", invalid="ignore"):  # a diverging run is caught below, by name
                sums = run_epoch(step, batches, epoch, progress=report, stop_at_nonfinite=xp is np)
            seconds = time.perf_counter() - start  # run_epoch ends by reading the device: synchronised
            if bar is not None:
                bar.close()
            row: dict[str, Any] = {
                "epoch": epoch + 1,
                "lr": optimizer.lr,
                "train_loss": sums.loss_sum / sums.n_samples,
                "train_accuracy": sums.n_correct / sums.n_samples,
            }
            if sums.first_bad_step is not None:
                why, bad_step = "the loss became NaN or infinite", sums.first_bad_step + 1
            else:
                first_loss = metrics["epochs"][0]["train_loss"] if metrics["epochs"] else None
                why, bad_step = divergence(row, first_loss, n_classes, chance), None
            if why is not None:  # this epoch's parameters are not checkpointed: the last good ones stay
                metrics["status"] = "diverged"
                metrics["diverged"] = {"epoch": epoch + 1, "step": bad_step, "lr": optimizer.lr, "reason": why}
                _write_metrics(out, metrics)
                raise Diverged(epoch + 1, why, optimizer.lr, str(out), step=bad_step, base_lr=config.lr)

            if val is not None:
                row["val_loss"], row["val_accuracy"] = evaluate(model, *val)
            row["test_loss"], row["test_accuracy"] = evaluate(model, test_x, test_y)
            row["seconds"] = seconds
            if config.augment:
                row["augment_seconds"] = augment_seconds  # distorting the images, on the CPU, not in "seconds"
            row["samples_per_second"] = sums.n_samples / seconds if seconds > 0 else float("inf")
            metrics["epochs"].append(row)
            if val is not None and (best_acc is None or row["val_accuracy"] > best_acc):
                best_epoch, best_acc = epoch + 1, row["val_accuracy"]
                if config.keep_best:
                    model.save(out / BEST, **{"train.epoch": np.int64(epoch + 1)})
            _save_checkpoint(out, model, optimizer, epoch + 1, metrics["config"], metrics)
            _write_metrics(out, metrics)
            shown = "val" if val is not None else "test"
            say(
                f"epoch {epoch + 1:3d}/{config.epochs}  train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}  "
                f"{shown} loss {row[shown + '_loss']:.4f} acc {row[shown + '_accuracy']:.4f}  {seconds:.2f} s"
                + (f" (+{augment_seconds:.1f} s distorting)" if config.augment else "")
            )
    except KeyboardInterrupt:
        metrics["status"] = "interrupted"  # the epoch in progress is lost; the checkpoint has the ones before
        _write_metrics(out, metrics)
        raise

    if last_epoch < config.epochs and stopped_early is None:
        metrics["status"] = "stopped"
        _write_metrics(out, metrics)
        say(f"stopped after epoch {last_epoch}; continue with --resume {out}")
        return metrics
    metrics["status"] = "finished"
    if stopped_early is not None:
        metrics["stopped_early"] = stopped_early
        say(f"stopped early: no better validation accuracy in the {plural(config.patience, 'epoch')} after epoch {best_epoch}")
    kept = len(metrics["epochs"])
    if config.keep_best and best_epoch is not None and best_epoch != kept:
        kept = int(_load_params(out / BEST, model))
    test_loss, test_accuracy = evaluate(model, test_x, test_y)  # the test set is scored once, on the model kept
    metrics["final"] = {
        "epoch_kept": kept,
        "best_val_epoch": best_epoch,
        "best_val_accuracy": best_acc,
        "test_loss": test_loss,
        "test_accuracy": test_accuracy,
        "train_seconds": sum(r["seconds"] for r in metrics["epochs"]),
    }
    model.save(out / MODEL, **{"train.config": json.dumps(metrics["config"]), "train.epoch": np.int64(kept)})
    if pictures:
        draw_run_pictures(out, model, metrics, x_test, y_test)
    metrics["final"]["wall_seconds"] = time.perf_counter() - started
    _write_metrics(out, metrics)
    say(f"wrote {out / MODEL}" + (f" (the parameters of epoch {kept})" if kept != len(metrics["epochs"]) else "") + f" and the pictures in {out}")
    say(summary_line(metrics, out))
    return metrics


def summary_line(metrics: dict[str, Any], out: str | os.PathLike) -> str:
    """The last line of a finished run: final and best accuracy, time, folder.

    With a validation set it reports the validation accuracy (final and best
    epoch) and the test accuracy of the model kept; without one, the final
    test accuracy and the best epoch's.
    """
    rows, final = metrics["epochs"], metrics["final"]
    seconds = final.get("wall_seconds", final["train_seconds"])
    if final.get("best_val_epoch") is not None:
        accuracy = (
            f"val accuracy {100 * rows[-1]['val_accuracy']:.2f}% (best {100 * final['best_val_accuracy']:.2f}% "
            f"at epoch {final['best_val_epoch']}), test accuracy {100 * final['test_accuracy']:.2f}% "
            f"(model of epoch {final['epoch_kept']})"
        )
    else:
        best = max(rows, key=lambda row: row["test_accuracy"])
        accuracy = f"test accuracy {100 * final['test_accuracy']:.2f}% (best {100 * best['test_accuracy']:.2f}% at epoch {best['epoch']})"
    return f"done: {accuracy}, {plural(len(rows), 'epoch')} in {seconds:.1f} s, in {out}"


def _backend_note(asked: str, backend: Any) -> str:
    """Why this backend, in a few words (the full reason is in metrics.json and --verbose)."""
    if backend.is_gpu:
        return environment(backend).get("gpu", "GPU")
    if asked == "numpy":
        return "as asked"
    # a GPU without a usable CuPy is not "no GPU": point at the reason instead
    return "a GPU is here but not usable; --verbose says why" if os.path.exists("/dev/nvidia0") else "no GPU found"


def _best_val(rows: list[dict[str, Any]]) -> tuple[int | None, float | None]:
    """(epoch, accuracy) of the best validation accuracy so far (the first such epoch), or (None, None)."""
    scored = [row for row in rows if "val_accuracy" in row]
    if not scored:
        return None, None
    best = max(scored, key=lambda row: (row["val_accuracy"], -row["epoch"]))
    return best["epoch"], best["val_accuracy"]


def _load_params(path: Path, model: Any) -> int:
    """Put the parameters saved in ``path`` (``best.npz``) into ``model``; return their epoch."""
    from .model import PARAM_NAMES

    arrays = read_npz(path, "a backprop-xp model file")
    for name in PARAM_NAMES:
        model.params[name][...] = model.xp.asarray(arrays[name])
    return int(arrays["train.epoch"])


def _restore_state(path: Path, model: Any, optimizer: Any) -> int:
    """Put the checkpoint's momentum buffer into ``optimizer``; return the epochs already done."""
    arrays = read_npz(path, "a backprop-xp checkpoint")
    try:
        epochs_done, velocity = int(arrays["train.epochs_done"]), arrays["train.velocity"]
    except KeyError as exc:
        raise ValueError(f"{path}: not a backprop-xp checkpoint (no {exc})") from exc
    if optimizer.velocity is not None:
        if velocity.shape != optimizer.velocity.shape:
            raise ValueError(f"{path}: momentum buffer has shape {velocity.shape}, expected {optimizer.velocity.shape}")
        optimizer.velocity[...] = model.xp.asarray(velocity)
    return epochs_done


def draw_run_pictures(out: Path, model: Any, metrics: dict[str, Any], x_test: np.ndarray, y_test: np.ndarray) -> None:
    """curves.png, confusion.png, misclassified.png and weights.png for a finished run.

    The last two draw images, so they are drawn only when the inputs form a square picture.
    """
    from . import plots

    proba = to_numpy(model.predict_proba(x_test))
    predicted = proba.argmax(axis=1)
    plots.training_curves(metrics["epochs"], out / "curves.png", title=_run_title(metrics["config"], model))
    accuracy = float((predicted == y_test).mean())
    counts = confusion_matrix(y_test, predicted, model.n_outputs)
    plots.confusion_plot(counts, out / "confusion.png", title=f"Test confusion matrix (accuracy {accuracy:.2%})")
    if math.isqrt(model.n_inputs) ** 2 == model.n_inputs:
        plots.mistakes_grid(x_test, y_test, proba, out / "misclassified.png")
        plots.weight_grid(to_numpy(model.params["W1"]), out / "weights.png")


def _run_title(config: dict[str, Any], model: Any) -> str:
    title = (
        f"{model.n_inputs}-{model.n_hidden}-{model.n_outputs} {config['activation']}, batch {config['batch_size']}, "
        f"lr {config['lr']:g} ({config['lr_schedule']}), momentum {config['momentum']:g}"
    )
    if config.get("weight_decay"):
        title += f", weight decay {config['weight_decay']:g}"
    if config.get("augment"):
        title += ", augmented"
    data = "" if config.get("dataset", "mnist") == "mnist" else f"{config['dataset']}, "
    return data + title + f" ({config.get('backend_used', config['backend'])})"


def load_metrics(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``out_dir/metrics.json`` as a dict, or None if there is none (a run not started)."""
    path = Path(out_dir) / METRICS_JSON
    if not path.is_file():
        return None
    with open(path) as f:
        return json.load(f)
