"""The output layer's loss: softmax and cross-entropy, and the gradient ``δ2 = (ŷ − y) / B`` with it.

Written once against the array module of the logits (NumPy or CuPy), in
place on buffers the caller owns; the reference the fused CPU loop and the
CUDA output-layer kernel are checked against.
"""

from __future__ import annotations

from typing import Any

from .backend import array_module


def check_labels(labels: Any, n_rows: int, n_classes: int) -> None:
    """Raise ValueError unless ``labels`` is ``n_rows`` integers in ``[0, n_classes)``.

    A label out of range must never wrap around (NumPy's negative indexing would
    silently pick another class) or read past the end of a row.
    """
    if labels.ndim != 1 or labels.shape[0] != n_rows:
        raise ValueError(f"labels must have shape ({n_rows},), got {tuple(labels.shape)}")
    if labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if n_rows == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= n_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"label {bad} is outside [0, {n_classes}) for {n_classes} classes")


def softmax_(z: Any) -> Any:
    """Overwrite ``z`` with ``ŷ = softmax(z)`` row by row (max-subtracted: no overflow); return it."""
    xp = array_module(z)
    z -= z.max(axis=1, keepdims=True)
    xp.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def softmax_cross_entropy_(logits: Any, labels: Any, out: Any, *, rows: Any = None) -> Any:
    """Mean cross-entropy of ``softmax(logits)`` against ``labels``, and its gradient.

    Writes ``δ2 = (ŷ − y) / B`` into ``out`` (which may be ``logits`` itself) and
    returns the loss ``mean_b −log ŷ_b[label_b]`` as a 0-d array on the same
    backend, so that a GPU caller does not wait for the device. Labels are
    trusted here; ``softmax_cross_entropy`` checks them. ``rows`` may pass a
    cached ``arange(B)`` (the training step keeps one per batch size).

    Stable for any finite logits: subtracting each row's max makes every
    exponent <= 0, and the log-probability of the label is taken as
    ``(z_y − max) − log Σ exp(z − max)`` instead of ``log`` of a probability
    that may have underflowed to 0.

    Any memory layout works. The model passes ``(B, K)`` views of ``(K, B)``
    buffers: the per-row reductions over K = 10 classes then run along the
    long contiguous axis, several times faster in NumPy than ten-element rows.
    """
    xp = array_module(logits)
    batch = logits.shape[0]
    if rows is None:
        rows = xp.arange(batch)
    xp.subtract(logits, logits.max(axis=1, keepdims=True), out=out)  # z − max(z) <= 0
    label_logit = out[rows, labels]  # z_y − max, taken before exp overwrites it
    xp.exp(out, out=out)
    row_sum = out.sum(axis=1, keepdims=True)
    loss = (xp.log(row_sum[:, 0]) - label_logit).sum() / batch  # −log ŷ_y = log Σ exp − (z_y − max)
    row_sum *= batch  # one division gives ŷ / B, the mean over the batch
    out /= row_sum  # ŷ / B, ŷ = softmax(z)
    out[rows, labels] -= 1.0 / batch  # (ŷ − y) / B, y one-hot
    return loss


def softmax_cross_entropy(logits: Any, labels: Any) -> tuple[float, Any]:
    """Mean softmax cross-entropy and its gradient with respect to the logits.

    Parameters
    ----------
    logits : array of shape (B, K), float32 or float64, NumPy or CuPy
        Unnormalised scores ``z2``.
    labels : integer array of shape (B,)
        Classes in ``[0, K)``; converted to the backend of ``logits``.

    Returns
    -------
    loss : float
        ``mean_b −log softmax(z_b)[label_b]``.
    dlogits : array like ``logits``
        ``(softmax(z) − onehot(labels)) / B``; ``logits`` is left unchanged.

    Raises
    ------
    ValueError
        Logits that are not a 2-D float array, or labels of the wrong shape,
        type or range.
    """
    xp = array_module(logits)
    if logits.ndim != 2 or logits.dtype.kind != "f":
        raise ValueError(f"logits must be a 2-D float array, got shape {tuple(logits.shape)} dtype {logits.dtype}")
    labels = xp.asarray(labels)
    check_labels(labels, logits.shape[0], logits.shape[1])
    if logits.shape[0] == 0:
        raise ValueError("softmax_cross_entropy needs at least one row")
    dlogits = xp.empty_like(logits)
    loss = softmax_cross_entropy_(logits, labels, out=dlogits)
    return float(loss), dlogits
