"""The run: start one worker per engine, time interleaved rounds, and turn the rounds into rows.

Order of a run:

1. Every worker starts at once and says whether its engine can run here
   (``missing`` engines are listed with the reason, never an error) and
   loads the data, all before any timing.
2. First epochs: every engine at every shape trains one epoch; its time is
   reported on its own (it holds compilation, allocation, graph capture).
3. Rounds: each round times one repetition of every workload of every
   engine at every shape, shape by shape, the engines in an order rotated
   by one every round, so that a machine busy for a moment slows all of
   them alike and no engine is always first. A round is not started when
   the previous one says it would end past the time budget (at least one
   round always runs).
4. Test accuracy of every engine at every shape, after its epochs.

``summarize`` turns the recorded rounds into the table's rows; it is a pure
function of the rounds, so the numbers in ``bench.json`` can be checked
against the table they produced.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .engines import (
    DEFAULT_ENGINES,
    DEFAULT_OPTIMIZER,
    ENGINES,
    OPTIMIZERS,
    TORCH_ENGINES,
    describe_optimizer,
    device_of,
)
from .worker import Worker, WorkerDied

OPENBLAS_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
WORKLOADS = ("epoch", "step", "infer")  # the table's order
DEFAULT_THREADS = 1
# Seconds between one engine's timed job and the next: after a call, OpenBLAS's, OpenMP's (PyTorch, KMP_BLOCKTIME
# 200 ms) and XLA's idle threads spin for a while, in their own process, and took the cores from the next engine
# timed (ours at 2 threads: 197 ms an epoch interleaved, 66 ms alone; bench/NOTES.md, issue 27).
SETTLE_S = 0.25


@dataclass
class Settings:
    """What to run. ``epochs`` is the number of timed rounds (each engine trains one more: the first epoch)."""

    hidden: list[int] = field(default_factory=lambda: [128, 800])
    batch_sizes: list[int] = field(default_factory=lambda: [32, 128, 4096])
    engines: list[str] = field(default_factory=lambda: list(DEFAULT_ENGINES))
    epochs: int = 3
    optimizer: str = DEFAULT_OPTIMIZER  # a key of engines.OPTIMIZERS: every engine trains with this rule
    budget_s: float = 180.0
    # One thread per engine by default: on a machine where anything else runs, a BLAS call split over every core
    # waits for whichever thread was descheduled, and the numbers swing (issue 24: a 2-thread run under load ranked
    # scikit-learn above ours, a 1-thread run the other way round). ``threads_from`` says which it was.
    threads: int = DEFAULT_THREADS
    threads_from: str = "default"  # "default" or "--threads"
    data_dir: str | None = None
    train_size: int = 0  # 0: every training image
    random_samples: int = 0  # > 0: random MNIST-shaped data instead of MNIST (no accuracy); compare.py
    workloads: tuple[str, ...] = ("epoch",)  # compare.py adds "step" and "infer" (CPU engines only)
    clock: str = "wall"  # "cpu": the CPU engines time with their thread's CPU time (compare.py --clock cpu)
    command: str = "backprop-xp bench"

    def data_args(self) -> list[str]:
        if self.random_samples:
            return ["--random", str(self.random_samples)]
        args = ["--train-size", str(self.train_size)]
        return args + (["--data-dir", self.data_dir] if self.data_dir else [])


def machine() -> dict[str, Any]:
    """The CPU, its cores and what else shapes CPU timings here (load, OpenBLAS variables)."""
    return {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "load_average_start": _load(),
        # Left as the user has them (they can make OpenBLAS pick slower kernels); recorded, never changed.
        "openblas_env": {name: os.environ[name] for name in OPENBLAS_VARIABLES if name in os.environ},
    }


def load_warning(load: list[float] | None, cores: int, threads: int) -> str | None:
    """One line when the machine is too busy for ``threads`` threads per engine, else None.

    Busy means the 1-minute load average leaves fewer free cores than the
    threads asked for, with half a core of slack (load counts runnable
    processes: each one keeps about a core busy).

    >>> load_warning([0.3, 0.2, 0.1], cores=2, threads=2) is None
    True
    >>> load_warning([1.2, 1.0, 0.9], cores=2, threads=2)
    'the machine is loaded: load average 1.2 on 2 cores leaves about 0.8 free for 2 thread(s) per engine; timings will be noisy'
    >>> load_warning([1.2, 1.0, 0.9], cores=2, threads=1) is None
    True
    """
    if not load:
        return None
    free = cores - load[0]
    if threads <= free + 0.5:
        return None
    return (
        f"the machine is loaded: load average {load[0]:.1f} on {cores} cores leaves about {max(free, 0):.1f} free "
        f"for {threads} thread(s) per engine; timings will be noisy"
    )


def _load() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _shape_name(hidden: int, batch: int) -> str:
    return f"784-{hidden}-10 batch {batch}"


def run(
    settings: Settings, echo: Callable[[str], None] = print, on_round: Callable[[dict], None] | None = None
) -> dict[str, Any]:
    """Run the benchmark; return everything it measured (``bench.json``'s content).

    Ctrl-C stops it where it is: the result then has ``stopped`` set and holds
    every round finished so far. ``on_round(result)`` is called after the
    first epochs and after every round (the command writes its files there,
    so a run cut short still leaves them).
    """
    result: dict[str, Any] = {
        "command": settings.command,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        # The optimizer's name is in the settings; its hyperparameters beside it (lr, momentum or betas and eps).
        "settings": {**asdict(settings), **OPTIMIZERS[settings.optimizer], "dtype": "float32"},
        "machine": machine(),
        "engines": {},
        "missing": {},
        "first_epochs": [],
        "rounds": [],
        "accuracy": [],
        "errors": [],
        "stopped": None,
        "complete": False,
    }
    m = result["machine"]
    m["load_warning"] = load_warning(m["load_average_start"], m["cores"] or 1, settings.threads)
    if m["load_warning"]:
        echo(f"warning: {m['load_warning']}")
    started = time.perf_counter()
    workers: dict[str, Worker] = {}
    interrupted = False
    try:
        _start(settings, result, workers, echo)
        if not workers:
            echo("no engine can run here: nothing to measure")
            return _finish(result, started)
        failed: set[tuple[str, int, int]] = set()  # (engine, hidden, batch) that raised: not asked again
        shapes = [(h, b) for h in settings.hidden for b in settings.batch_sizes]
        _first_epochs(shapes, workers, result, failed, echo)
        if on_round:
            on_round(_finish(result, started))
        last_round = 0.0
        for r in range(1, settings.epochs + 1):
            elapsed = time.perf_counter() - started
            if r > 1 and elapsed + last_round > settings.budget_s:
                result["stopped"] = (
                    f"budget: {r - 1} of {settings.epochs} rounds done in {elapsed:.0f} s; another would pass "
                    f"--budget-s {settings.budget_s:g}"
                )
                echo(f"stopping: {result['stopped']}")
                break
            round_start = time.perf_counter()
            _timed_round(r, settings, shapes, workers, result, failed, echo)
            last_round = time.perf_counter() - round_start
            if on_round:
                on_round(_finish(result, started))
        _accuracies(shapes, workers, result, failed, echo)
        result["complete"] = result["stopped"] is None
    except KeyboardInterrupt:
        interrupted = True
        result["stopped"] = "interrupted (Ctrl-C or SIGTERM): the rounds finished before it are kept"
    finally:
        for worker in workers.values():
            worker.close(now=interrupted)
    return _finish(result, started)


def _first_epochs(shapes: list, workers: dict, result: dict, failed: set, echo: Callable[[str], None]) -> None:
    """Every engine's first epoch at every shape (compilation, allocation), reported on its own."""
    for hidden, batch in shapes:
        for name in list(workers):
            answer = _ask(workers, name, result, echo, "first", hidden=hidden, batch=batch)
            if answer is not None and answer.get("compile_failed"):  # listed as not run, like a missing library
                result["missing"][name] = f"{answer['error']} (at {_shape_name(hidden, batch)})"
                echo(f"{name}: not available: {result['missing'][name]}")
                workers.pop(name).close()
                continue
            if answer is None or "error" in answer:
                failed.add((name, hidden, batch))
                _error(result, echo, name, hidden, batch, "first epoch", answer)
                continue
            result["first_epochs"].append({"engine": name, "hidden": hidden, "batch": batch, **answer})
            compiled = f", compiled in {answer['compile_s']:.2f} s" if "compile_s" in answer else ""
            echo(f"first epoch   {_shape_name(hidden, batch):24s} {name:17s} {answer['seconds']:8.3f} s"
                 f"  (built in {answer['build_seconds']:.2f} s{compiled})")  # fmt: skip


def _timed_round(
    r: int, settings: Settings, shapes: list, workers: dict, result: dict, failed: set, echo: Callable[[str], None]
) -> None:
    """Round ``r``: every shape on every engine, the engines' order rotated by one each round."""
    order = list(workers)
    order = order[(r - 1) % len(order) :] + order[: (r - 1) % len(order)]
    for hidden, batch in shapes:
        for name in order:
            if name not in workers or (name, hidden, batch) in failed:
                continue
            for workload in settings.workloads:
                if workload != "epoch" and device_of(name) != "cpu":
                    continue
                time.sleep(SETTLE_S)  # the previous engine's idle threads stop spinning before this one is timed
                answer = _ask(
                    workers, name, result, echo, "time", hidden=hidden, batch=batch, workload=workload, epoch=r
                )
                if answer is None or "error" in answer:
                    failed.add((name, hidden, batch))
                    _error(result, echo, name, hidden, batch, f"round {r} {workload}", answer)
                    break
                result["rounds"].append(
                    {"round": r, "engine": name, "hidden": hidden, "batch": batch, "workload": workload, **answer}
                )
                echo(_round_line(r, settings.epochs, name, hidden, batch, workload, answer, result))


def _accuracies(shapes: list, workers: dict, result: dict, failed: set, echo: Callable[[str], None]) -> None:
    """Each engine's test accuracy after its epochs: a fast engine that does not learn is not fast."""
    for hidden, batch in shapes:
        for name in list(workers):
            if (name, hidden, batch) in failed:
                continue
            answer = _ask(workers, name, result, echo, "accuracy", hidden=hidden, batch=batch)
            if answer is not None and "error" not in answer:
                result["accuracy"].append({"engine": name, "hidden": hidden, "batch": batch, **answer})
            else:
                _error(result, echo, name, hidden, batch, "test accuracy", answer)


def _start(settings: Settings, result: dict[str, Any], workers: dict[str, Worker], echo: Callable[[str], None]) -> None:
    """Start every engine's worker at once; keep those that can run, list the others with the reason."""
    started = {
        name: Worker(name, settings.threads, settings.data_args(), settings.clock, settings.optimizer)
        for name in settings.engines
    }
    workers.update(started)
    for name, worker in started.items():
        try:
            first = worker.answer()
        except WorkerDied as exc:
            first = {"failed": str(exc)}
        if "info" in first:
            result["engines"][name] = {"device": device_of(name), "what": ENGINES[name][1], **first["info"]}
            echo(f"{name}: {_describe(first['info'])}")
            continue
        reason = first.get("missing") or f"could not start: {first.get('failed')}"
        result["missing"][name] = reason
        echo(f"{name}: not available: {reason}")
        worker.close()
        del workers[name]
    if workers:
        echo(f"engines: {', '.join(workers)}; {describe_optimizer(settings.optimizer)}; {settings.threads} CPU thread(s) each; "
             f"{next(iter(result['engines'].values()))['data']}")  # fmt: skip


def _describe(info: dict[str, Any]) -> str:
    """One line of versions: the library, its BLAS and the kernel OpenBLAS picked, threads, GPU."""
    parts = [f"NumPy {info['numpy']}"]
    if "blas" in info:
        parts.append(
            f"BLAS {info['blas']} ({info.get('blas_kernel') or '?'} kernels, {info.get('blas_threads') or '?'} threads)"
        )
    if "sklearn" in info:
        parts.append(f"scikit-learn {info['sklearn']}")
    if "torch" in info:
        parts.append(f"PyTorch {info['torch']} ({info['torch_threads']} threads, BLAS {info['torch_blas']})")
    if "jax" in info:
        parts.append(f"JAX {info['jax']} ({info['jax_device']}, threads: {info['jax_threads']})")
    if "cupy" in info:
        parts.append(f"CuPy {info['cupy']}")
    if "gpu" in info:
        parts.append(f"GPU {info['gpu']}")
    return ", ".join(parts)


def _ask(
    workers: dict[str, Worker], name: str, result: dict, echo: Callable[[str], None], job: str, **fields: Any
) -> dict | None:
    """One job; a worker that died is dropped (and listed among the errors), the others go on."""
    try:
        return workers[name].ask(job, **fields)
    except WorkerDied as exc:
        result["errors"].append({"engine": name, "error": str(exc)})
        echo(f"{name}: {exc}; dropping it")
        workers.pop(name).close()
        return None


def _error(
    result: dict, echo: Callable[[str], None], name: str, hidden: int, batch: int, what: str, answer: dict | None
) -> None:
    if answer is None:
        return  # a dead worker, already recorded
    result["errors"].append(
        {"engine": name, "hidden": hidden, "batch": batch, "during": what, "error": answer["error"]}
    )
    echo(f"{name} at {_shape_name(hidden, batch)}: {what} failed: {answer['error']}")


def _round_line(
    r: int, rounds: int, name: str, hidden: int, batch: int, workload: str, answer: dict, result: dict
) -> str:
    n = _samples(result, name, workload, batch)
    return (
        f"round {r}/{rounds}   {_shape_name(hidden, batch):24s} {name:17s} {workload:5s} {answer['seconds']:8.3f} s"
        f"  {n / answer['seconds']:>12,.0f} samples/s   GEMM bound {answer['bound_seconds']:.3f} s"
    )


def _samples(result: dict, name: str, workload: str, batch: int) -> int:
    """Samples in one repetition of a workload: the epoch's, or those of the in-memory batches."""
    from .engines import fixed_batch_count

    n_train = result["engines"][name]["n_train"]
    return n_train if workload == "epoch" else fixed_batch_count(n_train, batch) * batch


def _finish(result: dict[str, Any], started: float) -> dict[str, Any]:
    """Seconds so far, the load now, and the rows of the rounds so far (called after each round and at the end)."""
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["machine"]["load_average_end"] = _load()
    result["rows"] = summarize(result)
    return result


# --------------------------------------------------------------------------- rows


def summarize(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (shape, workload, engine) with at least one timed round, from the rounds alone.

    ``samples_per_s`` is the samples of one repetition over the median of its
    rounds' seconds; ``ratio_to_torch`` is that over the same number of the
    fastest PyTorch engine on the same device at the same shape (1.0 for that
    engine itself; None where no PyTorch engine ran on that device);
    ``fraction_of_bound`` is the median bound time over the median time.
    ``ratio_min`` and ``ratio_max`` are the spread of the same ratio round by
    round (each round's time of that PyTorch engine over this engine's time in
    the same round), so a reader sees how far a noisy machine moved it.
    """
    groups: dict[tuple, list[dict]] = {}
    for m in result["rounds"]:
        groups.setdefault((m["hidden"], m["batch"], m["workload"], m["engine"]), []).append(m)
    first = {(f["engine"], f["hidden"], f["batch"]): f for f in result["first_epochs"]}
    accuracy = {(a["engine"], a["hidden"], a["batch"]): a["test_accuracy"] for a in result["accuracy"]}
    order = {name: i for i, name in enumerate(ENGINES)}
    rows = []
    for (hidden, batch, workload, name), ms in sorted(
        groups.items(), key=lambda kv: (*kv[0][:2], WORKLOADS.index(kv[0][2]), order[kv[0][3]])
    ):
        seconds = [m["seconds"] for m in ms]
        bounds = [m["bound_seconds"] for m in ms]
        n = _samples(result, name, workload, batch)
        median = statistics.median(seconds)
        rows.append(
            {
                "hidden": hidden,
                "batch": batch,
                "workload": workload,
                "engine": name,
                "device": device_of(name),
                "samples": n,
                "rounds": len(seconds),
                "seconds": seconds,
                "median_s": median,
                "min_s": min(seconds),
                "max_s": max(seconds),
                "samples_per_s": n / median,
                "bound_median_s": statistics.median(bounds),
                "fraction_of_bound": statistics.median(bounds) / median,
                "first_epoch_s": first.get((name, hidden, batch), {}).get("seconds") if workload == "epoch" else None,
                "compile_s": first.get((name, hidden, batch), {}).get("compile_s") if workload == "epoch" else None,
                "test_accuracy": accuracy.get((name, hidden, batch)),
                "epochs_trained": 1 + sum(1 for m in ms if m["workload"] == "epoch") if workload == "epoch" else None,
            }
        )
    for row in rows:
        torch_rows = [
            r for r in rows
            if r["engine"] in TORCH_ENGINES and r["device"] == row["device"]
            and (r["hidden"], r["batch"], r["workload"]) == (row["hidden"], row["batch"], row["workload"])
        ]  # fmt: skip
        fastest = max(torch_rows, key=lambda r: r["samples_per_s"], default=None)
        row["torch_reference"] = fastest["engine"] if fastest else None
        row["ratio_to_torch"] = row["samples_per_s"] / fastest["samples_per_s"] if fastest else None
        spread = _round_ratios(groups, row, fastest)
        row["ratio_min"], row["ratio_max"] = (min(spread), max(spread)) if spread else (None, None)
    return rows


def _round_ratios(
    groups: dict[tuple, list[dict]], row: dict[str, Any], reference: dict[str, Any] | None
) -> list[float]:
    """The reference engine's time over this row's, in each round both timed."""
    if reference is None:
        return []
    shape = (row["hidden"], row["batch"], row["workload"])
    theirs = {m["round"]: m["seconds"] for m in groups[(*shape, reference["engine"])]}
    return [theirs[m["round"]] / m["seconds"] for m in groups[(*shape, row["engine"])] if m["round"] in theirs]
