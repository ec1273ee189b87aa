"""The fused CUDA kernels of the GPU path, and their NumPy twins.

Each kernel does in one launch what ``activations.py``/``loss.py``/``model.py``/``optimizers.py``
do in several whole-array operations:

* ``output_layer_step``: the training step's whole output layer and the
  hidden layer's bias and activation: ``a1 = f(z1 + b1)``, ``z2``, softmax,
  the loss, the correct count, ``δ2``, ``δ1 = δ2 W2 ⊙ f'(z1)`` and the
  gradients of ``W2``, ``b2`` and ``b1``;
* ``sgd_momentum_``: weight decay, momentum and the update of every parameter
  at once (they are views into one flat buffer).

There is no second, cuBLAS-based output layer for the shapes the fused kernel
does not take (more than 32 classes, or W2 too large for shared memory): the
step runs ``MLP.backprop`` + ``SGD.step`` on CuPy for those (``cuda/fused_gpu_step.py``),
code the CPU tests already check, rather than nine more launches and three
more kernels that only a GPU could test.

The CUDA C lives here as plain strings, and the ``cupy`` kernel objects are
built lazily on first use (``functools.cache``), so this module imports on a
machine without CuPy. Without a GPU, ``tests/test_cuda_compile.py`` compiles
every source with NVRTC 12 and 13 (with the options CuPy adds) and
``tests/test_cuda_emulated.py`` runs the output-layer kernel on the CPU, and
``tests/test_kernel_twins.py`` the update's body; on a device,
``tests/test_gpu.py`` checks every kernel against its NumPy twin (the
``*_reference`` functions below, written with ``activations.py``/``loss.py``) or, for the
update, against ``optimizers.SGD.step`` itself.

Element types: ``T`` is the model's float type (float32 or float64); labels
are int64. A label outside ``[0, K)`` never makes a kernel read out of bounds:
that row's gradient and loss become NaN (the Python layers check labels before
they get here, so this is a guard, not an interface). CuPy compiles with
``-ftz=true``: float32 subnormals (below 1.2e-38) are flushed to zero on the
GPU, so "bit for bit" below means for normal numbers.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from ..activations import ACTIVATIONS, activation_derivative, activation_forward_
from ..checks import check_choice
from ..loss import softmax_cross_entropy_

# --------------------------------------------------------------------------- CUDA sources
# One device function per idea, shared by the kernels below through their preambles.

# f(z) and f'(z) written from a = f(z), with the same values as kernels.activation_forward_ and
# kernels.activation_derivative (and, for the derivatives, the same operations in the same order).
ACTIVATION_SOURCES = {
    "relu": """
template <typename T> __device__ __forceinline__ T act_forward(T z) { return z < T(0) ? T(0) : z; }
template <typename T> __device__ __forceinline__ T act_derivative(T a) { return a > T(0) ? T(1) : T(0); }
""",
    "sigmoid": """
template <typename T> __device__ __forceinline__ T act_forward(T z) { return T(1) / (T(1) + exp(-z)); }
template <typename T> __device__ __forceinline__ T act_derivative(T a) { return (T(1) - a) * a; }
""",
    "tanh": """
template <typename T> __device__ __forceinline__ T act_forward(T z) { return tanh(z); }
template <typename T> __device__ __forceinline__ T act_derivative(T a) { return T(1) - a * a; }
""",
}

# ---- ElementwiseKernel bodies: (in_params, out_params, body, preamble, options)
# ``i`` is the element index CuPy provides.

# PyTorch's SGD, in NumPy's operation order: g' = g + λw; v = μv + g'; w = w − ηv.
# ``hyper`` = [η, μ, λ] lives in device memory so a captured CUDA graph sees a
# changed learning rate. Compiled with --fmad=false so no multiply-add is
# contracted and the result is bit-identical to optimizers.SGD.step for normal
# numbers (CuPy adds -ftz=true: float32 subnormals become zero on the GPU).
SGD_MOMENTUM = (
    "T g, raw T hyper",
    "T w, T v",
    "const T lr = hyper[0], mu = hyper[1], wd = hyper[2];"
    " const T gd = g + w * wd; v = v * mu; v = v + gd; w = w - v * lr;",
)
SGD_PLAIN = (
    "T g, raw T hyper",
    "T w",
    "const T lr = hyper[0], wd = hyper[2]; const T gd = g + w * wd; w = w - gd * lr;",
)
EXACT_OPTIONS = ("--fmad=false",)

# ---- RawKernel: the whole output layer of a training step, and the hidden layer's bias and activation.
# From z1 = x W1ᵀ (no bias yet) it computes, per row: a1 = f(z1 + b1) (written over z1), z2 = a1 W2ᵀ + b2,
# softmax, the loss and whether argmax = label, δ2 = (ŷ − y)/B, and δ1 = δ2 W2 ⊙ f'(z1); per block of
# rows: partial sums of ∂L/∂W2 = δ2ᵀ a1, ∂L/∂b2 = Σ δ2 and ∂L/∂b1 = Σ δ1; and the last block to finish
# adds the blocks' partials in block order (deterministic: no floating-point atomics) into the gradients.
#
# Layout: a warp per row, its lanes across the H hidden units, so every load of a row is coalesced; the
# K dot products of z2 are reduced with xor shuffles, after which every lane holds all K logits and does
# the (K-element) softmax itself: no broadcast, and every lane has δ2 for the δ1 pass. W2 (K×H) is staged
# once per block in shared memory, beside the block's δ2 rows. N_CLASSES (K) is a compile-time constant
# (-DN_CLASSES=10) so that the K accumulators of a lane stay in registers.
OUTPUT_LAYER_SOURCE = r"""
#ifndef N_CLASSES
#error "compile with -DN_CLASSES=<number of classes>"
#endif

template <typename T>
__device__ __forceinline__ T warp_allsum(T v) {  // every lane gets the same sum (xor butterfly)
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// partials, one row of `width` = 1 + K + H + K*H per block: [Σ loss | Σ δ2 (K) | Σ δ1 (H) | δ2ᵀ a1 (K×H)]
template <typename T>
__device__ void output_layer(T* a1, const T* b1, const T* w2, const T* b2, const long long* labels,
                             int batch, int n_hidden, int rows_per_block, T inv_batch,
                             T* delta2, T* delta1, T* grad_w2, T* grad_b1, T* grad_b2, T* loss,
                             long long* n_correct, T* partials, long long* partial_correct,
                             unsigned int* blocks_done) {
    extern __shared__ __align__(16) unsigned char shared_bytes[];
    T* w2_tile = reinterpret_cast<T*>(shared_bytes);        // K × H
    T* delta2_tile = w2_tile + N_CLASSES * n_hidden;         // rows_per_block × K
    __shared__ T warp_loss[32];
    __shared__ long long warp_correct[32];
    __shared__ bool is_last;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    const int first_row = blockIdx.x * rows_per_block;
    const int n_rows = min(rows_per_block, batch - first_row);
    for (int i = threadIdx.x; i < N_CLASSES * n_hidden; i += blockDim.x) w2_tile[i] = w2[i];
    __syncthreads();

    // ---- phase 1: a warp per row
    T my_loss = T(0);
    long long my_correct = 0;
    for (int r = warp; r < n_rows; r += n_warps) {
        const long long row = first_row + r;
        T* a = a1 + row * n_hidden;
        T v[N_CLASSES];  // z2 of this row, then δ2
#pragma unroll
        for (int k = 0; k < N_CLASSES; ++k) v[k] = T(0);
        for (int h = lane; h < n_hidden; h += 32) {
            const T ah = act_forward<T>(a[h] + b1[h]);  // a1 = f(z1 + b1), in place
            a[h] = ah;
#pragma unroll
            for (int k = 0; k < N_CLASSES; ++k) v[k] += ah * w2_tile[k * n_hidden + h];
        }
        const long long label = labels[row];
        const bool good = label >= 0 && label < N_CLASSES;  // never index with a bad label: poison the row
        T zmax, sum = T(0), label_logit = T(0);
        int argmax = 0;
#pragma unroll
        for (int k = 0; k < N_CLASSES; ++k) {
            v[k] = warp_allsum(v[k]) + b2[k];  // z2 = a1 W2ᵀ + b2
            if (k == 0 || v[k] > zmax) { zmax = v[k]; argmax = k; }  // first maximum, as NumPy's argmax
        }
#pragma unroll
        for (int k = 0; k < N_CLASSES; ++k) {
            const T shifted = v[k] - zmax;
            if (k == label) label_logit = shifted;
            v[k] = exp(shifted);
            sum += v[k];
        }
        const T nan = T(0) / T(0);
#pragma unroll
        for (int k = 0; k < N_CLASSES; ++k) {  // δ2 = (ŷ − y) / B
            v[k] = good ? (v[k] / sum - (k == label ? T(1) : T(0))) * inv_batch : nan;
            if (lane == (k & 31)) {
                delta2[row * N_CLASSES + k] = v[k];
                delta2_tile[r * N_CLASSES + k] = v[k];
            }
        }
        if (lane == 0) {
            my_loss += good ? log(sum) - label_logit : nan;  // −log ŷ_y = log Σ exp − (z_y − max)
            my_correct += (good && argmax == label) ? 1 : 0;
        }
        T* d1 = delta1 + row * n_hidden;
        for (int h = lane; h < n_hidden; h += 32) {  // δ1 = δ2 W2 ⊙ f'(z1)
            T s = T(0);
#pragma unroll
            for (int k = 0; k < N_CLASSES; ++k) s += v[k] * w2_tile[k * n_hidden + h];
            d1[h] = s * act_derivative<T>(a[h]);
        }
    }
    if (lane == 0) {
        warp_loss[warp] = my_loss;
        warp_correct[warp] = my_correct;
    }
    __syncthreads();  // the block's a1, δ1 and δ2 rows are written and visible to the whole block

    // ---- phase 2: the block's partial sums, a thread per column
    const long long width = 1 + N_CLASSES + n_hidden + (long long)N_CLASSES * n_hidden;
    T* mine = partials + blockIdx.x * width;
    if (threadIdx.x == 0) {
        T s = T(0);
        long long c = 0;
        for (int w = 0; w < n_warps; ++w) { s += warp_loss[w]; c += warp_correct[w]; }
        mine[0] = s;
        partial_correct[blockIdx.x] = c;
    }
    for (int k = threadIdx.x; k < N_CLASSES; k += blockDim.x) {
        T s = T(0);
        for (int r = 0; r < n_rows; ++r) s += delta2_tile[r * N_CLASSES + k];
        mine[1 + k] = s;
    }
    for (int h = threadIdx.x; h < n_hidden; h += blockDim.x) {
        T g[N_CLASSES];
#pragma unroll
        for (int k = 0; k < N_CLASSES; ++k) g[k] = T(0);
        T g_b1 = T(0);
        for (int r = 0; r < n_rows; ++r) {
            const long long at = (first_row + r) * (long long)n_hidden + h;
            const T ah = a1[at];
            g_b1 += delta1[at];
#pragma unroll
            for (int k = 0; k < N_CLASSES; ++k) g[k] += delta2_tile[r * N_CLASSES + k] * ah;
        }
        mine[1 + N_CLASSES + h] = g_b1;
#pragma unroll
        for (int k = 0; k < N_CLASSES; ++k) mine[1 + N_CLASSES + n_hidden + (long long)k * n_hidden + h] = g[k];
    }

    // ---- the last block adds every block's partials, in block order
    __threadfence();  // this thread's partials are visible device-wide before the block counts itself done
    __syncthreads();
    if (threadIdx.x == 0) is_last = (atomicAdd(blocks_done, 1u) == gridDim.x - 1);
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    for (long long j = threadIdx.x; j < width; j += blockDim.x) {
        T total = T(0);
        for (int b = 0; b < gridDim.x; ++b) total += __ldcg(partials + b * width + j);  // L2, never a stale L1
        if (j == 0) {
            *loss = total / T(batch);
        } else if (j <= N_CLASSES) {
            grad_b2[j - 1] = total;
        } else if (j <= N_CLASSES + n_hidden) {
            grad_b1[j - 1 - N_CLASSES] = total;
        } else {
            grad_w2[j - 1 - N_CLASSES - n_hidden] = total;
        }
    }
    if (threadIdx.x == 0) {
        long long total = 0;
        for (int b = 0; b < gridDim.x; ++b) total += __ldcg(partial_correct + b);
        *n_correct = total;
        *blocks_done = 0u;  // ready for the next launch (or graph replay)
    }
}

#define OUTPUT_LAYER_ENTRY(NAME, T)                                                                          \
    extern "C" __global__ void NAME(T* a1, const T* b1, const T* w2, const T* b2, const long long* labels,   \
                                    int batch, int n_hidden, int rows_per_block, T inv_batch, T* delta2,      \
                                    T* delta1, T* grad_w2, T* grad_b1, T* grad_b2, T* loss,                   \
                                    long long* n_correct, T* partials, long long* partial_correct,            \
                                    unsigned int* blocks_done) {                                              \
        output_layer<T>(a1, b1, w2, b2, labels, batch, n_hidden, rows_per_block, inv_batch, delta2, delta1,   \
                        grad_w2, grad_b1, grad_b2, loss, n_correct, partials, partial_correct, blocks_done);   \
    }
OUTPUT_LAYER_ENTRY(output_layer_float, float)
OUTPUT_LAYER_ENTRY(output_layer_double, double)
"""
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
        ElementwiseSpec("sgd_momentum", *SGD_MOMENTUM, "", EXACT_OPTIONS),
        ElementwiseSpec("sgd_plain", *SGD_PLAIN, "", EXACT_OPTIONS),
    ]


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
    source = ACTIVATION_SOURCES[activation] + OUTPUT_LAYER_SOURCE
    return cupy.RawKernel(source, name, options=(f"-DN_CLASSES={n_classes}",))


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
    ``output_layer_reference``.
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


# --------------------------------------------------------------------------- NumPy twins
# What each kernel must equal, written with the reference functions of
# kernels.py so there is one definition of the math. Work on NumPy or CuPy.


def bias_activation_reference(z: Any, bias: Any, activation: str) -> Any:
    """``z ← f(z + bias)`` with ``kernels.activation_forward_`` (the output-layer kernel's first line)."""
    z += bias
    return activation_forward_(z, activation)


def activation_backward_reference(a: Any, delta: Any, activation: str) -> Any:
    """``delta ← delta ⊙ f'(z)`` with ``kernels.activation_derivative`` (the output-layer kernel's δ1)."""
    from ..backend import array_module

    delta *= activation_derivative(a, activation, out=array_module(a).empty_like(a))
    return delta


def output_layer_reference(z1: Any, labels: Any, params: dict[str, Any], activation: str) -> dict[str, Any]:
    """Twin of ``output_layer_step``, with the functions of ``activations.py``/``loss.py``: every array it writes, by name.

    ``z1`` is left unchanged; the returned ``"a1"`` is ``f(z1 + b1)``.
    """
    from ..backend import array_module

    xp = array_module(z1)
    a1 = bias_activation_reference(z1.copy(), params["b1"], activation)
    z2 = a1 @ params["W2"].T + params["b2"]
    n_correct = xp.count_nonzero(z2.argmax(axis=1) == labels)
    delta2 = xp.empty_like(z2)
    loss = softmax_cross_entropy_(z2, labels, out=delta2)  # δ2 = (ŷ − y) / B
    delta1 = activation_backward_reference(a1, delta2 @ params["W2"], activation)  # δ1 = δ2 W2 ⊙ f'(z1)
    return {
        "a1": a1, "delta2": delta2, "delta1": delta1, "loss": loss, "n_correct": n_correct,
        "W2": delta2.T @ a1, "b1": delta1.sum(axis=0), "b2": delta2.sum(axis=0),
    }  # fmt: skip


# ---- Leaky ReLU's device functions (kernels.ACTIVATIONS["leaky_relu"]), the same values as its xp lines:
# f(z) = z if z > 0 else α z (the product rounded in T, as NumPy's float32 × weak scalar is), f' from a.
# (Here at the end, with its import, so that this entry is one hunk apart from the rest of the file.)
from ..activations import LEAKY_SLOPE  # noqa: E402

ACTIVATION_SOURCES["leaky_relu"] = f"""
template <typename T> __device__ __forceinline__ T act_forward(T z) {{ return z > T(0) ? z : T({LEAKY_SLOPE!r}) * z; }}
template <typename T> __device__ __forceinline__ T act_derivative(T a) {{ return a > T(0) ? T(1) : T({LEAKY_SLOPE!r}); }}
"""


# ---- Adam's update (optimizers.Adam.step, AdamW), one elementwise pass, the same operations in the same order as
# numba_loops.adam_loop_ and Adam.step's NumPy lines (--fmad=false: no multiply-add contracted, so bit for bit).
# ``hyper`` = [β₁, 1 − β₁, β₂, 1 − β₂, √(1 − β₂ᵗ), ε, η / (1 − β₁ᵗ), λ or (AdamW) 1 − η λ, 1 if AdamW else 0]
# (Adam.fused_hyper() and the flag) lives in device memory, so a captured graph sees a new step count and rate.
# ``g`` is left unchanged, as sgd_momentum_ leaves it. Not yet called by cuda/fused_gpu_step.py's captured step.
ADAM_SPEC = ElementwiseSpec(
    "adam",
    "T g, raw T hyper",
    "T w, T m, T v",
    "const T b1 = hyper[0], c1 = hyper[1], b2 = hyper[2], c2 = hyper[3], root2 = hyper[4], eps = hyper[5],"
    " step = hyper[6], wd = hyper[7];"
    " T gd = g; T wd_w = w;"
    " if (hyper[8] != T(0)) { wd_w = w * wd; } else if (wd != T(0)) { gd = g + w * wd; }"
    " const T mi = m * b1 + gd * c1; m = mi;"
    " const T vi = v * b2 + (gd * gd) * c2; v = vi;"
    " w = wd_w - (mi / (sqrt(vi) / root2 + eps)) * step;",
    "",
    EXACT_OPTIONS,
)


@functools.cache
def _adam_kernel() -> Any:
    import cupy

    spec = ADAM_SPEC
    return cupy.ElementwiseKernel(spec.in_params, spec.out_params, spec.body, spec.name, options=spec.options)


def adam_update_(w: Any, g: Any, m: Any, v: Any, hyper: Any) -> Any:
    """One Adam (or AdamW) step on flat CuPy buffers, ``hyper`` a device array as above; returns ``w``."""
    _adam_kernel()(g, hyper, w, m, v)
    return w
