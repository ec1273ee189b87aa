"""Augmentation: the identity when told to do nothing, seeded, and resumable bit for bit."""

from __future__ import annotations

import numpy as np

from backprop_xp.data.augment import distort, gaussian_matrix
from backprop_xp.training import TrainConfig, train

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
    # A spike becomes the Gaussian of width sigma around it (the identity matrix would keep the spike).
    spike = np.zeros(28, np.float32)
    spike[14] = 1.0
    offsets = np.arange(28) - 14
    expected = np.exp(-0.5 * (offsets / 2.0) ** 2) / (2.0 * np.sqrt(2 * np.pi))
    np.testing.assert_allclose(g @ spike, expected, rtol=1e-5, atol=1e-7)


# Only one kind of distortion at a time, its limit checked on a smooth blob whose centre of mass is
# followed: bilinear resampling moves the centre of mass of a smooth blob exactly as it moves the blob.
CENTRE = 13.5  # the centre of a 28 x 28 image, about which distort rotates and scales
_ROWS, _COLS = np.mgrid[0:28, 0:28].astype(np.float64)


def _blobs(n, row, col, width=1.2):
    blob = np.exp(-((_ROWS - row) ** 2 + (_COLS - col) ** 2) / (2 * width**2)).astype(np.float32)
    return np.repeat(blob.reshape(1, 784), n, axis=0)


def _centres(images):
    a = images.reshape(-1, 28, 28).astype(np.float64)
    mass = a.sum(axis=(1, 2))
    return (a * _ROWS).sum(axis=(1, 2)) / mass - CENTRE, (a * _COLS).sum(axis=(1, 2)) / mass - CENTRE


def test_shifts_stay_within_max_shift_and_reach_it():
    out = distort(_blobs(400, CENTRE, CENTRE), np.random.default_rng(1), **{**NOTHING, "max_shift": 2.0})
    for moved in _centres(out):
        assert np.abs(moved).max() <= 2.0 + 0.02
        assert moved.min() < -1.8 and moved.max() > 1.8  # the whole range is used, both ways


def test_rotations_stay_within_max_rotation_and_reach_it():
    # A blob 9 pixels right of the centre: a rotation moves it along the circle of radius 9.
    out = distort(_blobs(400, CENTRE, CENTRE + 9), np.random.default_rng(2), **{**NOTHING, "max_rotation": 12.0})
    rows, cols = _centres(out)
    angle = np.degrees(np.arctan2(rows, cols))
    np.testing.assert_allclose(np.hypot(rows, cols), 9.0, atol=0.02)  # no scaling, no shift
    assert np.abs(angle).max() <= 12.0 + 0.2
    assert angle.min() < -11 and angle.max() > 11


def test_scalings_stay_within_max_scale_and_reach_it():
    out = distort(_blobs(400, CENTRE, CENTRE + 9), np.random.default_rng(3), **{**NOTHING, "max_scale": 0.12})
    rows, cols = _centres(out)
    ratio = np.hypot(rows, cols) / 9.0
    np.testing.assert_allclose(np.degrees(np.arctan2(rows, cols)), 0.0, atol=0.05)  # no rotation
    assert ratio.min() >= 0.88 - 0.01 and ratio.max() <= 1.12 + 0.01
    assert ratio.min() < 0.9 and ratio.max() > 1.1


def test_an_augmented_run_resumes_bit_for_bit(mnist_dir, tmp_path):
    config = TrainConfig(
        hidden=16, train_size=1000, epochs=2, batch_size=100, augment=True, backend="numpy", data_dir=str(mnist_dir)
    )
    straight = train(config, tmp_path / "a", echo=None, pictures=False)
    train(config, tmp_path / "b", echo=None, pictures=False, stop_after=1)
    resumed = train(config, tmp_path / "b", resume=True, echo=None, pictures=False)
    with np.load(tmp_path / "a/model.npz") as a, np.load(tmp_path / "b/model.npz") as b:
        assert all(np.array_equal(a[k], b[k]) for k in ("W1", "b1", "W2", "b2"))
    assert straight["epochs"][-1]["augment_seconds"] > 0
    assert [r["train_loss"] for r in straight["epochs"]] == [r["train_loss"] for r in resumed["epochs"]]


def test_an_augmented_run_gathers_every_epoch_into_the_same_buffers(mnist_dir, tmp_path, monkeypatch):
    """The batch buffers keep their addresses from epoch to epoch: on a GPU the step's graphs read them there.

    A new Minibatches per epoch would gather into new buffers (the old ones are still alive when the new
    ones are allocated, so the addresses differ), and on CuPy every step after the first epoch would run
    eagerly without a word. NumPy has addresses too, so this is checked here, on the CPU.
    """
    from backprop_xp.training import run as train_module

    real = train_module.make_step
    addresses = []  # (x address, labels address) of every step, in order

    def make_step(*args, **kwargs):
        step = real(*args, **kwargs)

        def recorded(xb, yb):
            addresses.append((xb.ctypes.data, yb.ctypes.data))
            return step(xb, yb)

        return recorded

    monkeypatch.setattr(train_module, "make_step", make_step)
    config = TrainConfig(
        hidden=16, train_size=1000, epochs=3, batch_size=100, augment=True, backend="numpy", data_dir=str(mnist_dir)
    )
    train(config, tmp_path, echo=None, pictures=False)
    per_epoch = [addresses[i : i + 10] for i in range(0, 30, 10)]
    assert len(addresses) == 30 and len(set(per_epoch[0])) == 2  # two buffers, in turn
    assert per_epoch[1] == per_epoch[0] and per_epoch[2] == per_epoch[0]
