"""The CUDA Adam kernel (updates.cu's adam_update): compiled by NVRTC, and run on the CPU emulator against Adam.step."""

from __future__ import annotations

import re

import numpy as np
import pytest
from test_cuda_compile import compile_ptx, nvrtc, standalone_elementwise  # noqa: F401 - nvrtc is a fixture
from test_kernel_twins import elementwise

import backprop_xp as bx
from backprop_xp.cpu import numba_loops
from backprop_xp.cuda import cuda_kernels as kc
from backprop_xp.optimizers import Adam, AdamW

ADAM_SPEC = next(spec for spec in kc.elementwise_specs() if spec.name == "adam")


@pytest.mark.parametrize("float_type", ["float", "double"])
def test_adam_kernel_compiles_without_multiply_adds(nvrtc, float_type):  # noqa: F811
    source = standalone_elementwise(ADAM_SPEC, float_type)
    for arch in nvrtc.archs:
        ptx = compile_ptx(nvrtc, source, ADAM_SPEC.name, ADAM_SPEC.options, arch)
        assert re.search(rf"\.entry\s+{ADAM_SPEC.name}\s*\(", ptx), f"no entry point {ADAM_SPEC.name} in the PTX"
    suffix = "f32" if float_type == "float" else "f64"
    assert not re.search(rf"fma\.rn(\.ftz)?\.{suffix}", ptx)  # no multiply-add contracted (--fmad=false)
    assert re.search(rf"sqrt\.rn(\.ftz)?\.{suffix}", ptx)  # the correctly rounded root, as NumPy's


def adam_hyper(opt: Adam) -> np.ndarray:
    """What the kernel reads: ``Adam.fused_hyper()`` at the optimizer's ``t``, then 1 for AdamW, 0 for Adam."""
    return np.append(opt.fused_hyper(), 1.0 if opt.DECOUPLED else 0.0).astype(opt.model.dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind, weight_decay", [(Adam, 0.0), (Adam, 1e-2), (AdamW, 1e-2)])
def test_adam_kernel_on_the_emulator_equals_adam_step_bit_for_bit(kind, weight_decay, dtype):
    rng = np.random.default_rng(11)
    previous = numba_loops.set_enabled(False)  # the reference is the xp lines themselves
    try:
        model = bx.MLP(30, 20, 10, dtype=dtype, seed=2)
        opt = kind(model, lr=3e-3, beta1=0.8, beta2=0.99, eps=1e-7, weight_decay=weight_decay)
        w, m, v = model.flat_params.copy(), np.zeros_like(model.flat_params), np.zeros_like(model.flat_params)
        for _ in range(30):
            g = (rng.normal(size=w.shape) * 10.0 ** rng.integers(-4, 2)).astype(dtype)
            model.flat_grads[...] = g
            opt.step()  # t becomes this step's
            elementwise().run("adam", dtype, g, adam_hyper(opt), w, m, v)
    finally:
        numba_loops.set_enabled(previous)
    np.testing.assert_array_equal(m, opt.m)
    np.testing.assert_array_equal(v, opt.v)
    np.testing.assert_array_equal(w, model.flat_params)
