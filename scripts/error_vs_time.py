"""Test error against training time for finished runs: what each minute of training buys (README, "Results").

    python scripts/error_vs_time.py runs/check-accuracy/default runs/check-accuracy/best \\
        runs/check-accuracy/record --committee 0.0041 --out error-vs-time.png

Each run folder's ``metrics.json`` gives its test error after every epoch and
the seconds each epoch took (training steps plus, with ``--augment``, the
distortions), so each run is one curve, with a dot at the model it kept and
that model's error in the legend; ``--committee`` adds the committee's
error as one point at the summed time of its members (``--committee-seconds``,
else the record run's time times ``--members``). The test error of every
epoch is recorded by ``train`` but chose nothing: which epoch is kept is
chosen on the validation split.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def curve(folder: Path) -> tuple[np.ndarray, np.ndarray, int, float]:
    """Cumulative minutes and test error (%) after each epoch of the run in ``folder``; the kept epoch and its error.

    The kept model is the last epoch's, or with ``--keep-best`` the best validation epoch's (``final.epoch_kept``).
    """
    metrics = json.loads((folder / "metrics.json").read_text())
    epochs, final = metrics["epochs"], metrics.get("final") or {}
    seconds = np.cumsum([row["seconds"] + (row.get("augment_seconds") or 0.0) for row in epochs])
    kept = int(final.get("epoch_kept") or len(epochs))
    error = 100 * (1 - final.get("test_accuracy", epochs[-1]["test_accuracy"]))
    return seconds / 60, np.array([100 * (1 - row["test_accuracy"]) for row in epochs]), kept, error


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run folders (their names label the curves)")
    parser.add_argument("--committee", type=float, help="the committee's test error, as a fraction (0.0041)")
    parser.add_argument("--committee-seconds", type=float, help="its members' training seconds, summed")
    parser.add_argument("--out", default="error-vs-time.png", help="the picture (default: error-vs-time.png)")
    args = parser.parse_args()
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    total = 0.0
    for folder in args.runs:
        if not (folder / "metrics.json").is_file():
            print(f"{folder}: no metrics.json (not a run folder)", file=sys.stderr)
            return 1
        minutes, error, kept, kept_error = curve(folder)
        total += minutes[-1]
        (line,) = ax.plot(minutes, error, linewidth=1, alpha=0.8)
        took = f"{60 * minutes[-1]:.0f} s" if minutes[-1] < 1 else f"{minutes[-1]:.1f} min"
        label = f"{folder.name}: {kept_error:.2f}% (epoch {kept} kept, {took})"
        ax.scatter([minutes[kept - 1]], [kept_error], color=line.get_color(), zorder=3, label=label)
    if args.committee is not None:
        minutes = args.committee_seconds / 60 if args.committee_seconds else total
        ax.scatter([minutes], [100 * args.committee], marker="*", s=160, color="black", zorder=3,
                   label=f"committee: {100 * args.committee:.2f}% ({minutes:.0f} min of training, all members)")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain = matplotlib.ticker.FormatStrFormatter("%g")  # 0.5, 1, 2 rather than 5 x 10^-1
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("training time (minutes, 2-core CPU; log scale)")
    ax.set_ylabel("test error (%, log scale)")
    ax.set_title("MNIST test error against training time")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
