"""Augmentation: the identity when told to do nothing, seeded, and resumable bit for bit."""

from __future__ import annotations

import numpy as np

from backprop_xp.augment import distort, gaussian_matrix
from backprop_xp.train import TrainConfig, train

NOTHING = dict(max_shift=0.0, max_rotation=0.0, max_scale=0.0, alpha=0.0)


def test_no_distortion_is_the_identity(mnist):
    x = mnist[0][:50]
    assert np.array_equal(distort(x, np.random.default_rng(0), **NOTHING), x)


def test_distortions_are_seeded_bounded_and_keep_the_ink(mnist):
    x = mnist[0][:300]
    a = distort(x, np.random.default_rng(5))
    b = distort(x, np.random.default_rng(5))
    c = distort(x, np.random.default_rng(6))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.dtype == np.float32 and a.min() >= 0 and a.max() <= 1
    ink = a.sum(axis=1) / x.sum(axis=1)  # scaling by up to 12% changes the ink by up to ~25%
    assert 0.6 < ink.min() and ink.max() < 1.5
    assert np.abs(a - x).mean() > 0.02  # and it does change the pictures


def test_gaussian_matrix_smooths_a_constant_into_a_constant_away_from_the_edges():
    g = gaussian_matrix(28, 2.0)
    smoothed = g @ np.ones(28, np.float32)
    assert np.allclose(smoothed[8:20], 1.0, atol=1e-3)


def test_an_augmented_run_resumes_bit_for_bit(mnist_dir, tmp_path):
    config = TrainConfig(hidden=16, train_size=1000, epochs=2, batch_size=100, augment=True, backend="numpy", data_dir=str(mnist_dir))
    straight = train(config, tmp_path / "a", echo=None, pictures=False)
    train(config, tmp_path / "b", echo=None, pictures=False, stop_after=1)
    resumed = train(config, tmp_path / "b", resume=True, echo=None, pictures=False)
    with np.load(tmp_path / "a/model.npz") as a, np.load(tmp_path / "b/model.npz") as b:
        assert all(np.array_equal(a[k], b[k]) for k in ("W1", "b1", "W2", "b2"))
    assert straight["epochs"][-1]["augment_seconds"] > 0
    assert [r["train_loss"] for r in straight["epochs"]] == [r["train_loss"] for r in resumed["epochs"]]
