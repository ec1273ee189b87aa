"""What every command shares: the errors a user can fix, the parser that says one line, and the argument types.

Each argument type raises ArgumentTypeError, which argparse turns into
"argument --x: <message>", exit code 2.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

from ..backend import BACKENDS
from ..checks import AT_LEAST_0, AT_LEAST_1, FRACTION, NON_NEGATIVE, POSITIVE, Rule
from ..data.datasets import data_env
from ..training.config import FLAGS, TrainConfig


class UserError(Exception):
    """An error the user can fix; printed as one line without a traceback."""


class BadArgument(UserError):
    """A bad argument found after parsing (a data folder named by the environment, say): exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr (no usage block) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


DATA_HELP = FLAGS["data_dir"].help


def prepare_out_dir(path: str) -> str:
    from ..files import make_out_dir

    return make_out_dir(path)


def _number(kind: Callable[[str], Any], text: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def checked(kind: Callable[[str], Any], rule: Rule) -> Callable[[str], Any]:
    """An argparse type: ``kind(text)`` that must follow ``rule`` (checks.py), else "must be <requirement>, got <value>"."""

    def parse(text: str) -> Any:
        value = _number(kind, text)
        if not rule.ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule.requirement}, got {value:g}")
        return value

    return parse


positive_int = checked(int, AT_LEAST_1)
count = checked(int, AT_LEAST_0)
positive_float = checked(float, POSITIVE)
nonnegative_float = checked(float, NON_NEGATIVE)
momentum_float = checked(float, FRACTION)


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
    if data_dir is not None:
        return
    env, folder = data_env(dataset)
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


def add_backend_flag(p: argparse.ArgumentParser) -> None:
    """evaluate's and predict's --backend: train's choices, default and words."""
    default = TrainConfig().backend
    p.add_argument(
        "--backend",
        type=choice_of(BACKENDS),
        default=default,
        metavar="{" + ",".join(BACKENDS) + "}",
        help=FLAGS["backend"].help.format(default=default),
    )
