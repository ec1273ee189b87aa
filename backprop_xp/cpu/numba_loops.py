"""Fused, multi-core CPU loops for the training step, compiled by Numba (optional: ``pip install backprop-xp[fast]``).

The textbook training step makes several single-threaded NumPy passes over the
same arrays around the matrix products: ``z1 + b1``, then ReLU and its mask; the
argmax, softmax and cross-entropy of the output layer; and four passes for the
momentum update over every parameter. Here each group is one loop compiled by
Numba, so the data is read once, and loops over large arrays run on
``threads()`` cores: from 16k elements where NumPy's OpenBLAS runs its jobs on
the same threads (``cpu/blas_pool.py``: the update, the batch gather and, in
``cpu/hidden_major.py``, the output layer), else only from 1M (the update at a
wide hidden layer: two pools take the cores from each other). With ReLU,
everything between the two large matrix products (``x W1ᵀ`` and ``δ1ᵀ x``, which stay with NumPy's
BLAS) is one loop over blocks of rows, the output layer's three small products
included: the CPU twin of the GPU's fused output-layer kernel.

Each kernel does the same float operations, in the same order and precision, as
the NumPy code it replaces in ``loss.py``/``optimizers.py`` (Numba without
``fastmath`` neither reorders nor fuses multiply-adds), so its results are
bit-identical to it, with two exceptions: ``output_layer_loop_`` computes ``exp`` and
``log`` with the C library rather than NumPy's own SIMD routines, which may
differ in the last bits, and ``relu_output_layer_loop_`` also sums its small matrix
products in its own order; ``tests/test_fused_cpu.py`` bounds both differences.

Numba is not imported until a loop is first called; ``step.make_step`` chooses
``cpu/fused_cpu_step.py`` where Numba is installed and the fast path is on
(``enabled()``): ``BACKPROP_XP_FAST=0`` in the environment, or
``set_enabled(False)``, keeps the textbook NumPy step.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

from . import blas_pool

_state: dict[str, Any] = {
    "enabled": None,
    "threads": None,
    "kernels": None,
    "pool_started": False,
    "can_share": False,
}


def available() -> bool:
    """Whether Numba can be imported (the ``[fast]`` extra is installed)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def enabled() -> bool:
    """Whether the training step uses these kernels: Numba installed and ``BACKPROP_XP_FAST`` not ``0``."""
    if _state["enabled"] is None:
        _state["enabled"] = os.environ.get("BACKPROP_XP_FAST", "1") != "0" and available()
    return _state["enabled"]


def set_enabled(flag: bool) -> bool:
    """Turn the fast path on or off for steps from now on; returns the previous setting.

    Turning it on without Numba installed raises ``ImportError``.
    """
    previous = enabled()
    if flag and not available():
        raise ImportError("the fast CPU path needs Numba: pip install 'backprop-xp[fast]'")
    _state["enabled"] = bool(flag)
    return previous


# --------------------------------------------------------------------------- threads


def _blas_threads() -> int | None:
    """The thread count of NumPy's BLAS (threadpoolctl if installed, else its environment variables)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        threadpool_info = None
    if threadpool_info is not None:
        counts = [pool["num_threads"] for pool in threadpool_info() if pool.get("user_api") == "blas"]
        if counts:
            return max(counts)
    for name in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").split(",")[0]
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


def threads() -> int:
    """Threads the parallel kernels use: ``set_threads``'s value, else the BLAS's (read at first use)."""
    if _state["threads"] is None:
        import numba

        _state["threads"] = max(
            1, min(_blas_threads() or numba.config.NUMBA_NUM_THREADS, numba.config.NUMBA_NUM_THREADS)
        )
    return _state["threads"]


def set_threads(n: int | None) -> None:
    """Use ``n`` threads in the parallel kernels (``None``: follow the BLAS again, read at next use).

    Capped at Numba's maximum (``NUMBA_NUM_THREADS``, the core count by default).
    """
    if n is not None and (isinstance(n, bool) or int(n) < 1):
        raise ValueError(f"threads must be a positive integer, got {n!r}")
    _state["threads"] = None if n is None else int(n)
    if n is not None and available():
        import numba

        _state["threads"] = min(int(n), numba.config.NUMBA_NUM_THREADS)


def info() -> dict[str, Any]:
    """What the fast path is doing, for reports: enabled, threads, Numba version and threading layer."""
    out: dict[str, Any] = {"enabled": enabled(), "available": available()}
    if out["available"]:
        import numba

        out["numba"] = numba.__version__
        out["threads"] = threads()
        try:
            out["threading_layer"] = numba.threading_layer()
        except ValueError:  # no parallel kernel has run yet: the layer the first one will use
            default = "omp" if blas_pool.available() else "workqueue"
            out["threading_layer"] = os.environ.get("NUMBA_THREADING_LAYER", default)
        out["blas_on_these_threads"] = _state["can_share"]  # during each step
    return out


# --------------------------------------------------------------------------- kernels
# Each kernel is written once as a plain Python function and compiled twice by
# Numba: parallel (``prange`` spreads the outer loop over the threads) and
# serial (``prange`` is ``range``), for arrays too small to be worth waking
# threads for. The comments give the NumPy expression each line reproduces.


def _output_layer(z, labels, delta, row_loss, inv_batch, batch):  # pragma: no cover
    n_correct = 0
    for i in range(z.shape[0]):
        # argmax z2 (the first maximum; the first NaN if any, as NumPy's argmax)
        best = 0
        top = z[i, 0]
        for k in range(1, z.shape[1]):
            zk = z[i, k]
            if top == top and (zk > top or zk != zk):
                top, best = zk, k
        y = labels[i]
        n_correct += best == y
        # softmax_cross_entropy_: z − max, exp, the row sum in class order, −log ŷ_y, (ŷ − y) / B
        total = delta[i, 0] = np.exp(z[i, 0] - top)
        for k in range(1, z.shape[1]):
            e = np.exp(z[i, k] - top)
            delta[i, k] = e
            total += e
        row_loss[i] = np.log(total) - (z[i, y] - top)
        total *= batch
        for k in range(z.shape[1]):
            delta[i, k] = delta[i, k] / total
        delta[i, y] -= inv_batch
    return n_correct


def _plain(w, g, lr, wd):  # pragma: no cover
    for i in _prange(w.shape[0]):
        gi = g[i]
        if wd != 0:
            gi = gi + w[i] * wd
            g[i] = gi
        w[i] = w[i] - gi * lr  # w ← w − η g


def _adam(w, g, m, v, hyper, decoupled):  # pragma: no cover
    # hyper = [β₁, 1 − β₁, β₂, 1 − β₂, √(1 − β₂ᵗ), ε, η / (1 − β₁ᵗ), λ (Adam) or 1 − η λ (AdamW)], in w's dtype
    b1, c1, b2, c2, root2, eps, step, wd = (
        hyper[0],
        hyper[1],
        hyper[2],
        hyper[3],
        hyper[4],
        hyper[5],
        hyper[6],
        hyper[7],
    )
    for i in _prange(w.shape[0]):
        gi, wi = g[i], w[i]
        if decoupled:
            wi = wi * wd  # AdamW: w ← w (1 − η λ)
        elif wd != 0:
            gi = gi + wi * wd  # Adam: g ← ∂L/∂w + λ w (kept in the gradient buffer, as Adam.step does)
            g[i] = gi
        mi = m[i] * b1 + gi * c1  # m ← β₁ m + (1 − β₁) g
        m[i] = mi
        vi = v[i] * b2 + (gi * gi) * c2  # v ← β₂ v + (1 − β₂) g²
        v[i] = vi
        w[i] = wi - (mi / (np.sqrt(vi) / root2 + eps)) * step  # w ← w − η m̂ / (√v̂ + ε)


# Rows of the batch the output layer handles together: each row of W2 and of
# ∂L/∂W2 is then loaded from cache once per eight examples instead of once per
# example (at hidden 800 a row of W2 is 3.2 kB and all of it 32 kB, an L1's worth).
ROW_BLOCK = 8


def _relu_output_layer(
    a1, b1, W2, b2, labels, z2, delta2, delta1, gW2, gb1, gb2, row_loss, inv_batch, batch
):  # pragma: no cover
    # Everything of the step between the two large products z1 = x W1ᵀ and
    # ∂L/∂W1 = δ1ᵀ x, a block of rows at a time: the CPU twin of the GPU's fused
    # output-layer kernel (cuda/cuda_kernels.py), here without a separate f'(z1):
    # for ReLU, f'(z1) = [a1 > 0].
    n_rows, n_hidden = a1.shape
    n_classes = W2.shape[0]
    gW2[:, :] = 0
    gb1[:] = 0
    gb2[:] = 0
    n_correct = 0
    for start in range(0, n_rows, ROW_BLOCK):
        stop = min(start + ROW_BLOCK, n_rows)
        for i in range(start, stop):
            a = a1[i]
            for j in range(n_hidden):
                zb = a[j] + b1[j]  # z1 = x W1ᵀ + b1
                a[j] = zb * (zb > 0)  # a1 = relu(z1)
        for k in range(n_classes):
            w = W2[k]
            for i in range(start, stop):
                a = a1[i]
                s = a.dtype.type(0)
                for j in range(n_hidden):
                    s += a[j] * w[j]
                z2[i, k] = s + b2[k]  # z2 = a1 W2ᵀ + b2
        # argmax, ŷ = softmax(z2), L_i = −log ŷ_y and δ2 = (ŷ − y) / B of these rows: output_layer_loop_'s own loop
        rows = slice(start, stop)
        n_correct += _output_rows(z2[rows], labels[rows], delta2[rows], row_loss[rows], inv_batch, batch)
        for k in range(n_classes):
            w = W2[k]
            g = gW2[k]
            for i in range(start, stop):
                d = delta2[i, k]
                gb2[k] += d  # ∂L/∂b2 = Σ_b δ2
                a = a1[i]
                for j in range(n_hidden):
                    g[j] += d * a[j]  # ∂L/∂W2 = δ2ᵀ a1
                out = delta1[i]
                if k == 0:
                    for j in range(n_hidden):
                        out[j] = d * w[j]
                else:
                    for j in range(n_hidden):
                        out[j] += d * w[j]  # δ2 W2, one class at a time
        for i in range(start, stop):
            a = a1[i]
            out = delta1[i]
            for j in range(n_hidden):
                v = out[j] * (a[j] > 0)  # δ1 = δ2 W2 ⊙ f'(z1)
                out[j] = v
                gb1[j] += v  # ∂L/∂b1 = Σ_b δ1
    return n_correct


def _take_rows(x, rows, out):  # pragma: no cover
    for i in _prange(rows.shape[0]):  # np.take(x, rows, axis=0, out=out): the batch gather
        row, to = x[rows[i]], out[i]
        for j in range(row.shape[0]):  # element by element: `out[i] = row` measured 5x slower (57 against 11 µs)
            to[j] = row[j]


_prange = range  # numba.prange once Numba is imported (Numba reads globals when it compiles)
_output_rows = _output_layer  # its compiled form once Numba is imported, called by the ReLU loop


def _renamed(fn: Any, suffix: str) -> Any:
    """A copy of ``fn`` under another name.

    Numba's disk cache is keyed by the function's name and line, not by the
    compile options, so a serial and a parallel build of one function would
    load each other's machine code; the serial twin gets a name of its own.
    """
    import types

    twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix, fn.__defaults__, fn.__closure__)
    twin.__qualname__ = fn.__qualname__ + suffix
    return twin


def _kernels() -> Any:
    """The compiled kernels (compiled on first use, cached on disk by Numba)."""
    if _state["kernels"] is None:
        import types

        import numba

        global _prange, _output_rows
        _prange = numba.prange
        if "NUMBA_THREADING_LAYER" not in os.environ:
            # OpenMP where NumPy's OpenBLAS can run its jobs on it too (cpu/blas_pool.py): one pool whose
            # threads wait for the next loop in microseconds. Otherwise Numba's own pool, which sleeps
            # between launches: OpenMP's busy-waits, and so do OpenBLAS's threads, and on a machine with
            # few cores two such pools take the cores from each other (measured: a 1 ms GEMM took 36 ms,
            # bench/NOTES.md). Only if no parallel Numba code ran yet.
            numba.config.THREADING_LAYER = "omp" if blas_pool.available() else "workqueue"
        options = {"fastmath": False, "cache": True, "nogil": True}
        k = types.SimpleNamespace()
        for name, fn in (
            ("momentum_flushed", _momentum_flushed),
            ("plain", _plain),
            ("adam", _adam),
            ("take_rows", _take_rows),
        ):
            setattr(k, name, numba.njit(parallel=True, **options)(fn))
            setattr(k, name + "_serial", numba.njit(**options)(_renamed(fn, "_serial")))
        k.output_layer = _output_rows = numba.njit(**options)(_output_layer)
        # Its three small products sum over the hidden units in an order of
        # LLVM's choosing (vector lanes, fused multiply-adds), as a BLAS does;
        # the softmax rows it hands to output_layer keep that kernel's exact arithmetic.
        fast_sums = dict(options, fastmath={"reassoc", "contract"})
        k.relu_output_layer = numba.njit(**fast_sums)(_relu_output_layer)
        _state["kernels"] = k
    return _state["kernels"]


# --------------------------------------------------------------------------- what the fused CPU step calls

# Below this many elements a kernel runs on the calling thread. On 2 cores,
# right after a two-thread GEMM (whose BLAS threads still spin), splitting the
# update of hidden 800's 636k parameters lost more than it gained, and at
# hidden 1600 (1.27M) it only tied (bench/NOTES.md): only such arrays are split.
PARALLEL_MIN = 1 << 20
# The same where NumPy's BLAS runs on the loops' threads (``can_share_pool()``): no pool spins against them,
# a launch costs about 2 µs, and the update of 784-128-10's 102k parameters took 23 µs on two threads
# against 83 on one beside OpenBLAS's spinning worker (bench/NOTES.md, issue 27).
SHARED_PARALLEL_MIN = 1 << 14


def active(xp: Any) -> bool:
    """Whether arrays of module ``xp`` take the fast path (NumPy arrays, and ``enabled()``)."""
    return xp is np and enabled()


def can_share_pool() -> bool:
    """Whether NumPy's OpenBLAS can run its jobs on these loops' threads (``cpu/blas_pool.py``).

    The fused step has it do so for the length of each step; its loops then split
    from ``SHARED_PARALLEL_MIN`` elements, as no other pool spins against them.
    Asked only with ``threads()`` above 1; the first time, it starts Numba's pool
    (the threading layer is chosen then) and makes the callback ready where it can.
    """
    if not _state["pool_started"]:
        with _starting:
            if not _state["pool_started"]:  # not started by another thread meanwhile
                kernels = _kernels()
                one = np.zeros(1, np.float32)
                kernels.plain(one, one, one[0], one[0])  # a parallel launch: Numba starts its pool, fixes the layer
                os.register_at_fork(after_in_child=_forked)
                _state["can_share"] = blas_pool.prepare()
                _state["pool_started"] = True
    return _state["can_share"]


def sharing_blas(xp: Any) -> Any:
    """``blas_pool.sharing()`` where the fused loops run on several threads (NumPy arrays, ``threads()`` above 1)."""
    return blas_pool.sharing(active(xp) and threads() > 1 and can_share_pool())


def _forked() -> None:
    """In a forked child: the loops on the calling thread (GNU OpenMP's pool did not survive the fork)."""
    _state["threads"] = 1


_launch = threading.Lock()
_starting = threading.Lock()


def launch(parallel: Any, serial: Any, size: int, *args: Any) -> Any:
    """``parallel(*args)`` on ``threads()`` threads if ``size`` elements are worth it, else ``serial(*args)``.

    Worth it from ``SHARED_PARALLEL_MIN`` elements where the BLAS runs on the same
    threads, else from ``PARALLEL_MIN``. One parallel launch at a time: a second
    thread arriving meanwhile (a threaded sweep, say) runs the serial twin instead of waiting.
    """
    n = threads()
    if (
        n > 1
        and size >= (SHARED_PARALLEL_MIN if can_share_pool() else PARALLEL_MIN)
        and _launch.acquire(blocking=False)
    ):
        try:
            import numba

            if numba.get_num_threads() != n:  # a per-thread setting in Numba
                numba.set_num_threads(n)
            return parallel(*args)
        finally:
            _launch.release()
    return serial(*args)


def _run(name: str, size: int, *args: Any) -> Any:
    """Kernel ``name`` (``launch``: on ``threads()`` threads, or its serial twin)."""
    kernels = _kernels()
    return launch(getattr(kernels, name), getattr(kernels, name + "_serial"), size, *args)


def adam_loop_(w: Any, g: Any, m: Any, v: Any, hyper: Any, decoupled: bool) -> Any:
    """``Adam.step``'s lines in one pass over the parameters, bit-identical to them; returns ``w``.

    ``hyper`` holds, in ``w``'s dtype, what ``Adam.step`` multiplies by:
    ``[β₁, 1 − β₁, β₂, 1 − β₂, √(1 − β₂ᵗ), ε, η / (1 − β₁ᵗ), λ]`` (AdamW:
    ``1 − η λ`` in the last place, and ``decoupled``).
    """
    _run("adam", w.size, w, g, m, v, hyper, bool(decoupled))
    return w


def output_layer_loop_(logits: Any, labels: Any, out: Any, row_loss: Any) -> tuple[Any, int]:
    """``softmax_cross_entropy_(logits, labels, out)`` and the count of rows whose argmax is the label.

    One pass per row. ``row_loss`` (length B) receives ``−log ŷ_y`` of each row;
    the returned loss is their mean, summed by NumPy as ``softmax_cross_entropy_``
    sums. ``exp`` and ``log`` are the C library's, so ``out`` and the loss may
    differ from the NumPy function's in the last bits (see the module's docstring).
    """
    batch = logits.shape[0]
    dtype = logits.dtype.type
    n_correct = _kernels().output_layer(logits, labels, out, row_loss, dtype(1.0 / batch), dtype(batch))
    return row_loss.sum() / batch, n_correct


def relu_output_layer_loop_(params: dict[str, Any], grads: dict[str, Any], labels: Any, ws: Any) -> tuple[Any, int]:
    """From ``z1 = x W1ᵀ`` to ``δ1``: the rest of the forward pass, the loss and the output layer's gradients.

    ``ws`` is the model's workspace for this batch size. ``ws.a1`` holds ``z1``
    and receives ``a1 = relu(z1 + b1)``; ``ws.z2``, ``ws.delta2``
    and ``ws.delta1`` receive ``z2``, ``δ2`` and ``δ1 = δ2 W2 ⊙ f'(z1)``;
    ``grads`` receives ``∂L/∂W2``, ``∂L/∂b2`` and ``∂L/∂b1``; ``ws.row_loss``
    each row's ``−log ŷ_y``. One pass over a block of rows instead of three
    matrix products, two matrix-vector products and five elementwise passes.
    The small products' sums are ordered as LLVM vectorises them, not as the
    BLAS orders its own, so results agree with ``MLP.backprop``'s NumPy path to
    float rounding, not bit for bit (``tests/test_fused_cpu.py`` states the tolerance).

    Returns the mean loss and the count of rows whose argmax is the label.
    """
    batch = ws.a1.shape[0]
    dtype = ws.a1.dtype.type
    n_correct = _kernels().relu_output_layer(
        ws.a1, params["b1"], params["W2"], params["b2"], labels, ws.z2, ws.delta2, ws.delta1,
        grads["W2"], grads["b1"], grads["b2"], ws.row_loss, dtype(1.0 / batch), dtype(batch),
    )  # fmt: skip
    return ws.row_loss.sum() / batch, n_correct


def take_rows_loop_(x: Any, rows: Any, out: Any) -> Any:
    """``np.take(x, rows, axis=0, out=out)`` for a 2-D ``x`` and ``rows`` in range (not checked); returns ``out``.

    Split over ``threads()`` threads where ``launch`` finds it worth it (from 16k
    elements where the BLAS shares them, else from 1M): each thread's rows then
    sit in its own core's cache when the next product reads them (a 784-128-10
    epoch at batch 128 took 54 ms instead of 60 on two threads, bench/NOTES.md).
    Otherwise it is NumPy's ``take``.
    """
    launch(_kernels().take_rows, lambda *args: np.take(x, rows, axis=0, out=out, mode="clip"), out.size, x, rows, out)
    return out


def plain_sgd_loop_(w: Any, g: Any, lr: float, weight_decay: float) -> None:
    """``SGD.step`` without momentum in one pass: ``g ← g + λ w`` (if ``λ``), ``w ← w − η g``."""
    t = w.dtype.type
    _run("plain", w.size, w, g, t(lr), t(weight_decay))


# --------------------------------------------------------------------------- subnormal velocities
# A velocity whose gradient stays zero (a pixel that is 0 in almost every image, a hidden unit that no
# longer fires) decays as v ← μ v every step: at μ = 0.9 it falls below float32's smallest normal number
# (1.2e-38) after about 830 steps, and every multiply on such a subnormal number takes a microcode assist
# (about a hundred cycles) on x86. Measured on MNIST at 784-800-10, batch 128, one thread (bench/NOTES.md,
# issue 27): from the fifth epoch 0.4-1.2% of the velocities are subnormal, and the update's pass takes
# 415-607 µs instead of 270 (+15% on the whole epoch by the tenth). Here such a velocity becomes zero
# instead. Its contribution η v to a weight is below 1.2e-38, which no float32 weight larger than 2⁻¹⁰³
# (1e-31) can register: the parameters keep SGD.step's bits but for weights that close to zero (a bias
# that started at 0 and never moved), which differ by less than 1.2e-38; every other velocity is
# bit-identical to SGD.step's (``tests/test_fused_cpu.py`` checks all three).


def _momentum_flushed(w, g, v, lr, mu, wd, smallest):  # pragma: no cover
    zero = smallest - smallest  # 0 in w's dtype: a literal 0 would make the velocity float64 in float32 code
    for i in _prange(w.shape[0]):
        gi = g[i]
        if wd != 0:
            gi = gi + w[i] * wd  # g ← ∂L/∂w + λ w (kept in the gradient buffer, as SGD.step does)
            g[i] = gi
        vi = v[i] * mu + gi  # v ← μ v + g
        if abs(vi) < smallest:
            vi = vi * zero  # a subnormal velocity is zero (keeping its sign; NaN fails the test and stays)
        v[i] = vi
        w[i] = w[i] - vi * lr  # w ← w − η v


def momentum_flushed_loop_(w: Any, g: Any, v: Any, lr: float, momentum: float, weight_decay: float) -> None:
    """``SGD.step`` with momentum in one pass: ``g ← g + λ w`` (if ``λ``), ``v ← μ v + g``, ``w ← w − η v``,
    with a velocity below ``w``'s smallest normal number set to zero (see above).

    Bit-identical to ``SGD.step`` wherever no velocity is subnormal (the scalars are rounded to ``w``'s dtype
    first, as there).
    """
    t = w.dtype.type
    _run("momentum_flushed", w.size, w, g, v, t(lr), t(momentum), t(weight_decay), t(np.finfo(w.dtype).tiny))
