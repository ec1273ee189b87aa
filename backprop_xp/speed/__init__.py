"""``backprop-xp bench``: the same network trained on every engine installed here, timed side by side.

Engines (``engines.ENGINES``): ``numpy`` (ours on the CPU), ``cupy`` and
``cupy-eager`` (ours on a GPU, with and without CUDA graphs), ``jax`` and
``jax-step`` (the epoch in one jitted ``lax.scan``, or the step jitted alone;
``-cuda`` on a GPU), ``torch-cpu``, ``torch-cuda``, ``torch-cuda-graph``
(PyTorch eager, and with the whole step captured as one CUDA graph),
``torch-compile`` and ``torch-compile-cuda`` (``compiled.py``) and ``sklearn``
(scikit-learn's MLPClassifier).
Each runs in its own process (``worker.py``), rounds interleaved across
engines (``runner.py``); the results go to the terminal and to
``bench.json``, ``bench.md`` and ``bench.png`` (``report.py``).

``bench/compare.py`` and ``bench/bench_gpu.py`` in the source tree call
``run`` with their own settings; there is one benchmark implementation.
"""

from __future__ import annotations

from typing import Any

from .engines import DEFAULT_OPTIMIZER, ENGINES, OPTIMIZERS, TORCH_ENGINES, describe_optimizer
from .report import table, write_files
from .runner import DEFAULT_THREADS, Settings, run, summarize

__all__ = [
    "ENGINES", "OPTIMIZERS", "TORCH_ENGINES", "Settings", "add_optimizer_flag", "run", "command", "summarize",
    "table", "write_files",
]  # fmt: skip


def add_optimizer_flag(parser: Any) -> None:
    """``--optimizer {sgd,adam}`` on the ``bench`` command's parser (``cli.py`` calls this).

    Defined here, beside ``engines.OPTIMIZERS``, so that the choices and the
    settings in the help are the ones the engines train with.
    """
    parser.add_argument(
        "--optimizer",
        choices=tuple(OPTIMIZERS),
        default=DEFAULT_OPTIMIZER,
        help="the rule every engine trains with, in each library's own form: "
        + "; ".join(f"{name}: {describe_optimizer(name)}" for name in OPTIMIZERS)
        + f" (default: {DEFAULT_OPTIMIZER})",
    )


def command(args: Any) -> int:
    """The ``bench`` command (``cli.py`` parses its flags): run, print the table, write the three files.

    Exit status 0; 1 when no engine could run; 130 after Ctrl-C (the table of
    the rounds finished so far is printed and written first). A ``--train-size``
    larger than the data raises SettingError (exit 2, as for ``train``); an
    output folder that cannot be made, OSError (exit 1).
    """
    import os
    import time

    from ..data import load_mnist
    from ..files import make_out_dir
    from ..training import SettingError

    threads = args.threads or DEFAULT_THREADS
    optimizer = getattr(args, "optimizer", DEFAULT_OPTIMIZER)  # a parser without add_optimizer_flag: SGD
    # The data once here, before the workers start: a missing folder is one error line (not one per
    # engine), the download cache is filled by one process, and --train-size is checked.
    n_train = len(load_mnist(args.data_dir)[1])
    if args.train_size > n_train:
        raise SettingError(f"--train-size {args.train_size} is more than the {n_train} training images")
    # After the arguments are checked (a refused one leaves no empty folder), before any worker starts.
    out = make_out_dir(args.out or os.path.join("runs", time.strftime("bench-%Y%m%d-%H%M%S")))
    command_line = (
        f"backprop-xp bench --hidden {','.join(map(str, args.hidden))} --batch-size {','.join(map(str, args.batch_size))} "
        f"--engines {','.join(args.engines)} --epochs {args.epochs} --budget-s {args.budget_s:g} --threads {threads} "
        f"--train-size {args.train_size} --optimizer {optimizer}"
    )
    settings = Settings(
        hidden=args.hidden, batch_sizes=args.batch_size, engines=args.engines, epochs=args.epochs,
        budget_s=args.budget_s, threads=threads, threads_from="--threads" if args.threads else "default",
        data_dir=args.data_dir, train_size=args.train_size, optimizer=optimizer, command=command_line,
    )  # fmt: skip
    print(f"{command_line}: writing to {out}", flush=True)
    result = run(
        settings, echo=lambda line: print(line, flush=True), on_round=lambda r: write_files(r, out, picture=False)
    )
    paths = write_files(result, out)
    print()
    print(table(result))
    print(f"wrote {', '.join(str(p) for p in paths)}")
    if result["stopped"] and result["stopped"].startswith("interrupted"):
        return 130
    return 0 if result["rows"] else 1
