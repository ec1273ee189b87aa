"""The ReLU step's two large products with the hidden layer stored hidden-major (issue 27).

``FusedCpuStep`` keeps ``a1`` and ``δ1`` as ``(B, H)`` rows and calls OpenBLAS
for ``z1 = x W1ᵀ`` and ``∂L/∂W1 = δ1ᵀ x``. Stored ``(H, B)`` instead, the same
products are ``z1ᵀ = W1 xᵀ`` and ``∂L/∂W1 = δ1ᵀᵀ x`` (a plain NN product), which
OpenBLAS's single-thread kernels run 7-13% faster at 784-800-10, batch 128
(bench/NOTES.md, issue 27), with the same bits. ``relu_output_layer_hm_loop_``
is ``numba_loops.relu_output_layer_loop_`` for that layout: everything
between the two products, one hidden unit (a row of ``B`` values) at a time.
On more than one thread, where NumPy's BLAS shares them (``cpu/blas_pool.py``),
the same loop runs split into blocks of hidden units, one per thread.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import numba_loops

_state: dict[str, Any] = {"kernel": None, "split": None}
_output_rows = None  # numba_loops' compiled output_layer once compiled (Numba reads globals when it compiles)


def _hidden_unit_forward(j, a1, b1, W2, z2t):  # pragma: no cover
    # Hidden unit j, all B rows of the batch: a1 = relu(z1 + b1) in place, and its terms of z2ᵀ added to z2t.
    a = a1[j]
    bj = b1[j]
    for i in range(a.shape[0]):
        zb = a[i] + bj  # z1 = x W1ᵀ + b1
        a[i] = zb * (zb > 0)  # a1 = relu(z1)
    for k in range(W2.shape[0]):
        w = W2[k, j]
        z = z2t[k]
        for i in range(a.shape[0]):
            z[i] += a[i] * w  # z2 = a1 W2ᵀ


def _hidden_unit_backward(j, a1, W2, d2t, d1, gW2, gb1, zero):  # pragma: no cover
    # Hidden unit j, all B rows of the batch: its δ1 row, ∂L/∂b1 entry and ∂L/∂W2 column (d2t is δ2ᵀ, (K, B)).
    n_rows = a1.shape[1]
    n_classes = W2.shape[0]
    a = a1[j]
    out = d1[j]
    w = W2[0, j]
    d = d2t[0]
    for i in range(n_rows):
        out[i] = d[i] * w
    for k in range(1, n_classes):
        w = W2[k, j]
        d = d2t[k]
        for i in range(n_rows):
            out[i] += d[i] * w  # δ2 W2
    s = zero
    for i in range(n_rows):
        v = out[i] * (a[i] > 0)  # δ1 = δ2 W2 ⊙ f'(z1)
        out[i] = v
        s += v
    gb1[j] = s  # ∂L/∂b1 = Σ_b δ1
    for k in range(n_classes):
        d = d2t[k]
        s = zero
        for i in range(n_rows):
            s += d[i] * a[i]
        gW2[k, j] = s  # ∂L/∂W2 = δ2ᵀ a1


def _relu_output_layer_hm(
    a1, b1, W2, b2, labels, z2t, d2t, d1, gW2, gb1, gb2, row_loss, inv_batch, batch
):  # pragma: no cover
    # a1 (H, B) holds z1ᵀ and receives a1ᵀ; z2t, d2t (K, B) are z2ᵀ and δ2ᵀ; d1 (H, B) receives δ1ᵀ.
    n_hidden, n_rows = a1.shape
    n_classes = W2.shape[0]
    zero = inv_batch - inv_batch  # 0 in the arrays' dtype
    z2t[:, :] = zero
    for j in range(n_hidden):
        _unit_forward(j, a1, b1, W2, z2t)  # z2 = a1 W2ᵀ, one hidden unit at a time
    for k in range(n_classes):
        z = z2t[k]
        for i in range(n_rows):
            z[i] += b2[k]  # + b2
    # argmax, ŷ = softmax(z2), L_i = −log ŷ_y and δ2 = (ŷ − y) / B: output_layer_loop_'s own loop
    n_correct = _output_rows(z2t.T, labels, d2t.T, row_loss, inv_batch, batch)
    for k in range(n_classes):
        d = d2t[k]
        s = zero
        for i in range(n_rows):
            s += d[i]
        gb2[k] = s  # ∂L/∂b2 = Σ_b δ2
    for j in range(n_hidden):
        _unit_backward(j, a1, W2, d2t, d1, gW2, gb1, zero)
    return n_correct


def _relu_output_layer_hm_split(
    a1, b1, W2, b2, labels, z2, d2, d2t, d1, gW2, gb1, gb2, row_loss, z2_parts, inv_batch, batch
):  # pragma: no cover
    # _relu_output_layer_hm split over hidden units, one block per thread (z2_parts.shape[0] of them), for
    # threads that NumPy's BLAS shares (cpu/blas_pool.py). z2 = a1 W2ᵀ sums over every hidden unit: each
    # block sums its own into z2_parts, the blocks' sums are added on the calling thread, and so are the
    # softmax rows (B of them: little work); everything else belongs to one hidden unit. z2, d2 are (B, K).
    n_hidden, n_rows = a1.shape
    n_classes = W2.shape[0]
    n_parts = z2_parts.shape[0]
    zero = inv_batch - inv_batch
    for part in _prange(n_parts):
        z = z2_parts[part]
        z[:, :] = zero
        for j in range(part * n_hidden // n_parts, (part + 1) * n_hidden // n_parts):
            _unit_forward(j, a1, b1, W2, z)  # this block's share of z2 = a1 W2ᵀ
    for i in range(n_rows):
        for k in range(n_classes):
            s = b2[k]
            for part in range(n_parts):
                s += z2_parts[part, k, i]
            z2[i, k] = s  # z2 = a1 W2ᵀ + b2
    # argmax, ŷ = softmax(z2), L_i = −log ŷ_y and δ2 = (ŷ − y) / B: output_layer_loop_'s own loop
    n_correct = _output_rows(z2, labels, d2, row_loss, inv_batch, batch)
    for k in range(n_classes):
        s = zero
        for i in range(n_rows):
            d2t[k, i] = d2[i, k]
            s += d2[i, k]
        gb2[k] = s  # ∂L/∂b2 = Σ_b δ2
    for part in _prange(n_parts):
        for j in range(part * n_hidden // n_parts, (part + 1) * n_hidden // n_parts):
            _unit_backward(j, a1, W2, d2t, d1, gW2, gb1, zero)
    return n_correct


_prange = range  # numba.prange once compiled (Numba reads globals when it compiles)
_unit_forward, _unit_backward = _hidden_unit_forward, _hidden_unit_backward  # their compiled forms once compiled


def _kernels() -> Any:
    """The compiled loops: the serial one, and the one split over threads (compiled on first use, cached on disk)."""
    if _state["kernel"] is None:
        import numba

        global _output_rows, _prange, _unit_forward, _unit_backward
        _output_rows = numba_loops._kernels().output_layer
        _prange = numba.prange
        # The small products' sums in an order of LLVM's choosing, as relu_output_layer_loop_'s.
        options = {"cache": True, "nogil": True, "fastmath": {"reassoc", "contract"}}
        # Both per-unit helpers inlined by Numba, as if written in place in each loop.
        _unit_forward = numba.njit(inline="always", **options)(_hidden_unit_forward)
        _unit_backward = numba.njit(inline="always", **options)(_hidden_unit_backward)
        _state["kernel"] = numba.njit(**options)(_relu_output_layer_hm)
        _state["split"] = numba.njit(parallel=True, **options)(_relu_output_layer_hm_split)
    return _state["kernel"], _state["split"]


def relu_output_layer_hm_loop_(
    params: dict[str, Any], grads: dict[str, Any], labels: Any, ws: Any, a1: Any, delta1: Any
) -> tuple[Any, int]:
    """``numba_loops.relu_output_layer_loop_`` with ``a1`` and ``δ1`` hidden-major, ``(H, B)``.

    ``a1`` holds ``z1ᵀ = W1 xᵀ`` and receives ``relu(z1 + b1)ᵀ``; ``delta1``
    receives ``δ1ᵀ``; ``ws.z2``, ``ws.delta2`` (class-major buffers), ``ws.row_loss``
    and ``grads`` (``W2``, ``b2``, ``b1``) as there. Returns the mean loss and the
    count of rows whose argmax is the label.
    """
    batch = a1.shape[1]
    dtype = a1.dtype.type
    serial, split = _kernels()
    common = (params["b1"], params["W2"], params["b2"], labels)
    grad = (grads["W2"], grads["b1"], grads["b2"], ws.row_loss)
    scale = (dtype(1.0 / batch), dtype(batch))
    n_threads = numba_loops.threads()
    if n_threads > 1 and numba_loops.can_share_pool():
        hm = ws.scratch
        if hm.z2_parts is None or hm.z2_parts.shape[0] != n_threads:
            hm.z2_parts = np.empty((n_threads, *hm.delta2t.shape), a1.dtype)
        n_correct = numba_loops.launch(
            split, lambda *args: serial(a1, *common, ws.z2.T, ws.delta2.T, delta1, *grad, *scale), a1.size,
            a1, *common, ws.z2, ws.delta2, hm.delta2t, delta1, *grad, hm.z2_parts, *scale,
        )  # fmt: skip
    else:
        n_correct = serial(a1, *common, ws.z2.T, ws.delta2.T, delta1, *grad, *scale)
    return ws.row_loss.sum() / batch, n_correct


class HiddenMajor:
    """A batch size's ``(H, B)`` buffers for ``a1`` and ``δ1`` (kept in the workspace's ``scratch`` slot)."""

    def __init__(self, n_hidden: int, batch: int, dtype: Any, n_classes: int) -> None:
        self.a1 = np.empty((n_hidden, batch), dtype)
        self.delta1 = np.empty((n_hidden, batch), dtype)
        self.delta2t = np.empty((n_classes, batch), dtype)  # δ2ᵀ, for the loop split over threads
        self.z2_parts = None  # (threads, K, B): each thread's share of z2ᵀ, made by that loop's first call


def hidden_major_backprop(model: Any, x: Any, labels: Any) -> tuple[Any, Any]:
    """``MLP.backprop``'s gradients and results for a ReLU model, the hidden layer hidden-major.

    On first use for a batch size, the workspace's ``a1`` and ``delta1`` become
    ``(B, H)`` views of the ``(H, B)`` buffers: every reader of the workspace
    sees the same values, in the same shape, only their memory order changes.
    """
    p, g = model.params, model.grads
    ws = model.workspace(x.shape[0])
    if not isinstance(ws.scratch, HiddenMajor):
        ws.scratch = HiddenMajor(model.n_hidden, x.shape[0], model.dtype, model.n_outputs)
        ws.a1, ws.delta1 = ws.scratch.a1.T, ws.scratch.delta1.T
    hm = ws.scratch
    np.matmul(p["W1"], x.T, out=hm.a1)  # z1ᵀ = W1 xᵀ
    loss, n_correct = relu_output_layer_hm_loop_(p, g, labels, ws, hm.a1, hm.delta1)
    np.matmul(hm.delta1, x, out=g["W1"])  # ∂L/∂W1 = δ1ᵀ x, with δ1ᵀ stored
    return loss, n_correct
