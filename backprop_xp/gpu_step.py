"""The GPU training step: fused kernels, no host round-trips, and a CUDA graph of the whole step.

``make_gpu_step(model, optimizer)`` returns ``step(xb, yb) -> (loss, n_correct)``
doing exactly ``model.backprop(xb, yb)`` then ``optimizer.step()`` (up to
float32 rounding), in 10 launches instead of about 25::

    z1 = x W1ᵀ                     cuBLAS
    a1 = f(z1 + b1)                bias_activation_        (kernels_cuda.py)
    z2 = a1 W2ᵀ                    cuBLAS
    δ2, loss, n_correct, ∂L/∂b2    softmax_xent_step       (one launch, + b2 folded in)
    ∂L/∂W2 = δ2ᵀ a1                cuBLAS
    δ1 = δ2 W2                     cuBLAS
    δ1 ⊙= f'(z1)                   activation_backward_
    ∂L/∂W1 = δ1ᵀ x                 cuBLAS
    ∂L/∂b1 = 1ᵀ δ1                 cuBLAS (a product with a ones vector: no reduction kernel)
    w, v ← SGD(w, v, g)            sgd_momentum_           (every parameter at once: one flat buffer)

With ``graphs=True`` these launches are captured once per batch size into a
CUDA graph and replayed: one ``cudaGraphLaunch`` per step instead of ten
kernel launches from Python. The graph reads its input from static buffers:
cuBLAS bakes pointers into the graph, and ``xb`` and ``yb`` may be any
caller's arrays (``Minibatches`` alternates between two buffers), so each step
first copies them in (two device-to-device ``cudaMemcpyAsync``; ~0.4 MB at
batch 128, a microsecond or so on a modern GPU). Capturing one graph per
``Minibatches`` buffer would save that copy: a lead for tuning on a GPU. The learning rate, momentum
and weight decay live in a small device array, refreshed (by a kernel, never a
host copy) only when ``optimizer`` changes them, so a schedule needs no
recapture.

Nothing here waits for the device: the returned ``loss`` and ``n_correct``
are 0-d device arrays. They are this batch size's output buffers, overwritten
by the next step of the same size, so copy or accumulate them on the device
before calling ``step`` again (``train.run_epoch`` does: ``losses[i] = loss``).
The step also keeps running totals on the device, added by the output-layer
kernel itself (no extra launch): ``step.sums()`` gives ``(Σ batch loss ×
batch size, Σ correct, number of samples)`` since the last
``step.reset_sums()``, for a loop that reads them once per epoch.

The first step of each batch size always runs eagerly (it compiles the
kernels and lets cuBLAS allocate its workspace outside any capture); the
graph is captured on the second. If capture fails (an old CuPy that refuses
cuBLAS calls under capture, say) the step says so in one line and stays
eager. CuPy only allows cuBLAS under capture when
``CUPY_EXPERIMENTAL_CUDA_LIB_GRAPH_CAPTURE=1`` was set before CuPy was
imported; ``backend.py`` sets it.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable

import numpy as np

from . import kernels_cuda as kc

log = logging.getLogger("backprop_xp")

# How many batch sizes keep buffers (and graphs): a training run uses two, the
# full batch and the epoch's last, partial one.
MAX_SIZES = 4


def set_tf32(enabled: bool) -> None:
    """Let float32 matrix products use TF32 tensor cores (about 10 mantissa bits) or not.

    Global to CuPy (``cupy._core.set_compute_type``, what ``CUPY_TF32=1``
    does); graphs captured afterwards use the new setting, so call it before
    training. Off by default: TF32 changes results in the 4th digit.
    """
    import cupy
    from cupy._core import _routines_linalg as linalg

    kind = linalg.COMPUTE_TYPE_TF32 if enabled else linalg.COMPUTE_TYPE_DEFAULT
    cupy._core.set_compute_type(np.float32, kind)


class _Buffers:
    """Everything one batch size needs on the device, allocated once."""

    def __init__(self, xp: Any, model: Any, batch: int) -> None:
        dt, h, k = model.dtype, model.n_hidden, model.n_outputs
        self.batch = batch
        self.a1 = xp.empty((batch, h), dt)  # z1, then a1 = f(z1 + b1) in place
        self.z2 = xp.empty((batch, k), dt)  # a1 W2ᵀ, without b2 (the softmax kernel adds it)
        self.delta2 = xp.empty((batch, k), dt)
        self.delta1 = xp.empty((batch, h), dt)
        self.ones = xp.ones((1, batch), dt)  # ∂L/∂b1 = onesᵀ δ1, as a (1, B) x (B, H) product
        self.loss = xp.zeros((), dt)
        self.n_correct = xp.zeros((), xp.int64)
        self.scratch = kc.XentScratch(xp, batch, k, dt)
        # the graph's inputs (copied into before each replay)
        self.x = xp.zeros((batch, model.n_inputs), dt)
        self.y = xp.zeros(batch, xp.int64)
        self.seen = 0  # steps run at this size
        self.graph: Any = None
        self.graph_pool: Any = None  # memory any temporaries of the captured work came from


class GpuStep:
    """``step(xb, yb) -> (loss, n_correct)``: one fused training step on CuPy (see the module docstring).

    Parameters
    ----------
    model : MLP
        A CuPy model (``model.xp`` is ``cupy``).
    optimizer : SGD
        Its optimizer; ``lr``, ``momentum`` and ``weight_decay`` are read at
        every step, so changes take effect at the next one.
    graphs : bool, default True
        Capture and replay a CUDA graph per batch size; False launches the
        kernels one by one (the "eager" fused step).
    notice : callable, default: print to stderr
        Where the one-line "graph capture failed, running eagerly" goes.
    graph_max_batch : int or None, default None
        Batch sizes above this run eagerly even with ``graphs=True``: at large
        batches the GPU work outlasts the host's launches anyway, and the
        graph's input copy (``B × n_inputs`` values) is pure overhead. None:
        graphs at every size (``bench/bench_gpu.py`` measures both modes).

    Attributes
    ----------
    mode : {"graphs", "eager"}
        What the step does now ("eager" after a failed capture).
    capture_error : str or None
        Why capture failed, if it did.
    """

    def __init__(
        self,
        model: Any,
        optimizer: Any,
        *,
        graphs: bool = True,
        notice: Callable[[str], None] | None = None,
        graph_max_batch: int | None = None,
    ) -> None:
        import cupy

        if model.xp is not cupy:
            raise ValueError(f"make_gpu_step needs a CuPy model, got backend {model.backend.name!r}")
        if optimizer.model is not model:
            raise ValueError("the optimizer belongs to another model")
        self.model, self.optimizer, self.xp = model, optimizer, cupy
        self.mode = "graphs" if graphs else "eager"
        self.graph_max_batch = graph_max_batch
        self.capture_error: str | None = None
        self._notice = notice or (lambda line: print(line, file=sys.stderr))
        self._hyper = cupy.zeros(3, model.dtype)  # [lr, momentum, weight decay] on the device
        self._hyper_host: tuple[float, float, float] | None = None
        self._velocity = optimizer.velocity
        self._loss_sum = cupy.zeros((), cupy.float64)  # running totals, added to by every step
        self._correct_sum = cupy.zeros((), cupy.int64)
        self._n_samples = 0
        self._buffers: dict[int, _Buffers] = {}
        self._capture_stream: Any = None

    # ------------------------------------------------------------------ the step
    def __call__(self, x: Any, labels: Any) -> tuple[Any, Any]:
        model, xp = self.model, self.xp
        batch = x.shape[0]
        if x.ndim != 2 or x.shape[1] != model.n_inputs or x.dtype != model.dtype or batch == 0:
            raise ValueError(
                f"step: x must be a non-empty (batch, {model.n_inputs}) {model.dtype} array, "
                f"got shape {tuple(x.shape)} dtype {x.dtype}"
            )
        if labels.shape != (batch,) or labels.dtype != np.int64:
            raise ValueError(f"step: labels must be int64 of shape ({batch},), got shape {tuple(labels.shape)} dtype {labels.dtype}")
        if not isinstance(x, xp.ndarray) or not isinstance(labels, xp.ndarray):
            raise ValueError("step: x and labels must be CuPy arrays already on the device")
        self._refresh_hyper()
        buf = self._buffers_for(batch)
        buf.seen += 1
        self._n_samples += batch
        eager = self.mode == "eager" or buf.seen == 1 or (self.graph_max_batch is not None and batch > self.graph_max_batch)
        if eager or (buf.graph is None and not self._capture(buf)):
            # the kernels and cuBLAS take raw pointers: rows must be contiguous (Minibatches' are)
            x = x if x.flags.c_contiguous else xp.ascontiguousarray(x)
            labels = labels if labels.flags.c_contiguous else xp.ascontiguousarray(labels)
            self._launch(x, labels, buf)
            return buf.loss, buf.n_correct
        stream = xp.cuda.get_current_stream()
        _copy_into(buf.x, x, stream)
        _copy_into(buf.y, labels, stream)
        buf.graph.launch(stream)
        return buf.loss, buf.n_correct

    def _launch(self, x: Any, labels: Any, buf: _Buffers) -> None:
        """The ten launches of one step, on the current stream (captured or not)."""
        xp, model, act = self.xp, self.model, self.model.activation
        p, g = model.params, model.grads
        xp.matmul(x, p["W1"].T, out=buf.a1)
        kc.bias_activation_(buf.a1, p["b1"], act)
        xp.matmul(buf.a1, p["W2"].T, out=buf.z2)
        kc.softmax_xent_step(
            buf.z2, p["b2"], labels, buf.delta2, g["b2"], buf.loss, buf.n_correct, buf.scratch,
            self._loss_sum, self._correct_sum,
        )
        xp.matmul(buf.delta2.T, buf.a1, out=g["W2"])
        xp.matmul(buf.delta2, p["W2"], out=buf.delta1)
        kc.activation_backward_(buf.a1, buf.delta1, act)
        xp.matmul(buf.delta1.T, x, out=g["W1"])
        xp.matmul(buf.ones, buf.delta1, out=g["b1"][None, :])
        kc.sgd_momentum_(model.flat_params, model.flat_grads, self.optimizer.velocity, self._hyper)

    # ------------------------------------------------------------------ running totals
    def sums(self) -> tuple[Any, Any, int]:
        """``(loss_sum, n_correct, n_samples)`` since the last ``reset_sums``.

        ``loss_sum`` (0-d float64) is Σ over steps of the mean batch loss times
        the batch size and ``n_correct`` (0-d int64) the correctly classified
        rows, both still on the device; ``n_samples`` is a host int.
        """
        return self._loss_sum, self._correct_sum, self._n_samples

    def reset_sums(self) -> None:
        """Zero the running totals (a stream-ordered memset; no synchronisation)."""
        self._loss_sum.fill(0)
        self._correct_sum.fill(0)
        self._n_samples = 0

    # ------------------------------------------------------------------ state kept in step with the optimizer
    def _refresh_hyper(self) -> None:
        opt = self.optimizer
        if opt.velocity is not self._velocity:  # a new velocity array: graphs hold the old pointer
            self._velocity = opt.velocity
            for buf in self._buffers.values():
                buf.graph, buf.graph_pool, buf.seen = None, None, 0
        hyper = (float(opt.lr), float(opt.momentum), float(opt.weight_decay))
        if hyper != self._hyper_host:
            # Three scalar fills (kernel launches with the value as an argument):
            # stream-ordered, no host-to-device copy, no synchronisation.
            for i, value in enumerate(hyper):
                self._hyper[i : i + 1].fill(value)
            self._hyper_host = hyper

    def _buffers_for(self, batch: int) -> _Buffers:
        buf = self._buffers.get(batch)
        if buf is None:
            if len(self._buffers) >= MAX_SIZES:
                self._buffers.clear()
            buf = self._buffers[batch] = _Buffers(self.xp, self.model, batch)
        return buf

    # ------------------------------------------------------------------ CUDA graph
    def _capture(self, buf: _Buffers) -> bool:
        """Capture ``_launch`` on the static buffers into ``buf.graph``; on failure switch to eager."""
        cupy = self.xp
        if self._capture_stream is None:
            self._capture_stream = cupy.cuda.Stream(non_blocking=True)  # capture needs a non-default stream
        stream = self._capture_stream
        # Temporaries CuPy might allocate inside the captured work must stay
        # reserved for the graph's lifetime: give the capture a private pool
        # and keep it with the graph.
        pool = cupy.cuda.MemoryPool()
        graph, error = None, None
        try:
            with cupy.cuda.using_allocator(pool.malloc), stream:
                stream.begin_capture()
                try:
                    self._launch(buf.x, buf.y, buf)
                except Exception as exc:  # noqa: BLE001 - reported below; the capture must still be ended
                    error = _one_line(exc)
                try:
                    graph = stream.end_capture()
                except Exception as exc:  # noqa: BLE001
                    error = error or _one_line(exc)
            upload = getattr(graph, "upload", None)  # CuPy >= 13; older ones upload on first launch
            if error is None and upload is not None:  # instantiate and upload now, not inside the first replay
                upload(cupy.cuda.get_current_stream())
        except Exception as exc:  # noqa: BLE001 - any failure means "no graph here"; the reason is reported
            error = error or _one_line(exc)
        if error is not None:
            graph = None
        if graph is None:
            self.mode = "eager"
            self.capture_error = error or "capture returned no graph"
            if os.environ.get("CUPY_EXPERIMENTAL_CUDA_LIB_GRAPH_CAPTURE") != "1":
                self.capture_error += "; CUPY_EXPERIMENTAL_CUDA_LIB_GRAPH_CAPTURE=1 was not set before CuPy was imported"
            for other in self._buffers.values():
                other.graph = other.graph_pool = None
            self._notice(f"backprop-xp: CUDA graph capture failed ({self.capture_error}); running the fused step eagerly")
            return False
        buf.graph, buf.graph_pool = graph, pool
        return True


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _copy_into(dst: Any, src: Any, stream: Any) -> None:
    """``dst[...] = src`` as one stream-ordered device-to-device copy (no host involvement)."""
    if src.flags.c_contiguous:
        dst.data.copy_from_device_async(src.data, src.nbytes, stream)
    else:
        dst[...] = src


def make_gpu_step(
    model: Any, optimizer: Any, *, graphs: bool = True, tf32: bool | None = None, graph_max_batch: int | None = None
) -> GpuStep:
    """The fused training step for a CuPy ``model`` and its ``optimizer``.

    Parameters
    ----------
    model, optimizer : MLP, SGD
        The model (on CuPy) and the optimizer that updates it.
    graphs : bool, default True
        Replay a captured CUDA graph per batch size (falls back to eager, with
        a one-line notice, where capture fails).
    tf32 : bool or None, default None
        Set TF32 matrix products on or off first (see ``set_tf32``); None
        leaves the current setting.
    graph_max_batch : int or None, default None
        Larger batches run eagerly (see ``GpuStep``).

    Returns
    -------
    GpuStep
        ``step(xb, yb) -> (loss, n_correct)``, both 0-d device arrays
        (overwritten by the next step of the same batch size).
    """
    if tf32 is not None:
        set_tf32(tf32)
    return GpuStep(model, optimizer, graphs=graphs, graph_max_batch=graph_max_batch)
