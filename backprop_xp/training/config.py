"""Every setting of a training run, checked once, and the learning-rate schedules it names."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from ..activations import ACTIVATIONS
from ..backend import BACKENDS, DTYPES
from ..checks import AT_LEAST_0, AT_LEAST_1, BOOLEAN, FRACTION, NON_NEGATIVE, POSITIVE, Rule, check, check_choice
from ..data.download import DATASETS
from ..data.preprocess import PREPROCESSING
from ..optimizers import OPTIMIZERS

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

# The rule of every numeric and true/false setting (checks.py); the command line's argument types use the same.
RULES = {
    "hidden": AT_LEAST_1, "epochs": AT_LEAST_1, "batch_size": AT_LEAST_1, "val_size": AT_LEAST_0,
    "train_size": AT_LEAST_0, "seed": AT_LEAST_0, "patience": AT_LEAST_0, "lr": POSITIVE, "momentum": FRACTION,
    "weight_decay": NON_NEGATIVE, "beta1": FRACTION, "beta2": FRACTION, "eps": POSITIVE, "augment": BOOLEAN,
    "tf32": BOOLEAN, "keep_best": BOOLEAN,
}  # fmt: skip

# The strengths of --augment's distortions (data/augment.py); the defaults are the strengths used before they
# were settings, so a default --augment run is unchanged. 0 turns a distortion off (elastic: alpha 0).
DEGREES = Rule("a number of degrees from 0 to 180", lambda v: NON_NEGATIVE.ok(v) and v <= 180)
DISTORTION_RULES = {
    "augment_shift": NON_NEGATIVE, "augment_rotation": DEGREES, "augment_scale": FRACTION,
    "elastic_alpha": NON_NEGATIVE, "elastic_sigma": POSITIVE,  # sigma 0 would divide by 0: alpha 0 turns it off
}  # fmt: skip
RULES.update(DISTORTION_RULES)

# The allowed values of every setting that names one thing of a table.
CHOICES = {
    "activation": ACTIVATIONS, "optimizer": tuple(OPTIMIZERS), "lr_schedule": tuple(SCHEDULES), "dtype": DTYPES,
    "backend": BACKENDS, "dataset": tuple(DATASETS), "preprocess": tuple(PREPROCESSING),
}  # fmt: skip


class Flag(NamedTuple):
    """A setting's command-line flag: its value's name in the help, and the help.

    In ``help``, ``{default}`` is the setting's default, ``{choices}`` its
    choices, and ``{each}`` where ``sweep``, which takes a list of some
    settings, says so (with ``each``'s words).
    """

    metavar: str | None
    help: str
    each: str = " (comma-separated list)"


DATA_HELP = (
    "folder with the data set's four IDX files (default: $BACKPROP_XP_DATA for mnist, "
    "$BACKPROP_XP_FASHION_DATA for fashion-mnist, else the download cache)"
)
# The flag of every setting, in the order ``train --help`` lists them. The command line makes train's and
# sweep's flags from this table alone: each flag's check is its setting's rule in RULES (a true/false one a
# switch), or its choices in CHOICES; a setting in neither is a folder to read from (--data-dir).
FLAGS = {
    "dataset": Flag(None, "the data set (default: {default})"),
    "data_dir": Flag("DIR", DATA_HELP),
    "backend": Flag(None, "numpy (CPU), cupy (CUDA GPU) or auto: cupy when usable (default: {default})"),
    "val_size": Flag("N", "hold out N training images (seeded) for validation, shown each epoch instead of test (default: {default})"),
    "keep_best": Flag(None, "model.npz gets the parameters of the epoch with the best validation accuracy (needs --val-size)"),
    "patience": Flag("K", "stop after K epochs without a better validation accuracy (needs --val-size; default: {default}, never)"),
    "train_size": Flag("N", "train on the first N training images only; 0 = all (default: {default})"),
    "augment": Flag(None, "distort the training images afresh every epoch: random shifts, small rotations and "
                    "scalings, elastic distortions"),
    "tf32": Flag(None, "let float32 matrix products on a GPU use TF32 tensor cores "
                 "(faster, about 3 fewer significant digits; cupy only, no effect on numpy)"),
    "seed": Flag(None, "seeds the initial weights, the shuffling and the validation split{each} (default: {default})",
                 " (comma-separated list: one run per seed, e.g. a committee's members)"),
    "dtype": Flag(None, "float32 or float64 (default: {default})"),
    "augment_shift": Flag("PX", "with --augment: largest shift, in pixels, in each direction{each} (default: {default})"),
    "augment_rotation": Flag("DEG", "with --augment: largest rotation, in degrees, either way{each} (default: {default})"),
    "augment_scale": Flag("S", "with --augment: largest scaling: by a factor in [1-S, 1+S], S in [0, 1){each} (default: {default})"),
    "elastic_alpha": Flag("A", "with --augment: strength of the elastic distortion, in pixels{each} (default: {default})"),
    "elastic_sigma": Flag("S", "with --augment: width of the Gaussian smoothing the elastic field, in pixels, > 0{each} "
                          "(default: {default})"),
    "preprocess": Flag(None, "deskew: shear each digit upright (moment-based), in training and, saved with the model, in "
                       "evaluate and predict; none: the images as they are{each} (default: {default})"),
    "hidden": Flag("N", "hidden units{each} (default: {default})"),
    "activation": Flag(None, "{choices}{each} (default: {default})"),
    "epochs": Flag("N", "passes over the training set (default: {default})"),
    "batch_size": Flag("B", "images per step{each} (default: {default})"),
    "lr": Flag("LR", "learning rate, > 0{each} (default: {default})"),
    "momentum": Flag("M", "SGD momentum in [0, 1){each} (default: {default})"),
    "weight_decay": Flag("WD", "L2 weight decay (adamw: decoupled){each} (default: {default})"),
    "lr_schedule": Flag(None, "constant; step: /10 after 1/2 and 3/4 of the epochs; cosine: half a cosine to 0{each} "
                        "(default: {default})"),
    "optimizer": Flag(None, "sgd (with --momentum), nesterov (Nesterov momentum), adam, adamw (Adam with decoupled weight "
                      "decay: give it --weight-decay, e.g. 0.01; Adam's usual --lr is 1e-3){each} (default: {default})"),
    "beta1": Flag("B1", "adam, adamw: decay of the gradient's running mean, in [0, 1) (default: {default})"),
    "beta2": Flag("B2", "adam, adamw: decay of its square's running mean, in [0, 1) (default: {default})"),
    "eps": Flag("EPS", "adam, adamw: the floor under the root of that mean, > 0 (default: {default})"),
}  # fmt: skip


class SettingError(ValueError):
    """A setting that cannot work (``--batch-size`` larger than the training set, say): exit 2 on the command line."""


@dataclass
class TrainConfig:
    """Every setting of a training run (the ``train`` command's flags).

    The defaults are the measured default recipe: 784-512-10 with ReLU, SGD
    with momentum 0.9, batch 128, learning rate 0.1 decayed by a
    cosine over 10 epochs. See the README's "Results" for its accuracy and time.

    A new setting is a field here, its rule in ``RULES`` (or its choices in
    ``CHOICES``), its flag in ``FLAGS`` (train's and sweep's are made from it),
    and its name in ``MATH_FIELDS`` if it changes the result.
    """

    hidden: int = 512
    activation: str = "relu"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9  # sgd and nesterov
    weight_decay: float = 0.0  # every optimizer: L2 in the gradient; adamw: decoupled
    optimizer: str = "sgd"  # a name in optimizers.OPTIMIZERS; it reads the settings its class lists in SETTINGS
    beta1: float = 0.9  # adam and adamw: the decay of the running mean of the gradient
    beta2: float = 0.999  # adam and adamw: the decay of the running mean of its square
    eps: float = 1e-8  # adam and adamw: the floor under √v̂
    lr_schedule: str = "cosine"
    val_size: int = 0
    train_size: int = 0  # 0 = every training image; otherwise the first N (quick experiments, tests)
    augment: bool = False  # distort the training images afresh every epoch (augment.py)
    augment_shift: float = 2.0  # pixels, at most, in each direction
    augment_rotation: float = 12.0  # degrees, at most, either way
    augment_scale: float = 0.12  # a scaling by a factor in [1 - s, 1 + s]
    elastic_alpha: float = 30.0  # the elastic field's strength (pixels per unit of smoothed noise)
    elastic_sigma: float = 4.5  # the width of the Gaussian that smooths the elastic field, in pixels
    preprocess: str = "none"  # applied to every image, in training and by evaluate and predict (data/preprocess.py)
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
        "hidden", "activation", "epochs", "batch_size", "lr", "momentum", "weight_decay", "optimizer", "beta1",
        "beta2", "eps", "lr_schedule", "val_size", "train_size", "augment", "tf32", "keep_best", "patience", "seed", "dtype",
        "dataset",
    ) + tuple(DISTORTION_RULES) + ("preprocess",)  # fmt: skip

    def validate(self) -> None:
        """Raise SettingError (a ValueError) naming the first setting that cannot work."""
        for name, rule in RULES.items():
            check(name.replace("_", "-"), getattr(self, name), rule, SettingError)
        for name, allowed in CHOICES.items():
            if name != "preprocess":  # checked last, below: the first error named stays the one it was
                check_choice(name.replace("_", "-"), getattr(self, name), allowed, SettingError)
        # A hyperparameter the chosen optimizer does not read would do nothing: say so rather than train as if it did.
        unread = [
            name
            for name in ("momentum", "beta1", "beta2", "eps")
            if name not in OPTIMIZERS[self.optimizer].SETTINGS and getattr(self, name) != getattr(TrainConfig, name)
        ]
        if unread:
            raise SettingError(f"--{unread[0]} is not a setting of --optimizer {self.optimizer}: leave it out")
        if self.optimizer == "nesterov" and not self.momentum:
            raise SettingError("--optimizer nesterov looks ahead along the momentum: give it --momentum > 0 (e.g. 0.9)")
        if self.train_size and self.val_size >= self.train_size:
            raise SettingError(
                f"--val-size {self.val_size} leaves no training images (--train-size is {self.train_size})"
            )
        if (self.keep_best or self.patience) and not self.val_size:
            flag = "--keep-best" if self.keep_best else "--patience"
            raise SettingError(
                f"{flag} chooses by validation accuracy: give it a validation set with --val-size N (e.g. 5000)"
            )
        # A strength without --augment would do nothing: say so rather than train as if it did.
        changed = [name for name in DISTORTION_RULES if getattr(self, name) != getattr(TrainConfig, name)]
        if changed and not self.augment:
            raise SettingError(f"--{changed[0].replace('_', '-')} sets a distortion: it needs --augment")
        check_choice("preprocess", self.preprocess, CHOICES["preprocess"], SettingError)

    def distortions(self) -> dict[str, float]:
        """The keyword arguments of ``augment.distort`` these settings ask for."""
        return {
            "max_shift": self.augment_shift, "max_rotation": self.augment_rotation, "max_scale": self.augment_scale,
            "alpha": self.elastic_alpha, "sigma": self.elastic_sigma,
        }  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """A config from a dict, ignoring keys that are not settings (backend_used, versions...)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})
