"""The command line: ``backprop-xp`` or ``python -m backprop_xp``.

Commands: ``train``, ``evaluate``, ``predict``, ``sweep``, ``bench``, ``show-data``, one
module each (``show_data.py`` for show-data) with its ``add_parser(sub)`` and its
``run(args) -> int``: parsing and printing; the work is done by the modules that
own it. ``arguments.py`` holds what they share, ``settings.py`` train's and sweep's
flags, made from ``TrainConfig``'s tables. Bad arguments end with a one-line
message and exit code 2 (argparse's convention); errors the user can fix (a
malformed file, a backend that cannot run here) print one line, no traceback,
and exit 1; a training run whose loss became NaN or infinite exits 3.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .. import __version__
from ..backend import BackendError
from ..committee import Disagreement
from ..files import signals_as_interrupts
from ..training import SettingError
from . import bench, evaluate, predict, show_data, sweep, train
from .arguments import BadArgument, Parser, UserError

COMMANDS = (train, evaluate, predict, sweep, bench, show_data)  # in the order --help lists them

__all__ = ["BadArgument", "COMMANDS", "Parser", "UserError", "build_parser", "main"]


def build_parser() -> Parser:
    parser = Parser(
        prog="backprop-xp",
        description="Train a one-hidden-layer network on MNIST with hand-derived backpropagation (NumPy or CuPy).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
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
    except (BadArgument, SettingError, Disagreement) as exc:
        # Bad arguments found after parsing: SettingError is a setting that does not fit the data,
        # Disagreement a committee's members that differ.
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
