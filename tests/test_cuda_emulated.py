"""The output-layer kernel of cuda/cuda_kernels.py, run on the CPU by tests/cuda_emulator.py, against its NumPy twin.

No GPU is needed: the kernels' own source is compiled with g++ and each CUDA
thread runs as a host thread (see the emulator's docstring for what that
does and does not check). Same launch configuration and scratch layout as the
CuPy wrappers use, so a wrong index, a missing barrier between phases, a
shuffle reduction that leaves lanes disagreeing, or a last-block reduction
that misses a block shows up here, before a GPU ever sees the code. The twin is in
tests/kernel_references.py.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from cuda_emulator import OUTPUT_LAYER_PARAMS, EmulatedKernels
from kernel_references import output_layer_reference

from backprop_xp.cuda import cuda_kernels as kc

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")

RTOL = {"float32": 2e-5, "float64": 1e-12}


def close(actual, expected, dtype, atol_scale=1.0):
    scale = float(np.max(np.abs(expected))) if np.size(expected) else 0.0
    np.testing.assert_allclose(actual, expected, rtol=RTOL[dtype], atol=RTOL[dtype] * scale * atol_scale)


_BUILT: dict = {}


def output_layer_kernels(activation: str, n_classes: int) -> EmulatedKernels:
    key = ("output_layer", activation, n_classes)
    if key not in _BUILT:
        _BUILT[key] = EmulatedKernels(
            kc.output_layer_source(activation),
            {"output_layer_float": OUTPUT_LAYER_PARAMS, "output_layer_double": OUTPUT_LAYER_PARAMS},
            defines={"N_CLASSES": n_classes},
        )
    return _BUILT[key]


H100_SMS = 132  # the grid of an H100: as many blocks as SMs at most


def run_output_layer(z1, params, labels, activation, n_classes, times=2, max_blocks=H100_SMS):
    """The kernel as output_layer_step launches it, on NumPy buffers poisoned with NaN; run ``times`` times."""
    batch, n_hidden = z1.shape
    dtype = z1.dtype
    kernels = output_layer_kernels(activation, n_classes)
    scratch = kc.OutputLayerScratch(np, batch, n_hidden, n_classes, dtype, max_blocks)
    scratch.partial_sums[...] = np.nan  # every partial a block reads must have been written
    name = f"output_layer_{'float' if dtype == np.float32 else 'double'}"
    for _ in range(times):
        a1 = z1.copy()
        out = {
            "delta2": np.full((batch, n_classes), np.nan, dtype), "delta1": np.full((batch, n_hidden), np.nan, dtype),
            "W2": np.full((n_classes, n_hidden), np.nan, dtype), "b1": np.full(n_hidden, np.nan, dtype),
            "b2": np.full(n_classes, np.nan, dtype), "loss": np.full((), np.nan, dtype),
            "n_correct": np.full((), -1, np.int64),
        }  # fmt: skip
        kernels.launch(
            name, scratch.n_blocks, kc.OUTPUT_LAYER_THREADS, scratch.shared_bytes,
            a1, params["b1"], params["W2"], params["b2"], labels, batch, n_hidden, scratch.rows_per_block,
            1.0 / batch, out["delta2"], out["delta1"], out["W2"], out["b1"], out["b2"], out["loss"], out["n_correct"],
            scratch.partial_sums, scratch.partial_correct, scratch.blocks_done,
        )  # fmt: skip
        assert scratch.blocks_done[0] == 0  # reset by the last block, ready for a graph replay
    return {"a1": a1, **out}, scratch.n_blocks


def case(rng, batch, n_hidden, n_classes, dtype):
    z1 = rng.normal(0, 1.5, size=(batch, n_hidden)).astype(dtype)
    z1[0, : min(3, n_hidden)] = 0.0
    params = {
        "b1": rng.normal(0, 0.5, n_hidden).astype(dtype),
        "W2": rng.normal(0, 1 / np.sqrt(n_hidden), size=(n_classes, n_hidden)).astype(dtype),
        "b2": rng.normal(0, 0.5, n_classes).astype(dtype),
    }
    return z1, params, rng.integers(0, n_classes, batch)


@pytest.mark.parametrize(
    "activation, dtype, batch, n_hidden, n_classes, max_blocks, n_blocks",
    [
        ("relu", "float32", 128, 128, 10, H100_SMS, 8),  # 8 blocks of 16 rows, 2 rows per warp
        ("relu", "float64", 37, 45, 10, H100_SMS, 3),  # H not a multiple of 32, a partial last block
        ("tanh", "float64", 1, 40, 10, H100_SMS, 1),  # one row: one block, seven idle warps
        ("sigmoid", "float32", 600, 70, 3, 20, 20),  # 20 blocks of 30 rows: more rows per block than warps
        ("relu", "float64", 700, 33, 10, 32, 32),  # a 32-SM device: 32 blocks of 22 rows
        ("relu", "float32", 2200, 40, 10, H100_SMS, 130),  # an H100's grid: 130 blocks of 17 rows
        ("tanh", "float32", 64, 300, 32, H100_SMS, 4),  # K = 32: every lane writes one class of δ2
    ],
)
def test_output_layer_kernel_matches_twin(activation, dtype, batch, n_hidden, n_classes, max_blocks, n_blocks):
    rng = np.random.default_rng(batch + n_hidden)
    z1, params, labels = case(rng, batch, n_hidden, n_classes, dtype)
    expected = output_layer_reference(z1, labels, params, activation)
    got, blocks = run_output_layer(z1, params, labels, activation, n_classes, max_blocks=max_blocks)
    assert blocks == n_blocks
    for name in ("a1", "delta2", "delta1", "W2"):
        close(got[name], expected[name], dtype)
    for name in ("b1", "b2"):  # sums of terms of both signs
        close(got[name], expected[name], dtype, atol_scale=10)
    close(got["loss"], expected["loss"], dtype)
    assert int(got["n_correct"]) == int(expected["n_correct"])


@pytest.mark.parametrize("activation", kc.ACTIVATIONS)
def test_every_activation_in_the_table_runs_as_its_xp_lines(activation):
    """Each entry's CUDA expressions (ACTIVATIONS[name].cuda, in output_layer.cu) against its xp lines: a new
    activation is checked here without a test of its own. a1 = f(z1 + b1) and δ1 = ... ⊙ f'(a1) to rounding."""
    rng = np.random.default_rng(31)
    z1, params, labels = case(rng, 37, 45, 10, "float64")
    expected = output_layer_reference(z1, labels, params, activation)
    got, _ = run_output_layer(z1, params, labels, activation, 10, times=1)
    for name in ("a1", "delta1"):
        close(got[name], expected[name], "float64")


def test_output_layer_counts_a_tie_as_argmax_does_first_maximum():
    """Classes 3 and 5 have the same weights and bias, the largest: every row ties, argmax says 3."""
    rng = np.random.default_rng(6)
    z1, params, labels = case(rng, 40, 64, 10, "float32")
    params["W2"][5], params["b2"][[3, 5]] = params["W2"][3], 50.0
    labels[:] = np.where(np.arange(40) % 3 == 0, 3, 5)  # 14 rows say 3, 26 say 5
    got, _ = run_output_layer(z1, params, labels, "relu", 10, times=1)
    assert int(got["n_correct"]) == 14 == int(np.count_nonzero(labels == 3))
    expected = output_layer_reference(z1, labels, params, "relu")
    assert int(expected["n_correct"]) == 14  # NumPy's argmax agrees: the twin has the same tie
    close(got["delta2"], expected["delta2"], "float32")


def test_output_layer_bad_labels_poison_their_rows_only():
    rng = np.random.default_rng(3)
    z1, params, labels = case(rng, 40, 64, 10, "float64")
    labels[[3, 20]] = [10, -1]
    got, _ = run_output_layer(z1, params, labels, "relu", 10, times=1)
    assert np.isnan(got["loss"]) and np.isnan(got["delta2"][[3, 20]]).all()
    good = np.delete(np.arange(40), [3, 20])
    assert np.isfinite(got["delta2"][good]).all() and np.isfinite(got["a1"]).all()


def test_output_layer_is_deterministic():
    """Fixed reduction order: two launches give the same bits."""
    rng = np.random.default_rng(4)
    z1, params, labels = case(rng, 300, 50, 10, "float32")
    first, _ = run_output_layer(z1, params, labels, "relu", 10, times=1)
    second, _ = run_output_layer(z1, params, labels, "relu", 10, times=1)
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])


def test_the_emulator_catches_a_planted_bug():
    """The harness can fail: a kernel whose δ1 skips the activation's derivative is caught."""
    source = kc.output_layer_source("tanh").replace("d1[h] = s * act_derivative<T>(a[h]);", "d1[h] = s;")
    assert source != kc.output_layer_source("tanh")
    _BUILT[("output_layer", "tanh", 10)] = EmulatedKernels(
        source, {"output_layer_double": OUTPUT_LAYER_PARAMS, "output_layer_float": OUTPUT_LAYER_PARAMS},
        defines={"N_CLASSES": 10},
    )  # fmt: skip
    try:
        rng = np.random.default_rng(5)
        z1, params, labels = case(rng, 20, 40, 10, "float64")
        got, _ = run_output_layer(z1, params, labels, "tanh", 10, times=1)
        expected = output_layer_reference(z1, labels, params, "tanh")
        with pytest.raises(AssertionError):
            close(got["delta1"], expected["delta1"], "float64")
    finally:
        del _BUILT[("output_layer", "tanh", 10)]
