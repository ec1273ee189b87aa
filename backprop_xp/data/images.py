"""A picture of a digit made into what the network was trained on, the way MNIST itself was made.

MNIST's digits were cut to the ink, scaled to fit a 20x20 box keeping their
aspect ratio (anti-aliased to gray levels), and placed in a 28x28 field so that
their centre of mass is at its centre (pixel 14, 14), white ink on black. A
photo or a scan has to go through the same steps: squashing a whole page to
28x28 shows the network a speck it has never seen. For other square input
sizes everything scales (the box is 20/28 of the side).
"""

from __future__ import annotations

import os
import warnings

import numpy as np

INK = 0.25  # a pixel at least this far from the background (0 to 1) is ink, for the bounding box
BOX_SHARE = 20 / 28  # MNIST: a 20x20 box in a 28x28 field
# Single-channel modes of more than 8 bits (16-bit PNG/TIFF, 32-bit integer, float):
# convert("L") clips them at 255, so they are read as numbers and scaled instead.
HIGH_PRECISION_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}


def read_gray(path: str | os.PathLike) -> np.ndarray:
    """An image file as a 2-D float32 array in [0, 1] (0 black, 1 white).

    Colour becomes gray; a transparent background becomes white paper
    (drawing programs save ink on transparency, which ``convert("L")`` alone
    would turn all black). A 16-bit, 32-bit or float grayscale image keeps its
    gray levels (see ``_scale_high_precision``). Raises FileNotFoundError or ValueError naming the file;
    an image past PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``,
    some 89 million pixels) is such a ValueError too.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        # PIL only warns between its limit and twice it: a picture that large is no
        # digit, so it is refused like one past twice the limit, not printed as a warning.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                if image.mode in HIGH_PRECISION_MODES:
                    return _scale_high_precision(image)
                if "A" in image.getbands() or "transparency" in image.info:
                    image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
                gray = image.convert("L")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # neither is an OSError; PIL's own message speaks of a "DOS attack"
        raise ValueError(
            f"{path}: image too large (over PIL's limit of {Image.MAX_IMAGE_PIXELS:,} pixels; a digit needs far fewer)"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable image ({exc})") from None
    return np.asarray(gray, dtype=np.float32) / np.float32(255)


def _scale_high_precision(image) -> np.ndarray:
    """A PIL image of one of ``HIGH_PRECISION_MODES`` as a 2-D float32 array in [0, 1].

    16-bit modes are divided by 65535. Mode "I" (32-bit integers) by 65535 too
    when it fits in 16 bits (that is how PIL often opens 16-bit files), else by
    its maximum. Mode "F" has no fixed range, so its maximum decides: up to 1
    it is taken as is (the usual float convention), up to 255 it is 8-bit data
    stored as floats and divided by 255, above that (raw counts, say) it is
    divided by its maximum. Negative values become black.
    """
    raw = np.asarray(image)
    values = raw.astype(np.float64)  # float64 holds every 32-bit integer exactly
    values[~np.isfinite(values)] = 0  # a NaN or infinite float pixel would wreck the scale: black
    top = float(values.max(initial=0))
    if image.mode == "F":
        scale = 1.0 if top <= 1 else 255.0 if top <= 255 else top
    elif image.mode == "I":
        scale = 65535.0 if top <= 65535 else top
    else:
        scale = 65535.0
    gray = np.clip(values / scale, 0.0, 1.0)
    if "transparency" in image.info:  # a 16-bit PNG's transparent gray level: white paper, as on the 8-bit path
        gray[raw == image.info["transparency"]] = 1.0
    return gray.astype(np.float32)


def white_on_black(pixels: np.ndarray) -> tuple[np.ndarray, bool]:
    """``pixels`` as white ink on a black background, stretched to [0, 1]; and whether it was inverted.

    The border decides: a light border is paper, so the image is inverted.
    The border's median is then taken as the background and moved to 0, and
    the brightest ink to 1, so a gray photo of paper reads like a clean scan.
    """
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    inverted = bool(border.mean() > 0.5)
    if inverted:
        pixels, border = 1.0 - pixels, 1.0 - border
    background = float(np.median(border))
    top = float(pixels.max())
    if top - background < 1e-6:  # a blank image: nothing to stretch
        return np.zeros_like(pixels), inverted
    return np.clip((pixels - background) / (top - background), 0.0, 1.0).astype(np.float32), inverted


def crop_to_ink(pixels: np.ndarray, ink: float = INK) -> np.ndarray | None:
    """The smallest rectangle holding every pixel >= ``ink``; None when there is none."""
    rows, cols = np.flatnonzero((pixels >= ink).any(axis=1)), np.flatnonzero((pixels >= ink).any(axis=0))
    if rows.size == 0:
        return None
    return pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def fit_in_box(pixels: np.ndarray, box: int) -> np.ndarray:
    """Scale ``pixels`` so that its longer side is ``box``, keeping the aspect ratio (Lanczos, anti-aliased)."""
    from PIL import Image

    height, width = pixels.shape
    scale = box / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))  # PIL wants (width, height)
    resized = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F").resize(
        size, Image.Resampling.LANCZOS
    )
    return np.clip(np.asarray(resized), 0.0, 1.0)  # Lanczos rings slightly past the range


def centre_by_mass(pixels: np.ndarray, side: int) -> np.ndarray:
    """Place ``pixels`` in a ``side`` x ``side`` black field with its centre of mass at (side/2, side/2).

    The shift is rounded to whole pixels, as MNIST's was, and limited so that
    the whole patch stays inside the field.
    """
    height, width = pixels.shape
    mass = float(pixels.sum())
    cy = float(np.arange(height) @ pixels.sum(axis=1)) / mass if mass else (height - 1) / 2
    cx = float(np.arange(width) @ pixels.sum(axis=0)) / mass if mass else (width - 1) / 2
    top = min(max(round(side / 2 - cy), 0), side - height)
    left = min(max(round(side / 2 - cx), 0), side - width)
    field = np.zeros((side, side), np.float32)
    field[top : top + height, left : left + width] = pixels
    return field


def mnist_like(pixels: np.ndarray, side: int = 28) -> tuple[np.ndarray, bool]:
    """A 2-D grayscale image (any size, [0, 1]) as the network's input: ``side*side`` float32 values.

    Light/dark decision, crop to the ink, fit a ``round(side * 20/28)`` box
    keeping the aspect ratio, centre of mass at the centre. Returns the
    flattened field and whether the image was inverted (dark ink on paper).
    Raises ValueError when the image holds no ink.
    """
    pixels, inverted = white_on_black(np.asarray(pixels, dtype=np.float32))
    ink = crop_to_ink(pixels)
    if ink is None:
        raise ValueError("no digit found: the image is blank")
    box = max(1, round(side * BOX_SHARE))
    return centre_by_mass(fit_in_box(ink, box), side).reshape(side * side), inverted
