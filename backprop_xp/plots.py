"""Pictures a person wants to look at: digits, curves, confusion matrices, weights.

matplotlib is imported inside each function with the headless ``Agg`` backend,
so importing ``backprop_xp`` stays fast and works without a display. Every
figure is written atomically (temporary file, then rename).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from .files import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> None:
    """Write a matplotlib figure as PNG atomically and close it."""
    plt = _pyplot()
    try:
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)


def digit_grid(
    images: np.ndarray,
    titles: Sequence[str],
    path: str | os.PathLike,
    *,
    suptitle: str | None = None,
    columns: int = 10,
    cmap: str = "gray_r",
    symmetric: bool = False,
) -> None:
    """Draw square images (rows of ``images``, each ``side*side`` values) in a grid with titles.

    Used for sample digits, the worst mistakes, and the rows of ``W1`` seen as
    28x28 pictures (``symmetric=True`` centres the colour map on zero, so that
    positive and negative weights read differently).
    """
    plt = _pyplot()
    images = np.asarray(images)
    n = images.shape[0]
    if n == 0:
        raise ValueError("digit_grid needs at least one image")
    side = math.isqrt(images.shape[1])
    if side * side != images.shape[1]:
        raise ValueError(f"images must be square, got {images.shape[1]} values per image")
    columns = min(columns, n)
    rows = -(-n // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.2 * columns, 1.35 * rows + (0.4 if suptitle else 0)), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        image = images[i].reshape(side, side)
        if symmetric:
            limit = float(np.abs(image).max()) or 1.0
            ax.imshow(image, cmap=cmap, vmin=-limit, vmax=limit)
        else:
            ax.imshow(image, cmap=cmap)
        if i < len(titles):
            ax.set_title(titles[i], fontsize=8)
    if suptitle:
        fig.suptitle(suptitle)
    save_figure(fig, path)
