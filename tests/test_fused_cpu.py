"""The fused CPU kernels (``backprop_xp.cpu.numba_loops``, Numba) against the NumPy code they replace.

Bit-identical where the operations are the same (the whole SGD update, on one
thread and on several); within a stated tolerance where
``exp`` and ``log`` come from another library (the output layer):
``|Δδ2| <= 4 eps / B`` per entry (every entry of ``δ2`` lies in ``[-1/B, 1/B]``)
and ``|Δloss| <= 4 eps max(1, loss)``; the measured worst case over 300 random
batches was 1.9 eps / B and 1.4 eps in float32, and 0.5 eps / B and 0 in float64.
The ReLU output layer (``relu_output_layer_loop_``) also sums its small matrix
products in its own order; its tolerance is stated against a float64 reference
in ``test_relu_output_layer_is_as_accurate_as_the_blas_path``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import backprop_xp as bx
from backprop_xp.cpu import fused_cpu_step, numba_loops
from backprop_xp.cpu.fused_cpu_step import FusedCpuStep
from backprop_xp.loss import softmax_cross_entropy_
from backprop_xp.step import TextbookStep, make_step

if not numba_loops.available():
    if os.environ.get("BACKPROP_XP_REQUIRE_FAST", "") not in ("", "0"):
        pytest.fail("Numba not installed but BACKPROP_XP_REQUIRE_FAST is set", pytrace=False)
    pytest.skip("Numba not installed: the fast CPU path is not tested", allow_module_level=True)

DTYPES = [np.float32, np.float64]


@pytest.fixture(params=["serial", "parallel"])
def kernel_mode(request, monkeypatch):
    """Run the kernels on the calling thread, and split over two threads even for small arrays."""
    if request.param == "parallel":
        monkeypatch.setattr(numba_loops, "PARALLEL_MIN", 1)
        monkeypatch.setattr(numba_loops, "SHARED_PARALLEL_MIN", 1)
        previous = numba_loops._state["threads"]
        numba_loops.set_threads(2)
        yield request.param
        numba_loops._state["threads"] = previous
    else:
        monkeypatch.setattr(numba_loops, "PARALLEL_MIN", 1 << 62)
        monkeypatch.setattr(numba_loops, "SHARED_PARALLEL_MIN", 1 << 62)
        yield request.param


@pytest.fixture(params=["one thread", "split"])
def loop_threads(request, monkeypatch):
    """The hidden-major ReLU loop on the calling thread, and split over two threads that NumPy's BLAS shares.

    Split even for the smallest shapes (``SHARED_PARALLEL_MIN`` 1); ``_fused_step`` checks which loop ran.
    """
    previous = numba_loops._state["threads"]
    numba_loops.set_threads(1 if request.param == "one thread" else 2)
    if request.param == "split" and (numba_loops.threads() < 2 or not numba_loops.can_share_pool()):
        numba_loops._state["threads"] = previous
        pytest.skip("no two threads shared with the BLAS here (one core, or no OpenMP layer or OpenBLAS callback)")
    monkeypatch.setattr(numba_loops, "SHARED_PARALLEL_MIN", 1)
    yield numba_loops.threads()
    numba_loops._state["threads"] = previous


def identical(a: np.ndarray, b: np.ndarray) -> bool:
    """Same bits: values, NaNs and the sign of zeros (``array_equal`` alone treats -0 == 0)."""
    return (
        a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(f"u{a.itemsize}"), b.view(f"u{b.itemsize}"))
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.9, 5e-4), (0.0, 1e-2)])
def test_sgd_step_is_bit_identical_to_numpy(dtype, momentum, weight_decay, kernel_mode):
    """``SGD.step`` against the fused step's update: parameters, velocity and (weight-decayed) gradients, bit for bit."""
    models = {}
    for fast in (False, True):
        m = bx.MLP(50, 40, 10, dtype=np.dtype(dtype).name, seed=3)
        opt = bx.SGD(m, lr=0.05, momentum=momentum, weight_decay=weight_decay)
        update = FusedCpuStep(m, opt).update if fast else opt.step
        rng = np.random.default_rng(1)
        for step in range(4):
            m.flat_grads[...] = rng.normal(size=m.flat_grads.shape)
            opt.lr = 0.05 / (1 + step)  # a schedule: the learning rate may change between steps
            update()
        models[fast] = (m, opt)
    (m0, o0), (m1, o1) = models[False], models[True]
    assert identical(m1.flat_params, m0.flat_params)
    assert identical(m1.flat_grads, m0.flat_grads)
    if momentum:
        assert identical(o1.velocity, o0.velocity)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 5, 128])
@pytest.mark.parametrize("scale", [0.1, 3.0, 40.0])
def test_output_layer_matches_softmax_cross_entropy(dtype, batch, scale):
    rng = np.random.default_rng(batch)
    z = (rng.normal(size=(10, batch)) * scale).astype(dtype).T  # (B, K) view of a (K, B) buffer, as the model keeps it
    y = rng.integers(0, 10, size=batch)
    want = np.empty((10, batch), dtype).T
    want_loss = softmax_cross_entropy_(z.copy(), y, out=want)
    got, row_loss = np.full((10, batch), np.nan, dtype).T, np.empty(batch, dtype)
    logits = z.copy()
    loss, n_correct = numba_loops.output_layer_loop_(logits, y, got, row_loss)
    eps = np.finfo(dtype).eps
    assert n_correct == np.count_nonzero(z.argmax(axis=1) == y)
    assert identical(logits, z.copy()), "the logits must be left unchanged"
    assert loss.dtype == dtype and got.dtype == dtype
    assert abs(float(loss) - float(want_loss)) <= 4 * eps * max(1.0, abs(float(want_loss)))
    np.testing.assert_allclose(got, want, rtol=0, atol=4 * eps / batch)
    np.testing.assert_allclose(got.sum(axis=1), 0, atol=16 * eps / batch)  # ŷ − y sums to 0 in every row


def test_output_layer_counts_ties_and_nans_like_argmax():
    z = np.zeros((10, 4), np.float32).T
    z[0, [2, 5]] = 3.0  # a tie: argmax takes the first
    z[1, 7], z[1, 3] = np.nan, 9.0  # a NaN: argmax takes the (first) NaN
    z[2, 9] = 1.0
    z[3, :] = -np.inf
    z[3, 4] = np.nan
    for labels in ([2, 7, 9, 4], [5, 3, 0, 0]):
        y = np.array(labels)
        _, n_correct = numba_loops.output_layer_loop_(z.copy(), y, np.empty_like(z), np.empty(4, np.float32))
        assert n_correct == np.count_nonzero(z.argmax(axis=1) == y)


@pytest.mark.parametrize("hidden", [16, 300])
def test_training_on_both_paths_stays_within_the_stated_tolerance(hidden):
    """Twenty steps of ``make_step``'s step on each path end at nearly the same parameters.

    The paths differ only by the output layer's last bits (exp, log); twenty
    steps of training keep that at the level of float32 rounding.
    """
    rng = np.random.default_rng(0)
    data = [(rng.random((64, 784), dtype=np.float32), rng.integers(0, 10, size=64)) for _ in range(20)]
    finals = {}
    for fast in (False, True):
        previous = numba_loops.set_enabled(fast)
        try:
            m = bx.MLP(784, hidden, 10, seed=4)
            step = make_step(m, bx.SGD(m, lr=0.1, momentum=0.9, weight_decay=1e-4))
            assert type(step) is (FusedCpuStep if fast else TextbookStep)
            losses = [float(step(x, y)[0]) for x, y in data]
        finally:
            numba_loops.set_enabled(previous)
        finals[fast] = (m.flat_params.copy(), losses)
    np.testing.assert_allclose(finals[True][0], finals[False][0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(finals[True][1], finals[False][1], rtol=1e-5)
    assert finals[True][1][-1] < finals[True][1][0]  # and it trains


def test_threads_follow_the_blas_and_can_be_set():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    previous = numba_loops._state["threads"]
    try:
        with threadpoolctl.threadpool_limits(1, user_api="blas"):
            numba_loops.set_threads(None)
            assert numba_loops.threads() == 1 == numba_loops.info()["threads"]
        numba_loops.set_threads(None)
        assert numba_loops.threads() == max(
            p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"
        )
        numba_loops.set_threads(1)
        assert numba_loops.info()["threads"] == 1
        with pytest.raises(ValueError, match="positive integer"):
            numba_loops.set_threads(0)
    finally:
        numba_loops._state["threads"] = previous


def test_the_switch():
    previous = numba_loops.set_enabled(False)
    try:
        assert not numba_loops.active(np) and numba_loops.info()["enabled"] is False
        numba_loops.set_enabled(True)
        assert numba_loops.active(np)
    finally:
        numba_loops.set_enabled(previous)


def _numpy_step(m: bx.MLP, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """``MLP.backprop``, the textbook lines: every array the fused output layer writes."""
    loss, n_correct = m.backprop(x, y)
    ws = m.workspace(x.shape[0])
    out = {name: getattr(ws, name).copy() for name in ("a1", "z2", "delta2", "delta1")}
    out.update({name: m.grads[name].copy() for name in ("W2", "b2", "b1", "W1")})
    out.update(loss=np.asarray(loss), n_correct=np.asarray(n_correct))
    return out


def _fused_step(m: bx.MLP, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """``FusedCpuStep.backprop``: the same arrays, written by the fused loops."""
    ws = m.workspace(x.shape[0])
    for name in ("z2", "delta2", "delta1"):  # stale values must not leak into the result
        getattr(ws, name)[...] = np.nan
    m.grads["W2"][...] = np.nan
    loss, n_correct = FusedCpuStep(m, bx.SGD(m, lr=0.1)).backprop(x, y)
    split = getattr(m.workspace(x.shape[0]).scratch, "z2_parts", None) is not None
    hidden_major = x.shape[0] <= fused_cpu_step.HIDDEN_MAJOR_MAX_BATCH and m.activation == "relu"
    assert split == (hidden_major and numba_loops.threads() > 1 and numba_loops.can_share_pool())
    out = {name: getattr(ws, name).copy() for name in ("a1", "z2", "delta2", "delta1")}
    out.update({name: m.grads[name].copy() for name in ("W2", "b2", "b1", "W1")})
    out.update(loss=np.asarray(loss), n_correct=np.asarray(n_correct))
    return out


# (batch, hidden, classes): one row, a partial row block, blocks of eight, hidden sizes
# that are not a multiple of the vector width, and the widest output layer the GPU kernel takes.
RELU_SHAPES = [(1, 1, 2), (5, 33, 10), (8, 17, 3), (19, 300, 10), (130, 70, 32)]


@pytest.mark.parametrize("logit_scale", [1.0, 30.0])
@pytest.mark.parametrize(("batch", "hidden", "classes"), RELU_SHAPES)
def test_relu_output_layer_is_as_accurate_as_the_blas_path(batch, hidden, classes, logit_scale, loop_threads):
    """float32: each array the fused loop writes is as close to the float64 truth as the NumPy path's.

    The truth is the NumPy path in float64 from the same float32 parameters and
    inputs. Both float32 paths round differently (the BLAS and LLVM order their
    sums differently), so the stated tolerance is relative to the NumPy path's
    own error: at most 4 times it, or 16 eps of the array's largest entry
    (measured here: at most 4.2 eps with ordinary logits; with logits scaled by
    30, where the softmax saturates, both paths' errors grow alike, the fused
    one to at most 1.8 times the NumPy path's).
    """
    rng = np.random.default_rng(batch * hidden)
    x = rng.random((batch, 24), dtype=np.float32)
    y = rng.integers(0, classes, size=batch)
    m32 = bx.MLP(24, hidden, classes, seed=batch)
    m32.params["b1"][...] = rng.normal(size=hidden) * 0.1
    m32.params["b2"][...] = rng.normal(size=classes) * logit_scale
    m32.params["W2"][...] *= logit_scale
    m64 = bx.MLP(24, hidden, classes, dtype="float64")
    for name, value in m32.params.items():
        m64.params[name][...] = value
    truth = _numpy_step(m64, x.astype(np.float64), y)
    plain = _numpy_step(m32, x, y)
    fused = _fused_step(m32, x, y)
    eps = np.finfo(np.float32).eps
    assert fused["n_correct"] == plain["n_correct"] == truth["n_correct"]
    assert identical(fused["a1"], plain["a1"]), "a1 = relu(x W1ᵀ + b1) involves no sum of the kernel's own"
    for name in ("z2", "delta2", "delta1", "W2", "b2", "b1", "W1", "loss"):
        assert fused[name].dtype == np.float32, name
        fused_error = np.abs(fused[name] - truth[name]).max()
        plain_error = np.abs(plain[name] - truth[name]).max()
        allowed = max(4 * plain_error, 16 * eps * np.abs(truth[name]).max())
        assert fused_error <= allowed, f"{name}: error {fused_error:.3g}, NumPy path's {plain_error:.3g}"


@pytest.mark.parametrize(("batch", "hidden", "classes"), RELU_SHAPES)
def test_relu_output_layer_in_float64_agrees_with_the_numpy_path(batch, hidden, classes, loop_threads):
    rng = np.random.default_rng(hidden)
    x = rng.random((batch, 24))
    y = rng.integers(0, classes, size=batch)
    m = bx.MLP(24, hidden, classes, dtype="float64", seed=1)
    plain, fused = _numpy_step(m, x, y), _fused_step(m, x, y)
    for name, want in plain.items():
        assert fused[name].dtype == want.dtype, name
        np.testing.assert_allclose(
            fused[name], want, rtol=0, atol=64 * np.finfo(np.float64).eps * max(1, np.abs(want).max())
        )


def test_relu_output_layer_counts_ties_like_argmax(loop_threads):
    m = bx.MLP(4, 3, 10)
    m.params["W2"][...] = 0  # z2 = b2 in every row
    m.params["b2"][...] = [0, 0, 3, 0, 0, 3, 0, 0, 0, 0]  # a tie: argmax takes the first
    x = np.ones((2, 4), np.float32)
    assert int(_fused_step(m, x, np.array([2, 5]))["n_correct"]) == 1
    assert int(_fused_step(m, x, np.array([2, 2]))["n_correct"]) == 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_subnormal_velocities_become_zero_and_nothing_else_changes(dtype, kernel_mode):
    """Velocities decaying into the subnormal range (their gradient zero) are zero in the fused update.

    Everything else keeps ``SGD.step``'s bits: the other velocities, every gradient, and every parameter
    but those within 2⁻¹⁰³ (float32) of zero, such as the biases that start at 0: η v of a subnormal v is too
    small for a larger weight to register, and those few differ by less than the smallest normal number.
    """
    tiny = np.finfo(dtype).tiny
    models = {}
    for fast in (False, True):
        m = bx.MLP(50, 40, 10, dtype=np.dtype(dtype).name, seed=3)
        opt = bx.SGD(m, lr=0.05, momentum=0.9)
        update = FusedCpuStep(m, opt).update if fast else opt.step
        rng = np.random.default_rng(1)
        decaying = rng.random(m.flat_grads.shape) < 0.3  # these gradients stay zero: their velocities decay
        opt.velocity[...] = np.where(decaying, tiny * rng.uniform(1, 4, decaying.shape), 0)  # μ v soon subnormal
        for _ in range(30):
            m.flat_grads[...] = np.where(decaying, 0, rng.normal(size=m.flat_grads.shape))
            update()
        models[fast] = (m, opt)
    (m0, o0), (m1, o1) = models[False], models[True]
    subnormal = (o0.velocity != 0) & (np.abs(o0.velocity) < tiny)
    assert subnormal.sum() > 0.25 * subnormal.size  # the textbook's velocities did reach the subnormal range
    assert np.all(o1.velocity[subnormal] == 0)
    assert identical(o1.velocity[~subnormal], o0.velocity[~subnormal])
    near_zero = np.abs(m0.flat_params) < tiny / np.finfo(dtype).eps
    assert identical(m1.flat_params[~near_zero], m0.flat_params[~near_zero])
    assert np.all(np.abs(m1.flat_params - m0.flat_params) < tiny)
    assert identical(m1.flat_grads, m0.flat_grads)


# --------------------------------------------------------------------------- a1 and δ1 hidden-major (issue 27)


@pytest.mark.parametrize("logit_scale", [1.0, 30.0])
@pytest.mark.parametrize(("batch", "hidden", "classes"), RELU_SHAPES)
def test_the_row_layout_is_as_accurate_too(batch, hidden, classes, logit_scale, monkeypatch):
    """The tolerance test above runs the hidden-major loop (batches up to 1024); here the row one it replaced."""
    monkeypatch.setattr(fused_cpu_step, "HIDDEN_MAJOR_MAX_BATCH", 0)
    m = bx.MLP(24, hidden, classes, seed=batch)
    FusedCpuStep(m, bx.SGD(m, lr=0.1)).backprop(np.zeros((batch, 24), np.float32), np.zeros(batch, np.int64))
    assert m.workspace(batch).scratch is None and m.workspace(batch).a1.flags.c_contiguous  # the row loop ran
    test_relu_output_layer_is_as_accurate_as_the_blas_path(batch, hidden, classes, logit_scale, 1)


@pytest.mark.parametrize(("batch", "layout"), [(1, "hidden-major"), (1024, "hidden-major"), (1025, "rows")])
def test_batches_up_to_1024_store_the_hidden_layer_hidden_major(batch, layout):
    from backprop_xp.cpu.hidden_major import HiddenMajor

    m = bx.MLP(30, 7, 10, seed=0)
    rng = np.random.default_rng(0)
    FusedCpuStep(m, bx.SGD(m, lr=0.1))(rng.random((batch, 30), dtype=np.float32), rng.integers(0, 10, batch))
    ws = m.workspace(batch)
    assert ws.a1.shape == ws.delta1.shape == (batch, 7)  # the same shapes for every reader of the workspace
    hidden_major = isinstance(ws.scratch, HiddenMajor)
    assert hidden_major == (layout == "hidden-major")
    assert ws.a1.flags.f_contiguous == hidden_major and (ws.a1.base is ws.scratch.a1 if hidden_major else True)


def test_the_textbook_step_on_a_hidden_major_workspace_still_computes_the_same():
    """After a fused step the workspace's a1 and δ1 are transposed views; MLP.backprop writes through them alike."""
    rng = np.random.default_rng(3)
    x, y = rng.random((40, 30), dtype=np.float32), rng.integers(0, 10, 40)
    used, fresh = bx.MLP(30, 12, 10, seed=1), bx.MLP(30, 12, 10, seed=1)
    FusedCpuStep(used, bx.SGD(used, lr=0.1)).backprop(x, y)  # leaves the hidden-major views in used's workspace
    for m in (used, fresh):
        m.backprop(x, y)
    for name in ("W1", "b1", "W2", "b2"):
        np.testing.assert_allclose(used.grads[name], fresh.grads[name], rtol=1e-6, atol=1e-7, err_msg=name)
