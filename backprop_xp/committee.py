"""A committee of trained networks: the mean of their class probabilities.

Networks trained with different seeds (or on differently distorted or
preprocessed digits) make partly different mistakes; averaging their class
probabilities cancels some of them (Meier, Cireşan, Gambardella and
Schmidhuber, ICDAR 2011: 25 one-hidden-layer networks, 0.39% MNIST error).

    ŷ_committee = (ŷ_1 + ŷ_2 + ... + ŷ_M) / M

The sum runs in member order, in float64 on the CPU, so the result does not
depend on the members' dtypes or backends. Members must agree on what they
read and what they say: the number of inputs and classes, and whatever else
the caller names per member (class names, data set); a member that differs
is refused with one line naming it. Each member may prepare the inputs its
own way first (``prepare``: its run's preprocessing, deskewed or not), as
Meier et al.'s members each read differently normalised digits.

``load_committee`` makes one of saved runs (what ``evaluate`` and ``predict``
read): each member's file, preprocessing, class names and data set as its run saved them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .backend import to_numpy


class Disagreement(ValueError):
    """Members that differ in what they read or say (inputs, classes, data set): bad arguments to a command."""


class Committee:
    """Members that agree on inputs and classes; ``predict_proba`` averages theirs.

    ``names`` says how an error names each member (a run's folder, say);
    ``traits`` holds per member whatever else must be equal across members
    (``{"classes": [...], "data set": "mnist"}``), compared with the first's;
    ``prepare`` holds per member a function of the inputs it reads (its preprocessing).

    >>> from backprop_xp import MLP
    >>> a, b = MLP(4, 3, 2, seed=0), MLP(4, 3, 2, seed=1)
    >>> x = np.ones((1, 4), np.float32)
    >>> p = Committee([a, b]).predict_proba(x)
    >>> bool(np.array_equal(p, (to_numpy(a.predict_proba(x)).astype(np.float64) + to_numpy(b.predict_proba(x))) / 2))
    True
    >>> Committee([a, MLP(4, 3, 5)], names=["run-a", "run-b"])
    Traceback (most recent call last):
    backprop_xp.committee.Disagreement: run-b: 5 classes, but run-a has 2: a committee's members must agree
    """

    def __init__(
        self,
        models: Sequence[Any],
        *,
        names: Sequence[str] | None = None,
        traits: Sequence[Mapping[str, Any]] | None = None,
        prepare: Sequence[Callable[[Any], Any]] | None = None,
    ) -> None:
        if not models:
            raise ValueError("a committee needs at least one member")
        self.models = list(models)
        self.names = list(names) if names is not None else [f"member {k + 1}" for k in range(len(models))]
        traits = list(traits) if traits is not None else [{} for _ in models]
        self.prepare = list(prepare) if prepare is not None else [_as_given for _ in models]
        if not len(self.names) == len(traits) == len(self.prepare) == len(self.models):
            raise ValueError(
                f"{len(self.models)} members, but {len(self.names)} names, {len(traits)} traits, {len(self.prepare)} prepare"
            )
        self._check_agreement(traits)
        self.n_inputs, self.n_outputs = self.models[0].n_inputs, self.models[0].n_outputs

    def _check_agreement(self, traits: list[Mapping[str, Any]]) -> None:
        first, first_name = self.models[0], self.names[0]
        for model, name, own in zip(self.models[1:], self.names[1:], traits[1:]):
            for what, mine, theirs in (
                ("inputs", model.n_inputs, first.n_inputs),
                ("classes", model.n_outputs, first.n_outputs),
            ):
                if mine != theirs:
                    raise Disagreement(f"{name}: {mine} {what}, but {first_name} has {theirs}: {_MUST_AGREE}")
            for key in sorted(set(own) | set(traits[0])):
                if own.get(key) != traits[0].get(key):
                    raise Disagreement(
                        f"{name}: {key} {own.get(key)!r}, but {first_name} has {traits[0].get(key)!r}: {_MUST_AGREE}"
                    )

    def __len__(self) -> int:
        return len(self.models)

    def member_probas(self, x: Any) -> list[np.ndarray]:
        """Each member's class probabilities for the rows of ``x``, as NumPy arrays."""
        return [to_numpy(model.predict_proba(prepare(x))) for model, prepare in zip(self.models, self.prepare)]

    def predict_proba(self, x: Any, *, member_probas: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """The mean of the members' class probabilities, float64, shape ``(B, n_outputs)``.

        ``member_probas`` (from ``member_probas``) saves computing them again.
        """
        probas = self.member_probas(x) if member_probas is None else member_probas
        total = np.array(probas[0], np.float64)
        for p in probas[1:]:  # in member order: the sum is the same wherever it runs
            total += p
        total /= len(probas)
        return total

    def predict(self, x: Any) -> np.ndarray:
        """The class with the largest mean probability, for each row."""
        return self.predict_proba(x).argmax(axis=1)


_MUST_AGREE = "a committee's members must agree"


def mean_log_loss(proba: np.ndarray, labels: np.ndarray) -> float:
    """-mean log ŷ[label]: the members' test loss, of the committee's probabilities ``proba`` (B, classes).

    A probability of 0 counts as the smallest float64 (the loss stays finite).

    >>> round(mean_log_loss(np.array([[0.5, 0.5], [0.0, 1.0]]), np.array([0, 1])), 6)  # (log 2 + 0) / 2
    0.346574
    """
    picked = proba[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.maximum(picked, np.finfo(np.float64).tiny))))


def _as_given(x: Any) -> Any:
    return x


def load_member(path: str, backend: str = "numpy") -> Any:
    """The model of a run folder (its model.npz) or model file, on ``backend``; ``model.path`` is the file read.

    FileNotFoundError saying why a run folder holds no model, and what writes it.
    """
    from .model import MLP
    from .training.run_files import model_file

    return MLP.load(model_file(path), backend=backend)


def preprocessing_of(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    """The preprocessing the loaded ``model``'s run applied to every image (none for files that do not say)."""
    from .data.preprocess import PREPROCESSING
    from .training.run_files import saved_config

    name = saved_config(model.path).get("preprocess", "none")
    if name not in PREPROCESSING:
        raise ValueError(f"{model.path}: preprocess {name!r} is not one of {', '.join(PREPROCESSING)}")
    return PREPROCESSING[name]


def load_committee(paths: Sequence[str], backend: str = "numpy") -> Committee:
    """The saved runs (or model files) ``paths`` as a Committee, each member preparing its inputs as its run did.

    Members must agree on inputs, classes, class names and data set (Disagreement, naming the one that differs).
    """
    from .data.datasets import classes_of, trained_on
    from .training.run_files import saved_config

    models = [load_member(path, backend) for path in paths]
    configs = [saved_config(model.path) for model in models]
    traits = [
        {"classes": classes_of(config, model.n_outputs), "data set": trained_on(config)[0]}
        for model, config in zip(models, configs)
    ]
    return Committee(models, names=list(paths), traits=traits, prepare=[preprocessing_of(m) for m in models])
