"""The command line: ``backprop-xp`` or ``python -m backprop_xp``.

Commands: ``train``, ``evaluate``, ``predict``, ``sweep``, ``bench``, ``show-data``. Each is
a parser-building function and a handler. Bad arguments end with a one-line
message and exit code 2 (argparse's convention); errors the user can fix (a
malformed file, a backend that cannot run here) print one line, no traceback,
and exit 1; a training run whose loss became NaN or infinite exits 3.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from . import __version__
from .activations import ACTIVATIONS
from .backend import BACKENDS, DTYPES, BackendError
from .checks import AT_LEAST_0, AT_LEAST_1, FRACTION, NON_NEGATIVE, POSITIVE, Rule
from .data import DATASETS
from .files import signals_as_interrupts
from .optimizers import OPTIMIZERS
from .training import DIVERGED_EXIT_CODE, SCHEDULES, SettingError, TrainConfig


class UserError(Exception):
    """An error the user can fix; printed as one line without a traceback."""


class BadArgument(UserError):
    """A bad argument found after parsing (a data folder named by the environment, say): exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr (no usage block) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


DATA_HELP = (
    "folder with the data set's four IDX files (default: $BACKPROP_XP_DATA for mnist, "
    "$BACKPROP_XP_FASHION_DATA for fashion-mnist, else the download cache)"
)

MNIST_DATA_HELP = "folder with MNIST's four IDX files (default: $BACKPROP_XP_DATA, else the download cache)"  # bench


def _prepare_out_dir(path: str) -> str:
    from .files import make_out_dir

    return make_out_dir(path)


# --------------------------------------------------------------------------- argument types
# Each raises ArgumentTypeError, which argparse turns into "argument --x: <message>", exit 2.


def _number(kind: Callable[[str], Any], text: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _checked(kind: Callable[[str], Any], rule: Rule) -> Callable[[str], Any]:
    """An argparse type: ``kind(text)`` that must follow ``rule`` (checks.py), else "must be <requirement>, got <value>"."""

    def parse(text: str) -> Any:
        value = _number(kind, text)
        if not rule.ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule.requirement}, got {value:g}")
        return value

    return parse


positive_int = _checked(int, AT_LEAST_1)
count = _checked(int, AT_LEAST_0)
positive_float = _checked(float, POSITIVE)
nonnegative_float = _checked(float, NON_NEGATIVE)
momentum_float = _checked(float, FRACTION)
# show-data's grid makes one matplotlib axes per digit: 100 take about 4 s on a 2-core CPU, 1000 about 40 s.
MAX_SHOW_COUNT = 100
show_count = _checked(
    int, Rule(f"an integer from 1 to {MAX_SHOW_COUNT}", lambda v: AT_LEAST_1.ok(v) and v <= MAX_SHOW_COUNT)
)
# More threads than cores only make the CPU engines fight over them; 4x leaves room to measure that, not 1000.
MAX_BENCH_THREADS = 4 * (os.cpu_count() or 1)
bench_threads = _checked(
    int,
    Rule(
        f"an integer from 1 to {MAX_BENCH_THREADS} (4 per CPU here)",
        lambda v: AT_LEAST_1.ok(v) and v <= MAX_BENCH_THREADS,
    ),
)


def _not_a_folder(text: str) -> str | None:
    """What is wrong with ``text`` as a folder to read from, or None when it is one."""
    if os.path.isdir(text):
        return None
    if os.path.exists(text):
        return f"{text!r} is a file, not a folder"
    return f"folder {text!r} does not exist"


def existing_dir(text: str) -> str:
    if problem := _not_a_folder(text):
        raise argparse.ArgumentTypeError(problem)
    return text


def nonempty(text: str) -> str:
    """A folder or address: an empty one is a mistake (a shell variable that was not set), not the default."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty; leave the option out for its default")
    return text


def png_file(text: str) -> str:
    """A picture to write: a .png name that is not a folder (the pictures are always PNG)."""
    if not text:
        raise argparse.ArgumentTypeError("the file name is empty; give one ending in .png")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file name ending in .png")
    if not text.lower().endswith(".png"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a .png file name (the picture is written as PNG)")
    return text


def check_data_env(dataset: str, data_dir: str | None) -> None:
    """Refuse a data folder named by the environment that --data-dir would have refused (exit code 2).

    The loader would report it later as if ``data_dir`` had named it, with exit
    code 1; the user set the variable, so name it and its value.
    """
    from .data.download import dataset_info

    if data_dir is not None:
        return
    env = dataset_info(dataset)[1]
    folder = os.environ.get(env)
    if folder and (problem := _not_a_folder(folder)):  # an empty variable is unset for the loader too
        raise BadArgument(f"${env}: {problem} (unset it or give --data-dir)")


def choice_of(allowed: Sequence[str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in allowed:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(allowed)}")
        return text

    return parse


def list_of(parse: Callable[[str], Any]) -> Callable[[str], list]:
    """A comma-separated list, each item checked by ``parse`` (for ``sweep``)."""

    def parse_list(text: str) -> list:
        items = [item.strip() for item in text.split(",")]
        if not all(items):  # "8,,16" or "8,": a value lost in typing, not one to skip
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of values, got {text!r}")
        values = [parse(item) for item in items]
        return list(dict.fromkeys(values))  # repeated values would train the same run twice

    return parse_list


def _add_show_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("show-data", help="draw sample digits and print the class counts")
    p.add_argument(
        "--dataset",
        type=choice_of(tuple(DATASETS)),
        default="mnist",
        metavar="{" + ",".join(DATASETS) + "}",
        help="which data set (default: mnist)",
    )
    p.add_argument("--data-dir", type=existing_dir, metavar="DIR", help=DATA_HELP)
    p.add_argument(
        "--out",
        type=png_file,
        default=os.path.join("runs", "digits.png"),
        help="PNG file to write (default: runs/digits.png)",
    )
    p.add_argument(
        "--count",
        type=show_count,
        default=40,
        help=f"how many training digits to draw, at most {MAX_SHOW_COUNT} (default: 40)",
    )
    p.set_defaults(handler=_cmd_show_data)


def _cmd_show_data(args: argparse.Namespace) -> int:
    from .data import DATASETS, load_dataset
    from .data.datasets import class_names
    from .plots import digit_grid

    check_data_env(args.dataset, args.data_dir)
    _prepare_out_dir(os.path.dirname(args.out) or ".")
    x_train, y_train, x_test, y_test = load_dataset(args.dataset, args.data_dir)
    n_classes = int(max(y_train.max(), y_test.max())) + 1
    names = class_names(args.dataset, n_classes)
    numbers = names == [str(k) for k in range(n_classes)]  # digits: the counts in order say which is which
    for split, y in (("train", y_train), ("test", y_test)):
        counts = np.bincount(y, minlength=n_classes)
        each = [str(c) for c in counts] if numbers else [f"{name} {c}," for name, c in zip(names, counts)]
        print(f"{split:5s} {len(y):6d} images, per class: " + " ".join(each).rstrip(","))
    count = min(args.count, len(x_train))
    title = f"{DATASETS[args.dataset][0]} training images"
    labels = [f"label {names[y]}" if numbers else names[y] for y in y_train[:count]]
    digit_grid(x_train[:count], labels, args.out, suptitle=title)
    print(f"wrote {args.out}")
    return 0


# --------------------------------------------------------------------------- train


def _defaults() -> TrainConfig:
    return TrainConfig()


def _add_model_flags(p: argparse.ArgumentParser, *, lists: bool) -> None:
    """The training settings, shared by ``train`` and ``sweep`` (which takes lists for some).

    Every default is None here, so that a handler can tell a flag the user gave
    from one left alone (``--resume`` refuses changed settings); the real
    defaults come from ``TrainConfig``.
    """
    d = _defaults()
    many = (lambda parse: list_of(parse)) if lists else (lambda parse: parse)
    each = " (comma-separated list)" if lists else ""
    _add_data_flags(p, d, lists)
    _add_distortion_flags(p, d, many, each)
    _add_preprocess_flag(p, d, many, each)
    _add_network_flags(p, d, many, each)
    _add_optimizer_flags(p, d, many, each)


def _add_optimizer_flags(p: argparse.ArgumentParser, d: Any, many: Callable, each: str) -> None:
    """The optimizer (a sweep takes a list of them) and Adam's settings (one value each)."""
    p.add_argument(
        "--optimizer", type=many(choice_of(tuple(OPTIMIZERS))), metavar="{" + ",".join(OPTIMIZERS) + "}",
        help=f"sgd (with --momentum), nesterov (Nesterov momentum), adam, adamw (Adam with decoupled weight decay: give it --weight-decay, "
        f"e.g. 0.01; Adam's usual --lr is 1e-3){each} (default: {d.optimizer})",
    )  # fmt: skip
    p.add_argument("--beta1", type=momentum_float, metavar="B1",
                   help=f"adam, adamw: decay of the gradient's running mean, in [0, 1) (default: {d.beta1:g})")  # fmt: skip
    p.add_argument("--beta2", type=momentum_float, metavar="B2",
                   help=f"adam, adamw: decay of its square's running mean, in [0, 1) (default: {d.beta2:g})")  # fmt: skip
    p.add_argument("--eps", type=positive_float, metavar="EPS",
                   help=f"adam, adamw: the floor under the root of that mean, > 0 (default: {d.eps:g})")  # fmt: skip


def _add_preprocess_flag(p: argparse.ArgumentParser, d: Any, many: Callable, each: str) -> None:
    from .data.preprocess import PREPROCESSING

    p.add_argument(
        "--preprocess", type=many(choice_of(tuple(PREPROCESSING))), metavar="{" + ",".join(PREPROCESSING) + "}",
        help="deskew: shear each digit upright (moment-based), in training and, saved with the model, in evaluate "
        f"and predict; none: the images as they are{each} (default: {d.preprocess})",
    )  # fmt: skip


def _add_distortion_flags(p: argparse.ArgumentParser, d: Any, many: Callable, each: str) -> None:
    """The strengths of --augment's distortions (data/augment.py); 0 turns one off (elastic: --elastic-alpha 0)."""
    from .training.config import DEGREES

    for flag, parse, metavar, what in (
        ("--augment-shift", nonnegative_float, "PX", "largest shift, in pixels, in each direction"),
        ("--augment-rotation", _checked(float, DEGREES), "DEG", "largest rotation, in degrees, either way"),
        ("--augment-scale", momentum_float, "S", "largest scaling: by a factor in [1-S, 1+S], S in [0, 1)"),
        ("--elastic-alpha", nonnegative_float, "A", "strength of the elastic distortion, in pixels"),
        ("--elastic-sigma", positive_float, "S", "width of the Gaussian smoothing the elastic field, in pixels, > 0"),
    ):
        default = getattr(d, flag[2:].replace("-", "_"))
        p.add_argument(
            flag, type=many(parse), metavar=metavar, help=f"with --augment: {what}{each} (default: {default:g})"
        )


def _add_data_flags(p: argparse.ArgumentParser, d: Any, lists: bool) -> None:
    """Where the data comes from, how it is split and served, and where the arithmetic runs."""
    p.add_argument(
        "--dataset",
        type=choice_of(tuple(DATASETS)),
        metavar="{" + ",".join(DATASETS) + "}",
        help=f"the data set (default: {d.dataset})",
    )
    p.add_argument("--data-dir", type=existing_dir, metavar="DIR", help=DATA_HELP)
    p.add_argument(
        "--backend",
        type=choice_of(BACKENDS),
        metavar="{" + ",".join(BACKENDS) + "}",
        help=f"numpy (CPU), cupy (CUDA GPU) or auto: cupy when usable (default: {d.backend})",
    )
    p.add_argument(
        "--val-size", type=count, metavar="N",
        help="hold out N training images (seeded) for validation, shown each epoch instead of test "
        f"(default: {'5000' if lists else '0'})",
    )  # fmt: skip
    p.add_argument(
        "--keep-best", action="store_true", default=None,
        help="model.npz gets the parameters of the epoch with the best validation accuracy (needs --val-size)",
    )  # fmt: skip
    p.add_argument(
        "--patience",
        type=count,
        metavar="K",
        help="stop after K epochs without a better validation accuracy (needs --val-size; default: 0, never)",
    )
    p.add_argument(
        "--train-size", type=count, metavar="N", help="train on the first N training images only; 0 = all (default: 0)"
    )
    p.add_argument(
        "--augment", action="store_true", default=None,
        help="distort the training images afresh every epoch: random shifts, small rotations and scalings, elastic distortions",
    )  # fmt: skip
    p.add_argument(
        "--tf32", action="store_true", default=None,
        help="let float32 matrix products on a GPU use TF32 tensor cores "
        "(faster, about 3 fewer significant digits; cupy only, no effect on numpy)",
    )  # fmt: skip
    p.add_argument(
        "--seed",
        type=list_of(count) if lists else count,
        help="seeds the initial weights, the shuffling and the validation split"
        + (" (comma-separated list: one run per seed, e.g. a committee's members)" if lists else "")
        + f" (default: {d.seed})",
    )
    p.add_argument(
        "--dtype",
        type=choice_of(DTYPES),
        metavar="{" + ",".join(DTYPES) + "}",
        help=f"float32 or float64 (default: {d.dtype})",
    )


def _add_network_flags(p: argparse.ArgumentParser, d: Any, many: Callable, each: str) -> None:
    """The network and its optimisation: the settings a sweep takes lists of."""
    p.add_argument("--hidden", type=many(positive_int), metavar="N", help=f"hidden units{each} (default: {d.hidden})")
    p.add_argument(
        "--activation",
        type=many(choice_of(ACTIVATIONS)),
        metavar="{" + ",".join(ACTIVATIONS) + "}",
        help=f"{', '.join(ACTIVATIONS)}{each} (default: {d.activation})",
    )
    p.add_argument(
        "--epochs", type=positive_int, metavar="N", help=f"passes over the training set (default: {d.epochs})"
    )
    p.add_argument(
        "--batch-size", type=many(positive_int), metavar="B", help=f"images per step{each} (default: {d.batch_size})"
    )
    p.add_argument(
        "--lr", type=many(positive_float), metavar="LR", help=f"learning rate, > 0{each} (default: {d.lr:g})"
    )
    p.add_argument(
        "--momentum",
        type=many(momentum_float),
        metavar="M",
        help=f"SGD momentum in [0, 1){each} (default: {d.momentum:g})",
    )
    p.add_argument(
        "--weight-decay",
        type=many(nonnegative_float),
        metavar="WD",
        help=f"L2 weight decay (adamw: decoupled){each} (default: {d.weight_decay:g})",
    )
    p.add_argument(
        "--lr-schedule", type=many(choice_of(tuple(SCHEDULES))), metavar="{" + ",".join(SCHEDULES) + "}",
        help=f"constant; step: /10 after 1/2 and 3/4 of the epochs; cosine: half a cosine to 0{each} (default: {d.lr_schedule})",
    )  # fmt: skip


def _add_train(sub: argparse._SubParsersAction) -> None:
    d = _defaults()
    p = sub.add_parser(
        "train",
        help="train a network and write metrics, checkpoints, the model and pictures",
        description=(
            f"Train a one-hidden-layer network on MNIST (or Fashion-MNIST); its input and output sizes come from the "
            f"data. The defaults ({d.hidden} hidden units, {d.epochs} epochs, batch {d.batch_size}, "
            f"lr {d.lr:g} with a {d.lr_schedule} schedule, momentum {d.momentum:g}) reach about 98.3% MNIST test accuracy "
            "in under 20 seconds on a 2-core CPU (see the README's Results). Exit codes: 0 done, 1 an error, 2 bad arguments "
            f"(also settings that do not fit the data), {DIVERGED_EXIT_CODE} diverged, 130 interrupted."
        ),
    )
    _add_model_flags(p, lists=False)
    p.add_argument(
        "--out",
        metavar="DIR",
        type=nonempty,
        help="folder for metrics, checkpoint, model and pictures (default: a new folder under runs/)",
    )
    p.add_argument(
        "--resume",
        metavar="DIR",
        type=existing_dir,
        help="continue the run in DIR from its last checkpoint; its saved settings are used",
    )
    p.add_argument("--quiet", action="store_true", help="print only the summary line at the end")
    p.add_argument("--verbose", action="store_true", help="also print the full reason for the backend choice")
    p.set_defaults(handler=_cmd_train)


def _given(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _cmd_train(args: argparse.Namespace) -> int:
    from .training import CHECKPOINT, Diverged, default_out_dir, read_checkpoint, summary_line, train

    given = _given(args, [f.name for f in dataclasses.fields(TrainConfig)])
    if args.resume:
        if args.out and os.path.abspath(args.out) != os.path.abspath(args.resume):
            raise BadArgument(f"--out {args.out} and --resume {args.resume} differ: a resumed run stays in its folder")
        saved, _ = read_checkpoint(args.resume)
        config = dataclasses.replace(saved, **given)  # train() refuses changed math settings, naming them
        out = args.resume
    else:
        config = TrainConfig(**given)
        config.validate()  # before the default folder is named after it; main() makes a SettingError exit code 2
        out = args.out or default_out_dir(config)
    check_data_env(config.dataset, config.data_dir)
    try:
        metrics = train(
            config, out, resume=bool(args.resume), echo=None if args.quiet else print,
            progress=None if not args.quiet else False, verbose=args.verbose,
        )  # fmt: skip
    except Diverged as exc:
        print(f"backprop-xp: error: {exc}", file=sys.stderr)
        return DIVERGED_EXIT_CODE
    except KeyboardInterrupt:
        if os.path.exists(os.path.join(out, CHECKPOINT)):
            advice = f"the last finished epoch is saved: continue with --resume {out}"
        else:
            advice = "no epoch had finished, so nothing is saved: run the same command again to start over"
        print(f"backprop-xp: interrupted; {advice}", file=sys.stderr)
        return 130
    if args.quiet and "final" in metrics:
        print(summary_line(metrics, out))
    return 0


# --------------------------------------------------------------------------- evaluate


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
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
    _add_backend_flag(p)
    p.set_defaults(handler=_cmd_evaluate)


def _add_backend_flag(p: argparse.ArgumentParser) -> None:
    """evaluate's and predict's --backend: train's choices and default."""
    p.add_argument(
        "--backend",
        type=choice_of(BACKENDS),
        default=_defaults().backend,
        metavar="{" + ",".join(BACKENDS) + "}",
        help=f"numpy (CPU), cupy (CUDA GPU) or auto: cupy when usable (default: {_defaults().backend})",
    )


def _load_model(path: str, backend: str) -> Any:
    from .model import MLP

    if os.path.isdir(path):  # a run folder: its model
        folder, path = path, os.path.join(path, "model.npz")
        if not os.path.isfile(path):
            raise UserError(_no_model(folder))
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such model file")
    model = MLP.load(path, backend=backend)
    model.path = path  # the file actually read (a run folder names its model.npz)
    return model


def _no_model(folder: str) -> str:
    """Why the run folder ``folder`` has no model.npz, and the command that writes it."""
    from .training.run_files import load_metrics

    try:
        finished = (load_metrics(folder) or {}).get("status") == "finished"
    except ValueError:
        finished = False
    if finished and os.path.isfile(os.path.join(folder, "checkpoint.npz")):  # deleted since: resume writes it again
        return (
            f"{folder} holds no model.npz (it was removed after the run finished); "
            f"write it again with: backprop-xp train --resume {folder}"
        )
    best = os.path.join(folder, "best.npz")  # --keep-best: the best epoch so far, even of a run that diverged
    also = f"; its best epoch so far is in {best}" if os.path.isfile(best) else ""
    return f"{folder} holds no model.npz (a run writes it when it finishes; resume it with --resume {folder}{also})"


def _train_config(path: str) -> dict[str, Any]:
    """The run's config saved in a model file by train; empty for files that have none (older ones, MLP.save's)."""
    import json

    from .files import read_npz

    arrays = read_npz(path, "a model file written by backprop-xp")
    try:
        config = json.loads(str(arrays["train.config"]))
    except (KeyError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _trained_on(path: str) -> tuple[str, str | None]:
    """The data set a model file says it was trained on, and the folder its data came from, if it says.

    Older files say nothing: MNIST, from wherever the loader looks.
    """
    config = _train_config(path)
    folder = config.get("data_dir")
    return str(config.get("dataset", "mnist")), str(folder) if folder else None


def _class_names_of(model: Any) -> list[str]:
    """The names of a loaded model's classes: those its run saved, else its data set's (numbers where none)."""
    from .data.datasets import classes_of

    return classes_of(_train_config(model.path), model.n_outputs)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .backend import to_numpy
    from .training import confusion_matrix, evaluate

    if len(args.models) > 1:
        return _evaluate_committee(args)
    model = _load_model(args.models[0], args.backend)
    dataset, names, x_test, y_test = _test_set_of(model, args)
    x_test = _preprocessing_of(model)(x_test)  # as the run prepared its test images
    loss, accuracy = evaluate(model, x_test, y_test)
    predicted = to_numpy(model.predict(x_test))
    counts = confusion_matrix(y_test, predicted, model.n_outputs)
    print(f"model {_describe(model)}, on {model.backend.name}; test set of {dataset}")
    print(f"test accuracy {100 * accuracy:.2f}%  ({int(np.trace(counts))} of {len(y_test)}), test loss {loss:.4f}")
    _print_per_class(counts, names)
    return 0


def _describe(model: Any) -> str:
    """The model's file and shape, and the preprocessing its run applied (where it applied one)."""
    preprocess = _train_config(model.path).get("preprocess", "none")
    also = f", preprocess {preprocess}" if preprocess != "none" else ""
    return f"{model.path}: {model.n_inputs}-{model.n_hidden}-{model.n_outputs} {model.activation}, {model.dtype.name}{also}"


def _test_set_of(model: Any, args: argparse.Namespace) -> tuple[str, list[str], np.ndarray, np.ndarray]:
    """The data set ``model`` is tested on (its own unless --dataset says otherwise), its class names and test set."""
    from .data import load_dataset
    from .data.datasets import class_names
    from .data.download import dataset_info

    trained_on, trained_from = _trained_on(model.path)
    dataset, data_dir = args.dataset or trained_on, args.data_dir
    check_data_env(dataset, data_dir)
    if data_dir is None and dataset == trained_on and trained_from and os.path.isdir(trained_from):
        if not os.environ.get(dataset_info(dataset)[1]):  # else the download cache: the run's own folder first
            data_dir = trained_from
    _, _, x_test, y_test = load_dataset(dataset, data_dir)
    if x_test.shape[1] != model.n_inputs or y_test.max() >= model.n_outputs:
        raise UserError(
            f"{model.path}: a {model.n_inputs}-{model.n_hidden}-{model.n_outputs} network cannot be tested on {dataset} "
            f"({x_test.shape[1]} inputs, {int(y_test.max()) + 1} classes)"
        )
    names = _class_names_of(model) if dataset == trained_on else class_names(dataset, model.n_outputs)
    return dataset, names, x_test, y_test


def _preprocessing_of(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    """The preprocessing the model's run applied to every image (none for files that do not say)."""
    from .data.preprocess import PREPROCESSING

    name = _train_config(model.path).get("preprocess", "none")
    if name not in PREPROCESSING:
        raise UserError(f"{model.path}: preprocess {name!r} is not one of {', '.join(PREPROCESSING)}")
    return PREPROCESSING[name]


def _load_committee(paths: Sequence[str], backend: str) -> Any:
    """The models of ``paths`` as a Committee; members that differ (inputs, classes, data set) are refused."""
    from .committee import Committee

    models = [_load_model(path, backend) for path in paths]
    traits = [{"classes": _class_names_of(m), "data set": _trained_on(m.path)[0]} for m in models]
    try:
        return Committee(models, names=list(paths), traits=traits, prepare=[_preprocessing_of(m) for m in models])
    except ValueError as exc:
        raise BadArgument(str(exc)) from None


def _evaluate_committee(args: argparse.Namespace) -> int:
    """evaluate RUN1 RUN2 ...: each member's test accuracy, then the committee's (the mean of their probabilities)."""
    from .training import confusion_matrix, evaluate

    committee = _load_committee(args.models, args.backend)
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
    # -mean log ŷ[label], the members' loss, of the averaged probabilities (tiny: a 0 would make it infinite)
    loss = float(-np.mean(np.log(np.maximum(proba[np.arange(n), y_test], np.finfo(np.float64).tiny))))
    print(
        f"committee (mean of the {len(committee)} members' probabilities): test accuracy {100 * right / n:.2f}%  "
        f"({right} of {n}), test loss {loss:.4f}"
    )
    _print_per_class(confusion_matrix(y_test, predicted, committee.n_outputs), names)
    return 0


def _print_per_class(counts: np.ndarray, names: Sequence[str]) -> None:
    """evaluate's tables: each class's accuracy, and the confusion matrix, classes by name.

    Digits fit a column each; longer names (Fashion-MNIST's) get a row each,
    and the matrix's columns are numbered as its rows.
    """
    k_all = range(len(names))
    numbers = list(names) == [str(k) for k in k_all]
    accuracy = [100 * counts[k, k] / max(counts[k].sum(), 1) for k in k_all]
    print()
    print("per-class accuracy (%):")
    if numbers:
        print("  class    " + " ".join(f"{k:>6d}" for k in k_all))
        print("  accuracy " + " ".join(f"{a:6.2f}" for a in accuracy))
    else:
        width = max(len(name) for name in names)
        for name, a in zip(names, accuracy):
            print(f"  {name:<{width}}  {a:6.2f}")
    print()
    rows = [str(k) if numbers else f"{k} {name}" for k, name in zip(k_all, names)]
    width = max(9, *(len(row) for row in rows))
    columns = "" if numbers else ", numbered as the rows"
    print(f"confusion matrix (rows: true class, columns: predicted class{columns}):")
    align = ">" if numbers else "<"  # numbers line up on the right, names on the left
    print(f"  {'true' + chr(92) + 'pred':{align}{width}} " + " ".join(f"{k:>5d}" for k in k_all))
    for k, row in zip(k_all, rows):
        print(f"  {row:{align}{width}} " + " ".join(f"{c:>5d}" for c in counts[k]))


# --------------------------------------------------------------------------- predict


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="classify pictures of digits with a saved model (top 3 classes)",
        description=(
            "Classify images of digits (PNG, JPEG...; colour is converted to gray, any size). Each is prepared "
            "as MNIST's digits were: an image with a light border (a dark digit on paper) is inverted to white "
            "on black, its background and uneven lighting removed, its digits found (specks of dirt are left "
            "out), each cut to its ink, scaled to fit a 20x20 box keeping its aspect ratio, and placed in 28x28 "
            "with its centre of mass at the centre. Prints the top 3 classes with their probabilities, or, for "
            "several digits side by side, the number they make and each digit's reading; --show "
            "draws what the network saw. An unreadable file gets an error line and the other files are still "
            "classified (exit code 1 if any failed). Several models make a committee: their class probabilities "
            "are averaged (members must agree on inputs, classes and data set)."
        ),
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        help="a model.npz written by train, or the run folder holding it; the arguments right after it that are "
        "folders or end in .npz are models too (a committee, e.g. SWEEP/*/), the rest are images",
    )
    p.add_argument("images", metavar="IMAGE", nargs="+", help="image files (any name that is not a folder or a .npz)")
    p.add_argument(
        "--show", metavar="PNG", type=png_file, help="also draw each image as the network saw it into this PNG file"
    )
    _add_backend_flag(p)
    p.set_defaults(handler=_cmd_predict)


def read_digits(path: str, side: int = 28) -> tuple[list[np.ndarray], bool]:
    """The digits of an image file, left to right, each prepared like MNIST (``side*side`` float32 values); and whether it was inverted.

    See ``backprop_xp.data.images.mnist_digits``. Raises UserError naming the
    file when it is not a readable image or holds no ink.
    """
    from .data.images import mnist_digits, read_gray

    try:
        return mnist_digits(read_gray(path), side)
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None
    except ValueError as exc:
        message = str(exc)
        raise UserError(message if message.startswith(str(path)) else f"{path}: {message}") from None


def reading(proba: np.ndarray, names: Sequence[str]) -> str:
    """What predict prints for one image: one digit's 3 likeliest classes, or several digits read left to right.

    ``proba`` holds a row of class probabilities per digit found. Digits side by
    side are read as the number they make when the classes are digits.

    >>> reading(np.array([[0.1, 0.9], [0.8, 0.2]]), ["0", "1"])
    '10 (2 digits, left to right: 1 (90.0%), 0 (80.0%))'
    >>> reading(np.array([[0.1, 0.9], [0.8, 0.2]]), ["Coat", "Bag"])
    '2 things side by side, left to right: Bag (90.0%), Coat (80.0%)'
    """

    def guess(p: np.ndarray, k: int) -> str:
        return f"{names[k]} ({100 * p[k]:.1f}%)"

    if len(proba) == 1:
        return ", ".join(guess(proba[0], k) for k in np.argsort(-proba[0], kind="stable")[:3])
    best = proba.argmax(axis=1)
    each = ", ".join(guess(p, k) for p, k in zip(proba, best))
    if all(name.isdigit() for name in names):
        return f"{''.join(names[k] for k in best)} ({len(best)} digits, left to right: {each})"
    return f"{len(best)} things side by side, left to right: {each}"


def _title_name(path: str, width: int = 17) -> str:
    """The file name of ``path`` for a picture's title, at most ``width`` characters.

    A longer name keeps its start and its end around a "…": files often differ
    only at the end (photo_1.png, photo_2.png), so cutting the end alone would
    give them the same title. 17 characters fit under a picture at the grid's font size.
    """
    name = os.path.basename(path)
    if len(name) <= width:
        return name
    tail = (width - 1) * 2 // 3  # the end gets the larger share: the number and the extension
    return name[: width - 1 - tail] + "…" + name[-tail:]


def _title_names(paths: Sequence[str], width: int = 17) -> dict[str, str]:
    """``_title_name`` of each path, numbered by its place on the command line where two would read the same.

    Names that differ only in their middle (scan_of_page_1_left.png, scan_of_page_2_left.png)
    are cut to the same start and end; their number tells them apart, as the printed lines do.
    """
    titles = {path: _title_name(path, width) for path in paths}
    same = {title for title in titles.values() if list(titles.values()).count(title) > 1}
    for k, path in enumerate(dict.fromkeys(paths), 1):
        if titles[path] in same:
            titles[path] = f"{k}. " + _title_name(path, width - len(f"{k}. "))
    return titles


def _is_run(path: str) -> bool:
    """Whether a predict argument names a model: a folder (a run's) or a .npz file; anything else is an image."""
    return os.path.isdir(path) or path.lower().endswith(".npz")


def _models_and_images(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """predict's arguments split: the first, and those right after it that are runs, are models; the rest images."""
    paths = [args.model, *args.images]
    k = 1
    while k < len(paths) and _is_run(paths[k]):
        k += 1
    models, images = paths[:k], paths[k:]
    if not images:
        raise BadArgument(f"no image to classify: every argument after MODEL ({', '.join(models[1:])}) names a run")
    if late := next((path for path in images if _is_run(path)), None):
        raise BadArgument(
            f"{late} names a run (a folder or a .npz file) but comes after the image {images[0]}: name the runs first"
        )
    return models, images


def _cmd_predict(args: argparse.Namespace) -> int:
    from .plots import said

    models, images = _models_and_images(args)
    if args.show:  # its folder first: a picture with nowhere to go is an error before any work
        _prepare_out_dir(os.path.dirname(args.show) or ".")
    model = _load_committee(models, args.backend)  # one model: a committee of one, its probabilities unchanged
    first = model.models[0]  # the class names are the first member's: all members agree on them
    if len(models) > 1:
        print(f"committee of {len(models)} models, averaging their class probabilities")
    side = math.isqrt(model.n_inputs)
    if side * side != model.n_inputs:
        raise UserError(f"{models[0]}: {model.n_inputs} inputs are not a square image; predict needs one")
    names = _class_names_of(first)
    failed = 0
    seen, titles, title_of = [], [], _title_names(images)
    for path in images:
        try:
            digits, inverted = read_digits(path, side)
        except UserError as exc:
            print(f"backprop-xp: error: {exc}", file=sys.stderr)
            failed += 1
            continue
        proba = model.predict_proba(np.stack(digits))  # each member preprocesses them as its run did
        digits = model.prepare[0](np.stack(digits))  # the picture shows what the (first) network saw
        print(f"{path}: {reading(proba, names)}" + ("  [inverted: dark digit on light background]" if inverted else ""))
        for i, (pixels, p) in enumerate(zip(digits, proba)):
            which = f"\ndigit {i + 1} of {len(digits)}" if len(digits) > 1 else ""
            seen.append(pixels)
            titles.append(f"{title_of[path]}{which}\n{said(names[p.argmax()], p.max())}")
    if args.show and seen:
        from .plots import digit_grid

        digit_grid(np.stack(seen), titles, args.show, suptitle=f"What the network saw ({side}x{side}, white on black)")
        print(f"wrote {args.show}")
    return 1 if failed else 0


# --------------------------------------------------------------------------- sweep


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="train every combination of settings (comma-separated lists) and compare them",
        description=(
            "Train every combination of the listed settings, each run in its own sub-folder of --out (as train "
            "would write it), and write sweep.csv, sweep.md and sweep.png. Runs are ranked by the accuracy on a "
            "validation set held out of the training images (--val-size, 5000 by default, the same for every run of one --seed); "
            "the test accuracy of each run's final model is reported beside it, never used to choose. On the CPU "
            "--jobs runs train in parallel processes; on a GPU runs go one after another. A failed or diverged "
            "run is recorded and the sweep goes on; running the same sweep into the same folder again skips the "
            "runs already finished (and resumes interrupted ones)."
        ),
    )
    _add_model_flags(p, lists=True)
    p.add_argument("--jobs", type=positive_int, default=1, help="runs trained at once on the CPU (default: 1)")
    p.add_argument(
        "--scheduler", metavar="ADDRESS", type=nonempty,
        help="train the runs on a Dask cluster instead: tcp://host:port of a running dask scheduler, or 'local' "
        "for --jobs worker processes here (needs the optional dependency 'distributed'; see dask_sweep.py)",
    )  # fmt: skip
    p.add_argument(
        "--out", metavar="DIR", type=nonempty, help="folder for the sweep (default: a new folder under sweeps/)"
    )
    p.set_defaults(handler=_cmd_sweep)


def _cmd_sweep(args: argparse.Namespace) -> int:
    import time

    from .backend import get_backend
    from .training import plural
    from .training.sweep import SWEEP_VAL_SIZE, SWEPT, check_sweep_folder, grid, run_names

    given = _given(args, [f.name for f in dataclasses.fields(TrainConfig)])
    default_val = "val_size" not in given
    given.setdefault("val_size", SWEEP_VAL_SIZE)  # choose settings on held-out training images, never on the test set
    options = {name: given.pop(name) for name in SWEPT if name in given}
    base = TrainConfig(**given)
    if args.scheduler in (None, "local"):  # a remote cluster's workers have their own environment
        check_data_env(base.dataset, base.data_dir)
    if args.scheduler:
        from .training.dask_sweep import require_distributed

        try:
            require_distributed()
        except ImportError as exc:
            raise UserError(str(exc)) from None
    else:
        backend = get_backend(base.backend)  # resolved once here, so that workers do not each probe CUDA
        base.backend = backend.name
    d = base.to_dict()
    configs = grid(d, {name: options.get(name, [d[name]]) for name in SWEPT})
    try:
        for config in configs:
            TrainConfig.from_dict(config).validate()
    except SettingError as exc:
        hint = (
            f" (a sweep holds out {SWEEP_VAL_SIZE} training images by default: give a smaller --val-size)"
            if default_val
            else ""
        )
        print(f"backprop-xp: error: {exc}{hint}", file=sys.stderr)
        return 2
    varied = [name for name in SWEPT if len(options.get(name, [])) > 1]
    names = run_names(configs, varied)
    out = args.out or os.path.join("sweeps", time.strftime("%Y%m%d-%H%M%S"))
    if os.path.exists(out) and not os.path.isdir(out):
        raise BadArgument(f"--out {out} is a file, not a folder")
    check_sweep_folder(configs, names, out)  # before anything is trained: main() makes it exit code 2
    title = f"Sweep: {plural(len(configs), 'run')}, {plural(base.epochs, 'epoch')}, {base.backend}"
    try:
        summaries = _sweep_runs(args, base, configs, names, out, title)
    except KeyboardInterrupt:
        _say_sweep_interrupted(args, names, out)
        return 130
    bad = [s for s in summaries if s["status"] != "finished"]
    print(
        f"wrote {os.path.join(out, 'sweep.md')}, sweep.csv and sweep.png; "
        f"{len(summaries) - len(bad)} finished, {len(bad)} failed or diverged"
    )
    if summaries and len(bad) == len(summaries):  # nothing to compare: a failure, not a result
        print(f"backprop-xp: error: no run of the sweep finished; see {os.path.join(out, 'sweep.md')}", file=sys.stderr)
        return 1
    return 0


def _sweep_runs(
    args: argparse.Namespace, base: TrainConfig, configs: list[dict[str, Any]], names: list[str], out: str, title: str
) -> list[dict[str, Any]]:
    """Train the sweep's runs here (processes) or on a Dask cluster; their summaries."""
    from .backend import get_backend
    from .training import plural
    from .training.sweep import run_sweep

    if args.scheduler:  # each worker resolves the backend on its own machine: "auto" uses its GPU
        jobs = min(args.jobs, len(configs))
        where = f"{jobs} local Dask workers" if args.scheduler == "local" else f"the Dask cluster at {args.scheduler}"
        print(
            f"sweep: {plural(len(configs), 'run')} of {plural(base.epochs, 'epoch')} (backend {base.backend}) on {where} into {out}"
        )
        from .training.dask_sweep import run_sweep_dask

        return run_sweep_dask(configs, names, out, scheduler=args.scheduler, jobs=jobs, title=title)
    backend = get_backend(base.backend)  # the name _cmd_sweep resolved "auto" to
    jobs = 1 if backend.is_gpu else min(args.jobs, len(configs))
    print(
        f"sweep: {plural(len(configs), 'run')} of {plural(base.epochs, 'epoch')} on {backend.name} ({jobs} at a time) into {out}"
    )
    return run_sweep(configs, names, out, jobs=jobs, title=title)


def _say_sweep_interrupted(args: argparse.Namespace, names: list[str], out: str) -> None:
    """Name the runs an interrupt stopped, and the command that resumes them (the same sweep, into the same folder)."""
    import shlex

    from .training.sweep import interrupted_runs

    argv = list(args.argv) + ([] if args.out else ["--out", out])  # the folder the default named, this time
    command = shlex.join(["backprop-xp", *argv])
    stopped = interrupted_runs(names, out)
    if stopped:
        what = f"runs stopped: {', '.join(stopped)} (their finished epochs are saved)"
    else:
        what = "no run in progress had finished an epoch"
    print(f"backprop-xp: interrupted; {what}; resume the sweep with: {command}", file=sys.stderr)


# --------------------------------------------------------------------------- bench


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from .speed.engines import DEFAULT_ENGINES, ENGINES  # names only: no engine library is imported here

    p = sub.add_parser(
        "bench",
        help="time the same training on every engine installed here (ours, JAX, PyTorch, scikit-learn; CPU and GPU)",
        description=(
            "Train 784-H-10 (ReLU, SGD with momentum 0.9, float32) on MNIST with every engine that can run here, each "
            "in its own process, rounds interleaved across engines: samples/s, ms per epoch, the ratio to the fastest "
            "PyTorch engine on the same device, test accuracy after the epochs, and the fraction of the step's matrix-"
            "product bound. Writes bench.json, bench.md and bench.png; engines that cannot run are listed with the "
            "reason; Ctrl-C (or SIGTERM) prints the table of what was measured so far. The defaults take about 3 minutes on a 2-core CPU."
        ),
    )
    p.add_argument(
        "--hidden",
        type=list_of(positive_int),
        default=[128, 800],
        metavar="N,N",
        help="hidden sizes (default: 128,800)",
    )
    p.add_argument(
        "--batch-size",
        type=list_of(positive_int),
        default=[32, 128, 4096],
        metavar="B,B",
        help="batch sizes (default: 32,128,4096)",
    )
    p.add_argument(
        "--engines",
        type=list_of(choice_of(tuple(ENGINES))),
        default=list(DEFAULT_ENGINES),
        metavar="E,E",
        help=f"a subset of {','.join(ENGINES)} (default: all but torch-compile*, whose compiling takes minutes)",
    )
    p.add_argument(
        "--epochs",
        type=positive_int,
        default=3,
        help="timed epochs per engine and shape, after one first epoch (default: 3)",
    )
    p.add_argument(
        "--budget-s",
        type=positive_float,
        default=180.0,
        metavar="S",
        help="start no round that would end after S seconds; at least one runs (default: 180)",
    )
    p.add_argument(
        "--threads",
        type=bench_threads,
        help=f"CPU threads of every CPU engine, at most {MAX_BENCH_THREADS} (4 per CPU; default: 1, steady on a busy machine)",
    )
    p.add_argument("--data-dir", type=existing_dir, metavar="DIR", help=MNIST_DATA_HELP)
    p.add_argument(
        "--train-size", type=count, default=20_000, metavar="N",
        help="an epoch is the first N training images; 0 = all 60,000 "
        "(default: 20000, so that the default run with every CPU engine fits its budget)",
    )  # fmt: skip
    p.add_argument(
        "--out",
        metavar="DIR",
        type=nonempty,
        help="folder for bench.json, bench.md and bench.png (default: a new folder under runs/)",
    )
    p.set_defaults(handler=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from .speed import command

    check_data_env("mnist", args.data_dir)
    return command(args)


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="backprop-xp",
        description="Train a one-hidden-layer network on MNIST with hand-derived backpropagation (NumPy or CuPy).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_train(sub)
    _add_evaluate(sub)
    _add_predict(sub)
    _add_sweep(sub)
    _add_bench(sub)
    _add_show_data(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv  # a command's own words, for the advice to run it again (an interrupted sweep)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        with signals_as_interrupts():  # SIGTERM ends every command as Ctrl-C does, and neither strands a temporary file
            return args.handler(args)
    except (BadArgument, SettingError) as exc:
        # Bad arguments found after parsing: SettingError is a setting that does not fit the data.
        print(f"backprop-xp: error: {exc}", file=sys.stderr)
        return 2
    except (UserError, OSError, ValueError, BackendError) as exc:  # OSError: FileNotFoundError, a full disk...
        print(f"backprop-xp: error: {exc}", file=sys.stderr)
        return 1
    except MemoryError as exc:  # NumPy's says how much, for what shape: --hidden 10**11, say
        print(f"backprop-xp: error: not enough memory: {exc or 'an allocation failed'}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("backprop-xp: interrupted", file=sys.stderr)
        return 130
