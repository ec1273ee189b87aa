"""``backprop-xp sweep``: train every combination of settings (comma-separated lists) and compare them."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..backend import Backend
from ..training import SettingError, TrainConfig
from ..training.sweep import SWEEP_VAL_SIZE, SWEPT
from .arguments import BadArgument, UserError, check_data_env, nonempty, positive_int
from .settings import add_setting_flags, given_settings


def add_parser(sub: argparse._SubParsersAction) -> None:
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
    add_setting_flags(p, TrainConfig(val_size=SWEEP_VAL_SIZE), lists=SWEPT)
    p.add_argument("--jobs", type=positive_int, default=1, help="runs trained at once on the CPU (default: 1)")
    p.add_argument(
        "--scheduler", metavar="ADDRESS", type=nonempty,
        help="train the runs on a Dask cluster instead: tcp://host:port of a running dask scheduler, or 'local' "
        "for --jobs worker processes here (needs the optional dependency 'distributed'; see dask_sweep.py)",
    )  # fmt: skip
    p.add_argument(
        "--out", metavar="DIR", type=nonempty, help="folder for the sweep (default: a new folder under sweeps/)"
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import time

    from ..training import plural
    from ..training.sweep import check_sweep_folder, plan_runs, resolve_backend, sweep_settings

    given = given_settings(args)
    base, options = sweep_settings(given)
    backend = None  # resolved here for local runs; each Dask worker resolves its own
    if args.scheduler in (None, "local"):  # a remote cluster's workers have their own environment
        check_data_env(base.dataset, base.data_dir)
    if args.scheduler:
        from ..training.dask_sweep import require_distributed

        try:
            require_distributed()
        except ImportError as exc:
            raise UserError(str(exc)) from None
    else:
        backend = resolve_backend(base)
    try:
        configs, names = plan_runs(base, options)
    except SettingError as exc:
        hint = "" if "val_size" in given else (
            f" (a sweep holds out {SWEEP_VAL_SIZE} training images by default: give a smaller --val-size)"
        )  # fmt: skip
        print(f"backprop-xp: error: {exc}{hint}", file=sys.stderr)
        return 2
    out = args.out or os.path.join("sweeps", time.strftime("%Y%m%d-%H%M%S"))
    if os.path.exists(out) and not os.path.isdir(out):
        raise BadArgument(f"--out {out} is a file, not a folder")
    check_sweep_folder(configs, names, out)  # before anything is trained: main() makes it exit code 2
    title = f"Sweep: {plural(len(configs), 'run')}, {plural(base.epochs, 'epoch')}, {base.backend}"
    try:
        summaries = _sweep_runs(args, base, backend, configs, names, out, title)
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
    args: argparse.Namespace,
    base: TrainConfig,
    backend: Backend | None,
    configs: list[dict[str, Any]],
    names: list[str],
    out: str,
    title: str,
) -> list[dict[str, Any]]:
    """Train the sweep's runs here (processes, on ``backend``) or on a Dask cluster; their summaries."""
    from ..training import plural
    from ..training.sweep import run_sweep

    if args.scheduler:  # each worker resolves the backend on its own machine: "auto" uses its GPU
        jobs = min(args.jobs, len(configs))
        where = f"{jobs} local Dask workers" if args.scheduler == "local" else f"the Dask cluster at {args.scheduler}"
        print(
            f"sweep: {plural(len(configs), 'run')} of {plural(base.epochs, 'epoch')} (backend {base.backend}) on {where} into {out}"
        )
        from ..training.dask_sweep import run_sweep_dask

        return run_sweep_dask(configs, names, out, scheduler=args.scheduler, jobs=jobs, title=title)
    jobs = 1 if backend.is_gpu else min(args.jobs, len(configs))
    print(
        f"sweep: {plural(len(configs), 'run')} of {plural(base.epochs, 'epoch')} on {backend.name} ({jobs} at a time) into {out}"
    )
    return run_sweep(configs, names, out, jobs=jobs, title=title)


def _say_sweep_interrupted(args: argparse.Namespace, names: list[str], out: str) -> None:
    """Name the runs an interrupt stopped, and the command that resumes them (the same sweep, into the same folder)."""
    import shlex

    from ..training.sweep import interrupted_runs

    argv = list(args.argv) + ([] if args.out else ["--out", out])  # the folder the default named, this time
    command = shlex.join(["backprop-xp", *argv])
    stopped = interrupted_runs(names, out)
    if stopped:
        what = f"runs stopped: {', '.join(stopped)} (their finished epochs are saved)"
    else:
        what = "no run in progress had finished an epoch"
    print(f"backprop-xp: interrupted; {what}; resume the sweep with: {command}", file=sys.stderr)
