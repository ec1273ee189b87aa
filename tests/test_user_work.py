"""What a user made is never lost or replaced, and what the commands say can be acted on (issue 24).

train and sweep refuse folders that hold somebody else's work, leave nothing behind when they
never started, a finished run's deleted model.npz comes back, an interrupted sweep says how to
go on, and the words of the help and the messages say what they mean.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import processes
import pytest

from backprop_xp.cli import build_parser, main
from backprop_xp.model import MLP
from backprop_xp.training import sweep as sweep_module

TINY = ["--hidden", "8", "--epochs", "2", "--batch-size", "50", "--backend", "numpy"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small data set in MNIST's layout (300 + 100 images) whose labels are learnable: runs take no time."""
    from idx_files import fake_mnist, write_mnist_folder

    folder = tmp_path_factory.mktemp("small-mnist")
    arrays = fake_mnist(n_train=300, n_test=100, rows=28, cols=28)
    for split in ("train", "test"):
        for image, label in zip(arrays[f"{split}_images"], arrays[f"{split}_labels"]):
            image[2 * label : 2 * label + 2, :] = 255
    write_mnist_folder(folder, arrays, gz=True)
    return str(folder)


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- 1. a folder of the user's own files


def test_train_refuses_a_folder_of_the_users_own_files_and_a_file(small, tmp_path, capsys):
    mine = tmp_path / "myfolder"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    (mine / "curves.png").write_bytes(b"my own picture")
    argv = ["train", *TINY, "--data-dir", small, "--quiet", "--out"]
    assert main([*argv, str(mine)]) == 2
    assert capsys.readouterr().err == (
        f"backprop-xp: error: --out {mine} is not empty and holds no run of backprop-xp (curves.png, notes.txt): "
        "choose a new or empty folder\n"
    )
    assert _contents(mine) == {"notes.txt": b"my notes", "curves.png": b"my own picture"}  # untouched
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main([*argv, str(afile)]) == 2
    assert capsys.readouterr().err == f"backprop-xp: error: --out {afile} is a file, not a folder\n"
    assert main(["sweep", *TINY, "--val-size", "50", "--data-dir", small, "--out", str(afile)]) == 2
    assert capsys.readouterr().err == f"backprop-xp: error: --out {afile} is a file, not a folder\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*argv, str(empty)]) == 0  # an empty folder is a folder to write into
    assert (empty / "model.npz").is_file()


# --------------------------------------------------------------------------- 2. a second sweep with other settings


def test_a_second_sweep_with_other_settings_is_refused_before_training_and_leaves_the_first(small, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--hidden", "8,12", "--epochs", "1", "--val-size", "50", "--batch-size", "50",
            "--backend", "numpy", "--data-dir", small, "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    before = _contents(out)
    capsys.readouterr()
    assert main([*argv, "--epochs", "2"]) == 2
    assert capsys.readouterr().err == (
        f"backprop-xp: error: {out} holds runs of a sweep with other settings (h12-lr0.1-b50, h8-lr0.1-b50): "
        "this sweep asks for --epochs 2 (the runs there have 1); sweep into another --out, or give the settings "
        "of the sweep there\n"
    )
    assert _contents(out) == before  # sweep.md, sweep.csv, sweep.png and every run as they were
    assert main([*argv, "--lr", "0.05"]) == 2  # other run names: the first sweep's rows would vanish from sweep.md
    assert capsys.readouterr().err == (
        f"backprop-xp: error: {out} holds runs that this sweep does not have (h12-lr0.1-b50, h8-lr0.1-b50), whose "
        "rows its sweep.md would lose: sweep into another --out, or give the settings of the sweep there\n"
    )
    assert _contents(out) == before
    assert main(argv) == 0  # the same sweep again: both runs skipped, still fine
    assert "2 finished, 0 failed" in capsys.readouterr().out


def test_a_sweep_in_which_every_run_failed_exits_1(small, tmp_path, monkeypatch, capsys):
    def broken_train(*args, **kwargs):
        raise RuntimeError("out of disk, say")

    monkeypatch.setattr(sweep_module, "train", broken_train)
    out = tmp_path / "sweep"
    argv = ["sweep", "--hidden", "8,12", *TINY[2:], "--val-size", "50", "--data-dir", small, "--out", str(out)]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "0 finished, 2 failed or diverged" in captured.out
    assert captured.err == f"backprop-xp: error: no run of the sweep finished; see {out / 'sweep.md'}\n"


# --------------------------------------------------------------------------- 3. a run that never started


def test_a_run_that_never_started_leaves_no_folder_and_never_removes_the_users(tmp_path, monkeypatch, capsys):
    from backprop_xp.data import download

    monkeypatch.chdir(tmp_path)
    (tmp_path / "wrong").mkdir()  # a folder without the data set's files
    argv = ["train", "--hidden", "8", "--epochs", "1", "--backend", "numpy", "--quiet"]
    for _ in range(2):  # each used to leave an empty runs/<time>-h8 behind
        assert main([*argv, "--data-dir", "wrong"]) == 1
        assert "lacks train-images-idx3-ubyte" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["wrong"]  # not even runs/, which this command made
    # a download that fails (offline): no data folder given, an empty cache, a mirror that refuses
    monkeypatch.delenv("BACKPROP_XP_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(download, "MIRRORS", ["http://127.0.0.1:9/"])
    assert main([*argv, "--out", "offline/run"]) == 1
    assert not (tmp_path / "offline").exists()
    # a folder the user had (empty, or holding runs of their own) stays
    (tmp_path / "mine" / "old-run").mkdir(parents=True)
    assert main([*argv, "--data-dir", "wrong", "--out", "mine/new"]) == 1
    assert main([*argv, "--data-dir", "wrong", "--out", "mine/old-run"]) == 1
    assert sorted(os.listdir(tmp_path / "mine")) == ["old-run"] and os.listdir(tmp_path / "mine" / "old-run") == []


# --------------------------------------------------------------------------- 4. a finished run's deleted model.npz


@pytest.mark.parametrize("keep_best", [False, True], ids=["last", "keep-best"])
def test_evaluate_advises_what_writes_a_deleted_model_again_and_it_does(keep_best, small, tmp_path, capsys):
    run = tmp_path / "run"
    flags = ["--val-size", "50", "--keep-best", "--epochs", "4", "--lr", "0.5"] if keep_best else []
    assert main(["train", *TINY, *flags, "--data-dir", small, "--out", str(run), "--quiet"]) == 0
    original = (run / "model.npz").read_bytes()
    model = MLP.load(run / "model.npz")
    (run / "model.npz").unlink()
    capsys.readouterr()
    assert main(["evaluate", str(run), "--backend", "numpy"]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"backprop-xp: error: {run} holds no model.npz (it was removed after the run finished); "
        f"write it again with: backprop-xp train --resume {run}\n"
    )
    assert main(["train", "--resume", str(run)]) == 0  # the advice, as given
    kept = json.loads((run / "metrics.json").read_text())["final"]["epoch_kept"]
    source = "best.npz" if keep_best and kept != 4 else "checkpoint.npz"
    assert capsys.readouterr().out == (
        f"{run} is already finished (4 epochs); wrote its model.npz again (the parameters of epoch {kept}, from {source})\n"
        if keep_best
        else f"{run} is already finished (2 epochs); wrote its model.npz again (the parameters of epoch 2, from {source})\n"
    )
    restored = MLP.load(run / "model.npz")
    for name, value in model.params.items():
        np.testing.assert_array_equal(restored.params[name], value)  # the very model the run kept
    with np.load(run / "model.npz") as new, np.load(__import__("io").BytesIO(original)) as old:
        assert sorted(new.files) == sorted(old.files) and int(new["train.epoch"]) == int(old["train.epoch"])
        assert str(new["train.config"]) == str(old["train.config"])
    assert main(["evaluate", str(run), "--backend", "numpy", "--data-dir", small]) == 0


# --------------------------------------------------------------------------- 7. the CPU step and the BLAS


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "numpy"])
def test_the_first_line_and_metrics_name_the_cpu_step_and_the_blas(fused, small, tmp_path, capsys):
    from backprop_xp.cpu import numba_loops

    if fused and not numba_loops.available():
        pytest.skip("Numba is not installed: no fused step")
    threadpoolctl = pytest.importorskip("threadpoolctl")
    previous = numba_loops.set_enabled(fused)
    try:
        assert main(["train", *TINY, "--data-dir", small, "--out", str(tmp_path / "run")]) == 0
    finally:
        numba_loops.set_enabled(previous)
    first = capsys.readouterr().out.splitlines()[0]
    environment = json.loads((tmp_path / "run" / "metrics.json").read_text())["config"]["environment"]
    blas = [lib for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]
    threads = numba_loops.threads() if fused else max(lib["num_threads"] for lib in blas)
    step = "fused CPU step" if fused else "plain NumPy step"
    assert first == f"backend numpy ({step}, {threads} thread{'' if threads == 1 else 's'})"
    assert environment["cpu_step"]["step"] == ("fused" if fused else "numpy")
    assert environment["cpu_step"]["threads"] == threads
    recorded = [lib for lib in environment["blas"] if lib["user_api"] == "blas"]
    assert [(lib["internal_api"], lib["version"], lib["num_threads"]) for lib in recorded] == [
        (lib["internal_api"], lib["version"], lib["num_threads"]) for lib in blas
    ]


# --------------------------------------------------------------------------- 11. an interrupted sweep


@pytest.mark.slow
def test_ctrl_c_during_a_sweep_names_the_runs_stopped_and_the_command_that_resumes_them(tmp_path, small):
    out = tmp_path / "sweep"
    argv = ["sweep", "--hidden", "8,12", "--epochs", "100000", "--val-size", "50", "--batch-size", "50",
            "--backend", "numpy", "--data-dir", small]  # fmt: skip
    proc = processes.start([*argv, "--out", str(out)])
    processes.wait_until_written(proc, [out / "h8-lr0.1-b50" / "checkpoint.npz"])
    _, err = processes.stop(proc, signal.SIGINT, group=True)  # a terminal's Ctrl-C
    assert proc.returncode == 130, err
    command = " ".join(["backprop-xp", *argv, "--out", str(out)])
    assert err.splitlines()[-1] == (
        f"backprop-xp: interrupted; runs stopped: h8-lr0.1-b50 (their finished epochs are saved); "
        f"resume the sweep with: {command}"
    )
    table = (out / "sweep.md").read_text()
    assert "| h8-lr0.1-b50 | 8 |" in table and "| interrupted |" in table  # the run stopped has its row
    assert "h12" not in table  # never started


def test_a_short_run_per_epoch_time_keeps_its_digits(tmp_path):
    from backprop_xp.training.sweep import markdown_table, record_run

    lines = []
    row = {"name": "h8-lr0.1-b50", "status": "finished", "hidden": 8, "lr": 0.1, "batch_size": 50, "activation": "relu",
           "momentum": 0.9, "weight_decay": 0.0, "epochs_done": 0, "val_accuracy": 0.5, "test_accuracy": 0.5,
           "seconds_per_epoch": 0.0123, "train_seconds": 0.0246}  # fmt: skip
    record_run({}, row, 1, tmp_path, echo=lines.append, title="t")
    assert lines == ["[1/1] h8-lr0.1-b50: val accuracy 50.00%, test accuracy 50.00%, 0.0123 s/epoch"]  # not 0.0
    assert "| 50.00 | 0.0123 | finished |" in markdown_table([row])  # not 0.01


def test_the_sweep_chart_shows_every_run_and_marks_one_that_learned_nothing(tmp_path, monkeypatch):
    from backprop_xp import plots

    drawn = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: drawn.append(fig))

    def run(name, *accuracies):
        return {"name": name, "epochs": [{"epoch": k + 1, "val_accuracy": a / 100, "seconds": 1.0}
                                         for k, a in enumerate(accuracies)]}  # fmt: skip

    # after 2 epochs the runs lie 6 points apart: the chart used to stop 5 points below the best
    runs = [run("a", 95.0, 97.9), run("b", 90.0, 95.5), run("c", 85.0, 91.9), run("dead", 11.0, 11.3)]
    plots.sweep_plot(runs, tmp_path / "sweep.png")
    ax_epoch = drawn[0].axes[0]
    low, high = ax_epoch.get_ylim()
    assert low <= 91.9 - 0.4 and high >= 97.9  # every run that learned ends on the chart
    assert low > 11.3  # the one at chance does not squash them; it is marked at the foot instead
    labels = [line.get_label() for line in ax_epoch.get_lines()]
    assert "dead (11.30% below the chart)" in labels
    marks = [line for line in ax_epoch.get_lines() if line.get_marker() == "v"]
    assert len(marks) == 1 and list(marks[0].get_ydata()) == [low] and list(marks[0].get_xdata()) == [2]
    assert "1 below" in ax_epoch.get_title()


# --------------------------------------------------------------------------- 12. words that say what they mean


def test_divergence_names_the_scheduled_rate_and_the_one_given():
    from backprop_xp.training import Diverged

    message = str(Diverged(3, "the loss became NaN or infinite", 0.5, "/tmp/x", step=7, base_lr=2.0))
    assert "(learning rate 0.5 by the schedule, from --lr 2); try --lr 0.1 or smaller" in message
    same = str(Diverged(1, "the loss became NaN or infinite", 2.0, "/tmp/x", step=7, base_lr=2.0))
    assert "(learning rate 2); " in same


def _help(command: str) -> str:
    import argparse

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[command].format_help()


def test_the_help_says_the_same_things_the_same_way():
    from backprop_xp.training import TrainConfig

    parser = build_parser()
    assert "Test a saved model" in _help("evaluate")  # a description, not just the usage
    for command in ("train", "sweep", "evaluate", "predict"):
        assert "--backend {auto,numpy,cupy}" in _help(command), command
    for command in ("evaluate", "predict"):
        args = ["evaluate", "m.npz"] if command == "evaluate" else ["predict", "m.npz", "x.png"]
        assert parser.parse_args(args).backend == TrainConfig().backend  # train's default
    for command in ("train", "sweep", "evaluate", "bench", "show-data"):
        assert "--data-dir DIR" in _help(command) and "DATA_DIR" not in _help(command), command
    assert "Fashion" not in _help("bench").split("--data-dir DIR")[1].split("--train-size")[0]
    with pytest.raises(Exception, match="^--keep-best chooses by validation accuracy"):
        TrainConfig(keep_best=True).validate()


def test_predict_titles_of_long_names_that_differ_in_the_middle_are_told_apart(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from backprop_xp import plots

    MLP(784, 8, 10, seed=0).save(tmp_path / "model.npz")
    ink = np.zeros((28, 28), np.uint8)
    ink[6:22, 12:16] = 255  # a "1"
    paths = [
        str(tmp_path / name) for name in ("scan_of_page_1_left_digit.png", "scan_of_page_2_left_digit.png", "7.png")
    ]
    for path in paths:
        Image.fromarray(ink).save(path)
    drawn = {}
    monkeypatch.setattr(plots, "digit_grid", lambda images, titles, path, **kw: drawn.update(titles=titles))
    assert main(["predict", str(tmp_path / "model.npz"), *paths, "--show", str(tmp_path / "seen.png")]) == 0
    names = [title.split("\n")[0] for title in drawn["titles"]]
    assert len(set(names)) == 3 and all(len(name) <= 17 for name in names), names  # cut to the same 17: told apart
    assert names[0].startswith("1. ") and names[1].startswith("2. ") and names[2] == "7.png"


def test_check_accuracy_echoes_its_commands_with_the_interpreter(tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "check_accuracy.py"
    (tmp_path / "empty").mkdir()  # no data: the train command fails at once, after it was echoed
    done = subprocess.run(
        [sys.executable, str(script), "--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "runs"),
         "--only", "default"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    first = done.stdout.splitlines()[0]
    assert first == (
        f"$ python -m backprop_xp train --data-dir {tmp_path / 'empty'} --backend numpy --out {tmp_path / 'runs' / 'default'} "
        "--quiet"
    )
    assert done.returncode == 1 and "default: train exited with code 1" in done.stdout


# --------------------------------------------------------------------------- 6. a relative data folder


@pytest.mark.slow
def test_the_tests_that_change_folder_work_with_a_relative_data_folder(mnist_dir, tmp_path):
    """The README's BACKPROP_XP_DATA=../shared/mnist is relative: the tests that chdir must still find it."""
    root = Path(__file__).resolve().parents[1]
    relative = os.path.relpath(Path(mnist_dir).resolve(), root)
    tests = ["tests/test_cli.py::test_resume_works_from_another_folder_and_says_when_the_data_is_gone",
             "tests/test_cli.py::test_small_things_a_new_user_trips_over"]  # fmt: skip
    env = {**os.environ, "BACKPROP_XP_DATA": relative, "BACKPROP_XP_REQUIRE_DATA": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "t"), *tests],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:]
    assert "2 passed" in done.stdout
