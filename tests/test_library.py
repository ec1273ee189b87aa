"""The library as a PyTorch or scikit-learn user meets it: ``bx.train``, ``m.save``/``MLP.load``, the README's examples."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import backprop_xp as bx
from backprop_xp.model import PARAM_NAMES

README = Path(__file__).resolve().parent.parent / "README.md"


def test_bx_train_is_the_top_level_way_and_trains_a_small_subset(mnist_dir, mnist, tmp_path):
    config = bx.TrainConfig(
        hidden=32, epochs=2, train_size=3000, batch_size=100, backend="numpy", data_dir=str(mnist_dir)
    )
    metrics = bx.train(config, tmp_path / "run", echo=None, progress=False, pictures=False)
    assert metrics["status"] == "finished" and [row["epoch"] for row in metrics["epochs"]] == [1, 2]
    accuracy = metrics["final"]["test_accuracy"]
    assert 0.85 < accuracy < 1  # 3000 images, 2 epochs: well above chance (0.1), short of the full run's 98%
    # The model the run wrote is the one it scored: its predictions give exactly that accuracy.
    m = bx.MLP.load(tmp_path / "run" / "model.npz")
    right = int((bx.to_numpy(m.predict(mnist[2])) == mnist[3]).sum())
    assert right / len(mnist[3]) == accuracy
    assert (m.n_inputs, m.n_hidden, m.n_outputs) == (784, 32, 10)


def _bits(array) -> bytes:
    array = bx.to_numpy(array)
    return array.dtype.str.encode() + str(array.shape).encode() + array.tobytes()


def test_save_then_load_gives_back_the_model_bit_for_bit(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.random((64, 20), dtype=np.float32), rng.integers(0, 3, 64)
    for dtype in ("float32", "float64"):
        m = bx.MLP(20, 7, 3, activation="sigmoid", dtype=dtype, seed=4)
        opt = bx.SGD(m, lr=0.3, momentum=0.9)
        for xb, yb in bx.Minibatches(x, y, 16, xp=m.xp, seed=1, dtype=dtype).epoch(0):
            m.loss_and_grads(xb, yb)
            opt.step()  # trained values, not the initial ones: every bit of them must come back
        path = tmp_path / f"{dtype}.npz"
        m.save(path)
        back = bx.MLP.load(path)
        assert back.config == m.config
        for name in PARAM_NAMES:
            assert _bits(back.params[name]) == _bits(m.params[name]), (dtype, name)
        assert _bits(back.logits(x)) == _bits(m.logits(x))
        m.save(path)  # over an existing file: replaced in one step, no temporary file left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float32.npz", "float64.npz"]


@pytest.mark.slow
def test_the_readmes_library_examples_run(mnist_dir, tmp_path, monkeypatch, capsys):
    section = re.search(r"^## The library\n(.*?)(?=^## )", README.read_text(), re.S | re.M).group(1)
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert any("bx.train(" in b for b in blocks) and any("bx.Minibatches(" in b for b in blocks), blocks
    assert any(".save(" in b for b in blocks)
    monkeypatch.setenv("BACKPROP_XP_DATA", str(mnist_dir))  # what bx.load_mnist() and bx.train read
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(tmp_path)  # the examples write under runs/
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "readme"})
    # one accuracy per trained network: the bx.train block's, then SGD's and Adam's, side by side
    accuracies = [float(a) for a in re.findall(r"^(?:\w+: )?test accuracy (\S+)$", capsys.readouterr().out, re.M)]
    assert len(accuracies) == 3 and all(a > 0.9 for a in accuracies), accuracies
    assert bx.MLP.load(tmp_path / "runs" / "library" / "copy.npz").n_hidden == 128
