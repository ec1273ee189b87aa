"""Every CUDA source in kernels_cuda.py compiles with NVRTC, without a GPU.

NVRTC (the CUDA runtime compiler CuPy uses) needs no device, so this runs on
the CPU CI machine when ``nvidia-cuda-nvrtc-cu12`` and ``cupy-cuda12x`` are
installed, and skips with the reason otherwise. The RawKernel source compiles
as shipped. An ElementwiseKernel body is only a fragment: CuPy wraps it into a
kernel with its own array types, which needs a device to generate, so here
each body is wrapped into an equivalent plain ``extern "C" __global__``
function (raw parameters as pointers, the others as one element each, ``T``
the float type, ``i`` the element index), which checks the body, preamble and
options for syntax, types and name errors in both float32 and float64. What
this cannot check is CuPy's own wrapper; tests/test_gpu.py runs the real
kernels on a device.
"""

from __future__ import annotations

import re

import pytest

from backprop_xp import kernels_cuda as kc

# Old enough for any GPU CuPy 13 supports (Volta), and the H100 the benchmarks target.
ARCHS = ("compute_70", "compute_90")
CTYPES = {"T": "T", "int64": "long long", "int32": "int", "uint32": "unsigned int", "float32": "float", "float64": "double"}


@pytest.fixture(scope="module")
def nvrtc():
    """CuPy's NVRTC binding, or a skip saying why it is missing."""
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as exc:  # noqa: BLE001 - missing package, missing libnvrtc: all mean "cannot compile here"
        pytest.skip(f"NVRTC not available ({type(exc).__name__}: {exc}); pip install nvidia-cuda-nvrtc-cu12 cupy-cuda12x")
    return nvrtc


def compile_ptx(nvrtc, source: str, name: str, options: tuple[str, ...], arch: str) -> str:
    """PTX of ``source``; a compile error fails the test with NVRTC's log."""
    program = nvrtc.createProgram(source, f"{name}.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(program, [f"--gpu-architecture={arch}", "-std=c++17", *options])
        except nvrtc.NVRTCError as exc:
            pytest.fail(f"{name} ({arch}) does not compile: {exc}\n{nvrtc.getProgramLog(program)}\n--- source ---\n{source}")
        ptx = nvrtc.getPTX(program)
    finally:
        nvrtc.destroyProgram(program)
    return ptx.decode() if isinstance(ptx, bytes) else ptx


def _params(text: str) -> list[tuple[bool, str, str]]:
    """``"raw T x, int32 n"`` -> ``[(True, "T", "x"), (False, "int32", "n")]``."""
    out = []
    for part in text.split(","):
        words = part.split()
        raw = words[0] == "raw"
        ctype, name = words[-2], words[-1]
        assert ctype in CTYPES, f"unknown parameter type {ctype!r} in {text!r}"
        out.append((raw, ctype, name))
    return out


def standalone_elementwise(spec: kc.ElementwiseSpec, float_type: str) -> str:
    """The ElementwiseKernel ``spec`` as one self-contained CUDA kernel (see the module docstring)."""
    args, loads = [], []
    for is_output, text in ((False, spec.in_params), (True, spec.out_params)):
        for raw, ctype, name in _params(text):
            c = CTYPES[ctype]
            if raw:
                args.append(f"{c}* {name}")
            elif name in spec.scalars:
                args.append(f"{c} {name}")
            else:
                args.append(f"{c}* {name}_ptr")
                loads.append(f"{c}& {name} = {name}_ptr[i];" if is_output else f"const {c} {name} = {name}_ptr[i];")
    return (
        f"typedef {float_type} T;\n{spec.preamble}\n"
        f'extern "C" __global__ void {spec.name}({", ".join(args)}, long long n) {{\n'
        "  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)blockDim.x * gridDim.x) {\n"
        f"    {' '.join(loads)}\n    {spec.body}\n  }}\n}}\n"
    )


def test_every_elementwise_kernel_is_listed_once():
    names = [spec.name for spec in kc.elementwise_specs()]
    assert len(names) == len(set(names))
    # one forward and one backward kernel per activation, plus softmax and the two updates
    assert len(names) == 2 * len(kc.ACTIVATIONS) + 3


@pytest.mark.parametrize("float_type", ["float", "double"])
@pytest.mark.parametrize("spec", kc.elementwise_specs(), ids=lambda spec: spec.name)
def test_elementwise_kernel_compiles(nvrtc, spec, float_type):
    source = standalone_elementwise(spec, float_type)
    for arch in ARCHS:
        ptx = compile_ptx(nvrtc, source, spec.name, spec.options, arch)
        assert re.search(rf"\.entry\s+{spec.name}\s*\(", ptx), f"no entry point {spec.name} in the PTX"


def test_exact_kernels_have_no_fused_multiply_add(nvrtc):
    """--fmad=false is what makes the SGD update bit-identical to NumPy's separate multiply and add."""
    spec = next(s for s in kc.elementwise_specs() if s.name == "sgd_momentum")
    ptx = compile_ptx(nvrtc, standalone_elementwise(spec, "float"), spec.name, spec.options, "compute_90")
    assert "fma.rn.f32" not in ptx and "mul.rn.f32" in ptx
    contracted = compile_ptx(nvrtc, standalone_elementwise(spec, "float"), spec.name, (), "compute_90")
    assert "fma.rn.f32" in contracted  # the check above can fail: without the option NVRTC does contract


def test_xent_step_raw_kernel_compiles(nvrtc):
    for arch in ARCHS:
        ptx = compile_ptx(nvrtc, kc.XENT_STEP_SOURCE, "xent_step", (), arch)
        for name in ("xent_step_float", "xent_step_double"):
            assert re.search(rf"\.entry\s+{name}\s*\(", ptx), f"no entry point {name} in the PTX ({arch})"


def test_a_broken_source_is_reported(nvrtc):
    """The harness itself can fail: a body with an undefined name does not compile."""
    spec = kc.elementwise_specs()[0]._replace(body="row_loss = undefined_name;")
    program = nvrtc.createProgram(standalone_elementwise(spec, "float"), "broken.cu", [], [])
    try:
        with pytest.raises(nvrtc.NVRTCError):
            nvrtc.compileProgram(program, ["--gpu-architecture=compute_90"])
        assert "undefined_name" in nvrtc.getProgramLog(program)
    finally:
        nvrtc.destroyProgram(program)
