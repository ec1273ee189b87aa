"""The files of a run folder: checkpoint, metrics (JSON and CSV), model, pictures; and the machine it ran on."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..backend import Backend, to_numpy
from ..data.datasets import classes_of
from ..files import atomic_write, read_npz
from ..model import MLP, PARAM_NAMES
from ..optimizers import Optimizer
from .config import TrainConfig
from .epoch import confusion_matrix

CHECKPOINT = "checkpoint.npz"
METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
MODEL = "model.npz"
BEST = "best.npz"  # with --keep-best: the parameters of the best validation epoch so far


def environment(backend: Backend) -> dict[str, Any]:
    """Versions and machine: what a reader needs to compare two runs' timings."""
    from .. import __version__

    info = {
        "backprop_xp": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "hostname": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    if not backend.is_gpu:  # the result depends on the step (the fused one sums in another order) and its threads
        info["cpu_step"] = cpu_step()
        info["blas"] = blas_libraries()
    if backend.is_gpu:
        xp = backend.xp
        info["cupy"] = xp.__version__
        try:
            props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
            info["gpu"] = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        except Exception:  # a name is nice to have, never worth failing a run for
            pass
    return info


def cpu_step() -> dict[str, Any]:
    """Which CPU training step runs: "fused" (Numba's compiled loops, ``numba_loops``) or "numpy", and its threads.

    The fused step's threads are its kernels' (``numba_loops.threads``); the
    plain step's are the BLAS's (None where they cannot be told).
    """
    from ..cpu import numba_loops

    info = numba_loops.info()
    if info["enabled"]:
        return {"step": "fused", "threads": info["threads"], "numba": info["numba"],
                "threading_layer": info["threading_layer"], "blas_on_these_threads": info["blas_on_these_threads"]}  # fmt: skip
    blas = [lib["num_threads"] for lib in blas_libraries() or [] if lib.get("user_api") == "blas"]
    return {"step": "numpy", "threads": max(blas) if blas else None, "numba": info.get("numba")}


def blas_libraries() -> list[dict[str, Any]] | None:
    """The BLAS (and OpenMP) libraries NumPy loaded, with their versions and thread counts (threadpoolctl).

    None without threadpoolctl (``pip install threadpoolctl``, in the ``[fast]`` extra).
    """
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    keys = ("user_api", "internal_api", "version", "num_threads", "threading_layer", "architecture")
    return [{key: lib.get(key) for key in keys} for lib in threadpool_info()]


def cpu_step_words(step: dict[str, Any]) -> str:
    """``cpu_step()`` in a few words: "fused CPU step, 2 threads" or "plain NumPy step, 1 thread".

    >>> cpu_step_words({"step": "fused", "threads": 2}), cpu_step_words({"step": "numpy", "threads": 1})
    ('fused CPU step, 2 threads', 'plain NumPy step, 1 thread')
    """
    words = "fused CPU step" if step["step"] == "fused" else "plain NumPy step"
    threads = step.get("threads")
    return f"{words}, {threads} thread{'' if threads == 1 else 's'}" if threads else words


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


def write_metrics(out_dir: Path, metrics: dict[str, Any]) -> None:
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


def save_checkpoint(
    out_dir: Path, model: MLP, optimizer: Optimizer, epochs_done: int, config: dict, metrics: dict
) -> None:
    """checkpoint.npz: the parameters, the optimizer's state (``train.<name>``: SGD's ``train.velocity``, Adam's
    ``train.m``, ``train.v``, ``train.t``), the epochs done, the config and the metrics."""
    state = {f"train.{name}": value for name, value in optimizer.state_dict().items()}
    model.save(
        out_dir / CHECKPOINT,
        **{
            "train.epochs_done": np.int64(epochs_done),
            **state,
            "train.config": json.dumps(config),
            "train.metrics": json.dumps(metrics),
        },
    )


def load_params(path: Path, model: MLP) -> int:
    """Put the parameters saved in ``path`` (``best.npz``) into ``model``; return their epoch."""

    arrays = read_npz(path, "a backprop-xp model file")
    for name in PARAM_NAMES:
        model.params[name][...] = model.xp.asarray(arrays[name])
    return int(arrays["train.epoch"])


def restore_state(path: Path, model: MLP, optimizer: Optimizer) -> int:
    """Put the checkpoint's optimizer state into ``optimizer``; return the epochs already done."""
    arrays = read_npz(path, "a backprop-xp checkpoint")
    try:
        epochs_done = int(arrays["train.epochs_done"])
        optimizer.load_state_dict({name: arrays[f"train.{name}"] for name in optimizer.STATE})
    except KeyError as exc:
        raise ValueError(f"{path}: not a backprop-xp checkpoint (no {exc})") from exc
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return epochs_done


def draw_run_pictures(out: Path, model: MLP, metrics: dict[str, Any], x_test: np.ndarray, y_test: np.ndarray) -> None:
    """curves.png, confusion.png, misclassified.png and weights.png for a finished run.

    The last two draw images, so they are drawn only when the inputs form a square picture.
    """
    from .. import plots  # matplotlib: imported when a picture is drawn, not with the package

    proba = to_numpy(model.predict_proba(x_test))
    predicted = proba.argmax(axis=1)
    plots.training_curves(
        metrics["epochs"], out / "curves.png", title=_run_title(metrics["config"], model), final=metrics.get("final")
    )
    accuracy = float((predicted == y_test).mean())
    counts = confusion_matrix(y_test, predicted, model.n_outputs)
    names = classes_of(metrics["config"], model.n_outputs)
    title = f"Test confusion matrix (accuracy {accuracy:.2%})"
    plots.confusion_plot(counts, out / "confusion.png", title=title, names=names)
    if math.isqrt(model.n_inputs) ** 2 == model.n_inputs:
        plots.mistakes_grid(x_test, y_test, proba, out / "misclassified.png", names=names)
        plots.weight_grid(to_numpy(model.params["W1"]), out / "weights.png")


def _run_title(config: dict[str, Any], model: MLP) -> str:
    title = (
        f"{model.n_inputs}-{model.n_hidden}-{model.n_outputs} {config['activation']}, batch {config['batch_size']}, "
        f"lr {config['lr']:g} ({config['lr_schedule']}), " + _optimizer_title(config)
    )
    if config.get("weight_decay"):
        title += f", weight decay {config['weight_decay']:g}"
    if config.get("augment"):
        title += ", augmented"
    data = "" if config.get("dataset", "mnist") == "mnist" else f"{config['dataset']}, "
    return data + title + f" ({config.get('backend_used', config['backend'])})"


def _optimizer_title(config: dict[str, Any]) -> str:
    """The optimizer in a picture's title: "momentum 0.9" for SGD (as before), else its name."""
    name = config.get("optimizer", "sgd")
    return f"momentum {config['momentum']:g}" if name == "sgd" else name


def load_metrics(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``out_dir/metrics.json`` as a dict, or None if there is none (a run not started).

    ValueError, naming the file, if it is not a JSON object.
    """
    path = Path(out_dir) / METRICS_JSON
    if not path.is_file():
        return None
    try:
        with open(path) as f:
            metrics = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); it is rewritten from checkpoint.npz if you delete it "
                         "and --resume") from None  # fmt: skip
    if not isinstance(metrics, dict):
        raise ValueError(f"{path} holds a JSON {type(metrics).__name__}, not the object of a run's metrics")
    return metrics


def model_file(path: str | os.PathLike) -> str:
    """The model file ``path`` names: itself, or a run folder's model.npz; FileNotFoundError saying why there is none."""
    path = os.fspath(path)
    if os.path.isdir(path):  # a run folder: its model
        folder, path = path, os.path.join(path, MODEL)
        if not os.path.isfile(path):
            raise FileNotFoundError(_no_model(folder))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such model file")
    return path


def _no_model(folder: str) -> str:
    """Why the run folder ``folder`` has no model.npz, and the command that writes it."""
    try:
        finished = (load_metrics(folder) or {}).get("status") == "finished"
    except ValueError:
        finished = False
    if finished and os.path.isfile(os.path.join(folder, CHECKPOINT)):  # deleted since: resume writes it again
        return (
            f"{folder} holds no model.npz (it was removed after the run finished); "
            f"write it again with: backprop-xp train --resume {folder}"
        )
    best = os.path.join(folder, BEST)  # --keep-best: the best epoch so far, even of a run that diverged
    also = f"; its best epoch so far is in {best}" if os.path.isfile(best) else ""
    return f"{folder} holds no model.npz (a run writes it when it finishes; resume it with --resume {folder}{also})"


def saved_config(path: str | os.PathLike) -> dict[str, Any]:
    """The run's config saved in a model file by train; empty for files that have none (older ones, MLP.save's)."""
    arrays = read_npz(path, "a model file written by backprop-xp")
    try:
        config = json.loads(str(arrays["train.config"]))
    except (KeyError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}
