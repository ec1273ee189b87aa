"""Committees: the mean of the members' class probabilities, in the library, evaluate and predict."""

from __future__ import annotations

import csv
import glob
import json
import os
from pathlib import Path

import numpy as np
import pytest

from backprop_xp import MLP
from backprop_xp.backend import to_numpy
from backprop_xp.cli import main
from backprop_xp.committee import Committee

TINY = ["--hidden", "16", "--train-size", "1000", "--epochs", "1", "--batch-size", "100", "--backend", "numpy"]


@pytest.fixture(scope="module")
def members(mnist_dir, tmp_path_factory):
    """Three tiny runs on real MNIST that differ in their seed (and one in its hidden size: members may)."""
    root = tmp_path_factory.mktemp("committee")
    runs = []
    for seed, hidden in ((1, "16"), (2, "16"), (3, "24")):
        out = root / f"s{seed}"
        argv = ["train", *TINY, "--hidden", hidden, "--seed", str(seed), "--data-dir", str(mnist_dir)]
        assert main([*argv, "--out", str(out), "--quiet"]) == 0
        runs.append(out)
    return runs


def _probas(runs, x):
    return [to_numpy(MLP.load(run / "model.npz").predict_proba(x)).astype(np.float64) for run in runs]


def test_the_committees_probabilities_are_the_mean_of_the_members(members, mnist):
    x = mnist[2][:500]
    committee = Committee([MLP.load(run / "model.npz") for run in members])
    p1, p2, p3 = _probas(members, x)
    np.testing.assert_array_equal(committee.predict_proba(x), (p1 + p2 + p3) / 3)
    np.testing.assert_array_equal(committee.predict(x), ((p1 + p2 + p3) / 3).argmax(axis=1))
    assert not np.array_equal(p1, p2)  # the members differ, so the mean is not any one of them


def _accuracy_line(out: str, start: str) -> str:
    return next(line for line in out.splitlines() if line.lstrip().startswith(start))


def test_evaluate_reports_each_member_and_the_committee(members, mnist_dir, mnist, capsys):
    assert main(["evaluate", *map(str, members), "--data-dir", str(mnist_dir), "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("committee of 3 models, averaging their class probabilities; test set of mnist\n")
    y = mnist[3]
    probas = _probas(members, mnist[2])
    for run, p in zip(members, probas):
        right = int((p.argmax(axis=1) == y).sum())
        line = _accuracy_line(out, f"member {run / 'model.npz'}: ")
        assert f"test accuracy {100 * right / 10_000:.2f}%  ({right} of 10000)" in line
    mean = sum(probas) / 3
    right = int((mean.argmax(axis=1) == y).sum())
    loss = -np.mean(np.log(mean[np.arange(10_000), y]))
    line = _accuracy_line(out, "committee (mean of the 3 members' probabilities)")
    assert line.endswith(f"test accuracy {100 * right / 10_000:.2f}%  ({right} of 10000), test loss {loss:.4f}")
    # The tables are the committee's: the confusion matrix's diagonal counts its right answers.
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    counts = np.array([[int(v) for v in row[1:]] for row in rows[-10:]])
    assert counts.sum() == 10_000 and np.trace(counts) == right


def _copy_with_config(source, target, **changes):
    """A copy of a model file whose saved training config has ``changes``."""
    arrays = dict(np.load(source, allow_pickle=False))
    config = json.loads(str(arrays["train.config"]))
    arrays["train.config"] = np.asarray(json.dumps({**config, **changes}))
    np.savez(target, **arrays)
    return target


def test_members_that_disagree_are_refused_naming_the_one_that_differs(members, tmp_path, capsys):
    other_inputs = tmp_path / "other-inputs.npz"
    MLP(25, 16, 10).save(other_inputs)
    fashion = _copy_with_config(members[1] / "model.npz", tmp_path / "fashion.npz", dataset="fashion-mnist")
    for odd, what in ((other_inputs, "25 inputs, but"), (fashion, "data set 'fashion-mnist', but")):
        assert main(["evaluate", str(members[0]), str(odd), "--backend", "numpy"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(f"backprop-xp: error: {odd}: {what} {members[0]} has ")
        assert err.rstrip().endswith("a committee's members must agree")


def _digit_png(digit, path):
    from PIL import Image

    Image.fromarray((digit.reshape(28, 28) * 255).round().astype(np.uint8)).save(path)
    return path


def test_predict_with_several_runs_averages_their_probabilities(members, mnist, tmp_path, capsys):
    from backprop_xp.data.images import mnist_like

    digit = mnist[2][0]
    image = _digit_png(digit, tmp_path / "digit.png")
    assert main(["predict", str(members[0]), str(members[1] / "model.npz"), str(image)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "committee of 2 models, averaging their class probabilities"
    seen = mnist_like(digit.reshape(28, 28))[0][None, :]
    mean = sum(_probas(members[:2], seen))[0] / 2
    top3 = np.argsort(-mean, kind="stable")[:3]
    assert lines[1] == f"{image}: " + ", ".join(f"{k} ({100 * mean[k]:.1f}%)" for k in top3)


def test_predict_tells_runs_from_images_and_refuses_a_run_after_an_image(members, mnist, tmp_path, capsys):
    image = _digit_png(mnist[2][0], tmp_path / "digit.png")
    assert main(["predict", str(members[0]), str(members[1])]) == 2  # only runs: nothing to classify
    err = capsys.readouterr().err
    assert err == f"backprop-xp: error: no image to classify: every argument after MODEL ({members[1]}) names a run\n"
    assert main(["predict", str(members[0]), str(image), str(members[1])]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"backprop-xp: error: {members[1]} names a run (a folder or a .npz file) but comes after the image "
        f"{image}: name the runs first\n"
    )


def test_a_sweep_over_seeds_trains_a_committee_that_evaluate_takes_whole(mnist_dir, mnist, tmp_path, capsys):
    """sweep --seed 1,2: one run per seed (before, --seed took one integer); evaluate SWEEP/*/ is their committee."""
    out = tmp_path / "sweep"
    argv = ["sweep", "--seed", "1,2", "--hidden", "16", "--epochs", "1", "--train-size", "1000", "--batch-size", "100",
            "--val-size", "200", "--backend", "numpy", "--data-dir", str(mnist_dir), "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    runs = sorted(glob.glob(f"{out}/*/"))  # what the shell makes of SWEEP/*/: the run folders, not sweep.csv
    assert [os.path.basename(run.rstrip("/")) for run in runs] == ["h16-lr0.1-b100-s1", "h16-lr0.1-b100-s2"]
    with open(out / "sweep.csv") as f:
        assert sorted(row["seed"] for row in csv.DictReader(f)) == ["1", "2"]
    for run, seed in zip(runs, (1, 2)):
        assert json.loads((Path(run) / "metrics.json").read_text())["config"]["seed"] == seed
    capsys.readouterr()
    assert main(["evaluate", *runs, "--data-dir", str(mnist_dir), "--backend", "numpy"]) == 0
    out_text = capsys.readouterr().out
    assert out_text.startswith("committee of 2 models, averaging their class probabilities")
    mean = sum(_probas([Path(run) for run in runs], mnist[2])) / 2
    right = int((mean.argmax(axis=1) == mnist[3]).sum())
    assert f"test accuracy {100 * right / 10_000:.2f}%  ({right} of 10000)" in _accuracy_line(out_text, "committee (")
