"""A picture of a digit made into what the network was trained on, the way MNIST itself was made.

MNIST's digits were cut to the ink, scaled to fit a 20x20 box keeping their
aspect ratio (anti-aliased to gray levels), and placed in a 28x28 field so that
their centre of mass is at its centre (pixel 14, 14), white ink on black. A
photo or a scan has to go through the same steps: squashing a whole page to
28x28 shows the network a speck it has never seen. Before them, a page is
cleaned as a person reads it: the paper's uneven lighting taken away
(``white_on_black``), the ink told from the paper by Otsu's threshold, specks
of dirt left out and the digits found, left to right (``find_digits``). For
other square input sizes everything scales (the box is 20/28 of the side).
"""

from __future__ import annotations

import os
import warnings

import numpy as np

INK = 0.25  # a pixel at least this far from the background (0 to 1) is ink, for the bounding box
BOX_SHARE = 20 / 28  # MNIST: a 20x20 box in a 28x28 field
MIN_CONTRAST = 0.1  # ink this much darker than the paper (or lighter than the background), at least, else blank
SPECK_SHARE = 0.3  # strokes smaller than this share of the main stroke's height are specks of dirt
DIGIT_SHARE = 0.5  # strokes at least this share of its height tall can be digits of their own; shorter ones join one
FIT_SIDE = 96  # the background surface is fitted to a copy at most this many pixels across
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
    """The ink of ``pixels`` as white on black, the background and its uneven lighting taken away; and whether it was inverted.

    The border decides: a light border is paper (dark ink), so the image is
    inverted. The background is a smooth surface fitted to the pixels that are
    not ink (``background_surface``), so a page lit more on one side than the
    other has no gradient left to be taken for ink. On paper, what a camera sees
    is lighting times reflectance, so the ink is ``1 - pixels / paper`` (a
    stroke in the shade is as dark as one in the light); on a dark background,
    light ink adds to it: ``pixels - background``. Values in [0, 1], not stretched.
    """
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    inverted = bool(border.mean() > 0.5)
    if inverted:
        paper = np.maximum(background_surface(pixels, ink_is_dark=True), 1e-3)
        ink = 1.0 - pixels / paper
    else:
        ink = pixels - background_surface(pixels, ink_is_dark=False)
    return np.clip(ink, 0.0, 1.0).astype(np.float32), inverted


def background_surface(pixels: np.ndarray, *, ink_is_dark: bool, rounds: int = 10) -> np.ndarray:
    """The background of ``pixels`` as a quadratic surface fitted to the pixels that are not ink.

    Lighting changes slowly across a page, so a surface ``a + bu + cv + du² +
    euv + fv²`` describes it whatever the digit's size (a window-based filter
    would need to know the stroke width, and guesses wrong at the edges).
    Least squares on a copy at most ``FIT_SIDE`` pixels across, first on the
    half of the pixels on the background's side of their median, then again
    without the pixels further on the ink's side of the surface than three
    robust standard deviations of the rest (and 0.02), until that set settles.
    """
    from PIL import Image

    height, width = pixels.shape
    scale = min(1.0, FIT_SIDE / max(height, width))
    small = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F")
    small = np.asarray(
        small.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BOX)
    )
    terms = _quadratic_terms(*small.shape)
    values = small.reshape(-1).astype(np.float64)
    # Start from the half of the pixels on the background's side of the median: a digit covers less than
    # half of any picture of it, so the first fit already sees (nearly) no ink.
    middle = np.median(values)
    keep = values >= middle if ink_is_dark else values <= middle
    coef = np.zeros(terms.shape[1])
    coef[0] = middle  # a flat background, should too few pixels remain for a fit
    for _ in range(rounds):
        if keep.sum() <= terms.shape[1]:
            break
        coef = np.linalg.lstsq(terms[keep], values[keep], rcond=None)[0]
        towards_ink = (terms @ coef - values) if ink_is_dark else (values - terms @ coef)
        spread = 1.4826 * np.median(np.abs(towards_ink[keep] - np.median(towards_ink[keep])))
        new_keep = towards_ink < max(3 * spread, 0.02)
        if np.array_equal(new_keep, keep):
            break
        keep = new_keep
    # the surface at full size, term by term: a table of 6 columns per pixel would take 48 bytes a pixel
    v, u = np.linspace(-1, 1, height)[:, None], np.linspace(-1, 1, width)[None, :]
    surface = coef[0] + coef[1] * u + coef[2] * v + coef[3] * u * u + coef[4] * u * v + coef[5] * v * v
    return surface.astype(np.float32)


def _quadratic_terms(height: int, width: int) -> np.ndarray:
    """The columns 1, u, v, u², uv, v² for every pixel (row by row), u and v running from -1 to 1 across the image."""
    v, u = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
    u, v = u.reshape(-1), v.reshape(-1)
    return np.stack([np.ones_like(u), u, v, u * u, u * v, v * v], axis=1)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` in [0, 1]: the cut that best splits them into two groups.

    It maximises the between-group variance ``w0 w1 (m0 - m1)²`` over the
    histogram's bin edges (w: each group's share, m: its mean).
    """
    counts, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(counts)[:-1].astype(np.float64)
    w1 = counts.sum() - w0
    sum0 = np.cumsum(counts * centres)[:-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = w0 * w1 * (sum0 / w0 - (float(counts @ centres) - sum0) / w1) ** 2
    return float(edges[1 + int(np.nanargmax(np.where(w0 * w1 > 0, between, np.nan)))])


def find_digits(ink: np.ndarray) -> list[np.ndarray]:
    """The digits in ``ink`` (white on black, background removed), left to right, each cut out alone.

    Otsu's threshold separates ink from background; pixels above half of it
    join the strokes they touch (hysteresis, so that a faint stretch of a
    stroke does not split a digit). Connected strokes (``scipy.ndimage.label``,
    diagonal neighbours included) smaller than ``SPECK_SHARE`` of the main
    stroke's height (the one with the most ink) are specks of dirt and dropped;
    the rest are grouped into digits by ``_side_by_side``. Each digit is its
    strokes' ink (with a margin for anti-aliasing) in their box, nothing else,
    stretched so that its darkest ink (not a lone pixel of noise) is 1.
    """
    from scipy import ndimage

    threshold = otsu_threshold(ink)
    labels, _ = ndimage.label(ink > threshold / 2, structure=np.ones((3, 3)))
    strong = [int(k) for k in np.unique(labels[ink > threshold]) if k > 0]
    if not strong:
        return []
    found = ndimage.find_objects(labels)
    boxes = {k: found[k - 1] for k in strong}
    mass = dict(zip(strong, ndimage.sum_labels(ink, labels, strong)))
    main = boxes[max(strong, key=lambda k: mass[k])]
    height = main[0].stop - main[0].start
    kept = [k for k in strong if max(_extent(boxes[k][0]), _extent(boxes[k][1])) >= SPECK_SHARE * height]
    margin = max(1, round(height / 28))  # about one MNIST pixel at this picture's scale
    digits = []
    for group in _side_by_side(kept, boxes, height):
        rows = slice(
            max(min(boxes[k][0].start for k in group) - margin, 0), max(boxes[k][0].stop for k in group) + margin
        )
        cols = slice(
            max(min(boxes[k][1].start for k in group) - margin, 0), max(boxes[k][1].stop for k in group) + margin
        )
        strokes = np.isin(labels[rows, cols], group)
        # its ink is 1 where it is darkest: the 99th percentile of its strokes, not a single pixel of noise
        top = float(np.percentile(ink[rows, cols][strokes], 99))
        mine = ndimage.binary_dilation(strokes, iterations=margin)
        digits.append(np.clip(np.where(mine, ink[rows, cols] / top, 0.0), 0.0, 1.0).astype(np.float32))
    return digits


def _extent(span: slice) -> int:
    return span.stop - span.start


def _side_by_side(kept: list[int], boxes: dict, height: int) -> list[list[int]]:
    """``kept`` strokes grouped into digits, left to right.

    A stroke at least ``DIGIT_SHARE`` of the main stroke's ``height`` tall
    starts a digit unless it shares most of its columns with the digit on its
    left (a 4 written in two strokes); a shorter one (a 5's loose bar, a 7's
    crossbar) is no digit alone: it joins the digit nearest it, left or right.
    """
    tall = sorted((k for k in kept if _extent(boxes[k][0]) >= DIGIT_SHARE * height), key=lambda k: boxes[k][1].start)
    groups: list[list[int]] = []
    for k in tall:
        if groups and _shared(boxes, groups[-1], [k]) >= 0.5 * min(_width(boxes, groups[-1]), _width(boxes, [k])):
            groups[-1].append(k)
        else:
            groups.append([k])
    for k in kept:
        if k not in tall:
            min(groups, key=lambda group: -_shared(boxes, group, [k])).append(k)
    return groups


def _columns(boxes: dict, group: list[int]) -> tuple[int, int]:
    return min(boxes[k][1].start for k in group), max(boxes[k][1].stop for k in group)


def _width(boxes: dict, group: list[int]) -> int:
    left, right = _columns(boxes, group)
    return right - left


def _shared(boxes: dict, a: list[int], b: list[int]) -> int:
    """How many columns groups ``a`` and ``b`` share; negative: the gap between them."""
    (a_left, a_right), (b_left, b_right) = _columns(boxes, a), _columns(boxes, b)
    return min(a_right, b_right) - max(a_left, b_left)


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


def mnist_digits(pixels: np.ndarray, side: int = 28) -> tuple[list[np.ndarray], bool]:
    """Every digit of a 2-D grayscale image (any size, [0, 1]), left to right, as the network's input.

    Background and lighting removed (``white_on_black``), the digits found
    (``find_digits``), each cut to its ink, fitted in a ``round(side * 20/28)`` box keeping the aspect ratio and
    placed with its centre of mass at the centre: ``side*side`` float32 values
    each. Also returns whether the image was inverted (dark ink on paper).
    Raises ValueError when the image holds no ink.
    """
    ink, inverted = white_on_black(np.asarray(pixels, dtype=np.float32))
    if float(ink.max()) < MIN_CONTRAST:
        raise ValueError("no digit found: the image is blank")
    box = max(1, round(side * BOX_SHARE))
    fields = []
    for digit in find_digits(ink):
        cut = crop_to_ink(digit)
        fields.append(centre_by_mass(fit_in_box(cut, box), side).reshape(side * side))
    if not fields:
        raise ValueError("no digit found: the image is blank")
    return fields, inverted


def mnist_like(pixels: np.ndarray, side: int = 28) -> tuple[np.ndarray, bool]:
    """The one digit of a 2-D grayscale image as the network's input (see ``mnist_digits``); and whether it was inverted.

    Raises ValueError when the image holds no ink, or several digits side by side.
    """
    fields, inverted = mnist_digits(pixels, side)
    if len(fields) > 1:
        raise ValueError(f"found {len(fields)} digits side by side, not one (mnist_digits reads each)")
    return fields[0], inverted
