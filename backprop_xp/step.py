"""The training step, chosen in one place: ``make_step(model, optimizer)``.

A step is ``step(x, labels) -> (loss, n_correct)``: one forward and backward
pass, then one update. There are three, with the same results:

======================  ==============================================  ===================================
backend                 step                                            where
======================  ==============================================  ===================================
NumPy, no Numba         ``model.backprop`` then ``optimizer.step()``    ``TextbookStep`` (this module)
NumPy with ``[fast]``   the same lines in fused Numba loops             ``cpu/fused_cpu_step.py``
CuPy                    the same lines in fused CUDA kernels, as a      ``cuda/fused_gpu_step.py``
                        CUDA graph
======================  ==============================================  ===================================

The textbook step is the definition; each fused step is checked against it
(``tests/test_fused_cpu.py``, ``tests/test_gpu.py``). An optimizer without a
fused update (``Nesterov``, or a subclass with a ``step()`` of its own) keeps
its own ``step()`` inside a fused step, so its update is never silently
replaced. Every step has ``mode`` (what it does, for reports) and
``capture_error`` (why a CuPy step runs without CUDA graphs, if it does).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from .backend import GPU_EXTRAS, INSTALL_GPU
from .cpu import numba_loops
from .model import MLP
from .optimizers import Optimizer


class TextbookStep:
    """``model.backprop(x, labels)`` then ``optimizer.step()``: the definition every other step is checked against.

    With ``checked`` each call checks its batch as ``model.loss_and_grads``
    does (the training loop, whose data was checked once on loading, passes
    False). On CuPy it runs eagerly, on CuPy's own matrix products.
    """

    def __init__(self, model: MLP, optimizer: Optimizer, *, checked: bool = True, mode: str = "numpy") -> None:
        self.model, self.optimizer, self.checked, self.mode = model, optimizer, checked, mode
        self.capture_error: str | None = None  # why a CuPy step is this one instead of the fused one

    def __call__(self, x: Any, labels: Any) -> tuple[Any, Any]:
        if self.checked:
            x = self.model.as_input(x)
            labels = self.model.as_labels(labels, x.shape[0])
        loss, n_correct = self.model.backprop(x, labels)
        self.optimizer.step()
        return loss, n_correct


def make_step(
    model: MLP, optimizer: Optimizer, *, graphs: bool = True, tf32: bool = False, checked: bool = True
) -> Any:
    """The training step ``step(x, labels) -> (loss, n_correct)`` for this model's backend (see the module's table).

    On NumPy, ``checked`` (the default) makes each call check its batch: a
    label out of range would read past the end of a row in the compiled
    loops. The fused GPU step does not check its batch (that would read the
    labels back every step); ``graphs``/``tf32`` go to it. Without
    nvmath-python (the fused step's cuBLAS calls) CuPy still trains with the
    textbook step, eagerly: the process says once why and what to install.
    Both results are 0-d arrays left on the device (no synchronisation).
    """
    if model.xp is np:
        if numba_loops.active(model.xp):
            from .cpu.fused_cpu_step import FusedCpuStep

            return FusedCpuStep(model, optimizer, checked=checked)
        return TextbookStep(model, optimizer, checked=checked)
    from .cuda.cublas import CublasUnavailable  # imported only on CuPy: the CPU path never needs them
    from .cuda.fused_gpu_step import has_gpu_update, make_gpu_step, set_tf32

    if not has_gpu_update(optimizer):  # its own step(): never replaced by another rule's kernel
        return TextbookStep(model, optimizer, checked=checked, mode="eager")
    try:  # tf32=False leaves CuPy's global setting alone (a CUPY_TF32=1 the user set stays); the step is float32
        return make_gpu_step(model, optimizer, graphs=graphs, tf32=True if tf32 else None)
    except CublasUnavailable as exc:  # CuPy still trains: the definition, eagerly, with CuPy's own cuBLAS
        say_once(f"backprop-xp: the GPU training step runs eagerly, without CUDA graphs: {exc} ({_install(model)})")
        if tf32:
            set_tf32(True)
        step = TextbookStep(model, optimizer, checked=checked, mode="eager")
        step.capture_error = str(exc)  # what the GPU step reports about itself (the bench records it)
        return step


def warm_up(model: MLP, optimizer: Optimizer, batch_size: int) -> None:
    """One step of a throwaway twin of ``model`` and ``optimizer``, so that no epoch's time holds one-time loading.

    On the fused CPU path the first call of each compiled loop loads it
    (Numba's on-disk cache: about 0.7 s), which made a short run's first epoch
    look ten times slower than the others. The twin has the same sizes and
    settings, so it loads exactly the loops the run will call; the run's own
    parameters are not touched.
    """
    if not numba_loops.active(model.xp):
        return
    twin = MLP(model.n_inputs, model.n_hidden, model.n_outputs, activation=model.activation, dtype=model.dtype.name)
    rule = type(optimizer)(twin, optimizer.lr, **optimizer.settings())  # the same update, so the same loops
    x, labels = np.zeros((batch_size, model.n_inputs), model.dtype), np.zeros(batch_size, np.int64)
    make_step(twin, rule, checked=False)(x, labels)
    numba_loops.take_rows_loop_(x, labels, np.empty_like(x))  # and the batch gather (data.Minibatches)


_SAID: set[str] = set()  # notices already given by this process


def say_once(line: str) -> None:
    """Print ``line`` to stderr the first time this process says it (a sweep builds a step per run)."""
    if line not in _SAID:
        _SAID.add(line)
        print(line, file=sys.stderr)


def _install(model: MLP) -> str:
    """The pip command that brings nvmath-python and cuBLAS for the CUDA major this CuPy was built for."""
    try:
        major = model.xp.cuda.runtime.runtimeGetVersion() // 1000
    except Exception:  # noqa: BLE001 - only the advice depends on it
        major = None
    if major in GPU_EXTRAS:
        return f"pip install 'backprop-xp[cuda{major}]'"
    return INSTALL_GPU
