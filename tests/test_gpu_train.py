"""Training, checkpoints, loading and evaluation on CuPy, end to end, against NumPy.

tests/test_gpu.py checks the kernels and the fused step one call at a time;
this file runs what a user runs: ``train(backend="cupy")`` (and ``train
--backend cupy --tf32`` through the command line), divergence, checkpoints
holding the device-resident momentum and resuming from them,
``MLP.load(..., backend="cupy")``, and ``evaluate``/``predict`` on the device.

Every test needs real MNIST (``mnist_dir``) and, on CuPy, a usable CUDA
device (the ``cupy`` fixture of conftest.py skips with the reason
otherwise). The tests whose assertions are not about the GPU (a run's files,
divergence, checkpoints and resuming) also run on NumPy (the ``backend``
fixture), so that an assertion the CPU code contradicts fails here, on every
machine, not first on a GPU. Sizes are small: a few thousand images, a hidden
layer of 64.

Tolerances: the GPU sums matrix products in another order than the CPU's
BLAS, so float32 results agree to a few ulps per step, and trained networks
drift apart slowly; they are compared by what training should preserve
(accuracy within a point, losses within a percent). TF32 rounds the inputs of
every product to 10 mantissa bits (relative error 2^-11 per input).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from backprop_xp import MLP
from backprop_xp.backend import to_numpy
from backprop_xp.training import CHECKPOINT, SCHEDULES, Diverged, TrainConfig, evaluate, train
from backprop_xp.training import run as train_module

pytestmark = pytest.mark.gpu

SMALL = dict(hidden=64, train_size=3000, epochs=2, batch_size=100, lr=0.05, lr_schedule="constant", momentum=0.9)
PARAMS = ("W1", "b1", "W2", "b2")


@pytest.fixture(params=["numpy", "cupy"])
def backend(request):
    """Each backend in turn; CuPy skips (with the reason) where no usable CUDA device exists."""
    if request.param == "cupy":
        request.getfixturevalue("cupy")
        request.getfixturevalue("set_tf32")
    return request.param


@pytest.fixture
def set_tf32(cupy):
    """``cuda.step.set_tf32``; CuPy's float32 products are left without TF32 after the test, whatever it did."""
    from backprop_xp.cuda.fused_gpu_step import set_tf32

    yield set_tf32
    set_tf32(False)


def _counting_steps(monkeypatch):
    """Wrap train's make_step so that the test sees how many steps ran."""
    real = train_module.make_step
    calls = []

    def make_step(*args, **kwargs):
        step = real(*args, **kwargs)

        def counted(xb, yb):
            calls.append(1)
            return step(xb, yb)

        return counted

    monkeypatch.setattr(train_module, "make_step", make_step)
    return calls


def _clear_rows(z, margin=1e-3):
    """Rows whose two largest logits are further apart than float32 rounding can move them."""
    top2 = np.sort(np.asarray(z, np.float64), axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0] > margin * max(1.0, float(np.abs(z).max()))


def test_train_end_to_end_agrees_with_numpy(backend, mnist_dir, mnist, tmp_path):
    """On CuPy against NumPy (on NumPy, against itself: the files, the records and the saved model's score)."""
    gpu = train(TrainConfig(**SMALL, backend=backend, data_dir=str(mnist_dir)), tmp_path / "gpu", echo=None)
    cpu = train(
        TrainConfig(**SMALL, backend="numpy", data_dir=str(mnist_dir)), tmp_path / "cpu", echo=None, pictures=False
    )
    assert gpu["status"] == "finished" and [r["epoch"] for r in gpu["epochs"]] == [1, 2]
    saved = json.loads((tmp_path / "gpu" / "metrics.json").read_text())
    assert saved["config"]["backend_used"] == backend
    assert ("cupy" in saved["config"]["environment"]) == (backend == "cupy")
    for name in (
        "model.npz",
        "checkpoint.npz",
        "metrics.csv",
        "curves.png",
        "confusion.png",
        "misclassified.png",
        "weights.png",
    ):
        assert (tmp_path / "gpu" / name).stat().st_size > 0, name
    # Same initial weights, same shuffles: the two backends train the same network, up to rounding.
    for g, c in zip(gpu["epochs"], cpu["epochs"]):
        assert g["train_loss"] == pytest.approx(c["train_loss"], rel=1e-2)
        assert abs(g["test_accuracy"] - c["test_accuracy"]) <= 0.01
    assert gpu["epochs"][-1]["test_accuracy"] > 0.85
    # The model written on the GPU loads on the CPU and scores what the GPU measured.
    model = MLP.load(tmp_path / "gpu" / "model.npz")
    assert model.backend.name == "numpy" and model.n_hidden == 64
    loss, accuracy = evaluate(model, mnist[2], mnist[3])
    assert loss == pytest.approx(gpu["epochs"][-1]["test_loss"], rel=1e-4)
    assert abs(accuracy - gpu["epochs"][-1]["test_accuracy"]) <= 0.0005  # at most a few near-ties flip


def test_divergence_is_caught_and_named(backend, mnist_dir, tmp_path, monkeypatch):
    # The rate explodes in epoch 2. On a GPU the loss is checked once per epoch (no sync per step):
    # the epoch runs to its end, then the first bad step is named and epoch 1's checkpoint is kept.
    # On NumPy the epoch stops at that step.
    monkeypatch.setitem(SCHEDULES, "constant", lambda epoch, epochs, lr: lr if epoch == 0 else 1e12)
    calls = _counting_steps(monkeypatch)
    config = TrainConfig(**SMALL, backend=backend, data_dir=str(mnist_dir))
    with pytest.raises(Diverged) as info:
        train(config, tmp_path, echo=None, pictures=False)
    assert (info.value.epoch, info.value.lr) == (2, 1e12)
    assert 1 <= info.value.step <= 30
    # on a GPU every step of epoch 2 ran (the check is at the end of the epoch); on NumPy, up to the bad one
    assert len(calls) == 30 + (30 if backend == "cupy" else info.value.step)
    with np.load(tmp_path / CHECKPOINT, allow_pickle=False) as f:
        assert int(f["train.epochs_done"]) == 1
        assert all(np.isfinite(f[name]).all() for name in (*PARAMS, "train.velocity"))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "diverged"
    assert metrics["diverged"] == {"epoch": 2, "step": info.value.step, "lr": 1e12, "reason": info.value.reason}
    assert "NaN or infinite" in info.value.reason
    assert not (tmp_path / "model.npz").exists()


def test_a_checkpoint_holds_the_momentum_and_a_resume_continues_from_it(backend, mnist_dir, tmp_path):
    config = TrainConfig(**SMALL, backend=backend, data_dir=str(mnist_dir))
    straight = train(config, tmp_path / "straight", echo=None, pictures=False)
    train(config, tmp_path / "resumed", echo=None, pictures=False, stop_after=1)
    with np.load(tmp_path / "resumed" / CHECKPOINT, allow_pickle=False) as f:
        velocity = f["train.velocity"]
        model = MLP.load(tmp_path / "resumed" / CHECKPOINT)
    # The momentum buffer came back from the device: one value per parameter, finite, not all zero.
    assert velocity.shape == model.flat_params.shape and velocity.dtype == np.float32
    assert np.isfinite(velocity).all() and np.abs(velocity).max() > 0
    resumed = train(config, tmp_path / "resumed", resume=True, echo=None, pictures=False)
    assert resumed["status"] == "finished" and resumed["config"]["backend_used"] == backend
    assert resumed["epochs"][0]["train_loss"] == pytest.approx(straight["epochs"][0]["train_loss"], rel=1e-5)
    # Epoch 2 from the checkpoint ends where the straight run's epoch 2 ends (dropping the momentum would
    # move every weight by about lr·|v|, far outside this tolerance).
    assert resumed["epochs"][1]["train_loss"] == pytest.approx(straight["epochs"][1]["train_loss"], rel=1e-4)
    a, b = MLP.load(tmp_path / "straight" / "model.npz"), MLP.load(tmp_path / "resumed" / "model.npz")
    for name in PARAMS:
        np.testing.assert_allclose(b.params[name], a.params[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_an_adam_checkpoint_holds_m_v_and_t_and_a_resume_continues_from_them(backend, mnist_dir, tmp_path, monkeypatch):
    """Adam on the GPU is the captured step (its kernel, its numbers refilled each step); a resume goes on from t."""
    real, steps = train_module.make_step, []

    def make_step(*args, **kwargs):
        steps.append(real(*args, **kwargs))
        return steps[-1]

    monkeypatch.setattr(train_module, "make_step", make_step)
    adam = {**{k: v for k, v in SMALL.items() if k != "momentum"}, "lr": 1e-3, "optimizer": "adam"}
    config = TrainConfig(**adam, backend=backend, data_dir=str(mnist_dir))
    straight = train(config, tmp_path / "straight", echo=None, pictures=False)
    if backend == "cupy":
        assert steps[0].mode == "graphs" and "adam_update_" in steps[0].update.kernel, steps[0].capture_error
        assert (steps[0].n_captures, steps[0].n_replays) == (2, 2 * 30 - 1)
    train(config, tmp_path / "resumed", echo=None, pictures=False, stop_after=1)
    with np.load(tmp_path / "resumed" / CHECKPOINT, allow_pickle=False) as f:
        t, m, v = int(f["train.t"]), f["train.m"], f["train.v"]
    assert t == 30  # one epoch of 3000 images in batches of 100: the step count came back from the host's count
    assert np.isfinite(m).all() and np.abs(m).max() > 0 and (v >= 0).all() and v.max() > 0
    resumed = train(config, tmp_path / "resumed", resume=True, echo=None, pictures=False)
    assert resumed["status"] == "finished"
    # Epoch 2 from the checkpoint ends where the straight run's ends: restarting t at 0 would redo the bias
    # corrections (a first step of size η in every weight), far outside this tolerance.
    assert resumed["epochs"][1]["train_loss"] == pytest.approx(straight["epochs"][1]["train_loss"], rel=1e-4)
    a, b = MLP.load(tmp_path / "straight" / "model.npz"), MLP.load(tmp_path / "resumed" / "model.npz")
    for name in PARAMS:
        np.testing.assert_allclose(b.params[name], a.params[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_mlp_load_onto_cupy_and_back(cupy, tmp_path):
    cpu = MLP(784, 32, 10, activation="tanh", seed=4)
    cpu.params["b2"][...] = np.linspace(-1, 1, 10)
    cpu.save(tmp_path / "model.npz")
    gpu = MLP.load(tmp_path / "model.npz", backend="cupy")
    assert gpu.backend.name == "cupy" and gpu.activation == "tanh" and gpu.dtype == np.float32
    for name in PARAMS:
        assert isinstance(gpu.params[name], cupy.ndarray)
        np.testing.assert_array_equal(gpu.params[name].get(), cpu.params[name])  # copied, not recomputed
    gpu.save(tmp_path / "from-gpu.npz")  # and a model on the device saves for the CPU
    back = MLP.load(tmp_path / "from-gpu.npz")
    assert back.backend.name == "numpy"
    for name in PARAMS:
        np.testing.assert_array_equal(back.params[name], cpu.params[name])


def test_evaluate_and_predict_on_cupy_match_numpy(cupy, set_tf32, mnist, tmp_path):
    x, y = mnist[2][:3000], mnist[3][:3000]
    cpu = MLP(784, 64, 10, seed=2)
    rng = np.random.default_rng(2)
    cpu.params["b1"][...] = rng.normal(scale=0.1, size=64)
    cpu.params["b2"][...] = rng.normal(scale=0.5, size=10)
    cpu.save(tmp_path / "model.npz")
    gpu = MLP.load(tmp_path / "model.npz", backend="cupy")

    loss_cpu, acc_cpu = evaluate(cpu, x, y)
    for inputs in ((x, y), (cupy.asarray(x), cupy.asarray(y))):  # host arrays, or already on the device
        loss_gpu, acc_gpu = evaluate(gpu, *inputs)
        assert isinstance(loss_gpu, float) and isinstance(acc_gpu, float)
        assert loss_gpu == pytest.approx(loss_cpu, rel=1e-5)
        assert abs(acc_gpu - acc_cpu) * len(y) <= (~_clear_rows(cpu.logits(x))).sum()

    proba = gpu.predict_proba(x)
    assert isinstance(proba, cupy.ndarray) and proba.dtype == cupy.float32
    np.testing.assert_allclose(proba.get(), cpu.predict_proba(x), rtol=1e-4, atol=1e-6)
    predicted = gpu.predict(x)
    assert isinstance(predicted, cupy.ndarray) and predicted.shape == (len(x),)
    clear = _clear_rows(cpu.logits(x))
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(to_numpy(predicted)[clear], cpu.predict(x)[clear])


def test_tf32_products_are_within_tf32_rounding_and_really_differ(cupy, set_tf32, mnist):
    a = mnist[0][:512]  # real images: many exact zeros, values k/255
    w = np.random.default_rng(0).normal(0, 0.05, size=(784, 256)).astype(np.float32)
    exact = a.astype(np.float64) @ w.astype(np.float64)
    bound = np.abs(a).astype(np.float64) @ np.abs(w).astype(np.float64)  # Σ|a||w|: the scale of each sum's error
    a_dev, w_dev = cupy.asarray(a), cupy.asarray(w)
    set_tf32(False)
    plain = (a_dev @ w_dev).get()
    set_tf32(True)
    tf32 = (a_dev @ w_dev).get()
    set_tf32(False)
    plain_error = np.abs(plain - exact) / bound
    tf32_error = np.abs(tf32 - exact) / bound
    assert plain_error.max() < 1e-5  # float32: about 2^-24 per term
    # TF32: both inputs rounded to 10 mantissa bits (2^-11 each), products summed in float32.
    # (2^-10 each if the hardware truncates instead of rounding; float32 accumulation adds < 1e-4 here).
    assert tf32_error.max() < 2 * 2.0**-10 + 1e-4
    assert tf32_error.max() > 50 * plain_error.max()  # and it is really a different computation
    assert np.abs(tf32 - plain).max() > 0


def test_tf32_flag_through_the_command_line(cupy, set_tf32, mnist_dir, tmp_path, capsys):
    from backprop_xp.cli import main

    args = ["--hidden", "64", "--train-size", "3000", "--epochs", "2", "--batch-size", "100", "--lr", "0.05",
            "--lr-schedule", "constant", "--backend", "cupy", "--data-dir", str(mnist_dir), "--quiet"]  # fmt: skip
    assert main(["train", *args, "--tf32", "--out", str(tmp_path / "tf32")]) == 0
    assert main(["train", *args, "--out", str(tmp_path / "plain")]) == 0
    capsys.readouterr()
    runs = {name: json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("tf32", "plain")}
    assert runs["tf32"]["config"]["tf32"] is True and runs["plain"]["config"]["tf32"] is False
    # Really different arithmetic: the trained weights differ...
    a, b = MLP.load(tmp_path / "tf32" / "model.npz"), MLP.load(tmp_path / "plain" / "model.npz")
    assert not np.array_equal(a.params["W1"], b.params["W1"])
    # ...but only by TF32's rounding: the same learning, to within a point of accuracy and a percent of loss.
    for t, p in zip(runs["tf32"]["epochs"], runs["plain"]["epochs"]):
        assert t["train_loss"] == pytest.approx(p["train_loss"], rel=1e-2)
        assert abs(t["test_accuracy"] - p["test_accuracy"]) <= 0.01
    # A run without --tf32 after one with it is plain float32 again (the setting is global to CuPy).
    plain_again = tmp_path / "plain-again"
    assert main(["train", *args, "--out", str(plain_again)]) == 0
    c = MLP.load(plain_again / "model.npz")
    np.testing.assert_allclose(c.params["W1"], b.params["W1"], rtol=1e-4, atol=1e-6)


def test_an_augmented_run_replays_as_many_graphs_as_a_plain_one(cupy, set_tf32, mnist_dir, tmp_path, monkeypatch):
    """--augment refills the same batch buffers each epoch, so its steps replay the plain run's graphs."""
    real, steps = train_module.make_step, []

    def make_step(*args, **kwargs):
        steps.append(real(*args, **kwargs))
        return steps[-1]

    monkeypatch.setattr(train_module, "make_step", make_step)
    for augment in (False, True):
        train(TrainConfig(**SMALL, augment=augment, backend="cupy", data_dir=str(mnist_dir)), tmp_path / str(augment),
              echo=None, pictures=False)  # fmt: skip
    plain, augmented = steps
    assert plain.mode == augmented.mode == "graphs", (plain.capture_error, augmented.capture_error)
    # 30 steps of 100 an epoch: the first eager, one capture per Minibatches buffer, every other step a replay
    assert (augmented.n_captures, augmented.n_replays) == (plain.n_captures, plain.n_replays) == (2, 2 * 30 - 1)
