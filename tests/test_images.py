"""predict's preparation of a picture: MNIST's own steps (crop to ink, fit 20x20, centre of mass at the centre)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from backprop_xp.data.images import (
    centre_by_mass,
    crop_to_ink,
    fit_in_box,
    mnist_digits,
    mnist_like,
    otsu_threshold,
    read_gray,
)


def _dark_on_white(digit: np.ndarray, height: int, width: int) -> np.ndarray:
    """An MNIST digit drawn dark on white paper at ``height`` x ``width`` pixels (values in [0, 1])."""
    paper = Image.fromarray((255 * (1 - digit.reshape(28, 28))).round().astype(np.uint8))
    return np.asarray(paper.resize((width, height), Image.Resampling.BICUBIC), np.float32) / 255


def _page(digit):  # a "3" in the corner of an 800-px page
    page = np.ones((800, 800), np.float32)
    page[540:764, 30:254] = _dark_on_white(digit, 224, 224)
    return page


def _wide(digit):  # a 600x200 picture, the digit off to one side
    image = np.ones((200, 600), np.float32)
    image[10:190, 390:570] = _dark_on_white(digit, 180, 180)
    return image


def _tiny(digit):  # smaller than 28x28
    return _dark_on_white(digit, 20, 20)


def _off_centre(digit):  # white on black, in the corner of a larger field
    field = np.zeros((56, 56), np.float32)
    field[:28, 28:] = digit.reshape(28, 28)
    return field


@pytest.mark.parametrize("draw", [_page, _wide, _tiny, _off_centre], ids=["page", "wide", "tiny", "off-centre"])
def test_a_digit_drawn_anywhere_is_prepared_back_into_mnists_own_form(draw, mnist):
    digits = mnist[2][:50]  # test images: already cut, fitted to 20x20 and centred by MNIST's makers
    agreement = []
    for digit in digits:
        seen, _ = mnist_like(draw(digit))
        assert seen.shape == (784,) and seen.dtype == np.float32 and 0 <= seen.min() and seen.max() <= 1
        agreement.append(np.corrcoef(seen, digit)[0, 1])
    # Squashing the whole picture to 28x28 gives agreement near 0 here; MNIST's steps give back the digit.
    assert np.mean(agreement) > 0.9, np.round(agreement, 2)


def test_the_steps_one_by_one():
    ink = np.zeros((40, 30), np.float32)
    ink[5:25, 10:15] = 1.0  # a bar 20 tall and 5 wide
    cut = crop_to_ink(ink)
    assert cut.shape == (20, 5)
    fitted = fit_in_box(np.ones((10, 40), np.float32), 20)
    assert fitted.shape == (5, 20)  # the longer side fills the box, the aspect ratio is kept
    field = centre_by_mass(np.ones((4, 2), np.float32), 28)
    rows, cols = np.nonzero(field)
    assert abs(rows.mean() - 14) <= 0.5 and abs(cols.mean() - 14) <= 0.5  # MNIST's centre of mass: (14, 14)
    # mass on the right of the patch: the patch moves left so that the mass lands in the middle
    lopsided = np.zeros((12, 12), np.float32)
    lopsided[:, 9:] = 1
    placed = centre_by_mass(lopsided, 28)
    mass_col = (placed.sum(axis=0) @ np.arange(28)) / placed.sum()
    assert abs(mass_col - 14) <= 0.5


def test_light_paper_is_inverted_and_a_blank_image_is_refused():
    paper = np.ones((30, 30), np.float32)
    paper[10:20, 14:16] = 0.1  # dark ink on a light background
    seen, inverted = mnist_like(paper)
    assert inverted and seen.max() == pytest.approx(1.0, abs=0.05) and seen.reshape(28, 28)[0].max() == 0
    with pytest.raises(ValueError, match="no digit found"):
        mnist_like(np.full((28, 28), 0.8, np.float32))


@pytest.mark.parametrize("side", [12, 20], ids=["past-the-warning-limit", "past-the-error-limit"])
def test_an_image_past_pils_size_limit_is_refused_in_one_line(tmp_path, monkeypatch, side):
    # PIL warns past MAX_IMAGE_PIXELS and raises DecompressionBombError (not an OSError) past twice it;
    # a lowered limit makes a small file stand in for a 20000x20000 one.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    path = tmp_path / "huge.png"
    Image.new("L", (side, side), 255).save(path)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=r"huge.png: image too large .*PIL's limit of 100 pixels"):
            read_gray(path)
    assert not shown  # no Python warning printed to the user either
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10 * side * side)
    assert read_gray(path).shape == (side, side)  # the same file under the limit reads as before


def _ring() -> np.ndarray:
    """An anti-aliased ring (a "0") as 8-bit levels: white ink on black with every gray level in between."""
    y, x = np.mgrid[:28, :28]
    distance = np.abs(np.hypot(y - 13.5, x - 13.5) - 8)  # how far each pixel is from the stroke's middle
    return (255 * np.clip(2.5 - distance, 0, 1)).round().astype(np.uint8)


def _save_as(mode: str, ring: np.ndarray, path) -> None:
    """Save ``ring`` (8-bit levels) in a high-precision ``mode``, the same picture at that precision."""
    if mode == "F 0..1":
        Image.fromarray(ring.astype(np.float32) / 255).save(path)
    elif mode == "F 0..255":
        Image.fromarray(ring.astype(np.float32)).save(path)
    elif mode == "F large":  # e.g. raw sensor counts
        Image.fromarray(ring.astype(np.float32) * 1000).save(path)
    elif mode == "I;16":  # the usual 16-bit grayscale PNG
        Image.fromarray(ring.astype(np.uint16) * 257).save(path)
    elif mode == "I;16 transparent":  # black marked transparent: it becomes white paper, as in 8 bits
        Image.fromarray(ring.astype(np.uint16) * 257).save(path, transparency=0)
    elif mode == "I;16B":
        Image.frombytes("I;16B", (28, 28), (ring.astype(">u2") * 257).tobytes()).save(path)
    elif mode == "I 16-bit values":
        Image.fromarray(ring.astype(np.int32) * 257).save(path)
    elif mode == "I large":
        Image.fromarray(ring.astype(np.int32) * 100_000).save(path)


@pytest.mark.parametrize(
    "mode, suffix",
    [
        ("F 0..1", ".tif"),
        ("F 0..255", ".tif"),
        ("F large", ".tif"),
        ("I;16", ".png"),
        ("I;16 transparent", ".png"),
        ("I;16B", ".tif"),
        ("I 16-bit values", ".tif"),
        ("I large", ".tif"),
    ],
)
def test_a_high_precision_grayscale_image_reads_like_its_8_bit_version(tmp_path, mode, suffix):
    # convert("L") clips these modes at 255: a [0, 1] float digit became a solid square,
    # a 16-bit one hard black and white.
    ring = _ring()
    eight_bit, precise = tmp_path / "ring.png", tmp_path / f"precise{suffix}"
    Image.fromarray(ring).save(eight_bit, **({"transparency": 0} if "transparent" in mode else {}))
    _save_as(mode, ring, precise)
    expected = read_gray(eight_bit)
    got = read_gray(precise)
    assert got.dtype == np.float32 and got.shape == (28, 28)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1 / 255 / 2)
    assert len(np.unique(got)) == len(np.unique(expected)) >= 10  # every gray level of the anti-aliased edge


# --------------------------------------------------------------------------- photos and scans of a page


def paper(digits, *, height=600, width=900, size=200, gap=40, top=150, left=100) -> np.ndarray:
    """A page's reflectance: white paper (1) with ``digits`` (MNIST rows) in dark ink (0.1), side by side."""
    page = np.ones((height, width), np.float32)
    for i, digit in enumerate(digits):
        big = Image.fromarray(digit.reshape(28, 28).astype(np.float32), mode="F")
        ink = np.clip(np.asarray(big.resize((size, size), Image.Resampling.BICUBIC)), 0, 1)
        x0 = left + i * (size + gap)
        page[top : top + size, x0 : x0 + size] = 1 - 0.9 * ink
    return page


def with_speck(page: np.ndarray) -> np.ndarray:
    """The page with a speck of dirt (a dark dot, 14 pixels across) far from the ink."""
    y, x = np.mgrid[: page.shape[0], : page.shape[1]]
    return np.where(np.hypot(y - 520, x - 800) <= 7, np.float32(0.05), page)


def unevenly_lit(page: np.ndarray, seed: int = 0) -> np.ndarray:
    """The page photographed lit from the right: 4 times brighter there than at the left edge, and a little noise."""
    light = (
        np.linspace(0.25, 1.0, page.shape[1], dtype=np.float32)[None, :] * np.linspace(0.9, 1.0, page.shape[0])[:, None]
    )
    noise = np.random.default_rng(seed).normal(0, 0.01, page.shape)
    return np.clip(page * light + noise, 0, 1).astype(np.float32)


def test_a_speck_of_dirt_on_the_page_changes_nothing_the_network_sees(mnist):
    # The old preparation cut to the box of all the ink, digit and speck: the digit shrank to a dot.
    for digit in mnist[2][:20]:
        clean, _ = mnist_like(paper([digit]))
        dirty, inverted = mnist_like(with_speck(paper([digit])))
        assert inverted and np.corrcoef(clean, dirty)[0, 1] > 0.999
        assert np.abs(clean - dirty).max() < 0.02


def test_an_unevenly_lit_page_is_read_as_if_it_were_evenly_lit(mnist):
    # The old preparation took the border's median for the paper: the dark side of the page became ink.
    agreement = []
    for seed, digit in enumerate(mnist[2][:20]):
        clean, _ = mnist_like(paper([digit]))
        lit, inverted = mnist_like(unevenly_lit(paper([digit]), seed))
        assert inverted
        agreement.append(np.corrcoef(clean, lit)[0, 1])
    # a thin 1 may land one pixel over (its centre of mass rounds the other way): the same digit still
    assert np.mean(agreement) > 0.98 and min(agreement) > 0.9, np.round(agreement, 3)


def test_digits_side_by_side_are_found_left_to_right(mnist):
    digits = mnist[2][:12]
    alone = [mnist_like(paper([digit]))[0] for digit in digits]
    for first, second in zip(range(0, 12, 2), range(1, 12, 2)):
        found, _ = mnist_digits(paper([digits[first], digits[second]]))
        assert len(found) == 2
        assert np.corrcoef(found[0], alone[first])[0, 1] > 0.99 and np.corrcoef(found[1], alone[second])[0, 1] > 0.99
    with pytest.raises(ValueError, match="found 3 digits side by side"):
        mnist_like(paper(digits[:3]))


def test_otsus_threshold_splits_two_groups_between_them():
    values = np.concatenate([np.full(900, 0.1), np.full(100, 0.7)])
    assert 0.1 < otsu_threshold(values) <= 0.7
    noisy = np.clip(np.random.default_rng(0).normal(0.2, 0.03, 5000).tolist() + [0.9] * 200, 0, 1)
    assert 0.3 < otsu_threshold(noisy) < 0.8
