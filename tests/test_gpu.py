"""The CuPy path against NumPy: every public function, every fused kernel, the fused and graph steps.

Every test here needs CuPy and a usable CUDA device (the ``cupy`` fixture
skips with the reason otherwise). The NumPy side is always the reference:
the same inputs go through ``activations.py``/``loss.py``/``model.py``/``optimizers.py`` on the
CPU and through the kernels of ``cuda/cuda_kernels.py`` on the device.

Tolerances: kernels doing the same IEEE operations in the same order
(the SGD update, compiled with ``--fmad=false``) must match bit for bit,
for normal numbers (CuPy compiles with ``-ftz=true``: float32 subnormals
become zero on the GPU); anything with ``exp``/``log``/``tanh``
or a matrix product (different summation order in cuBLAS) matches to a few
float32 ulps, checked with ``rtol`` 1e-5 (float32) or 1e-12 (float64)
relative to each array's own largest value (``close``): an absolute floor of
1 would let a 4% error through in δ2, whose entries are about 1/B.

Several tests here must *fail*, not skip, on a GPU where something the
product relies on does not work: graph capture (``mode == "graphs"``, graphs
counted), the fused output layer (``step.fused``).
"""

from __future__ import annotations

import numpy as np
import pytest
from kernel_references import output_layer_reference
from test_kernel_twins import stepped_sgd

import backprop_xp as bx
from backprop_xp.cuda import cuda_kernels as kc

pytestmark = pytest.mark.gpu

DTYPES = ["float32", "float64"]
RTOL = {"float32": 1e-5, "float64": 1e-12}


def close(actual, expected, dtype, rtol=None, atol_scale=1.0):
    """assert_allclose on host copies, the absolute floor ``rtol`` times the array's own largest value.

    ``atol_scale`` widens that floor for sums with cancellation (a bias
    gradient is a sum of B terms of both signs that nearly cancel).
    """
    actual, expected = bx.to_numpy(actual), bx.to_numpy(expected)
    rtol = RTOL[dtype] if rtol is None else rtol
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale * atol_scale)


def test_close_is_relative_to_the_arrays_own_scale():
    """The tolerance itself can fail: a 1% error in values of size 1/4096 is caught (it was not with a floor of 1)."""
    expected = np.full(10, 1 / 4096)
    close(expected * (1 + 1e-6), expected, "float32")
    with pytest.raises(AssertionError):
        close(expected * 1.01, expected, "float32")


def random_logits(rng, batch, n_classes, dtype, spread=5.0):
    z = rng.normal(0, spread, size=(batch, n_classes)).astype(dtype)
    z[0, :] = 80.0  # a row whose exp() would overflow float32 without the max shift
    z[-1, -1] = -90.0
    return z


# --------------------------------------------------------------------------- fused kernels vs their NumPy twins


@pytest.mark.parametrize("dtype", DTYPES)
def test_public_softmax_cross_entropy_cupy_equals_numpy(cupy, dtype):
    rng = np.random.default_rng(3)
    z = random_logits(rng, 50, 10, dtype)
    y = rng.integers(0, 10, 50)
    loss_np, d_np = bx.softmax_cross_entropy(z, y)
    loss_cp, d_cp = bx.softmax_cross_entropy(cupy.asarray(z), cupy.asarray(y))
    assert isinstance(loss_cp, float) and isinstance(d_cp, cupy.ndarray)
    close(loss_cp, loss_np, dtype)
    close(d_cp, d_np, dtype)
    z_fortran = cupy.asfortranarray(cupy.asarray(z))  # a (B, K) view of a (K, B) buffer, as the model keeps z2
    loss_f, d_f = bx.softmax_cross_entropy(z_fortran, cupy.asarray(y))
    close(loss_f, loss_np, dtype)
    close(d_f, d_np, dtype)
    with pytest.raises(ValueError, match="label 10"):
        bx.softmax_cross_entropy(cupy.asarray(z), cupy.asarray(np.full(50, 10)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.9, 5e-4), (0.0, 1e-3)])
def test_sgd_kernel_is_bit_identical_to_optim_sgd(cupy, dtype, momentum, weight_decay):
    """The update kernel against optimizers.SGD.step itself, on the same flat buffers."""
    opt, w, g, v = stepped_sgd(dtype, momentum, weight_decay)
    model = opt.model
    w_dev, v_dev = cupy.asarray(w), cupy.asarray(v) if momentum else None
    hyper = cupy.asarray(np.array([opt.lr, momentum, weight_decay], dtype))
    kc.sgd_momentum_(w_dev, cupy.asarray(g), v_dev, hyper)
    np.testing.assert_array_equal(w_dev.get(), model.flat_params)
    if momentum:
        np.testing.assert_array_equal(v_dev.get(), opt.velocity)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule, weight_decay", [(bx.Adam, 0.0), (bx.Adam, 1e-2), (bx.AdamW, 1e-2)])
def test_adam_kernel_is_bit_identical_to_adam_step(cupy, dtype, rule, weight_decay):
    """The Adam kernel, fed Adam.fused_hyper() of each step, against optimizers.Adam.step itself over 20 steps."""
    rng = np.random.default_rng(21)
    model = bx.MLP(30, 20, 10, backend="numpy", dtype=dtype, seed=2)
    opt = rule(model, lr=3e-3, beta1=0.8, beta2=0.99, eps=1e-7, weight_decay=weight_decay)
    w, m, v = (cupy.asarray(a) for a in (model.flat_params, opt.m, opt.v))
    for _ in range(20):
        g = (rng.normal(size=w.shape) * 10.0 ** rng.integers(-4, 2)).astype(dtype)
        model.flat_grads[...] = g
        opt.step()  # t becomes this step's (its NumPy lines: the fused CPU loops are not involved)
        hyper = np.append(opt.fused_hyper(), 1.0 if opt.DECOUPLED else 0.0).astype(dtype)
        kc.adam_update_(w, cupy.asarray(g), m, v, cupy.asarray(hyper))
    np.testing.assert_array_equal(m.get(), opt.m)
    np.testing.assert_array_equal(v.get(), opt.v)
    np.testing.assert_array_equal(w.get(), model.flat_params)


def _output_layer_case(rng, batch, n_hidden, n_classes, dtype):
    z1 = rng.normal(0, 1.5, size=(batch, n_hidden)).astype(dtype)
    z1[0, : min(3, n_hidden)] = 0.0  # the ReLU kink
    params = {
        "b1": rng.normal(0, 0.5, n_hidden).astype(dtype),
        "W2": rng.normal(0, 1 / np.sqrt(n_hidden), size=(n_classes, n_hidden)).astype(dtype),
        "b2": rng.normal(0, 0.5, n_classes).astype(dtype),
    }
    labels = rng.integers(0, n_classes, batch)
    return z1, params, labels


def _run_output_layer(cupy, z1, params, labels, activation, n_classes, times=2):
    """output_layer_step on fresh device copies, outputs poisoned with NaN first; run ``times`` (the counter resets)."""
    batch, n_hidden = z1.shape
    dtype = z1.dtype
    p = {name: cupy.asarray(value) for name, value in params.items()}
    sms, _ = kc.device_limits(kc.current_device())
    scratch = kc.OutputLayerScratch(cupy, batch, n_hidden, n_classes, dtype, sms)
    for _ in range(times):
        a1 = cupy.asarray(z1)
        g = {"W2": cupy.full((n_classes, n_hidden), np.nan, dtype), "b1": cupy.full(n_hidden, np.nan, dtype),
             "b2": cupy.full(n_classes, np.nan, dtype)}  # fmt: skip
        out = {"delta2": cupy.full((batch, n_classes), np.nan, dtype), "delta1": cupy.full((batch, n_hidden), np.nan, dtype),
               "loss": cupy.full((), np.nan, dtype), "n_correct": cupy.full((), -1, cupy.int64)}  # fmt: skip
        kc.output_layer_step(
            a1, cupy.asarray(labels), p, g, out["delta2"], out["delta1"], out["loss"], out["n_correct"], scratch,
            activation,
        )  # fmt: skip
        assert int(scratch.blocks_done[0]) == 0
    return {"a1": a1, **out, **g}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
@pytest.mark.parametrize(
    "batch, n_hidden, n_classes",
    [
        (1, 128, 10),
        (37, 37, 10),
        (128, 128, 10),
        (128, 800, 10),
        (1000, 512, 10),
        (4096, 800, 10),
        (50, 70, 3),
        (64, 96, 32),
    ],
)
def test_output_layer_kernel_matches_twin(cupy, dtype, activation, batch, n_hidden, n_classes):
    """Every array the fused output layer writes, against its NumPy twin (kernels.py's functions)."""
    rng = np.random.default_rng(batch + n_hidden)
    z1, params, labels = _output_layer_case(rng, batch, n_hidden, n_classes, dtype)
    assert kc.output_layer_fits(batch, n_hidden, n_classes, dtype, 227 * 1024, 132)
    expected = output_layer_reference(z1, labels, params, activation)
    got = _run_output_layer(cupy, z1, params, labels, activation, n_classes)
    for name in ("a1", "delta2", "delta1", "W2"):
        close(got[name], expected[name], dtype)
    for name in ("b1", "b2"):  # sums over the batch of terms of both signs
        close(got[name], expected[name], dtype, atol_scale=10)
    close(got["loss"], expected["loss"], dtype)
    assert int(got["n_correct"]) == int(expected["n_correct"])


def test_output_layer_kernel_large_shared_memory(cupy):
    """H = 2048 in float64 needs 160 KiB of W2 in shared memory: the kernel opts in above 48 KiB."""
    rng = np.random.default_rng(16)
    z1, params, labels = _output_layer_case(rng, 256, 2048, 10, "float64")
    expected = output_layer_reference(z1, labels, params, "relu")
    got = _run_output_layer(cupy, z1, params, labels, "relu", 10, times=1)
    close(got["delta1"], expected["delta1"], "float64")
    close(got["W2"], expected["W2"], "float64")


def test_output_layer_bad_label_poisons_its_row_only(cupy):
    rng = np.random.default_rng(17)
    z1, params, labels = _output_layer_case(rng, 40, 64, 10, "float32")
    labels[[3, 20]] = [10, -1]
    got = _run_output_layer(cupy, z1, params, labels, "relu", 10, times=1)
    delta2 = got["delta2"].get()
    assert np.isnan(float(got["loss"])) and np.isnan(delta2[[3, 20]]).all()
    assert np.isfinite(np.delete(delta2, [3, 20], axis=0)).all()


# --------------------------------------------------------------------------- public API: CuPy equals NumPy


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
def test_mlp_public_functions_cupy_equal_numpy(cupy, activation, dtype):
    rng = np.random.default_rng(7)
    x = rng.random((70, 784)).astype(dtype)
    y = rng.integers(0, 10, 70)
    m_np = bx.MLP(784, 48, 10, activation=activation, backend="numpy", dtype=dtype, seed=3)
    m_cp = bx.MLP(784, 48, 10, activation=activation, backend="cupy", dtype=dtype, seed=3)
    for name in m_np.params:
        np.testing.assert_array_equal(m_cp.params[name].get(), m_np.params[name])
    loss_np, grads_np = m_np.loss_and_grads(x, y)
    loss_cp, grads_cp = m_cp.loss_and_grads(x, y)  # a NumPy x is copied to the device
    close(loss_cp, loss_np, dtype)
    for name in grads_np:
        close(grads_cp[name], grads_np[name], dtype, atol_scale=10)
    close(m_cp.predict_proba(x), m_np.predict_proba(x), dtype)
    mismatches = int((m_cp.predict(cupy.asarray(x)).get() != m_np.predict(x)).sum())
    assert mismatches <= (1 if dtype == "float32" else 0)  # float32: a near-tie may flip between BLAS libraries
    with pytest.raises(ValueError, match="label"):
        m_cp.loss_and_grads(x, np.full(70, 11))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.9, 1e-3), (0.0, 1e-3)])
def test_sgd_step_cupy_equals_numpy(cupy, dtype, momentum, weight_decay):
    """SGD.step itself on CuPy, from the same gradients: the same elementwise operations, so bit for bit."""
    rng = np.random.default_rng(8)
    models = [bx.MLP(50, 32, 10, backend=b, dtype=dtype, seed=1) for b in ("numpy", "cupy")]
    opts = [bx.SGD(m, lr=0.05, momentum=momentum, weight_decay=weight_decay) for m in models]
    for _ in range(3):
        g = rng.normal(0, 1, models[0].flat_grads.size).astype(dtype)
        for m, opt in zip(models, opts):
            m.flat_grads[...] = m.xp.asarray(g)
            opt.step()
    np.testing.assert_array_equal(models[1].flat_params.get(), models[0].flat_params)
    if momentum:
        np.testing.assert_array_equal(opts[1].velocity.get(), opts[0].velocity)
    untouched = bx.MLP(50, 32, 10, dtype=dtype, seed=1).flat_params
    assert not np.array_equal(models[0].flat_params, untouched)  # the steps did something


# --------------------------------------------------------------------------- the fused step and the graph step


def _batches(x, y, sizes):
    """Views at moving offsets into one buffer (the last one partial)."""
    start = 0
    for size in sizes:
        yield x[start : start + size], y[start : start + size]
        start += size


def _optimizer(model, lr, momentum, weight_decay, rule=None):
    """SGD with these settings, or ``rule(model, lr)`` (an Adam, say)."""
    return bx.SGD(model, lr=lr, momentum=momentum, weight_decay=weight_decay) if rule is None else rule(model, lr)


def _reference_run(activation, dtype, momentum, weight_decay, x, y, sizes, lrs, n_hidden=64, rule=None):
    """The generic NumPy path: model.backprop then optimizer.step, batch by batch."""
    m = bx.MLP(784, n_hidden, 10, activation=activation, backend="numpy", dtype=dtype, seed=5)
    opt = _optimizer(m, lrs[0], momentum, weight_decay, rule)
    history = []
    for i, (xb, yb) in enumerate(_batches(x, y, sizes)):
        opt.lr = lrs[i]
        loss, n_correct = m.backprop(xb, yb)
        opt.step()
        history.append((float(loss), int(n_correct)))
    return m, opt, history


def _fused_run(cupy, graphs, activation, dtype, momentum, weight_decay, x, y, sizes, lrs, prepare=None, fused=None,
               n_hidden=64, rule=None):  # fmt: skip
    """The GPU step over the same batches, each gathered into one of two alternating buffers, as Minibatches does."""
    from backprop_xp.cuda.fused_gpu_step import make_gpu_step

    m = bx.MLP(784, n_hidden, 10, activation=activation, backend="cupy", dtype=dtype, seed=5)
    opt = _optimizer(m, lrs[0], momentum, weight_decay, rule)
    notices = []
    step = make_gpu_step(m, opt, graphs=graphs, fused=fused)
    step._notice = notices.append
    if prepare is not None:
        prepare(step)
    x_buffers = [cupy.empty((max(sizes), 784), dtype) for _ in range(2)]
    y_buffers = [cupy.empty(max(sizes), cupy.int64) for _ in range(2)]
    history = []
    for i, (xb, yb) in enumerate(_batches(x, y, sizes)):
        opt.lr = lrs[i]
        x_dev, y_dev = x_buffers[i % 2][: len(xb)], y_buffers[i % 2][: len(yb)]
        x_dev.set(xb)
        y_dev.set(yb)
        loss, n_correct = step(x_dev, y_dev)
        assert isinstance(loss, cupy.ndarray) and loss.shape == () and n_correct.dtype == cupy.int64
        history.append((float(loss), int(n_correct)))  # copies now: the buffers are reused by the next step
    return m, step, history, notices


# Full batches of 50 with a partial batch of 17 between them (a new size, eager first, then a graph), and a
# learning-rate change after a graph was captured.
SIZES = [50, 50, 50, 17, 50, 17, 50, 17, 50]
LRS = [0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.02, 0.02, 0.02]


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
@pytest.mark.parametrize(
    "activation, dtype, momentum, weight_decay",
    [
        ("relu", "float32", 0.9, 0.0),
        ("relu", "float64", 0.9, 5e-4),
        ("sigmoid", "float64", 0.0, 0.0),
        ("tanh", "float64", 0.5, 1e-3),
    ],
)
def test_step_follows_the_reference(cupy, graphs, activation, dtype, momentum, weight_decay):
    """The fused step, eager and captured, equals MLP.backprop + SGD.step on NumPy over nine steps."""
    rng = np.random.default_rng(9)
    n = sum(SIZES)
    x = rng.random((n, 784)).astype(dtype)
    y = rng.integers(0, 10, n)
    ref, ref_opt, ref_history = _reference_run(activation, dtype, momentum, weight_decay, x, y, SIZES, LRS)
    got, step, history, notices = _fused_run(
        cupy, graphs, activation, dtype, momentum, weight_decay, x, y, SIZES, LRS, fused=True
    )
    assert step.fused
    rtol = 2e-4 if dtype == "float32" else 1e-9  # nine steps of float32 rounding through cuBLAS
    for (loss, correct), (ref_loss, ref_correct) in zip(history, ref_history):
        np.testing.assert_allclose(loss, ref_loss, rtol=rtol)
        # float32: a row whose two best logits differ by a rounding error may flip between BLAS libraries
        assert abs(correct - ref_correct) <= (1 if dtype == "float32" else 0)
    for name in ref.params:
        close(got.params[name], ref.params[name], dtype, rtol=rtol)
    if momentum:
        close(step.optimizer.velocity, ref_opt.velocity, dtype, rtol=rtol)
    assert notices == [] and step.capture_error is None, notices


ADAM_LRS = [1e-3] * 4 + [5e-4] * 5  # a rate change after the graphs were captured


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
@pytest.mark.parametrize(
    "rule, activation, dtype",
    [(bx.Adam, "relu", "float64"), (bx.AdamW, "tanh", "float64"), (bx.Adam, "relu", "float32")],
)
def test_captured_adam_step_follows_adam_step(cupy, graphs, rule, activation, dtype):
    """The fused step with Adam's kernel, eager and captured, equals MLP.backprop + Adam.step on NumPy."""
    rng = np.random.default_rng(22)
    n = sum(SIZES)
    x = rng.random((n, 784)).astype(dtype)
    y = rng.integers(0, 10, n)
    ref, ref_opt, ref_history = _reference_run(activation, dtype, 0, 0, x, y, SIZES, ADAM_LRS, rule=rule)
    got, step, history, notices = _fused_run(
        cupy, graphs, activation, dtype, 0, 0, x, y, SIZES, ADAM_LRS, fused=True, rule=rule
    )
    assert step.fused and "adam_update_" in step.update.kernel
    assert step.mode == ("graphs" if graphs else "eager") and step.capture_error is None, notices
    assert step.n_replays == (len(SIZES) - 2 if graphs else 0)
    rtol = 2e-4 if dtype == "float32" else 1e-9
    for (loss, correct), (ref_loss, ref_correct) in zip(history, ref_history, strict=True):
        np.testing.assert_allclose(loss, ref_loss, rtol=rtol)
        assert abs(correct - ref_correct) <= (1 if dtype == "float32" else 0)
    opt = step.optimizer
    assert opt.t == ref_opt.t == len(SIZES)
    for name in ref.params:
        close(got.params[name], ref.params[name], dtype, rtol=rtol)
    close(opt.m, ref_opt.m, dtype, rtol=rtol, atol_scale=10)
    close(opt.v, ref_opt.v, dtype, rtol=rtol, atol_scale=10)


def test_captured_adam_graphs_equal_eager_adam_bit_for_bit(cupy):
    """Adam's per-step numbers reach the replayed graphs: captured and eager runs give the same bits."""
    rng = np.random.default_rng(23)
    n = sum(SIZES)
    x = rng.random((n, 784)).astype(np.float32)
    y = rng.integers(0, 10, n)
    runs = [_fused_run(cupy, graphs, "relu", "float32", 0, 0, x, y, SIZES, ADAM_LRS, rule=bx.AdamW)
            for graphs in (False, True)]  # fmt: skip
    (eager, _, eager_history, _), (graph, step, graph_history, notices) = runs
    assert step.mode == "graphs" and step.capture_error is None, notices
    assert (step.n_captures, step.n_replays) == (3, 7)
    assert graph_history == eager_history
    for name in eager.params:
        np.testing.assert_array_equal(graph.params[name].get(), eager.params[name].get())


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_fused_step_equals_backprop_and_sgd(cupy, dtype):
    """The issue's tolerance for one step: float64 to 1e-12 relative, float32 to float32 rounding."""
    rng = np.random.default_rng(18)
    x = rng.random((128, 784)).astype(dtype)
    y = rng.integers(0, 10, 128)
    ref, _, _ = _reference_run("relu", dtype, 0.9, 1e-4, x, y, [128], [0.1], n_hidden=800)
    got, step, _, _ = _fused_run(cupy, False, "relu", dtype, 0.9, 1e-4, x, y, [128], [0.1], fused=True, n_hidden=800)
    assert step.fused
    for name in ref.params:
        close(got.params[name], ref.params[name], dtype, rtol=1e-12 if dtype == "float64" else 1e-6)


def test_graphs_are_captured_per_batch_size_and_buffer_and_equal_eager(cupy):
    """A graph per (batch size, input buffer) after the size's first (eager) step; replays equal eager bit for bit."""
    rng = np.random.default_rng(10)
    n = sum(SIZES)
    x = rng.random((n, 784)).astype(np.float32)
    y = rng.integers(0, 10, n)
    eager, eager_step, eager_history, _ = _fused_run(cupy, False, "relu", "float32", 0.9, 0.0, x, y, SIZES, LRS)
    graph, step, graph_history, notices = _fused_run(cupy, True, "relu", "float32", 0.9, 0.0, x, y, SIZES, LRS)
    assert step.mode == "graphs" and step.capture_error is None, f"capture failed: {step.capture_error} {notices}"
    # steps 0 (50, first: eager), 1 (50, buffer B: capture), 2 (50, A: capture), 3 (17, first: eager),
    # 5 (17, B: capture); every later step replays
    assert {size: len(buf.graphs) for size, buf in step._workspaces.items()} == {50: 2, 17: 1}
    assert (step.n_captures, step.n_replays) == (3, 7) and (eager_step.n_captures, eager_step.n_replays) == (0, 0)
    assert graph_history == eager_history  # the same kernels in the same order: bit for bit
    for name in eager.params:
        np.testing.assert_array_equal(graph.params[name].get(), eager.params[name].get())


def test_a_training_epoch_replays_graphs_from_minibatches(cupy):
    """Minibatches' two buffers give two graphs per batch size; every later step of the run is a replay."""
    from backprop_xp.data import Minibatches
    from backprop_xp.training import make_step, run_epoch

    rng = np.random.default_rng(19)
    x, y = rng.random((517, 784)).astype(np.float32), rng.integers(0, 10, 517)
    m = bx.MLP(784, 64, 10, backend="cupy")
    step = make_step(m, bx.SGD(m, lr=0.1, momentum=0.9))
    batches = Minibatches(x, y, 100, xp=cupy, seed=0)  # 5 full batches, then one of 17 (always in buffer B)
    for epoch in range(3):
        sums = run_epoch(step, batches, epoch)
        assert sums.n_samples == 517 and sums.first_bad_step is None
    assert step.mode == "graphs", step.capture_error
    assert {size: len(buf.graphs) for size, buf in step._workspaces.items()} == {100: 2, 17: 1}
    assert step.n_replays == 3 * 6 - 2  # all but the first step of each size
    assert step.n_captures == 3


def test_a_shape_the_fused_kernel_does_not_fit_runs_backprop_and_sgd(cupy):
    """fused=None runs MLP.backprop + SGD.step where W2 does not fit in shared memory (said once); fused=True refuses."""
    from backprop_xp.cuda.fused_gpu_step import make_gpu_step

    rng = np.random.default_rng(20)
    x, y = rng.random((8, 784)), rng.integers(0, 10, 8)
    ref = bx.MLP(784, 30_000, 10, dtype="float64", seed=6)  # W2 alone: 2.4 MB
    ref_opt = bx.SGD(ref, lr=0.1, momentum=0.9)
    m = bx.MLP(784, 30_000, 10, backend="cupy", dtype="float64", seed=6)
    step = make_gpu_step(m, bx.SGD(m, lr=0.1, momentum=0.9))
    notices = []
    step._notice = notices.append
    for _ in range(3):
        ref_loss, _ = ref.backprop(x, y)
        ref_opt.step()
        loss, _ = step(cupy.asarray(x), cupy.asarray(y))
        close(loss, ref_loss, "float64")
    assert not step.fused and step.n_captures == 0
    assert len(notices) == 1 and "does not fit" in notices[0] and "MLP.backprop" in notices[0]
    for name in ref.params:
        close(m.params[name], ref.params[name], "float64", rtol=1e-9)
    with pytest.raises(ValueError, match="does not fit"):
        make_gpu_step(m, bx.SGD(m, lr=0.1), fused=True)(cupy.asarray(x), cupy.asarray(y))


class _RefusingStream:
    """A real stream whose begin_capture fails, as on a CuPy that refuses cuBLAS under capture."""

    def __init__(self, stream):
        self.stream = stream
        self.ptr = stream.ptr

    def __enter__(self):
        return self.stream.__enter__()

    def __exit__(self, *exc):
        return self.stream.__exit__(*exc)

    def begin_capture(self, *args, **kwargs):
        raise NotImplementedError("capture refused (simulated)")


def test_graph_step_falls_back_to_eager_with_one_notice(cupy):
    """When capture fails, the step says so once and goes on eagerly, still correct."""

    def refuse(step):
        step._capture_stream = _RefusingStream(cupy.cuda.Stream(non_blocking=True))

    rng = np.random.default_rng(11)
    n = sum(SIZES)
    x = rng.random((n, 784)).astype(np.float64)
    y = rng.integers(0, 10, n)
    ref, _, ref_history = _reference_run("relu", "float64", 0.9, 0.0, x, y, SIZES, LRS)
    got, step, history, notices = _fused_run(cupy, True, "relu", "float64", 0.9, 0.0, x, y, SIZES, LRS, prepare=refuse)
    assert step.mode == "eager" and "simulated" in step.capture_error
    assert len(notices) == 1 and "running the fused step eagerly" in notices[0]
    np.testing.assert_allclose(np.array(history), np.array(ref_history), rtol=1e-9)
    for name in ref.params:
        close(got.params[name], ref.params[name], "float64", rtol=1e-9)


def test_graph_step_follows_a_new_velocity_array(cupy):
    """Replacing optimizer.velocity (a restored checkpoint, say) re-captures instead of updating the old one."""
    from backprop_xp.cuda.fused_gpu_step import make_gpu_step

    rng = np.random.default_rng(12)
    x = cupy.asarray(rng.random((40, 784)).astype(np.float32))
    y = cupy.asarray(rng.integers(0, 10, 40))
    m = bx.MLP(784, 16, 10, backend="cupy")
    opt = bx.SGD(m, lr=0.1, momentum=0.9)
    step = make_gpu_step(m, opt)
    for _ in range(3):
        step(x, y)
    assert step.n_replays == 2
    old = opt.velocity
    opt.velocity = cupy.zeros_like(old)
    step(x, y)
    assert float(cupy.abs(opt.velocity).sum()) > 0  # the new array was updated...
    before = old.copy()
    step(x, y)
    np.testing.assert_array_equal(old.get(), before.get())  # ...and the old one is left alone


def test_an_optimizer_with_its_own_step_is_never_fused(cupy):
    """make_step keeps model.backprop + optimizer.step() for an SGD subclass whose step() differs."""
    from backprop_xp.cuda.fused_gpu_step import GpuStep, make_gpu_step
    from backprop_xp.training import make_step

    class HalfSteps(bx.SGD):
        def step(self):
            self.lr /= 2
            super().step()

    m = bx.MLP(784, 16, 10, backend="cupy")
    opt = HalfSteps(m, lr=0.1)
    step = make_step(m, opt)
    assert not isinstance(step, GpuStep)
    step(cupy.zeros((8, 784), cupy.float32), cupy.zeros(8, cupy.int64))
    assert opt.lr == 0.05  # its own step() ran
    assert isinstance(make_step(m, bx.SGD(m, lr=0.1)), GpuStep)
    with pytest.raises(ValueError, match="HalfSteps has a step"):
        make_gpu_step(m, opt)


def test_step_rejects_wrong_inputs_with_a_clear_message(cupy):
    from backprop_xp.cuda.fused_gpu_step import make_gpu_step

    m = bx.MLP(784, 16, 10, backend="cupy")
    step = make_gpu_step(m, bx.SGD(m, lr=0.1))
    x = cupy.zeros((8, 784), cupy.float32)
    with pytest.raises(ValueError, match="784"):
        step(cupy.zeros((8, 783), cupy.float32), cupy.zeros(8, cupy.int64))
    with pytest.raises(ValueError, match="float32"):
        step(x.astype(cupy.float64), cupy.zeros(8, cupy.int64))
    with pytest.raises(ValueError, match="int64"):
        step(x, cupy.zeros(8, cupy.int32))
    with pytest.raises(ValueError, match="CuPy"):
        step(np.zeros((8, 784), np.float32), np.zeros(8, np.int64))
    with pytest.raises(ValueError, match="CuPy model"):
        make_gpu_step(bx.MLP(784, 16, 10), None)


def test_step_accepts_strided_views(cupy):
    """Every other row and label (not contiguous: eager) give the same step as their contiguous copies (graphs)."""
    from backprop_xp.cuda.fused_gpu_step import make_gpu_step

    rng = np.random.default_rng(15)
    x = cupy.asarray(rng.random((60, 784)).astype(np.float64))
    y = cupy.asarray(rng.integers(0, 10, 60))
    results = []
    for xb, yb in ((x[::2], y[::2]), (cupy.ascontiguousarray(x[::2]), cupy.ascontiguousarray(y[::2]))):
        m = bx.MLP(784, 16, 10, backend="cupy", dtype="float64")
        step = make_gpu_step(m, bx.SGD(m, lr=0.1, momentum=0.9))
        for _ in range(3):  # eager, capture + replay, replay
            loss, n_correct = step(xb, yb)
        results.append((float(loss), int(n_correct), m.flat_params.get()))
    assert results[0][:2] == results[1][:2]
    np.testing.assert_array_equal(results[0][2], results[1][2])


# --------------------------------------------------------------------------- no host synchronisation


HOLD_SOURCE = r"""
extern "C" __global__ void hold(volatile const int* release, int* outcome, long long max_cycles) {
    // Spin until the host writes release[0] (mapped pinned memory) or the time limit passes.
    long long start = clock64();
    while (release[0] == 0) {
        if (clock64() - start > max_cycles) { outcome[0] = 2; return; }
    }
    outcome[0] = 1;
}
"""


@pytest.mark.parametrize("rule", ["sgd", "adam"])
def test_step_loop_never_waits_for_the_device(cupy, rule):
    """Steps are enqueued while the device is held busy; the host releases it only afterwards.

    A kernel on the same stream spins until the host writes a flag into pinned
    memory. If any step call waited for the device (a ``.get()``, an ``item()``,
    a synchronising copy), it would wait for that kernel, which waits for the
    host: the kernel then gives up after its time limit and reports it. This
    tests the graph replays (after their capture), a learning-rate change and
    the eager fused step, with SGD and with Adam (whose numbers change every
    step); it is a causal test, not a timing one.
    """
    from backprop_xp.cuda.fused_gpu_step import make_gpu_step

    rng = np.random.default_rng(13)
    x = cupy.asarray(rng.random((700, 784)).astype(np.float32))
    y = cupy.asarray(rng.integers(0, 10, 700))
    m = bx.MLP(784, 64, 10, backend="cupy")
    opt = bx.SGD(m, lr=0.1, momentum=0.9) if rule == "sgd" else bx.Adam(m, lr=0.1)
    graph_step, eager_step = make_gpu_step(m, opt, graphs=True), make_gpu_step(m, opt, graphs=False)
    losses = cupy.zeros(6, cupy.float32)
    # First steps (compile, allocate, capture) happen before the hold, and every kernel the loop
    # below uses is launched once here: with CUDA's lazy module loading, the first launch of a
    # kernel may wait for the device, which would deadlock against the hold kernel.
    for step in (graph_step, eager_step):
        for i in range(2):
            loss, _ = step(x[i * 100 : (i + 1) * 100], y[i * 100 : (i + 1) * 100])
            losses[i] = loss
    opt.lr = 0.07
    graph_step(x[:100], y[:100])
    eager_step(x[:100], y[:100])
    cupy.cuda.get_current_stream().synchronize()

    pinned = cupy.cuda.alloc_pinned_memory(8)
    release = np.frombuffer(pinned, np.int32, 2)
    release[:] = 0
    outcome = cupy.zeros(1, cupy.int32)
    hold = cupy.RawKernel(HOLD_SOURCE, "hold")
    # gives up after 2e10 cycles: about 10 s at 2 GHz (clock64 counts SM cycles)
    hold((1,), (1,), (np.uint64(pinned.ptr), outcome, np.int64(20_000_000_000)))
    for i in range(6):
        if i == 3:
            opt.lr = 0.05
        step = graph_step if i % 2 == 0 else eager_step
        loss, _ = step(x[i * 100 : (i + 1) * 100], y[i * 100 : (i + 1) * 100])
        losses[i] = loss
    release[0] = 1  # only now may the device go on
    cupy.cuda.get_current_stream().synchronize()
    assert int(outcome[0]) == 1, "a step call waited for the device (the hold kernel timed out)"
    assert np.isfinite(losses.get()).all()
