"""Every setting of a training run, checked once, and the learning-rate schedules it names."""


from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import BACKENDS, DTYPES
from ..kernels import ACTIVATIONS


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
    tf32: bool = False  # TF32 tensor-core matrix products on a GPU (cuda.step.set_tf32); no effect on NumPy
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
        from ..data import DATASETS

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


