"""The network's gradients against finite differences and PyTorch, and its training invariants."""

from __future__ import annotations

import numpy as np
import pytest

import backprop_xp as bx
from backprop_xp.activations import ACTIVATIONS
from backprop_xp.gradcheck import numeric_gradient, relative_error

N_IN, N_HID, N_OUT, BATCH = 7, 5, 4, 6


def small_problem(activation: str, seed: int = 0, dtype: str = "float64"):
    m = bx.MLP(N_IN, N_HID, N_OUT, activation=activation, dtype=dtype, seed=seed)
    rng = np.random.default_rng(100 + seed)
    x = rng.normal(size=(BATCH, N_IN))
    y = rng.integers(0, N_OUT, size=BATCH)
    # Non-zero biases, so that their gradients are tested through a non-trivial forward pass.
    for name in ("b1", "b2"):
        m.params[name][...] = rng.normal(scale=0.5, size=m.params[name].shape)
    return m, x, y


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.usefixtures("cpu_path")
def test_gradients_match_central_differences(activation):
    m, x, y = small_problem(activation)
    if activation == "relu":
        # A pre-activation within eps of the kink would make the difference quotient meaningless.
        z1 = x @ m.params["W1"].T + m.params["b1"]
        assert np.abs(z1).min() > 1e-3
    _, grads = m.loss_and_grads(x, y)
    for name in bx.model.PARAM_NAMES:
        numeric = numeric_gradient(lambda: m.loss_and_grads(x, y)[0], m.params[name])
        err = relative_error(numeric, grads[name])
        assert err < 1e-6, f"{activation} {name}: relative error {err:.2e}"


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.usefixtures("cpu_path")
def test_gradients_match_pytorch_autograd(activation, torch):
    m, x, y = small_problem(activation, seed=3)
    loss, grads = m.loss_and_grads(x, y)

    t = {k: torch.tensor(v, requires_grad=True) for k, v in m.params.items()}
    f = {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
         "leaky_relu": torch.nn.functional.leaky_relu, "elu": torch.nn.functional.elu}[activation]  # fmt: skip
    z2 = f(torch.tensor(x) @ t["W1"].T + t["b1"]) @ t["W2"].T + t["b2"]
    ref = torch.nn.functional.cross_entropy(z2, torch.tensor(y))
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-12)
    for name in bx.model.PARAM_NAMES:
        np.testing.assert_allclose(grads[name], t[name].grad.numpy(), rtol=1e-10, atol=1e-13)


def test_loss_and_grads_shapes_dtypes_and_the_models_own_arrays():
    m = bx.MLP(784, 32, 10)
    x = np.random.default_rng(0).random((16, 784))  # float64 input to a float32 model
    y = np.arange(16) % 10
    loss, grads = m.loss_and_grads(x, y)
    assert isinstance(loss, float) and np.isfinite(loss)
    assert set(grads) == {"W1", "b1", "W2", "b2"}
    for name, g in grads.items():
        assert g.shape == m.params[name].shape
        assert g.dtype == np.float32
        assert g is m.grads[name]  # the model's own: edits reach SGD.step (see the clipping test)


def test_params_are_live_views():
    m = bx.MLP(784, 16, 10)
    x = np.random.default_rng(1).random((5, 784), dtype=np.float32)
    before = m.predict_proba(x).copy()
    m.params["b2"][...] = 0
    m.params["b2"][3] = 100.0  # an overwhelming bias towards class 3
    assert (m.predict(x) == 3).all()
    assert not np.allclose(before, m.predict_proba(x))
    assert np.shares_memory(m.params["W1"], m.flat_params)


def test_probabilities_sum_to_one_and_predict_is_their_argmax():
    m = bx.MLP(784, 64, 10, activation="tanh", seed=4)
    x = np.random.default_rng(2).random((300, 784), dtype=np.float32)
    p = m.predict_proba(x)
    assert p.shape == (300, 10) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)
    assert (p >= 0).all()
    np.testing.assert_array_equal(m.predict(x), p.argmax(axis=1))


def test_evaluation_in_chunks_matches_one_pass(monkeypatch):
    m = bx.MLP(784, 16, 10, seed=5)
    x = np.random.default_rng(3).random((50, 784), dtype=np.float32)
    whole = m.logits(x)
    monkeypatch.setattr(bx.model, "EVAL_CHUNK", 7)
    # Equal up to float32 rounding: BLAS may block a 7-row product differently from a 50-row one.
    np.testing.assert_allclose(m.logits(x), whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_initialisation_is_seeded_and_scaled(activation):
    a = bx.MLP(784, 400, 10, activation=activation, seed=7)
    b = bx.MLP(784, 400, 10, activation=activation, seed=7)
    c = bx.MLP(784, 400, 10, activation=activation, seed=8)
    for name in bx.model.PARAM_NAMES:
        np.testing.assert_array_equal(a.params[name], b.params[name])
    assert not np.array_equal(a.params["W1"], c.params["W1"])
    assert not a.params["b1"].any() and not a.params["b2"].any()
    # Both weight matrices, each scaled by its own fans (W2: 4,000 values, hence the looser tolerance).
    for name, rel in (("W1", 0.02), ("W2", 0.05)):
        w = a.params[name]
        fan_out, fan_in = w.shape
        he = activation in ("relu", "leaky_relu", "elu")
        expected = np.sqrt(2 / fan_in) if he else np.sqrt(2 / (fan_in + fan_out))  # He / Glorot
        assert w.std() == pytest.approx(expected, rel=rel), name
        assert abs(float(w.mean())) < 0.1 * expected, name
        if not he:
            assert np.abs(w).max() <= np.sqrt(6 / (fan_in + fan_out)), name


def test_one_small_step_lowers_the_batch_loss():
    m, x, y = small_problem("sigmoid", seed=2)
    opt = bx.SGD(m, lr=1e-2)
    before, _ = m.loss_and_grads(x, y)
    opt.step()
    after, _ = m.loss_and_grads(x, y)
    assert after < before


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.usefixtures("cpu_path")
def test_training_separates_a_tiny_problem(activation):
    # Four well-separated Gaussian blobs in 2-D: a few hundred steps reach zero training error.
    rng = np.random.default_rng(0)
    centres = np.array([[3, 3], [-3, 3], [-3, -3], [3, -3]], dtype=np.float32)
    y = np.repeat(np.arange(4), 25)
    x = centres[y] + rng.normal(scale=0.5, size=(100, 2)).astype(np.float32)
    m = bx.MLP(2, 16, 4, activation=activation, seed=1)
    opt = bx.SGD(m, lr=0.5, momentum=0.5)
    first, _ = m.loss_and_grads(x, y)
    for _ in range(300):
        m.loss_and_grads(x, y)
        opt.step()
    last, _ = m.loss_and_grads(x, y)
    assert last < first / 10
    assert (m.predict(x) == y).all()


def test_bad_arguments_give_clear_errors():
    with pytest.raises(ValueError, match="n_hidden must be an integer >= 1"):
        bx.MLP(784, 0, 10)
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        bx.MLP(784, 8, 10, activation="gelu")
    with pytest.raises(ValueError, match="unsupported dtype"):
        bx.MLP(784, 8, 10, dtype="float16")
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        bx.MLP(784, 8, 10, backend="tpu")
    m = bx.MLP(784, 8, 10)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 784\)"):
        m.loss_and_grads(np.zeros((3, 783)), [0, 1, 2])
    with pytest.raises(ValueError, match="label 10 is outside"):
        m.loss_and_grads(np.zeros((3, 784)), [0, 1, 10])
    with pytest.raises(ValueError, match="label -1 is outside"):
        m.loss_and_grads(np.zeros((3, 784)), [0, -1, 2])
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        m.loss_and_grads(np.zeros((3, 784)), [0, 1])
    with pytest.raises(ValueError, match="labels must be integers"):
        m.loss_and_grads(np.zeros((3, 784)), [0.0, 1.0, 2.0])


def test_save_and_load_round_trip(tmp_path):
    m = bx.MLP(784, 24, 10, activation="tanh", dtype="float64", seed=9)
    path = tmp_path / "model.npz"
    m.save(path, epoch=np.int64(3))
    with np.load(path, allow_pickle=False) as f:  # plain arrays only
        assert int(f["epoch"]) == 3
    back = bx.MLP.load(path)
    assert back.config == m.config
    for name in bx.model.PARAM_NAMES:
        np.testing.assert_array_equal(back.params[name], m.params[name])
    assert [p.name for p in tmp_path.iterdir()] == ["model.npz"]  # no temporary file left behind


def test_load_rejects_what_is_not_a_model(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="junk.npz: not a model file"):
        bx.MLP.load(junk)
    other = tmp_path / "other.npz"
    np.savez(other, W1=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="missing"):
        bx.MLP.load(other)


def test_clipping_the_returned_gradients_changes_the_update():
    # Editing what loss_and_grads returns must not silently do nothing.
    m = bx.MLP(784, 16, 10, dtype="float64")
    opt = bx.SGD(m, lr=0.1, momentum=0.0)
    x = np.random.default_rng(1).random((8, 784))
    y = np.arange(8)
    before = {name: p.copy() for name, p in m.params.items()}
    _, grads = m.loss_and_grads(x, y)
    for g in grads.values():
        np.clip(g, -1e-3, 1e-3, out=g)
    opt.step()
    for name, old in before.items():
        step = old - m.params[name]
        assert np.abs(step).max() <= 0.1 * 1e-3 * (1 + 1e-9), name


def test_integer_images_are_refused_with_the_fix():
    m = bx.MLP(784, 16, 10)
    pixels = np.full((2, 784), 255, np.uint8)
    with pytest.raises(ValueError, match=r"scaled to \[0, 1\], e.g. x / 255"):
        m.loss_and_grads(pixels, [0, 1])
    with pytest.raises(ValueError, match="integers"):
        m.predict(pixels)
    assert m.predict(np.zeros((2, 784), np.uint8)).shape == (2,)  # 0/1 integers are valid pixel values


def _saved_with(tmp_path, name="model.npz", **changes):
    """A small saved model with some of its arrays replaced (``config_seed=-1`` sets ``config.seed``)."""
    path = tmp_path / name
    bx.MLP(6, 4, 3, seed=1).save(path)
    with np.load(path, allow_pickle=False) as f:
        arrays = {key: f[key] for key in f.files}
    arrays.update({key.replace("config_", "config."): np.asarray(value) for key, value in changes.items()})
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("param", "bad", "count"),
    [("W1", np.nan, 24), ("b1", np.inf, 4), ("W2", -np.inf, 12), ("b2", np.nan, 3)],
)
def test_load_refuses_parameters_that_are_nan_or_infinite(tmp_path, param, bad, count):
    shape = {"W1": (4, 6), "b1": (4,), "W2": (3, 4), "b2": (3,)}[param]
    path = _saved_with(tmp_path, **{param: np.full(shape, bad, np.float32)})
    with pytest.raises(ValueError, match=rf"model.npz: parameter {param} has {count} values that are NaN or infinite"):
        bx.MLP.load(path)
    # One bad value is enough, and so is a float64 value beyond float32's range (inf once converted).
    one = np.zeros(shape, np.float64)
    one.flat[-1] = 1e300
    with pytest.raises(ValueError, match=rf"parameter {param} has 1 value that is NaN or infinite"):
        bx.MLP.load(_saved_with(tmp_path, **{param: one}))


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("seed", -1, r"seed must be an integer >= 0"),
        ("n_hidden", "abc", r"not a whole number"),
        ("n_hidden", 2.5, r"not a whole number"),
        ("n_hidden", 0, r"n_hidden must be an integer >= 1"),
        ("n_inputs", True, r"not a whole number"),
        ("n_outputs", 1, r"n_outputs must be at least 2"),
        ("activation", "softplus", r"unknown activation 'softplus'"),
        ("dtype", "float16", r"unsupported dtype"),
        ("n_hidden", [4, 4], r"holds 2 values, not one"),
    ],
)
def test_load_names_the_file_field_and_value_of_a_bad_config(tmp_path, field, value, why):
    path = _saved_with(tmp_path, "bad.npz", **{f"config_{field}": value})
    with pytest.raises(ValueError) as info:
        bx.MLP.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: config field {field} ")
    assert why in message
    if not isinstance(value, list):
        assert repr(value) in message


def test_load_compares_the_arrays_with_the_config_before_allocating(tmp_path):
    # 10**11 hidden units would be 289 TiB of float32: refused from the shapes alone.
    path = _saved_with(tmp_path, config_n_hidden=10**11)
    with pytest.raises(ValueError, match=r"model.npz: parameter W1 has shape \(4, 6\), but the config says"):
        bx.MLP.load(path)
    with pytest.raises(ValueError, match=r"parameter b2 has shape \(3,\), but the config says \(5,\)"):
        bx.MLP.load(_saved_with(tmp_path, b2=np.zeros(3), config_n_outputs=5, W2=np.zeros((5, 4))))
    with pytest.raises(ValueError, match=r"model.npz: parameter W1 holds <U3 values, not numbers"):
        bx.MLP.load(_saved_with(tmp_path, W1=np.full((4, 6), "abc")))


def test_nan_or_infinite_inputs_are_refused_naming_the_first_row():
    """Before: predict named a class for a NaN row, and one step made every weight NaN."""
    model = bx.MLP(4, 3, 2, seed=0)
    x = np.zeros((5, 4), np.float32)
    for bad in (np.nan, np.inf, -np.inf):
        x[3, 1] = bad
        for call in (model.predict, model.predict_proba, lambda x: model.loss_and_grads(x, np.zeros(5, int))):
            with pytest.raises(ValueError, match=r"x holds NaN or infinite values \(row 3 is the first\)"):
                call(x)
    assert np.isfinite(model.flat_params).all()
