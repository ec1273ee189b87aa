"""One engine's worker process, and the handle the command drives it through.

Each engine runs in its own process (``python -m backprop_xp.speed ENGINE``),
driven one job at a time: one line of JSON in, one line of JSON out. Two
reasons. In one process, OpenBLAS's threads and PyTorch's OpenMP threads each
spin for a while after a call and steal the cores from the other library's
next call (same-process timings swung by 10x on a 2-core machine); and a
user runs one library per program. The thread count is set in the
environment before the process starts (``OPENBLAS_NUM_THREADS``,
``MKL_NUM_THREADS``, ``OMP_NUM_THREADS``), which a BLAS reads when it loads,
and again with threadpoolctl and ``torch.set_num_threads`` once it has.

Jobs: ``probe`` (can this engine run here, and its versions), ``first``
(build the contestant for a shape and time its first epoch: compilation,
allocation, graph capture), ``time`` (one timed repetition of a workload
and its GEMM bound), ``accuracy`` (test accuracy after what was trained).
A job that raises answers ``{"error": ...}`` and the worker goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..backend import error_line
from .compiled import CompileFailed
from .engine_table import Builder, missing_reason
from .engines import DEFAULT_OPTIMIZER, ENGINES, OPTIMIZERS, load_data

THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")


class WorkerDied(RuntimeError):
    """The worker process ended; the message has its exit status."""


class Worker:
    """A running worker process for one engine.

    Parameters
    ----------
    engine : str
        A key of ``ENGINES``.
    threads : int
        CPU threads for the engine's BLAS and PyTorch.
    data_args : list of str
        ``--data-dir D``, ``--train-size N`` or ``--random N`` for the worker.
    clock : {"wall", "cpu"}
        What the CPU engines time with (``cpu``: this thread's CPU time).
    optimizer : str
        A key of ``engines.OPTIMIZERS``: the rule every contestant trains with.
    """

    def __init__(
        self, engine: str, threads: int, data_args: list[str], clock: str = "wall", optimizer: str = DEFAULT_OPTIMIZER
    ) -> None:
        self.engine = engine
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, **{name: str(threads) for name in THREAD_VARIABLES}}
        # The worker imports the very backprop_xp this command runs, installed or not.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
        command = [
            sys.executable,
            "-m",
            "backprop_xp.speed",
            engine,
            "--threads",
            str(threads),
            "--clock",
            clock,
            "--optimizer",
            optimizer,
            *data_args,
        ]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env,
            start_new_session=True,  # Ctrl-C reaches the command, which stops its workers itself
        )  # fmt: skip

    def answer(self) -> dict[str, Any]:
        """The worker's next answer (its first one comes unasked: ``missing``, ``failed`` or ``info``)."""
        try:
            line = self.process.stdout.readline()
        except OSError:
            line = ""
        if not line:
            status = self.process.wait()
            raise WorkerDied(f"the {self.engine} worker ended (exit status {status}; its error is printed above)")
        return json.loads(line)

    def ask(self, job: str, **fields: Any) -> dict[str, Any]:
        """Send one job and wait for its answer; WorkerDied if the process has ended."""
        try:
            self.process.stdin.write(json.dumps({"job": job, **fields}) + "\n")
            self.process.stdin.flush()
        except OSError:
            pass  # a dead worker: answer() says so
        return self.answer()

    def close(self, *, now: bool = False) -> None:
        """End the worker: close its input (it exits), or kill it ``now`` (it may be mid-job)."""
        if self.process.poll() is None:
            try:
                if now:
                    raise OSError("asked to stop now")
                self.process.stdin.close()
                self.process.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()


# --------------------------------------------------------------------------- inside the worker


def _blas_info() -> dict[str, Any]:
    """NumPy's BLAS as threadpoolctl sees it: library, version, the kernel it picked, threads."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return {"blas": "unknown (install threadpoolctl to see it)"}
    import numpy  # noqa: F401 - threadpoolctl only sees libraries already loaded

    found = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    # NumPy's own, where SciPy (imported by scikit-learn) brings a second OpenBLAS: the matrix products go through NumPy.
    blas = next((i for i in found if "numpy" in str(i.get("filepath", ""))), found[0] if found else None)
    if blas is None:
        return {"blas": "unknown (threadpoolctl found no BLAS)"}
    return {
        "blas": f"{blas.get('internal_api', '?')} {blas.get('version', '?')}",
        "blas_kernel": blas.get("architecture"),
        "blas_threading": blas.get("threading_layer"),
        "blas_threads": blas.get("num_threads"),
    }


def _set_threads(threads: int) -> None:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # the environment variables set by the command still apply
        return
    import numpy  # noqa: F401

    threadpool_limits(threads)


def _pin_to_cores(threads: int) -> None:
    """Keep this process on ``threads`` cores: the one thread control XLA obeys.

    XLA's CPU runtime reads no thread variable, and in JAX 0.10 its
    ``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``
    flags still left a matrix product on two threads (CPU time twice the wall
    time); with the process on one core it is one thread. Called before JAX
    is imported; where the OS cannot pin (macOS), ``_jax_cores`` says so.
    """
    if hasattr(os, "sched_setaffinity"):
        allowed = sorted(os.sched_getaffinity(0))
        if threads < len(allowed):
            os.sched_setaffinity(0, allowed[:threads])


def _jax_cores() -> str:
    if not hasattr(os, "sched_getaffinity"):
        return "XLA's own pool (every core: this OS cannot pin a process)"
    cores = sorted(os.sched_getaffinity(0))
    return f"{len(cores)} (the process pinned to core(s) {','.join(map(str, cores))})"


def _engine_info(engine: str, threads: int) -> dict[str, Any]:
    """Versions and settings that make this engine's numbers reproducible."""
    import numpy as np

    from .. import __version__

    info: dict[str, Any] = {"python": platform.python_version(), "numpy": np.__version__, "backprop_xp": __version__}
    if engine in ("numpy", "sklearn"):
        info.update(_blas_info())
    if engine == "numpy":
        from ..cpu import numba_loops

        if numba_loops.enabled() and numba_loops.threads() > 1:
            numba_loops.can_share_pool()  # as the step's first parallel loop would: the report says if the BLAS joined
        info["cpu_step"] = numba_loops.info()  # the [fast] extra's fused loops, or the plain NumPy path
    if engine == "sklearn":
        import sklearn

        info["sklearn"] = sklearn.__version__
    if engine.startswith("torch"):
        import torch

        torch.set_num_threads(threads)
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        config = torch.__config__.show().replace(",", " ").split()
        info["torch_blas"] = next((p.split("=", 1)[1] for p in config if p.startswith("BLAS_INFO=")), "?")
        if torch.backends.mkldnn.is_available():
            info["torch_blas"] += " (+ oneDNN)"
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
            info["torch_cuda"] = torch.version.cuda
    if engine.startswith("jax"):
        import jax

        info["jax"] = jax.__version__
        info["jax_device"] = str(jax.devices("gpu" if engine.endswith("cuda") else "cpu")[0])
        info["jax_threads"] = _jax_cores()
        if engine.endswith("cuda"):
            info["gpu"] = jax.devices("gpu")[0].device_kind
    if engine.startswith("cupy"):
        import cupy as cp

        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        info["gpu"] = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        info["cupy"] = cp.__version__
        info["cuda_runtime"] = cp.cuda.runtime.runtimeGetVersion()
        info["cuda_driver"] = cp.cuda.runtime.driverGetVersion()
    return info


def _serve(engine: str, threads: int, data_args: argparse.Namespace, clock: str, reply: Any, optimizer: str) -> int:
    if engine.startswith("jax") and ENGINES[engine][0] == "cpu":
        _pin_to_cores(threads)
    reason = missing_reason(engine)
    if reason is not None:
        reply({"missing": reason})
        return 0
    _set_threads(threads)
    info = _engine_info(engine, threads)
    data = load_data(data_args.data_dir, data_args.train_size, data_args.random)
    info["data"] = data.source
    info["n_train"] = len(data.x)
    reply({"info": info})
    build = Builder(engine, data, time.thread_time if clock == "cpu" else time.perf_counter, optimizer)
    contestants: dict[tuple[int, int], Any] = {}
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply(_job(request, build, contestants))
        except Exception as exc:  # noqa: BLE001 - one failing shape must not end the engine
            reply({"error": error_line(exc, with_type=True)})
    return 0


def _job(request: dict[str, Any], build: Builder, contestants: dict[tuple[int, int], Any]) -> dict[str, Any]:
    shape = (request["hidden"], request["batch"])
    job = request["job"]
    if job == "first":
        start = time.perf_counter()
        try:
            contestant = contestants[shape] = build(*shape)
        except CompileFailed as exc:  # the runner lists the engine as not run, with this reason
            return {"error": str(exc), "compile_failed": True}
        built = time.perf_counter() - start
        seconds = contestant.epoch(0)
        return {"seconds": seconds, "build_seconds": built, **_notes(contestant)}
    contestant = contestants[shape]
    if job == "time":
        workload, epoch = request["workload"], request.get("epoch", 0)
        seconds = contestant.epoch(epoch) if workload == "epoch" else getattr(contestant, workload)()
        bound = contestant.bound(workload)
        return {"seconds": seconds, "bound_seconds": bound, **_notes(contestant)}
    if job == "accuracy":
        return {"test_accuracy": contestant.test_accuracy()}
    raise ValueError(f"unknown job {job!r}")


def _notes(contestant: Any) -> dict[str, Any]:
    """What a contestant says about how it ran (CuPy's step mode, how its bound was timed)."""
    notes = {}
    step = getattr(contestant, "train_step", None)
    for name in ("mode", "capture_error"):  # our GPU step's own report, where it gives one
        value = getattr(step, name, None)
        if isinstance(value, (str, int, float, bool)):
            notes[f"step_{name}"] = value
    trained_with = _trained_with(contestant)
    if trained_with:
        notes["optimizer"] = trained_with
    if getattr(contestant, "compile_s", None) is not None:  # JAX and torch.compile: compiled when built
        notes["compile_s"] = contestant.compile_s
    if getattr(contestant, "bound_note", None):
        notes["bound_note"] = contestant.bound_note
    return notes


def _trained_with(contestant: Any) -> str | None:
    """The optimizer the contestant's own objects train with, in lower case (``adam``, ``sgd``): what really ran.

    Read from the engine's optimizer object (ours or ``torch.optim``'s class,
    scikit-learn's ``solver``), not from the setting it was given.
    """
    if getattr(contestant, "trained_with", None):
        return contestant.trained_with
    if getattr(contestant, "rule", None) is not None:
        return type(contestant.rule).__name__.lower()
    clf = getattr(contestant, "clf", None)
    return None if clf is None else str(clf.solver)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m backprop_xp.speed", description="one engine of backprop-xp bench (not for people)"
    )
    parser.add_argument("engine", choices=tuple(ENGINES))
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--optimizer", choices=tuple(OPTIMIZERS), default=DEFAULT_OPTIMIZER)
    parser.add_argument("--data-dir")
    parser.add_argument("--train-size", type=int, default=0)
    parser.add_argument("--random", type=int, default=0, help="random MNIST-shaped data of this many examples")
    args = parser.parse_args(argv)
    # The answers go to the original stdout; anything a library prints goes to stderr instead,
    # where it cannot break the protocol.
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the command's to handle

    def reply(message: dict[str, Any]) -> None:
        answers.write(json.dumps(message) + "\n")
        answers.flush()

    try:
        return _serve(args.engine, args.threads, args, args.clock, reply, args.optimizer)
    except Exception as exc:  # noqa: BLE001 - before any job: say why in the answer, then stop
        reply({"failed": error_line(exc, with_type=True)})
        return 1
