"""On-the-fly data augmentation: random shifts, small rotations and elastic distortions.

Each epoch trains on a freshly distorted copy of the training images, so the
network never sees the same picture twice and must learn what does not change
when a digit is written a little differently. Simard, Steinkraus and Platt
(2003) showed this is what takes a one-hidden-layer network past 99% on MNIST.

Every image is resampled once (bilinear) through a displacement field that is
the sum of

* an affine part: a rotation by up to ``max_rotation`` degrees, a scaling by
  up to ``max_scale`` and a shift of up to ``max_shift`` pixels, and
* an elastic part: uniform random noise in [-1, 1] per pixel and direction,
  smoothed by a Gaussian of width ``sigma`` and scaled by ``alpha``.

The Gaussian smoothing of a 28x28 field is two small matrix products
(``G @ field @ Gᵀ``), the resampling is four gathers per pixel, all vectorised
over a chunk of images, in float32. The distortions of an epoch come from
``numpy.random.default_rng([seed, epoch, 1])``: a resumed run sees exactly the
images an uninterrupted one saw.
"""

from __future__ import annotations

import math

import numpy as np


def gaussian_matrix(side: int, sigma: float) -> np.ndarray:
    """``G`` such that ``G @ f`` smooths each column of ``f`` by a Gaussian (zero outside the image)."""
    offsets = np.arange(side)[:, None] - np.arange(side)[None, :]
    g = np.exp(-0.5 * (offsets / sigma) ** 2)
    return (g / (sigma * math.sqrt(2 * math.pi))).astype(np.float32)


def distort(
    images: np.ndarray,
    rng: np.random.Generator,
    *,
    out: np.ndarray | None = None,
    max_shift: float = 2.0,
    max_rotation: float = 12.0,
    max_scale: float = 0.12,
    alpha: float = 30.0,
    sigma: float = 4.5,
    chunk: int = 2048,
) -> np.ndarray:
    """A randomly distorted copy of ``images`` (rows of ``side*side`` values), written into ``out``.

    >>> x = np.zeros((1, 784), np.float32); x[0, 14 * 28 + 14] = 1.0
    >>> y = distort(x, np.random.default_rng(0))
    >>> y.shape, y.dtype, bool(0.0 <= y.min() and y.max() <= 1.0)
    ((1, 784), dtype('float32'), True)
    """
    images = np.asarray(images, np.float32)
    n, d = images.shape
    side = math.isqrt(d)
    if side * side != d:
        raise ValueError(f"distort needs square images, got {d} values per image")
    if out is None:
        out = np.empty_like(images)
    g = gaussian_matrix(side, sigma)
    centre = (side - 1) / 2
    ys, xs = np.meshgrid(
        np.arange(side, dtype=np.float32) - centre, np.arange(side, dtype=np.float32) - centre, indexing="ij"
    )
    for start in range(0, n, chunk):
        block = images[start : start + chunk]
        m = block.shape[0]
        angle = np.radians(rng.uniform(-max_rotation, max_rotation, m)).astype(np.float32)
        scale = rng.uniform(1 - max_scale, 1 + max_scale, m).astype(np.float32)
        shift = rng.uniform(-max_shift, max_shift, (2, m)).astype(np.float32)
        cos, sin = (np.cos(angle) / scale)[:, None, None], (np.sin(angle) / scale)[:, None, None]
        # Where each output pixel reads from (relative to the centre): affine, then elastic.
        src_y = cos * ys + sin * xs + shift[0][:, None, None]
        src_x = -sin * ys + cos * xs + shift[1][:, None, None]
        field = rng.random((2, m, side, side), dtype=np.float32)
        field *= 2
        field -= 1  # uniform in [-1, 1)
        field = g @ field @ g.T  # Gaussian smoothing along both axes of every field
        src_y += alpha * field[0] + centre
        src_x += alpha * field[1] + centre
        out[start : start + m] = _bilinear(block.reshape(m, side, side), src_y, src_x).reshape(m, d)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def _bilinear(images: np.ndarray, src_y: np.ndarray, src_x: np.ndarray) -> np.ndarray:
    """Sample each image at (src_y, src_x), bilinearly, reading 0 outside the image."""
    m, side, _ = images.shape
    pad = 2  # a zero border two pixels wide: a clamped far-away point reads only zeros
    width = side + 2 * pad
    padded = np.zeros((m, width, width), np.float32)
    padded[:, pad:-pad, pad:-pad] = images
    y0, x0 = np.floor(src_y), np.floor(src_x)
    wy, wx = src_y - y0, src_x - x0
    rows = np.clip(y0, -pad, side).astype(np.int32) + pad
    cols = np.clip(x0, -pad, side).astype(np.int32) + pad
    index = rows * width + cols
    index += (np.arange(m, dtype=np.int32) * (width * width))[:, None, None]
    flat = padded.reshape(-1)
    top_left, top_right = flat.take(index), flat.take(index + 1)
    index += width
    bottom_left, bottom_right = flat.take(index), flat.take(index + 1)
    top = top_left + wx * (top_right - top_left)
    bottom = bottom_left + wx * (bottom_right - bottom_left)
    return top + wy * (bottom - top)
