"""Fashion-MNIST's classes by name wherever a class is shown: show-data, the run's pictures, evaluate, predict."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backprop_xp import plots
from backprop_xp.cli import main
from backprop_xp.data import load_dataset
from backprop_xp.data.datasets import CLASS_NAMES, class_names, classes_of

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist; .ci/run installs it
NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@pytest.fixture(scope="module")
def fashion_dir() -> Path:
    if not FASHION_DIR.is_dir():
        if os.environ.get("BACKPROP_XP_REQUIRE_DATA", "") not in ("", "0"):
            pytest.fail(f"Fashion-MNIST not in {FASHION_DIR}, but BACKPROP_XP_REQUIRE_DATA is set")
        pytest.skip(f"Fashion-MNIST not in {FASHION_DIR} (apt-get install dataset-fashion-mnist)")
    return FASHION_DIR


def test_one_table_of_class_names_per_data_set():
    assert class_names("fashion-mnist") == NAMES == list(CLASS_NAMES["fashion-mnist"])
    assert class_names("mnist") == [str(k) for k in range(10)]
    assert class_names("fashion-mnist", 3) == ["0", "1", "2"]  # a table that does not fit: numbers, not wrong names
    assert classes_of({"dataset": "fashion-mnist"}, 10) == NAMES
    assert classes_of({"dataset": "mnist", "classes": list("abcdefghij")}, 10) == list("abcdefghij")


@pytest.fixture
def drawn(monkeypatch):
    """The titles of every digit grid and every figure drawn, kept instead of written."""
    grids, figures = [], []
    monkeypatch.setattr(plots, "digit_grid", lambda images, titles, path, **kw: grids.append(list(titles)))

    def keep(fig, path):
        figures.append([(ax.get_xlabel(), [t.get_text() for t in ax.get_xticklabels()]) for ax in fig.axes])
        import matplotlib.pyplot as plt

        plt.close(fig)

    monkeypatch.setattr(plots, "save_figure", keep)
    return grids, figures


def test_fashion_classes_are_named_everywhere_a_class_is_shown(fashion_dir, drawn, tmp_path, capsys):
    grids, figures = drawn
    data = ["--dataset", "fashion-mnist", "--data-dir", str(fashion_dir)]
    # show-data: the counts and the pictures' titles
    assert main(["show-data", *data, "--count", "12", "--out", str(tmp_path / "show.png")]) == 0
    out = capsys.readouterr().out
    assert "per class: T-shirt/top 6000, Trouser 6000, " in out and "Ankle boot 1000\n" in out
    _, y_train, x_test, y_test = load_dataset("fashion-mnist", fashion_dir)
    assert grids[-1] == [NAMES[y] for y in y_train[:12]]
    # train: misclassified.png's titles and confusion.png's axes
    run = tmp_path / "run"
    argv = ["train", *data, "--hidden", "16", "--train-size", "2000", "--epochs", "1", "--backend", "numpy"]
    assert main([*argv, "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    mistakes = grids[-1]
    assert all(t.startswith("true ") and t.split("\n")[0][5:] in NAMES for t in mistakes), mistakes
    assert all(t.split("\n")[1].split(" (")[0][5:] in NAMES for t in mistakes), mistakes  # "said Shirt (91%)"
    confusion = [axes for axes in figures if axes[0][0] == "predicted class"][-1]
    assert confusion[0][1] == NAMES
    # evaluate: per-class accuracy and the confusion matrix's rows
    assert main(["evaluate", str(run), "--data-dir", str(fashion_dir), "--backend", "numpy"]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("per-class accuracy (%):") + 1
    per_class = lines[start : lines.index("", start)]
    assert [line[2:].rsplit(" ", 1)[0].strip() for line in per_class] == NAMES, per_class
    rows = [line[2:].split("  ")[0].strip() for line in lines if line[2:3].isdigit()]
    assert rows == [f"{k} {name}" for k, name in enumerate(NAMES)], lines
    # predict: the classes by name
    path = tmp_path / "item.png"
    Image.fromarray((x_test[0].reshape(28, 28) * 255).round().astype(np.uint8)).save(path)
    assert main(["predict", str(run), str(path)]) == 0
    guesses = capsys.readouterr().out.split(": ", 1)[1].split(", ")
    assert len(guesses) == 3 and all(g.rsplit(" (", 1)[0] in NAMES for g in guesses), guesses
