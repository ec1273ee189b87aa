"""--augment's distortion strengths as settings: 0 turns each off, the defaults are the strengths of before."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from scipy import ndimage

from backprop_xp.cli import main
from backprop_xp.data.augment import distort
from backprop_xp.training import SettingError, TrainConfig
from backprop_xp.training import run as run_module

OFF = {"max_shift": 0.0, "max_rotation": 0.0, "max_scale": 0.0, "alpha": 0.0}
# The strengths --augment used before they were settings: a default --augment run must keep them.
BEFORE = {"max_shift": 2.0, "max_rotation": 12.0, "max_scale": 0.12, "alpha": 30.0, "sigma": 4.5}


def _images(n=5, seed=0):
    return np.random.default_rng(seed).random((n, 784), dtype=np.float32)


def test_every_strength_at_zero_leaves_the_images_exactly_as_they_were():
    x = _images()
    np.testing.assert_array_equal(distort(x, np.random.default_rng(0), **OFF), x)


def test_a_shift_alone_is_a_bilinear_shift_by_the_drawn_amounts():
    """Rotation, scaling and the elastic field at 0 are off exactly: what is left is the shift (scipy as the oracle)."""
    x = _images()
    out = distort(x, np.random.default_rng(7), **{**OFF, "max_shift": 2.0})
    rng = np.random.default_rng(7)  # the draws distort makes, in its order: angles, scales, shifts
    rng.uniform(size=len(x)), rng.uniform(size=len(x))
    shift = rng.uniform(-2.0, 2.0, (2, len(x))).astype(np.float32)
    ys, xs = np.meshgrid(np.arange(28.0), np.arange(28.0), indexing="ij")
    for image, got, dy, dx in zip(x, out, shift[0], shift[1]):
        want = ndimage.map_coordinates(
            image.reshape(28, 28).astype(np.float64), [ys + dy, xs + dx], order=1, mode="grid-constant"
        )
        np.testing.assert_allclose(got.reshape(28, 28), np.clip(want, 0, 1), atol=2e-6)
    assert np.abs(out - x).max() > 0.1  # the shift did move the pictures


@pytest.mark.parametrize("which", ["max_shift", "max_rotation", "max_scale", "alpha"])
def test_each_strength_alone_changes_the_images(which):
    x = _images()
    out = distort(x, np.random.default_rng(0), **{**OFF, which: BEFORE[which]})
    assert np.abs(out - x).max() > 0.05


def test_with_alpha_zero_sigma_changes_nothing():
    x = _images()
    a, b = (distort(x, np.random.default_rng(3), alpha=0.0, sigma=s) for s in (1.0, 8.0))
    np.testing.assert_array_equal(a, b)
    c, d = (distort(x, np.random.default_rng(3), sigma=s) for s in (1.0, 8.0))
    assert not np.array_equal(c, d)  # with the elastic field on, sigma matters


def test_the_defaults_are_the_strengths_of_before():
    assert TrainConfig().distortions() == BEFORE
    signature = inspect.signature(distort).parameters
    assert {name: signature[name].default for name in BEFORE} == BEFORE


def test_train_hands_its_settings_to_distort(mnist_dir, tmp_path, monkeypatch):
    """The run distorts with the settings it was given: the defaults, or the flags."""
    seen = []

    def spy(images, rng, **kwargs):
        seen.append({k: v for k, v in kwargs.items() if k != "out"})
        return distort(images, rng, **kwargs)

    monkeypatch.setattr(run_module, "distort", spy)
    quick = ["train", "--hidden", "8", "--train-size", "200", "--epochs", "1", "--batch-size", "100", "--augment"]
    quick += ["--backend", "numpy", "--data-dir", str(mnist_dir), "--quiet"]
    assert main([*quick, "--out", str(tmp_path / "a")]) == 0
    flags = ["--augment-shift", "1", "--augment-rotation", "0", "--augment-scale", "0.05"]
    flags += ["--elastic-alpha", "8", "--elastic-sigma", "3"]
    assert main([*quick, *flags, "--out", str(tmp_path / "b")]) == 0
    assert seen == [BEFORE, {"max_shift": 1.0, "max_rotation": 0.0, "max_scale": 0.05, "alpha": 8.0, "sigma": 3.0}]


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"elastic_sigma": 0.0}, "elastic-sigma must be a finite number > 0"),
        ({"augment_rotation": 181.0}, "augment-rotation must be a number of degrees from 0 to 180"),
        ({"augment_scale": 1.0}, "augment-scale must be in [0, 1)"),
        ({"augment_shift": -1.0}, "augment-shift must be a finite number >= 0"),
    ],
)
def test_impossible_strengths_are_refused(setting, message):
    with pytest.raises(SettingError, match=message.replace("[", r"\[").replace(")", r"\)")):
        TrainConfig(augment=True, **setting).validate()


def test_a_strength_without_augment_is_refused(capsys):
    with pytest.raises(SettingError, match="--elastic-alpha sets a distortion: it needs --augment"):
        TrainConfig(elastic_alpha=10.0).validate()
    TrainConfig(augment=True, elastic_alpha=10.0).validate()
