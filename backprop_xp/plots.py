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
    cmap: str = "gray",  # white on black, as MNIST stores its digits and as the network sees them
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
    row_height = 1.2 + 0.15 * max((str(t).count("\n") + 1 for t in titles), default=0)
    height = row_height * rows + (0.5 if suptitle else 0)
    fig, axes = plt.subplots(rows, columns, figsize=(1.2 * columns, height), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        image = images[i].reshape(side, side)
        if symmetric:
            limit = float(np.abs(image).max()) or 1.0
            ax.imshow(image, cmap=cmap, vmin=-limit, vmax=limit)
        else:
            ax.imshow(image, cmap=cmap, vmin=0, vmax=1)  # a faint digit stays faint: no per-image stretching
        if i < len(titles):
            ax.set_title(titles[i], fontsize=8)
    if suptitle:  # a fixed gap in inches above the grid, whatever the number of rows
        fig.subplots_adjust(top=1 - 0.5 / height)
        fig.suptitle(suptitle, y=1 - 0.1 / height, va="top")
    save_figure(fig, path)


def _epoch_axis(ax, epochs: Sequence[int]) -> None:
    """Whole-number epoch ticks, with half an epoch of room at each end (one epoch is not 0.96 to 1.04)."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def _plain_numbers(axis) -> None:
    """Tick labels as plain numbers (0.3, not 3.2x10^-1); between decades only at 2 and 5."""
    from matplotlib.ticker import FuncFormatter

    def one_two_five(value: float, _: int) -> str:  # label 0.2 and 0.5 between decades, not every 0.1
        mantissa = value / 10 ** math.floor(math.log10(value)) if value > 0 else 0
        return f"{value:g}" if round(mantissa, 6) in (1, 2, 5) else ""

    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(FuncFormatter(one_two_five))


def training_curves(
    rows: Sequence[dict], path: str | os.PathLike, *, title: str | None = None, final: dict | None = None
) -> None:
    """Loss and accuracy against epoch, train and test (and validation if present), side by side.

    ``rows`` are the ``epochs`` of a run's ``metrics.json``. The best epoch is
    marked on the validation curve only: picking an epoch by test accuracy
    would be choosing on the test set. ``final`` (the run's ``final`` entry)
    puts the test accuracy of the model kept in the title; with ``--keep-best``
    that is an earlier epoch's model, not the last epoch's.
    """
    plt = _pyplot()
    if not rows:
        raise ValueError("training_curves needs at least one epoch")
    epochs = [row["epoch"] for row in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    styles = {
        "train": dict(color="tab:blue"),
        "val": dict(color="tab:green", ls=":"),
        "test": dict(color="tab:orange", ls="--"),
    }
    losses = []
    for split, style in styles.items():
        if f"{split}_loss" not in rows[0]:
            continue
        marker = "o" if len(rows) <= 30 else None
        losses += [row[f"{split}_loss"] for row in rows]
        ax_loss.plot(epochs, [row[f"{split}_loss"] for row in rows], marker=marker, ms=3, label=split, **style)
        ax_acc.plot(epochs, [100 * row[f"{split}_accuracy"] for row in rows], marker=marker, ms=3, label=split, **style)
    if max(losses) > 20 * min(losses):  # a log scale only where the loss spans decades
        ax_loss.set_yscale("log")
        _plain_numbers(ax_loss.yaxis)
        ax_loss.set(ylabel="cross-entropy loss (log scale)")
    else:
        ax_loss.set(ylabel="cross-entropy loss")
    ax_loss.set(xlabel="epoch", title="Loss")
    kept = (final or {}).get("epoch_kept", rows[-1]["epoch"])
    if final is not None and kept != rows[-1]["epoch"]:
        accuracy_title = f"Accuracy (test {100 * final['test_accuracy']:.2f}% with the model of epoch {kept})"
    else:
        test = final["test_accuracy"] if final is not None else rows[-1]["test_accuracy"]
        accuracy_title = f"Accuracy (final test {100 * test:.2f}%)"
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title=accuracy_title)
    if "val_accuracy" in rows[0]:  # the best epoch as a legend entry: the legend finds a free corner
        best = max(rows, key=lambda row: (row["val_accuracy"], -row["epoch"]))
        ax_acc.plot(
            best["epoch"], 100 * best["val_accuracy"], "o", ms=9, mfc="none", mec="tab:green",
            label=f"best val {100 * best['val_accuracy']:.2f}% (epoch {best['epoch']})",
        )  # fmt: skip
    for ax in (ax_loss, ax_acc):
        ax.grid(True, alpha=0.3)
        ax.legend()
        _epoch_axis(ax, epochs)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def confusion_plot(
    counts: np.ndarray,
    path: str | os.PathLike,
    *,
    title: str = "Confusion matrix",
    names: Sequence[str] | None = None,
) -> None:
    """A confusion matrix ``counts[true, predicted]`` with every count written in its cell.

    Colours show the share of each true class (row), so a rare class's mistakes
    are as visible as a frequent one's; the diagonal is drawn in its own colour
    map so that the mistakes are not washed out by it. ``names`` label the
    classes on both axes (the numbers when None).
    """
    plt = _pyplot()
    counts = np.asarray(counts)
    k = counts.shape[0]
    share = 100 * counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    off = np.where(np.eye(k, dtype=bool), np.nan, share)
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    image = ax.imshow(off, cmap="Reds", vmin=0, vmax=max(float(np.nanmax(off)) if k > 1 else 0, 1e-9))
    ax.imshow(np.where(np.eye(k, dtype=bool), share, np.nan), cmap="Blues", vmin=0, vmax=100)
    for i in range(k):
        for j in range(k):
            if counts[i, j] or i == j:
                dark = (i == j and share[i, j] > 50) or (i != j and off[i, j] > 0.6 * np.nanmax(off))
                ax.text(
                    j, i, str(counts[i, j]), ha="center", va="center", fontsize=7, color="white" if dark else "black"
                )
    names = [str(name) for name in names] if names is not None else [str(c) for c in range(k)]
    ax.set(xticks=range(k), yticks=range(k), xlabel="predicted class", ylabel="true class", title=title)
    long = max(len(name) for name in names) > 2  # words on the x axis are slanted so that they do not overlap
    ax.set_xticklabels(names, rotation=45 if long else 0, ha="right" if long else "center")
    ax.set_yticklabels(names)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="% of the true class (mistakes, off the diagonal)")
    save_figure(fig, path)


def said(name: str, probability: float) -> str:
    r"""A picture's title for a prediction: "said 7 (98%)"; a long class name puts the probability on its own line.

    >>> said("7", 0.981), said("Ankle boot", 0.5)
    ('said 7 (98%)', 'said Ankle boot\n(50%)')
    """
    return f"said {name}" + (" " if len(name) <= 4 else "\n") + f"({100 * probability:.0f}%)"


def mistakes_grid(
    images: np.ndarray,
    labels: np.ndarray,
    proba: np.ndarray,
    path: str | os.PathLike,
    *,
    count: int = 40,
    names: Sequence[str] | None = None,
) -> None:
    """The ``count`` most confident mistakes: images whose wrong prediction had the highest probability.

    Each is titled with its true class and the prediction, by ``names`` (the numbers when None).
    """
    names = [str(name) for name in names] if names is not None else [str(c) for c in range(proba.shape[1])]
    predicted = proba.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    if wrong.size == 0:  # a perfect model still gets a picture, saying so
        digit_grid(images[:1], ["no mistakes"], path, suptitle="No misclassified test images")
        return
    worst = wrong[np.argsort(-proba[wrong, predicted[wrong]], kind="stable")][:count]
    titles = [f"true {names[labels[i]]}\n" + said(names[predicted[i]], proba[i, predicted[i]]) for i in worst]
    digit_grid(
        images[worst], titles, path,
        suptitle=f"The {len(worst)} most confident of {wrong.size} test mistakes (true label, prediction, its probability)",
    )  # fmt: skip


def weight_grid(w1: np.ndarray, path: str | os.PathLike, *, count: int = 100, columns: int = 10) -> None:
    """The first ``count`` rows of ``W1`` drawn as 28x28 pictures (red positive, blue negative).

    The tiles are laid into one mosaic image (one ``imshow``, fast for
    hundreds of units), each scaled by its own largest absolute weight so that
    every unit's pattern is visible whatever its overall size.
    """
    plt = _pyplot()
    w1 = np.asarray(w1, dtype=np.float64)
    shown = w1[:count]
    n = shown.shape[0]
    side = math.isqrt(shown.shape[1])
    if n == 0 or side * side != shown.shape[1]:
        raise ValueError(f"weight_grid needs rows of a square number of values, got shape {w1.shape}")
    columns = min(columns, n)
    rows = -(-n // columns)
    gap = 2
    mosaic = np.full((rows * (side + gap) - gap, columns * (side + gap) - gap), np.nan)
    for i, w in enumerate(shown):
        r, c = divmod(i, columns)
        limit = float(np.abs(w).max()) or 1.0
        mosaic[r * (side + gap) : r * (side + gap) + side, c * (side + gap) : c * (side + gap) + side] = (
            w.reshape(side, side) / limit
        )
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="white")  # the gaps between tiles
    fig, ax = plt.subplots(figsize=(1.0 * columns, 1.0 * rows + 0.5))
    ax.imshow(mosaic, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    ax.axis("off")
    ax.set_title(
        f"Input weights of hidden units 0-{n - 1} of {len(w1)}, row by row\n"
        "(each unit scaled to its own largest weight; red > 0, blue < 0)"
    )
    save_figure(fig, path)


def _sweep_zoom(finals: Sequence[float]) -> tuple[float, float]:
    """The accuracy axis of sweep.png (%): every run's final accuracy on it, except runs that failed to learn.

    Zoomed on the final accuracies, which the table ranks (earlier epochs may
    start below); a run more than 30 points below the best one learned
    nothing worth comparing and would squash the others into a line, so it is
    left below (and marked there).

    >>> _sweep_zoom([98.0, 93.0, 91.0])  # every run shown, however far apart (5 points was the limit)
    (90.5, 98.5)
    >>> _sweep_zoom([98.0, 97.5, 11.3])  # the run at chance is left below the chart
    (97.0, 98.5)
    """
    best = max(finals)
    learned = [final for final in finals if final >= best - 30.0]
    return min(learned) - 0.5, min(100.0, best + 0.5)


def sweep_plot(runs: Sequence[dict], path: str | os.PathLike, *, title: str = "Sweep") -> None:
    """Validation accuracy (test accuracy for runs without validation) against epoch and training time.

    ``runs`` are dicts with ``name`` and ``epochs`` (a run's metrics rows).
    The runs are compared on the validation set they share, as they are ranked.
    """
    plt = _pyplot()
    runs = [run for run in runs if run.get("epochs")]
    if not runs:
        raise ValueError("sweep_plot needs at least one run with a finished epoch")
    split = "val" if all("val_accuracy" in run["epochs"][0] for run in runs) else "test"
    key, words = f"{split}_accuracy", {"val": "validation accuracy", "test": "test accuracy"}[split]
    fig, (ax_epoch, ax_time) = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    colors = plt.get_cmap("tab10").colors
    # Ten distinct colours, then the same ten dashed, then dotted...: best runs first.
    styles = [(colors[k % 10], ("-", "--", ":", "-.")[(k // 10) % 4]) for k in range(len(runs))]
    ranked = sorted(runs, key=lambda run: -run["epochs"][-1][key])
    finals = [100 * run["epochs"][-1][key] for run in ranked]
    low, top = _sweep_zoom(finals)
    for (color, ls), run, final in zip(styles, ranked, finals):
        rows = run["epochs"]
        acc = [100 * row[key] for row in rows]
        elapsed = np.cumsum([row["seconds"] for row in rows])
        style = dict(marker="o", ms=3, color=color, ls=ls)
        below = " below the chart" if final < low else ""
        ax_epoch.plot([row["epoch"] for row in rows], acc, label=f"{run['name']} ({final:.2f}%{below})", **style)
        ax_time.plot(elapsed, acc, **style)
        if below:  # a run that failed to learn: a mark at the chart's foot, at its last epoch, rather than nothing
            ax_epoch.plot([rows[-1]["epoch"]], [low], marker="v", ms=8, color=color, clip_on=False, ls="")
            ax_time.plot([elapsed[-1]], [low], marker="v", ms=8, color=color, clip_on=False, ls="")
    ax_epoch.set_ylim(low, top)
    n_below = sum(final < low for final in finals)
    cut = f" ({n_below} below {low:.1f}%, marked \u25bc)" if n_below else ""
    ax_epoch.set(xlabel="epoch", ylabel=f"{words} (%)", title=f"{words.capitalize()} by epoch" + cut)
    ax_time.set(xlabel="training time (s, evaluation excluded)", title=f"{words.capitalize()} against training time")
    ax_time.set_xscale("log")
    from matplotlib.ticker import LogLocator, ScalarFormatter

    ax_time.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax_time.xaxis.set_major_formatter(ScalarFormatter())
    ax_time.xaxis.set_minor_formatter(plt.NullFormatter())
    for ax in (ax_epoch, ax_time):
        ax.grid(True, alpha=0.3)
    _epoch_axis(ax_epoch, [row["epoch"] for run in runs for row in run["epochs"]])
    fig.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, title=f"run (final {words})")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
