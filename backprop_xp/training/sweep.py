"""Sweeps: train every combination of some settings, each run in its own folder, and compare.

The unit of work is ``run_one(config, out_dir) -> summary``: a top-level,
picklable function that trains one run exactly as the ``train`` command does
(same files in its folder) and never raises, so a failed or diverged run is
recorded and the sweep goes on. ``run_sweep`` hands these to a pool of
processes on the CPU (or runs them one after another on a GPU, which one run
already fills); a distributed scheduler could submit the same function.

After every finished run the sweep's tables and picture are rewritten
(atomically), so an interrupted sweep loses nothing, and running the same
sweep again into the same folder skips the runs already finished.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import multiprocessing
import os
import signal
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from ..backend import Backend, get_backend
from ..files import atomic_write, interrupt, make_out_dir
from .config import SettingError, TrainConfig
from .run import Diverged, few, train
from .run_files import CHECKPOINT, load_metrics, read_checkpoint

# Settings a sweep may vary (each given as a comma-separated list on the command line).
SWEPT = ("hidden", "lr", "batch_size", "activation", "momentum", "weight_decay", "lr_schedule", "optimizer")
# the distortions' strengths (with --augment), and the seed: one run per seed trains a committee's members
SWEPT += ("augment_shift", "augment_rotation", "augment_scale", "elastic_alpha", "elastic_sigma", "seed")
SWEPT += ("preprocess",)  # members trained on differently preprocessed digits make different mistakes
_SHORT = {
    "hidden": "h",
    "lr": "lr",
    "batch_size": "b",
    "activation": "",
    "momentum": "m",
    "weight_decay": "wd",
    "lr_schedule": "",
    "optimizer": "",
    "augment_shift": "shift",
    "augment_rotation": "rot",
    "augment_scale": "scale",
    "elastic_alpha": "alpha",
    "elastic_sigma": "sigma",
    "seed": "s",
    "preprocess": "",
}
SWEEP_VAL_SIZE = 5000  # training images held out (seeded by --seed: the same within a seed) to rank the runs by
DONE = ("finished", "diverged")  # a deterministic run that diverged would diverge again: not retried
SUMMARY_FIELDS = (
    "name", "status", "val_accuracy", "best_val_accuracy", "best_val_epoch", "test_accuracy", "test_loss", "train_loss",
    "epochs_done",
    "seconds_per_epoch", "train_seconds", *SWEPT, "epochs", "backend_used", "error",
)  # fmt: skip


def grid(base: dict[str, Any], options: dict[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of ``options`` on top of ``base``, in a stable order.

    >>> [(c["hidden"], c["lr"]) for c in grid({"epochs": 1}, {"hidden": [32, 64], "lr": [0.1]})]
    [(32, 0.1), (64, 0.1)]
    """
    keys = list(options)
    return [{**base, **dict(zip(keys, values))} for values in itertools.product(*(options[k] for k in keys))]


def sweep_settings(given: dict[str, Any]) -> tuple[TrainConfig, dict[str, list[Any]]]:
    """The settings of a sweep, split: the base config, and the lists of values of the swept settings given.

    A sweep holds out ``SWEEP_VAL_SIZE`` training images unless ``given`` says
    otherwise: it chooses settings on held-out training images, never on the test set.

    >>> base, options = sweep_settings({"hidden": [8, 16], "epochs": 2})
    >>> base.epochs, base.val_size, options
    (2, 5000, {'hidden': [8, 16]})
    """
    given = {"val_size": SWEEP_VAL_SIZE, **given}
    options = {name: given.pop(name) for name in SWEPT if name in given}
    return TrainConfig(**given), options


def resolve_backend(base: TrainConfig) -> Backend:
    """The backend of a sweep's runs, resolved once, here: ``base.backend`` becomes its name ("auto" what it chose).

    Workers then do not each probe CUDA.
    """
    backend = get_backend(base.backend)
    base.backend = backend.name
    return backend


def plan_runs(base: TrainConfig, options: dict[str, list[Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """The config of every run (each combination of ``options`` on ``base``), each checked, and their folder names.

    SettingError names the first setting of a run that cannot work.
    """
    d = base.to_dict()
    configs = grid(d, {name: options.get(name, [d[name]]) for name in SWEPT})
    for config in configs:
        TrainConfig.from_dict(config).validate()
    varied = [name for name in SWEPT if len(options.get(name, [])) > 1]
    return configs, run_names(configs, varied)


def run_name(config: dict[str, Any], varied: Sequence[str], *, exact: bool = False) -> str:
    """A folder name saying what differs: always hidden size, lr and batch, plus what else varies.

    Numbers are written short (``:g``, 6 digits), or with every digit they need (``exact``).

    >>> run_name({"hidden": 128, "lr": 0.1, "batch_size": 32, "activation": "tanh"}, ["activation"])
    'h128-lr0.1-b32-tanh'
    """
    shown = ["hidden", "lr", "batch_size"] + [
        k for k in SWEPT if k in varied and k not in ("hidden", "lr", "batch_size")
    ]
    number = repr if exact else (lambda v: f"{v:g}")
    return "-".join(
        f"{_SHORT[k]}{number(config[k])}" if isinstance(config[k], float) else f"{_SHORT[k]}{config[k]}" for k in shown
    )


def run_names(configs: Sequence[dict[str, Any]], varied: Sequence[str]) -> list[str]:
    """One distinct ``run_name`` per config: the short names, unless two of them coincide (lr 0.1 and 0.1000001).

    >>> run_names([{"hidden": 8, "lr": lr, "batch_size": 32} for lr in (0.1, 0.1000001)], ["lr"])
    ['h8-lr0.1-b32', 'h8-lr0.1000001-b32']
    """
    for exact in (False, True):
        names = [run_name(config, varied, exact=exact) for config in configs]
        if len(set(names)) == len(names):
            return names
    raise ValueError(f"two runs of this sweep would share a folder: {sorted(n for n in names if names.count(n) > 1)}")


def summarize(name: str, config: dict[str, Any], metrics: dict[str, Any] | None, error: str = "") -> dict[str, Any]:
    """One row of sweep.csv from a run's metrics (None when the run never wrote any)."""
    rows = (metrics or {}).get("epochs", [])
    status = (metrics or {}).get("status", "failed")
    if error:
        status = "failed" if status != "diverged" else status
    summary: dict[str, Any] = {"name": name, "status": status, "epochs_done": len(rows), "error": error}
    summary.update({k: config.get(k) for k in (*SWEPT, "epochs")})
    summary["backend_used"] = (metrics or {}).get("config", {}).get("backend_used", "")
    if rows:
        last = rows[-1]
        final = (metrics or {}).get("final") or last  # the model kept (--keep-best) once the run is finished
        seconds = sum(row["seconds"] for row in rows)
        summary.update(
            test_accuracy=final["test_accuracy"],  # reported, never ranked by: the test set chooses nothing
            test_loss=final["test_loss"],
            train_loss=last["train_loss"],
            seconds_per_epoch=seconds / len(rows),
            train_seconds=seconds,
        )
        if "val_accuracy" in last:
            best = max(rows, key=lambda row: (row["val_accuracy"], -row["epoch"]))
            # The model kept (--keep-best: its best epoch) is what the test column measured, so rank by its epoch too.
            kept_epoch = ((metrics or {}).get("final") or {}).get("epoch_kept")
            kept = next((row for row in rows if row["epoch"] == kept_epoch), last)
            summary.update(
                val_accuracy=kept["val_accuracy"], best_val_accuracy=best["val_accuracy"], best_val_epoch=best["epoch"]
            )
    if status == "diverged" and not error:
        d = metrics.get("diverged", {})
        where = f"epoch {d.get('epoch')}, step {d['step']}" if d.get("step") is not None else f"epoch {d.get('epoch')}"
        summary["error"] = f"diverged at {where}" + (f": {d['reason']}" if d.get("reason") else "")
    return summary


def _finished(config: dict[str, Any], out_dir: str) -> dict[str, Any] | None:
    """The run's metrics if ``out_dir`` holds this very run, already done; else None."""
    try:
        metrics = load_metrics(out_dir)
    except (OSError, ValueError):
        return None
    if not metrics or metrics.get("status") not in DONE:
        return None
    saved = TrainConfig.from_dict(metrics.get("config", {}))  # settings added since then take their defaults
    wanted = TrainConfig.from_dict(config)
    if any(getattr(saved, k) != getattr(wanted, k) for k in TrainConfig.MATH_FIELDS):
        return None
    return metrics


def check_sweep_folder(configs: Sequence[dict[str, Any]], names: Sequence[str], out: str | os.PathLike) -> None:
    """SettingError, before anything is trained, if ``out`` holds runs of a sweep with other settings.

    Such runs are somebody's results: a sweep that trained over them (or
    failed on each of them) would rewrite sweep.md, sweep.csv and sweep.png
    with its own rows. The message names the runs and the settings that differ.
    """
    wanted = dict(zip(names, configs))
    differ: dict[str, list[str]] = {}  # setting -> runs
    for name, config in wanted.items():
        saved = _saved_config(Path(out) / name)
        if saved is None:
            continue
        want = TrainConfig.from_dict(config)
        for field in TrainConfig.MATH_FIELDS:
            if getattr(saved, field) != getattr(want, field):
                setting = (
                    f"--{field.replace('_', '-')} {getattr(want, field)} (the runs there have {getattr(saved, field)})"
                )
                differ.setdefault(setting, []).append(name)
    if differ:
        runs = sorted({name for names_ in differ.values() for name in names_})
        raise SettingError(
            f"{out} holds runs of a sweep with other settings ({few(runs)}): this sweep asks for "
            f"{'; '.join(differ)}; sweep into another --out, or give the settings of the sweep there"
        )
    # Runs this sweep does not have (another --lr list, say) would lose their rows in the tables it rewrites.
    folders = sorted(p for p in Path(out).iterdir() if p.is_dir()) if Path(out).is_dir() else []
    others = [p.name for p in folders if p.name not in wanted and _saved_config(p) is not None]
    if others:
        raise SettingError(
            f"{out} holds runs that this sweep does not have ({few(others)}), whose rows its sweep.md would "
            "lose: sweep into another --out, or give the settings of the sweep there"
        )


def _saved_config(run_dir: Path) -> TrainConfig | None:
    """The settings of the run in ``run_dir`` (from its metrics, else its checkpoint), or None if it holds none."""
    try:
        metrics = load_metrics(run_dir)
        if metrics and isinstance(metrics.get("config"), dict):
            return TrainConfig.from_dict(metrics["config"])
        if (run_dir / CHECKPOINT).is_file():
            return read_checkpoint(run_dir)[0]
    except (OSError, ValueError, TypeError):
        return None  # unreadable: run_one records it failed, naming the file
    return None


def run_one(config: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """Train one run of a sweep into ``out_dir`` (as ``train --out`` would); return its summary.

    Never raises: a divergence or an error becomes ``status`` "diverged" or
    "failed" with the message in ``error`` (and the traceback in
    ``out_dir/error.txt``). A run already finished in ``out_dir`` is not
    trained again; a run interrupted there is resumed from its checkpoint.
    """

    name = os.path.basename(os.path.normpath(out_dir))
    done = _finished(config, out_dir)
    if done is not None:
        return {**summarize(name, config, done), "skipped": True}
    os.makedirs(out_dir, exist_ok=True)
    error = ""
    with open(os.path.join(out_dir, "train.log"), "a") as log:

        def echo(line: str) -> None:
            log.write(line + "\n")
            log.flush()

        try:
            cfg = TrainConfig.from_dict(config)
            # A run already there with other settings (another sweep into the same --out) is refused by
            # train, naming them: it is somebody's result, not a stale file to start over from.
            resume = os.path.exists(os.path.join(out_dir, CHECKPOINT))
            if resume and (done := read_checkpoint(out_dir)[0].epochs) != cfg.epochs:
                # train would extend it, with its schedule recomputed: not the run of this sweep's --epochs
                raise SettingError(
                    f"{out_dir} holds a run of {done} epochs, this sweep asks for {cfg.epochs}: sweep into another "
                    f"--out, or extend it with: backprop-xp train --resume {out_dir} --epochs {cfg.epochs}"
                )
            train(cfg, out_dir, resume=resume, echo=echo, progress=False)
        except Diverged as exc:
            echo(str(exc))
            where = f"epoch {exc.epoch}, step {exc.step}" if exc.step is not None else f"epoch {exc.epoch}"
            error = f"diverged at {where}: {exc.reason} (lr {exc.lr:g})"
        except Exception as exc:  # recorded, never fatal to the sweep
            error = f"{type(exc).__name__}: {exc}"
            echo(error)
            with open(os.path.join(out_dir, "error.txt"), "w") as f:
                f.write(traceback.format_exc())
    try:
        metrics = load_metrics(out_dir)
    except (OSError, ValueError):
        metrics = None
    return {**summarize(name, config, metrics, error), "skipped": False}


def write_tables(out: Path, summaries: list[dict[str, Any]], *, title: str = "Sweep") -> None:
    """sweep.csv (every run), sweep.md (ranked by validation accuracy) and sweep.png, atomically."""
    from .. import plots  # matplotlib: imported when a picture is drawn, not with the package

    ranked = sorted(summaries, key=lambda s: (_score(s) is None, -(_score(s) or 0.0)))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=SUMMARY_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(ranked)
    with atomic_write(out / "sweep.csv") as f:
        f.write(text.getvalue())
    with atomic_write(out / "sweep.md") as f:
        f.write(markdown_table(ranked))
    runs = []
    for s in ranked:
        metrics = load_metrics(out / s["name"]) if s.get("epochs_done") else None
        if metrics and metrics.get("epochs"):
            runs.append({"name": s["name"], "epochs": metrics["epochs"]})
    if runs:
        plots.sweep_plot(runs, out / "sweep.png", title=title)


def _score(summary: dict[str, Any]) -> float | None:
    """What runs are ranked by: the final validation accuracy (test accuracy only for a sweep without validation)."""
    if summary.get("val_accuracy") is not None:
        return summary["val_accuracy"]
    return summary.get("test_accuracy")


def markdown_table(ranked: list[dict[str, Any]]) -> str:
    """The sweep as a Markdown table, in the order given (best validation accuracy first).

    >>> print(markdown_table([{"name": "h8-lr0.1-b32", "status": "finished", "hidden": 8, "lr": 0.1,
    ...     "batch_size": 32, "activation": "relu", "momentum": 0.9, "weight_decay": 0.0, "epochs_done": 1,
    ...     "val_accuracy": 0.91, "best_val_accuracy": 0.91, "best_val_epoch": 1, "test_accuracy": 0.9,
    ...     "seconds_per_epoch": 1.25, "train_seconds": 1.25}]))
    | run | hidden | lr | batch | activation | momentum | weight decay | epochs | val acc. (%) | best val (%) (epoch) | test acc. (%) | s/epoch | status |
    | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |
    | h8-lr0.1-b32 | 8 | 0.1 | 32 | relu | 0.9 | 0 | 1 | 91.00 | 91.00 (1) | 90.00 | 1.25 | finished |
    <BLANKLINE>
    """
    header = (
        "| run | hidden | lr | batch | activation | momentum | weight decay | epochs | val acc. (%) | best val (%) (epoch) "
        "| test acc. (%) | s/epoch | status |\n"
    )
    header += "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n"

    def pct(v: Any) -> str:
        return f"{100 * v:.2f}" if v is not None else "–"

    lines = []
    for s in ranked:
        status = s["status"] if not s.get("error") or s["status"] == "finished" else f"{s['status']}: {s['error']}"
        status = status.replace("|", "/").replace("\n", " ")[:120]
        spe = s.get("seconds_per_epoch")
        best_val = (
            f"{pct(s['best_val_accuracy'])} ({s['best_val_epoch']})" if s.get("best_val_accuracy") is not None else "–"
        )
        lines.append(
            f"| {s['name']} | {s['hidden']} | {s['lr']:g} | {s['batch_size']} | {s['activation']} | {s['momentum']:g} | "
            f"{s['weight_decay']:g} | {s.get('epochs_done', 0)} | {pct(s.get('val_accuracy'))} | {best_val} | "
            f"{pct(s.get('test_accuracy'))} | {seconds(spe) if spe is not None else '–'} | {status} |"
        )
    return header + "\n".join(lines) + "\n"


def seconds(value: float) -> str:
    """A duration in seconds to three significant digits, however short: a tiny run's epoch is not "0.0".

    >>> seconds(1.25), seconds(0.0123), seconds(12.345), seconds(1234.5)
    ('1.25', '0.0123', '12.3', '1234')
    """
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


@contextlib.contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """Give processes started inside this block ``n`` BLAS/OpenMP threads each.

    A spawned worker reads these variables when it first imports NumPy, so
    setting them here (and restoring them after) caps the threads of every
    worker without touching this process's already loaded BLAS.
    """
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")
    old = {k: os.environ.get(k) for k in names}
    os.environ.update({k: str(n) for k in names})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def pending_runs(
    configs: list[dict[str, Any]], names: list[str], out: Path, *, echo: Callable[[str], None], title: str
) -> tuple[dict[str, dict[str, Any]], list[tuple[dict[str, Any], str]]]:
    """Summaries of the runs already done in ``out`` (tables rewritten), and the (config, name) runs still to train."""
    summaries: dict[str, dict[str, Any]] = {}
    todo = []
    for config, name in zip(configs, names):
        done = _finished(config, str(out / name))
        if done is not None:
            summaries[name] = summarize(name, config, done)
            echo(f"[{len(summaries)}/{len(configs)}] {name}: already {done['status']}, skipped")
        else:
            todo.append((config, name))
    if summaries:
        write_tables(out, list(summaries.values()), title=title)
    return summaries, todo


def record_run(
    summaries: dict[str, dict[str, Any]], summary: dict[str, Any], total: int, out: Path, *,
    echo: Callable[[str], None], title: str,
) -> None:  # fmt: skip
    """Keep a finished run's summary, say how it went (and on which worker, if any), rewrite the tables."""
    summaries[summary["name"]] = summary
    acc, val = summary.get("test_accuracy"), summary.get("val_accuracy")
    detail = (
        f"test accuracy {100 * acc:.2f}%, {seconds(summary['seconds_per_epoch'])} s/epoch" if acc is not None else ""
    )
    if val is not None:
        detail = f"val accuracy {100 * val:.2f}%, " + detail
    if summary["status"] != "finished":
        detail = f"{summary['status']}: {summary['error']}" + (f" ({detail})" if detail else "")
    where = f" [{summary['worker']}]" if summary.get("worker") else ""
    echo(f"[{len(summaries)}/{total}] {summary['name']}: {detail}{where}")
    write_tables(out, list(summaries.values()), title=title)


# --- a worker process of a parallel sweep, and how it stops
_worker = {"running": False, "stopping": False}


def _worker_start() -> None:
    """Pool initializer: SIGINT and SIGTERM stop this worker's run in progress, and it starts no other."""
    signal.signal(signal.SIGINT, _worker_stop)
    signal.signal(signal.SIGTERM, _worker_stop)


def _worker_stop(signum: int, frame: Any) -> None:
    # Once only: the terminal's Ctrl-C and the sweep's SIGTERM both arrive, and the second must not
    # cut short the first's bookkeeping (metrics.json saying "interrupted").
    if _worker["stopping"]:
        return
    _worker["stopping"] = True
    if _worker["running"]:  # between runs (waiting for the next) there is nothing to interrupt
        interrupt(signum, frame)  # the run records "interrupted"; its checkpoint resumes it


def _worker_run(config: dict[str, Any], out_dir: str) -> dict[str, Any]:
    if _worker["stopping"]:
        raise KeyboardInterrupt  # a run already queued when the sweep was interrupted: not started
    _worker["running"] = True
    try:
        return run_one(config, out_dir)
    finally:
        _worker["running"] = False


def run_sweep(
    configs: list[dict[str, Any]],
    names: list[str],
    out: str | os.PathLike,
    *,
    jobs: int = 1,
    echo: Callable[[str], None] = print,
    title: str = "Sweep",
) -> list[dict[str, Any]]:
    """Train every config into ``out/<name>``; rewrite the tables after each run; return the summaries.

    ``jobs > 1`` trains that many runs at once in spawned processes (CPU only:
    the caller passes 1 for a GPU), each with ``cores // jobs`` BLAS threads.
    """
    check_sweep_folder(configs, names, out)
    out = Path(make_out_dir(out))
    summaries, todo = pending_runs(configs, names, out, echo=echo, title=title)

    def finished(summary: dict[str, Any]) -> None:
        record_run(summaries, summary, len(configs), out, echo=echo, title=title)

    try:
        train_runs(todo, out, jobs, finished)
    except KeyboardInterrupt:  # the runs interrupted get their rows too (status "interrupted"), then it goes on up
        record_interrupted(summaries, configs, names, out, title=title)
        raise
    return [summaries[name] for name in names if name in summaries]


def train_runs(
    todo: list[tuple[dict[str, Any], str]], out: Path, jobs: int, finished: Callable[[dict[str, Any]], None]
) -> None:
    """Train the (config, name) runs into ``out/<name>``, ``jobs`` at a time, passing each summary to ``finished``."""
    # With jobs > 1 even a lone run goes to a worker: its BLAS threads (cores // jobs) are those of the
    # sweep's other runs, and a run resumed with other threads would not end bit for bit as it would have.
    if jobs <= 1:
        for config, name in todo:
            finished(run_one(config, str(out / name)))
    else:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        context = multiprocessing.get_context("spawn")
        others = set(multiprocessing.active_children())
        with blas_threads(threads), ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_start) as pool:
            try:
                futures = {pool.submit(_worker_run, config, str(out / name)): (config, name) for config, name in todo}
                for future in as_completed(futures):
                    config, name = futures[future]
                    try:
                        summary = future.result()
                    except Exception as exc:  # the worker process itself died (killed, out of memory)
                        summary = summarize(name, config, load_metrics(out / name), f"worker process failed: {exc}")
                    finished(summary)
            except KeyboardInterrupt:
                # Ctrl-C in a terminal reaches the workers too; a SIGTERM to this process alone does not,
                # and leaving the pool would otherwise wait for every run in progress to end.
                pool.shutdown(wait=False, cancel_futures=True)
                workers = set(multiprocessing.active_children()) - others  # the pool's
                for worker in workers:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(worker.pid, signal.SIGTERM)
                for worker in workers:  # each stops at its next step, its metrics saying "interrupted"
                    worker.join(timeout=30)
                raise


def record_interrupted(
    summaries: dict[str, dict[str, Any]], configs: list[dict[str, Any]], names: list[str], out: Path, *, title: str
) -> None:
    """Add the rows of the runs an interrupt stopped (those that wrote metrics) and rewrite the tables."""
    for config, name in zip(configs, names):
        if name in summaries:
            continue
        try:
            metrics = load_metrics(out / name)
        except (OSError, ValueError):
            continue
        if metrics is not None:
            summaries[name] = summarize(name, config, metrics)
    if summaries:
        write_tables(out, list(summaries.values()), title=title)


def interrupted_runs(names: Sequence[str], out: str | os.PathLike) -> list[str]:
    """The runs of a sweep in ``out`` whose metrics say "interrupted" (a rerun of the sweep resumes them)."""
    found = []
    for name in names:
        with contextlib.suppress(OSError, ValueError):
            if (load_metrics(Path(out) / name) or {}).get("status") == "interrupted":
                found.append(name)
    return found
