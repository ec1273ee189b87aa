"""The fused CUDA kernels of the GPU path, and their NumPy twins.

Each kernel does in one launch what ``kernels.py``/``model.py``/``optim.py``
do in several whole-array operations:

* ``softmax_cross_entropy_fused``: the loss terms and the whole gradient row
  ``(softmax(z) − onehot(y)) / B`` (public, used by ``kernels.softmax_cross_entropy``);
* ``bias_activation_``: ``a1 = f(z1 + b1)`` in the forward pass;
* ``activation_backward_``: ``δ1 ⊙= f'(z1)``, the derivative folded into ``δ1``;
* ``softmax_xent_step``: the training step's output layer: ``z2 + b2``,
  softmax, ``δ2``, the loss, the number of correct rows and ``∂L/∂b2``;
* ``sgd_momentum_``: weight decay, momentum and the update of every parameter
  at once (they are views into one flat buffer).

The CUDA C lives here as plain strings, and the ``cupy`` kernel objects are
built lazily on first use (``functools.cache``), so this module imports on a
machine without CuPy; ``tests/test_cuda_compile.py`` compiles every source
with NVRTC there, and ``tests/test_gpu.py`` checks every kernel against its
NumPy twin (the ``*_reference`` functions below, written with ``kernels.py``)
on a real device.

Element types: ``T`` is the model's float type (float32 or float64); labels
are int64. A label outside ``[0, K)`` never makes a kernel read out of bounds:
that row's gradient and loss become NaN (the Python layers check labels before
they get here, so this is a guard, not an interface).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np

from .kernels import ACTIVATIONS, activation_derivative, activation_forward_, softmax_cross_entropy_

# Rows per block of the step's output-layer kernel (a multiple of the warp size, 32).
XENT_BLOCK = 256

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

# One row of softmax + cross-entropy. ``z`` is the row's K logits, ``bias`` is
# added to them when not null (the training step folds ``+ b2`` in here), the
# gradient row goes to ``d``. Returns the row's loss term −log ŷ_y and sets
# ``*correct`` to whether argmax (first maximum, like NumPy) equals the label.
# Same stabilisation as kernels.softmax_cross_entropy_: subtract the row max,
# take log Σ exp − (z_y − max) rather than the log of a probability.
XENT_ROW_SOURCE = r"""
template <typename T>
__device__ T xent_row(const T* z, const T* bias, long long label, int n_classes, T inv_batch,
                      T* d, int* correct) {
    if (label < 0 || label >= n_classes) {  // never index with a bad label: poison the row instead
        const T nan = T(0) / T(0);
        for (int k = 0; k < n_classes; ++k) d[k] = nan;
        *correct = 0;
        return nan;
    }
    T zmax = z[0] + (bias ? bias[0] : T(0));
    int argmax = 0;
    for (int k = 1; k < n_classes; ++k) {
        T v = z[k] + (bias ? bias[k] : T(0));
        if (v > zmax) { zmax = v; argmax = k; }
    }
    T sum = T(0), label_logit = T(0);
    for (int k = 0; k < n_classes; ++k) {  // d holds exp(z − max) until it is normalised below
        T shifted = z[k] + (bias ? bias[k] : T(0)) - zmax;
        if (k == label) label_logit = shifted;
        T e = exp(shifted);
        d[k] = e;
        sum += e;
    }
    for (int k = 0; k < n_classes; ++k) d[k] = (d[k] / sum - (k == label ? T(1) : T(0))) * inv_batch;
    *correct = (argmax == label);
    return log(sum) - label_logit;
}
"""

# ---- ElementwiseKernel bodies: (in_params, out_params, body, preamble, options)
# ``i`` is the element index CuPy provides.

# One thread per row: the row is only K (=10) numbers, so a thread keeps it in
# registers/L1 and a block-per-row layout would leave 90% of every warp idle.
# The output array that sets the launch size is ``row_loss`` (one per row).
SOFTMAX_XENT = (
    "raw T logits, int64 label, int32 n_classes, T inv_batch",
    "raw T dlogits, T row_loss",
    "int correct; row_loss = xent_row<T>(&logits[i * n_classes], (const T*)0, label, n_classes, inv_batch,"
    " &dlogits[i * n_classes], &correct);",
    XENT_ROW_SOURCE,
)

# a = f(z + b), in place on the (B, H) buffer that holds z = x W1ᵀ.
BIAS_ACTIVATION = ("raw T bias, int32 n_cols", "T a", "a = act_forward<T>(a + bias[i % n_cols]);")

# δ ⊙= f'(z), from a = f(z).
ACTIVATION_BACKWARD = ("T a", "T delta", "delta = delta * act_derivative<T>(a);")

# PyTorch's SGD, in NumPy's operation order: g' = g + λw; v = μv + g'; w = w − ηv.
# ``hyper`` = [η, μ, λ] lives in device memory so a captured CUDA graph sees a
# changed learning rate. Compiled with --fmad=false so no multiply-add is
# contracted and the result is bit-identical to optim.SGD.step.
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

# ---- RawKernel: the training step's output layer, all in one launch.
# One thread per row (as above), XENT_BLOCK rows per block. Each block reduces
# its rows' loss, correct count and δ2 column sums (∂L/∂b2) with warp shuffles;
# the last block to finish (a counter in device memory, the CUDA
# "threadFenceReduction" pattern) adds the per-block partials in a fixed order
# and resets the counter, so the result is deterministic and the kernel can be
# replayed in a CUDA graph without any memset between launches.
XENT_STEP_SOURCE = (
    XENT_ROW_SOURCE
    + r"""
template <typename T>
__device__ T warp_sum(T v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
    return v;
}

template <typename T>
__device__ T block_sum(T v, T* scratch) {  // the whole block's sum, valid in thread 0
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read from the previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = (threadIdx.x < (blockDim.x >> 5)) ? scratch[threadIdx.x] : T(0);
    if (warp == 0) v = warp_sum(v);
    return v;
}

template <typename T>
__device__ void xent_step(const T* z, const T* bias, const long long* labels, int batch, int n_classes,
                          T inv_batch, T* delta, T* bias_grad, T* loss, long long* n_correct,
                          T* partial_sums, long long* partial_correct, unsigned int* blocks_done,
                          double* loss_sum, long long* correct_sum) {
    __shared__ T scratch[32];
    __shared__ long long scratch_ll[32];
    __shared__ bool is_last;
    const int row = blockIdx.x * blockDim.x + threadIdx.x;
    const bool active = row < batch;
    T row_loss = T(0);
    int correct = 0;
    if (active) {
        row_loss = xent_row<T>(z + (long long)row * n_classes, bias, labels[row], n_classes, inv_batch,
                               delta + (long long)row * n_classes, &correct);
    }
    // partial_sums[block * (K + 1) + 0] = Σ loss, [.. + 1 + k] = Σ δ2[:, k] over this block's rows
    T* mine = partial_sums + (long long)blockIdx.x * (n_classes + 1);
    T s = block_sum<T>(row_loss, scratch);
    if (threadIdx.x == 0) mine[0] = s;
    for (int k = 0; k < n_classes; ++k) {
        s = block_sum<T>(active ? delta[(long long)row * n_classes + k] : T(0), scratch);
        if (threadIdx.x == 0) mine[1 + k] = s;
    }
    long long c = block_sum<long long>((long long)correct, scratch_ll);
    if (threadIdx.x == 0) partial_correct[blockIdx.x] = c;

    __threadfence();  // make this block's partials visible before it counts itself done
    if (threadIdx.x == 0) is_last = (atomicAdd(blocks_done, 1u) == gridDim.x - 1);
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    for (int j = threadIdx.x; j <= n_classes; j += blockDim.x) {  // column j of the partials, blocks in order
        T total = T(0);
        for (int b = 0; b < gridDim.x; ++b) total += partial_sums[(long long)b * (n_classes + 1) + j];
        if (j == 0) {
            *loss = total / T(batch);
            if (loss_sum) *loss_sum += (double)total;  // running sums for the epoch, if asked for
        } else {
            bias_grad[j - 1] = total;
        }
    }
    if (threadIdx.x == 0) {
        long long total = 0;
        for (int b = 0; b < gridDim.x; ++b) total += partial_correct[b];
        *n_correct = total;
        if (correct_sum) *correct_sum += total;
        *blocks_done = 0u;  // ready for the next launch (or graph replay)
    }
}

extern "C" __global__ void xent_step_float(const float* z, const float* bias, const long long* labels, int batch,
        int n_classes, float inv_batch, float* delta, float* bias_grad, float* loss, long long* n_correct,
        float* partial_sums, long long* partial_correct, unsigned int* blocks_done,
        double* loss_sum, long long* correct_sum) {
    xent_step<float>(z, bias, labels, batch, n_classes, inv_batch, delta, bias_grad, loss, n_correct,
                     partial_sums, partial_correct, blocks_done, loss_sum, correct_sum);
}

extern "C" __global__ void xent_step_double(const double* z, const double* bias, const long long* labels, int batch,
        int n_classes, double inv_batch, double* delta, double* bias_grad, double* loss, long long* n_correct,
        double* partial_sums, long long* partial_correct, unsigned int* blocks_done,
        double* loss_sum, long long* correct_sum) {
    xent_step<double>(z, bias, labels, batch, n_classes, inv_batch, delta, bias_grad, loss, n_correct,
                      partial_sums, partial_correct, blocks_done, loss_sum, correct_sum);
}
"""
)


class ElementwiseSpec(NamedTuple):
    """Everything ``cupy.ElementwiseKernel`` needs (and the NVRTC compile test reads)."""

    name: str
    in_params: str
    out_params: str
    body: str
    preamble: str
    options: tuple[str, ...]
    scalars: tuple[str, ...] = ()  # non-raw parameters passed as scalars, not arrays


def elementwise_specs() -> list[ElementwiseSpec]:
    """Every ElementwiseKernel this module builds, one per activation where it depends on one."""
    specs = [
        ElementwiseSpec("softmax_xent_rows", *SOFTMAX_XENT, (), ("n_classes", "inv_batch")),
        ElementwiseSpec("sgd_momentum", *SGD_MOMENTUM, "", EXACT_OPTIONS),
        ElementwiseSpec("sgd_plain", *SGD_PLAIN, "", EXACT_OPTIONS),
    ]
    for activation in ACTIVATIONS:
        source = ACTIVATION_SOURCES[activation]
        specs.append(ElementwiseSpec(f"bias_{activation}", *BIAS_ACTIVATION, source, EXACT_OPTIONS, ("n_cols",)))
        specs.append(ElementwiseSpec(f"{activation}_backward", *ACTIVATION_BACKWARD, source, EXACT_OPTIONS))
    return specs


# --------------------------------------------------------------------------- lazy kernel objects


@functools.cache
def _elementwise(name: str) -> Any:
    import cupy

    spec = next(s for s in elementwise_specs() if s.name == name)
    return cupy.ElementwiseKernel(
        spec.in_params, spec.out_params, spec.body, spec.name, preamble=spec.preamble, options=spec.options
    )


@functools.cache
def _xent_step_kernel(dtype_name: str) -> Any:
    import cupy

    return cupy.RawKernel(XENT_STEP_SOURCE, f"xent_step_{'float' if dtype_name == 'float32' else 'double'}")


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}: choose one of {', '.join(ACTIVATIONS)}")


# --------------------------------------------------------------------------- CuPy wrappers


def softmax_cross_entropy_fused(logits: Any, labels: Any, out: Any) -> Any:
    """Mean softmax cross-entropy of ``logits`` (CuPy, (B, K)) and its gradient, in one kernel launch.

    Writes ``(softmax(logits) − onehot(labels)) / B`` into ``out`` (same shape
    and dtype, any layout; may be ``logits`` itself) and returns the mean loss as a
    0-d device array. ``labels`` must be int64 of shape (B,); a label outside
    ``[0, K)`` gives NaN for that row (and so for the loss) instead of a read
    out of bounds. The NumPy twin is ``kernels.softmax_cross_entropy_``.
    """
    import cupy

    batch, n_classes = logits.shape
    if out.shape != logits.shape or out.dtype != logits.dtype:
        raise ValueError(f"out must be a {logits.dtype} array of shape {logits.shape}, got {out.dtype} {out.shape}")
    # The kernel walks rows as contiguous K-element runs; other layouts go through a copy.
    rows_in = cupy.ascontiguousarray(logits)
    rows_out = out if out.flags.c_contiguous else cupy.empty(logits.shape, logits.dtype)
    row_loss = cupy.empty(batch, logits.dtype)
    inv_batch = logits.dtype.type(1.0 / batch)
    _elementwise("softmax_xent_rows")(rows_in, labels, np.int32(n_classes), inv_batch, rows_out, row_loss)
    if rows_out is not out:
        out[...] = rows_out
    return row_loss.mean()


def bias_activation_(z: Any, bias: Any, activation: str) -> Any:
    """``z ← f(z + bias)`` in place (``z`` C-contiguous (B, H), ``bias`` (H,)); returns ``z``."""
    _check_activation(activation)
    _elementwise(f"bias_{activation}")(bias, np.int32(z.shape[1]), z)
    return z


def activation_backward_(a: Any, delta: Any, activation: str) -> Any:
    """``delta ← delta ⊙ f'(z)`` in place, from the activation's output ``a = f(z)``; returns ``delta``."""
    _check_activation(activation)
    _elementwise(f"{activation}_backward")(a, delta)
    return delta


def sgd_momentum_(w: Any, g: Any, velocity: Any | None, hyper: Any) -> Any:
    """One SGD step on flat buffers: ``g' = g + λw; v = μv + g'; w −= η v`` (``v`` None: ``w −= η g'``).

    ``hyper`` is a device array ``[η, μ, λ]`` of ``w``'s dtype. ``g`` is left
    unchanged (``optim.SGD.step`` adds ``λw`` into it; the next backward pass
    overwrites it either way). Bit-identical to ``optim.SGD.step``.
    """
    if velocity is None:
        _elementwise("sgd_plain")(g, hyper, w)
    else:
        _elementwise("sgd_momentum")(g, hyper, w, velocity)
    return w


class XentScratch:
    """Per-batch-size buffers of ``softmax_xent_step``: partial sums and the blocks-done counter."""

    def __init__(self, xp: Any, batch: int, n_classes: int, dtype: Any) -> None:
        self.n_blocks = -(-batch // XENT_BLOCK)
        self.partial_sums = xp.zeros((self.n_blocks, n_classes + 1), dtype)
        self.partial_correct = xp.zeros(self.n_blocks, xp.int64)
        self.blocks_done = xp.zeros(1, xp.uint32)


def softmax_xent_step(
    z: Any,
    bias: Any,
    labels: Any,
    delta: Any,
    bias_grad: Any,
    loss: Any,
    n_correct: Any,
    scratch: XentScratch,
    loss_sum: Any | None = None,
    correct_sum: Any | None = None,
) -> None:
    """The output layer of a training step in one launch.

    From ``z = a1 W2ᵀ`` (C-contiguous (B, K), bias not yet added), ``bias``
    (K,) and int64 ``labels`` (B,), writes ``delta = (softmax(z + bias) −
    onehot) / B``, ``bias_grad = Σ_b delta`` (K,), ``loss`` (0-d, the mean)
    and ``n_correct`` (0-d int64, rows whose argmax is the label). If given,
    ``loss_sum`` (0-d float64) grows by the batch's summed loss and
    ``correct_sum`` (0-d int64) by ``n_correct``: an epoch's running totals at
    no extra launch. Nothing is read back to the host. The NumPy twin is
    ``softmax_xent_step_reference``.
    """
    batch, n_classes = z.shape
    kernel = _xent_step_kernel(z.dtype.name)
    kernel(
        (scratch.n_blocks,),
        (XENT_BLOCK,),
        (
            z, bias, labels, np.int32(batch), np.int32(n_classes), z.dtype.type(1.0 / batch),
            delta, bias_grad, loss, n_correct,
            scratch.partial_sums, scratch.partial_correct, scratch.blocks_done,
            np.uint64(0) if loss_sum is None else loss_sum,
            np.uint64(0) if correct_sum is None else correct_sum,
        ),
    )


# --------------------------------------------------------------------------- NumPy twins
# What each kernel must equal, written with the reference functions of
# kernels.py so there is one definition of the math. Work on NumPy or CuPy.


def bias_activation_reference(z: Any, bias: Any, activation: str) -> Any:
    """``z ← f(z + bias)`` with ``kernels.activation_forward_`` (twin of ``bias_activation_``)."""
    z += bias
    return activation_forward_(z, activation)


def activation_backward_reference(a: Any, delta: Any, activation: str) -> Any:
    """``delta ← delta ⊙ f'(z)`` with ``kernels.activation_derivative`` (twin of ``activation_backward_``)."""
    from .backend import array_module

    delta *= activation_derivative(a, activation, out=array_module(a).empty_like(a))
    return delta


def softmax_xent_step_reference(z: Any, bias: Any, labels: Any) -> tuple[Any, Any, Any, Any]:
    """Twin of ``softmax_xent_step``: ``(delta, bias_grad, loss, n_correct)``, as ``MLP.backprop`` computes them."""
    from .backend import array_module

    xp = array_module(z)
    logits = z + bias
    n_correct = xp.count_nonzero(logits.argmax(axis=1) == labels)
    delta = xp.empty_like(logits)
    loss = softmax_cross_entropy_(logits, labels, out=delta)
    return delta, delta.sum(axis=0), loss, n_correct


def sgd_momentum_reference(w: Any, g: Any, velocity: Any | None, lr: float, momentum: float, weight_decay: float) -> Any:
    """Twin of ``sgd_momentum_``: ``optim.SGD.step``'s operations on copies of the flat buffers' roles."""
    from .backend import array_module

    xp = array_module(w)
    g = g.copy()
    if weight_decay:
        g += xp.multiply(w, weight_decay, dtype=w.dtype)
    if velocity is not None:
        velocity *= momentum
        velocity += g
        g = velocity
    w -= xp.multiply(g, lr, dtype=w.dtype)
    return w
