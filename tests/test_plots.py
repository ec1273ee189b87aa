"""Pictures: each function writes a readable PNG, and refuses input it cannot draw."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from backprop_xp import plots

ROWS = [
    {"epoch": e, "train_loss": 1 / e, "train_accuracy": 0.9 + e / 100, "test_loss": 1.2 / e,
     "test_accuracy": 0.88 + e / 100, "val_loss": 1.1 / e, "val_accuracy": 0.89 + e / 100, "seconds": 1.0}
    for e in (1, 2, 3)
]  # fmt: skip


def _png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_every_picture_is_a_png(tmp_path):
    rng = np.random.default_rng(0)
    plots.training_curves(ROWS, tmp_path / "curves.png", title="t")
    plots.confusion_plot(rng.integers(0, 50, (10, 10)), tmp_path / "confusion.png")
    images, labels = rng.random((30, 784)), rng.integers(0, 10, 30)
    proba = rng.dirichlet(np.ones(10), 30)
    plots.mistakes_grid(images, labels, proba, tmp_path / "mistakes.png", count=12)
    plots.weight_grid(rng.normal(size=(37, 784)), tmp_path / "weights.png")
    plots.sweep_plot([{"name": "a", "epochs": ROWS}, {"name": "b", "epochs": ROWS[:1]}], tmp_path / "sweep.png")
    for name in ("curves", "confusion", "mistakes", "weights", "sweep"):
        width, height = _png_size(tmp_path / f"{name}.png")
        assert width > 300 and height > 200, name


def test_a_model_without_mistakes_still_gets_a_picture(tmp_path):
    labels = np.arange(10)
    plots.mistakes_grid(np.zeros((10, 784)), labels, np.eye(10), tmp_path / "none.png")
    assert _png_size(tmp_path / "none.png")


def test_nothing_to_draw_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="at least one epoch"):
        plots.training_curves([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="at least one run"):
        plots.sweep_plot([{"name": "failed", "epochs": []}], tmp_path / "x.png")
    with pytest.raises(ValueError, match="square"):
        plots.weight_grid(np.zeros((3, 10)), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot functions make, kept open instead of written."""
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig))
    yield figures
    import matplotlib.pyplot as plt

    for fig in figures:
        plt.close(fig)


@pytest.mark.parametrize("n_epochs", [1, 2, 30])
def test_curves_have_whole_epoch_ticks_plain_numbers_and_mark_only_a_validation_best(n_epochs, drawn):
    rows = [{"epoch": e, "train_loss": 0.3 / e, "train_accuracy": 0.9, "test_loss": 0.32 / e ** 0.5,
             "test_accuracy": 0.95 - 0.001 * e, "val_loss": 0.31, "val_accuracy": 0.96 - 0.001 * e}
            for e in range(1, n_epochs + 1)]  # fmt: skip
    plots.training_curves(rows, "unused.png")
    fig = drawn[-1]
    fig.canvas.draw()
    for ax in fig.axes:
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() and 1 <= t <= n_epochs for t in ticks), ticks
        labels = [t.get_text() for t in ax.get_yticklabels() + ax.yaxis.get_minorticklabels()]
        assert not any("times" in label or "^" in label or "×" in label for label in labels), labels
    legend = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert any(text.startswith("best val 95.90% (epoch 1)") for text in legend), (
        legend
    )  # the first epoch, inside the axes
    plots.training_curves([{k: v for k, v in row.items() if not k.startswith("val")} for row in rows], "unused.png")
    legend = [t.get_text() for t in drawn[-1].axes[1].get_legend().get_texts()]
    assert not any("best" in text for text in legend)  # no "best test" epoch: that would be choosing on the test set


def test_digits_are_drawn_white_on_black_like_mnist(drawn):
    plots.digit_grid(np.eye(1, 784), ["one pixel"], "unused.png")
    image = drawn[-1].axes[0].get_images()[0]
    assert image.get_cmap().name == "gray" and image.get_clim() == (0, 1)  # 0 black, 1 white


def test_the_accuracy_title_names_the_model_kept(drawn):
    """With --keep-best the test accuracy is that of an earlier epoch's model; the title must say so."""
    plots.training_curves(ROWS, "unused.png")
    assert drawn[-1].axes[1].get_title() == "Accuracy (final test 91.00%)"  # the last row's
    plots.training_curves(ROWS, "unused.png", final={"epoch_kept": 2, "test_accuracy": 0.9})
    assert drawn[-1].axes[1].get_title() == "Accuracy (test 90.00% with the model of epoch 2)"
    plots.training_curves(ROWS, "unused.png", final={"epoch_kept": 3, "test_accuracy": 0.905})
    assert drawn[-1].axes[1].get_title() == "Accuracy (final test 90.50%)"  # the run's own final score


FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def test_the_confusion_matrix_names_its_classes_on_both_axes(drawn):
    plots.confusion_plot(np.eye(10, dtype=int) * 90 + 1, "unused.png", names=FASHION)
    ax = drawn[-1].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == FASHION
    assert [t.get_text() for t in ax.get_yticklabels()] == FASHION
    plots.confusion_plot(np.eye(10, dtype=int), "unused.png")  # no names: the class numbers
    assert [t.get_text() for t in drawn[-1].axes[0].get_xticklabels()] == [str(k) for k in range(10)]


def test_the_mistakes_are_titled_with_class_names(drawn):
    proba = np.full((2, 10), 0.01)
    proba[0, 6], proba[1, 0] = 0.91, 0.91  # a coat said shirt, a sandal said T-shirt/top
    plots.mistakes_grid(np.zeros((2, 784)), np.array([4, 5]), proba, "unused.png", names=FASHION)
    titles = [ax.get_title() for ax in drawn[-1].axes if ax.get_title()]
    assert titles == ["true Coat\nsaid Shirt\n(91%)", "true Sandal\nsaid T-shirt/top\n(91%)"]
    plots.mistakes_grid(np.zeros((2, 784)), np.array([4, 5]), proba, "unused.png")
    assert [ax.get_title() for ax in drawn[-1].axes if ax.get_title()] == [
        "true 4\nsaid 6 (91%)",
        "true 5\nsaid 0 (91%)",
    ]
