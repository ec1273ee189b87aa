"""``backprop-xp bench``: engine discovery, the tiny run's three files, the ratio column, budget and Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backprop_xp import cli
from backprop_xp.speed import report, summarize
from backprop_xp.speed.engine_table import missing_reason
from backprop_xp.speed.engines import ENGINES

TINY = ["--hidden", "16", "--batch-size", "64", "--epochs", "1", "--train-size", "2000"]


def _bench(tmp_path: Path, mnist_dir: Path, *args: str) -> tuple[int, dict]:
    code = cli.main(["bench", "--data-dir", str(mnist_dir), "--out", str(tmp_path), *TINY, *args])
    return code, json.loads((tmp_path / "bench.json").read_text())


# --------------------------------------------------------------------------- discovery


def test_every_engine_either_runs_here_or_says_why_not():
    for name in ENGINES:
        reason = missing_reason(name)
        assert reason is None or (isinstance(reason, str) and reason and "\n" not in reason), name
    assert missing_reason("numpy") is None


def hide_package(name: str, tmp_path, monkeypatch) -> None:
    """A fake package ``name`` first on the workers' path, failing to import as an absent one would."""
    fake = tmp_path / "fake"
    (fake / name).mkdir(parents=True)
    (fake / name / "__init__.py").write_text(f"raise ImportError('faked: no {name} here')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")]))


def test_an_engine_whose_library_is_missing_is_listed_with_the_reason(tmp_path, mnist_dir, monkeypatch, capsys):
    hide_package("sklearn", tmp_path, monkeypatch)
    code, result = _bench(tmp_path / "out", mnist_dir, "--engines", "numpy,sklearn")
    assert code == 0
    assert result["missing"] == {"sklearn": "scikit-learn is not installed (pip install scikit-learn)"}
    assert [row["engine"] for row in result["rows"]] == ["numpy"]
    out = capsys.readouterr().out
    assert "not run: sklearn: scikit-learn is not installed" in out
    assert "- `sklearn`: scikit-learn is not installed" in (tmp_path / "out" / "bench.md").read_text()


def test_unknown_engine_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--engines", "numpy,tensorflow"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'tensorflow' is not one of" in err


def test_too_large_train_size_is_one_line_and_exit_2_as_for_train(tmp_path, mnist_dir, capsys):
    out = tmp_path / "out"
    code = cli.main(["bench", "--data-dir", str(mnist_dir), "--out", str(out), "--train-size", "60001"])
    assert code == 2  # a setting that does not fit the data: a bad argument, as train says it
    assert capsys.readouterr().err == "backprop-xp: error: --train-size 60001 is more than the 60000 training images\n"
    assert not out.exists()  # refused before the output folder is made


def test_more_threads_than_four_per_cpu_are_refused(capsys):
    limit = 4 * (os.cpu_count() or 1)
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(["bench", "--threads", str(limit + 1)])  # parsing only: never a real bench
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--threads: must be an integer from 1 to {limit} " in err
    assert cli.build_parser().parse_args(["bench", "--threads", str(limit)]).threads == limit


def test_a_data_folder_named_by_the_environment_is_checked_like_data_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BACKPROP_XP_DATA", str(tmp_path / "gone"))
    assert cli.main(["bench", "--out", str(tmp_path / "out"), "--engines", "numpy", *TINY]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"backprop-xp: error: $BACKPROP_XP_DATA: folder '{tmp_path / 'gone'}' does not exist (unset it or give --data-dir)\n"
    )


# --------------------------------------------------------------------------- the tiny run


def test_tiny_run_writes_three_files_with_consistent_numbers(tmp_path, mnist_dir, capsys):
    pytest.importorskip("torch", reason="PyTorch not installed: the tiny run compares with torch-cpu")
    pytest.importorskip("sklearn", reason="scikit-learn not installed: the tiny run compares with sklearn")
    code, result = _bench(tmp_path, mnist_dir, "--engines", "numpy,sklearn,torch-cpu")
    printed = capsys.readouterr().out
    assert code == 0 and result["complete"] and result["missing"] == {}

    rows = {row["engine"]: row for row in result["rows"]}
    assert sorted(rows) == ["numpy", "sklearn", "torch-cpu"]
    for name, row in rows.items():
        timed = [m for m in result["rounds"] if m["engine"] == name]
        assert len(timed) == row["rounds"] == 1
        assert row["samples"] == 2000 and row["seconds"] == [timed[0]["seconds"]]
        assert row["samples_per_s"] == pytest.approx(2000 / timed[0]["seconds"])
        assert row["fraction_of_bound"] == pytest.approx(timed[0]["bound_seconds"] / timed[0]["seconds"])
        assert row["first_epoch_s"] > 0 and row["epochs_trained"] == 2
        assert row["test_accuracy"] > 0.5, f"{name} did not learn in two epochs"  # chance is 0.1
        assert row["torch_reference"] == "torch-cpu"
        # The printed table and bench.md show exactly these cells.
        line = "| " + " | ".join(report.cells(row)) + " |"
        assert line in (tmp_path / "bench.md").read_text()
        assert all(cell in printed for cell in report.cells(row))
    assert rows["torch-cpu"]["ratio_to_torch"] == 1.0
    # Without --optimizer: SGD with momentum, as every engine's own optimizer object says, and the table too.
    assert {m["optimizer"] for m in result["first_epochs"] + result["rounds"]} == {"sgd"}
    assert "optimizer: SGD lr 0.05 momentum 0.9, every engine (--optimizer sgd)" in printed
    # Same initial parameters and the same shuffles: ours and PyTorch end at the same accuracy
    # (up to float32 rounding flipping a few of the 10,000 test predictions).
    assert rows["numpy"]["test_accuracy"] == pytest.approx(rows["torch-cpu"]["test_accuracy"], abs=0.01)

    png = (tmp_path / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    engine_info = result["engines"]["numpy"]
    assert engine_info["n_train"] == 2000 and engine_info["blas_threads"] == result["settings"]["threads"]
    assert result["machine"]["cores"] >= 1
    # No --threads: one thread per engine, whatever the cores, and the table says that it was the default.
    assert (result["settings"]["threads"], result["settings"]["threads_from"]) == (1, "default")
    assert "threads: 1 per CPU engine (the default: one per engine" in printed
    assert "threads: 1 per CPU engine (the default: one per engine" in (tmp_path / "bench.md").read_text()


@pytest.mark.parametrize("busy", [True, False], ids=["loaded", "quiet"])
def test_a_loaded_machine_is_warned_about_in_the_table_and_the_files(tmp_path, mnist_dir, monkeypatch, capsys, busy):
    cores = os.cpu_count() or 1
    load = float(cores) if busy else 0.0  # every core busy with something else, or nothing running
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    code, result = _bench(tmp_path, mnist_dir, "--engines", "numpy", "--threads", "2")
    printed = capsys.readouterr().out
    md = (tmp_path / "bench.md").read_text()
    assert code == 0 and result["settings"]["threads_from"] == "--threads"
    assert "threads: 2 per CPU engine (--threads; the default is 1)" in printed
    warning = f"the machine is loaded: load average {load:.1f} on {cores} cores leaves about 0.0 free for 2 thread(s)"
    if busy:
        assert result["machine"]["load_warning"].startswith(warning)
        assert printed.count(f"warning: {warning}") == 2  # when the run starts, and under the table
        assert f"- **warning: {warning}" in md
    else:
        assert result["machine"]["load_warning"] is None
        assert "warning" not in printed and "warning" not in md


# --------------------------------------------------------------------------- the ratio column


def _round(engine: str, r: int, seconds: float, bound: float = 0.01) -> dict:
    return {
        "round": r,
        "engine": engine,
        "hidden": 16,
        "batch": 64,
        "workload": "epoch",
        "seconds": seconds,
        "bound_seconds": bound,
    }


def test_ratio_column_is_computed_from_the_rounds_it_prints():
    times = {  # three rounds each, in an order where mean and median differ
        "numpy": [0.10, 0.30, 0.12],
        "torch-cpu": [0.20, 0.21, 0.60],
        "sklearn": [1.0, 0.9, 1.1],
        "torch-cuda": [0.05, 0.05, 0.05],
        "torch-cuda-graph": [0.02, 0.03, 0.02],
        "cupy": [0.01, 0.01, 0.04],
    }
    result = {
        "rounds": [_round(name, r + 1, t) for name, ts in times.items() for r, t in enumerate(ts)],
        "first_epochs": [],
        "accuracy": [],
        "engines": {name: {"n_train": 1000} for name in times},
    }
    rows = {row["engine"]: row for row in summarize(result)}
    median = {name: statistics.median(ts) for name, ts in times.items()}
    for name in ("numpy", "sklearn", "torch-cpu"):  # the CPU against the fastest PyTorch on the CPU
        assert rows[name]["torch_reference"] == "torch-cpu"
        assert rows[name]["ratio_to_torch"] == pytest.approx(median["torch-cpu"] / median[name])
    for name in ("cupy", "torch-cuda", "torch-cuda-graph"):  # a GPU against the fastest PyTorch on the GPU
        assert rows[name]["torch_reference"] == "torch-cuda-graph"
        assert rows[name]["ratio_to_torch"] == pytest.approx(median["torch-cuda-graph"] / median[name])
    # The printed cells are those numbers.
    assert report.cells(rows["numpy"])[4] == "120.0 (100.0-300.0)"
    # Per round: torch-cpu 0.20/0.10, 0.21/0.30, 0.60/0.12 = 2.0, 0.7, 5.0.
    assert (rows["numpy"]["ratio_min"], rows["numpy"]["ratio_max"]) == pytest.approx((0.7, 5.0))
    assert f"{median['torch-cpu'] / median['numpy']:.2f}" == "1.75"
    assert report.cells(rows["numpy"])[5] == "1.75x torch-cpu (0.70-5.00)"
    assert report.cells(rows["cupy"])[5] == "2.00x torch-cuda-graph (0.50-3.00)"  # 0.02/0.01, 0.03/0.01, 0.02/0.04
    assert report.cells(rows["torch-cpu"])[5] == "1.00x torch-cpu"  # the reference has no spread of its own


def test_without_pytorch_on_a_device_there_is_no_ratio():
    result = {
        "rounds": [_round("numpy", 1, 0.1)],
        "first_epochs": [],
        "accuracy": [],
        "engines": {"numpy": {"n_train": 1000}},
    }
    (row,) = summarize(result)
    assert row["ratio_to_torch"] is None and report.cells(row)[5] == "-"


# --------------------------------------------------------------------------- budget and Ctrl-C


def test_the_budget_stops_further_rounds_after_the_first(tmp_path, mnist_dir):
    code, result = _bench(tmp_path, mnist_dir, "--engines", "numpy", "--epochs", "3", "--budget-s", "0.001")
    assert code == 0
    assert [m["round"] for m in result["rounds"]] == [1]
    assert result["stopped"].startswith("budget: 1 of 3 rounds") and not result["complete"]
    assert "Stopped early: budget" in (tmp_path / "bench.md").read_text()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_prints_the_table_of_the_rounds_so_far(tmp_path, mnist_dir, signum):
    command = [sys.executable, "-m", "backprop_xp", "bench", "--data-dir", str(mnist_dir), "--out", str(tmp_path),
               "--engines", "numpy", "--hidden", "16", "--batch-size", "64", "--train-size", "2000", "--epochs", "100000"]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(cli.__file__).parents[2]), os.environ.get("PYTHONPATH", "")]),
    }
    # A CI job started in the background inherits SIGINT ignored, and the command rightly leaves an ignored
    # signal alone (files.signals_as_interrupts): give the child Ctrl-C's default, as tests/processes.py does.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        for line in process.stdout:
            if line.startswith("round 2/"):
                break
        process.send_signal(signum)
        rest, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, err
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["stopped"].startswith("interrupted")
    (row,) = result["rows"]
    assert row["rounds"] >= 2
    assert all(cell in rest for cell in report.cells(row)), rest  # the table, printed after Ctrl-C
    assert "stopped: interrupted" in rest
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


# --------------------------------------------------------------------------- the compiled peers: JAX, torch.compile


@pytest.fixture(scope="module")
def small_mnist(mnist_dir):
    """1,000 MNIST training images (15 batches of 64 and a last one of 40) and the test set."""
    from backprop_xp.speed.engines import load_data

    return load_data(str(mnist_dir), train_size=1000)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("engine", ["jax", "jax-step", "torch-compile", "torch-cpu"])
def test_peer_engines_train_exactly_as_ours_on_the_same_start_and_order(
    engine, optimizer, small_mnist, reference_missing
):
    # The oracle is our NumPy engine: same He-normal start, same epoch_permutation order, same optimizer
    # (SGD with momentum, or Adam: torch.optim.Adam, and the JAX Adam written in compiled.py).
    from backprop_xp.speed.engine_table import Builder

    library = "jax" if engine.startswith("jax") else "torch"
    if missing_reason(engine) is not None:
        reference_missing(f"{engine} cannot run here ({missing_reason(engine)}); CI installs {library}")
    ours = Builder("numpy", small_mnist, optimizer=optimizer)(16, 64)
    theirs = Builder(engine, small_mnist, optimizer=optimizer)(16, 64)
    if engine != "torch-cpu":
        assert theirs.compile_s > 0  # compiled when built, before any epoch
    for epoch in (0, 1):
        ours.epoch(epoch), theirs.epoch(epoch)
        # float32 rounding in another order of operations is all that separates them
        assert theirs.last_loss == pytest.approx(ours.last_loss, rel=1e-5), epoch
        assert abs(theirs.last_correct - ours.last_correct) <= 2, epoch  # of 1,000: a tie may flip
    mine, other = ours.params(), theirs.params()
    assert sorted(other) == ["W1", "W2", "b1", "b2"]
    for name in mine:
        np.testing.assert_allclose(other[name], mine[name], rtol=1e-4, atol=1e-5, err_msg=name)
    assert theirs.test_accuracy() == pytest.approx(ours.test_accuracy(), abs=0.002)  # at most 20 of 10,000


def test_missing_jax_is_listed_with_the_reason(tmp_path, mnist_dir, monkeypatch, capsys):
    hide_package("jax", tmp_path, monkeypatch)
    code, result = _bench(tmp_path / "out", mnist_dir, "--engines", "numpy,jax,jax-step")
    reason = "JAX is not installed (pip install 'backprop-xp[bench]', or pip install 'jax[cpu]')"
    assert code == 0 and result["missing"] == {"jax": reason, "jax-step": reason}
    assert [row["engine"] for row in result["rows"]] == ["numpy"]
    assert f"not run: jax: {reason}" in capsys.readouterr().out


def test_a_failed_compile_is_listed_as_not_run_with_the_reason(
    tmp_path, mnist_dir, monkeypatch, capsys, reference_missing
):
    if missing_reason("jax") is not None:
        reference_missing(f"JAX cannot run here ({missing_reason('jax')}); CI installs jax[cpu]")
    # A sitecustomize first on the workers' path makes XLA's compile fail, as a compiler error would.
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text(
        "import jax\n"
        "class _Refused:\n"
        "    def __init__(self, *args, **kwargs): pass\n"
        "    def lower(self, *args, **kwargs): raise RuntimeError('faked: XLA could not compile\\nsecond line')\n"
        "jax.jit = _Refused\n"
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")]))
    code, result = _bench(tmp_path / "out", mnist_dir, "--engines", "numpy,jax")
    assert code == 0
    assert result["missing"] == {
        "jax": "jax.jit failed: RuntimeError: faked: XLA could not compile (at 784-16-10 batch 64)"
    }
    assert result["errors"] == [] and [row["engine"] for row in result["rows"]] == ["numpy"]
    if len(os.sched_getaffinity(0)) > 1:  # XLA obeys no thread setting but the cores it may run on
        assert result["engines"]["jax"]["jax_threads"].startswith("1 (the process pinned to core(s) ")
    assert "not run: jax: jax.jit failed: RuntimeError: faked" in capsys.readouterr().out
    assert "- `jax`: jax.jit failed: RuntimeError: faked" in (tmp_path / "out" / "bench.md").read_text()


def test_compile_time_is_reported_beside_the_first_epoch_and_never_in_the_epochs():
    result = {
        "rounds": [_round("jax", 1, 0.2), _round("jax", 2, 0.4), _round("numpy", 1, 0.3)],
        "first_epochs": [
            {"engine": "jax", "hidden": 16, "batch": 64, "seconds": 0.5, "compile_s": 2.04},
            {"engine": "numpy", "hidden": 16, "batch": 64, "seconds": 0.7},
        ],
        "accuracy": [],
        "engines": {"jax": {"n_train": 1000}, "numpy": {"n_train": 1000}},
    }
    rows = {row["engine"]: row for row in summarize(result)}
    assert rows["jax"]["compile_s"] == 2.04 and rows["jax"]["median_s"] == pytest.approx(0.3)
    assert report.cells(rows["jax"])[-1] == "0.50 s (+2.0 s compile)"
    assert rows["numpy"]["compile_s"] is None and report.cells(rows["numpy"])[-1] == "0.70 s"


# --------------------------------------------------------------------------- bench --optimizer adam


def test_jax_adam_is_optimizers_adam_step_for_step(reference_missing):
    # The hand-written JAX Adam (compiled.jax_optimizer) against optimizers.Adam.step on the same gradients,
    # 40 steps whose gradients range over ten decades (1e-9 to 10: at the small end ε decides the step).
    if missing_reason("jax") is not None:
        reference_missing(f"JAX cannot run here ({missing_reason('jax')}); CI installs jax[cpu]")
    import jax

    from backprop_xp.model import MLP
    from backprop_xp.optimizers import Adam
    from backprop_xp.speed.compiled import jax_optimizer
    from backprop_xp.speed.engines import OPTIMIZERS

    model = MLP(20, 8, 3, activation="relu", backend="numpy", dtype="float32", seed=0)
    ours = Adam(model, **OPTIMIZERS["adam"])
    init, update = jax_optimizer(jax, "adam")
    update = jax.jit(update)  # as the engines run it: inside a jitted step
    state = init({k: jax.numpy.asarray(v) for k, v in model.params.items()})
    rng = np.random.default_rng(1)
    for t in range(1, 41):
        scale = 10.0 ** rng.uniform(-9, 1)
        grads = {k: (rng.standard_normal(v.shape) * scale).astype(np.float32) for k, v in model.params.items()}
        before = {k: v.copy() for k, v in model.params.items()}
        for k, g in grads.items():
            model.grads[k][...] = g
        ours.step()
        theirs, state = update(before, grads, state)  # from the same parameters: the update alone is compared
        assert int(state[2]) == ours.t == t
        for k, w in model.params.items():
            # float32 rounding of the step and of the sum: 2 units in the last place of each, at most
            tolerance = 2 * (np.abs(w - before[k]) * np.finfo(np.float32).eps + np.spacing(np.abs(w)))
            assert np.all(np.abs(np.asarray(theirs[k]) - w) <= tolerance), (t, k)


def test_every_cpu_engine_trains_with_adam_and_the_files_say_so(tmp_path, mnist_dir, reference_missing):
    # One bench run with --optimizer adam (lr 1e-3): every CPU engine through its worker, 2 epochs of 2,000 images.
    from backprop_xp.speed import command

    engines = ["numpy", "jax", "jax-step", "torch-cpu", "sklearn"]
    for name in engines:
        if missing_reason(name) is not None:
            reference_missing(f"{name} cannot run here ({missing_reason(name)}); CI installs it")
    args = cli.build_parser().parse_args(
        ["bench", "--data-dir", str(mnist_dir), "--out", str(tmp_path), "--engines", ",".join(engines),
         "--hidden", "32", "--batch-size", "32", "--epochs", "1", "--train-size", "2000", "--optimizer", "adam"]
    )  # fmt: skip
    assert command(args) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["complete"] and result["missing"] == {} and result["errors"] == []
    s = result["settings"]
    assert (s["optimizer"], s["lr"], s["beta1"], s["beta2"], s["eps"]) == ("adam", 1e-3, 0.9, 0.999, 1e-8)
    assert "momentum" not in s and "--optimizer adam" in result["command"]
    # What each engine's own optimizer object is (torch.optim.Adam, ours, sklearn's solver), not the setting echoed
    trained_with = {(m["engine"], m["optimizer"]) for m in result["first_epochs"] + result["rounds"]}
    assert trained_with == {(name, "adam") for name in engines}
    accuracy = {row["engine"]: row["test_accuracy"] for row in result["rows"]}
    assert sorted(accuracy) == sorted(engines)
    for name, value in accuracy.items():
        assert value > 0.75, f"{name} reached {value:.3f} with Adam"  # chance is 0.1; SGD's tiny run reaches 0.5
    for name in ("jax", "jax-step", "torch-cpu"):  # our start and order: the same Adam ends at the same accuracy
        assert accuracy[name] == pytest.approx(accuracy["numpy"], abs=0.002), name
    line = "optimizer: Adam lr 0.001 betas 0.9/0.999 eps 1e-08, every engine (--optimizer adam)"
    assert line in report.table(result) and f"- {line}" in (tmp_path / "bench.md").read_text()
    assert "softmax cross-entropy, Adam lr 0.001" in (tmp_path / "bench.md").read_text()


def test_the_optimizer_flag_takes_sgd_or_adam_and_refuses_others_in_one_line(capsys):
    import argparse

    from backprop_xp.speed import add_optimizer_flag

    parser = argparse.ArgumentParser(prog="backprop-xp bench")
    add_optimizer_flag(parser)
    assert parser.parse_args([]).optimizer == "sgd"
    assert parser.parse_args(["--optimizer", "adam"]).optimizer == "adam"
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--optimizer", "rmsprop"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "argument --optimizer: invalid choice: 'rmsprop'" in err  # usage, then the error
    help_text = " ".join(parser.format_help().split())  # argparse wraps it
    assert "sgd: SGD lr 0.05 momentum 0.9" in help_text and "adam: Adam lr 0.001 betas 0.9/0.999" in help_text
