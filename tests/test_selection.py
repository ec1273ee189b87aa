"""Model selection and the epoch loop's bookkeeping, pinned down exactly on a small data set made here.

What ``--keep-best``, ``--patience`` and ``sweep`` rest on: the validation
accuracy is that of the held-out rows; patience stops after exactly K epochs
without a better one; a tie keeps the first epoch. And three numbers a user
reads: the step a diverged run names, the distortions of each ``--augment``
epoch, the step schedule's rates. The validation accuracies are scripted
(``scripted_validation``) where the test is about what the loop does with them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from backprop_xp import MLP
from backprop_xp.data import load_dataset, train_val_split
from backprop_xp.training import CHECKPOINT, SCHEDULES, Diverged, TrainConfig, evaluate, step_lr, train
from backprop_xp.training import run as run_module

N_TRAIN, N_TEST, VAL = 400, 90, 120  # VAL differs from N_TEST: scripted_validation tells them apart by length


@pytest.fixture
def data_dir(tmp_path) -> str:
    """8x8 images in 3 classes, learnable but with a fifth of the labels wrong: no split scores 100%."""
    from idx_files import write_mnist_folder

    rng = np.random.default_rng(1)
    arrays = {}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        labels = rng.integers(0, 3, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 8, 8)).astype(np.uint8)
        for k in range(3):  # each class lights its own rows
            images[labels == k, 2 * k : 2 * k + 2, :] = 200
        wrong = rng.random(n) < 0.2
        labels[wrong] = (labels[wrong] + rng.integers(1, 3, int(wrong.sum()))) % 3
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    write_mnist_folder(tmp_path / "data", arrays)
    return str(tmp_path / "data")


def small(data_dir: str, **settings) -> TrainConfig:
    values = dict(hidden=16, epochs=3, batch_size=40, lr=0.1, lr_schedule="constant", val_size=VAL, backend="numpy")
    return TrainConfig(**{**values, **settings}, data_dir=data_dir)


def scripted_validation(monkeypatch, accuracies: list[float]) -> None:
    """The loop's validation scores the next of ``accuracies`` each epoch (its loss stays the real one)."""
    real, scripted = run_module.evaluate, iter(accuracies)

    def evaluate_(model, x, labels):
        loss, accuracy = real(model, x, labels)
        return (loss, next(scripted)) if len(labels) == VAL else (loss, accuracy)

    monkeypatch.setattr(run_module, "evaluate", evaluate_)


def params(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {name: f[name] for name in ("W1", "b1", "W2", "b2")}


# --------------------------------------------------------------------------- 1. the validation split


def test_the_recorded_validation_scores_are_those_of_the_saved_model_on_the_held_out_rows(data_dir, tmp_path):
    config = small(data_dir, epochs=2)
    metrics = train(config, tmp_path / "run", echo=None, pictures=False)
    x_train, y_train, x_test, y_test = load_dataset("mnist", data_dir)
    _, _, x_val, y_val = train_val_split(x_train, y_train, VAL, seed=config.seed)  # the rows the run held out
    model = MLP.load(tmp_path / "run" / "model.npz")
    last = metrics["epochs"][-1]
    assert evaluate(model, x_val, y_val) == (last["val_loss"], last["val_accuracy"])
    assert evaluate(model, x_test, y_test) == (last["test_loss"], last["test_accuracy"])
    # The two splits score differently here, so the first assertion would catch the test set scored as validation.
    assert 0.5 < last["val_accuracy"] < 1 and last["val_accuracy"] != last["test_accuracy"]
    assert metrics["config"]["n_val"] == VAL and metrics["config"]["n_train"] == N_TRAIN - VAL


# --------------------------------------------------------------------------- 2. patience


@pytest.mark.parametrize(
    "accuracies, patience, best_epoch, epochs_run",
    [
        ([0.5, 0.6, 0.55, 0.55, 0.55, 0.55, 0.55, 0.55], 3, 2, 5),  # 3 epochs after epoch 2: stops after 5
        ([0.5, 0.6, 0.6, 0.55, 0.55, 0.55, 0.55, 0.55], 2, 2, 4),  # an equal accuracy is no improvement
        ([0.5, 0.6, 0.55, 0.61, 0.55, 0.55, 0.55, 0.55], 2, 4, 6),  # an improvement starts the count again
        ([0.5, 0.4, 0.3, 0.2, 0.1, 0.1, 0.1, 0.1], 1, 1, 2),
    ],
)
def test_patience_stops_after_exactly_that_many_epochs_without_a_better_validation_accuracy(
    data_dir, tmp_path, monkeypatch, accuracies, patience, best_epoch, epochs_run
):
    scripted_validation(monkeypatch, accuracies)
    lines = []
    metrics = train(small(data_dir, epochs=8, patience=patience), tmp_path / "run", echo=lines.append, pictures=False)
    assert [row["epoch"] for row in metrics["epochs"]] == list(range(1, epochs_run + 1))
    assert [row["val_accuracy"] for row in metrics["epochs"]] == accuracies[:epochs_run]
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["status"] == "finished"
    assert saved["stopped_early"] == {"after_epoch": epochs_run, "best_epoch": best_epoch, "patience": patience}
    final = saved["final"]
    assert (final["best_val_epoch"], final["best_val_accuracy"]) == (best_epoch, accuracies[best_epoch - 1])
    assert final["epoch_kept"] == epochs_run  # without --keep-best the last epoch's model is kept
    epochs = "epoch" if patience == 1 else "epochs"
    assert f"stopped early: no better validation accuracy in the {patience} {epochs} after epoch {best_epoch}" in lines


def test_patience_that_never_runs_out_trains_every_epoch(data_dir, tmp_path, monkeypatch):
    scripted_validation(monkeypatch, [0.5, 0.6, 0.55, 0.55])
    metrics = train(small(data_dir, epochs=4, patience=3), tmp_path / "run", echo=None, pictures=False)
    assert len(metrics["epochs"]) == 4 and "stopped_early" not in metrics


# --------------------------------------------------------------------------- 3. keep-best and ties


def test_keep_best_keeps_the_first_of_equal_best_epochs(data_dir, tmp_path, monkeypatch):
    scripted_validation(monkeypatch, [0.5, 0.6, 0.6, 0.55])
    metrics = train(small(data_dir, epochs=4, keep_best=True), tmp_path / "run", echo=None, pictures=False)
    assert (metrics["final"]["best_val_epoch"], metrics["final"]["epoch_kept"]) == (2, 2)
    with np.load(tmp_path / "run" / "best.npz") as f:
        assert int(f["train.epoch"]) == 2
    # The parameters kept are epoch 2's: those of the same run stopped after epoch 2 (constant rate: the same steps).
    monkeypatch.undo()
    train(small(data_dir, epochs=4), tmp_path / "two", echo=None, pictures=False, stop_after=2)
    kept, second = params(tmp_path / "run" / "model.npz"), params(tmp_path / "two" / CHECKPOINT)
    assert all(np.array_equal(kept[name], second[name]) for name in kept)


def test_a_resumed_keep_best_run_keeps_the_first_of_equal_best_epochs_seen_before_the_stop(
    data_dir, tmp_path, monkeypatch
):
    # The best epoch is found again from metrics.json on resuming (training.run._best_val): the same tie rule.
    scripted_validation(monkeypatch, [0.5, 0.6, 0.6, 0.55])
    config = small(data_dir, epochs=4, keep_best=True)
    train(config, tmp_path / "run", echo=None, pictures=False, stop_after=3)
    metrics = train(config, tmp_path / "run", resume=True, echo=None, pictures=False)
    assert (metrics["final"]["best_val_epoch"], metrics["final"]["epoch_kept"]) == (2, 2)


# --------------------------------------------------------------------------- 4. divergence


def test_a_diverged_run_names_the_first_bad_step_counting_from_1(data_dir, tmp_path, monkeypatch):
    # The 4th step of epoch 2 (the 11th of the run: 7 steps an epoch) returns a NaN loss.
    real, calls = run_module.make_step, []

    def make_step(*args, **kwargs):
        step = real(*args, **kwargs)

        def poisoned(xb, yb):
            calls.append(len(yb))
            loss, n_correct = step(xb, yb)
            return (np.float32("nan") if len(calls) == 7 + 4 else loss), n_correct

        return poisoned

    monkeypatch.setattr(run_module, "make_step", make_step)
    with pytest.raises(Diverged) as info:
        train(small(data_dir, epochs=3), tmp_path / "run", echo=None, pictures=False)
    assert len(calls) == 11  # (N_TRAIN - VAL) / 40 = 7 steps in epoch 1, then 4: the CPU stops at the bad one
    assert (info.value.epoch, info.value.step) == (2, 4)
    assert "training diverged at epoch 2, step 4: the loss became NaN or infinite" in str(info.value)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["diverged"] == {"epoch": 2, "step": 4, "lr": 0.1, "reason": "the loss became NaN or infinite"}


# --------------------------------------------------------------------------- 5. augmentation


def test_each_augmented_epoch_trains_on_new_distortions_that_a_rerun_repeats(data_dir, tmp_path, monkeypatch):
    real, seen = run_module.distort, []

    def distort(images, rng, *, out, **strengths):
        seen.append(real(images, rng, out=out, **strengths).copy())
        return out

    monkeypatch.setattr(run_module, "distort", distort)
    config = small(data_dir, epochs=3, augment=True)
    train(config, tmp_path / "a", echo=None, pictures=False)
    train(config, tmp_path / "b", echo=None, pictures=False)
    first_run, second_run = seen[:3], seen[3:]
    x_train = train_val_split(*load_dataset("mnist", data_dir)[:2], VAL, seed=config.seed)[0]
    for epoch, images in enumerate(first_run):
        assert images.shape == x_train.shape and np.abs(images - x_train).mean() > 0.02, epoch
        assert np.array_equal(images, second_run[epoch]), epoch  # seeded by (seed, epoch): reproducible
    for a, b in ((0, 1), (0, 2), (1, 2)):  # every epoch sees its own distortions
        assert np.abs(first_run[a] - first_run[b]).mean() > 0.02, (a, b)


# --------------------------------------------------------------------------- 6. the step schedule

# epochs -> each epoch's rate for a base rate of 1: divided by 10 once at least half the epochs are done
# (epoch index >= epochs / 2) and again at three quarters (index >= 3 epochs / 4), in true division.
STEP_RATES = {
    1: [1],
    2: [1, 0.1],
    3: [1, 1, 0.1],  # 1.5 and 2.25 (integer division: 1 and 2)
    5: [1, 1, 1, 0.1, 0.01],  # 2.5 and 3.75 (integer division: 2 and 3)
    6: [1, 1, 1, 0.1, 0.1, 0.01],  # 3 and 4.5 (integer division: 3 and 4)
    7: [1, 1, 1, 1, 0.1, 0.1, 0.01],  # 3.5 and 5.25 (integer division: 3 and 5)
    10: [1] * 5 + [0.1] * 3 + [0.01] * 2,  # 5 and 7.5 (integer division: 5 and 7)
}


@pytest.mark.parametrize("epochs", sorted(STEP_RATES))
def test_the_step_schedule_divides_at_half_and_three_quarters_of_the_epochs_exactly(epochs):
    assert [step_lr(e, epochs, 1.0) for e in range(epochs)] == pytest.approx(STEP_RATES[epochs], rel=1e-12)


def test_a_step_schedule_run_records_the_rate_of_each_epoch(data_dir, tmp_path):
    assert SCHEDULES["step"] is step_lr
    metrics = train(small(data_dir, epochs=5, lr_schedule="step", lr=0.2), tmp_path / "run", echo=None, pictures=False)
    assert [row["lr"] for row in metrics["epochs"]] == pytest.approx([0.2, 0.2, 0.2, 0.02, 0.002], rel=1e-12)
