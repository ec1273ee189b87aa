"""The command line: bad arguments, train -> evaluate -> predict, resume and divergence exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import processes
import pytest

from backprop_xp import MLP
from backprop_xp.backend import to_numpy
from backprop_xp.cli import main
from backprop_xp.training import run as train_module

QUICK = ["--hidden", "32", "--train-size", "2000", "--epochs", "2", "--batch-size", "100", "--backend", "numpy"]


def _fails_with_usage_error(argv, capsys, fragment):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.count("\n") == 1, err  # one line, no usage block, no traceback
    assert fragment in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "--hidden", "0"], "--hidden: must be an integer >= 1, got 0"),
        (["train", "--hidden", "ten"], "--hidden: 'ten' is not an integer"),
        (["train", "--lr", "-1"], "--lr: must be a finite number > 0, got -1"),
        (["train", "--lr", "nan"], "--lr: must be a finite number"),
        (["train", "--batch-size", "0"], "--batch-size: must be an integer >= 1, got 0"),
        (["train", "--epochs", "0"], "--epochs: must be an integer >= 1"),
        (["train", "--momentum", "1"], "--momentum: must be in [0, 1)"),
        (["train", "--weight-decay", "-0.1"], "--weight-decay: must be a finite number >= 0"),
        (["train", "--data-dir", "/no/such/folder"], "--data-dir: folder '/no/such/folder' does not exist"),
        (["train", "--backend", "tpu"], "--backend: 'tpu' is not one of auto, numpy, cupy"),
        (["train", "--activation", "gelu"], "--activation: 'gelu' is not one of relu, sigmoid, tanh"),
        (["train", "--lr-schedule", "linear"], "--lr-schedule: 'linear' is not one of constant, step, cosine"),
        (["train", "--dtype", "float16"], "--dtype: 'float16' is not one of float32, float64"),
        (["train", "--resume", "/no/such/run"], "--resume: folder '/no/such/run' does not exist"),
        (["sweep", "--lr", "0.1,-1"], "--lr: must be a finite number > 0, got -1"),
        (["sweep", "--hidden", "32,0"], "--hidden: must be an integer >= 1, got 0"),
        (["sweep", "--hidden", "8,,16"], "--hidden: expected a comma-separated list of values, got '8,,16'"),
        (["sweep", "--lr", "0.1,"], "--lr: expected a comma-separated list of values, got '0.1,'"),
        (["sweep", "--hidden", ","], "--hidden: expected a comma-separated list of values, got ','"),
        (["train", "--out", ""], "--out: empty; leave the option out for its default"),
        (["sweep", "--scheduler", ""], "--scheduler: empty; leave the option out for its default"),
        (["bench", "--out", " "], "--out: empty; leave the option out for its default"),
        (["sweep", "--jobs", "0"], "--jobs: must be an integer >= 1"),
        (["train", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_code_2(argv, fragment, capsys):
    _fails_with_usage_error(argv, capsys, fragment)


def test_the_module_runs_as_a_program():
    ok = subprocess.run([sys.executable, "-m", "backprop_xp", "train", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "--lr-schedule" in ok.stdout and "--resume" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "backprop_xp", "train", "--hidden", "0"], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert (
        bad.stderr.strip()
        == "backprop-xp train: error: argument --hidden: must be an integer >= 1, got 0 (see backprop-xp train --help)"
    )


def test_a_network_too_large_for_memory_is_a_one_line_error(tmp_path, capsys):
    from idx_files import fake_mnist, write_mnist_folder

    write_mnist_folder(tmp_path / "mnist", fake_mnist(n_train=30, n_test=12, rows=28, cols=28), gz=True)
    argv = ["train", "--hidden", str(10**11), "--epochs", "1", "--batch-size", "10", "--backend", "numpy",
            "--data-dir", str(tmp_path / "mnist"), "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("backprop-xp: error: not enough memory: Unable to allocate ") and err.count("\n") == 1


def test_an_unusable_cupy_backend_is_a_one_line_error(mnist_dir, capsys):
    from backprop_xp.backend import BackendError, get_backend

    try:
        get_backend("cupy")
    except BackendError:
        pass
    else:
        pytest.skip("CuPy works here: nothing to refuse")
    assert main(["train", "--backend", "cupy", "--data-dir", str(mnist_dir), "--quiet", "--out", "unused"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("backprop-xp: error: backend 'cupy'") and err.count("\n") == 1


@pytest.fixture(scope="module")
def trained(mnist_dir, tmp_path_factory):
    """One small run through the command line, shared by the tests below."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *QUICK, "--data-dir", str(mnist_dir), "--out", str(out), "--quiet"]) == 0
    return out


def test_evaluate_finds_the_data_folder_the_run_was_trained_on(trained, tmp_path, monkeypatch, capsys):
    """Without --data-dir or $BACKPROP_XP_DATA, the run's own folder, not the (empty) download cache."""
    monkeypatch.delenv("BACKPROP_XP_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))  # a download would be attempted there
    assert main(["evaluate", str(trained)]) == 0
    accuracy = json.loads((trained / "metrics.json").read_text())["final"]["test_accuracy"]
    assert f"test accuracy {100 * accuracy:.2f}%  (" in capsys.readouterr().out
    assert not (tmp_path / "empty-cache").exists()


def test_train_writes_its_folder(trained):
    for name in ("metrics.json", "metrics.csv", "model.npz", "checkpoint.npz", "curves.png", "confusion.png",
                 "misclassified.png", "weights.png"):  # fmt: skip
        assert (trained / name).stat().st_size > 0, name
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["status"] == "finished" and [r["epoch"] for r in metrics["epochs"]] == [1, 2]
    assert metrics["config"]["hidden"] == 32 and metrics["config"]["lr"] == 0.1  # the flag and a default


def test_evaluate_prints_accuracy_per_class_and_the_confusion_matrix(trained, mnist_dir, mnist, capsys):
    assert main(["evaluate", str(trained / "model.npz"), "--data-dir", str(mnist_dir), "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    model = MLP.load(trained / "model.npz")
    predicted = to_numpy(model.predict(mnist[2]))
    right = int((predicted == mnist[3]).sum())
    assert f"test accuracy {100 * right / 10_000:.2f}%  ({right} of 10000)" in out
    assert "per-class accuracy" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    counts = np.array([[int(v) for v in row[1:]] for row in rows[-10:]])
    assert counts.shape == (10, 10) and counts.sum() == 10_000 and np.trace(counts) == right


def test_evaluate_a_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nope.npz")]) == 1
    assert "nope.npz: no such model file" in capsys.readouterr().err


def test_predict_classifies_images_and_reports_the_unreadable_ones(trained, mnist, tmp_path, capsys):
    from PIL import Image

    from backprop_xp.data.images import mnist_like

    model = MLP.load(trained / "model.npz")
    digits = mnist[2][:2]
    white_on_black = tmp_path / "digit0.png"
    Image.fromarray((digits[0].reshape(28, 28) * 255).round().astype(np.uint8)).save(white_on_black)
    # The second digit as a person would draw it: dark on light, larger, in colour.
    paper = (255 - (digits[1].reshape(28, 28) * 255).round()).astype(np.uint8)
    dark_on_light = tmp_path / "digit1.png"
    Image.fromarray(np.kron(paper, np.ones((3, 3), np.uint8))).convert("RGB").save(dark_on_light)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a picture")
    blank = tmp_path / "blank.png"
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(blank)

    code = main(["predict", str(trained / "model.npz"), str(not_an_image), str(white_on_black),
                 str(tmp_path / "missing.png"), str(blank), str(dark_on_light)])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1  # some files failed, the others were still classified
    lines = captured.out.splitlines()
    assert len(lines) == 2
    seen = np.stack([mnist_like(digits[0].reshape(28, 28))[0], mnist_like(paper / np.float32(255))[0]])
    expected = to_numpy(model.predict_proba(seen))
    top3 = np.argsort(-expected[0])[:3]
    assert lines[0] == f"{white_on_black}: " + ", ".join(f"{k} ({100 * expected[0][k]:.1f}%)" for k in top3)
    assert lines[1].startswith(f"{dark_on_light}: {expected[1].argmax()} (") and "[inverted" in lines[1]
    err = captured.err
    assert "notes.png: not a readable image" in err
    assert "missing.png: no such file" in err
    assert "blank.png: no digit found: the image is blank" in err


def test_predict_reads_digits_on_a_page_wide_tiny_and_shows_what_it_saw(trained, mnist, tmp_path, capsys):
    from PIL import Image

    model = MLP.load(trained / "model.npz")
    x, y = mnist[2][:200], mnist[3][:200]
    right = np.flatnonzero(to_numpy(model.predict(x)) == y)[:12]  # digits this small model reads at 28x28
    paths = []
    for i, k in enumerate(right):
        ink = Image.fromarray((255 - x[k].reshape(28, 28) * 255).round().astype(np.uint8))  # dark on paper
        if i % 3 == 0:  # in the corner of an 800-px page
            picture = Image.new("L", (800, 800), 255)
            picture.paste(ink.resize((200, 200), Image.Resampling.BICUBIC), (20, 580))
        elif i % 3 == 1:  # a 600x200 picture
            picture = Image.new("L", (600, 200), 255)
            picture.paste(ink.resize((180, 180), Image.Resampling.BICUBIC), (400, 10))
        else:  # smaller than 28x28
            picture = ink.resize((20, 20), Image.Resampling.BICUBIC)
        paths.append(tmp_path / f"d{i}.png")
        picture.save(paths[-1])
    show = tmp_path / "seen" / "seen.png"
    assert main(["predict", str(trained), *map(str, paths), "--show", str(show)]) == 0  # the run folder works too
    lines = capsys.readouterr().out.splitlines()
    said = [int(line.split(": ")[1].split(" ")[0]) for line in lines[:-1]]
    assert np.mean(np.array(said) == y[right]) >= 0.75, (said, y[right].tolist())
    assert lines[-1] == f"wrote {show}"
    with Image.open(show) as image:
        assert image.format == "PNG" and image.size[0] > 300


def test_predict_reads_dark_ink_on_a_transparent_background(trained, mnist, tmp_path, capsys):
    from PIL import Image

    from backprop_xp.data.images import mnist_like

    model = MLP.load(trained / "model.npz")
    digit = mnist[2][0]
    expected = to_numpy(model.predict_proba(mnist_like(1 - digit.reshape(28, 28))[0][None, :]))[0]
    # What drawing programs export: black ink whose coverage is in the alpha channel.
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., 3] = (digit.reshape(28, 28) * 255).round().astype(np.uint8)
    path = tmp_path / "drawn.png"
    Image.fromarray(rgba, "RGBA").save(path)
    assert main(["predict", str(trained / "model.npz"), str(path)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{path}: {expected.argmax()} (") and "[inverted" in line


def test_a_truncated_model_file_is_a_one_line_error(trained, tmp_path, capsys):
    broken = tmp_path / "model.npz"
    broken.write_bytes((trained / "model.npz").read_bytes()[:1000])
    assert main(["evaluate", str(broken)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.npz: not a model file written by backprop-xp" in err
    np.save(tmp_path / "lone.npy", np.zeros(3))
    (tmp_path / "lone.npy").rename(tmp_path / "lone.npz")
    assert main(["predict", str(tmp_path / "lone.npz"), "x.png"]) == 1
    assert "lone.npz: not a model file written by backprop-xp (it holds a single array" in capsys.readouterr().err


def test_resume_through_the_command_line(trained, mnist_dir, tmp_path, capsys):
    # Changed settings are refused, naming them, as bad arguments (exit 2); a finished run resumes to itself.
    assert main(["train", "--resume", str(trained), "--lr", "0.5"]) == 2
    assert "different settings: lr 0.5 (the run has 0.1)" in capsys.readouterr().err
    assert main(["train", *QUICK, "--data-dir", str(mnist_dir), "--out", str(trained), "--quiet"]) == 2
    assert f"resume it with --resume {trained}" in capsys.readouterr().err
    assert main(["train", "--resume", str(trained), "--out", str(tmp_path)]) == 2
    assert "a resumed run stays in its folder" in capsys.readouterr().err


def test_divergence_exits_3_naming_epoch_and_step(mnist_dir, tmp_path, capsys):
    argv = ["train", *QUICK, "--lr", "1e20", "--data-dir", str(mnist_dir), "--out", str(tmp_path), "--quiet"]
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert "diverged" in err and "at epoch 1, step " in err and "try --lr 0.1 or smaller" in err  # not 1e+19
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "diverged"


def _same_model(a, b):
    with np.load(a, allow_pickle=False) as x, np.load(b, allow_pickle=False) as y:
        return all(np.array_equal(x[k], y[k]) for k in ("W1", "b1", "W2", "b2"))


def test_ctrl_c_mid_epoch_exits_130_and_resume_through_the_command_line_ends_exactly(trained, mnist_dir, tmp_path,
                                                                                      capsys, monkeypatch):  # fmt: skip
    # QUICK has 20 steps per epoch: Ctrl-C (a KeyboardInterrupt) arrives at step 10 of epoch 2.
    real_make_step = train_module.make_step
    calls = []

    def make_step(*args, **kwargs):
        step = real_make_step(*args, **kwargs)

        def interrupted_step(xb, yb):
            calls.append(1)
            if len(calls) == 30:
                raise KeyboardInterrupt
            return step(xb, yb)

        return interrupted_step

    monkeypatch.setattr(train_module, "make_step", make_step)
    out = tmp_path / "run"
    assert main(["train", *QUICK, "--data-dir", str(mnist_dir), "--out", str(out), "--quiet"]) == 130
    assert capsys.readouterr().err == (
        f"backprop-xp: interrupted; the last finished epoch is saved: continue with --resume {out}\n"
    )
    # On disk: epoch 1's checkpoint and metrics, no model, no temporary file.
    with np.load(out / "checkpoint.npz", allow_pickle=False) as f:
        assert int(f["train.epochs_done"]) == 1
    assert [r["epoch"] for r in json.loads((out / "metrics.json").read_text())["epochs"]] == [1]
    assert not (out / "model.npz").exists()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []

    monkeypatch.setattr(train_module, "make_step", real_make_step)
    assert main(["train", "--resume", str(out)]) == 0  # every setting (data folder included) from the checkpoint
    printed = capsys.readouterr().out
    assert f"resuming {out} after epoch 1 of 2" in printed and "epoch   2/2" in printed
    assert "epoch   1/2" not in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "finished" and [r["epoch"] for r in metrics["epochs"]] == [1, 2]
    # Interrupted at step 30 and resumed: the very model of the uninterrupted run in `trained`.
    assert _same_model(out / "model.npz", trained / "model.npz")
    assert (
        metrics["epochs"][-1]["test_accuracy"]
        == json.loads((trained / "metrics.json").read_text())["epochs"][-1]["test_accuracy"]
    )


def test_ctrl_c_before_the_first_epoch_ends_says_nothing_is_saved_and_the_same_command_starts_over(
    mnist_dir, tmp_path, capsys, monkeypatch
):
    real_make_step = train_module.make_step

    def make_step(*args, **kwargs):
        def interrupted_step(xb, yb):
            raise KeyboardInterrupt  # at the first step: no epoch, no checkpoint

        return interrupted_step

    monkeypatch.setattr(train_module, "make_step", make_step)
    out = tmp_path / "run"
    argv = ["train", *QUICK, "--data-dir", str(mnist_dir), "--out", str(out), "--quiet"]
    assert main(argv) == 130
    assert capsys.readouterr().err == (
        "backprop-xp: interrupted; no epoch had finished, so nothing is saved: run the same command again to start over\n"
    )  # not "continue with --resume", which has no checkpoint to continue from
    assert not (out / "checkpoint.npz").exists()
    monkeypatch.setattr(train_module, "make_step", real_make_step)
    assert main(argv) == 0  # the advice works
    assert json.loads((out / "metrics.json").read_text())["status"] == "finished"


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_real_sigint_or_sigterm_mid_epoch_exits_130_with_a_resumable_checkpoint(mnist_dir, tmp_path, signum):
    """Ctrl-C (SIGINT) and a scheduler's stop (SIGTERM) end a run alike: recorded, resumable, nothing half-written."""
    out = tmp_path / "run"
    argv = ["train", "--hidden", "64", "--train-size", "20000", "--epochs", "6", "--batch-size", "100",
            "--backend", "numpy", "--data-dir", str(mnist_dir), "--out", str(out), "--quiet"]  # fmt: skip
    proc = processes.start(argv)
    processes.wait_until_written(proc, [out / "checkpoint.npz"])
    _, err = processes.stop(proc, signum)  # SIGINT is what Ctrl-C sends
    assert proc.returncode == 130, err
    assert (
        err.strip().splitlines()[-1]
        == f"backprop-xp: interrupted; the last finished epoch is saved: continue with --resume {out}"
    )
    with np.load(out / "checkpoint.npz", allow_pickle=False) as f:
        done = int(f["train.epochs_done"])
    assert 1 <= done < 6
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    assert not (out / "model.npz").exists()
    assert json.loads((out / "metrics.json").read_text())["status"] == "interrupted"


@pytest.mark.slow
def test_a_run_folder_being_trained_by_another_process_is_refused_and_freed_when_that_process_dies(
    mnist_dir, tmp_path, capsys
):
    """Two processes training one folder would overwrite each other's checkpoints; a killed one locks nothing."""
    from backprop_xp import files

    out = tmp_path / "run"
    argv = ["train", "--hidden", "16", "--train-size", "3000", "--epochs", "500", "--val-size", "0",
            "--batch-size", "100", "--backend", "numpy", "--data-dir", str(mnist_dir), "--out", str(out), "--quiet"]  # fmt: skip
    proc = processes.start(argv)
    try:
        processes.wait_until_written(proc, [out / "checkpoint.npz"])
        assert main(["train", "--resume", str(out), "--data-dir", str(mnist_dir), "--quiet"]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"backprop-xp: error: {out} is in use by process {proc.pid} on ") and err.count("\n") == 1
        assert "wait for it to end or stop it" in err
        assert proc.poll() is None  # the run in progress is untouched
    finally:
        processes.kill(proc)  # SIGKILL: nothing of it runs to unlock
    with files.in_use(out):  # the kernel let go of a dead process's lock
        assert str(os.getpid()) in (out / files.LOCK).read_text()
    assert not (out / files.LOCK).exists()


def test_train_size_larger_than_the_data_is_a_one_line_error_and_writes_nothing(tmp_path, capsys):
    from idx_files import fake_mnist, write_mnist_folder

    folder = tmp_path / "mnist"
    write_mnist_folder(folder, fake_mnist(n_train=30, n_test=12, rows=28, cols=28), gz=True)
    out = tmp_path / "run"
    argv = ["train", "--hidden", "8", "--epochs", "1", "--batch-size", "10", "--backend", "numpy",
            "--data-dir", str(folder), "--out", str(out), "--quiet"]  # fmt: skip
    assert main([*argv, "--train-size", "31"]) == 2  # a setting that does not fit the data: a usage error
    assert capsys.readouterr().err == "backprop-xp: error: --train-size 31 is more than the 30 training images\n"
    assert not out.exists() or not any(out.iterdir())  # the folder is made (and checked) first; nothing is written
    assert main([*argv, "--train-size", "30"]) == 0  # exactly all of them is fine
    assert json.loads((out / "metrics.json").read_text())["config"]["n_train"] == 30


def test_a_loss_that_explodes_but_stays_finite_is_divergence_too(mnist_dir, tmp_path, capsys):
    # lr 50 leaves the loss finite (about 1e6) with accuracy at chance: that is no success.
    argv = ["train", *QUICK, "--lr", "50", "--data-dir", str(mnist_dir), "--out", str(tmp_path), "--quiet"]
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "training diverged at epoch 1: the training loss" in err
    assert "try --lr 0.1 or smaller" in err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and metrics["diverged"]["step"] is None
    assert not (tmp_path / "model.npz").exists()


# --------------------------------------------------------------------------- issue 15: a user's first hour


def test_a_batch_larger_than_the_training_set_is_refused(mnist_dir, tmp_path, capsys):
    argv = [
        "train",
        *QUICK,
        "--batch-size",
        "100000",
        "--data-dir",
        str(mnist_dir),
        "--out",
        str(tmp_path / "r"),
        "--quiet",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--batch-size 100000 is larger than the training set (2000 images); use at most 2000" in err


@pytest.mark.parametrize("where", ["file", "proc"])
def test_an_output_folder_that_cannot_be_made_is_one_clear_line(where, mnist_dir, tmp_path, capsys):
    if where == "proc":
        if not os.path.isdir("/proc/self"):
            pytest.skip("no /proc here")
        out = "/proc/backprop-xp-test"
    else:
        (tmp_path / "a-file").write_text("")
        out = str(tmp_path / "a-file" / "run")
    assert main(["train", *QUICK, "--data-dir", str(mnist_dir), "--out", out, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"backprop-xp: error: cannot create output folder {out}: ")
    assert "Errno" not in err
    assert main(["show-data", "--data-dir", str(mnist_dir), "--out", out + "/digits.png"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"output folder {out}: " in err and "does not exist" not in err.split(": ", 2)[2]
    bench = ["bench", "--data-dir", str(mnist_dir), "--out", out, "--engines", "numpy", "--train-size", "2000"]
    assert main(bench) == 1  # refused before any engine starts
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"backprop-xp: error: cannot create output folder {out}: ")
    assert "Errno" not in err


def test_the_first_line_names_the_backend_briefly_and_the_last_line_sums_up(mnist_dir, tmp_path, capsys):
    from backprop_xp.backend import get_backend
    from backprop_xp.training.run_files import cpu_step, cpu_step_words

    out = tmp_path / "run"
    assert main(["train", *QUICK, "--backend", "auto", "--data-dir", str(mnist_dir), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    metrics = json.loads((out / "metrics.json").read_text())
    if get_backend("auto").name == "numpy":
        expected = (
            f"backend numpy ({cpu_step_words(cpu_step())}; a GPU is here but not usable; --verbose says why)"
            if os.path.exists("/dev/nvidia0")
            else f"backend numpy ({cpu_step_words(cpu_step())}; no GPU found)"
        )
        assert lines[0] == expected
        assert metrics["config"]["backend_reason"].startswith("auto: using numpy because")
    final = metrics["epochs"][-1]
    best = max(metrics["epochs"], key=lambda row: row["test_accuracy"])
    assert lines[-1] == (
        f"done: test accuracy {100 * final['test_accuracy']:.2f}% (best {100 * best['test_accuracy']:.2f}% at epoch "
        f"{best['epoch']}), 2 epochs in {metrics['final']['wall_seconds']:.1f} s, in {out}"
    )
    # --quiet: that line is all there is; --verbose: the backend's full reason
    assert main(["train", "--resume", str(out), "--epochs", "3", "--quiet"]) == 0
    quiet = capsys.readouterr().out.splitlines()
    assert len(quiet) == 1 and quiet[0].startswith("done: test accuracy ") and ", 3 epochs; " in quiet[0]
    # the time is this session's, and says so (it read "3 epochs in 0.4 s" for one epoch's work)
    seconds = json.loads((out / "metrics.json").read_text())["final"]["wall_seconds"]
    assert quiet[0].endswith(f", 3 epochs; {seconds:.1f} s since resuming after epoch 2, in {out}")
    assert (
        main(
            ["train", *QUICK, "--epochs", "1", "--verbose", "--data-dir", str(mnist_dir), "--out", str(tmp_path / "v")]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "backend choice: " in printed and " 1 epoch, " in printed and "1 epochs" not in printed


def test_an_interrupted_run_says_so_in_its_metrics(mnist_dir, tmp_path, monkeypatch, capsys):
    import backprop_xp.training.run as train_module

    real_run_epoch = train_module.run_epoch

    def run_epoch(step, batches, epoch, **kwargs):
        if epoch == 1:
            raise KeyboardInterrupt  # Ctrl-C during the second epoch
        return real_run_epoch(step, batches, epoch, **kwargs)

    monkeypatch.setattr(train_module, "run_epoch", run_epoch)
    assert main(["train", *QUICK, "--data-dir", str(mnist_dir), "--out", str(tmp_path), "--quiet"]) == 130
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and len(metrics["epochs"]) == 1
    assert f"continue with --resume {tmp_path}" in capsys.readouterr().err


def test_a_run_interrupted_while_drawing_its_pictures_says_so_and_a_resume_finishes_it(
    mnist_dir, tmp_path, monkeypatch, capsys
):
    import backprop_xp.training.run as train_module

    real_draw = train_module.draw_run_pictures

    def draw_then_interrupt(out, *args):
        (out / "confusion.png").write_bytes(b"")  # a picture or two drawn, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "draw_run_pictures", draw_then_interrupt)
    assert main(["train", *QUICK, "--data-dir", str(mnist_dir), "--out", str(tmp_path), "--quiet"]) == 130
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and len(metrics["epochs"]) == 2  # all epochs trained, not "running"
    assert f"continue with --resume {tmp_path}" in capsys.readouterr().err
    monkeypatch.setattr(train_module, "draw_run_pictures", real_draw)
    assert main(["train", "--resume", str(tmp_path), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "finished" and len(metrics["epochs"]) == 2
    assert (tmp_path / "confusion.png").stat().st_size > 1000 and (tmp_path / "curves.png").exists()


def test_resume_works_from_another_folder_and_says_when_the_data_is_gone(mnist_dir, tmp_path, monkeypatch, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(mnist_dir, data)  # a copy in the test's own folder, given by a relative path
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            ["train", *QUICK, "--data-dir", "data", "--out", "runs/r", "--quiet"],
        )
        == 0
    )
    saved = json.loads((tmp_path / "runs/r/metrics.json").read_text())["config"]["data_dir"]
    assert saved == str(data)  # absolute
    monkeypatch.chdir(tmp_path / "runs")
    assert main(["train", "--resume", "r", "--epochs", "3", "--quiet"]) == 0  # cd runs && train --resume r
    capsys.readouterr()
    shutil.rmtree(data)
    assert main(["train", "--resume", "r", "--epochs", "4", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"the data folder of r, {data}, does not exist" in err and "pass --data-dir" in err
    assert main(["train", "--resume", "r", "--epochs", "4", "--data-dir", str(mnist_dir), "--quiet"]) == 0


def test_a_run_found_through_the_environment_variable_resumes_without_it(mnist_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BACKPROP_XP_DATA", str(mnist_dir))
    assert main(["train", *QUICK, "--out", str(tmp_path / "r"), "--quiet"]) == 0
    assert json.loads((tmp_path / "r/metrics.json").read_text())["config"]["data_dir"] == os.path.abspath(mnist_dir)
    monkeypatch.delenv("BACKPROP_XP_DATA")  # another shell, a later job: the data is still found, not downloaded
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    assert main(["train", "--resume", str(tmp_path / "r"), "--epochs", "3", "--quiet"]) == 0
    assert len(json.loads((tmp_path / "r/metrics.json").read_text())["epochs"]) == 3


def test_resume_with_more_epochs_continues_and_a_finished_run_is_left_alone(trained, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    stamps = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"{run} is already finished (2 epochs); nothing was changed" in out
    assert stamps == {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    assert main(["train", "--resume", str(run), "--epochs", "3", "--quiet"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert [r["epoch"] for r in metrics["epochs"]] == [1, 2, 3] and metrics["status"] == "finished"
    assert metrics["epochs_changed"] == [{"after_epoch": 2, "from": 2, "to": 3}]
    assert metrics["epochs"][2]["lr"] == pytest.approx(0.1 * 0.5 * (1 + np.cos(np.pi * 2 / 3)))  # cosine over 3 epochs
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2
    assert "it has already done 3" in capsys.readouterr().err


def test_keep_best_and_patience_choose_by_validation(mnist_dir, tmp_path, capsys):
    argv = ["train", *QUICK, "--epochs", "6", "--lr", "0.5", "--lr-schedule", "constant", "--val-size", "500",
            "--keep-best", "--patience", "2", "--data-dir", str(mnist_dir), "--out", str(tmp_path), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    rows = metrics["epochs"]
    best = max(rows, key=lambda r: (r["val_accuracy"], -r["epoch"]))
    assert metrics["final"]["epoch_kept"] == best["epoch"]
    if len(rows) < 6:  # stopped early: exactly `patience` epochs without improvement
        assert rows[-1]["epoch"] - best["epoch"] == 2 and metrics["stopped_early"]["best_epoch"] == best["epoch"]
    model = MLP.load(tmp_path / "model.npz")
    with np.load(tmp_path / "best.npz") as kept:
        np.testing.assert_array_equal(to_numpy(model.params["W1"]), kept["W1"])
    line = capsys.readouterr().out.strip()
    assert f"(best {100 * best['val_accuracy']:.2f}% at epoch {best['epoch']})" in line
    assert main(["train", *QUICK, "--keep-best", "--data-dir", str(mnist_dir), "--quiet"]) == 2
    assert "--val-size" in capsys.readouterr().err


def test_small_things_a_new_user_trips_over(trained, mnist_dir, tmp_path, monkeypatch, capsys):
    from PIL import Image

    # evaluate on something that is not a model: no advice to unpickle it
    png = tmp_path / "notes.png"
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(png)
    assert main(["evaluate", str(png)]) == 1
    err = capsys.readouterr().err
    assert "not a model file written by backprop-xp" in err and "pickle" not in err
    # evaluate RUN_DIR uses RUN_DIR/model.npz
    assert main(["evaluate", str(trained), "--data-dir", str(mnist_dir), "--backend", "numpy"]) == 0
    assert f"model {trained / 'model.npz'}: 784-32-10" in capsys.readouterr().out
    # show-data writes under runs/, not into the folder it is run from
    monkeypatch.chdir(tmp_path)
    assert main(["show-data", "--data-dir", str(mnist_dir), "--count", "10"]) == 0
    assert (tmp_path / "runs" / "digits.png").is_file() and not (tmp_path / "digits.png").exists()


# --------------------------------------------------------------------------- arguments checked before any work


def test_show_data_draws_at_most_100_digits(capsys):
    # matplotlib makes one axes per digit: 100 take about 4 s on 2 cores, 1000 about 40 s.
    from backprop_xp.cli import build_parser

    assert build_parser().parse_args(["show-data", "--count", "100"]).count == 100
    for count in ("101", "100000"):
        with pytest.raises(SystemExit) as info:
            build_parser().parse_args(["show-data", "--count", count])  # parsing only: the old code drew them all
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.count("\n") == 1
        assert f"argument --count: must be an integer from 1 to 100, got {count}" in err


def test_a_data_dir_that_is_a_file_is_called_not_a_folder(tmp_path, capsys):
    afile = tmp_path / "model.npz"
    afile.write_bytes(b"")
    _fails_with_usage_error(
        ["evaluate", str(afile), "--data-dir", str(afile)],
        capsys,
        f"--data-dir: {str(afile)!r} is a file, not a folder",
    )


@pytest.mark.parametrize(
    "command",
    [
        ["train", "--hidden", "8", "--epochs", "1", "--quiet"],
        ["sweep", "--hidden", "8", "--epochs", "1"],
        ["show-data", "--count", "1"],
        ["train", "--dataset", "fashion-mnist", "--hidden", "8", "--epochs", "1", "--quiet"],
    ],
    ids=["train", "sweep", "show-data", "fashion"],
)
@pytest.mark.parametrize("what", ["missing", "file"])
def test_a_data_folder_named_by_the_environment_is_checked_like_data_dir(command, what, tmp_path, monkeypatch, capsys):
    env = "BACKPROP_XP_FASHION_DATA" if "fashion-mnist" in command else "BACKPROP_XP_DATA"
    folder = tmp_path / "mnist"
    if what == "file":
        folder.write_text("")
    monkeypatch.setenv(env, str(folder))
    out = tmp_path / ("out.png" if command[0] == "show-data" else "out")
    assert main([*command, "--out", str(out)]) == 2  # a bad argument, as --data-dir with that folder is
    err = capsys.readouterr().err
    problem = (
        f"folder {str(folder)!r} does not exist" if what == "missing" else f"{str(folder)!r} is a file, not a folder"
    )
    assert err == f"backprop-xp: error: ${env}: {problem} (unset it or give --data-dir)\n"
    assert not out.exists()  # refused before anything was made


def test_evaluate_checks_the_environment_data_folder_of_the_models_data_set(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BACKPROP_XP_DATA", str(tmp_path / "gone"))
    assert main(["evaluate", str(trained), "--backend", "numpy"]) == 2
    assert capsys.readouterr().err.startswith(f"backprop-xp: error: $BACKPROP_XP_DATA: folder '{tmp_path / 'gone'}'")


@pytest.mark.parametrize("name, problem", [("img", "is a folder"), ("", "empty"), ("seen.jpg", "not a .png file")])
def test_a_picture_path_that_cannot_be_a_png_file_is_refused_before_any_work(name, problem, trained, tmp_path, capsys):
    from PIL import Image

    (tmp_path / "img").mkdir()
    digit = tmp_path / "d.png"
    ink = np.zeros((28, 28), np.uint8)
    ink[6:22, 12:16] = 255  # a "1"
    Image.fromarray(ink).save(digit)
    path = str(tmp_path / name) if name else ""
    for argv, flag in (
        (["predict", str(trained), str(digit), "--show", path], "--show"),
        (["show-data", "--count", "1", "--out", path], "--out"),
    ):
        with pytest.raises(SystemExit) as info:
            main(argv)
        captured = capsys.readouterr()
        assert info.value.code == 2, captured
        assert captured.out == ""  # nothing classified, no data loaded
        assert captured.err.count("\n") == 1 and f"argument {flag}: " in captured.err and problem in captured.err
        assert (repr(path) in captured.err) if name else True
        assert "Errno" not in captured.err and ".tmp" not in captured.err
    assert os.listdir(tmp_path / "img") == [] and not (tmp_path / "seen.jpg").exists()


def test_predicts_picture_titles_keep_long_file_names_apart():
    from backprop_xp.cli.predict import _title_name

    # Cut to the first 14 characters, both of these read "photo_of_digit" under their pictures.
    one, two = _title_name("pics/photo_of_digit_1.png"), _title_name("/tmp/photo_of_digit_2.jpg")
    assert one == "photo_…igit_1.png" and two == "photo_…igit_2.jpg"
    assert _title_name("scans/3.png") == "3.png" and _title_name("seventeen_chars.x") == "seventeen_chars.x"
    long = "a_very_long_name_for_a_picture_of_a_seven.jpeg"
    short = _title_name(long)
    head, tail = short.split("…")
    assert len(short) == 17 and long.startswith(head) and long.endswith(tail)  # the start and the end survive


def test_a_run_folder_without_model_names_its_best_epoch_file_if_it_has_one(tmp_path, capsys):
    """A --keep-best run that diverged has no model.npz, but its best epoch is in best.npz, which evaluate reads."""
    run = tmp_path / "run"
    run.mkdir()
    assert main(["evaluate", str(run)]) == 1
    assert capsys.readouterr().err == (
        f"backprop-xp: error: {run} holds no model.npz (a run writes it when it finishes; resume it with --resume {run})\n"
    )
    (run / "best.npz").write_bytes(b"")
    assert main(["evaluate", str(run)]) == 1
    assert f"; its best epoch so far is in {run / 'best.npz'})" in capsys.readouterr().err


# --------------------------------------------------------------------------- one declaration of each setting


def test_every_setting_has_exactly_one_flag_in_train_and_sweep():
    """train's and sweep's flags are made from TrainConfig's tables: a setting without its flag (or with two) fails here."""
    import argparse
    import dataclasses
    import re

    from backprop_xp.cli import build_parser
    from backprop_xp.training import TrainConfig

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("train", "sweep"):
        parser = commands.choices[command]
        text = parser.format_help()
        for field in dataclasses.fields(TrainConfig):
            flag = "--" + field.name.replace("_", "-")
            actions = [a for a in parser._actions if a.dest == field.name]
            assert [a.option_strings for a in actions] == [[flag]], (command, field.name)
            assert len(re.findall(rf"^  {flag}\b(?![-])", text, flags=re.MULTILINE)) == 1, (command, flag)
        # ... and every flag that is not a setting is one of the command's own
        own = (
            {"help", "out", "resume", "quiet", "verbose"}
            if command == "train"
            else {"help", "out", "jobs", "scheduler"}
        )
        settings = {f.name for f in dataclasses.fields(TrainConfig)}
        assert {a.dest for a in parser._actions} - settings == own, command


def test_the_data_folder_variable_is_read_in_one_place(tmp_path, monkeypatch):
    """$BACKPROP_XP_DATA (each data set's variable) is read by data.datasets.data_env alone, whoever asks.

    train, evaluate and show-data each check it and then load from the folder it
    names: every read of it, by any of them, must come from that one function.
    """
    from pathlib import Path

    from idx_files import fake_mnist, write_mnist_folder

    from backprop_xp.data.download import DATASETS

    variables = {info[1] for info in DATASETS.values()}
    readers = set()

    class Watched(dict):
        def _seen(self, key):
            if key in variables:
                caller = sys._getframe(2).f_code
                readers.add(f"{Path(caller.co_filename).name}:{caller.co_name}")

        def get(self, key, default=None):
            self._seen(key)
            return super().get(key, default)

        def __getitem__(self, key):
            self._seen(key)
            return super().__getitem__(key)

        def __contains__(self, key):
            self._seen(key)
            return super().__contains__(key)

    folder = tmp_path / "data"
    write_mnist_folder(folder, fake_mnist(rows=8, cols=8))  # square: show-data draws them
    monkeypatch.setattr(os, "environ", Watched({**os.environ, "BACKPROP_XP_DATA": str(folder)}))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))  # never the real cache
    run = tmp_path / "run"
    tiny = ["--hidden", "4", "--epochs", "1", "--batch-size", "10", "--backend", "numpy", "--quiet"]
    assert main(["train", *tiny, "--out", str(run)]) == 0
    assert main(["evaluate", str(run), "--backend", "numpy"]) == 0
    assert main(["show-data", "--out", str(tmp_path / "digits.png"), "--count", "4"]) == 0
    assert readers == {"datasets.py:data_env"}


def test_a_resume_reads_the_checkpoint_once(tmp_path, monkeypatch):
    """train --resume reads the run's saved settings once: the command line hands what it read to train()."""
    from idx_files import write_mnist_folder

    import backprop_xp.training as training

    folder = tmp_path / "data"
    write_mnist_folder(folder)
    run = tmp_path / "run"
    tiny = ["--hidden", "4", "--batch-size", "10", "--backend", "numpy", "--quiet", "--data-dir", str(folder)]
    assert main(["train", *tiny, "--epochs", "1", "--out", str(run)]) == 0
    reads = []

    def counted(out_dir):
        reads.append(out_dir)
        return original(out_dir)

    original = training.read_checkpoint
    monkeypatch.setattr(training, "read_checkpoint", counted)  # where the command line finds it
    monkeypatch.setattr(train_module, "read_checkpoint", counted)  # where train() finds it
    assert main(["train", "--resume", str(run), "--epochs", "2", "--quiet"]) == 0
    assert len(reads) == 1 and json.loads((run / "metrics.json").read_text())["status"] == "finished"
