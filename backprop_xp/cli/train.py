"""``backprop-xp train``: train a network and write metrics, checkpoints, the model and pictures."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from ..training import DIVERGED_EXIT_CODE, TrainConfig
from .arguments import BadArgument, check_data_env, existing_dir, nonempty
from .settings import add_setting_flags, given_settings


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = TrainConfig()
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
    add_setting_flags(p, d)
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
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..training import CHECKPOINT, Diverged, default_out_dir, read_checkpoint, summary_line, train

    given, checkpoint = given_settings(args), None
    if args.resume:
        if args.out and os.path.abspath(args.out) != os.path.abspath(args.resume):
            raise BadArgument(f"--out {args.out} and --resume {args.resume} differ: a resumed run stays in its folder")
        checkpoint = read_checkpoint(args.resume)  # read once: train() takes it, and refuses changed math settings
        config = dataclasses.replace(checkpoint[0], **given)
        out = args.resume
    else:
        config = TrainConfig(**given)
        out = args.out or default_out_dir(config)  # train() checks the settings (a SettingError is exit code 2)
    check_data_env(config.dataset, config.data_dir)
    try:
        metrics = train(
            config, out, resume=bool(args.resume), echo=None if args.quiet else print,
            progress=None if not args.quiet else False, verbose=args.verbose, checkpoint=checkpoint,
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
