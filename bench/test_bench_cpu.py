"""CPU benchmarks with pytest-benchmark: ours, PyTorch and the GEMM bound, same shapes.

    python -m pytest bench -q                          # timed (pytest-benchmark's table)
    python -m pytest bench -q --benchmark-disable      # quick: each runs once (CI)

Every benchmark runs the real work and then checks it did (finite loss, moved
parameters), so the quick mode tests the benchmark code too. Ratios and the
results table come from ``compare.py``, which interleaves the contestants in
separate processes; here they share one process (and its thread pools).
"""

from __future__ import annotations

import numpy as np
import pytest
import workloads as w

SHAPES = [(h, b) for h in w.HIDDEN_SIZES for b in w.BATCH_SIZES]
IDS = [f"h{h}-b{b}" for h, b in SHAPES]


def _torch(request):
    """PyTorch through the ``torch`` fixture of conftest.py (fails instead of skipping in CI)."""
    return request.getfixturevalue("torch")


def _fixed_batches(data, batch, quick):
    x, y = data
    n = min(len(x) // batch, 4 if quick else 4096 // batch + 8)
    return w.batches_of(x[: n * batch], y[: n * batch], batch)


def _net(who, hidden, request):
    if who == "torch":
        _torch(request)
        return w.TorchNet(hidden)
    return w.Ours(hidden)


def _weights(net):
    """W1, b1, W2, b2 of either net, as float64 NumPy arrays."""
    if isinstance(net, w.Ours):
        return [net.model.params[k].astype(np.float64) for k in ("W1", "b1", "W2", "b2")]
    layers = (net.net[0].weight, net.net[0].bias, net.net[2].weight, net.net[2].bias)
    return [p.detach().numpy().astype(np.float64) for p in layers]


def _reference_logits(weights, x):
    """The network's logits in float64, written out here, independent of both contestants."""
    w1, b1, w2, b2 = weights
    return np.maximum(x.astype(np.float64) @ w1.T + b1, 0) @ w2.T + b2


def _params(net):
    if isinstance(net, w.Ours):
        return net.model.flat_params.copy()
    return np.concatenate([p.detach().numpy().ravel() for p in net.net.parameters()])


@pytest.mark.parametrize("who", ["ours", "torch"])
@pytest.mark.parametrize("hidden, batch", SHAPES, ids=IDS)
def test_training_step(benchmark, who, hidden, batch, epoch_data, quick, request):
    net = _net(who, hidden, request)
    batches = _fixed_batches(epoch_data, batch, quick)
    if who == "torch":
        batches = [net.as_batch(xb, yb) for xb, yb in batches]
    before = _params(net)
    benchmark.extra_info["samples_per_round"] = len(batches) * batch
    benchmark.group = f"step h{hidden} b{batch}"
    benchmark(w.run_all(net.step, batches))
    after = _params(net)
    assert np.isfinite(after).all() and not np.array_equal(before, after)


@pytest.mark.parametrize("who", ["ours", "torch"])
@pytest.mark.parametrize("hidden, batch", SHAPES, ids=IDS)
def test_training_epoch(benchmark, who, hidden, batch, epoch_data, quick, request):
    net = _net(who, hidden, request)
    x, y = epoch_data
    run = net.epoch_runner(x, y, batch)
    epochs = iter(range(1 << 30))
    before = _params(net)
    benchmark.extra_info["samples_per_round"] = len(x)
    benchmark.group = f"epoch h{hidden} b{batch}"
    benchmark.pedantic(lambda: run(next(epochs)), rounds=1 if quick else 3, iterations=1)
    after = _params(net)
    assert np.isfinite(after).all() and not np.array_equal(before, after)


@pytest.mark.parametrize("who", ["ours", "torch"])
@pytest.mark.parametrize("hidden, batch", SHAPES, ids=IDS)
def test_inference(benchmark, who, hidden, batch, epoch_data, quick, request):
    net = _net(who, hidden, request)
    batches = _fixed_batches(epoch_data, batch, quick)
    if who == "torch":
        batches = [net.as_batch(xb, yb) for xb, yb in batches]
    benchmark.extra_info["samples_per_round"] = len(batches) * batch
    benchmark.group = f"infer h{hidden} b{batch}"
    benchmark(w.run_all_x(net.infer, batches))
    # What was timed computes the right thing: the argmax of the float64 logits, wherever the
    # two best classes are not within float32 rounding of each other.
    x = np.concatenate([xb.numpy() if who == "torch" else xb for xb, _ in batches])
    predicted = np.concatenate([np.asarray(net.infer(xb)) for xb, _ in batches])
    z = _reference_logits(_weights(net), x)
    top2 = np.sort(z, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-4 * np.abs(z).max()
    assert predicted.shape == (len(x),) and clear.mean() > 0.9
    np.testing.assert_array_equal(predicted[clear], z.argmax(axis=1)[clear])


def test_ours_and_torch_predict_alike_from_the_same_start(epoch_data, torch):
    """Same architecture and the very same initial parameters: the two nets agree before training."""
    x = epoch_data[0][:256]
    ours, theirs = w.Ours(128), w.TorchNet(128)
    with torch.inference_mode():
        z_torch = theirs.net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours.model.logits(x), z_torch, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("hidden, batch", SHAPES, ids=IDS)
def test_gemm_bound(benchmark, hidden, batch, epoch_data, quick):
    bound = w.GemmBound(hidden, batch)
    batches = _fixed_batches(epoch_data, batch, quick)
    benchmark.extra_info["samples_per_round"] = len(batches) * batch
    benchmark.group = f"step h{hidden} b{batch}"
    benchmark(w.run_all(lambda xb, yb: bound.step(xb), batches))
    # The five products are the step's, on the last batch: each against its definition, in float64
    # from the inputs (not the same float32 product twice), chained as a step chains them.
    x = batches[-1][0].astype(np.float64)
    w1, w2, delta2 = (a.astype(np.float64) for a in (bound.w1, bound.w2, bound.delta2))
    a1 = x @ w1.T
    delta1 = delta2 @ w2
    for got, want in ((bound.a1, a1), (bound.z2, a1 @ w2.T), (bound.g2, delta2.T @ a1), (bound.delta1, delta1),
                      (bound.g1, delta1.T @ x)):  # fmt: skip
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_compare_script_writes_its_table(tmp_path, torch):
    """``compare.py`` end to end on one tiny shape: both workers, the table, the JSON."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("compare.py")
    args = ["--hidden", "16", "--batch", "32", "--samples", "256", "--rounds", "1", "--out", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, str(script), *args, "--keep-openblas-env"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "results-cpu.json").read_text())
    assert [(r["hidden"], r["batch"], r["workload"]) for r in result["rows"]] == [
        (16, 32, "epoch"),
        (16, 32, "step"),
        (16, 32, "infer"),
    ]
    for row in result["rows"]:
        assert row["ours_samples_per_s"] > 0 and row["torch_samples_per_s"] > 0 and row["ratio"] > 0
    table = (tmp_path / "RESULTS.md").read_text()
    assert "| 16 | 32 | epoch |" in table and result["machine"]["numpy"] in table
