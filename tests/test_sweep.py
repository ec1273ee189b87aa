"""Sweeps: every combination trained in parallel processes, failures recorded, finished runs skipped."""

from __future__ import annotations

import csv
import json
import os
import signal

import numpy as np
import processes
import pytest

from backprop_xp.cli import main
from backprop_xp.model import MLP
from backprop_xp.training import TrainConfig, train
from backprop_xp.training.sweep import blas_threads, grid, run_name, run_one, run_sweep

TINY = dict(hidden=8, epochs=2, batch_size=50, backend="numpy")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """A small data set in MNIST's layout (300 + 100 28 x 28 images): runs that take no time to load.

    Random images with a bright band whose position is the label, so that runs learn something, as runs
    on real data do.
    """
    from idx_files import fake_mnist, write_mnist_folder

    folder = tmp_path_factory.mktemp("small-mnist")
    arrays = fake_mnist(n_train=300, n_test=100, rows=28, cols=28)
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        for image, label in zip(images, labels):
            image[2 * label : 2 * label + 2, :] = 255
    write_mnist_folder(folder, arrays, gz=True)
    return str(folder)


class InWorker:
    """A config value whose unpickling runs ``code``: how a test reaches inside a spawned sweep worker.

    ``run_sweep`` pickles each config to its worker process; unpickling calls
    ``exec(code)`` there (and leaves None in the config, which ``train`` ignores).
    """

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


def test_grid_and_names_cover_every_combination_once():
    configs = grid(
        {"epochs": 1, "batch_size": 32}, {"hidden": [8, 16], "lr": [0.1, 1.0], "activation": ["relu", "tanh"]}
    )
    names = [run_name(c, ["hidden", "lr", "activation"]) for c in configs]
    assert len(configs) == 8 and len(set(names)) == 8
    assert names[0] == "h8-lr0.1-b32-relu" and names[-1] == "h16-lr1-b32-tanh"


def test_run_one_records_a_failure_instead_of_raising(tmp_path, mnist_dir):
    config = TrainConfig(
        hidden=8, train_size=100, val_size=100, epochs=1, backend="numpy", data_dir=str(mnist_dir)
    ).to_dict()
    summary = run_one(config, str(tmp_path / "bad"))
    assert summary["status"] == "failed"
    assert "val-size 100 leaves no training images" in summary["error"]
    assert "Traceback" in (tmp_path / "bad" / "error.txt").read_text()


@pytest.mark.slow
def test_a_parallel_sweep_records_every_run_and_skips_finished_ones(tmp_path, mnist_dir, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--hidden", "16,32", "--lr", "0.1,1e20", "--epochs", "1", "--train-size", "1500",
            "--batch-size", "100", "--backend", "numpy", "--data-dir", str(mnist_dir), "--jobs", "2",
            "--val-size", "300", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "4 runs of 1 epoch on numpy (2 at a time)" in printed
    assert "2 finished, 2 failed or diverged" in printed

    with open(out / "sweep.csv") as f:
        rows = {row["name"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"h16-lr0.1-b100", "h32-lr0.1-b100", "h16-lr1e+20-b100", "h32-lr1e+20-b100"}
    for name, row in rows.items():
        if "1e+20" in name:
            assert row["status"] == "diverged" and "diverged at epoch 1, step" in row["error"]
        else:
            assert row["status"] == "finished" and float(row["test_accuracy"]) > 0.5
            assert float(row["seconds_per_epoch"]) > 0
            assert (out / name / "model.npz").exists() and (out / name / "curves.png").exists()

    table = (out / "sweep.md").read_text().splitlines()
    assert table[0].startswith("| run | hidden | lr | batch |")
    accuracies = [float(line.split("|")[9]) for line in table[2:4]]
    assert accuracies == sorted(accuracies, reverse=True)  # best first
    assert all("diverged" in line for line in table[4:6])
    assert (out / "sweep.png").stat().st_size > 0

    # The same sweep again: nothing is retrained.
    before = {name: (out / name / "metrics.json").stat().st_mtime_ns for name in rows}
    assert main(argv) == 0
    assert capsys.readouterr().out.count("skipped") == 4
    assert before == {name: (out / name / "metrics.json").stat().st_mtime_ns for name in rows}
    assert json.loads((out / "h16-lr0.1-b100" / "metrics.json").read_text())["status"] == "finished"


def _log(folder):
    return (folder / "train.log").read_text()


def _same_params(a, b):
    return all(np.array_equal(a.params[k], b.params[k]) for k in ("W1", "b1", "W2", "b2"))


def test_run_one_resumes_an_interrupted_run_where_it_stopped(tmp_path, small_data):
    config = TrainConfig(**TINY, data_dir=small_data)
    train(
        config, tmp_path / "run", echo=None, pictures=False, stop_after=1
    )  # as a sweep killed after epoch 1 leaves it
    summary = run_one(config.to_dict(), str(tmp_path / "run"))
    assert summary["status"] == "finished" and summary["epochs_done"] == 2 and not summary["skipped"]
    assert "resuming" in _log(tmp_path / "run") and "training 784-8-10" not in _log(tmp_path / "run")
    train(config, tmp_path / "straight", echo=None, pictures=False)
    assert _same_params(MLP.load(tmp_path / "run" / "model.npz"), MLP.load(tmp_path / "straight" / "model.npz"))


def test_run_one_refuses_a_folder_holding_a_run_with_other_settings_and_leaves_it_as_it_was(tmp_path, small_data):
    """Another sweep into the same --out (other --seed, say): that run is somebody's result, not stale."""
    other = TrainConfig(**{**TINY, "hidden": 16}, data_dir=small_data)
    train(other, tmp_path / "run", echo=None, pictures=False, stop_after=1)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.name != "train.log"}
    config = TrainConfig(**TINY, data_dir=small_data)
    summary = run_one(config.to_dict(), str(tmp_path / "run"))
    assert summary["status"] == "failed" and summary["error"] == (
        f"SettingError: cannot resume {tmp_path / 'run'}: different settings: hidden 8 (the run has 16)"
    )
    after = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.name not in ("train.log", "error.txt")}
    assert after == before  # nothing of the run there was touched


def test_blas_threads_sets_and_restores_the_variables(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    with blas_threads(3):
        assert [os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")] == ["3"] * 3
    assert os.environ["OMP_NUM_THREADS"] == "7" and "OPENBLAS_NUM_THREADS" not in os.environ


@pytest.mark.slow
@pytest.mark.parametrize("hidden", [(8, 16), (8,)], ids=["two-runs", "one-run-left"])
def test_parallel_workers_get_their_share_of_blas_threads(tmp_path, small_data, hidden):
    """Also a lone run left (the rest finished before an interrupt): a run resumed with other threads differs."""
    pytest.importorskip("threadpoolctl")  # a dev dependency: installed wherever the tests run
    probe = "\n".join([
        "import json, os, threadpoolctl, uuid",
        "blas = [i['num_threads'] for i in threadpoolctl.threadpool_info() if i['user_api'] == 'blas']",
        "seen = {'env': os.environ.get('OPENBLAS_NUM_THREADS'), 'blas': blas}",
        f"open(os.path.join({str(tmp_path)!r}, 'probe-' + uuid.uuid4().hex + '.json'), 'w').write(json.dumps(seen))",
    ])  # fmt: skip
    configs = [{**TrainConfig(**{**TINY, "epochs": 1, "hidden": h}, data_dir=small_data).to_dict(),
                "probe": InWorker(probe)} for h in hidden]  # fmt: skip
    names = ["a", "b"][: len(hidden)]
    environ = dict(os.environ)
    summaries = run_sweep(configs, names, tmp_path / "sweep", jobs=2, echo=lambda line: None)
    assert [s["status"] for s in summaries] == ["finished"] * len(hidden)
    assert dict(os.environ) == environ  # the cap was for the workers only
    share = max(1, (os.cpu_count() or 1) // 2)
    probes = [json.loads(p.read_text()) for p in tmp_path.glob("probe-*.json")]
    assert len(probes) == len(hidden)
    for seen in probes:
        assert seen["env"] == str(share)
        assert seen["blas"] and set(seen["blas"]) == {share}  # what the BLAS library itself was told


def test_run_one_refuses_to_extend_a_run_to_another_epoch_count(tmp_path, small_data):
    """train --resume --epochs would extend it, its schedule recomputed: not the run this sweep asks for."""
    config = TrainConfig(**TINY, data_dir=small_data)
    train(config, tmp_path / "run", echo=None, pictures=False)
    before = (tmp_path / "run" / "model.npz").read_bytes()
    longer = TrainConfig(**{**TINY, "epochs": 3}, data_dir=small_data)
    summary = run_one(longer.to_dict(), str(tmp_path / "run"))
    assert summary["status"] == "failed" and summary["error"] == (
        f"SettingError: {tmp_path / 'run'} holds a run of 2 epochs, this sweep asks for 3: sweep into another --out, "
        f"or extend it with: backprop-xp train --resume {tmp_path / 'run'} --epochs 3"
    )
    assert (tmp_path / "run" / "model.npz").read_bytes() == before


@pytest.mark.slow
def test_a_worker_process_that_dies_is_recorded_and_the_sweep_goes_on(tmp_path, small_data):
    base = TrainConfig(**{**TINY, "epochs": 1}, data_dir=small_data).to_dict()
    doomed = {**base, "hidden": 16, "probe": InWorker("import os; os._exit(3)")}  # the worker dies on receiving it
    lines = []
    summaries = run_sweep([base, doomed], ["fine", "doomed"], tmp_path, jobs=2, echo=lines.append)
    assert [s["name"] for s in summaries] == ["fine", "doomed"]
    assert summaries[1]["status"] == "failed" and summaries[1]["error"].startswith("worker process failed"), summaries[
        1
    ]
    # A dead worker breaks the whole pool, so "fine" may have been lost with it: either way it is recorded.
    assert summaries[0]["status"] in ("finished", "failed")
    with open(tmp_path / "sweep.csv") as f:
        assert {row["name"]: row["status"] for row in csv.DictReader(f)}["doomed"] == "failed"
    assert "worker process failed" in (tmp_path / "sweep.md").read_text()
    assert any(line.startswith("[2/2]") and "worker process failed" in line for line in lines)


def test_runs_are_ranked_by_validation_accuracy_never_by_test_accuracy(tmp_path):
    from backprop_xp.training.sweep import write_tables

    common = {"status": "finished", "lr": 0.1, "batch_size": 32, "activation": "relu", "momentum": 0.9,
              "weight_decay": 0.0, "epochs_done": 2, "seconds_per_epoch": 1.0, "train_seconds": 2.0}  # fmt: skip
    summaries = [
        {
            "name": "a",
            "hidden": 8,
            "val_accuracy": 0.90,
            "best_val_accuracy": 0.91,
            "best_val_epoch": 1,
            "test_accuracy": 0.95,
            **common,
        },
        {
            "name": "b",
            "hidden": 16,
            "val_accuracy": 0.93,
            "best_val_accuracy": 0.93,
            "best_val_epoch": 2,
            "test_accuracy": 0.92,
            **common,
        },
    ]
    write_tables(tmp_path, summaries)
    table = (tmp_path / "sweep.md").read_text().splitlines()
    assert "val acc. (%)" in table[0] and "best (%)" not in table[0]
    assert [line.split("|")[1].strip() for line in table[2:]] == ["b", "a"]  # b validates better, a tests better
    with open(tmp_path / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["name"] for row in rows] == ["b", "a"] and "best_test_accuracy" not in rows[0]


def test_a_sweep_holds_out_a_validation_set_by_default(tmp_path, mnist_dir, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--hidden", "8", "--epochs", "1", "--train-size", "6000", "--batch-size", "100",
            "--backend", "numpy", "--data-dir", str(mnist_dir), "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads((out / "h8-lr0.1-b100" / "metrics.json").read_text())
    assert metrics["config"]["val_size"] == 5000 and metrics["config"]["n_train"] == 1000
    assert "val_accuracy" in metrics["epochs"][0]
    assert "val accuracy" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("group", [False, True], ids=["sigterm-to-the-sweep", "sigterm-to-its-process-group"])
def test_a_sigterm_stops_a_parallel_sweep_at_once_and_every_run_in_progress_records_interrupted(
    tmp_path, mnist_dir, group
):
    """A SIGTERM to the sweep alone (``kill PID``) or to all its processes (a job scheduler's stop)."""
    out = tmp_path / "sweep"
    argv = ["sweep", "--hidden", "32,48,64", "--epochs", "500", "--train-size", "3000", "--val-size", "500",
            "--batch-size", "100", "--backend", "numpy", "--data-dir", str(mnist_dir), "--jobs", "2", "--out", str(out)]  # fmt: skip
    proc = processes.start(argv)
    started = [out / name / "checkpoint.npz" for name in ("h32-lr0.1-b100", "h48-lr0.1-b100")]
    processes.wait_until_written(proc, started)
    _, err = processes.stop(proc, signal.SIGTERM, group=group)  # without the fix: the 500 epochs of both runs first
    assert proc.returncode == 130, err
    command = " ".join(["backprop-xp", *argv])
    assert err.strip().splitlines()[-1] == (
        "backprop-xp: interrupted; runs stopped: h32-lr0.1-b100, h48-lr0.1-b100 (their finished epochs are saved); "
        f"resume the sweep with: {command}"
    )
    table = (out / "sweep.md").read_text()
    for checkpoint in started:
        metrics = json.loads((checkpoint.parent / "metrics.json").read_text())
        assert metrics["status"] == "interrupted" and 1 <= len(metrics["epochs"]) < 500
        assert f"| {checkpoint.parent.name} | " in table  # each run stopped has its row
    assert not (out / "h64-lr0.1-b100").exists()  # the third run, queued, never started
    assert [str(p) for p in out.rglob(".*")] == []  # no temporary file anywhere


def test_the_sweep_row_of_a_keep_best_run_gives_the_validation_accuracy_of_the_model_kept():
    """Its test accuracy is the kept model's (epoch 2): the validation column and the ranking must be too."""
    from backprop_xp.training.sweep import summarize

    rows = [{"epoch": e, "val_accuracy": v, "seconds": 1.0, "train_loss": 1.0, "test_accuracy": 0.5, "test_loss": 1.0}
            for e, v in ((1, 0.20), (2, 0.29), (3, 0.27))]  # fmt: skip
    final = {"epoch_kept": 2, "test_accuracy": 0.2936, "test_loss": 2.0}
    summary = summarize("r", {"epochs": 3}, {"status": "finished", "epochs": rows, "final": final})
    assert (summary["val_accuracy"], summary["test_accuracy"]) == (0.29, 0.2936)
    assert (summary["best_val_accuracy"], summary["best_val_epoch"]) == (0.29, 2)
    without = summarize("r", {"epochs": 3}, {"status": "finished", "epochs": rows, "final": {**final, "epoch_kept": 3}})
    assert without["val_accuracy"] == 0.27  # the last epoch's model kept: its own
