"""Preprocessing applied to every image a network sees: in training, in ``evaluate`` and in ``predict``.

``deskew`` straightens slanted digits: people slant their writing by
different amounts, and a network that need not learn every slant has its
hidden units free for the rest (LeCun et al.'s MNIST table: deskewing takes
a linear classifier from 12% to 8.4% error; Meier et al. 2011 train committee
members on differently normalised digits so that their errors differ).

A digit's slant is read from its second moments: with ``I`` the pixel values,
``(ȳ, x̄)`` the centre of mass and

    α = Σ I (x - x̄)(y - ȳ) / Σ I (y - ȳ)²

the ink lies along ``x - x̄ ≈ α (y - ȳ)``. Reading pixel ``(y, x)`` of the
result from ``(y, x + α (y - ȳ))`` of the input (bilinearly) shears that line
upright, keeping the centre of mass where it was.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from .augment import _bilinear


def deskew(images: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """``images`` (rows of ``side*side`` values) with each digit's slant sheared away; float32.

    A blank image (no ink, or ink on a single row) is returned as it was.

    >>> x = np.zeros((1, 16), np.float32); x[0, [1, 6, 11]] = 1  # a diagonal: (0,1), (1,2), (2,3)
    >>> deskew(x).reshape(4, 4)[:3].round(2).tolist()
    [[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0]]
    """
    images = np.asarray(images, np.float32)
    n, d = images.shape
    side = math.isqrt(d)
    if side * side != d:
        raise ValueError(f"deskew needs square images, got {d} values per image")
    ys, xs = np.meshgrid(np.arange(side, dtype=np.float64), np.arange(side, dtype=np.float64), indexing="ij")
    out = np.empty_like(images)
    for start in range(0, n, chunk):
        block = images[start : start + chunk].reshape(-1, side, side).astype(np.float64)
        mass = block.sum(axis=(1, 2))
        safe = np.where(mass > 0, mass, 1.0)
        y_bar = (block * ys).sum(axis=(1, 2)) / safe
        x_bar = (block * xs).sum(axis=(1, 2)) / safe
        dy = ys - y_bar[:, None, None]
        var_y = (block * dy**2).sum(axis=(1, 2))
        cov = (block * dy * (xs - x_bar[:, None, None])).sum(axis=(1, 2))
        alpha = np.where(var_y > 0, cov / np.where(var_y > 0, var_y, 1.0), 0.0)  # 0: nothing to straighten
        src_y = np.broadcast_to(ys, block.shape).astype(np.float32)
        src_x = (xs + alpha[:, None, None] * dy).astype(np.float32)
        sheared = _bilinear(block.astype(np.float32), src_y, src_x)
        out[start : start + len(block)] = np.clip(sheared, 0.0, 1.0).reshape(len(block), d)
    return out


def no_preprocessing(images: np.ndarray) -> np.ndarray:
    return images


PREPROCESSING: dict[str, Callable[[np.ndarray], np.ndarray]] = {"none": no_preprocessing, "deskew": deskew}
