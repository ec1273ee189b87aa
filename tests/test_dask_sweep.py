"""Sweeps on a real Dask cluster on 127.0.0.1: killed workers, retries, resume, every run accounted for."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import processes
import pytest

from backprop_xp.model import MLP
from backprop_xp.training import TrainConfig
from backprop_xp.training.dask_sweep import connect, run_sweep_dask, sweep_with_client


@pytest.fixture(scope="module")
def distributed():
    """The ``distributed`` module; where it is missing a skip, except in CI (which installs the extra)."""
    try:
        import distributed
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("CI must install the 'dask' extra: pip install -e '.[dask]'")
        pytest.skip("distributed is not installed (pip install 'backprop-xp[dask]')")
    return distributed


@pytest.fixture(scope="module")
def scheduler_address(distributed, tmp_path_factory):
    """A ``dask scheduler`` and two ``dask worker`` processes (one thread each), as a team would start them."""
    folder = tmp_path_factory.mktemp("dask")
    scheduler_file = folder / "scheduler.json"
    env = {**os.environ, "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1"}  # the README's setting
    procs = []

    def start(name: str, *args: str) -> None:
        log = open(folder / f"{name}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "dask", *args], stdout=log, stderr=subprocess.STDOUT,
                                      env=env, cwd=folder, start_new_session=True))  # fmt: skip

    try:
        start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard", "--dashboard-address", "127.0.0.1:0",
              "--scheduler-file", str(scheduler_file))  # fmt: skip
        for i in range(2):
            start(f"worker{i}", "worker", "--scheduler-file", str(scheduler_file), "--host", "127.0.0.1",
                  "--nworkers", "1", "--nthreads", "1", "--no-dashboard", "--name", f"w{i}")  # fmt: skip
        with distributed.Client(scheduler_file=str(scheduler_file), timeout=60) as client:
            client.wait_for_workers(2, timeout=90)
            yield client.scheduler.address
    finally:
        for proc in procs:  # each in its own session: its nanny's worker goes with it
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _rows(out):
    with open(out / "sweep.csv") as f:
        return {row["name"]: row for row in csv.DictReader(f)}


def _intact(folder, epochs: int) -> MLP:
    """A finished run's folder as ``train`` leaves it; returns its model."""
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["status"] == "finished" and len(metrics["epochs"]) == epochs
    assert metrics["final"]["test_accuracy"] > 0.8
    for picture in ("curves.png", "confusion.png", "misclassified.png", "weights.png"):
        assert (folder / picture).stat().st_size > 0
    return MLP.load(folder / "model.npz")


@pytest.mark.slow
def test_a_run_whose_worker_is_killed_mid_run_is_resumed_elsewhere_and_ends_exactly_like_one_never_killed(
    distributed, scheduler_address, tmp_path, mnist_dir
):
    out = tmp_path / "sweep"
    config = TrainConfig(hidden=32, epochs=2, train_size=10_000, batch_size=100, backend="numpy",
                         data_dir=str(mnist_dir)).to_dict()  # fmt: skip
    killed: dict[str, str] = {}

    def kill_the_worker_training_it() -> None:
        # As soon as "killed" has its first epoch's checkpoint, SIGKILL the worker process training it.
        with distributed.Client(scheduler_address, timeout=30) as client:
            deadline = time.monotonic() + 120
            while not (out / "killed" / "checkpoint.npz").exists():
                if time.monotonic() > deadline:
                    return
                time.sleep(0.005)
            [worker] = [w for w, keys in client.processing().items() if any(k.startswith("killed-") for k in keys)]
            pid = client.run(os.getpid, workers=[worker])[worker]
            os.kill(pid, signal.SIGKILL)  # its nanny starts a fresh worker, at a new address
            killed["worker"] = worker

    killer = threading.Thread(target=kill_the_worker_training_it, daemon=True)
    killer.start()
    lines: list[str] = []
    summaries = run_sweep_dask([config, config], ["killed", "never-killed"], out, scheduler=scheduler_address,
                               echo=lines.append, title="two runs")  # fmt: skip
    killer.join(timeout=5)

    assert "worker" in killed, "the worker was never killed"
    assert [s["status"] for s in summaries] == ["finished", "finished"], lines
    assert summaries[0]["worker"] != killed["worker"]  # retried elsewhere
    log = (out / "killed" / "train.log").read_text()
    assert log.count("training 784-32-10") == 1 and "resuming" in log  # the retry went on from the checkpoint
    assert "resuming" not in (out / "never-killed" / "train.log").read_text()

    # Every run is in the tables, and the killed one's folder is whole and bit-identical to the other's.
    rows = _rows(out)
    assert set(rows) == {"killed", "never-killed"} and {r["status"] for r in rows.values()} == {"finished"}
    assert (out / "sweep.md").read_text().count("| finished |") == 2 and (out / "sweep.png").stat().st_size > 0
    a, b = _intact(out / "killed", 2), _intact(out / "never-killed", 2)
    for name in ("W1", "b1", "W2", "b2"):
        assert np.array_equal(a.params[name], b.params[name]), name

    # The same sweep again: nothing is trained, nothing is rewritten.
    before = {name: (out / name / "model.npz").stat().st_mtime_ns for name in rows}
    lines.clear()
    again = run_sweep_dask(
        [config, config], ["killed", "never-killed"], out, scheduler=scheduler_address, echo=lines.append
    )
    assert [s["status"] for s in again] == ["finished", "finished"]
    assert sum("already finished, skipped" in line for line in lines) == 2
    assert before == {name: (out / name / "model.npz").stat().st_mtime_ns for name in rows}


def test_a_run_that_raises_on_its_worker_is_retried_on_another_then_recorded_as_failed(
    scheduler_address, tmp_path, mnist_dir
):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "blocked").write_text("a file where the run's folder should be\n")  # os.makedirs fails on any worker
    config = TrainConfig(hidden=8, epochs=1, train_size=1000, backend="numpy", data_dir=str(mnist_dir)).to_dict()
    lines: list[str] = []
    [summary] = run_sweep_dask([config], ["blocked"], out, scheduler=scheduler_address, echo=lines.append)

    [retry] = [line for line in lines if "retrying elsewhere" in line]
    first = retry.split("(on worker ")[1].split(")")[0]
    second = summary["error"].split("(on worker ")[1].split(")")[0]
    assert first != second  # the retry went to the other worker
    assert summary["status"] == "failed" and summary["error"].startswith("FileExistsError"), summary
    assert _rows(out)["blocked"]["status"] == "failed"


def test_a_worker_that_does_not_see_the_sweep_folder_stops_the_sweep_before_any_run(
    distributed, scheduler_address, tmp_path
):
    # A third worker in its own mount namespace, with an empty tmpfs over this test's folder: a machine
    # without the shared filesystem.
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a mount namespace here: {probe.stderr.decode().strip()}")
    out = tmp_path / "sweep"
    script = 'mount -t tmpfs none "$0" && exec "$@"'
    log = open(tmp_path / "blind.log", "w")
    blind = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(tmp_path), sys.executable, "-m",
         "dask", "worker", scheduler_address, "--host", "127.0.0.1", "--nthreads", "1", "--no-dashboard", "--name", "blind"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        with distributed.Client(scheduler_address, timeout=30) as client:
            client.wait_for_workers(3, timeout=90)
            [address] = [w for w, info in client.scheduler_info()["workers"].items() if info["name"] == "blind"]
            config = TrainConfig(hidden=8, epochs=1, backend="numpy").to_dict()
            with pytest.raises(ValueError) as error:
                run_sweep_dask([config], ["a"], out, scheduler=scheduler_address, echo=lambda line: None)
            assert str(error.value) == (
                f"Dask worker {address} cannot see {out}: the sweep's folder must be on a filesystem every worker "
                "shares, at the same path"
            )
            assert sorted(os.listdir(out)) == []  # nothing submitted, nothing written, the marker removed
    finally:
        os.killpg(blind.pid, signal.SIGTERM)
        blind.wait(timeout=30)
        log.close()


@pytest.mark.slow
def test_a_run_whose_workers_keep_dying_is_retried_once_then_recorded_as_failed_and_the_sweep_goes_on(
    distributed, tmp_path, mnist_dir
):
    class KillOnStart(distributed.WorkerPlugin):
        """SIGKILL the worker whenever a task of the run "doomed" starts there, noting the worker first."""

        def setup(self, worker) -> None:
            self.address = worker.address

        def transition(self, key, start, finish, **kwargs) -> None:
            if finish == "executing" and str(key).startswith("doomed-"):
                with open(notes, "a") as f:
                    f.write(self.address + "\n")
                os.kill(os.getpid(), signal.SIGKILL)

    out = tmp_path / "sweep"
    notes = tmp_path / "deaths.txt"
    small = dict(epochs=1, train_size=3000, batch_size=100, backend="numpy", data_dir=str(mnist_dir))
    configs = [TrainConfig(hidden=16, **small).to_dict(), TrainConfig(hidden=32, **small).to_dict()]
    environ = dict(os.environ)
    with connect("local", workers=2) as client:
        # The local cluster's settings: one retry after a death, cores // workers BLAS threads each.
        assert client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.allowed_failures) == 1
        threads = str(max(1, (os.cpu_count() or 1) // 2))
        assert set(client.run(lambda: os.environ["OPENBLAS_NUM_THREADS"]).values()) == {threads}
        client.register_plugin(KillOnStart(), name="kill-doomed")  # a local class: pickled by value
        lines: list[str] = []
        summaries = sweep_with_client(client, configs, ["doomed", "fine"], out, echo=lines.append)
    assert dict(os.environ) == environ  # the nannies' variables did not outlive the cluster

    deaths = notes.read_text().split()
    assert len(deaths) == 2 and deaths[0] != deaths[1]  # tried on two workers, not three
    doomed, fine = summaries
    assert doomed["status"] == "failed" and doomed["error"].startswith("KilledWorker: 2 workers died"), doomed
    assert fine["status"] == "finished" and fine["test_accuracy"] > 0.5
    rows = _rows(out)
    assert rows["doomed"]["status"] == "failed" and "KilledWorker" in rows["doomed"]["error"]
    assert rows["fine"]["status"] == "finished"
    assert "failed: KilledWorker" in (out / "sweep.md").read_text()
    _intact(out / "fine", 1)
    assert any(line.startswith("[2/2]") for line in lines)


def test_a_cluster_without_workers_is_a_clear_timeout_not_a_hang(distributed, tmp_path):
    config = TrainConfig(hidden=8, epochs=1, backend="numpy").to_dict()
    with distributed.LocalCluster(n_workers=0, host="127.0.0.1", dashboard_address=None,
                                  scheduler_kwargs={"dashboard_address": "127.0.0.1:0"}) as cluster:  # fmt: skip
        with distributed.Client(cluster) as client, pytest.raises(TimeoutError) as error:
            sweep_with_client(client, [config], ["a"], tmp_path / "sweep", echo=lambda line: None, wait_for_workers=0.5)
    assert str(error.value) == (
        f"no Dask worker joined the scheduler at {cluster.scheduler_address} within 0.5 s; "
        f"start some with: dask worker {cluster.scheduler_address} --nthreads 1"
    )


def test_without_distributed_the_error_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "distributed", None)  # what an environment without the extra sees
    config = TrainConfig(hidden=8, epochs=1).to_dict()
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'backprop-xp\[dask\]'"):
        run_sweep_dask([config], ["a"], tmp_path / "sweep", scheduler="local")
    assert not (tmp_path / "sweep").exists()


def test_a_scheduler_that_does_not_answer_is_a_one_line_connection_error(distributed, tmp_path):
    config = TrainConfig(hidden=8, epochs=1).to_dict()
    with pytest.raises(ConnectionError, match=r"cannot reach the Dask scheduler at 'tcp://127.0.0.1:1'"):
        run_sweep_dask([config], ["a"], tmp_path / "sweep", scheduler="tcp://127.0.0.1:1", timeout=1)
    assert not (tmp_path / "sweep").exists()


# --------------------------------------------------------------------------- interrupted sweeps


def _interrupted_sweep(out, mnist_dir, scheduler: str, signum: int, group: bool) -> tuple[str, str]:
    """A sweep of two runs, stopped by ``signum`` once both have a checkpoint; its stdout and stderr."""
    argv = ["sweep", "--hidden", "32,48", "--epochs", "500", "--train-size", "3000", "--val-size", "500",
            "--batch-size", "100", "--backend", "numpy", "--data-dir", str(mnist_dir), "--scheduler", scheduler,
            "--jobs", "2", "--out", str(out)]  # fmt: skip
    proc = processes.start(argv)
    processes.wait_until_written(proc, [out / name / "checkpoint.npz" for name in ("h32-lr0.1-b100", "h48-lr0.1-b100")])
    printed, err = processes.stop(proc, signum, group=group)  # without the fix: the 500 epochs of every run first
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == (
        "backprop-xp: interrupted; runs stopped: h32-lr0.1-b100, h48-lr0.1-b100 (their finished epochs are saved); "
        f"resume the sweep with: backprop-xp {' '.join(argv)}"
    ), err
    return printed, err


def _stopped_at_a_step(checkpoint) -> int:
    """The run of this checkpoint says "interrupted" with some epochs done, and left no temporary file."""
    metrics = json.loads((checkpoint.parent / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and 1 <= len(metrics["epochs"]) < 500
    assert [p.name for p in checkpoint.parent.glob(".*")] == []
    return len(metrics["epochs"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum, group",
    [(signal.SIGINT, True), (signal.SIGTERM, True), (signal.SIGTERM, False)],
    ids=["ctrl-c-in-a-terminal", "sigterm-to-the-process-group", "sigterm-to-the-sweep"],
)
def test_an_interrupted_sweep_on_a_local_cluster_stops_its_runs_at_once_and_each_records_interrupted(
    distributed, tmp_path, mnist_dir, signum, group
):
    """Before, the local workers were killed 4 s later, mid-epoch, their metrics.json saying "running"."""
    out = tmp_path / "sweep"
    started = [out / name / "checkpoint.npz" for name in ("h32-lr0.1-b100", "h48-lr0.1-b100")]
    printed, err = _interrupted_sweep(out, mnist_dir, "local", signum, group)
    for checkpoint in started:
        epochs = _stopped_at_a_step(checkpoint)
        assert f"{checkpoint.parent.name}: interrupted after {epochs} epoch" in printed
    assert "killing" not in err and "Traceback" not in err


@pytest.mark.slow
def test_an_interrupted_sweep_stops_its_runs_on_a_remote_cluster_instead_of_leaving_them_training(
    distributed, scheduler_address, tmp_path, mnist_dir
):
    """Dask cannot cancel a running task: before, the runs trained on after the sweep had exited."""
    out = tmp_path / "sweep"
    started = [out / name / "checkpoint.npz" for name in ("h32-lr0.1-b100", "h48-lr0.1-b100")]
    printed, _ = _interrupted_sweep(out, mnist_dir, scheduler_address, signal.SIGINT, group=False)
    epochs = [_stopped_at_a_step(checkpoint) for checkpoint in started]
    assert "interrupted: stopping 2 runs on the workers" in printed
    with distributed.Client(scheduler_address, timeout=30) as client:
        assert all(not keys for keys in client.processing().values())  # the workers are free
    time.sleep(1)
    assert [_stopped_at_a_step(checkpoint) for checkpoint in started] == epochs  # and nothing trains on


def test_a_run_stopped_before_its_worker_starts_it_is_not_started(distributed, scheduler_address, tmp_path):
    from backprop_xp.training.dask_sweep import _run_on_worker, _stop_runs

    config = TrainConfig(hidden=8, epochs=1, backend="numpy").to_dict()
    key = f"stopped-early-{os.getpid()}-{time.monotonic_ns()}"
    with distributed.Client(scheduler_address, timeout=30) as client:
        client.run(_stop_runs, [key])
        summary = client.submit(_run_on_worker, config, str(tmp_path / "a"), key, key=key, pure=False).result()
    assert summary["status"] == "not started" and summary["epochs_done"] == 0
    assert not (tmp_path / "a").exists()


# --------------------------------------------------------------------------- the command line


@pytest.mark.slow
def test_sweep_on_a_local_dask_cluster_from_the_command_line(distributed, tmp_path, mnist_dir, capsys):
    from backprop_xp.cli import main

    out = tmp_path / "sweep"
    argv = ["sweep", "--hidden", "8,16", "--epochs", "1", "--train-size", "2000", "--batch-size", "100",
            "--backend", "numpy", "--data-dir", str(mnist_dir), "--scheduler", "local", "--jobs", "2",
            "--val-size", "300", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "2 runs of 1 epoch (backend numpy) on 2 local Dask workers" in printed
    assert "2 finished, 0 failed or diverged" in printed
    rows = _rows(out)
    assert set(rows) == {"h8-lr0.1-b100", "h16-lr0.1-b100"} and {r["status"] for r in rows.values()} == {"finished"}
    assert all(float(r["test_accuracy"]) > 0.5 for r in rows.values())


def test_the_command_line_without_distributed_is_one_line_saying_what_to_install(monkeypatch, tmp_path, capsys):
    from backprop_xp.cli import main

    monkeypatch.setitem(sys.modules, "distributed", None)
    assert main(["sweep", "--hidden", "8", "--epochs", "1", "--scheduler", "local", "--out", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err
    assert (
        err
        == "backprop-xp: error: --scheduler needs the optional dependency 'distributed': pip install 'backprop-xp[dask]'\n"
    )
