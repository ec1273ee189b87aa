"""Standardising features (per-feature mean and standard deviation), used by the tests only.

The package's models read MNIST's pixels in [0, 1] as they are; these two
helpers stay here for the tests that compare against standardised inputs.
"""

from __future__ import annotations

import numpy as np


def fit_standardizer(x: np.ndarray, *, min_std: float = 0.1, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation of ``x`` (fit on training data only).

    Accumulated over row chunks in float64 (Chan's parallel update), so no
    full-size temporary is made and a large mean does not cancel the variance.

    Parameters
    ----------
    x : numpy.ndarray
        ``(n, d)``.
    min_std : float
        Floor for the standard deviation. Constant features (MNIST's border
        pixels) would otherwise divide by zero, and near-constant ones blow rare
        values up: on MNIST a floor of 0.1 keeps every standardized pixel within
        about +-10 (340 of 784 pixels hit it), while 1e-3 lets test pixels reach 400.
    chunk : int
        Rows per accumulation step.

    Returns
    -------
    mean, std : numpy.ndarray
        float32, shape ``(d,)``; ``std >= min_std``.

    Examples
    --------
    >>> mean, std = fit_standardizer(np.array([[0, 1], [0, 3]], dtype=np.float32))
    >>> mean.tolist(), std.tolist()
    ([0.0, 2.0], [0.10000000149011612, 1.0])
    """
    if getattr(x, "ndim", None) != 2 or len(x) == 0:
        raise ValueError(
            f"x must be a non-empty 2-D array (n_samples, n_features), got shape {getattr(x, 'shape', None)}"
        )
    if not min_std > 0:
        raise ValueError(f"min_std must be > 0, got {min_std}")
    count, mean, m2 = 0, np.zeros(x.shape[1]), np.zeros(x.shape[1])
    for start in range(0, len(x), chunk):
        block = np.asarray(x[start : start + chunk], dtype=np.float64)
        k, block_mean = len(block), block.mean(axis=0)
        block_m2 = ((block - block_mean) ** 2).sum(axis=0)
        delta = block_mean - mean
        total = count + k
        mean += delta * (k / total)
        m2 += block_m2 + delta**2 * (count * k / total)
        count = total
    std = np.sqrt(m2 / count)
    return mean.astype(np.float32), np.maximum(std, min_std).astype(np.float32)


def standardize(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` as a new float32 array (``mean``, ``std`` from ``fit_standardizer``).

    >>> standardize(np.array([[1.0, 5.0]], np.float32), np.array([1.0, 1.0], np.float32), np.array([1.0, 2.0], np.float32))
    array([[0., 2.]], dtype=float32)
    """
    if getattr(x, "ndim", None) != 2:
        raise ValueError(f"x must be a 2-D array (n_samples, n_features), got shape {getattr(x, 'shape', None)}")
    d = x.shape[1]
    if np.shape(mean) != (d,) or np.shape(std) != (d,):
        raise ValueError(f"mean and std must have shape ({d},) to match x, got {np.shape(mean)} and {np.shape(std)}")
    out = np.subtract(x, np.asarray(mean, np.float32), dtype=np.float32)
    out /= np.asarray(std, np.float32)
    return out
