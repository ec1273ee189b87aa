"""``backprop-xp show-data``: draw sample digits and print the class counts."""

from __future__ import annotations

import argparse
import os

import numpy as np

from ..checks import AT_LEAST_1, Rule
from ..data import DATASETS
from .arguments import DATA_HELP, check_data_env, checked, choice_of, existing_dir, png_file, prepare_out_dir

# The grid makes one matplotlib axes per digit: 100 take about 4 s on a 2-core CPU, 1000 about 40 s.
MAX_SHOW_COUNT = 100
show_count = checked(
    int, Rule(f"an integer from 1 to {MAX_SHOW_COUNT}", lambda v: AT_LEAST_1.ok(v) and v <= MAX_SHOW_COUNT)
)


def add_parser(sub: argparse._SubParsersAction) -> None:
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
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..data import load_dataset
    from ..data.datasets import class_names
    from ..plots import digit_grid

    check_data_env(args.dataset, args.data_dir)
    prepare_out_dir(os.path.dirname(args.out) or ".")
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
