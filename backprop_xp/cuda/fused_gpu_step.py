"""The GPU training step: fused kernels, cuBLAS on a handle of its own, and a CUDA graph of the whole step.

``make_gpu_step(model, optimizer)`` returns ``step(xb, yb) -> (loss, n_correct)``
doing exactly ``model.backprop(xb, yb)`` then ``optimizer.step()`` (up to
float32 rounding), in four launches::

    z1 = x W1ᵀ                                   cuBLAS
    a1 = f(z1 + b1), z2, softmax, loss,          output_layer_step   (cuda/cuda_kernels.py)
      δ2, δ1 = δ2 W2 ⊙ f'(z1),
      ∂L/∂W2 = δ2ᵀ a1, ∂L/∂b2, ∂L/∂b1
    ∂L/∂W1 = δ1ᵀ x                               cuBLAS
    w (and v, or m and v) ← the update           GPU_UPDATES[type(optimizer)]: sgd_momentum_ or adam_update_
                                                 (every parameter: one flat buffer)

The update comes from ``GPU_UPDATES``, a table keyed by the optimizer's exact
class (SGD; Adam and AdamW), as ``cpu/fused_cpu_step.FUSED_UPDATES`` is on
the CPU; any other optimizer (Nesterov, a subclass with a ``step()`` of its
own) keeps its own ``step()``: ``step.make_step`` gives it the textbook step.

That needs the output layer to fit the fused kernel
(``cuda_kernels.output_layer_fits``: K ≤ 32 classes and W2 in shared memory,
H up to about 5,600 in float32). A batch size that does not fit runs
``model.backprop`` then ``optimizer.step()`` on CuPy, eagerly, and the step
says so once. (There was a nine-launch cuBLAS output layer for those shapes;
it was dropped: the generic path computes the same thing with code the CPU
tests already check, and at such sizes the matrix products, not the launches,
take the time.)

Every matrix product goes through a cuBLAS handle the step owns
(``cublas.Blas``, over nvmath-python's bindings), never through
``cupy.matmul``: CuPy refuses cuBLAS calls while a stream is captured, and
the handle's stream and workspace are set before each capture begins.

With ``graphs=True`` the launches are captured into a CUDA graph and
replayed: one ``cudaGraphLaunch`` per step. A graph reads its input from
fixed addresses, so there is one graph per (batch size, input buffer):
``Minibatches`` gathers every batch into one of two buffers, in turn, so a
training run captures two graphs per batch size and never copies its input
again. Inputs at addresses not seen before run eagerly once the
``GRAPHS_PER_SIZE`` graphs of that size exist. The first step of each batch
size always runs eagerly (it compiles the kernels and lets cuBLAS settle
outside any capture).

The numbers the update multiplies by live in a small device array, ``hyper``,
which the captured kernel reads at each replay: SGD's ``[η, μ, λ]``, Adam's
``Adam.fused_hyper()`` (and the AdamW flag). Before each step the host
computes them (for Adam after ``t += 1``, exactly as ``Adam.fused_hyper()``
does, in double precision then rounded to the model's dtype) and writes the
entries that changed with ``fill`` launches: the value travels as a kernel
argument, stream-ordered before the replay, with no host-to-device copy, no
synchronisation and no recapture. SGD refills only when a schedule changes the
rate; Adam's two bias corrections (``√(1 − β₂ᵗ)`` and ``η / (1 − β₁ᵗ)``)
change every step, so an Adam step is two small fills and one graph launch.
(The other way, ``t`` kept on the device and the corrections computed by a
kernel in the graph, would need the device's ``pow`` to round as the host's
does, which CUDA does not promise: no bit-for-bit agreement with
``Adam.step``.) Adam's ``m``, ``v`` and ``t`` stay the optimizer's own
(``state_dict`` saves them), so a run resumed from a checkpoint continues from
its saved ``t``.

Nothing here waits for the device: the returned ``loss`` and ``n_correct``
are 0-d device arrays. They are this batch size's output buffers, overwritten
by the next step of the same size, so copy or accumulate them on the device
before calling ``step`` again (``train.run_epoch`` does: ``losses[i] = loss``,
one slot per step, which also names the first step whose loss is not finite).

If capture fails, the step says so in one line and stays eager
(``mode == "eager"``, ``capture_error`` says why); ``scripts/gpu_check.sh``
and the GPU tests fail on a real GPU when that happens.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from ..backend import error_line
from ..model import MLP
from ..optimizers import SGD, Adam, AdamW, Optimizer
from ..workspace import PerBatchSize, Workspace
from . import cuda_kernels as kc
from .cublas import Blas

# Graphs per batch size, one per input buffer: Minibatches alternates two.
GRAPHS_PER_SIZE = 2


class GpuUpdate(NamedTuple):
    """One optimizer's update in the GPU step: one kernel over the flat buffers, its numbers in device memory."""

    kernel: str  # what GpuStep.launches() calls it
    n_numbers: int  # the length of the device array ``hyper``
    numbers: Callable[[Any], np.ndarray]  # this step's hyper, on the host (Adam's advances ``t`` first)
    state: Callable[[Any], tuple[Any, ...]]  # the optimizer's arrays the kernel updates (a graph holds their addresses)
    launch: Callable[[Any, Any], Any]  # (optimizer, hyper on the device): the kernel, on the current stream


def _sgd_numbers(opt: SGD) -> np.ndarray:
    return np.array([opt.lr, opt.momentum, opt.weight_decay], opt.model.dtype)  # [η, μ, λ]


def _sgd_launch(opt: SGD, hyper: Any) -> Any:
    return kc.sgd_momentum_(opt.model.flat_params, opt.model.flat_grads, opt.velocity, hyper)


def _adam_numbers(opt: Adam) -> np.ndarray:
    """``Adam.fused_hyper()`` at this step's ``t`` (counted here, as ``Adam.step`` counts it), then the AdamW flag."""
    opt.t += 1
    return np.concatenate([opt.fused_hyper(), np.array([1.0 if opt.DECOUPLED else 0.0], opt.model.dtype)])


def _adam_launch(opt: Adam, hyper: Any) -> Any:
    return kc.adam_update_(opt.model.flat_params, opt.model.flat_grads, opt.m, opt.v, hyper)


# The table: an optimizer class -> its update kernel. Exact classes: a subclass may change step().
GPU_UPDATES: dict[type[Optimizer], GpuUpdate] = {
    SGD: GpuUpdate("SGD (sgd_momentum_)", 3, _sgd_numbers, lambda opt: (opt.velocity,), _sgd_launch),
    Adam: GpuUpdate("Adam (adam_update_)", 9, _adam_numbers, lambda opt: (opt.m, opt.v), _adam_launch),
    AdamW: GpuUpdate("AdamW (adam_update_)", 9, _adam_numbers, lambda opt: (opt.m, opt.v), _adam_launch),
}


def has_gpu_update(optimizer: Optimizer) -> bool:
    """Whether this step has a kernel for ``optimizer``'s update (``GPU_UPDATES``; Nesterov and subclasses have not)."""
    return type(optimizer) in GPU_UPDATES


def set_tf32(enabled: bool) -> None:
    """Let CuPy's own float32 matrix products (evaluation, ``MLP.backprop``) use TF32 tensor cores or not.

    Global to CuPy (``cupy._core.set_compute_type``, what ``CUPY_TF32=1``
    does). The training step's products follow its own ``tf32`` argument
    (its cuBLAS handle's math mode). Off by default: TF32 changes results in
    the 4th digit.
    """
    import cupy
    from cupy._core import _routines_linalg as linalg

    kind = linalg.COMPUTE_TYPE_TF32 if enabled else linalg.COMPUTE_TYPE_DEFAULT
    cupy._core.set_compute_type(np.float32, kind)


class GpuStep:
    """``step(xb, yb) -> (loss, n_correct)``: one fused training step on CuPy (see the module docstring).

    Parameters
    ----------
    model : MLP
        A CuPy model (``model.xp`` is ``cupy``).
    optimizer : SGD, Adam or AdamW
        Its optimizer (a class in ``GPU_UPDATES``); its settings are read at
        every step, so changes take effect at the next one.
    graphs : bool, default True
        Capture and replay CUDA graphs; False launches the kernels one by one
        (the "eager" fused step).
    fused : bool or None, default None
        Use the fused output-layer kernel: None where the shape fits it
        (``model.backprop`` + ``optimizer.step()`` elsewhere, said once),
        False never (always those two, eagerly), True always (ValueError if
        it does not fit).
    tf32 : bool, default False
        Let the step's float32 matrix products use TF32 tensor cores.
    notice : callable, default: print to stderr
        Where the one-line "graph capture failed, running eagerly" goes.

    Attributes
    ----------
    mode : {"graphs", "eager"}
        What the step does now ("eager" after a failed capture).
    fused : bool
        Whether every batch size so far ran the fused output-layer kernel
        (``mode`` is about those sizes: the others always run eagerly).
    capture_error : str or None
        Why capture failed, if it did.
    n_captures, n_replays : int
        Graphs captured and graph launches so far (the benchmark and the tests read them).
    """

    def __init__(
        self,
        model: MLP,
        optimizer: Optimizer,
        *,
        graphs: bool = True,
        fused: bool | None = None,
        tf32: bool = False,
        notice: Callable[[str], None] | None = None,
    ) -> None:
        import cupy

        if model.xp is not cupy:
            raise ValueError(f"make_gpu_step needs a CuPy model, got backend {model.backend.name!r}")
        if optimizer.model is not model:
            raise ValueError("the optimizer belongs to another model")
        if not has_gpu_update(optimizer):  # never another rule's kernel in place of its own step()
            raise ValueError(
                f"the fused GPU step has update kernels for {', '.join(c.__name__ for c in GPU_UPDATES)}; "
                f"{type(optimizer).__name__} has a step() of its own"
            )
        self.update = GPU_UPDATES[type(optimizer)]
        self.model, self.optimizer, self.xp = model, optimizer, cupy
        self.mode = "graphs" if graphs else "eager"
        self._fused_choice = fused
        # the output layer's grid (one block per SM at most) and its shared memory, for this device
        self._max_blocks, self._shared_limit = kc.device_limits(kc.current_device())
        self.capture_error: str | None = None
        self.n_captures = self.n_replays = 0
        self.blas = Blas(cupy, tf32=tf32)
        self._notice = notice or (lambda line: print(line, file=sys.stderr))
        self._hyper = cupy.zeros(self.update.n_numbers, model.dtype)  # what the update multiplies by, on the device
        self._hyper_host: np.ndarray | None = None  # what was last written there
        self._state = self.update.state(optimizer)
        self._workspaces = PerBatchSize(self._new_workspace)  # None for a size that runs unfused
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
            raise ValueError(
                f"step: labels must be int64 of shape ({batch},), got shape {tuple(labels.shape)} dtype {labels.dtype}"
            )
        if not isinstance(x, xp.ndarray) or not isinstance(labels, xp.ndarray):
            raise ValueError("step: x and labels must be CuPy arrays already on the device")
        ws = self._workspaces(batch)
        # the kernels, cuBLAS and MLP.backprop take raw pointers: rows must be contiguous (Minibatches' are)
        contiguous_x = x if x.flags.c_contiguous else xp.ascontiguousarray(x)
        contiguous_labels = labels if labels.flags.c_contiguous else xp.ascontiguousarray(labels)
        if ws is None:  # the generic path: no kernel of ours, no graph
            loss, n_correct = model.backprop(contiguous_x, contiguous_labels)
            self.optimizer.step()
            return loss, n_correct
        self._refresh_hyper()
        ws.steps += 1
        stream = xp.cuda.get_current_stream()
        graph = self._graph_for(ws, x, labels) if ws.steps > 1 else None
        if graph is not None:
            graph.launch(stream)
            self.n_replays += 1
            return ws.loss, ws.n_correct
        x, labels = contiguous_x, contiguous_labels
        self.blas.use_stream(stream.ptr)
        self._launch(x, labels, ws)
        return ws.loss, ws.n_correct

    def _launch(self, x: Any, labels: Any, ws: Workspace) -> None:
        """The launches of one step, on the current stream (captured or not)."""
        for _, launch in self.launches(x, labels, ws):
            launch()

    def launches(self, x: Any, labels: Any, ws: Workspace) -> list[tuple[str, Callable[[], Any]]]:
        """The step as named launches, in order (``bench/gpu_launches.py`` times each one alone)."""
        blas, p, g, act = self.blas, self.model.params, self.model.grads, self.model.activation
        return [
            ("z1 = x W1ᵀ (cuBLAS)", lambda: blas.matmul(x, p["W1"], ws.a1, transpose_b=True)),
            ("a1 = f(z1 + b1) ... ∂L/∂W2, ∂L/∂b2, δ1, ∂L/∂b1 (output_layer_step)", lambda: kc.output_layer_step(
                ws.a1, labels, p, g, ws.delta2, ws.delta1, ws.loss, ws.n_correct, ws.scratch, act
            )),
            ("∂L/∂W1 = δ1ᵀ x (cuBLAS)", lambda: blas.matmul(ws.delta1, x, g["W1"], transpose_a=True)),
            (f"w ← {self.update.kernel}", lambda: self.update.launch(self.optimizer, self._hyper)),
        ]  # fmt: skip

    @property
    def fused(self) -> bool:
        if not self._workspaces:
            return self._fused_choice is not False
        return all(ws is not None for ws in self._workspaces.values())

    # ------------------------------------------------------------------ state kept in step with the optimizer
    def _refresh_hyper(self) -> None:
        """This step's numbers into ``hyper`` (see the module docstring); graphs dropped if a state array was replaced."""
        opt = self.optimizer
        state = self.update.state(opt)
        if any(new is not old for new, old in zip(state, self._state, strict=True)):  # graphs hold the old pointers
            self._state = state
            for ws in self._workspaces.values():
                if ws is not None:
                    ws.graphs.clear()
                    ws.steps = 0
        numbers = self.update.numbers(opt)
        changed = range(len(numbers)) if self._hyper_host is None else np.flatnonzero(numbers != self._hyper_host)
        for i in changed:
            # a scalar fill: a kernel launch with the value as its argument, stream-ordered before the step's
            # launches or graph; no host-to-device copy, no synchronisation
            self._hyper[i : i + 1].fill(numbers[i])
        self._hyper_host = numbers

    def _new_workspace(self, batch: int) -> Workspace | None:
        model, limit = self.model, self._shared_limit
        fits = kc.output_layer_fits(batch, model.n_hidden, model.n_outputs, model.dtype, limit, self._max_blocks)
        shape = f"{model.n_outputs} classes x {model.n_hidden} hidden units at batch {batch}"
        if self._fused_choice is True and not fits:
            raise ValueError(
                f"the fused output layer does not fit {shape} in {limit} bytes of shared memory; use fused=None"
            )
        if self._fused_choice is None and not fits:
            self._notice(
                f"backprop-xp: the fused output layer does not fit {shape} ({limit} bytes of shared memory per "
                "block); this batch size runs MLP.backprop + the optimizer's step() on CuPy, eagerly"
            )
        if not fits or self._fused_choice is False:
            return None  # this size runs model.backprop + optimizer.step(), on the model's own workspaces
        # Row-major output arrays: the kernel indexes rows of K values.
        ws = Workspace(self.xp, batch, model.n_hidden, model.n_outputs, model.dtype, training=True, class_major=False)
        ws.scratch = kc.OutputLayerScratch(
            self.xp, batch, model.n_hidden, model.n_outputs, model.dtype, self._max_blocks
        )
        return ws

    # ------------------------------------------------------------------ CUDA graphs
    def _graph_for(self, ws: Workspace, x: Any, labels: Any) -> Any:
        """The graph for these inputs' addresses (captured now if new and room is left), or None: run eagerly."""
        if self.mode != "graphs":
            return None
        if not (x.flags.c_contiguous and labels.flags.c_contiguous):
            return None
        key = (x.data.ptr, labels.data.ptr)
        entry = ws.graphs.get(key)
        if entry is None:
            if len(ws.graphs) >= GRAPHS_PER_SIZE or not self._capture(ws, x, labels):
                return None
            entry = ws.graphs[key]
        return entry[0]

    def _capture(self, ws: Workspace, x: Any, labels: Any) -> bool:
        """Capture ``_launch`` on these inputs into ``ws.graphs``; on failure switch to eager and say so once."""
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
            self.blas.use_stream(stream.ptr)  # before the capture begins: cuBLAS may not be reconfigured inside it
            with cupy.cuda.using_allocator(pool.malloc), stream:
                stream.begin_capture()
                try:
                    self._launch(x, labels, ws)
                except Exception as exc:  # noqa: BLE001 - reported below; the capture must still be ended
                    error = error_line(exc, with_type=True)
                try:
                    graph = stream.end_capture()
                except Exception as exc:  # noqa: BLE001
                    error = error or error_line(exc, with_type=True)
            if error is None and graph is not None:  # instantiate and upload now, not inside the first replay
                graph.upload(cupy.cuda.get_current_stream())
        except Exception as exc:  # noqa: BLE001 - any failure means "no graph here"; the reason is reported
            error = error or error_line(exc, with_type=True)
        if error is not None or graph is None:
            self.mode = "eager"
            self.capture_error = error or "capture returned no graph"
            for other in filter(None, self._workspaces.values()):
                other.graphs.clear()
            self._notice(
                f"backprop-xp: CUDA graph capture failed ({self.capture_error}); running the fused step eagerly"
            )
            return False
        ws.graphs[(x.data.ptr, labels.data.ptr)] = (graph, pool)
        self.n_captures += 1
        return True


def make_gpu_step(
    model: MLP,
    optimizer: Optimizer,
    *,
    graphs: bool = True,
    tf32: bool | None = None,
    fused: bool | None = None,
) -> GpuStep:
    """The fused training step for a CuPy ``model`` and its ``optimizer``.

    Parameters
    ----------
    model, optimizer : MLP, Optimizer
        The model (on CuPy) and the optimizer that updates it (SGD, Adam or AdamW: ``GPU_UPDATES``).
    graphs : bool, default True
        Replay captured CUDA graphs (falls back to eager, with a one-line
        notice, where capture fails).
    tf32 : bool or None, default None
        TF32 matrix products in the step and, when not None, in CuPy's own
        products too (``set_tf32``); None leaves CuPy's setting and keeps the
        step in full float32.
    fused : bool or None, default None
        The fused output-layer kernel where it fits (see ``GpuStep``).

    Returns
    -------
    GpuStep
        ``step(xb, yb) -> (loss, n_correct)``, both 0-d device arrays
        (overwritten by the next step of the same batch size).
    """
    if tf32 is not None:
        set_tf32(tf32)
    return GpuStep(model, optimizer, graphs=graphs, fused=fused, tf32=bool(tf32))
