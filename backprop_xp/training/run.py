"""Training: the epoch loop, learning-rate schedules, evaluation, checkpoints, resume, divergence.

One training step is ``model.backprop`` then ``optimizer.step()`` (``step.make_step``);
one epoch is that step over every minibatch (``run_epoch``); a run is epochs
with a learning-rate schedule, an evaluation after each, a checkpoint after
each, and the files a person looks at afterwards (``train``).

Two rules shape the loop:

* No host synchronisation per step. The loss and the number of correct
  predictions of every step stay on the device in two small arrays (one slot
  per step) and are read back once per epoch. On a GPU the Python loop can
  run ahead of the device; on the CPU it costs two scalar stores per step.
* Bit-exact resume on NumPy. A checkpoint holds the parameters, the optimizer's
  state (``state_dict()``), the epoch reached, the config and the metrics so far; the shuffling
  order depends only on (seed, epoch) and the learning rate only on
  (epoch, epochs, lr). So "k epochs, stop, resume to N" ends with exactly the
  parameters of "N epochs straight".
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..backend import Backend, get_backend, synchronize
from ..cpu import numba_loops
from ..data import Minibatches, load_dataset, train_val_split
from ..data.augment import distort
from ..data.datasets import class_names, data_folder
from ..data.preprocess import PREPROCESSING
from ..files import LOCK, check_interrupt, in_use, make_out_dir, read_npz
from ..model import MLP
from ..optimizers import OPTIMIZERS, Optimizer, make_optimizer
from ..progress import progress_bar
from ..step import make_step, warm_up
from .config import SCHEDULES, SettingError, TrainConfig
from .epoch import evaluate, run_epoch
from .run_files import (
    BEST,
    CHECKPOINT,
    METRICS_JSON,
    MODEL,
    cpu_step,
    cpu_step_words,
    draw_run_pictures,
    environment,
    load_metrics,
    load_params,
    read_checkpoint,
    restore_state,
    save_checkpoint,
    write_metrics,
)  # fmt: skip

DIVERGED_EXIT_CODE = 3


def plural(n: int, word: str) -> str:
    """``"1 epoch"``, ``"2 epochs"``.

    >>> plural(1, "epoch"), plural(3, "run")
    ('1 epoch', '3 runs')
    """
    return f"{n} {word}" + ("" if n == 1 else "s")


def few(names: Sequence[str], shown: int = 4) -> str:
    """The first ``shown`` names, and how many more: ``"a, b, c, d and 2 more"``.

    >>> few(["a", "b", "c", "d", "e", "f"])
    'a, b, c, d and 2 more'
    """
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


# --------------------------------------------------------------------------- a whole run


class Diverged(RuntimeError):
    """Training diverged: the loss became NaN or infinite, or exploded, or learning stopped at chance.

    ``reason`` says which, ``step`` is the first bad step (None when the
    whole epoch's numbers gave it away), ``lr`` the rate the epoch ran at and
    ``suggested_lr`` a ``--lr`` worth trying: at least 10 times smaller than
    the base rate and never above the default's.
    """

    def __init__(
        self, epoch: int, reason: str, lr: float, out_dir: str, *, step: int | None = None, base_lr: float | None = None
    ) -> None:
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
        # The schedule's rate at that epoch, and the --lr the user gave when the schedule had changed it.
        rate = (
            f"learning rate {lr:g}" if lr == base_lr else f"learning rate {lr:g} by the schedule, from --lr {base_lr:g}"
        )
        super().__init__(
            f"training diverged at {where}: {reason} ({rate}); try --lr {self.suggested_lr:g} or smaller; {kept}"
        )


def divergence(
    row: dict[str, Any], first_loss: float | None, n_classes: int, chance: float, previous_loss: float | None = None
) -> str | None:
    """Why an epoch whose loss stayed finite still counts as diverged, or None if it does not.

    A finite loss can explode (lr 50: loss 1e6, accuracy 10%) or the network
    can stop learning altogether (dead units: loss stuck at guessing level).
    Thresholds are far from any run that learns: guessing uniformly costs
    ln(K); a run 10 times worse than that, or 10 times worse than its own
    first epoch, is exploding; and after a whole epoch of learning, accuracy
    no better than always naming the most frequent class with a loss no better
    than guessing, and no better than the first epoch's or the previous one's,
    means nothing is being learned. A run slow to start (its loss falling,
    from a little above ln K where an untrained network starts) goes on.

    >>> divergence({"epoch": 2, "train_loss": 1e6, "train_accuracy": 0.1}, 3.0, 10, 0.11)
    'the training loss 1e+06 is more than 10 times that of guessing (2.3)'
    >>> divergence({"epoch": 2, "train_loss": 0.3, "train_accuracy": 0.9}, 0.5, 10, 0.11) is None
    True
    >>> divergence({"epoch": 3, "train_loss": 2.31, "train_accuracy": 0.1}, 2.30, 10, 0.11)[:33]
    'training accuracy 10.0% is at cha'
    >>> divergence({"epoch": 2, "train_loss": 2.38, "train_accuracy": 0.1}, 2.52, 10, 0.11) is None  # slow, still falling
    True
    >>> divergence({"epoch": 3, "train_loss": 2.40, "train_accuracy": 0.095}, 2.81, 10, 0.11, 2.37)[:30]  # lr 3
    'training accuracy 9.5% is at c'
    """
    loss, accuracy, guess = row["train_loss"], row["train_accuracy"], math.log(n_classes)
    if loss > 10 * guess:
        return f"the training loss {loss:.3g} is more than 10 times that of guessing ({guess:.2g})"
    if row["epoch"] >= 2 and first_loss is not None and loss > 10 * first_loss:
        return f"the training loss {loss:.3g} is more than 10 times the first epoch's ({first_loss:.3g})"
    # "Stopped learning" needs a loss that stopped falling, too: an untrained network starts a little
    # above ln K, and a small or short run merely slow to start must not be stopped as diverged.
    stuck = any(earlier is not None and loss >= earlier for earlier in (first_loss, previous_loss))
    if row["epoch"] >= 2 and stuck and accuracy <= chance + 0.01 and loss >= 0.98 * guess:
        return (
            f"training accuracy {accuracy:.1%} is at chance level (always naming the most frequent class "
            f"gives {chance:.1%}) and the loss {loss:.3g} no better than guessing"
        )
    return None


class RunData(NamedTuple):
    """The arrays of a run, split as its settings say, and what the network's shape follows from."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray | None
    y_val: np.ndarray | None
    x_test: np.ndarray
    y_test: np.ndarray
    n_inputs: int  # the network's sizes come from the data, never from constants
    n_classes: int
    chance: float  # the accuracy of always naming the commonest class


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
    checkpoint: tuple[TrainConfig, dict[str, Any]] | None = None,
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
    checkpoint : (TrainConfig, dict) or None
        With ``resume``: what ``read_checkpoint(out_dir)`` returned, when the
        caller has read it already (the command line does, to apply its flags
        to the run's saved settings), so that it is read once.

    Raises
    ------
    Diverged
        The loss became NaN or infinite or exploded (metrics.json then says
        so, and the last good checkpoint is kept).
    SettingError
        A setting that cannot work with this data (a batch larger than the
        training set, say), an ``out`` that already holds a run (without
        ``resume``), or a resume with a changed setting.
    FolderInUse
        Another process (or thread) is training into ``out_dir``.
    KeyboardInterrupt
        Passed on after metrics.json says "interrupted".
    """
    started = time.perf_counter()
    if not isinstance(config, TrainConfig):  # a dict of settings, say: say how to make one
        raise TypeError(f"config must be a TrainConfig (TrainConfig(**settings)), got {type(config).__name__}")
    config.validate()
    out = Path(out_dir)
    say = echo or (lambda line: None)
    # --- the run folder: ours alone while we train; a new run, or the checkpoint of the run to continue
    with run_folder_lock(out, resume):
        saved = open_run_folder(config, out, resume, checkpoint)
        if saved is not None and (finished := already_finished(config, out, saved, say)) is not None:
            return finished
        folder, chosen_by, _ = data_folder(config.dataset, config.data_dir)
        if chosen_by != "the cache":  # recorded absolute, so that a --resume from any folder, without $VAR, finds it
            config = dataclasses.replace(config, data_dir=str(folder))
        # --- data, model, optimizer, metrics
        backend = get_backend(config.backend)
        data = load_run_data(config)
        model, optimizer, metrics, epochs_done = build_model(config, out, backend, data, saved)
        announce(config, out, backend, data, epochs_done, say, verbose)
        # --- the epochs
        last_epoch = config.epochs if stop_after is None else min(config.epochs, stop_after)
        show_progress = sys.stderr.isatty() if progress is None else progress
        epochs = EpochLoop(config, out, model, optimizer, data, metrics, say, show_progress)
        try:
            with numba_loops.sharing_blas(model.xp):  # the epochs' products on the fused loops' threads, if they split
                stopped_early = epochs.run(epochs_done, last_epoch)
            # --- the end: stopped (to be resumed), or finished with the model kept and the pictures
            if last_epoch < config.epochs and stopped_early is None:
                metrics["status"] = "stopped"
                write_metrics(out, metrics)
                say(f"stopped after epoch {last_epoch}; continue with --resume {out}")
                return metrics
            finish(config, out, epochs, stopped_early, pictures, started, say)
        except KeyboardInterrupt:
            # The epoch in progress is lost; the checkpoint has the ones before. Interrupted while
            # finishing (the pictures, say), a --resume redoes the finish from the last checkpoint.
            metrics["status"] = "interrupted"
            write_metrics(out, metrics)
            raise
        return metrics


# A folder holding one of these holds a run of ours (open_run_folder then refuses it, or starts over in it).
RUN_MARKS = (METRICS_JSON, CHECKPOINT, MODEL)
# What a sweep's run_one leaves in a run folder before train starts (its log, a failure's traceback), and the lock.
RUN_LOGS = {"train.log", "error.txt", LOCK}


def check_new_run_folder(out: Path) -> None:
    """SettingError if ``out`` is a file, or a folder that is not empty and holds no run of ours.

    A new run writes curves.png, metrics.csv...: in a folder of the user's own
    files it would replace theirs, so such a folder is refused, as ``git
    clone`` refuses a folder that is not empty.
    """
    if out.exists() and not out.is_dir():
        raise SettingError(f"--out {out} is a file, not a folder")
    if not out.is_dir():
        return
    names = [p.name for p in out.iterdir() if not _temporary(p.name)]
    if any(name in RUN_MARKS for name in names):
        return
    foreign = sorted(name for name in names if name not in RUN_LOGS)
    if foreign:
        raise SettingError(
            f"--out {out} is not empty and holds no run of backprop-xp ({few(foreign, 5)}): choose a new or empty folder"
        )


def _temporary(name: str) -> bool:
    """Whether ``name`` is one of atomic_write's temporary files (``.NAME.<random>.tmp``) or make_out_dir's probe."""
    return name.startswith(".") and (name.endswith(".tmp") or name.startswith(".write-test."))


@contextlib.contextmanager
def run_folder_lock(out: Path, resume: bool) -> Iterator[None]:
    """The run folder (made for a new run), locked against another process training into it (FolderInUse).

    A new run that fails before it wrote anything (no data, a failed
    download) removes the folders it made, so that no empty run folder is
    left behind; a folder that was there before is never removed.
    """
    made = None
    if not resume:
        check_new_run_folder(out)
        made = _first_missing(out)
        make_out_dir(out)
    if not out.is_dir():  # a --resume of nothing: open_run_folder says so
        yield
        return
    try:
        with in_use(out):
            yield
    except BaseException:
        if made is not None:
            _remove_if_empty(out, made)
        raise


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (the first that make_out_dir would make), or None."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


def _remove_if_empty(path: Path, made: Path) -> None:
    """Remove ``path`` and its parents up to ``made`` while they are empty (folders this run made)."""
    for folder in (path, *path.parents):
        try:
            folder.rmdir()  # only an empty folder: never a file the run or anyone else wrote
        except OSError:
            return
        if folder == made:
            return


def open_run_folder(
    config: TrainConfig, out: Path, resume: bool, checkpoint: tuple[TrainConfig, dict[str, Any]] | None = None
) -> tuple[TrainConfig, dict[str, Any]] | None:
    """The saved config and metrics of the run to resume (checked against ``config``), or None for a new run.

    ``checkpoint``: those, when the caller has read them already. A new run's folder
    was made by ``run_folder_lock``, before the data is loaded, so that a folder
    that cannot be written fails at once.
    """
    if not resume:
        if holds_a_run(out):
            if (out / CHECKPOINT).exists():
                raise SettingError(f"{out} already holds a run; resume it with --resume {out} or choose another --out")
            raise SettingError(f"{out} already holds a run (no checkpoint to resume it from); choose another --out")
        return None
    saved, metrics = checkpoint or read_checkpoint(out)
    conflicts = [
        f"{name.replace('_', '-')} {getattr(config, name)!r} (the run has {getattr(saved, name)!r})"
        for name in TrainConfig.MATH_FIELDS
        if name != "epochs" and getattr(config, name) != getattr(saved, name)
    ]
    if conflicts:
        raise SettingError(f"cannot resume {out}: different settings: {'; '.join(conflicts)}")
    done_before = len(metrics["epochs"])
    if config.epochs < done_before:
        raise SettingError(f"cannot resume {out} with --epochs {config.epochs}: it has already done {done_before}")
    return saved, metrics


def holds_a_run(out: Path) -> bool:
    """Whether ``out`` holds a run that a new one would overwrite.

    Not only its checkpoint (the largest file, the one a user deletes to save
    room): its model, or metrics with an epoch done. Metrics with no epoch (a
    run interrupted before its first ended) hold nothing to lose.
    """
    if (out / CHECKPOINT).exists() or (out / MODEL).exists():
        return True
    try:
        metrics = load_metrics(out)
    except ValueError:  # unreadable: not ours to overwrite
        return True
    return bool(metrics and metrics.get("epochs"))


def already_finished(
    config: TrainConfig, out: Path, saved: tuple[TrainConfig, dict[str, Any]], say: Callable[[str], None]
) -> dict[str, Any] | None:
    """The metrics of a finished run asked for no more epochs (it is left as it is), else None.

    Also checks that a run to continue can find its data.
    """
    on_disk = load_metrics(out) or {}
    if on_disk.get("status") == "finished" and config.epochs == saved[0].epochs:
        done = f"{out} is already finished ({plural(on_disk['config']['epochs'], 'epoch')})"
        if not (out / MODEL).exists():  # deleted since: the checkpoint (or best.npz) still holds its parameters
            kept, source = restore_model(out, on_disk)
            say(f"{done}; wrote its {MODEL} again (the parameters of epoch {kept}, from {source})")
        else:
            say(f"{done}; nothing was changed (give --epochs N to train further)")
        return on_disk
    if config.data_dir is not None and not os.path.isdir(config.data_dir):
        raise FileNotFoundError(
            f"the data folder of {out}, {config.data_dir}, does not exist (from {os.getcwd()}); "
            "pass --data-dir with the folder of its data set"
        )
    return None


def restore_model(out: Path, metrics: dict[str, Any]) -> tuple[int, str]:
    """Write the model.npz of the finished run in ``out`` again; return its epoch and the file it came from.

    The model kept is the last epoch's, which the checkpoint holds, or with
    ``--keep-best`` the best validation epoch's, which best.npz holds: the very
    parameters ``finish`` saved. FileNotFoundError if that file is gone too.
    """
    kept = int(metrics["final"]["epoch_kept"])
    for name in (CHECKPOINT, BEST):
        path = out / name
        if path.is_file():
            arrays = read_npz(path, "a backprop-xp checkpoint")
            epoch = arrays.get("train.epochs_done", arrays.get("train.epoch"))
            if epoch is not None and int(epoch) == kept:
                model = MLP.load(path)
                model.save(
                    out / MODEL, **{"train.config": json.dumps(metrics["config"]), "train.epoch": np.int64(kept)}
                )
                return kept, name
    raise FileNotFoundError(
        f"{out}: cannot write {MODEL} again: neither {CHECKPOINT} nor {BEST} holds the parameters of epoch {kept}, "
        "the model the run kept"
    )


def load_run_data(config: TrainConfig) -> RunData:
    """The data set, cut to ``train_size``, split for ``val_size``, and checked to fit ``batch_size``."""
    x_train, y_train, x_test, y_test = load_dataset(config.dataset, config.data_dir)
    n_classes = int(max(y_train.max(), y_test.max())) + 1
    if config.train_size:
        if config.train_size > len(x_train):
            raise SettingError(f"--train-size {config.train_size} is more than the {len(x_train)} training images")
        x_train, y_train = x_train[: config.train_size], y_train[: config.train_size]
    prepare = PREPROCESSING[config.preprocess]  # every image the network sees, as evaluate and predict will
    x_train, x_test = prepare(x_train), prepare(x_test)  # (image by image: after the cut, the same images)
    chance = float(np.bincount(y_train, minlength=n_classes).max() / len(y_train))
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
    return RunData(x_train, y_train, x_val, y_val, x_test, y_test, int(x_train.shape[1]), n_classes, chance)


def build_model(
    config: TrainConfig, out: Path, backend: Backend, data: RunData, saved: tuple[TrainConfig, dict[str, Any]] | None
) -> tuple[MLP, Optimizer, dict[str, Any], int]:
    """``(model, optimizer, metrics, epochs_done)``: new, or restored from the checkpoint of the run to continue."""
    if saved is None:
        model = MLP(
            data.n_inputs, config.hidden, data.n_classes, activation=config.activation, backend=backend.name,
            dtype=config.dtype, seed=config.seed,
        )  # fmt: skip
    else:
        check_same_data(config, out, saved[1]["config"], data)
        model = MLP.load(out / CHECKPOINT, backend=backend.name)
    optimizer = make_optimizer(config.optimizer, model, config.lr, config)  # its settings are config fields
    if saved is None:
        epochs_done = 0
        run_config = config.to_dict()
        run_config.update(
            backend_used=backend.name,
            backend_reason=backend.reason,
            n_inputs=data.n_inputs,
            n_outputs=data.n_classes,
            classes=class_names(config.dataset, data.n_classes),  # a model knows its classes by name
            n_train=int(len(data.x_train)),
            n_val=int(len(data.x_val)) if data.x_val is not None else 0,
            n_test=int(len(data.x_test)),
            environment=environment(backend),
        )
        metrics = {"config": run_config, "status": "running", "epochs": []}
    else:
        saved_config, metrics = saved
        epochs_done = restore_state(out / CHECKPOINT, model, optimizer)
        if config.epochs != saved_config.epochs:  # the schedule's length changes from the next epoch on
            change = {"after_epoch": epochs_done, "from": saved_config.epochs, "to": config.epochs}
            metrics.setdefault("epochs_changed", []).append(change)
        metrics["config"].update(epochs=config.epochs, data_dir=config.data_dir)
        metrics.setdefault("resumed", []).append({"after_epoch": epochs_done})  # final.wall_seconds is this session's
    metrics["config"]["backend_used"] = backend.name  # a resume may move a run to another backend
    metrics["status"] = "running"
    metrics["epochs"] = metrics["epochs"][:epochs_done]
    return model, optimizer, metrics, epochs_done


def check_same_data(config: TrainConfig, out: Path, run_config: dict[str, Any], data: RunData) -> None:
    """SettingError if the data found for a resumed run is not the size of the data it was trained on.

    A resume from another data folder (``--data-dir``) would otherwise train
    and test on other images while metrics.json still named the first.
    """
    found = {
        "image size": data.n_inputs, "classes": data.n_classes, "training images": len(data.x_train),
        "validation images": 0 if data.x_val is None else len(data.x_val), "test images": len(data.x_test),
    }  # fmt: skip
    keys = {"image size": "n_inputs", "classes": "n_outputs", "training images": "n_train",
            "validation images": "n_val", "test images": "n_test"}  # fmt: skip
    differ = [f"{what} {n:,} (the run had {run_config[keys[what]]:,})" for what, n in found.items()
              if keys[what] in run_config and run_config[keys[what]] != n]  # fmt: skip
    if differ:
        where = config.data_dir or "the default data folder"
        raise SettingError(
            f"cannot resume {out}: the data in {where} is not the run's: {'; '.join(differ)}; "
            "pass --data-dir with the folder of the data it was trained on"
        )


def announce(
    config: TrainConfig,
    out: Path,
    backend: Backend,
    data: RunData,
    epochs_done: int,
    say: Callable[[str], None],
    verbose: bool,
) -> None:
    """The first lines of a run: the backend, then what is trained (or where a resume continues)."""
    say(f"backend {backend.name} ({_backend_note(config.backend, backend)})")
    if verbose:
        say(f"backend choice: {backend.reason}")
    if epochs_done:
        say(f"resuming {out} after epoch {epochs_done} of {config.epochs}")
        return
    say(
        f"training {data.n_inputs}-{config.hidden}-{data.n_classes} ({config.activation}) on {len(data.x_train)} "
        f"{config.dataset} images: {plural(config.epochs, 'epoch')}, batch {config.batch_size}, lr {config.lr:g} "
        f"({config.lr_schedule}), {_optimizer_words(config)}{', augmented' if config.augment else ''}; writing to {out}"
    )


class EpochLoop:
    """The epochs of a run: schedule, (augmented) batches, the step, divergence, evaluation, checkpoints, best epoch."""

    def __init__(
        self, config: TrainConfig, out: Path, model: MLP, optimizer: Optimizer, data: RunData, metrics: dict[str, Any],
        say: Callable[[str], None], progress: bool,
    ) -> None:  # fmt: skip
        self.config, self.out, self.model, self.optimizer, self.data = config, out, model, optimizer, data
        self.metrics, self.say, self.progress = metrics, say, progress
        xp = self.xp = model.xp
        # With --augment, each epoch's distorted copy is written into x_distorted and refilled into these
        # same batches (their buffers keep their device addresses: the GPU step's graphs read them there).
        # (Never data.x_train itself: on NumPy Minibatches may serve its x without a copy, and a refill would
        # overwrite the originals that every epoch distorts.)
        self.x_distorted = np.empty_like(data.x_train) if config.augment else None
        x = data.x_train if self.x_distorted is None else self.x_distorted
        self.batches = Minibatches(x, data.y_train, config.batch_size, xp=xp, seed=config.seed, dtype=model.dtype)
        self.test = model.as_input(data.x_test), xp.asarray(data.y_test)  # on the device once, not every epoch
        self.val = (model.as_input(data.x_val), xp.asarray(data.y_val)) if data.x_val is not None else None
        self.step = make_step(model, optimizer, tf32=config.tf32, checked=False)  # the data was checked on loading
        warm_up(model, optimizer, min(config.batch_size, len(data.x_train)))  # kernels loaded before any timing
        self.best_epoch, self.best_acc = _best_val(metrics["epochs"])

    def run(self, first: int, last: int) -> dict[str, int] | None:
        """Epochs ``first`` to ``last - 1``; what early stopping recorded if patience ran out, else None."""
        config = self.config
        for epoch in range(first, last):
            check_interrupt()  # also before the augmentation, which takes seconds
            if config.patience and self.best_epoch is not None and epoch - self.best_epoch >= config.patience:
                return {"after_epoch": epoch, "best_epoch": self.best_epoch, "patience": config.patience}
            self.optimizer.lr = SCHEDULES[config.lr_schedule](epoch, config.epochs, config.lr)
            augment_seconds = self.augment(epoch) if config.augment else None
            row = self.train_epoch(epoch)
            self.check_divergence(row)
            self.record(row, augment_seconds)
        return None

    def augment(self, epoch: int) -> float:
        """Distort the training images afresh for this epoch; the seconds it took (on the CPU)."""
        config, start = self.config, time.perf_counter()
        distort(
            self.data.x_train,
            np.random.default_rng([config.seed, epoch, 1]),
            out=self.x_distorted,
            **config.distortions(),
        )
        self.batches.refill(self.x_distorted)  # in place: a new Minibatches would move the batch buffers
        return time.perf_counter() - start

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass of the step over the batches, timed; the epoch's row of metrics so far."""
        bar = progress_bar(len(self.data.x_train), f"epoch {epoch + 1}/{self.config.epochs}", enabled=self.progress)
        report = None
        if self.progress:  # the running loss is read from the device only when someone watches

            def report(n: int, loss: float) -> None:
                bar.update(n)
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

        synchronize(self.xp)
        start = time.perf_counter()
        with np.errstate(over="ignore", invalid="ignore"):  # a diverging run is caught by check_divergence
            sums = run_epoch(self.step, self.batches, epoch, progress=report, stop_at_nonfinite=None)
        seconds = time.perf_counter() - start  # run_epoch ends by reading the device: synchronised
        bar.close()
        return {
            "epoch": epoch + 1,
            "lr": self.optimizer.lr,
            "train_loss": sums.loss_sum / sums.n_samples,
            "train_accuracy": sums.n_correct / sums.n_samples,
            "seconds": seconds,
            "samples_per_second": sums.n_samples / seconds if seconds > 0 else float("inf"),
            "_first_bad_step": sums.first_bad_step,
        }

    def check_divergence(self, row: dict[str, Any]) -> None:
        """Raise Diverged (metrics.json saying so) if the epoch's loss is not finite or exploded."""
        first_bad_step = row.pop("_first_bad_step")
        if first_bad_step is not None:
            why, bad_step = "the loss became NaN or infinite", first_bad_step + 1
        else:
            losses = [earlier["train_loss"] for earlier in self.metrics["epochs"]]
            first, previous = (losses[0], losses[-1]) if losses else (None, None)
            why, bad_step = divergence(row, first, self.data.n_classes, self.data.chance, previous), None
        if why is None:
            return
        # this epoch's parameters are not checkpointed: the last good ones stay
        lr, epoch = self.optimizer.lr, row["epoch"]
        self.metrics["status"] = "diverged"
        self.metrics["diverged"] = {"epoch": epoch, "step": bad_step, "lr": lr, "reason": why}
        write_metrics(self.out, self.metrics)
        raise Diverged(epoch, why, lr, str(self.out), step=bad_step, base_lr=self.config.lr)

    def record(self, row: dict[str, Any], augment_seconds: float | None) -> None:
        """Evaluate, keep the best epoch, checkpoint, write the metrics and say one line."""
        config, model, out = self.config, self.model, self.out
        seconds, per_second = row.pop("seconds"), row.pop("samples_per_second")
        if self.val is not None:
            row["val_loss"], row["val_accuracy"] = evaluate(model, *self.val)
        row["test_loss"], row["test_accuracy"] = evaluate(model, *self.test)
        row["seconds"] = seconds
        if augment_seconds is not None:
            row["augment_seconds"] = augment_seconds  # distorting the images, on the CPU, not in "seconds"
        row["samples_per_second"] = per_second
        self.metrics["epochs"].append(row)
        if self.val is not None and (self.best_acc is None or row["val_accuracy"] > self.best_acc):
            self.best_epoch, self.best_acc = row["epoch"], row["val_accuracy"]
            if config.keep_best:
                model.save(out / BEST, **{"train.epoch": np.int64(row["epoch"])})
        save_checkpoint(out, model, self.optimizer, row["epoch"], self.metrics["config"], self.metrics)
        write_metrics(out, self.metrics)
        shown = "val" if self.val is not None else "test"
        self.say(
            f"epoch {row['epoch']:3d}/{config.epochs}  train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}  "
            f"{shown} loss {row[shown + '_loss']:.4f} acc {row[shown + '_accuracy']:.4f}  {seconds:.2f} s"
            + (f" (+{augment_seconds:.1f} s distorting)" if augment_seconds is not None else "")
        )


def finish(
    config: TrainConfig, out: Path, epochs: EpochLoop, stopped_early: dict[str, int] | None, pictures: bool,
    started: float, say: Callable[[str], None],
) -> None:  # fmt: skip
    """A finished run: the model kept (the best validation epoch's with ``keep_best``), scored once on the test
    set, saved with the pictures and the final metrics; the last line."""
    model, metrics = epochs.model, epochs.metrics
    metrics["status"] = "finished"
    if stopped_early is not None:
        metrics["stopped_early"] = stopped_early
        say(
            f"stopped early: no better validation accuracy in the {plural(config.patience, 'epoch')} after epoch {epochs.best_epoch}"
        )
    kept = len(metrics["epochs"])
    if config.keep_best and epochs.best_epoch is not None and epochs.best_epoch != kept:
        kept = int(load_params(out / BEST, model))
    test_loss, test_accuracy = evaluate(model, *epochs.test)  # the test set is scored once, on the model kept
    metrics["final"] = {
        "epoch_kept": kept,
        "best_val_epoch": epochs.best_epoch,
        "best_val_accuracy": epochs.best_acc,
        "test_loss": test_loss,
        "test_accuracy": test_accuracy,
        "train_seconds": sum(r["seconds"] for r in metrics["epochs"]),
    }
    model.save(out / MODEL, **{"train.config": json.dumps(metrics["config"]), "train.epoch": np.int64(kept)})
    if pictures:
        draw_run_pictures(out, model, metrics, epochs.data.x_test, epochs.data.y_test)
    metrics["final"]["wall_seconds"] = time.perf_counter() - started
    write_metrics(out, metrics)
    kept_note = f" (the parameters of epoch {kept})" if kept != len(metrics["epochs"]) else ""
    say(f"wrote {out / MODEL}{kept_note} and the pictures in {out}")
    say(summary_line(metrics, out))


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
    if metrics.get("resumed"):  # the sessions before were timed by their own processes
        timing = f"; {seconds:.1f} s since resuming after epoch {metrics['resumed'][-1]['after_epoch']}"
    else:
        timing = f" in {seconds:.1f} s"
    return f"done: {accuracy}, {plural(len(rows), 'epoch')}{timing}, in {out}"


def _optimizer_words(config: TrainConfig) -> str:
    """The optimizer and the settings it reads, as the first line says them.

    >>> _optimizer_words(TrainConfig()), _optimizer_words(TrainConfig(optimizer="adam", weight_decay=0.01))
    ('momentum 0.9', 'adam (beta1 0.9, beta2 0.999, eps 1e-08, weight decay 0.01)')
    """
    if config.optimizer == "sgd":  # the default run's line, as it always was
        return f"momentum {config.momentum:g}"
    rule = OPTIMIZERS[config.optimizer]
    settings = ", ".join(f"{name.replace('_', ' ')} {getattr(config, name):g}" for name in rule.SETTINGS)
    return f"{config.optimizer} ({settings})"


def _backend_note(asked: str, backend: Backend) -> str:
    """Which step, and why this backend, in a few words (the full reason is in metrics.json and --verbose)."""
    if backend.is_gpu:
        return environment(backend).get("gpu", "GPU")
    step = cpu_step_words(cpu_step())  # the fused step and the plain one differ in their last digits
    if asked == "numpy":
        return step
    # a GPU without a usable CuPy is not "no GPU": point at the reason instead
    why = "a GPU is here but not usable; --verbose says why" if os.path.exists("/dev/nvidia0") else "no GPU found"
    return f"{step}; {why}"


def _best_val(rows: list[dict[str, Any]]) -> tuple[int | None, float | None]:
    """(epoch, accuracy) of the best validation accuracy so far (the first such epoch), or (None, None)."""
    scored = [row for row in rows if "val_accuracy" in row]
    if not scored:
        return None, None
    best = max(scored, key=lambda row: (row["val_accuracy"], -row["epoch"]))
    return best["epoch"], best["val_accuracy"]
