"""The command line: bad arguments, train -> evaluate -> predict, resume and divergence exit codes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from backprop_xp import MLP
from backprop_xp.backend import to_numpy
from backprop_xp import train as train_module
from backprop_xp.cli import main

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
        (["train", "--lr", "-1"], "--lr: must be > 0, got -1"),
        (["train", "--lr", "nan"], "--lr: must be a finite number"),
        (["train", "--batch-size", "0"], "--batch-size: must be an integer >= 1, got 0"),
        (["train", "--epochs", "0"], "--epochs: must be an integer >= 1"),
        (["train", "--momentum", "1"], "--momentum: must be in [0, 1)"),
        (["train", "--weight-decay", "-0.1"], "--weight-decay: must be >= 0"),
        (["train", "--data-dir", "/no/such/folder"], "--data-dir: folder '/no/such/folder' does not exist"),
        (["train", "--backend", "tpu"], "--backend: 'tpu' is not one of auto, numpy, cupy"),
        (["train", "--activation", "gelu"], "--activation: 'gelu' is not one of relu, sigmoid, tanh"),
        (["train", "--lr-schedule", "linear"], "--lr-schedule: 'linear' is not one of constant, step, cosine"),
        (["train", "--dtype", "float16"], "--dtype: 'float16' is not one of float32, float64"),
        (["train", "--resume", "/no/such/run"], "--resume: folder '/no/such/run' does not exist"),
        (["sweep", "--lr", "0.1,-1"], "--lr: must be > 0, got -1"),
        (["sweep", "--hidden", "32,,0"], "--hidden: must be an integer >= 1, got 0"),
        (["sweep", "--jobs", "0"], "--jobs: must be an integer >= 1"),
        (["train", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_code_2(argv, fragment, capsys):
    _fails_with_usage_error(argv, capsys, fragment)


def test_the_module_runs_as_a_program():
    ok = subprocess.run([sys.executable, "-m", "backprop_xp", "train", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "--lr-schedule" in ok.stdout and "--resume" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "backprop_xp", "train", "--hidden", "0"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "backprop-xp train: error: argument --hidden: must be an integer >= 1, got 0 (see backprop-xp train --help)"


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

    model = MLP.load(trained / "model.npz")
    digits = mnist[2][:2]
    expected = to_numpy(model.predict_proba(digits))
    white_on_black = tmp_path / "digit0.png"
    Image.fromarray((digits[0].reshape(28, 28) * 255).round().astype(np.uint8)).save(white_on_black)
    # The second digit as a person would draw it: dark on light, larger, in colour.
    paper = (255 - (digits[1].reshape(28, 28) * 255).round()).astype(np.uint8)
    dark_on_light = tmp_path / "digit1.png"
    Image.fromarray(np.kron(paper, np.ones((3, 3), np.uint8))).convert("RGB").save(dark_on_light)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a picture")
    too_small = tmp_path / "small.png"
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(too_small)

    code = main(["predict", str(trained / "model.npz"), str(not_an_image), str(white_on_black),
                 str(tmp_path / "missing.png"), str(too_small), str(dark_on_light)])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1  # some files failed, the others were still classified
    lines = captured.out.splitlines()
    assert len(lines) == 2
    top3 = np.argsort(-expected[0])[:3]
    assert lines[0] == f"{white_on_black}: " + ", ".join(f"{k} ({100 * expected[0][k]:.1f}%)" for k in top3)
    assert lines[1].startswith(f"{dark_on_light}: {expected[1].argmax()} (") and "[inverted" in lines[1]
    err = captured.err
    assert "notes.png: not a readable image" in err
    assert "missing.png: no such file" in err
    assert "small.png: image is 12x10, smaller than 28x28" in err


def test_predict_reads_dark_ink_on_a_transparent_background(trained, mnist, tmp_path, capsys):
    from PIL import Image

    model = MLP.load(trained / "model.npz")
    digit = mnist[2][0]
    expected = to_numpy(model.predict_proba(digit[None, :]))[0]
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
    # Changed settings are refused, naming them; a finished run resumes to itself.
    assert main(["train", "--resume", str(trained), "--lr", "0.5"]) == 1
    assert "different settings: lr 0.5 (the run has 0.1)" in capsys.readouterr().err
    assert main(["train", *QUICK, "--data-dir", str(mnist_dir), "--out", str(trained), "--quiet"]) == 1
    assert f"resume it with --resume {trained}" in capsys.readouterr().err
    assert main(["train", "--resume", str(trained), "--out", str(tmp_path)]) == 1
    assert "a resumed run stays in its folder" in capsys.readouterr().err


def test_divergence_exits_3_naming_epoch_and_step(mnist_dir, tmp_path, capsys):
    argv = ["train", *QUICK, "--lr", "1e20", "--data-dir", str(mnist_dir), "--out", str(tmp_path), "--quiet"]
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert "diverged" in err and "at epoch 1, step " in err and "try a smaller --lr (e.g. 1e+19)" in err
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
    assert metrics["epochs"][-1]["test_accuracy"] == json.loads((trained / "metrics.json").read_text())["epochs"][-1]["test_accuracy"]


@pytest.mark.slow
def test_a_real_sigint_mid_epoch_exits_130_with_a_resumable_checkpoint(mnist_dir, tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "backprop_xp", "train", "--hidden", "64", "--train-size", "20000", "--epochs", "6",
            "--batch-size", "100", "--backend", "numpy", "--data-dir", str(mnist_dir), "--out", str(out), "--quiet"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.npz").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == f"backprop-xp: interrupted; the last finished epoch is saved: continue with --resume {out}"
    with np.load(out / "checkpoint.npz", allow_pickle=False) as f:
        done = int(f["train.epochs_done"])
    assert 1 <= done < 6
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    assert not (out / "model.npz").exists()


def test_train_size_larger_than_the_data_is_a_one_line_error_and_writes_nothing(tmp_path, capsys):
    from idx_files import fake_mnist, write_mnist_folder

    folder = tmp_path / "mnist"
    write_mnist_folder(folder, fake_mnist(n_train=30, n_test=12, rows=28, cols=28), gz=True)
    out = tmp_path / "run"
    argv = ["train", "--hidden", "8", "--epochs", "1", "--batch-size", "10", "--backend", "numpy",
            "--data-dir", str(folder), "--out", str(out), "--quiet"]  # fmt: skip
    assert main([*argv, "--train-size", "31"]) == 1
    assert capsys.readouterr().err == "backprop-xp: error: train-size 31 is more than the 30 training images\n"
    assert not out.exists()
    assert main([*argv, "--train-size", "30"]) == 0  # exactly all of them is fine
    assert json.loads((out / "metrics.json").read_text())["config"]["n_train"] == 30
