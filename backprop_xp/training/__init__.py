"""Training a network: the settings, the step and the epoch, a whole run with its files, and sweeps of runs.

* ``config.py``: ``TrainConfig`` (every setting, checked once) and the learning-rate schedules;
* ``epoch.py``: ``run_epoch`` (the step over every batch, no host synchronisation per step), ``evaluate``;
* ``run.py``: ``train``, a run as named steps: open the run folder, load the data, build the model,
  run the epochs (divergence, checkpoints, early stopping), finish;
* ``run_files.py``: what a run folder holds (checkpoint, metrics, model, pictures);
* ``sweep.py``, ``dask_sweep.py``: many runs, locally or on a Dask cluster.
"""

from ..step import make_step
from .config import SCHEDULES, SettingError, TrainConfig, constant_lr, cosine_lr, step_lr
from .epoch import EpochSums, confusion_matrix, evaluate, per_class_tables, run_epoch
from .run import DIVERGED_EXIT_CODE, Diverged, divergence, plural, summary_line, train
from .run_files import (
    BEST,
    CHECKPOINT,
    METRICS_CSV,
    METRICS_JSON,
    MODEL,
    default_out_dir,
    environment,
    load_metrics,
    read_checkpoint,
)  # fmt: skip

__all__ = [
    "BEST", "CHECKPOINT", "DIVERGED_EXIT_CODE", "Diverged", "EpochSums", "METRICS_CSV", "METRICS_JSON", "MODEL",
    "SCHEDULES", "SettingError", "TrainConfig", "confusion_matrix", "constant_lr", "cosine_lr", "default_out_dir",
    "divergence", "environment", "evaluate", "load_metrics", "make_step", "per_class_tables", "plural", "read_checkpoint", "run_epoch",
    "step_lr", "summary_line", "train",
]  # fmt: skip
