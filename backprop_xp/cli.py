"""The command line: ``backprop-xp`` or ``python -m backprop_xp``.

Each subcommand is a parser-building function and a handler. Bad arguments end
with a one-line message and exit code 2 (argparse's convention); errors the
user can fix (a missing data folder, a malformed file) print one line, no
traceback, and exit 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from . import __version__


class UserError(Exception):
    """An error the user can fix; printed as one line without a traceback."""


def _add_show_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("show-data", help="draw sample digits and print the class counts")
    p.add_argument("--data-dir", help="folder with the four MNIST IDX files (default: $BACKPROP_XP_DATA or the cache)")
    p.add_argument("--out", default="digits.png", help="PNG file to write (default: digits.png)")
    p.add_argument("--count", type=int, default=40, help="how many training digits to draw (default: 40)")
    p.set_defaults(handler=_cmd_show_data)


def _cmd_show_data(args: argparse.Namespace) -> int:
    from .data import load_mnist
    from .plots import digit_grid

    if args.count < 1:
        raise UserError(f"--count must be >= 1, got {args.count}")
    x_train, y_train, x_test, y_test = load_mnist(args.data_dir)
    for name, y in (("train", y_train), ("test", y_test)):
        counts = np.bincount(y, minlength=10)
        print(f"{name:5s} {len(y):6d} images, per class: " + " ".join(str(c) for c in counts))
    count = min(args.count, len(x_train))
    digit_grid(x_train[:count], [f"label {y}" for y in y_train[:count]], args.out, suptitle="MNIST training digits")
    print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="backprop-xp",
        description="Train a one-hidden-layer network on MNIST with hand-derived backpropagation (NumPy or CuPy).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_show_data(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except (UserError, FileNotFoundError, ValueError) as exc:
        print(f"backprop-xp: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("backprop-xp: interrupted", file=sys.stderr)
        return 130
