"""The optimizer table: Nesterov, Adam and AdamW against torch.optim, their state, and their place in a run."""

from __future__ import annotations

import json
import re

import numpy as np
import processes
import pytest

import backprop_xp as bx
from backprop_xp.cli import main
from backprop_xp.optimizers import OPTIMIZERS, SGD, Adam, AdamW, Nesterov, make_optimizer
from backprop_xp.training import TrainConfig, make_step, train

NAMES = ("W1", "b1", "W2", "b2")
STEPS = 200  # enough for Adam's bias corrections to fade and for any drift in the moments to show


def _torch_twin(torch, name, params, lr, **settings):
    """The torch.optim optimizer that ``name`` is meant to equal, over copies of ``params``."""
    tensors = [torch.tensor(params[k].copy(), requires_grad=True) for k in NAMES]
    wd = settings.get("weight_decay", 0.0)
    if name in ("sgd", "nesterov"):
        rule = torch.optim.SGD(tensors, lr=lr, momentum=settings["momentum"], weight_decay=wd,
                               nesterov=name == "nesterov")  # fmt: skip
    else:
        kind = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        betas = (settings.get("beta1", 0.9), settings.get("beta2", 0.999))
        rule = kind(tensors, lr=lr, betas=betas, eps=settings.get("eps", 1e-8), weight_decay=wd)
    return tensors, rule


CASES = [
    ("nesterov", 0.05, {"momentum": 0.9, "weight_decay": 0.0}),
    ("nesterov", 0.05, {"momentum": 0.5, "weight_decay": 1e-3}),
    ("adam", 1e-2, {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}),
    ("adam", 3e-3, {"beta1": 0.8, "beta2": 0.99, "eps": 1e-6, "weight_decay": 1e-2}),
    ("adamw", 1e-2, {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 1e-2}),
    ("adamw", 3e-3, {"beta1": 0.5, "beta2": 0.9, "eps": 1e-4, "weight_decay": 0.1}),
]


@pytest.mark.usefixtures("cpu_path")  # the NumPy and the fused CPU paths: the update is the xp code on both
@pytest.mark.parametrize("name, lr, settings", CASES)
def test_each_update_equals_torch_optim_over_many_steps(name, lr, settings, torch):
    m = bx.MLP(20, 8, 3, dtype="float64", seed=1)
    opt = OPTIMIZERS[name](m, lr, **settings)
    tensors, reference = _torch_twin(torch, name, m.params, lr, **settings)
    rng = np.random.default_rng(0)
    for _ in range(STEPS):
        # The gradients come from our own model (its parameters, our backprop): both rules get the same ones.
        x, y = rng.normal(size=(16, 20)), rng.integers(0, 3, size=16)
        _, grads = m.loss_and_grads(x, y)
        for t, k in zip(tensors, NAMES):
            t.grad = torch.tensor(grads[k])
        opt.step()
        reference.step()
    for t, k in zip(tensors, NAMES):
        np.testing.assert_allclose(m.params[k], t.detach().numpy(), rtol=1e-10, atol=1e-13, err_msg=k)
    moved = np.abs(m.params["W1"] - bx.MLP(20, 8, 3, dtype="float64", seed=1).params["W1"]).max()
    assert moved > 0.1  # the comparison is of parameters that travelled, not of the starting point


def test_adam_first_step_moves_every_weight_by_the_learning_rate():
    """At t = 1, m̂ = g and v̂ = g², so w moves by η g / (|g| + ε): η against the sign of g, whatever |g|."""
    m = bx.MLP(4, 3, 2, dtype="float64")
    w = m.flat_params.copy()
    g = np.random.default_rng(3).normal(size=w.shape) * np.logspace(-3, 3, w.size)
    m.flat_grads[...] = g
    Adam(m, lr=0.01, eps=1e-300).step()
    np.testing.assert_allclose(m.flat_params, w - 0.01 * np.sign(g), rtol=0, atol=1e-15)


def test_adamw_decays_the_weights_not_the_gradient():
    """With a zero gradient Adam's moments stay 0, so the only change is AdamW's w ← w (1 − η λ); Adam's L2 term
    enters the gradient instead, and its first step is η in every coordinate."""
    m = bx.MLP(4, 3, 2, dtype="float64", seed=2)
    w = m.flat_params.copy()
    m.flat_grads[...] = 0.0
    AdamW(m, lr=0.1, weight_decay=0.5).step()
    np.testing.assert_array_equal(m.flat_params, w * (1 - 0.1 * 0.5))
    m.flat_params[...] = w
    m.flat_grads[...] = 0.0
    Adam(m, lr=0.1, weight_decay=0.5, eps=1e-300).step()
    np.testing.assert_allclose(m.flat_params, w - 0.1 * np.sign(w), atol=1e-12)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_round_trip_continues_the_same_steps(name):
    """Ten steps, save the state, five more; a fresh optimizer loaded from the state does the same five, bit for bit."""
    rng = np.random.default_rng(1)
    grads = [rng.normal(size=bx.MLP(6, 5, 3).flat_params.shape).astype(np.float32) for _ in range(15)]
    a = bx.MLP(6, 5, 3, seed=4)
    opt_a = make_optimizer(name, a, 0.01, TrainConfig())
    for g in grads[:10]:
        a.flat_grads[...] = g
        opt_a.step()
    state, params = opt_a.state_dict(), a.flat_params.copy()
    assert all(isinstance(v, np.ndarray | np.integer) for v in state.values())
    for g in grads[10:]:
        a.flat_grads[...] = g
        opt_a.step()
    b = bx.MLP(6, 5, 3, seed=9)
    b.flat_params[...] = params
    opt_b = make_optimizer(name, b, 0.01, TrainConfig())
    opt_b.load_state_dict({k: v.copy() for k, v in state.items()})
    for g in grads[10:]:
        b.flat_grads[...] = g
        opt_b.step()
    np.testing.assert_array_equal(b.flat_params, a.flat_params)


def test_load_state_dict_refuses_a_missing_or_misshapen_entry():
    m = bx.MLP(6, 5, 3)
    state = Adam(m).state_dict()
    with pytest.raises(ValueError, match="Adam state has no 'v'"):
        Adam(m).load_state_dict({"m": state["m"], "t": state["t"]})
    with pytest.raises(ValueError, match=r"Adam state 'm' has shape \(3,\), expected"):
        Adam(m).load_state_dict({**state, "m": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"SGD state 'velocity' has shape \(0,\)"):
        SGD(m, 0.1, momentum=0.9).load_state_dict(SGD(m, 0.1).state_dict())  # a run without momentum


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda m: Nesterov(m, 0.1, momentum=0.0), r"momentum must be in \(0, 1\)"),
        (lambda m: Adam(m, beta1=1.0), r"beta1 must be in \[0, 1\)"),
        (lambda m: Adam(m, beta2=-0.1), r"beta2 must be in \[0, 1\)"),
        (lambda m: AdamW(m, eps=0.0), "eps must be a finite number > 0"),
        (lambda m: AdamW(m, lr=0.0), "learning rate must be a finite number > 0"),
        (lambda m: Adam(m, weight_decay=-1.0), "weight decay must be a finite number >= 0"),
    ],
)
def test_bad_settings_are_refused_naming_the_setting(make, message):
    with pytest.raises(ValueError, match=message):
        make(bx.MLP(4, 3, 2))


@pytest.mark.parametrize("fast", [False, True])
def test_make_step_applies_adam_not_the_fused_sgd_loop(fast):
    """On the fused CPU path too, make_step's update is Adam's: the plain NumPy backprop then Adam's xp lines
    (up to the fused backprop's last bits), not the fused SGD loop."""
    from backprop_xp.cpu import numba_loops

    if fast and not numba_loops.available():
        pytest.skip("Numba not installed")
    rng = np.random.default_rng(0)
    x, y = rng.random((32, 12)).astype(np.float32), rng.integers(0, 4, 32)
    previous = numba_loops.set_enabled(False)
    by_hand = bx.MLP(12, 7, 4, seed=5)
    rule = Adam(by_hand, lr=0.01)
    for _ in range(3):
        by_hand.backprop(x, y)
        rule.step()
    numba_loops.set_enabled(fast)
    try:
        stepped, sgd = bx.MLP(12, 7, 4, seed=5), bx.MLP(12, 7, 4, seed=5)
        step, sgd_step = make_step(stepped, Adam(stepped, lr=0.01)), make_step(sgd, SGD(sgd, lr=0.01, momentum=0.9))
        for _ in range(3):
            step(x, y)
            sgd_step(x, y)
    finally:
        numba_loops.set_enabled(previous)
    np.testing.assert_allclose(stepped.flat_params, by_hand.flat_params, rtol=1e-5, atol=1e-7)
    assert not np.allclose(sgd.flat_params, stepped.flat_params, rtol=1e-3)  # (the two rules differ on this data)


def test_config_validates_the_optimizer_settings():
    from backprop_xp.training import SettingError

    with pytest.raises(SettingError, match="unknown optimizer 'adagrad': choose one of sgd, nesterov, adam, adamw"):
        TrainConfig(optimizer="adagrad").validate()
    with pytest.raises(SettingError, match="--optimizer nesterov .* --momentum > 0"):
        TrainConfig(optimizer="nesterov", momentum=0.0).validate()
    with pytest.raises(SettingError, match=r"beta2 must be in \[0, 1\), got 1.0"):
        TrainConfig(optimizer="adam", beta2=1.0).validate()
    with pytest.raises(SettingError, match="eps must be a finite number > 0"):
        TrainConfig(eps=0.0).validate()
    # a hyperparameter the optimizer does not read is refused, not silently ignored (a sweep over
    # --optimizer adam,sgd --momentum 0.5,0.9 would train two identical Adam runs)
    with pytest.raises(SettingError, match="--momentum is not a setting of --optimizer adam"):
        TrainConfig(optimizer="adam", momentum=0.5).validate()
    with pytest.raises(SettingError, match="--beta1 is not a setting of --optimizer sgd"):
        TrainConfig(optimizer="sgd", beta1=0.8).validate()
    TrainConfig(optimizer="adamw", beta1=0.8).validate()  # its own settings, and the others at their defaults
    TrainConfig(optimizer="nesterov", momentum=0.5).validate()


# --------------------------------------------------------------------------- in a run

SMALL = dict(hidden=32, train_size=3000, epochs=3, batch_size=100, backend="numpy", lr=1e-3)


@pytest.mark.parametrize("name", ["adam", "nesterov"])
def test_a_stopped_run_resumes_bit_for_bit(name, mnist_dir, tmp_path):
    config = TrainConfig(**SMALL, optimizer=name, weight_decay=1e-4, data_dir=str(mnist_dir))
    straight = train(config, tmp_path / "straight", echo=None, pictures=False)
    train(config, tmp_path / "resumed", echo=None, pictures=False, stop_after=1)
    with np.load(tmp_path / "resumed/checkpoint.npz") as saved:
        for key in (f"train.{k}" for k in OPTIMIZERS[name].STATE):
            assert key in saved.files, key
    resumed = train(config, tmp_path / "resumed", resume=True, echo=None, pictures=False)
    _assert_same_model(tmp_path / "straight/model.npz", tmp_path / "resumed/model.npz")
    assert [r["train_loss"] for r in straight["epochs"]] == [r["train_loss"] for r in resumed["epochs"]]
    assert resumed["config"]["optimizer"] == name


def _assert_same_model(a_path, b_path):
    with np.load(a_path) as a, np.load(b_path) as b:
        for k in NAMES:
            assert np.array_equal(a[k], b[k]), k


def test_a_killed_adam_run_resumes_bit_for_bit_from_the_command_line(mnist_dir, tmp_path):
    """``train --optimizer adam``, SIGKILLed once its first checkpoint is written, then ``--resume``: the model
    equals that of the same command run straight through."""
    env_data = ["--data-dir", str(mnist_dir)]
    flags = ["--hidden", "32", "--train-size", "3000", "--epochs", "8", "--batch-size", "100", "--backend", "numpy",
             "--optimizer", "adam", "--lr", "1e-3", "--beta2", "0.99", "--quiet", *env_data]  # fmt: skip
    proc = processes.start(["train", *flags, "--out", str(tmp_path / "killed")])
    processes.wait_until_written(proc, [tmp_path / "killed/checkpoint.npz"])
    processes.kill(proc)
    with np.load(tmp_path / "killed/checkpoint.npz") as saved:
        done = int(saved["train.epochs_done"])
    assert done < 8, "the run finished before it was killed: nothing was resumed"
    resumed = processes.start(["train", "--resume", str(tmp_path / "killed"), *env_data])
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    straight = processes.start(["train", *flags, "--out", str(tmp_path / "straight")])
    assert straight.wait(timeout=600) == 0, straight.stderr.read()
    _assert_same_model(tmp_path / "straight/model.npz", tmp_path / "killed/model.npz")


def test_a_resume_refuses_another_optimizer(mnist_dir, tmp_path):
    config = TrainConfig(**SMALL, optimizer="adam", data_dir=str(mnist_dir))
    train(config, tmp_path, echo=None, pictures=False, stop_after=1)
    with pytest.raises(ValueError, match="optimizer"):
        train(TrainConfig(**{**SMALL, "optimizer": "sgd"}, data_dir=str(mnist_dir)), tmp_path, resume=True, echo=None)


def test_old_checkpoints_without_an_optimizer_are_sgd():
    assert TrainConfig.from_dict({"hidden": 32}).optimizer == "sgd"


def test_sweep_takes_a_list_of_optimizers_and_names_the_runs_by_them(mnist_dir, tmp_path, capsys):
    flags = ["--hidden", "16", "--train-size", "1000", "--val-size", "200", "--epochs", "1", "--batch-size", "100",
             "--backend", "numpy", "--lr", "1e-3", "--data-dir", str(mnist_dir)]  # fmt: skip
    assert main(["sweep", "--optimizer", "adam,sgd", *flags, "--out", str(tmp_path)]) == 0
    for name in ("adam", "sgd"):
        with open(tmp_path / f"h16-lr0.001-b100-{name}/metrics.json") as f:
            assert json.load(f)["config"]["optimizer"] == name


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--optimizer", "adagrad"], "argument --optimizer: 'adagrad' is not one of sgd, nesterov, adam, adamw"),
        (["--beta1", "1"], r"argument --beta1: must be in \[0, 1\), got 1"),
        (["--eps", "0"], "argument --eps: must be a finite number > 0, got 0"),
        (["--optimizer", "nesterov", "--momentum", "0"], "--optimizer nesterov .* give it --momentum > 0"),
    ],
)
def test_bad_optimizer_flags_exit_2_with_one_line(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        code = main(["train", *flags, "--out", str(tmp_path / "run")])
        raise SystemExit(code)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind, weight_decay", [(Adam, 0.0), (Adam, 1e-2), (AdamW, 1e-2), (AdamW, 0.0)])
def test_fused_adam_is_bit_identical_to_its_xp_lines(kind, weight_decay, dtype):
    """The fused CPU step's update (numba_loops.adam_loop_) against Adam.step's NumPy lines, 50 steps, lr changed midway."""
    from backprop_xp.cpu import numba_loops

    if not numba_loops.available():
        pytest.skip("Numba not installed")
    rng = np.random.default_rng(7)
    grads = [
        rng.normal(size=bx.MLP(30, 40, 10, dtype=dtype).flat_params.shape) * 10.0 ** rng.integers(-4, 2)
        for _ in range(50)
    ]
    from backprop_xp.cpu.fused_cpu_step import FusedCpuStep

    params = {}
    for fast in (False, True):
        m = bx.MLP(30, 40, 10, dtype=dtype, seed=3)
        opt = kind(m, lr=3e-3, beta1=0.8, beta2=0.99, eps=1e-7, weight_decay=weight_decay)
        update = FusedCpuStep(m, opt).update if fast else opt.step
        for i, g in enumerate(grads):
            opt.lr = 3e-3 if i < 25 else 1e-3  # a schedule: the step's numbers are read every step
            m.flat_grads[...] = g
            update()
        params[fast] = (m.flat_params.copy(), opt.m.copy(), opt.v.copy(), m.flat_grads.copy())
    for plain, fused, what in zip(params[False], params[True], ("w", "m", "v", "g")):
        np.testing.assert_array_equal(fused, plain, err_msg=what)
