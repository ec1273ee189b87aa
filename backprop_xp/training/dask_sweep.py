"""Sweeps on a Dask cluster: the runs of ``sweep``, each trained on whichever worker is free.

A sweep is many independent runs, so spreading it over several machines needs
no new job runner: Dask's distributed scheduler hands each run
(``sweep.run_one``, the same function a local sweep calls) to a worker, and
the client here collects the summaries as they finish and rewrites
sweep.csv/sweep.md/sweep.png after each one, exactly as ``run_sweep`` does.

Choices, and why:

* Outputs go to a shared filesystem. Every worker writes its run into
  ``out/<name>`` itself, so ``out`` must be a folder that every worker sees at
  the same path (NFS, a cluster filesystem, or one machine). That keeps a run's
  folder identical to what ``train`` writes, lets a run interrupted by a dying
  worker be resumed from its checkpoint by another worker, and lets the
  client read each run's metrics for the tables. Before submitting anything
  the client checks that every worker sees ``out``, and says which do not.
* A run whose worker dies is retried once elsewhere, then recorded as failed.
  Worker deaths are counted by the scheduler: a task whose worker died while
  it was assigned there ``allowed-failures + 1`` times ends as KilledWorker.
  The local cluster is started with ``allowed-failures`` 1; a scheduler
  started by hand should be too
  (``DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=1 dask scheduler``; Dask's
  default, 3, retries a run three times), and the sweep says so when it is
  not. A run that raised on its worker (``run_one`` itself never raises, so
  this is the worker's environment: a path it cannot write, a package it
  lacks) is resubmitted once by the client, preferring the other workers.
* At most as many runs are submitted at a time as the workers have threads.
  The scheduler counts a death against every task assigned to the dead
  worker, even those only waiting there; with one run per worker thread, a
  crash only counts against the run that was training, and a worker that
  joins mid-sweep gets the next run.
* The local cluster (``--scheduler local``) gives each worker process
  ``cores // workers`` BLAS threads, like ``run_sweep`` does for its processes.
* Dask cannot cancel a task that is running (it is a thread of the worker),
  so an interrupted sweep asks its workers (``client.run(_stop_runs)``) to
  stop its runs, which they do at the next training step
  (``files.check_interrupt``), each recording "interrupted", and waits for
  their summaries. Otherwise a remote cluster would go on training them,
  and a second sweep into the same folder would train the same runs twice.

A worker uses the backend its config asks for on its own machine: with
``backend="auto"`` a worker with a GPU trains there. One worker per GPU:
``CUDA_VISIBLE_DEVICES=0 dask worker tcp://host:8786 --nworkers 1 --nthreads 1``,
then the same with 1, 2, ... (see docs/sweeps.md).

``distributed`` is an optional dependency (``pip install 'backprop-xp[dask]'``),
imported only inside the functions here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..files import atomic_write, forget_interrupt, interrupt_thread
from .run import plural
from .run_files import load_metrics
from .sweep import blas_threads, pending_runs, record_run, run_one, summarize

MISSING = "--scheduler needs the optional dependency 'distributed': pip install 'backprop-xp[dask]'"
ALLOWED_FAILURES = 1  # worker deaths a run survives: retried once elsewhere, then recorded as failed


def require_distributed() -> Any:
    """The ``distributed`` module, or ModuleNotFoundError saying how to install it."""
    try:
        import distributed
    except ImportError:  # also when sys.modules["distributed"] is None
        raise ModuleNotFoundError(MISSING, name="distributed") from None
    return distributed


class WorkerRunError(Exception):
    """A run raised on a worker (its environment, not the training): which worker, and what."""

    def __init__(self, worker: str, message: str) -> None:
        super().__init__(worker, message)
        self.worker = worker
        self.message = message

    def __str__(self) -> str:
        return f"{self.message} (on worker {self.worker})"


# On a worker: the runs of this process in progress, by task key, and the keys asked to stop.
_training: dict[str, int] = {}  # task key -> threading.get_ident() of the thread training it
_stopped: set[str] = set()  # keys that _stop_runs reached, started or not (task keys are never reused)


def _run_on_worker(config: dict[str, Any], out_dir: str, key: str) -> dict[str, Any]:
    """``run_one`` on a Dask worker; the summary says which worker trained it.

    A run that ``_stop_runs`` interrupts records "interrupted" (its checkpoint
    resumes it); one stopped before it began is not started.
    """
    from distributed import get_worker

    where = get_worker().address
    forget_interrupt()  # a stop meant for this thread's previous task, which ended as it came
    _training[key] = threading.get_ident()  # first, so that a _stop_runs from now on finds it
    try:
        if key in _stopped:  # stopped while it waited for this thread
            return {"name": os.path.basename(out_dir), "status": "not started", "epochs_done": 0, "worker": where}
        summary = run_one(config, out_dir)
    except KeyboardInterrupt:  # _stop_runs: train() has written "interrupted"
        summary = summarize(os.path.basename(out_dir), config, load_metrics(out_dir))
    except Exception as exc:  # outside run_one's own net: the folder could not be made or written
        raise WorkerRunError(where, f"{type(exc).__name__}: {exc}") from None
    finally:
        del _training[key]
        forget_interrupt()  # a stop that came after the run's last check must not hit this thread's next task
    return {**summary, "worker": where}


def _stop_runs(keys: list[str]) -> list[str]:
    """On a worker (``client.run``): stop the runs of these task keys at their next step; the keys it was training."""
    _stopped.update(keys)
    stopping = []
    for key in keys:
        ident = _training.get(key)  # the run's thread may be deleting it right now
        if ident is not None:
            interrupt_thread(ident)
            stopping.append(key)
    return stopping


def dask_setup(worker: Any) -> None:
    """Dask's preload hook, for the workers of a local cluster: SIGINT and SIGTERM stop their runs, not them.

    A terminal's Ctrl-C, and a job scheduler's SIGTERM to the process group,
    reach the local cluster's worker processes as well as the sweep. Left to
    Dask, a worker's event loop would die at once, and with it the summaries
    of its runs, while the runs themselves (on other threads) trained on until
    the worker was killed mid-epoch. With this, each worker stops its runs at
    their next step, as the sweep asks it to, and stays up until the sweep
    closes the cluster.
    """
    if threading.current_thread() is threading.main_thread():  # where Dask runs it; only there can it set handlers
        signal.signal(signal.SIGINT, _stop_own_runs)
        signal.signal(signal.SIGTERM, _stop_own_runs)


def _stop_own_runs(signum: int, frame: Any) -> None:
    _stop_runs(list(_training))


def _sees(marker: str) -> tuple[bool, str]:
    """On a worker: whether it sees the client's marker file, and its backprop_xp version."""
    from .. import __version__

    return os.path.exists(marker), __version__


@contextlib.contextmanager
def _environ_kept() -> Iterator[None]:
    """Undo every change to ``os.environ`` made inside the block.

    A local cluster's nannies live in this process and set variables here
    before spawning each worker (BLAS threads, PYTHONHASHSEED...); they should
    not outlive the cluster.
    """
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def connect(scheduler: str, *, workers: int = 1, timeout: float = 30.0) -> Iterator[Any]:
    """A ``distributed.Client`` for ``scheduler``: an address, or "local" for a new local cluster.

    Parameters
    ----------
    scheduler : str
        ``tcp://host:port`` of a running ``dask scheduler``, or "local" to
        start a ``LocalCluster`` on this machine for the duration of the block.
    workers : int
        Worker processes of the local cluster (one thread each); ignored for
        an address.
    timeout : float
        Seconds to wait for the scheduler to answer.

    Raises
    ------
    ModuleNotFoundError
        ``distributed`` is not installed (the message says how to install it).
    ConnectionError
        Nothing answered at the address.
    """
    distributed = require_distributed()
    if scheduler != "local":
        try:
            client = distributed.Client(scheduler, timeout=timeout)
        except OSError as exc:  # TimeoutError, refused connection, unknown host
            raise ConnectionError(f"cannot reach the Dask scheduler at {scheduler!r}: {exc}") from None
        with client:
            yield client
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    with _environ_kept(), blas_threads(threads):  # read by each nanny before it spawns its worker
        cluster = distributed.LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            preload=[__name__],  # dask_setup: a Ctrl-C reaching the workers stops their runs, not them
            # any free port for the scheduler's HTTP endpoints, which it starts even without a dashboard
            scheduler_kwargs={"allowed_failures": ALLOWED_FAILURES, "dashboard_address": "127.0.0.1:0"},
        )
        with cluster, distributed.Client(cluster, timeout=timeout) as client:
            yield client


def _check_workers(client: Any, out: Path, *, wait: float, echo: Callable[[str], None]) -> None:
    """Wait for a worker; make sure every worker can run backprop_xp and sees ``out``."""
    from .. import __version__

    try:
        client.wait_for_workers(1, timeout=wait)
    except TimeoutError:
        raise TimeoutError(
            f"no Dask worker joined the scheduler at {client.scheduler.address} within {wait:g} s; "
            f"start some with: dask worker {client.scheduler.address} --nthreads 1"
        ) from None
    marker = out / f".dask-check-{uuid.uuid4().hex}"
    with atomic_write(marker) as f:
        f.write("written by the sweep's client; every worker must see this file\n")
    try:
        answers = client.run(_sees, str(marker), on_error="return")
    finally:
        marker.unlink()
    broken = {w: a for w, a in answers.items() if isinstance(a, BaseException)}
    if broken:
        worker, exc = next(iter(broken.items()))
        raise ValueError(
            f"Dask worker {worker} cannot run backprop_xp ({type(exc).__name__}: {exc}); "
            "install backprop-xp on every worker"
        )
    blind = sorted(w for w, (seen, _) in answers.items() if not seen)
    if blind:
        raise ValueError(
            f"Dask worker{'s' if len(blind) > 1 else ''} {', '.join(blind)} cannot see {out}: the sweep's folder "
            "must be on a filesystem every worker shares, at the same path"
        )
    others = sorted({v for _, v in answers.values()} - {__version__})
    if others:
        echo(f"note: some workers have backprop_xp {', '.join(others)}, this client {__version__}")
    try:
        allowed = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.allowed_failures)
    except Exception:  # a scheduler that refuses to run code: nothing to report
        allowed = ALLOWED_FAILURES
    if allowed != ALLOWED_FAILURES:
        echo(
            f"note: this scheduler retries a run whose worker died {allowed} time(s), not once; start it with "
            f"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES={ALLOWED_FAILURES} to retry once"
        )


def sweep_with_client(
    client: Any,
    configs: list[dict[str, Any]],
    names: list[str],
    out: str | os.PathLike,
    *,
    echo: Callable[[str], None] = print,
    title: str = "Sweep",
    wait_for_workers: float = 60.0,
) -> list[dict[str, Any]]:
    """Train every config into ``out/<name>`` on the workers of ``client``; return the summaries.

    Like ``sweep.run_sweep``: runs already finished in ``out`` are skipped,
    interrupted ones resume from their checkpoint, and sweep.csv, sweep.md and
    sweep.png are rewritten after every run. Each task's key starts with its
    run's name (what the Dask dashboard shows). Use this with a cluster made
    elsewhere (dask-jobqueue, Kubernetes...); ``run_sweep_dask`` connects first.

    Parameters
    ----------
    client : distributed.Client
        Connected to the scheduler whose workers train the runs.
    configs, names : lists
        One ``TrainConfig`` dict and one folder name per run.
    out : path
        The sweep's folder; every worker must see it at the same path.
    echo : callable
        Where the one-line progress reports go.
    title : str
        Title of sweep.png.
    wait_for_workers : float
        Seconds to wait for a first worker before giving up (TimeoutError).

    Raises
    ------
    ValueError
        A worker cannot see ``out`` or cannot import backprop_xp.
    """
    from distributed import as_completed

    out = Path(out).resolve()  # workers have their own working folders: only absolute paths mean the same
    out.mkdir(parents=True, exist_ok=True)
    configs = [{**c, "data_dir": os.path.abspath(c["data_dir"])} if c.get("data_dir") else c for c in configs]
    summaries, todo = pending_runs(configs, names, out, echo=echo, title=title)
    if not todo:
        return [summaries[name] for name in names if name in summaries]
    _check_workers(client, out, wait=wait_for_workers, echo=echo)

    queue = deque(todo)
    running: dict[str, tuple[dict[str, Any], str, int]] = {}  # task key -> (config, name, attempt)
    submitted: dict[str, Any] = {}  # task key -> its future, until its summary is in
    futures = as_completed()

    def submit(config: dict[str, Any], name: str, attempt: int, avoid: str | None = None) -> None:
        elsewhere = [w for w in client.nthreads() if w != avoid] if avoid else []
        placement = {"workers": elsewhere, "allow_other_workers": True} if elsewhere else {}  # a preference only
        key = f"{name}-{attempt}-{uuid.uuid4().hex[:8]}"
        future = client.submit(_run_on_worker, config, str(out / name), key, key=key, pure=False, **placement)
        running[future.key] = (config, name, attempt)
        submitted[future.key] = future
        futures.add(future)

    def fill() -> None:
        slots = max(1, sum(client.nthreads().values()))
        while queue and futures.count() < slots:
            submit(*queue.popleft(), attempt=1)

    def collect(future: Any) -> None:
        """A run's task ended: record its summary, or resubmit it once if it raised on its worker."""
        del submitted[future.key]  # first: an interrupt between the two must still find the run's name
        config, name, attempt = running.pop(future.key)
        summary, retry_avoiding = _outcome(future, config, name, attempt, out)
        if summary is None:
            echo(f"{name}: {retry_avoiding[1]}; retrying elsewhere")
            submit(config, name, 2, avoid=retry_avoiding[0])
            return
        record_run(summaries, summary, len(configs), out, echo=echo, title=title)
        fill()

    try:
        fill()
        for future in futures:
            collect(future)
    except KeyboardInterrupt:
        # Dask cannot cancel a task that is executing: without this the runs would go on training on
        # their workers (or, on a local cluster, be killed a few seconds later, mid-epoch).
        stop_runs(client, {running[key][1]: future for key, future in submitted.items()}, echo=echo)
        raise
    return [summaries[name] for name in names if name in summaries]


def _outcome(future: Any, config: dict[str, Any], name: str, attempt: int, out: Path) -> tuple[Any, Any]:
    """What a finished task means: ``(summary, None)``, or ``(None, (worker to avoid, error))`` to retry it once."""
    from distributed import KilledWorker

    try:
        summary = future.result()
    except KilledWorker as exc:  # the scheduler already retried it after the first death
        tries = exc.allowed_failures + 1
        message = f"KilledWorker: {tries} workers died while it was assigned to them (last {exc.last_worker.address})"
        return summarize(name, config, load_metrics(out / name), message), None
    except Exception as exc:
        error = str(exc) if isinstance(exc, WorkerRunError) else f"{type(exc).__name__}: {exc}"
        if attempt == 1:
            return None, (getattr(exc, "worker", None), error)
        return summarize(name, config, load_metrics(out / name), error), None
    future.release()
    if summary.get("epochs_done") and load_metrics(out / name) is None:  # a worker that joined later
        error = f"trained on {summary.get('worker')}, but {out / name} is empty here: not a shared filesystem"
        summary = {**summary, "status": "failed", "error": error}
    return summary, None


STOP_WAIT = 60.0  # seconds an interrupted sweep waits for its runs to stop on their workers


def stop_runs(client: Any, futures: dict[str, Any], *, echo: Callable[[str], None], wait: float = STOP_WAIT) -> None:
    """Stop the runs of these futures (run name -> future) on their workers, and wait until they have.

    Each run in progress stops at its next training step and records
    "interrupted" (its checkpoint resumes it when the same sweep runs again);
    a run not yet started does not start. A second Ctrl-C ends the waiting.
    """
    from distributed import wait as wait_for

    if not futures:
        return
    echo(f"interrupted: stopping {plural(len(futures), 'run')} on the workers (Ctrl-C again: stop waiting)")
    # on_error: a worker that is gone has nothing to stop
    client.run(_stop_runs, [f.key for f in futures.values()], on_error="ignore")
    with contextlib.suppress(TimeoutError, asyncio.TimeoutError):  # two classes before Python 3.11
        wait_for(list(futures.values()), timeout=wait)
    for name, future in futures.items():
        if not future.done():
            echo(f"{name}: still running after {wait:g} s; it stops at its next training step")
        elif future.status == "finished":
            summary = future.result()
            epochs = summary.get("epochs_done", 0)
            echo(f"{name}: {summary['status']}" + (f" after {plural(epochs, 'epoch')}" if epochs else ""))
        else:  # it failed on its own, or its worker died
            echo(f"{name}: {future.status}")


def run_sweep_dask(
    configs: list[dict[str, Any]],
    names: list[str],
    out: str | os.PathLike,
    *,
    scheduler: str,
    jobs: int = 1,
    echo: Callable[[str], None] = print,
    title: str = "Sweep",
    timeout: float = 30.0,
) -> list[dict[str, Any]]:
    """``sweep.run_sweep`` on a Dask cluster: connect to ``scheduler`` and train every run there.

    ``scheduler`` is ``tcp://host:port`` of a running ``dask scheduler``, or
    "local" to start ``jobs`` worker processes on this machine. See
    ``sweep_with_client`` for the rest; ModuleNotFoundError (with the pip
    command) when ``distributed`` is missing, ConnectionError when nothing
    answers at the address.
    """
    with connect(scheduler, workers=jobs, timeout=timeout) as client:
        n = len(client.nthreads())
        echo(f"dask: scheduler {client.scheduler.address}, {n} worker{'s' if n != 1 else ''} now")
        return sweep_with_client(client, configs, names, out, echo=echo, title=title)
