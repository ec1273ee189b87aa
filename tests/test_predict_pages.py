"""predict on pictures of a page, read by a model trained here on real MNIST: dirt, uneven light, a number."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_images import paper, unevenly_lit, with_speck

from backprop_xp import plots
from backprop_xp.backend import to_numpy
from backprop_xp.cli import main
from backprop_xp.model import MLP


@pytest.fixture(scope="module")
def model_dir(mnist_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict") / "run"
    argv = ["train", "--hidden", "64", "--train-size", "10000", "--epochs", "2", "--backend", "numpy"]
    assert main([*argv, "--data-dir", str(mnist_dir), "--out", str(out), "--quiet"]) == 0
    return out


def _readable(model_dir, mnist, count):
    """``count`` test digits this small model reads right at 28x28, with their labels."""
    x, y = mnist[2][:300], mnist[3][:300]
    right = np.flatnonzero(to_numpy(MLP.load(model_dir / "model.npz").predict(x)) == y)
    return x[right[:count]], y[right[:count]]


def _save(page: np.ndarray, path) -> str:
    Image.fromarray((page * 255).round().astype(np.uint8)).save(path)
    return str(path)


def _said(line: str) -> tuple[str, float]:
    """The class and probability of a one-digit line: "path: 7 (98.1%), 9 (1.2%), ..."."""
    first = line.split(": ", 1)[1].split(", ")[0]
    return first.split(" (")[0], float(first.split(" (")[1].rstrip("%)"))


def test_dirt_and_uneven_light_do_not_change_what_predict_reads_or_shows(
    model_dir, mnist, tmp_path, monkeypatch, capsys
):
    shown = []
    monkeypatch.setattr(plots, "digit_grid", lambda images, titles, path, **kw: shown.append((images, titles)))
    digits, labels = _readable(model_dir, mnist, 6)
    for i, (digit, label) in enumerate(zip(digits, labels)):
        clean, dirty, lit = (
            _save(page, tmp_path / f"{name}{i}.png")
            for name, page in (
                ("clean", paper([digit])), ("dirty", with_speck(paper([digit]))), ("lit", unevenly_lit(paper([digit]), i))
            )
        )  # fmt: skip
        assert main(["predict", str(model_dir), clean, dirty, lit, "--show", str(tmp_path / "seen.png")]) == 0
        lines = capsys.readouterr().out.splitlines()
        (k_clean, p_clean), (k_dirty, p_dirty), (k_lit, p_lit) = map(_said, lines[:3])
        assert k_clean == k_dirty == k_lit == str(label), lines  # the old code read the dirty page as a dot
        assert abs(p_dirty - p_clean) < 1 and abs(p_lit - p_clean) < 5, lines  # percentage points
        images, titles = shown[-1]
        assert len(images) == 3 and np.abs(images[1] - images[0]).max() < 0.02  # --show: the digit, not a dot
        assert titles[1].endswith(f"said {label} ({p_dirty:.0f}%)")


def test_digits_side_by_side_are_read_as_a_number(model_dir, mnist, tmp_path, capsys):
    digits, labels = _readable(model_dir, mnist, 6)
    for first, second in ((0, 1), (2, 3), (4, 5)):
        path = _save(paper([digits[first], digits[second]]), tmp_path / f"number{first}.png")
        assert main(["predict", str(model_dir / "model.npz"), path]) == 0
        line = capsys.readouterr().out.strip()
        number = f"{labels[first]}{labels[second]}"
        assert line.startswith(f"{path}: {number} (2 digits, left to right: {labels[first]} ("), line
    path = _save(unevenly_lit(paper(digits[:3])), tmp_path / "three.png")  # three, unevenly lit
    assert main(["predict", str(model_dir / "model.npz"), path]) == 0
    assert capsys.readouterr().out.startswith(f"{path}: {''.join(map(str, labels[:3]))} (3 digits, left to right: ")
