"""Sweeps: every combination trained in parallel processes, failures recorded, finished runs skipped."""

from __future__ import annotations

import csv
import json

import pytest

from backprop_xp.cli import main
from backprop_xp.sweep import grid, run_name, run_one
from backprop_xp.train import TrainConfig


def test_grid_and_names_cover_every_combination_once():
    configs = grid({"epochs": 1, "batch_size": 32}, {"hidden": [8, 16], "lr": [0.1, 1.0], "activation": ["relu", "tanh"]})
    names = [run_name(c, ["hidden", "lr", "activation"]) for c in configs]
    assert len(configs) == 8 and len(set(names)) == 8
    assert names[0] == "h8-lr0.1-b32-relu" and names[-1] == "h16-lr1-b32-tanh"


def test_run_one_records_a_failure_instead_of_raising(tmp_path, mnist_dir):
    config = TrainConfig(hidden=8, train_size=100, val_size=100, epochs=1, backend="numpy", data_dir=str(mnist_dir)).to_dict()
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


def test_runs_are_ranked_by_validation_accuracy_never_by_test_accuracy(tmp_path):
    from backprop_xp.sweep import write_tables

    common = {"status": "finished", "lr": 0.1, "batch_size": 32, "activation": "relu", "momentum": 0.9,
              "weight_decay": 0.0, "epochs_done": 2, "seconds_per_epoch": 1.0, "train_seconds": 2.0}  # fmt: skip
    summaries = [
        {"name": "a", "hidden": 8, "val_accuracy": 0.90, "best_val_accuracy": 0.91, "best_val_epoch": 1, "test_accuracy": 0.95, **common},
        {"name": "b", "hidden": 16, "val_accuracy": 0.93, "best_val_accuracy": 0.93, "best_val_epoch": 2, "test_accuracy": 0.92, **common},
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
