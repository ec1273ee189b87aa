"""The GPU step's update table (cuda/fused_gpu_step.GPU_UPDATES) and its per-step numbers, on the CPU.

No GPU here: CuPy is a stand-in whose arrays are NumPy's (``NumpyAsCupy`` of
test_step_without_nvmath.py) with streams, capture and graphs of its own. A
capture records the step's launches instead of running them and a replay runs
the recording, so a graph reads ``hyper`` and the optimizer's arrays when it
is replayed, as a CUDA graph reads device memory. The launches are the real
ones where the CPU can run them: the matrix products through ``Blas`` over the
emulated cuBLAS of test_cublas.py, the update through the kernels' own CUDA
source compiled by g++ (``cuda_emulator.EmulatedElementwise``); the output
layer is its NumPy twin (its kernel is emulated in test_cuda_emulated.py).

The reference of every update is the optimizer's own ``step()`` on NumPy, fed
the same gradients: equal bit for bit, over many steps, with a learning-rate
change after the graphs were captured, and after a resume from ``state_dict``.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import types

import numpy as np
import pytest
from kernel_references import output_layer_reference
from test_bench_gpu_bound import capturing_cublas
from test_kernel_twins import elementwise
from test_step_without_nvmath import NumpyAsCupy

import backprop_xp as bx
from backprop_xp import step as step_module
from backprop_xp.cpu import numba_loops
from backprop_xp.cuda import cuda_kernels as kc
from backprop_xp.cuda import fused_gpu_step
from backprop_xp.cuda.cublas import Blas
from backprop_xp.cuda.fused_gpu_step import GPU_UPDATES, GpuStep, has_gpu_update
from backprop_xp.optimizers import SGD, Adam, AdamW, Nesterov

needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")


class DeviceArray(np.ndarray):
    """A NumPy array with CuPy's ``.data.ptr`` (graphs are keyed by their inputs' addresses)."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.__array_interface__["data"][0])


class StandInCupy(NumpyAsCupy):
    """``NumpyAsCupy`` with streams, capture and graphs: a launch made while a capture is open is recorded."""

    def __init__(self) -> None:
        super().__init__()
        runtime = self.cuda.runtime
        runtime.deviceGetAttribute = lambda attribute, device: {kc.MULTIPROCESSOR_COUNT: 132}.get(attribute, 232448)
        cuda = self.cuda
        cuda.capturing, cuda.gemms_run, cuda.graphs = None, 0, 0
        stream = types.SimpleNamespace(ptr=0)
        cuda.get_current_stream = lambda: stream
        cuda.Stream = lambda non_blocking=False: _Stream(cuda)
        cuda.MemoryPool = lambda: types.SimpleNamespace(malloc=None)
        cuda.using_allocator = lambda malloc: contextlib.nullcontext()
        self.ndarray = DeviceArray

    def launch(self, call) -> None:
        """Run ``call`` now, or record it into the open capture."""
        if self.cuda.capturing is not None:
            self.cuda.capturing.append(call)
        else:
            call()


class _Stream:
    ptr = 0x5EED

    def __init__(self, cuda) -> None:
        self.cuda = cuda

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def begin_capture(self) -> None:
        self.cuda.capturing = []

    def end_capture(self):
        recorded, self.cuda.capturing = self.cuda.capturing, None
        self.cuda.graphs += 1
        return types.SimpleNamespace(launch=lambda stream: [call() for call in recorded], upload=lambda stream: None)


def _output_layer_twin(cupy):
    """``output_layer_step`` as its NumPy twin, writing what the kernel writes, launched on the stand-in."""

    def output_layer_step(a1, labels, params, grads, delta2, delta1, loss, n_correct, scratch, activation):
        def run():
            out = output_layer_reference(a1, labels, params, activation)
            a1[...], delta2[...], delta1[...] = out["a1"], out["delta2"], out["delta1"]
            loss[...], n_correct[...] = out["loss"], out["n_correct"]
            for name in ("W2", "b1", "b2"):
                grads[name][...] = out[name]

        cupy.launch(run)

    return output_layer_step


def _emulated_updates(cupy):
    """``sgd_momentum_`` and ``adam_update_`` as updates.cu compiled by g++, launched on the stand-in."""

    def sgd_momentum_(w, g, velocity, hyper):
        if velocity is None:
            cupy.launch(lambda: elementwise().run("sgd_plain", w.dtype, g, hyper, w))
        else:
            cupy.launch(lambda: elementwise().run("sgd_momentum", w.dtype, g, hyper, w, velocity))

    def adam_update_(w, g, m, v, hyper):
        cupy.launch(lambda: elementwise().run("adam", w.dtype, g, hyper, w, m, v))

    return sgd_momentum_, adam_update_


@pytest.fixture
def standin(monkeypatch):
    """The stand-in installed as ``cupy``; the step's cuBLAS, output layer and updates replaced as above."""
    cupy = StandInCupy()
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setattr(step_module, "_SAID", set())
    monkeypatch.setattr(fused_gpu_step, "Blas", lambda xp, tf32=False: Blas(xp, bindings=capturing_cublas(cupy, [])))
    monkeypatch.setattr(kc, "output_layer_step", _output_layer_twin(cupy))
    sgd_momentum_, adam_update_ = _emulated_updates(cupy)
    monkeypatch.setattr(kc, "sgd_momentum_", sgd_momentum_)
    monkeypatch.setattr(kc, "adam_update_", adam_update_)
    kc.device_limits.cache_clear()
    previous = numba_loops.set_enabled(False)  # the reference is the optimizers' xp lines themselves
    yield cupy
    numba_loops.set_enabled(previous)
    kc.device_limits.cache_clear()


# --------------------------------------------------------------------------- the table


def test_the_table_routes_each_optimizer_to_its_kernel():
    """Adam and AdamW to the Adam kernel, SGD to SGD's; Nesterov and any subclass keep their own step()."""
    assert "sgd_momentum_" in GPU_UPDATES[SGD].kernel
    assert "adam_update_" in GPU_UPDATES[Adam].kernel and "adam_update_" in GPU_UPDATES[AdamW].kernel
    assert GPU_UPDATES[Adam].launch is GPU_UPDATES[AdamW].launch

    class MyAdam(Adam):
        pass

    model = bx.MLP(4, 3, 2)
    for rule in (SGD, Adam, AdamW):
        assert has_gpu_update(rule(model, 0.1))
    for rule in (Nesterov, MyAdam):
        assert not has_gpu_update(rule(model, 0.1))


@pytest.mark.parametrize("rule", [SGD, Adam, AdamW, Nesterov])
def test_make_step_gives_the_gpu_step_to_every_rule_in_the_table(standin, rule):
    model = bx.MLP(6, 5, 3, backend="cupy")
    step = bx.training.make_step(model, rule(model, 0.1))
    if rule is Nesterov:
        assert isinstance(step, step_module.TextbookStep) and step.mode == "eager"
    else:
        assert isinstance(step, GpuStep) and step.update is GPU_UPDATES[rule]
        assert step.launches(None, None, None)[-1][0] == f"w ← {GPU_UPDATES[rule].kernel}"


# --------------------------------------------------------------------------- many steps, bit for bit

SIZES = [50, 50, 50, 17, 50, 17, 50, 17, 50, 50, 17, 50]  # two buffers, two sizes: four graphs
LRS = [3e-3] * 6 + [1e-3] * 6  # a change after the graphs were captured


def adam_hyper(opt) -> np.ndarray:
    """What the Adam kernel must read at the optimizer's ``t``: ``Adam.fused_hyper()``, then the AdamW flag."""
    return np.concatenate([opt.fused_hyper(), np.array([1.0 if opt.DECOUPLED else 0.0], opt.model.dtype)])


def _run(cupy, rule, settings, dtype, sizes=SIZES, lrs=LRS, state=None):
    """The GPU step on the stand-in and the optimizer's own step() on NumPy, fed the same gradients, step by step.

    Returns (step, optimizer, reference optimizer, the hypers read at each step). ``state``: a ``state_dict``
    both optimizers start from (a resume)."""
    model = bx.MLP(30, 20, 10, backend="cupy", dtype=dtype, seed=3)
    reference = bx.MLP(30, 20, 10, backend="numpy", dtype=dtype, seed=3)
    opt, ref_opt = rule(model, lrs[0], **settings), rule(reference, lrs[0], **settings)
    if state is not None:
        opt.load_state_dict(state)
        ref_opt.load_state_dict(state)
    step = GpuStep(model, opt, graphs=True, fused=True)
    rng = np.random.default_rng(8)
    buffers = [(np.empty((max(sizes), 30), dtype).view(DeviceArray), np.empty(max(sizes), np.int64).view(DeviceArray))
               for _ in range(2)]  # fmt: skip
    hypers = []
    for i, (size, lr) in enumerate(zip(sizes, lrs, strict=True)):
        opt.lr = ref_opt.lr = lr
        x, y = buffers[i % 2][0][:size], buffers[i % 2][1][:size]
        x[...], y[...] = rng.random((size, 30)), rng.integers(0, 10, size)
        step(x, y)
        hypers.append(np.array(step._hyper))
        reference.flat_grads[...] = model.flat_grads  # the gradients the kernel read (it leaves them unchanged)
        ref_opt.step()
        np.testing.assert_array_equal(model.flat_params, reference.flat_params, err_msg=f"step {i + 1}")
    # the first step of each size eager, then one graph per (size, buffer), each captured once (a new
    # learning rate or step count is no reason to recapture), and replayed from then on
    first = {size: i for i, size in reversed(list(enumerate(sizes)))}  # each size's first step: eager
    graphs = {(size, i % 2) for i, size in enumerate(sizes) if i != first[size]}
    assert step.mode == "graphs" and step.n_captures == len(graphs) and step.n_replays == len(sizes) - len(first)
    return step, opt, ref_opt, hypers


@needs_gxx
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    "rule, settings",
    [
        (Adam, dict(beta1=0.8, beta2=0.99, eps=1e-7)),
        (Adam, dict(weight_decay=1e-2)),
        (AdamW, dict(weight_decay=1e-2)),
    ],
    ids=["adam", "adam-l2", "adamw"],
)
def test_captured_adam_step_equals_adam_step_bit_for_bit(standin, rule, settings, dtype):
    """Twelve steps, four graphs, a rate change: weights, m, v and t as Adam.step's, and hyper as fused_hyper()."""
    step, opt, ref_opt, hypers = _run(standin, rule, settings, dtype)
    assert step.n_captures == 4 and step.n_replays == len(SIZES) - 2  # two sizes' first steps eager
    assert opt.t == ref_opt.t == len(SIZES)
    np.testing.assert_array_equal(opt.m, ref_opt.m)
    np.testing.assert_array_equal(opt.v, ref_opt.v)
    np.testing.assert_array_equal(hypers[-1], adam_hyper(ref_opt))  # the device's numbers at step t, to the bit
    assert len({h[4] for h in hypers}) == len(SIZES)  # √(1 − β₂ᵗ) changed at every step


@needs_gxx
@pytest.mark.parametrize("momentum, weight_decay", [(0.9, 5e-4), (0.0, 0.0)])
def test_captured_sgd_step_equals_sgd_step_bit_for_bit(standin, momentum, weight_decay):
    step, opt, ref_opt, hypers = _run(standin, SGD, dict(momentum=momentum, weight_decay=weight_decay), "float32")
    if momentum:
        np.testing.assert_array_equal(opt.velocity, ref_opt.velocity)
    np.testing.assert_array_equal(hypers[-1], np.array([LRS[-1], momentum, weight_decay], np.float32))


@needs_gxx
def test_a_resumed_adam_run_continues_from_the_saved_step_count(standin):
    """Adam's state from a checkpoint (t = 37): the first GPU step is t = 38, as Adam.step's would be."""
    rng = np.random.default_rng(2)
    donor = Adam(bx.MLP(30, 20, 10, dtype="float32", seed=3), 1e-3)
    state = {"m": rng.normal(0, 1e-2, donor.m.shape).astype(np.float32),
             "v": rng.random(donor.v.shape).astype(np.float32) * 1e-4, "t": np.int64(37)}  # fmt: skip
    step, opt, ref_opt, hypers = _run(standin, Adam, {}, "float32", sizes=[50, 50, 50, 50], lrs=[1e-3] * 4, state=state)
    assert opt.t == ref_opt.t == 41
    at_38 = Adam(bx.MLP(30, 20, 10, dtype="float32"), 1e-3)
    at_38.t = 38
    np.testing.assert_array_equal(hypers[0], adam_hyper(at_38))  # the first step's numbers: t = 38, not 1
    np.testing.assert_array_equal(opt.m, ref_opt.m)
    np.testing.assert_array_equal(opt.state_dict()["v"], ref_opt.state_dict()["v"])
