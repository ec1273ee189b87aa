"""``backprop-xp evaluate``: a saved model's (or a committee's) test accuracy, per-class accuracy and confusion matrix."""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from ..data import DATASETS
from .arguments import DATA_HELP, UserError, add_backend_flag, check_data_env, choice_of, existing_dir


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="test accuracy, per-class accuracy and confusion matrix of a saved model (or a committee of several)",
        description=(
            "Test a saved model (a run folder, its model.npz, or a checkpoint.npz) on the test set of the data set it "
            "was trained on, found where the run found it, unless --dataset or --data-dir say otherwise. Prints "
            "the test accuracy and loss, the accuracy of each class and the confusion matrix. Several models make a "
            "committee: their class probabilities are averaged, each member's accuracy is printed beside the "
            "committee's, and the tables are the committee's (members must agree on inputs, classes and data set; "
            "a sweep's runs: evaluate SWEEP/*/). Exit codes: 0 done, 1 an error (no model, no data), 2 bad arguments "
            "(also members that disagree)."
        ),
    )
    p.add_argument(
        "models",
        metavar="MODEL",
        nargs="+",
        help="a model.npz (or checkpoint.npz) written by train, or the run folder holding it; several make a committee",
    )
    p.add_argument(
        "--dataset",
        type=choice_of(tuple(DATASETS)),
        metavar="{" + ",".join(DATASETS) + "}",
        help="the data set to test on (default: the one the model was trained on)",
    )
    p.add_argument("--data-dir", type=existing_dir, metavar="DIR", help=DATA_HELP)
    add_backend_flag(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..backend import to_numpy
    from ..committee import load_member, preprocessing_of
    from ..training import confusion_matrix, evaluate, per_class_tables

    if len(args.models) > 1:
        return _evaluate_committee(args)
    model = load_member(args.models[0], args.backend)
    dataset, names, x_test, y_test = _test_set_of(model, args)
    x_test = preprocessing_of(model)(x_test)  # as the run prepared its test images
    loss, accuracy = evaluate(model, x_test, y_test)
    predicted = to_numpy(model.predict(x_test))
    counts = confusion_matrix(y_test, predicted, model.n_outputs)
    print(f"model {_describe(model)}, on {model.backend.name}; test set of {dataset}")
    print(f"test accuracy {100 * accuracy:.2f}%  ({int(np.trace(counts))} of {len(y_test)}), test loss {loss:.4f}")
    print(per_class_tables(counts, names))
    return 0


def _describe(model: Any) -> str:
    """The model's file and shape, and the preprocessing its run applied (where it applied one)."""
    from ..training.run_files import saved_config

    preprocess = saved_config(model.path).get("preprocess", "none")
    also = f", preprocess {preprocess}" if preprocess != "none" else ""
    return f"{model.path}: {model.n_inputs}-{model.n_hidden}-{model.n_outputs} {model.activation}, {model.dtype.name}{also}"


def _test_set_of(model: Any, args: argparse.Namespace) -> tuple[str, list[str], np.ndarray, np.ndarray]:
    """The data set ``model`` is tested on (its own unless --dataset says otherwise), its class names and test set."""
    from ..data import load_dataset
    from ..data.datasets import class_names, classes_of, folder_to_test_on, trained_on
    from ..training.run_files import saved_config

    config = saved_config(model.path)
    dataset = args.dataset or trained_on(config)[0]
    check_data_env(dataset, args.data_dir)
    _, _, x_test, y_test = load_dataset(dataset, folder_to_test_on(config, dataset, args.data_dir))
    if x_test.shape[1] != model.n_inputs or y_test.max() >= model.n_outputs:
        raise UserError(
            f"{model.path}: a {model.n_inputs}-{model.n_hidden}-{model.n_outputs} network cannot be tested on {dataset} "
            f"({x_test.shape[1]} inputs, {int(y_test.max()) + 1} classes)"
        )
    own = dataset == trained_on(config)[0]
    names = classes_of(config, model.n_outputs) if own else class_names(dataset, model.n_outputs)
    return dataset, names, x_test, y_test


def _evaluate_committee(args: argparse.Namespace) -> int:
    """evaluate RUN1 RUN2 ...: each member's test accuracy, then the committee's (the mean of their probabilities)."""
    from ..committee import load_committee, mean_log_loss
    from ..training import confusion_matrix, evaluate, per_class_tables

    committee = load_committee(args.models, args.backend)
    dataset, names, x_test, y_test = _test_set_of(committee.models[0], args)
    n = len(y_test)
    print(f"committee of {len(committee)} models, averaging their class probabilities; test set of {dataset}")
    for model, prepare in zip(committee.models, committee.prepare):
        loss, accuracy = evaluate(model, prepare(x_test), y_test)
        right = round(accuracy * n)
        print(
            f"  member {_describe(model)}: test accuracy {100 * accuracy:.2f}%  ({right} of {n}), test loss {loss:.4f}"
        )
    proba = committee.predict_proba(x_test)
    predicted = proba.argmax(axis=1)
    right = int(np.count_nonzero(predicted == y_test))
    loss = mean_log_loss(proba, y_test)
    print(
        f"committee (mean of the {len(committee)} members' probabilities): test accuracy {100 * right / n:.2f}%  "
        f"({right} of {n}), test loss {loss:.4f}"
    )
    print(per_class_tables(confusion_matrix(y_test, predicted, committee.n_outputs), names))
    return 0
