"""The training loop: schedules, the epoch sums, evaluation, a real run, resume, divergence."""

from __future__ import annotations

import csv
import json
import math
import os
import re

import numpy as np
import pytest

from backprop_xp import MLP, SGD
from backprop_xp.data import Minibatches
from backprop_xp.training import (
    CHECKPOINT,
    SCHEDULES,
    Diverged,
    TrainConfig,
    confusion_matrix,
    cosine_lr,
    evaluate,
    make_step,
    run_epoch,
    step_lr,
    train,
)

# Small runs on real data: a few thousand images, a small hidden layer.
SMALL = dict(hidden=32, train_size=3000, epochs=3, batch_size=100, backend="numpy")


def test_schedules_start_at_the_base_rate_and_never_grow():
    for name, schedule in SCHEDULES.items():
        rates = [schedule(e, 10, 0.2) for e in range(10)]
        assert rates[0] == 0.2, name
        assert all(b <= a for a, b in zip(rates, rates[1:])), name
        assert all(r > 0 for r in rates), name
    assert cosine_lr(5, 10, 0.2) == pytest.approx(0.1)
    assert [step_lr(e, 8, 1.0) for e in (3, 4, 5, 6, 7)] == pytest.approx([1.0, 0.1, 0.1, 0.01, 0.01])


class _ListBatches:
    """Batches given as a list, the same every epoch (what run_epoch needs of Minibatches)."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def epoch(self, epoch):
        return iter(self.batches)


def test_run_epoch_weights_losses_by_batch_size_and_finds_the_first_bad_step():
    sizes = [4, 4, 2]
    batches = _ListBatches([(np.zeros((n, 3), np.float32), np.zeros(n, np.int64)) for n in sizes])
    losses = iter([np.float32(1.0), np.float32(2.0), np.float32(4.0)])
    sums = run_epoch(lambda xb, yb: (next(losses), xb.shape[0] - 1), batches, 0)
    assert sums.loss_sum == 4 * 1.0 + 4 * 2.0 + 2 * 4.0
    assert (sums.n_correct, sums.n_samples, sums.first_bad_step) == (3 + 3 + 1, 10, None)

    seen = []
    losses = iter([np.float32(1.0), np.float32(np.inf), np.float32(np.nan)])
    sums = run_epoch(
        lambda xb, yb: (next(losses), 0), batches, 0, progress=lambda n, loss: seen.append(n), progress_every=2
    )
    assert sums.first_bad_step == 1
    assert math.isnan(sums.loss_sum)
    assert sum(seen) == 10  # the progress callback saw every sample once


def _reference_logits(params, x):
    """ReLU network logits in float64, written out from the parameters (not through the model's forward pass)."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    return np.maximum(np.asarray(x, np.float64) @ p["W1"].T + p["b1"], 0) @ p["W2"].T + p["b2"]


def test_make_step_on_numpy_reports_the_batch_then_applies_sgd_with_momentum_and_weight_decay(mnist):
    # The reference is written out here: the loss and correct count of the parameters *before* the step,
    # then v <- mu v + g + lambda w, w <- w - lr v, with g the gradient at those parameters.
    x, y = mnist[0][:256], mnist[1][:256]
    lr, mu, wd = 0.1, 0.9, 1e-3
    model = MLP(784, 16, 10, seed=1, dtype="float64")
    model.params["b1"][...] = np.linspace(-0.1, 0.1, 16)  # non-zero biases: a forward pass that ignores them fails
    step = make_step(model, SGD(model, lr, momentum=mu, weight_decay=wd))
    twin = MLP(784, 16, 10, seed=1, dtype="float64")  # only its checked loss_and_grads is used
    w = {k: v.copy() for k, v in model.params.items()}
    v = {k: np.zeros_like(p) for k, p in w.items()}
    for start in (0, 128, 0):
        xb, yb = x[start : start + 128], y[start : start + 128]
        for k in w:
            twin.params[k][...] = w[k]
        z = _reference_logits(w, xb)
        want_loss, grads = twin.loss_and_grads(xb, yb)
        loss, n_correct = step(xb, yb)
        assert float(loss) == pytest.approx(want_loss, rel=1e-12)
        assert int(n_correct) == int((z.argmax(axis=1) == yb).sum())
        for k in w:
            v[k] = mu * v[k] + grads[k] + wd * w[k]
            w[k] = w[k] - lr * v[k]
            np.testing.assert_allclose(model.params[k], w[k], rtol=1e-12, atol=1e-15, err_msg=k)


def test_run_epoch_trains_through_minibatches(mnist):
    x, y = mnist[0][:2000], mnist[1][:2000]
    model = MLP(784, 32, 10, seed=0)
    step = make_step(model, SGD(model, 0.05, momentum=0.9))
    batches = Minibatches(x, y, 64, seed=0)
    first = run_epoch(step, batches, 0)
    second = run_epoch(step, batches, 1)
    assert first.n_samples == second.n_samples == 2000
    assert second.loss_sum < first.loss_sum  # it learns
    assert 0 <= first.n_correct <= 2000


def test_evaluate_matches_a_direct_computation(mnist):
    x, y = mnist[2][:500], mnist[3][:500]
    model = MLP(784, 20, 10, seed=3)
    rng = np.random.default_rng(3)
    for name in ("b1", "b2"):  # non-zero biases, so that a forward pass that drops one is seen
        model.params[name][...] = rng.normal(scale=0.5, size=model.params[name].shape)
    loss, accuracy = evaluate(model, x, y)
    z = _reference_logits(model.params, x)  # from the parameters, not from model.logits
    log_p = z - z.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    assert loss == pytest.approx(-log_p[np.arange(500), y].mean(), rel=1e-5)
    top2 = np.sort(z, axis=1)[:, -2:]
    unclear = int((top2[:, 1] - top2[:, 0] < 1e-4).sum())  # within float32 rounding of a tie
    assert abs(accuracy * 500 - int((z.argmax(axis=1) == y).sum())) <= unclear


def test_confusion_matrix_counts_every_pair():
    counts = confusion_matrix(np.array([0, 0, 2, 1]), np.array([0, 2, 2, 1]), 3)
    assert counts.tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 1]]
    assert counts.sum() == 4


def test_config_validation_names_the_setting():
    for bad, name in [
        (dict(hidden=0), "hidden"),
        (dict(lr=-1.0), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(batch_size=0), "batch-size"),
        (dict(momentum=1.0), "momentum"),
        (dict(lr_schedule="linear"), "lr-schedule"),
        (dict(backend="tpu"), "backend"),
    ]:
        with pytest.raises(ValueError, match=name):
            TrainConfig(**bad).validate()


def test_a_real_run_learns_and_writes_every_file(mnist_dir, mnist, tmp_path):
    # The CI smoke run: 10,000 training images, one epoch, over 90% test accuracy.
    config = TrainConfig(hidden=128, train_size=10_000, epochs=1, batch_size=32, lr=0.05, lr_schedule="constant",
                         backend="numpy", data_dir=str(mnist_dir))  # fmt: skip
    lines = []
    metrics = train(config, tmp_path, echo=lines.append, progress=False)
    row = metrics["epochs"][-1]
    assert row["test_accuracy"] > 0.90
    assert metrics["status"] == "finished" and len(metrics["epochs"]) == 1

    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["config"]["hidden"] == 128 and saved["config"]["backend_used"] == "numpy"
    assert saved["config"]["environment"]["numpy"] == np.__version__
    assert set(saved["epochs"][0]) >= {"epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "seconds"}
    assert saved["epochs"][0]["seconds"] > 0
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and float(rows[0]["test_accuracy"]) == row["test_accuracy"]

    with np.load(tmp_path / "model.npz", allow_pickle=False) as f:
        assert f["W1"].shape == (128, 784) and f["W1"].dtype == np.float32
    model = MLP.load(tmp_path / "model.npz")
    assert evaluate(model, mnist[2], mnist[3]) == (row["test_loss"], row["test_accuracy"])

    from PIL import Image

    for name in ("curves.png", "confusion.png", "misclassified.png", "weights.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and min(image.size) > 200, name
    assert any(line.startswith("epoch   1/1") for line in lines)


def test_resume_ends_bit_for_bit_where_an_uninterrupted_run_ends(mnist_dir, tmp_path):
    config = TrainConfig(**SMALL, momentum=0.9, weight_decay=1e-4, val_size=300, data_dir=str(mnist_dir))
    straight = train(config, tmp_path / "straight", echo=None, pictures=False)
    stopped = train(config, tmp_path / "resumed", echo=None, pictures=False, stop_after=1)
    assert stopped["status"] == "stopped" and len(stopped["epochs"]) == 1
    resumed = train(config, tmp_path / "resumed", resume=True, echo=None, pictures=False)
    with np.load(tmp_path / "straight/model.npz") as a, np.load(tmp_path / "resumed/model.npz") as b:
        for name in ("W1", "b1", "W2", "b2"):
            assert np.array_equal(a[name], b[name]), name
    assert [r["train_loss"] for r in straight["epochs"]] == [r["train_loss"] for r in resumed["epochs"]]


def test_resume_refuses_changed_settings_and_a_new_run_refuses_an_old_folder(mnist_dir, tmp_path):
    config = TrainConfig(**SMALL, data_dir=str(mnist_dir))
    train(config, tmp_path, echo=None, pictures=False, stop_after=1)
    changed = TrainConfig(**{**SMALL, "lr": 0.5}, data_dir=str(mnist_dir))
    with pytest.raises(ValueError, match=r"different settings: lr 0.5 \(the run has 0.1\)"):
        train(changed, tmp_path, resume=True, echo=None)
    with pytest.raises(ValueError, match="already holds a run"):
        train(config, tmp_path, echo=None)


def test_a_new_run_refuses_a_folder_whose_checkpoint_was_deleted_but_not_one_where_no_epoch_ended(mnist_dir, tmp_path):
    config = TrainConfig(**SMALL, data_dir=str(mnist_dir))
    train(config, tmp_path / "run", echo=None, pictures=False)
    (tmp_path / "run" / CHECKPOINT).unlink()  # the largest file, deleted to save room: the run is still there
    with pytest.raises(ValueError, match=r"already holds a run \(no checkpoint to resume it from\); choose another"):
        train(config, tmp_path / "run", echo=None)
    (tmp_path / "run" / "model.npz").unlink()  # its metrics alone are still somebody's results
    with pytest.raises(ValueError, match="already holds a run"):
        train(config, tmp_path / "run", echo=None)
    # Metrics without an epoch (interrupted before the first ended) hold nothing: a new run starts there.
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "metrics.json").write_text('{"config": {}, "status": "interrupted", "epochs": []}')
    assert train(config, tmp_path / "new", echo=None, pictures=False)["status"] == "finished"


def _tiny_data(folder, n_train: int, n_test: int, side: int = 8) -> str:
    """A learnable data set of side x side images in 3 classes."""
    from idx_files import write_mnist_folder

    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = (np.arange(n) % 3).astype(np.uint8)
        images = rng.integers(0, 40, (n, side, side)).astype(np.uint8)
        for k in range(3):  # each class lights its own rows
            images[labels == k, 2 * k : 2 * k + 2, :] = 200
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    write_mnist_folder(folder, arrays)
    return str(folder)


def test_a_resume_on_data_of_other_sizes_is_refused_naming_each_difference(tmp_path):
    first = _tiny_data(tmp_path / "first", 300, 60)
    config = TrainConfig(hidden=8, epochs=3, batch_size=30, val_size=0, backend="numpy", data_dir=first)
    train(config, tmp_path / "run", echo=None, pictures=False, stop_after=1)
    before = (tmp_path / "run" / CHECKPOINT).read_bytes()
    for other, difference in (
        (_tiny_data(tmp_path / "fewer", 300, 30), "test images 30 (the run had 60)"),
        (_tiny_data(tmp_path / "larger", 300, 60, side=10), "image size 100 (the run had 64)"),
    ):
        moved = TrainConfig(**{**config.to_dict(), "data_dir": other})
        with pytest.raises(
            ValueError, match=r"cannot resume .*: the data in .* is not the run's: " + re.escape(difference)
        ):
            train(moved, tmp_path / "run", resume=True, echo=None)
    assert (tmp_path / "run" / CHECKPOINT).read_bytes() == before
    assert train(config, tmp_path / "run", resume=True, echo=None, pictures=False)["status"] == "finished"


def test_a_corrupt_metrics_json_is_an_error_naming_the_file(mnist_dir, tmp_path):
    config = TrainConfig(**SMALL, data_dir=str(mnist_dir))
    train(config, tmp_path, echo=None, pictures=False, stop_after=1)
    (tmp_path / "metrics.json").write_text("{bad json")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'metrics.json'} is not valid JSON (")):
        train(config, tmp_path, resume=True, echo=None)
    (tmp_path / "metrics.json").unlink()  # as the message says: the checkpoint has the metrics
    assert len(train(config, tmp_path, resume=True, echo=None, pictures=False)["epochs"]) == 3


def test_divergence_stops_at_once_and_keeps_the_last_good_checkpoint(mnist_dir, tmp_path, monkeypatch):
    # A rate that explodes in the second epoch: the first epoch's checkpoint must survive.
    monkeypatch.setitem(SCHEDULES, "constant", lambda epoch, epochs, lr: lr if epoch == 0 else 1e12)
    config = TrainConfig(**SMALL, lr_schedule="constant", data_dir=str(mnist_dir))
    with pytest.raises(Diverged) as info:
        train(config, tmp_path, echo=None, pictures=False)
    assert (info.value.epoch, info.value.lr) == (2, 1e12)
    assert 1 <= info.value.step <= 30
    message = str(info.value)
    assert "epoch 2, step" in message and "NaN or infinite" in message and CHECKPOINT in message
    assert "try --lr 0.01 or smaller" in message  # 10 times smaller than the base rate, 0.1

    with np.load(tmp_path / CHECKPOINT, allow_pickle=False) as f:
        assert int(f["train.epochs_done"]) == 1
        assert all(np.isfinite(f[name]).all() for name in ("W1", "b1", "W2", "b2"))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and metrics["diverged"]["epoch"] == 2
    assert len(metrics["epochs"]) == 1
    assert not (tmp_path / "model.npz").exists()


def test_run_epoch_on_the_cpu_stops_at_the_first_nonfinite_loss():
    x, y = np.zeros((50, 3), np.float32), np.zeros(50, np.int64)
    losses = [0.5, 0.25, float("nan"), 0.125, 0.1]
    calls = []

    def step(xb, yb):
        calls.append(len(yb))
        return np.float32(losses[len(calls) - 1]), np.int64(len(yb))

    sums = run_epoch(step, Minibatches(x, y, 10, seed=0), 0, stop_at_nonfinite=True)
    assert len(calls) == 3 and sums.first_bad_step == 2 and sums.n_samples == 30
    calls.clear()
    sums = run_epoch(step, Minibatches(x, y, 10, seed=0), 0)  # as on a GPU: checked once, at the end
    assert len(calls) == 5 and sums.first_bad_step == 2 and sums.n_correct == 50


def test_the_network_sizes_come_from_the_data(tmp_path):
    # 8x8 images in 3 classes: nothing may assume 784 inputs or 10 classes.
    from idx_files import write_mnist_folder

    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 300), ("test", 60)):
        labels = (np.arange(n) % 3).astype(np.uint8)
        images = np.zeros((n, 8, 8), np.uint8)
        for k in range(3):  # each class lights its own rows: learnable
            images[labels == k, 2 * k : 2 * k + 2, :] = 200
        images = np.clip(images + rng.integers(0, 40, images.shape), 0, 255).astype(np.uint8)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    write_mnist_folder(tmp_path / "data", arrays)
    config = TrainConfig(hidden=8, epochs=3, batch_size=30, backend="numpy", data_dir=str(tmp_path / "data"))
    metrics = train(config, tmp_path / "run", echo=None)
    model = MLP.load(tmp_path / "run" / "model.npz")
    assert (model.n_inputs, model.n_outputs) == (64, 3)
    assert metrics["config"]["n_inputs"] == 64 and metrics["config"]["n_outputs"] == 3
    assert metrics["final"]["test_accuracy"] > 0.9
    assert (tmp_path / "run" / "weights.png").is_file() and (tmp_path / "run" / "confusion.png").is_file()


@pytest.mark.skipif(
    not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="apt-get install dataset-fashion-mnist"
)
def test_train_on_fashion_mnist(tmp_path):
    config = TrainConfig(hidden=32, train_size=2000, epochs=1, batch_size=100, backend="numpy", dataset="fashion-mnist",
                         data_dir="/usr/share/datasets/fashion-mnist")  # fmt: skip
    metrics = train(config, tmp_path, echo=None, pictures=False)
    assert metrics["config"]["dataset"] == "fashion-mnist" and 0.5 < metrics["final"]["test_accuracy"] < 0.9


@pytest.mark.parametrize(
    "case",
    ["label too large", "negative label", "float labels", "labels shorter than the batch", "1-D x", "uint8 pixels"],
)
def test_make_step_checks_its_batch_instead_of_reading_past_a_row(cpu_path, case):
    """The step a user builds checks its batch (a bad label once crashed the interpreter in the compiled kernels)."""
    rng = np.random.default_rng(0)
    model = MLP(784, 16, 10, seed=0)
    step = make_step(model, SGD(model, lr=0.1, momentum=0.9))
    x, y = rng.random((32, 784), dtype=np.float32), np.arange(32) % 10
    before = model.flat_params.copy()
    bad = {
        "label too large": (x, np.where(np.arange(32) == 0, 100_000_000, y)),
        "negative label": (x, np.where(np.arange(32) == 0, -1, y)),
        "float labels": (x, y.astype(float)),
        "labels shorter than the batch": (x, y[:20]),
        "1-D x": (x[0], y),
        "uint8 pixels": ((x * 255).astype(np.uint8), y),
    }[case]
    with pytest.raises(ValueError, match="label|x "):
        step(*bad)
    assert np.array_equal(model.flat_params, before)  # no update from a refused batch
    loss, n_correct = step(x, y)  # a good batch still trains
    assert np.isfinite(loss) and 0 <= n_correct <= 32


def test_train_given_a_dict_says_how_to_make_a_config(tmp_path):
    with pytest.raises(TypeError, match=r"config must be a TrainConfig \(TrainConfig\(\*\*settings\)\), got dict"):
        train({"hidden": 8}, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_warm_up_loads_the_fused_kernels_before_any_epoch_is_timed(cpu_path):
    """In a fresh process: the first epoch of a short run took 0.7 s of loading against 0.01 s of steps."""
    import subprocess
    import sys

    script = "\n".join([
        "import numpy as np, backprop_xp as bx",
        "from backprop_xp.cpu import hidden_major, numba_loops",
        "from backprop_xp.step import warm_up",
        "model = bx.MLP(784, 16, 10, seed=0); before = model.flat_params.copy()",
        "warm_up(model, bx.SGD(model, lr=0.1, momentum=0.9), 32)",
        "assert np.array_equal(model.flat_params, before)  # the run's own parameters are not touched",
        "loaded = numba_loops._state['kernels'] is not None and all(",
        "    getattr(numba_loops._kernels(), k).signatures for k in ('momentum_flushed_serial',))",
        "loaded = loaded and hidden_major._state['kernel'] is not None and bool(hidden_major._kernels()[0].signatures)",
        "print(loaded)",
    ])  # fmt: skip
    env = {**os.environ, "BACKPROP_XP_FAST": "1" if cpu_path == "fast" else "0"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ("True" if cpu_path == "fast" else "False")  # nothing to load on the NumPy path
