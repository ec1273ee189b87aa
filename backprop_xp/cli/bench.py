"""``backprop-xp bench``: time the same training on every engine installed here (the work is in ``speed/``)."""

from __future__ import annotations

import argparse
import os

from ..checks import AT_LEAST_1, Rule
from ..speed import add_optimizer_flag
from .arguments import (
    check_data_env,
    checked,
    choice_of,
    count,
    existing_dir,
    list_of,
    nonempty,
    positive_float,
    positive_int,
)

MNIST_DATA_HELP = "folder with MNIST's four IDX files (default: $BACKPROP_XP_DATA, else the download cache)"
# More threads than cores only make the CPU engines fight over them; 4x leaves room to measure that, not 1000.
MAX_BENCH_THREADS = 4 * (os.cpu_count() or 1)
bench_threads = checked(
    int,
    Rule(
        f"an integer from 1 to {MAX_BENCH_THREADS} (4 per CPU here)",
        lambda v: AT_LEAST_1.ok(v) and v <= MAX_BENCH_THREADS,
    ),
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="time the same training on every engine installed here (ours, JAX, PyTorch, scikit-learn; CPU and GPU)",
        description=(
            "Train 784-H-10 (ReLU, SGD with momentum 0.9 or Adam with --optimizer adam, float32) on MNIST with every "
            "engine that can run here, each in its own process, rounds interleaved across engines: samples/s, ms per "
            "epoch, the ratio to the fastest PyTorch engine on the same device, test accuracy after the epochs, and the "
            "fraction of the step's matrix-product bound. Writes bench.json, bench.md and bench.png; engines that cannot "
            "run are listed with the reason; Ctrl-C (or SIGTERM) prints the table of what was measured so far. The "
            "defaults take about 3 minutes on a 2-core CPU."
        ),
    )
    _add_what_to_time(p)
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
    add_optimizer_flag(p)  # the speed package owns the rules it compares
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..speed import command

    check_data_env("mnist", args.data_dir)
    return command(args)


def _add_what_to_time(p: argparse.ArgumentParser) -> None:
    """The shapes, the engines and how long to time each."""
    from ..speed.engines import DEFAULT_ENGINES, ENGINES  # names only: no engine library is imported here

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
