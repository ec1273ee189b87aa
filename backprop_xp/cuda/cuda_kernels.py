"""The fused CUDA kernels of the GPU path: their sources (``.cu`` files beside this module) and CuPy wrappers.

Each kernel does in one launch what ``activations.py``/``loss.py``/``model.py``/``optimizers.py``
do in several whole-array operations:

* ``output_layer_step`` (``output_layer.cu``): the training step's whole
  output layer and the hidden layer's bias and activation: ``a1 = f(z1 + b1)``,
  ``z2``, softmax, the loss, the correct count, ``δ2``, ``δ1 = δ2 W2 ⊙ f'(z1)``
  and the gradients of ``W2``, ``b2`` and ``b1``; the activation's ``f`` and
  ``f'`` are its entry's ``cuda`` expressions (``activations.ACTIVATIONS``);
* ``sgd_momentum_`` and ``adam_update_`` (``updates.cu``): weight decay,
  the optimizer's state and the update of every parameter at once (they are
  views into one flat buffer).

There is no second, cuBLAS-based output layer for the shapes the fused kernel
does not take (more than 32 classes, or W2 too large for shared memory): the
step runs ``MLP.backprop`` + the optimizer's ``step()`` on CuPy for those
(``cuda/fused_gpu_step.py``), code the CPU tests already check, rather than
nine more launches and three more kernels that only a GPU could test.

The ``.cu`` files are read at import, each headed by a ``#line`` directive so
that compile errors name the file; the ``cupy`` kernel objects are built
lazily on first use (``functools.cache``), so this module imports on a
machine without CuPy. Without a GPU, ``tests/test_cuda_compile.py`` compiles
every source with NVRTC 12 and 13 (with the options CuPy adds),
``tests/test_cuda_emulated.py`` runs the output-layer kernel on the CPU and
``tests/test_kernel_twins.py``/``tests/test_cuda_adam.py`` the updates; on a
device, ``tests/test_gpu.py`` checks every kernel against its NumPy twin
(``tests/kernel_references.py``, written with ``activations.py``/``loss.py``)
or, for the updates, against ``optimizers.SGD.step``/``Adam.step`` themselves.

Element types: ``T`` is the model's float type (float32 or float64); labels
are int64. A label outside ``[0, K)`` never makes a kernel read out of bounds:
that row's gradient and loss become NaN (the Python layers check labels before
they get here, so this is a guard, not an interface). CuPy compiles with
``-ftz=true``: float32 subnormals (below 1.2e-38) are flushed to zero on the
GPU, so "bit for bit" below means for normal numbers.
"""

from __future__ import annotations

import functools
import importlib.resources
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from ..activations import ACTIVATIONS
from ..checks import check_choice

# --------------------------------------------------------------------------- CUDA sources
# The CUDA C lives in .cu files beside this module, read once at import. Each source starts with a
# ``#line 1 "<file>"`` directive, so NVRTC's errors (and the emulator's g++ errors) name the file and line.


def read_cuda_source(name: str) -> str:
    """The text of ``backprop_xp/cuda/<name>``, headed by a ``#line`` directive naming it."""
    text = importlib.resources.files(__package__).joinpath(name).read_text(encoding="utf-8")
    return f'#line 1 "{name}"\n{text}'


OUTPUT_LAYER_SOURCE = read_cuda_source("output_layer.cu")  # the RawKernel; its activation comes from the table
UPDATES_SOURCE = read_cuda_source("updates.cu")  # the optimizers' updates, the preamble of their ElementwiseKernels


def output_layer_source(activation: str) -> str:
    """``output_layer.cu`` for one activation: its two C expressions (``ACTIVATIONS[name].cuda``) as macros first."""
    forward, derivative = ACTIVATIONS[check_choice("activation", activation, ACTIVATIONS)].cuda
    return (
        f"// activations.ACTIVATIONS[{activation!r}].cuda\n"
        f"#define ACT_FORWARD(z) ({forward})\n#define ACT_DERIVATIVE(a) ({derivative})\n{OUTPUT_LAYER_SOURCE}"
    )


# ---- ElementwiseKernel bodies: (in_params, out_params, body), each body one call of a function of updates.cu.
# ``i`` is the element index CuPy provides; a ``raw`` array is passed whole (``&hyper[0]``, its first element).
# ``hyper`` lives in device memory so that a captured CUDA graph sees a changed learning rate or step count.
SGD_MOMENTUM = ("T g, raw T hyper", "T w, T v", "sgd_momentum_update(g, &hyper[0], w, v);")
SGD_PLAIN = ("T g, raw T hyper", "T w", "sgd_plain_update(g, &hyper[0], w);")
ADAM = ("T g, raw T hyper", "T w, T m, T v", "adam_update(g, &hyper[0], w, m, v);")
# No multiply-add contracted: each line rounds as NumPy's separate operations do (bit for bit).
EXACT_OPTIONS = ("--fmad=false",)

# Threads per block of the output-layer kernel (8 warps) and the fewest rows a block takes. The most blocks
# is the device's SM count (``device_limits``): one block per SM keeps every SM busy, and more would only
# add partials for the last block to sum. Tuning knobs for a real GPU (bench/GPU_NOTES.md).
OUTPUT_LAYER_THREADS = 256
OUTPUT_LAYER_MIN_ROWS = 16
# Classes at most for the fused kernel: a lane keeps K accumulators in registers.
OUTPUT_LAYER_MAX_CLASSES = 32
# cudaDeviceGetAttribute's numbers for the SM count and the shared memory a block may opt in to
MULTIPROCESSOR_COUNT, SHARED_MEMORY_OPT_IN = 16, 97


class ElementwiseSpec(NamedTuple):
    """Everything ``cupy.ElementwiseKernel`` needs (and the NVRTC compile test and the CPU twin test read)."""

    name: str
    in_params: str
    out_params: str
    body: str
    preamble: str
    options: tuple[str, ...]


def elementwise_specs() -> list[ElementwiseSpec]:
    """Every ElementwiseKernel this module builds."""
    return [
        ElementwiseSpec("sgd_momentum", *SGD_MOMENTUM, _preamble("sgd_momentum"), EXACT_OPTIONS),
        ElementwiseSpec("sgd_plain", *SGD_PLAIN, _preamble("sgd_plain"), EXACT_OPTIONS),
        ElementwiseSpec("adam", *ADAM, _preamble("adam"), EXACT_OPTIONS),
    ]


def _preamble(name: str) -> str:
    """updates.cu, then a ``#line`` naming what follows it (the kernel CuPy writes around the body), so that an
    error there is not reported at a line of updates.cu past its end."""
    return f'{UPDATES_SOURCE}\n#line 1 "{name}: the ElementwiseKernel around its body (cuda_kernels.py)"\n'


# --------------------------------------------------------------------------- the device


@functools.cache
def device_limits(device: int) -> tuple[int, int]:
    """``(SM count, opt-in shared memory per block in bytes)`` of CUDA device ``device``, asked once per device.

    An H100 SXM has 132 SMs and 227 KiB of opt-in shared memory per block.
    """
    import cupy

    runtime = cupy.cuda.runtime
    return runtime.deviceGetAttribute(MULTIPROCESSOR_COUNT, device), runtime.deviceGetAttribute(
        SHARED_MEMORY_OPT_IN, device
    )


def current_device() -> int:
    """The current CUDA device's number (``cudaGetDevice``: no synchronisation, allowed inside a capture)."""
    import cupy

    return cupy.cuda.runtime.getDevice()


# --------------------------------------------------------------------------- lazy kernel objects


@functools.cache
def _elementwise(name: str) -> Any:
    import cupy

    spec = next(s for s in elementwise_specs() if s.name == name)
    return cupy.ElementwiseKernel(
        spec.in_params, spec.out_params, spec.body, spec.name, preamble=spec.preamble, options=spec.options
    )


@functools.cache
def _output_layer_kernel(activation: str, n_classes: int, dtype_name: str) -> Any:
    import cupy

    name = f"output_layer_{'float' if dtype_name == 'float32' else 'double'}"
    return cupy.RawKernel(output_layer_source(activation), name, options=(f"-DN_CLASSES={n_classes}",))


# --------------------------------------------------------------------------- CuPy wrappers


def sgd_momentum_(w: Any, g: Any, velocity: Any | None, hyper: Any) -> Any:
    """One SGD step on flat buffers: ``g' = g + λw; v = μv + g'; w −= η v`` (``v`` None: ``w −= η g'``).

    ``hyper`` is a device array ``[η, μ, λ]`` of ``w``'s dtype. ``g`` is left
    unchanged (``optimizers.SGD.step`` adds ``λw`` into it; the next backward pass
    overwrites it either way). Its reference is ``optimizers.SGD.step`` itself,
    which it equals bit for bit where every value is a normal number
    (``tests/test_gpu.py`` on a device, ``tests/test_kernel_twins.py`` on the
    CPU). CuPy compiles every kernel with ``-ftz=true``: in float32 a
    subnormal input or result (below 1.2e-38 in magnitude) is flushed to zero
    on the GPU where NumPy keeps it; float64 is not affected.
    """
    if velocity is None:
        _elementwise("sgd_plain")(g, hyper, w)
    else:
        _elementwise("sgd_momentum")(g, hyper, w, velocity)
    return w


def adam_update_(w: Any, g: Any, m: Any, v: Any, hyper: Any) -> Any:
    """One Adam (or AdamW) step on flat buffers: ``updates.cu``'s ``adam_update`` for every element; returns ``w``.

    ``hyper`` is a device array of ``w``'s dtype: ``Adam.fused_hyper()`` at this step's ``t``, then 1 for
    AdamW or 0 (``cuda/fused_gpu_step.py`` keeps it). ``g`` is left unchanged, as ``sgd_momentum_`` leaves
    it. Bit for bit ``optimizers.Adam.step`` for normal numbers (``tests/test_cuda_adam.py`` on the CPU
    emulator; ``tests/test_gpu.py`` on a device).
    """
    _elementwise("adam")(g, hyper, w, m, v)
    return w


def output_layer_grid(batch: int, max_blocks: int) -> tuple[int, int]:
    """``(rows_per_block, n_blocks)`` of ``output_layer_step``: at most ``max_blocks`` blocks (the SM count)."""
    rows = max(OUTPUT_LAYER_MIN_ROWS, -(-batch // max_blocks))
    return rows, -(-batch // rows)


def output_layer_shared_bytes(batch: int, n_hidden: int, n_classes: int, dtype: Any, max_blocks: int) -> int:
    """Dynamic shared memory of ``output_layer_step``: W2 and the block's δ2 rows."""
    rows, _ = output_layer_grid(batch, max_blocks)
    return (n_classes * n_hidden + rows * n_classes) * np.dtype(dtype).itemsize


def output_layer_fits(
    batch: int, n_hidden: int, n_classes: int, dtype: Any, shared_limit: int, max_blocks: int
) -> bool:
    """Whether the fused output layer can run this shape (else the step runs ``MLP.backprop``, see cuda/fused_gpu_step.py).

    ``shared_limit`` is the device's opt-in shared memory per block
    (``device_limits``: 227 KiB on an H100); 1 KiB of it is left for the
    kernel's static arrays. With K = 10 in float32 that allows H up to about
    5,600.
    """
    need = output_layer_shared_bytes(batch, n_hidden, n_classes, dtype, max_blocks)
    return n_classes <= OUTPUT_LAYER_MAX_CLASSES and need <= shared_limit - 1024


class OutputLayerScratch:
    """Scratch of ``output_layer_step`` for one batch size on a device with ``max_blocks`` SMs.

    Each block writes a row of ``1 + K + H + K·H`` partial sums and its
    correct count; the last block to finish (a counter in device memory, the
    CUDA "threadFenceReduction" pattern) adds them in block order (the same
    order every launch: deterministic) and resets the counter, so no memset
    is needed between launches or graph replays.
    """

    def __init__(self, xp: ModuleType, batch: int, n_hidden: int, n_classes: int, dtype: Any, max_blocks: int) -> None:
        self.rows_per_block, self.n_blocks = output_layer_grid(batch, max_blocks)
        self.partial_sums = xp.zeros((self.n_blocks, 1 + n_classes + n_hidden + n_classes * n_hidden), dtype)
        self.partial_correct = xp.zeros(self.n_blocks, xp.int64)
        self.blocks_done = xp.zeros(1, xp.uint32)
        self.shared_bytes = output_layer_shared_bytes(batch, n_hidden, n_classes, dtype, max_blocks)


# (id(kernel), device) -> the dynamic shared memory that kernel was allowed on that device. CuPy keeps one
# compiled function per device and sets the attribute on the current device only: a second GPU needs its own.
_SHARED_OPT_IN: dict[tuple[int, int], int] = {}


def output_layer_step(
    a1: Any,
    labels: Any,
    params: dict[str, Any],
    grads: dict[str, Any],
    delta2: Any,
    delta1: Any,
    loss: Any,
    n_correct: Any,
    scratch: OutputLayerScratch,
    activation: str,
) -> None:
    """Bias and activation of the hidden layer, and the whole output layer of a step, in one launch.

    On entry ``a1`` (C-contiguous (B, H)) holds ``z1 = x W1ᵀ``; on exit
    ``a1 = f(z1 + b1)``. Reads ``params["b1"]``, ``["W2"]``, ``["b2"]`` and
    int64 ``labels`` (B,); writes ``delta2 = (softmax(z2) − onehot) / B``
    (B, K), ``delta1 = δ2 W2 ⊙ f'(z1)`` (B, H), ``grads["W2"]``, ``["b1"]``,
    ``["b2"]``, ``loss`` (0-d, the mean) and ``n_correct`` (0-d int64, rows
    whose first largest logit is the label, as ``argmax``). Nothing is read
    back to the host. A bad label gives NaN for that row, never a read out of
    bounds. The shape must pass ``output_layer_fits``. The NumPy twin is
    ``output_layer_reference`` in ``tests/kernel_references.py``.
    """
    check_choice("activation", activation, ACTIVATIONS)
    batch, n_hidden = a1.shape
    n_classes = delta2.shape[1]
    kernel = _output_layer_kernel(activation, n_classes, a1.dtype.name)
    key = (id(kernel), current_device())
    if _SHARED_OPT_IN.get(key, 0) < scratch.shared_bytes:
        # Opt in to this much dynamic shared memory: the default limit is 48 KiB *less the kernel's
        # static shared arrays*, so a bare "above 48 KiB" test would miss sizes just under it. Set
        # once per kernel, device and size (a driver call, never made inside a graph capture: the
        # first step of every batch size runs eagerly).
        kernel.max_dynamic_shared_size_bytes = scratch.shared_bytes
        _SHARED_OPT_IN[key] = scratch.shared_bytes
    kernel(
        (scratch.n_blocks,),
        (OUTPUT_LAYER_THREADS,),
        (
            a1, params["b1"], params["W2"], params["b2"], labels,
            np.int32(batch), np.int32(n_hidden), np.int32(scratch.rows_per_block), a1.dtype.type(1.0 / batch),
            delta2, delta1, grads["W2"], grads["b1"], grads["b2"], loss, n_correct,
            scratch.partial_sums, scratch.partial_correct, scratch.blocks_done,
        ),
        shared_mem=scratch.shared_bytes,
    )  # fmt: skip
