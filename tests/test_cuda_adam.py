"""The CUDA Adam kernel (cuda/cuda_kernels.py ADAM_SPEC): compiled by NVRTC, and run on the CPU emulator against Adam.step."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from cuda_emulator import EmulatedKernels
from test_cuda_compile import compile_ptx, nvrtc, standalone_elementwise  # noqa: F401 - nvrtc is a fixture

import backprop_xp as bx
from backprop_xp.cpu import numba_loops
from backprop_xp.cuda import cuda_kernels as kc
from backprop_xp.optimizers import Adam, AdamW

PARAMS = [("T*", "g_ptr"), ("T*", "hyper"), ("T*", "w_ptr"), ("T*", "m_ptr"), ("T*", "v_ptr"), ("int", "n")]


@pytest.mark.parametrize("float_type", ["float", "double"])
def test_adam_kernel_compiles_without_multiply_adds(nvrtc, float_type):  # noqa: F811
    spec = kc.ADAM_SPEC
    source = standalone_elementwise(spec, float_type)
    for arch in nvrtc.archs:
        ptx = compile_ptx(nvrtc, source, spec.name, spec.options, arch)
        assert re.search(rf"\.entry\s+{spec.name}\s*\(", ptx), f"no entry point {spec.name} in the PTX"
    suffix = "f32" if float_type == "float" else "f64"
    assert not re.search(rf"fma\.rn(\.ftz)?\.{suffix}", ptx)  # no multiply-add contracted (--fmad=false)
    assert re.search(rf"sqrt\.rn(\.ftz)?\.{suffix}", ptx)  # the correctly rounded root, as NumPy's


def _emulated() -> EmulatedKernels:
    """ADAM_SPEC's body in a grid-stride kernel per float type (as ElementwiseKernel wraps it), for g++."""
    spec = kc.ADAM_SPEC
    kernels = []
    for t in ("float", "double"):
        kernels.append(
            f"__global__ void adam_{t}({t}* g_ptr, {t}* hyper, {t}* w_ptr, {t}* m_ptr, {t}* v_ptr, int n) {{\n"
            f"  typedef {t} T; using std::sqrt;\n"
            "  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {\n"
            f"    const T g = g_ptr[i]; T& w = w_ptr[i]; T& m = m_ptr[i]; T& v = v_ptr[i];\n    {spec.body}\n  }}\n}}\n"
        )
    return EmulatedKernels("\n".join(kernels), {"adam_float": PARAMS, "adam_double": PARAMS})


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind, weight_decay", [(Adam, 0.0), (Adam, 1e-2), (AdamW, 1e-2)])
def test_adam_kernel_on_the_emulator_equals_adam_step_bit_for_bit(kind, weight_decay, dtype):
    emulated, rng = _emulated(), np.random.default_rng(11)
    previous = numba_loops.set_enabled(False)  # the reference is the xp lines themselves
    try:
        model = bx.MLP(30, 20, 10, dtype=dtype, seed=2)
        opt = kind(model, lr=3e-3, beta1=0.8, beta2=0.99, eps=1e-7, weight_decay=weight_decay)
        w, m, v = model.flat_params.copy(), np.zeros_like(model.flat_params), np.zeros_like(model.flat_params)
        for _ in range(30):
            g = (rng.normal(size=w.shape) * 10.0 ** rng.integers(-4, 2)).astype(dtype)
            model.flat_grads[...] = g
            opt.step()  # t becomes this step's
            hyper = np.append(opt.fused_hyper(), 1.0 if opt.DECOUPLED else 0.0).astype(dtype)
            name = "adam_float" if dtype == "float32" else "adam_double"
            emulated.launch(name, 4, 32, 0, g, hyper, w, m, v, w.size)  # 128 threads: a grid-stride loop
    finally:
        numba_loops.set_enabled(previous)
    np.testing.assert_array_equal(m, opt.m)
    np.testing.assert_array_equal(v, opt.v)
    np.testing.assert_array_equal(w, model.flat_params)
