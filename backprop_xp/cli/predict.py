"""``backprop-xp predict``: classify pictures of digits with a saved model (or a committee), top 3 classes."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence

import numpy as np

from .arguments import BadArgument, UserError, add_backend_flag, png_file, prepare_out_dir


def add_parser(sub: argparse._SubParsersAction) -> None:
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
    add_backend_flag(p)
    p.set_defaults(handler=run)


def read_digits(path: str, side: int = 28) -> tuple[list[np.ndarray], bool]:
    """The digits of an image file, left to right, each prepared like MNIST (``side*side`` float32 values); and whether it was inverted.

    See ``backprop_xp.data.images.mnist_digits``. Raises UserError naming the
    file when it is not a readable image or holds no ink.
    """
    from ..data.images import mnist_digits, read_gray

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


def run(args: argparse.Namespace) -> int:
    from ..committee import load_committee
    from ..data.datasets import classes_of
    from ..plots import said
    from ..training.run_files import saved_config

    models, images = _models_and_images(args)
    if args.show:  # its folder first: a picture with nowhere to go is an error before any work
        prepare_out_dir(os.path.dirname(args.show) or ".")
    model = load_committee(models, args.backend)  # one model: a committee of one, its probabilities unchanged
    first = model.models[0]  # the class names are the first member's: all members agree on them
    if len(models) > 1:
        print(f"committee of {len(models)} models, averaging their class probabilities")
    side = math.isqrt(model.n_inputs)
    if side * side != model.n_inputs:
        raise UserError(f"{models[0]}: {model.n_inputs} inputs are not a square image; predict needs one")
    names = classes_of(saved_config(first.path), first.n_outputs)
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
        from ..plots import digit_grid

        digit_grid(np.stack(seen), titles, args.show, suptitle=f"What the network saw ({side}x{side}, white on black)")
        print(f"wrote {args.show}")
    return 1 if failed else 0
