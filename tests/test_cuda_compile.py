"""Every CUDA source of cuda/cuda_kernels.py (the .cu files) compiles with NVRTC 12 and NVRTC 13, as CuPy compiles it, without a GPU.

NVRTC (the CUDA runtime compiler CuPy uses) needs no device, so this runs on
the CPU CI machine, once per CUDA major version: ``nvidia-cuda-nvrtc-cu12``
and ``nvidia-cuda-nvrtc`` 13.x install side by side (it is called through
``ctypes``: no CuPy needed). A missing NVRTC skips with the reason, and fails
where ``BACKPROP_XP_REQUIRE_REFERENCES`` is set (CI; conftest's ``reference_missing``). The architectures follow
the compiler's version, since CUDA 13 dropped compute capabilities below 7.5:
CUDA 12 compiles for compute_70 and compute_90, CUDA 13 for compute_75 and
compute_90. Every compile adds the options CuPy 14 adds to every kernel
(``CUPY_OPTIONS``), ``-ftz=true`` among them, so this checks the build a GPU
runs. The RawKernel source compiles as shipped. An ElementwiseKernel body is only a
fragment: CuPy wraps it into a kernel with its own array types, which needs a
device to generate, so here each body is wrapped into an equivalent plain
``extern "C" __global__`` function (raw parameters as pointers, the others as
one element each, ``T`` the float type, ``i`` the element index), which
checks the body, preamble and options for syntax, types and name errors in
both float32 and float64. What this cannot check is CuPy's own wrapper;
tests/test_gpu.py runs the real kernels on a device.

``ptxas -v`` (from the ``nvidia-cuda-nvcc`` wheel in CI) then assembles the
sm_90 PTX of every kernel, as the driver would for an H100/H200, and the test
fails on any spill to local memory or any stack frame.
"""

from __future__ import annotations

import ctypes
import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from cuda_emulator import elementwise_arguments

from backprop_xp.cuda import cuda_kernels as kc

# (architecture, C++ dialect) per CUDA major version: the oldest GPU that major supports (Volta for 12,
# Turing for 13) in the oldest dialect a CuPy may ask for, and the H100/H200 the benchmarks target.
ARCHS_BY_MAJOR = {
    12: (("compute_70", "c++11"), ("compute_90", "c++17")),
    13: (("compute_75", "c++17"), ("compute_90", "c++17")),
}
# What CuPy 14.2 adds to the options of every kernel it compiles with NVRTC, whatever the kernel asks for
# (read in its source): -ftz=true (cupy/cuda/compiler.py, _compile_with_cache_cuda: float32 subnormals
# flushed to zero) and --device-as-default-execution-space (_compile_using_nvrtc, without jitify). It
# also adds -std=c++17 when no -std is given (cupy/_core/core.pyx, assemble_cupy_compiler_options: the
# dialect below), its own include folders, and -arch=sm_XX of the device (compute_XX below).
CUPY_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")
CUDA_FOLDER = Path(kc.__file__).parent  # the .cu files


class NVRTCError(RuntimeError):
    """A compile error; the message holds NVRTC's log."""


class Nvrtc:
    """The five NVRTC calls this test needs, through ctypes."""

    def __init__(self, path: str) -> None:
        lib = self.lib = ctypes.CDLL(path)
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)))
        self.version = (major.value, minor.value)
        self.path = path

    @property
    def archs(self) -> tuple[tuple[str, str], ...]:
        """The (architecture, dialect) pairs to compile for, from ``nvrtcVersion``."""
        return ARCHS_BY_MAJOR[self.version[0]]

    def _check(self, status: int) -> None:
        if status != 0:
            raise NVRTCError(self.lib.nvrtcGetErrorString(status).decode())

    def compile(self, source: str, name: str, options: list[str]) -> str:
        """PTX of ``source``; NVRTCError with the compiler's log if it does not compile."""
        lib, program = self.lib, ctypes.c_void_p()
        self._check(lib.nvrtcCreateProgram(ctypes.byref(program), source.encode(), name.encode(), 0, None, None))
        try:
            argv = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
            status = lib.nvrtcCompileProgram(program, len(options), argv)
            if status != 0:
                size = ctypes.c_size_t()
                lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
                log = ctypes.create_string_buffer(size.value)
                lib.nvrtcGetProgramLog(program, log)
                raise NVRTCError(f"{lib.nvrtcGetErrorString(status).decode()}\n{log.value.decode(errors='replace')}")
            size = ctypes.c_size_t()
            self._check(lib.nvrtcGetPTXSize(program, ctypes.byref(size)))
            ptx = ctypes.create_string_buffer(size.value)
            self._check(lib.nvrtcGetPTX(program, ptx))
            return ptx.value.decode()
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(program))


def _in_nvidia_wheels(folder: str, pattern: str) -> list[str]:
    """Files named ``pattern`` in ``nvidia/*/folder`` of NVIDIA's wheels (the namespace package ``nvidia``)."""
    try:
        import nvidia
    except ImportError:
        return []
    return [path for root in nvidia.__path__ for path in sorted(glob.glob(os.path.join(root, "*", folder, pattern)))]


def _nvrtc_candidates() -> list[str]:
    """Where libnvrtc may be: NVIDIA's wheels (``nvidia/cuda_nvrtc`` for 12, ``nvidia/cu13`` for 13), CUDA_PATH, the loader."""
    found = _in_nvidia_wheels("lib", "libnvrtc.so*")
    for root in (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root:
            found += sorted(glob.glob(os.path.join(root, "lib64", "libnvrtc.so*")))
    found += ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]
    return [path for path in found if "builtins" not in path and ".alt." not in path]


def _find_nvrtc() -> tuple[dict[int, Nvrtc], list[str]]:
    """One NVRTC per CUDA major version found, and the load errors seen on the way."""
    by_major, errors = {}, []
    for path in _nvrtc_candidates():
        try:
            compiler = Nvrtc(path)
        except (OSError, NVRTCError) as exc:
            errors.append(str(exc))
            continue
        if compiler.version[0] in ARCHS_BY_MAJOR:
            by_major.setdefault(compiler.version[0], compiler)
    return by_major, errors


_NVRTC, _NVRTC_ERRORS = _find_nvrtc()
WHEELS = {12: "nvidia-cuda-nvrtc-cu12", 13: "'nvidia-cuda-nvrtc>=13,<14'"}


@pytest.fixture(scope="module", params=sorted(ARCHS_BY_MAJOR), ids=lambda major: f"cuda{major}")
def nvrtc(request, reference_missing) -> Nvrtc:
    """NVRTC of one CUDA major version through ctypes; a skip (a failure in CI) saying why it is missing."""
    major = request.param
    if major not in _NVRTC:
        reference_missing(
            f"NVRTC {major} not available (pip install {WHEELS[major]}); tried: {'; '.join(_NVRTC_ERRORS[-3:])}"
        )
    return _NVRTC[major]


def compile_ptx(nvrtc: Nvrtc, source: str, name: str, options: tuple[str, ...], arch: tuple[str, str]) -> str:
    """PTX of ``source`` for ``(architecture, dialect)`` with CuPy's options; a compile error fails the test."""
    try:
        argv = [f"--gpu-architecture={arch[0]}", f"-std={arch[1]}", *options, *CUPY_OPTIONS]
        return nvrtc.compile(source, f"{name}.cu", argv)
    except NVRTCError as exc:
        pytest.fail(f"{name} ({arch}) does not compile: {exc}\n--- source ---\n{source}")


def standalone_elementwise(spec: kc.ElementwiseSpec, float_type: str) -> str:
    """The ElementwiseKernel ``spec`` as one self-contained CUDA kernel (see the module docstring)."""
    args, loads = elementwise_arguments(spec)
    return (
        f"typedef {float_type} T;\n{spec.preamble}\n"
        f'extern "C" __global__ void {spec.name}({", ".join(args)}, long long n) {{\n'
        "  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)blockDim.x * gridDim.x) {\n"
        f"    {' '.join(loads)}\n    {spec.body}\n  }}\n}}\n"
    )


def test_every_elementwise_kernel_is_listed_once():
    names = [spec.name for spec in kc.elementwise_specs()]
    assert len(names) == len(set(names))
    assert names == ["sgd_momentum", "sgd_plain", "adam"]  # the updates; the output layer is one RawKernel


@pytest.mark.parametrize("float_type", ["float", "double"])
@pytest.mark.parametrize("spec", kc.elementwise_specs(), ids=lambda spec: spec.name)
def test_elementwise_kernel_compiles(nvrtc, spec, float_type):
    source = standalone_elementwise(spec, float_type)
    for arch in nvrtc.archs:
        ptx = compile_ptx(nvrtc, source, spec.name, spec.options, arch)
        assert re.search(rf"\.entry\s+{spec.name}\s*\(", ptx), f"no entry point {spec.name} in the PTX"


def test_exact_kernels_have_no_fused_multiply_add(nvrtc):
    """--fmad=false is what makes the SGD update bit-identical to NumPy's separate multiply and add.

    (For normal numbers: CuPy's -ftz=true flushes float32 subnormals, ``.ftz`` in the PTX below.)
    """
    spec = next(s for s in kc.elementwise_specs() if s.name == "sgd_momentum")
    ptx = compile_ptx(nvrtc, standalone_elementwise(spec, "float"), spec.name, spec.options, nvrtc.archs[-1])
    assert not re.search(r"fma\.rn(\.ftz)?\.f32", ptx) and "mul.rn.ftz.f32" in ptx
    contracted = compile_ptx(nvrtc, standalone_elementwise(spec, "float"), spec.name, (), nvrtc.archs[-1])
    assert "fma.rn.ftz.f32" in contracted  # the check above can fail: without the option NVRTC does contract


@pytest.mark.parametrize("n_classes", [10, 3, kc.OUTPUT_LAYER_MAX_CLASSES])
@pytest.mark.parametrize("activation", kc.ACTIVATIONS)
def test_output_layer_raw_kernel_compiles(nvrtc, activation, n_classes):
    """As output_layer_step builds it: the activation's functions, then the kernel, with -DN_CLASSES."""
    source = kc.output_layer_source(activation)
    for arch in nvrtc.archs:
        ptx = compile_ptx(nvrtc, source, f"output_layer_{activation}", (f"-DN_CLASSES={n_classes}",), arch)
        for name in ("output_layer_float", "output_layer_double"):
            assert re.search(rf"\.entry\s+{name}\s*\(", ptx), f"no entry point {name} in the PTX ({arch})"
        # the K accumulators of a lane stay in registers: no local-memory array
        assert ".local" not in ptx, f"a local-memory array in output_layer ({activation}, K={n_classes}, {arch})"


def test_output_layer_needs_the_class_count(nvrtc):
    """The #error names output_layer.cu and its line (the #line directive), not the program's name."""
    text = (CUDA_FOLDER / "output_layer.cu").read_text()
    line = text.splitlines().index('#error "compile with -DN_CLASSES=<number of classes>"') + 1
    with pytest.raises(NVRTCError, match=rf"output_layer\.cu\({line}\).*N_CLASSES"):
        nvrtc.compile(kc.output_layer_source("relu"), "no_k.cu", [f"--gpu-architecture={nvrtc.archs[-1][0]}"])


def test_a_compile_error_in_updates_cu_names_the_file_and_line(nvrtc):
    """An error planted in updates.cu is reported at updates.cu(line), not at a line of the program NVRTC was given."""
    spec = next(s for s in kc.elementwise_specs() if s.name == "sgd_momentum")
    text = (CUDA_FOLDER / "updates.cu").read_text()
    planted = "    w = w - v * lr;"  # sgd_momentum_update's last line
    line = text.splitlines().index(planted) + 1
    broken = spec._replace(preamble=spec.preamble.replace(planted, "    w = w - v * undefined_rate;"))
    assert broken.preamble != spec.preamble
    with pytest.raises(NVRTCError, match=rf"updates\.cu\({line}\): error: identifier \"undefined_rate\""):
        nvrtc.compile(standalone_elementwise(broken, "float"), "program.cu", ["--gpu-architecture=compute_90"])


def test_a_compile_error_in_an_activation_names_where_output_layer_cu_uses_it(nvrtc):
    """A typo in an activation's CUDA expression is reported at output_layer.cu's act_forward, naming the typo."""
    text = (CUDA_FOLDER / "output_layer.cu").read_text()
    line = next(i for i, row in enumerate(text.splitlines(), 1) if "T act_forward(T z)" in row)
    source = kc.output_layer_source("tanh").replace("(tanh(z))", "(tanhh(z))")
    assert source != kc.output_layer_source("tanh")
    with pytest.raises(NVRTCError, match=rf'output_layer\.cu\({line}\): error: identifier "tanhh" is undefined'):
        nvrtc.compile(source, "program.cu", ["--gpu-architecture=compute_90", "-DN_CLASSES=10"])


def test_nvrtc_versions_pick_their_architectures():
    """CUDA 13's NVRTC rejects compute_70, CUDA 12's accepts it: the table above follows the real compilers."""
    for major, compiler in _NVRTC.items():
        source = 'extern "C" __global__ void k(float* x) { x[0] = 1.0f; }'
        if major >= 13:
            with pytest.raises(NVRTCError, match="gpu-architecture"):
                compiler.compile(source, "old.cu", ["--gpu-architecture=compute_70"])
        else:
            compiler.compile(source, "old.cu", ["--gpu-architecture=compute_70"])
        for arch, dialect in compiler.archs:
            compiler.compile(source, "k.cu", [f"--gpu-architecture={arch}", f"-std={dialect}"])


def test_a_broken_source_is_reported(nvrtc):
    """The harness itself can fail: a body with an undefined name does not compile, and the log says why and
    where: in the kernel around the body (the #line after updates.cu), not at a line of updates.cu."""
    spec = kc.elementwise_specs()[0]._replace(body="row_loss = undefined_name;")
    with pytest.raises(NVRTCError, match=r'sgd_momentum: the ElementwiseKernel around its body.*"undefined_name"'):
        nvrtc.compile(standalone_elementwise(spec, "float"), "broken.cu", ["--gpu-architecture=compute_90"])


# --------------------------------------------------------------------------- ptxas -v for sm_90


def _ptxas_candidates() -> list[str]:
    """ptxas from NVIDIA's nvcc wheels (``nvidia/cu13/bin``, ``nvidia/cuda_nvcc/bin``), CUDA_PATH, the PATH."""
    found = _in_nvidia_wheels("bin", "ptxas")
    for root in (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME")):
        if root:
            found.append(os.path.join(root, "bin", "ptxas"))
    found.append(shutil.which("ptxas") or "")
    return [path for path in found if path and os.access(path, os.X_OK)]


def _ptxas_version(path: str) -> tuple[int, int]:
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=True).stdout
    major, minor = re.search(r"release (\d+)\.(\d+)", out).groups()
    return int(major), int(minor)


@pytest.fixture
def ptxas(nvrtc, reference_missing) -> str:
    """The newest ptxas found, as new as this NVRTC (older ones may not read its PTX); else skip (fail in CI)."""
    found = sorted(((_ptxas_version(path), path) for path in _ptxas_candidates()), reverse=True)
    if not found or found[0][0] < nvrtc.version:
        have = f"ptxas {found[0][0]} at {found[0][1]}" if found else "no ptxas"
        reference_missing(f"{have}, NVRTC {nvrtc.version} (pip install 'nvidia-cuda-nvcc>=13,<14')")
    return found[0][1]


def ptxas_resources(ptxas_path: str, ptx: str, tmp_path) -> dict[str, dict[str, int]]:
    """``ptxas -v`` of ``ptx`` for sm_90, per function: registers, stack frame, spill stores and loads (bytes)."""
    source = tmp_path / "kernel.ptx"
    source.write_text(ptx)
    run = subprocess.run(
        [ptxas_path, "-arch=sm_90", "-v", "-o", os.devnull, str(source)], capture_output=True, text=True
    )
    assert run.returncode == 0, f"ptxas failed:\n{run.stderr[-3000:]}"
    resources, name = {}, None
    for line in run.stderr.splitlines():
        if match := re.search(r"Function properties for (\w+)", line):
            name = match.group(1)
            resources[name] = {}
        elif name and (
            match := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        ):
            resources[name].update(zip(("stack", "spill_stores", "spill_loads"), map(int, match.groups())))
        elif name and (match := re.search(r"Used (\d+) registers", line)):
            resources[name]["registers"] = int(match.group(1))
    return resources


def _sm90_sources() -> list[tuple[str, str, tuple[str, ...], list[str]]]:
    """(name, source, options, entry points) of every kernel as CuPy builds it."""
    sources = []
    for n_classes in (3, 10, kc.OUTPUT_LAYER_MAX_CLASSES):
        for activation in kc.ACTIVATIONS:
            sources.append((f"output_layer_{activation}_K{n_classes}", kc.output_layer_source(activation),
                            (f"-DN_CLASSES={n_classes}",), ["output_layer_float", "output_layer_double"]))  # fmt: skip
    for spec in kc.elementwise_specs():
        for float_type in ("float", "double"):
            sources.append(
                (f"{spec.name}_{float_type}", standalone_elementwise(spec, float_type), spec.options, [spec.name])
            )
    return sources


def test_every_kernel_assembles_for_sm90_without_spills_or_stack(nvrtc, ptxas, tmp_path):
    """Registers only: a spill or a stack frame (a local array the compiler could not keep in registers) fails."""
    for name, source, options, entries in _sm90_sources():
        ptx = compile_ptx(nvrtc, source, name, options, ("compute_90", "c++17"))
        resources = ptxas_resources(ptxas, ptx, tmp_path)
        for entry in entries:
            used = resources.get(entry)
            assert used and "registers" in used and "stack" in used, f"{name}: no ptxas report for {entry}: {resources}"
            assert used["stack"] == used["spill_stores"] == used["spill_loads"] == 0, f"{name} {entry}: {used}"
            # 256 threads a block (the output layer's launch) must fit one SM's 65,536 registers
            assert used["registers"] * kc.OUTPUT_LAYER_THREADS <= 65_536, f"{name} {entry}: {used}"


def test_ptxas_check_sees_a_stack_frame(nvrtc, ptxas, tmp_path):
    """The check above can fail: a local array indexed at run time lives on the stack, and ptxas says so."""
    source = (
        'extern "C" __global__ void k(float* x, int j, int n) { float v[64] = {};'
        " for (int i = 0; i < n; ++i) v[(i * j) & 63] += x[i]; x[0] = v[j & 63]; }"
    )
    used = ptxas_resources(ptxas, compile_ptx(nvrtc, source, "k", (), ("compute_90", "c++17")), tmp_path)["k"]
    assert used["stack"] > 0
