"""--preprocess deskew: straightens slanted digits, in training, evaluate and predict, and per committee member."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from backprop_xp import MLP
from backprop_xp.backend import to_numpy
from backprop_xp.cli import main
from backprop_xp.data.preprocess import deskew
from backprop_xp.training import SettingError, TrainConfig

TINY = ["--hidden", "16", "--train-size", "1000", "--epochs", "1", "--batch-size", "100", "--backend", "numpy"]


def _slant(images):
    """Each image's slant α = Σ I (x - x̄)(y - ȳ) / Σ I (y - ȳ)², from plain sums."""
    ys, xs = np.meshgrid(np.arange(28.0), np.arange(28.0), indexing="ij")
    slants = []
    for image in images.reshape(-1, 28, 28).astype(np.float64):
        m = image.sum()
        y_bar, x_bar = (image * ys).sum() / m, (image * xs).sum() / m
        slants.append((image * (xs - x_bar) * (ys - y_bar)).sum() / (image * (ys - y_bar) ** 2).sum())
    return np.array(slants)


def _shear(images, s):
    """Slant each image by ``s`` about its centre of mass's row (scipy's bilinear resampling: an independent oracle)."""
    ys, xs = np.meshgrid(np.arange(28.0), np.arange(28.0), indexing="ij")
    out = []
    for image in images.reshape(-1, 28, 28).astype(np.float64):
        y_bar = (image * ys).sum() / image.sum()
        coords = [ys, xs - s * (ys - y_bar)]
        out.append(ndimage.map_coordinates(image, coords, order=1, mode="grid-constant").reshape(784))
    return np.array(out, np.float32)


def test_deskew_straightens_digits(mnist):
    x = mnist[0][:50]
    assert np.abs(_slant(x)).mean() > 0.1  # MNIST's digits are slanted
    assert np.abs(_slant(deskew(x))).max() < 0.04  # and come out upright (bilinear blur leaves ~0.025)


@pytest.mark.parametrize("s", [0.4, -0.3])
def test_deskewing_a_sheared_digit_restores_it(mnist, s):
    upright = deskew(mnist[0][:50])
    sheared = _shear(upright, s)
    restored = deskew(sheared)
    assert np.abs(_slant(sheared) - s).max() < 0.04  # the shear is what slanted it
    before, after = np.abs(sheared - upright).mean(), np.abs(restored - upright).mean()
    assert after < 0.25 * before, (before, after)  # only the two resamplings' blur is left


def test_a_blank_image_stays_blank():
    np.testing.assert_array_equal(deskew(np.zeros((2, 784), np.float32)), np.zeros((2, 784), np.float32))


def test_an_unknown_preprocessing_is_refused():
    with pytest.raises(SettingError, match="preprocess"):
        TrainConfig(preprocess="unslant").validate()


@pytest.fixture(scope="module")
def runs(mnist_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("preprocess")
    for name, preprocess in (("deskewed", "deskew"), ("plain", "none")):
        argv = ["train", *TINY, "--preprocess", preprocess, "--data-dir", str(mnist_dir), "--quiet"]
        assert main([*argv, "--out", str(root / name)]) == 0
    return root / "deskewed", root / "plain"


def test_the_run_saves_its_preprocessing_and_tests_on_deskewed_images(runs, mnist):
    deskewed = runs[0]
    metrics = json.loads((deskewed / "metrics.json").read_text())
    assert metrics["config"]["preprocess"] == "deskew"
    saved = json.loads(str(np.load(deskewed / "model.npz")["train.config"]))
    assert saved["preprocess"] == "deskew"
    model = MLP.load(deskewed / "model.npz")
    right = int((to_numpy(model.predict(deskew(mnist[2]))) == mnist[3]).sum())
    assert metrics["final"]["test_accuracy"] == right / 10_000
    assert right != int((to_numpy(model.predict(mnist[2])) == mnist[3]).sum())  # the raw images read differently


def test_evaluate_and_predict_deskew_as_the_run_did(runs, mnist_dir, mnist, tmp_path, capsys):
    from PIL import Image

    from backprop_xp.data.images import mnist_like

    model = MLP.load(runs[0] / "model.npz")
    assert main(["evaluate", str(runs[0]), "--data-dir", str(mnist_dir), "--backend", "numpy"]) == 0
    right = int((to_numpy(model.predict(deskew(mnist[2]))) == mnist[3]).sum())
    out = capsys.readouterr().out
    assert out.startswith(f"model {runs[0] / 'model.npz'}: 784-16-10 relu, float32, preprocess deskew, on numpy")
    assert f"test accuracy {100 * right / 10_000:.2f}%  ({right} of 10000)" in out
    digit = mnist[2][1]
    image = tmp_path / "digit.png"
    Image.fromarray((digit.reshape(28, 28) * 255).round().astype(np.uint8)).save(image)
    assert main(["predict", str(runs[0]), str(image)]) == 0
    p = to_numpy(model.predict_proba(deskew(mnist_like(digit.reshape(28, 28))[0][None, :])))[0]
    top3 = np.argsort(-p, kind="stable")[:3]
    assert capsys.readouterr().out == f"{image}: " + ", ".join(f"{k} ({100 * p[k]:.1f}%)" for k in top3) + "\n"


def test_a_committee_member_reads_the_images_as_its_own_run_did(runs, mnist_dir, mnist, capsys):
    assert main(["evaluate", *map(str, runs), "--data-dir", str(mnist_dir), "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    p_deskewed = to_numpy(MLP.load(runs[0] / "model.npz").predict_proba(deskew(mnist[2]))).astype(np.float64)
    p_plain = to_numpy(MLP.load(runs[1] / "model.npz").predict_proba(mnist[2])).astype(np.float64)
    right = int((((p_deskewed + p_plain) / 2).argmax(axis=1) == mnist[3]).sum())
    line = next(line for line in out.splitlines() if line.startswith("committee ("))
    assert f"test accuracy {100 * right / 10_000:.2f}%  ({right} of 10000)" in line
