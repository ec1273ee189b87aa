"""The data layer: the IDX reader, the MNIST loader, the split, standardisation and minibatches.

Small IDX files are written by the tests (tests/idx_files.py); the real-MNIST
tests read $BACKPROP_XP_DATA through the ``mnist`` fixtures of conftest.py.
"""

from __future__ import annotations

import gzip
import hashlib
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from idx_files import TYPE_BYTES, fake_mnist, idx_bytes, write_idx, write_mnist_folder
from standardize import fit_standardizer, standardize

import backprop_xp
from backprop_xp.data import (
    FILES,
    SHA256,
    DataFormatError,
    Minibatches,
    datasets,
    epoch_permutation,
    load_mnist,
    read_idx,
    train_val_split,
)
from backprop_xp.data import download as data

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]

# ---------------------------------------------------------------------------------------------
# The IDX reader


@pytest.mark.parametrize("dtype", list(TYPE_BYTES))
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_round_trips_every_type(tmp_path, dtype, suffix):
    rng = np.random.default_rng(1)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    if info is not None:  # include both extremes: sign and byte order errors show there
        values = rng.integers(info.min, info.max, size=(3, 4, 2), endpoint=True).astype(dtype)
        values.flat[0], values.flat[1] = info.min, info.max
    else:
        values = (rng.standard_normal((3, 4, 2)) * 1e3).astype(dtype)
    got = read_idx(write_idx(tmp_path / f"a-idx3{suffix}", values))
    assert got.dtype == np.dtype(dtype) and got.dtype.isnative
    assert got.shape == (3, 4, 2)
    np.testing.assert_array_equal(got, values)
    assert got.flags.writeable


@pytest.mark.parametrize("shape", [(7,), (2, 3), (0, 28, 28), (1, 1, 1, 1, 2)])
def test_read_idx_any_number_of_dimensions(tmp_path, shape):
    values = np.arange(int(np.prod(shape)), dtype=np.int16).reshape(shape)
    got = read_idx(write_idx(tmp_path / "x.gz", values))
    assert got.shape == shape
    np.testing.assert_array_equal(got, values)


def test_read_idx_exact_bytes_by_hand(tmp_path):
    # Written out byte by byte, independent of the test helper: int32, 1-D, [1, -2] big-endian.
    path = tmp_path / "h"
    path.write_bytes(bytes([0, 0, 0x0C, 1, 0, 0, 0, 2, 0, 0, 0, 1, 0xFF, 0xFF, 0xFF, 0xFE]))
    assert read_idx(path).tolist() == [1, -2]


VALID = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))


def _raises(path, *phrases):
    with pytest.raises(DataFormatError) as info:
        read_idx(path)
    message = str(info.value)
    assert str(path) in message, message
    for phrase in phrases:
        assert phrase in message, message
    return message


@pytest.mark.parametrize(
    "name, content, phrases",
    [
        ("a.gz", VALID, ["not a gzip file", ".gz"]),
        ("b", b"\x01\x02" + VALID[2:], ["wrong magic number 0x01020803"]),
        ("c", VALID[:2] + b"\x0a" + VALID[3:], ["wrong magic number 0x00000A03"]),
        ("d", VALID[:3] + b"\x00" + VALID[4:], ["0 dimensions"]),
        ("e", VALID[:3] + b"\x40", ["64 dimensions"]),
        ("f", VALID[:2], ["too short for an IDX header"]),
        ("g", VALID[:10], ["truncated", "dimension sizes"]),
        ("h", VALID[:-1], ["truncated", "(2, 3, 4)", "24 bytes", "holds 23"]),
        ("i", VALID + b"\x00", ["over-long", "(2, 3, 4)", "1 bytes too many"]),
        ("j.gz", gzip.compress(VALID[:-5]), ["truncated", "holds 19"]),
        ("k.gz", gzip.compress(VALID + b"abc"), ["over-long"]),
        ("l", gzip.compress(VALID), ["wrong magic", "looks gzip-compressed"]),
        ("m.gz", gzip.compress(VALID)[:-6], ["corrupt gzip data"]),  # the CRC trailer cut off
        ("n", b"", ["too short"]),
        # Zero values, but sizes whose product overflows: found by the bit-flip fuzz test.
        ("o", bytes([0, 0, 8, 4, 0, 0, 0, 0]) + b"\xff\xff\xff\xf0" * 3, ["not a shape NumPy can hold"]),
    ],
)
def test_read_idx_rejects_malformed_files_naming_file_and_problem(tmp_path, name, content, phrases):
    path = tmp_path / name
    path.write_bytes(content)
    _raises(path, *phrases)


def test_read_idx_detects_a_corrupted_gzip_payload(tmp_path):
    # Flip one bit in the deflate data: the CRC (or the inflater) must notice.
    blob = bytearray(gzip.compress(idx_bytes(np.arange(4096).astype(np.uint8)), mtime=0))
    blob[len(blob) // 2] ^= 0x10
    path = tmp_path / "flip.gz"
    path.write_bytes(bytes(blob))
    _raises(path, "corrupt gzip data")


def test_read_idx_huge_header_sizes_do_not_allocate(tmp_path):
    # A header promising 2^32-1 ^ 3 bytes must fail on the missing bytes, not on an allocation.
    path = tmp_path / "huge"
    path.write_bytes(bytes([0, 0, 8, 3]) + b"\xff" * 12 + b"\x00" * 5)
    _raises(path, "truncated", "holds 5")


def test_read_idx_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope")


# Fuzzing: whatever the bytes, read_idx returns an array or raises DataFormatError, nothing else.

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
VALID_GZ = gzip.compress(VALID, mtime=0)
VALID_I32 = idx_bytes(np.arange(-6, 6, dtype=np.int32).reshape(3, 4))


def _read_or_format_error(path):
    try:
        out = read_idx(path)
    except DataFormatError as exc:
        assert str(path) in str(exc)
        return None
    assert isinstance(out, np.ndarray)
    return out


@FUZZ
@given(content=st.binary(max_size=64), gz=st.booleans())
def test_fuzz_random_bytes(tmp_path, content, gz):
    path = tmp_path / ("r.gz" if gz else "r")
    path.write_bytes(content)
    _read_or_format_error(path)


@FUZZ
@given(source=st.sampled_from([VALID, VALID_I32, VALID_GZ]), data=st.data())
def test_fuzz_truncations_always_fail(tmp_path, source, data):
    cut = data.draw(st.integers(0, len(source) - 1))
    path = tmp_path / ("t.gz" if source is VALID_GZ else "t")
    path.write_bytes(source[:cut])
    assert _read_or_format_error(path) is None, f"a file cut to {cut} of {len(source)} bytes was accepted"


@FUZZ
@given(source=st.sampled_from([VALID, VALID_I32, VALID_GZ]), data=st.data())
def test_fuzz_bit_flips(tmp_path, source, data):
    blob = bytearray(source)
    for _ in range(data.draw(st.integers(1, 4))):
        blob[data.draw(st.integers(0, len(blob) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    path = tmp_path / ("f.gz" if source is VALID_GZ else "f")
    path.write_bytes(bytes(blob))
    out = _read_or_format_error(path)
    if out is not None and source is not VALID_GZ:
        # Accepted only if the header still describes exactly the payload.
        assert out.nbytes == len(blob) - 4 - 4 * blob[3]


@FUZZ
@given(content=st.binary(max_size=64), appended=st.binary(min_size=1, max_size=16))
def test_fuzz_gzip_with_anything_appended(tmp_path, content, appended):
    path = tmp_path / "a.gz"
    path.write_bytes(gzip.compress(VALID + content, mtime=0) + appended)
    _read_or_format_error(path)


# ---------------------------------------------------------------------------------------------
# load_mnist on small folders written by the tests


@pytest.fixture
def no_env(monkeypatch, tmp_path):
    """No $BACKPROP_XP_DATA (CI sets it) and a private, empty cache; downloads impossible."""
    monkeypatch.delenv("BACKPROP_XP_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setattr(data, "MIRRORS", ["http://127.0.0.1:9/never/"])
    return tmp_path


def _check_loaded(loaded, arrays):
    x_train, y_train, x_test, y_test = loaded
    for x, y, split in ((x_train, y_train, "train"), (x_test, y_test, "test")):
        images = arrays[f"{split}_images"]
        assert x.dtype == np.float32 and x.shape == (len(images), images[0].size) and x.flags.c_contiguous
        assert y.dtype == np.int64 and y.shape == (len(images),)
        # Exactly pixel / 255 computed in float32, pixel by pixel, in row-major order.
        np.testing.assert_array_equal(x, images.reshape(len(images), -1).astype(np.float32) / np.float32(255))
        np.testing.assert_array_equal(y, arrays[f"{split}_labels"])
        assert x.min() == 0.0 and x.max() == 1.0


@pytest.mark.parametrize("gz", [False, True, {"train_images": True, "test_labels": True}])
def test_load_mnist_from_a_folder(tmp_path, no_env, gz):
    arrays = write_mnist_folder(tmp_path / "m", gz=gz)
    _check_loaded(load_mnist(tmp_path / "m", download=False), arrays)
    _check_loaded(backprop_xp.load_mnist(str(tmp_path / "m")), arrays)  # str path, download on: no effect


def test_load_mnist_accepts_other_sets_in_mnist_layout(tmp_path, no_env):
    # Not MNIST's hashes, not 28x28, not 60k/10k: validated by structure only.
    arrays = write_mnist_folder(tmp_path / "m", fake_mnist(n_train=3, n_test=2, rows=2, cols=9))
    loaded = load_mnist(tmp_path / "m")
    assert loaded[0].shape == (3, 18) and loaded[2].shape == (2, 18)
    _check_loaded(loaded, arrays)


def test_where_it_looks_data_dir_then_env_then_cache(tmp_path, no_env, monkeypatch):
    a = write_mnist_folder(tmp_path / "a", fake_mnist(seed=1))
    b = write_mnist_folder(tmp_path / "b", fake_mnist(seed=2))
    c = write_mnist_folder(data.cache_dir(), fake_mnist(seed=3))
    assert data.cache_dir() == tmp_path / "xdg-cache" / "backprop_xp" / "mnist"
    _check_loaded(load_mnist(download=False), c)
    monkeypatch.setenv("BACKPROP_XP_DATA", str(tmp_path / "b"))
    _check_loaded(load_mnist(download=False), b)
    _check_loaded(load_mnist(tmp_path / "a", download=False), a)


def test_cache_dir_without_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data.cache_dir() == tmp_path / ".cache" / "backprop_xp" / "mnist"


def test_missing_file_names_the_folder_and_the_file(tmp_path, no_env):
    write_mnist_folder(tmp_path / "m")
    (tmp_path / "m" / FILES["test_labels"]).unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_mnist(tmp_path / "m", download=False)
    assert str(tmp_path / "m") in str(info.value) and FILES["test_labels"] in str(info.value)
    assert FILES["train_images"] not in str(info.value)


def test_a_named_folder_is_never_downloaded_into(tmp_path, no_env, monkeypatch):
    # download=True, but the folder was chosen by the user: a plain FileNotFoundError, no download attempt.
    monkeypatch.setattr(datasets, "fetch_mnist", lambda *a, **k: pytest.fail("tried to download"))
    for use_env in (False, True):
        if use_env:
            monkeypatch.setenv("BACKPROP_XP_DATA", str(tmp_path / "missing"))
        with pytest.raises(FileNotFoundError, match="does not exist") as info:
            load_mnist(None if use_env else tmp_path / "missing")
        assert str(tmp_path / "missing") in str(info.value)
        assert ("($BACKPROP_XP_DATA)" if use_env else "(data_dir)") in str(info.value)


def test_a_data_folder_that_is_a_file_is_called_a_file(tmp_path, no_env):
    (tmp_path / "notes.txt").write_text("not a folder")
    with pytest.raises(FileNotFoundError, match=r"notes.txt \(data_dir\) is a file, not a folder; point"):
        load_mnist(tmp_path / "notes.txt")


def test_empty_cache_without_download_names_the_cache(no_env):
    with pytest.raises(FileNotFoundError) as info:
        load_mnist(download=False)
    assert str(data.cache_dir()) in str(info.value) and "download=True" in str(info.value)
    assert not isinstance(info.value, data.DownloadError)


def _corrupt_folder(tmp_path, change):
    arrays = fake_mnist()
    change(arrays)
    write_mnist_folder(tmp_path / "m", arrays, gz=True)
    with pytest.raises(DataFormatError) as info:
        load_mnist(tmp_path / "m", download=False)
    return str(info.value)


def test_counts_that_differ_name_both_files(tmp_path, no_env):
    def drop_a_label(arrays):
        arrays["train_labels"] = arrays["train_labels"][:-1]

    message = _corrupt_folder(tmp_path, drop_a_label)
    assert "29 labels" in message and "30 images" in message
    assert FILES["train_labels"] in message and FILES["train_images"] in message


def test_label_outside_0_to_9(tmp_path, no_env):
    def bad_label(arrays):
        arrays["test_labels"][5] = 10

    message = _corrupt_folder(tmp_path, bad_label)
    assert FILES["test_labels"] in message and "label 10 at index 5" in message and "0-9" in message


@pytest.mark.parametrize(
    "key, replacement, phrase",
    [
        ("train_images", np.zeros((30, 20), np.uint8), "expected images"),  # 2-D
        ("train_images", np.zeros((30, 4, 5), np.int16), "expected images"),  # not bytes
        ("test_labels", np.zeros((12, 1), np.uint8), "expected labels"),
        ("test_labels", np.zeros(12, np.int32), "expected labels"),
        ("train_images", np.zeros((0, 4, 5), np.uint8), "no images"),
        ("test_images", np.zeros((12, 5, 5), np.uint8), "25 pixels"),  # differs from training size
    ],
)
def test_wrong_dimensions_or_types(tmp_path, no_env, key, replacement, phrase):
    def replace(arrays):
        arrays[key] = replacement
        if key == "train_images" and len(replacement) == 0:
            arrays["train_labels"] = arrays["train_labels"][:0]

    message = _corrupt_folder(tmp_path, replace)
    assert phrase in message and FILES[key] in message


def test_malformed_file_in_folder_is_a_format_error(tmp_path, no_env):
    write_mnist_folder(tmp_path / "m")
    (tmp_path / "m" / FILES["train_labels"]).write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x1e" + b"\x01" * 29)
    with pytest.raises(DataFormatError, match="truncated"):
        load_mnist(tmp_path / "m")


def test_show_data_command_uses_the_loader(tmp_path, no_env, capsys):
    from backprop_xp.cli import main

    arrays = write_mnist_folder(tmp_path / "m", fake_mnist(rows=28, cols=28), gz=True)
    out = tmp_path / "digits.png"
    assert main(["show-data", "--data-dir", str(tmp_path / "m"), "--out", str(out), "--count", "5"]) == 0
    printed = capsys.readouterr().out
    counts = " ".join(str(c) for c in np.bincount(arrays["train_labels"], minlength=10))
    assert counts in printed and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# Real MNIST ($BACKPROP_XP_DATA)


def test_real_mnist_shapes_types_range_and_counts(mnist):
    x_train, y_train, x_test, y_test = mnist
    assert x_train.shape == (60000, 784) and x_test.shape == (10000, 784)
    assert x_train.dtype == x_test.dtype == np.float32
    assert y_train.dtype == y_test.dtype == np.int64 and y_train.shape == (60000,) and y_test.shape == (10000,)
    for x in (x_train, x_test):
        assert x.min() == 0.0 and x.max() == 1.0
        # Every value is k/255 for an integer k: nothing was smoothed or widened on the way.
        k = x * np.float32(255)
        assert np.abs(k - np.round(k)).max() < 1e-4
    assert np.bincount(y_train, minlength=10).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(y_test, minlength=10).tolist() == MNIST_TEST_COUNTS


def test_real_mnist_matches_the_published_hashes(mnist_dir):
    # The constants the downloader checks against, verified on the real files.
    for name, expected in SHA256.items():
        path = data.find_file(mnist_dir, name)
        assert path is not None, f"{name} missing from {mnist_dir}"
        raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
        assert hashlib.sha256(raw).hexdigest() == expected, name


def test_real_mnist_first_image_and_label(mnist_dir, mnist):
    # Cross-check the loader against a direct read of the bytes at their documented offsets.
    path = data.find_file(mnist_dir, FILES["train_images"])
    raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    assert raw[:16] == bytes([0, 0, 8, 3, 0, 0, 0xEA, 0x60, 0, 0, 0, 28, 0, 0, 0, 28])
    first = np.frombuffer(raw, np.uint8, count=784, offset=16)
    np.testing.assert_array_equal(mnist[0][0] * np.float32(255), first.astype(np.float32))
    assert mnist[1][:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]


# ---------------------------------------------------------------------------------------------
# Validation split


def _indexed(n, d=3):
    """x whose row i is [i, i, ...] and y = i: every sample identifies itself."""
    return np.repeat(np.arange(n, dtype=np.float32)[:, None], d, axis=1), np.arange(n, dtype=np.int64)


def test_split_is_a_seeded_partition_in_original_order():
    x, y = _indexed(100)
    x_tr, y_tr, x_val, y_val = train_val_split(x, y, 25, seed=3)
    assert len(y_tr) == 75 and len(y_val) == 25
    assert sorted(np.concatenate([y_tr, y_val]).tolist()) == list(range(100))
    assert np.all(np.diff(y_tr) > 0) and np.all(np.diff(y_val) > 0)
    np.testing.assert_array_equal(x_tr[:, 0], y_tr)
    np.testing.assert_array_equal(x_val[:, 2], y_val)
    again = train_val_split(x, y, 25, seed=3)
    np.testing.assert_array_equal(again[3], y_val)
    other = train_val_split(x, y, 25, seed=4)
    assert other[3].tolist() != y_val.tolist()
    assert x_tr.dtype == np.float32 and y_tr.dtype == np.int64


def test_split_validation_set_is_not_the_first_epoch_order():
    # The split draws from its own stream: it must not reuse epoch 0's permutation of the same seed.
    x, y = _indexed(1000)
    _, _, _, y_val = train_val_split(x, y, 100, seed=0)
    assert sorted(y_val.tolist()) != sorted(epoch_permutation(0, 0, 1000)[:100].tolist())


def test_split_fraction_and_zero():
    x, y = _indexed(10)
    assert [len(a) for a in train_val_split(x, y, 0.25)] == [8, 8, 2, 2]  # round(2.5) = 2
    x_tr, y_tr, x_val, y_val = train_val_split(x, y, 0)
    assert x_tr is x and y_tr is y and x_val.shape == (0, 3) and y_val.shape == (0,)


@pytest.mark.parametrize("val_size", [-1, 10, 11, 0.0, 1.0, 1.5, True, "3", None])
def test_split_rejects_bad_sizes(val_size):
    x, y = _indexed(10)
    with pytest.raises(ValueError, match="val_size"):
        train_val_split(x, y, val_size)


def test_split_rejects_mismatched_lengths():
    x, y = _indexed(10)
    with pytest.raises(ValueError, match="10 samples but 9 labels"):
        train_val_split(x, y[:9], 2)


# ---------------------------------------------------------------------------------------------
# Standardisation


def test_standardizer_matches_float64_reference_across_chunks():
    rng = np.random.default_rng(0)
    # A large offset with a small spread: the naive E[x^2] - E[x]^2 in float32 would cancel to garbage.
    x = (1000.0 + rng.standard_normal((103, 6)) * np.array([1, 2, 3, 0.5, 0.25, 4])).astype(np.float32)
    for chunk in (1, 10, 4096):
        mean, std = fit_standardizer(x, chunk=chunk, min_std=1e-6)
        assert mean.dtype == std.dtype == np.float32 and mean.shape == std.shape == (6,)
        reference = x.astype(np.float64)
        np.testing.assert_allclose(mean, reference.mean(axis=0), rtol=1e-6)
        np.testing.assert_allclose(std, reference.std(axis=0), rtol=1e-5)
    z = standardize(x, mean, std)
    assert z.dtype == np.float32
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-3)
    np.testing.assert_allclose(z.std(axis=0), 1, rtol=1e-3)


def test_standardizer_floors_constant_features_and_copies():
    x = np.array([[0, 1, 5], [0, 3, 5], [0, 5, 5]], dtype=np.float32)
    mean, std = fit_standardizer(x, min_std=0.5)
    assert std.tolist() == [0.5, pytest.approx(np.sqrt(8 / 3)), 0.5]
    before = x.copy()
    z = standardize(x, mean, std)
    np.testing.assert_array_equal(x, before)  # the input is untouched
    assert np.all(np.isfinite(z)) and z[:, 0].tolist() == [0, 0, 0] and z[:, 2].tolist() == [0, 0, 0]
    z64 = standardize(x.astype(np.float64), mean, std)
    assert z64.dtype == np.float32


def test_standardizer_errors():
    with pytest.raises(ValueError, match="non-empty 2-D"):
        fit_standardizer(np.zeros((0, 3), np.float32))
    with pytest.raises(ValueError, match="min_std"):
        fit_standardizer(np.zeros((2, 3), np.float32), min_std=0)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        standardize(np.zeros((2, 3), np.float32), np.zeros(4, np.float32), np.ones(3, np.float32))


def test_standardizer_on_real_mnist_uses_training_statistics(mnist):
    x_train, _, x_test, _ = mnist
    mean, std = fit_standardizer(x_train)
    z = standardize(x_train[:20000], mean, std)
    varying = std > 0.1
    # Fit on the full training set, checked on a third of it: close to zero mean, unit spread.
    assert np.abs(z[:, varying].mean(axis=0)).max() < 0.1
    assert 0.9 < float(z[:, varying].std(axis=0).mean()) < 1.1
    assert np.abs(standardize(x_test, mean, std)).max() < 10.5  # the floor bounds rare pixels


# ---------------------------------------------------------------------------------------------
# Minibatches


def _epoch_arrays(batches, epoch):
    """Every batch of an epoch, each checked to be a C-contiguous view and copied as it comes
    (a batch lives in one of two reused buffers, valid until the batch after next)."""
    pairs = []
    for xb, yb in batches.epoch(epoch):
        assert xb.flags.c_contiguous and yb.flags.c_contiguous
        pairs.append((xb.copy(), yb.copy()))
    return np.concatenate([xb for xb, _ in pairs]), np.concatenate([yb for _, yb in pairs]), pairs


def test_minibatches_reuse_two_batch_buffers_and_keep_the_previous_batch_intact():
    x, y = _indexed(103)
    batches = Minibatches(x, y, 10, seed=3)
    it = batches.epoch(0)
    previous = next(it)
    saved = previous[1].copy()
    for current in it:
        np.testing.assert_array_equal(previous[1][: len(saved)], saved)  # not yet overwritten
        assert not np.shares_memory(current[0], previous[0])
        previous, saved = current, current[1].copy()
    # No shuffled copy of the data set: the buffers hold two batches, not 103 rows.
    assert sum(b.nbytes for b in batches._x_buffers) == 2 * 10 * x.shape[1] * 4


def test_minibatches_cover_every_sample_once_in_the_epoch_order():
    x, y = _indexed(103)
    batches = Minibatches(x, y, 10, seed=7)
    assert len(batches) == 11 and batches.n_samples == 103 and batches.batch_size == 10
    xs, ys, pairs = _epoch_arrays(batches, 2)
    assert [len(yb) for _, yb in pairs] == [10] * 10 + [3]
    np.testing.assert_array_equal(ys, epoch_permutation(7, 2, 103))
    np.testing.assert_array_equal(xs[:, 0], ys)  # x rows travel with their labels
    for xb, yb in pairs:  # every batch float32/int64, rows travelling with their labels
        assert xb.dtype == np.float32 and yb.dtype == np.int64
        np.testing.assert_array_equal(xb[:, 1], yb)


def test_minibatch_order_depends_only_on_seed_and_epoch():
    x, y = _indexed(50)
    first = Minibatches(x, y, 8, seed=1)
    order = {e: _epoch_arrays(first, e)[1] for e in (0, 1, 5)}
    assert order[0].tolist() != order[1].tolist()
    assert order[0].tolist() != order[5].tolist()  # (a != b != c never compares a with c)
    assert order[1].tolist() != order[5].tolist()
    resumed = Minibatches(x, y, 8, seed=1)  # a fresh object, as after a restart, starting at epoch 5
    np.testing.assert_array_equal(_epoch_arrays(resumed, 5)[1], order[5])
    np.testing.assert_array_equal(_epoch_arrays(first, 0)[1], order[0])  # and epochs can be revisited
    assert _epoch_arrays(Minibatches(x, y, 8, seed=2), 0)[1].tolist() != order[0].tolist()
    np.testing.assert_array_equal(_epoch_arrays(Minibatches(x, y, 25, seed=1), 1)[1], order[1])  # any batch size
    np.testing.assert_array_equal(np.concatenate([yb.copy() for _, yb in first(5)]), order[5])  # __call__


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 70), batch_size=st.integers(1, 80), seed=st.integers(0, 2**32), epoch=st.integers(0, 10**6))
def test_minibatches_property(n, batch_size, seed, epoch):
    x, y = _indexed(n, d=2)
    batches = Minibatches(x, y, batch_size, seed=seed)
    xs, ys, pairs = _epoch_arrays(batches, epoch)
    assert len(pairs) == len(batches) == -(-n // batch_size)
    assert all(len(yb) == batch_size for _, yb in pairs[:-1]) and 1 <= len(pairs[-1][1]) <= batch_size
    assert sorted(ys.tolist()) == list(range(n))
    np.testing.assert_array_equal(xs[:, 1], ys)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_minibatches_gathered_on_two_threads_are_numpys_take(monkeypatch, dtype):
    """With the fused step's two threads (``numba_loops.take_rows_loop_``): the same rows, bit for bit.

    float16, which Numba cannot compile, keeps NumPy's ``take``.
    """
    from backprop_xp.cpu import numba_loops

    if not numba_loops.active(np):
        pytest.skip("Numba not installed or the fast path off: NumPy's take gathers")
    previous = numba_loops._state["threads"]
    numba_loops.set_threads(2)
    try:
        if numba_loops.threads() < 2 or not numba_loops.can_share_pool():
            pytest.skip("no two threads shared with the BLAS here: NumPy's take gathers")
        monkeypatch.setattr(numba_loops, "SHARED_PARALLEL_MIN", 1)  # split even these small batches
        rng = np.random.default_rng(0)
        x, y = rng.standard_normal((203, 37), dtype=np.float32).astype(dtype), rng.integers(0, 10, 203)
        batches = Minibatches(x, y, 64, seed=5, dtype=dtype)
        assert (batches._take_rows is numba_loops.take_rows_loop_) == (dtype == np.float32)
        order = epoch_permutation(5, 4, 203)
        for i, (xb, yb) in enumerate(batches.epoch(4)):
            rows = order[i * 64 : (i + 1) * 64]
            assert np.array_equal(xb, np.take(x, rows, axis=0)) and np.array_equal(yb, y[rows])
    finally:
        numba_loops._state["threads"] = previous


def test_minibatches_in_order_without_shuffle_are_views():
    x, y = _indexed(25)
    batches = Minibatches(x, y, 10, shuffle=False)
    pairs = list(batches.epoch(3))
    np.testing.assert_array_equal(np.concatenate([yb for _, yb in pairs]), np.arange(25))
    assert all(np.shares_memory(xb, x) for xb, _ in pairs)


def test_minibatches_copy_only_when_needed():
    x, y = _indexed(20)
    assert Minibatches(x, y, 4).x is x  # already float32 and C-contiguous on NumPy: no copy
    x64 = x.astype(np.float64)
    batches = Minibatches(x64, y.astype(np.uint8), 4)
    assert batches.x.dtype == np.float32 and batches.y.dtype == np.int64
    x64[:] = -1  # the copy is independent of the caller's array
    assert _epoch_arrays(batches, 0)[0].min() >= 0
    assert Minibatches(x64, y, 4, dtype="float64").x.dtype == np.float64
    fortran = np.asfortranarray(x)
    assert Minibatches(fortran, y, 4).x.flags.c_contiguous


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": -3}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"batch_size": 4, "seed": -1}, "seed"),
        ({"batch_size": 4, "y": np.arange(9)}, "10 samples but 9 labels"),
        ({"batch_size": 4, "y": np.zeros(10, np.float32)}, "integer labels"),
        ({"batch_size": 4, "x": np.zeros(10, np.float32)}, "2-D"),
        ({"batch_size": 4, "x": np.zeros((0, 3), np.float32), "y": np.zeros(0, np.int64)}, "at least one sample"),
    ],
)
def test_minibatches_reject_bad_arguments(kwargs, match):
    x, y = _indexed(10)
    arguments = {"x": x, "y": y, **kwargs}
    with pytest.raises(ValueError, match=match):
        Minibatches(arguments.pop("x"), arguments.pop("y"), arguments.pop("batch_size"), **arguments)


@pytest.mark.parametrize("epoch", [-1, 1.0, None])
def test_minibatches_reject_bad_epochs(epoch):
    batches = Minibatches(*_indexed(10), 4)
    with pytest.raises(ValueError, match="epoch"):
        next(batches.epoch(epoch))


@pytest.mark.gpu
def test_minibatches_on_cupy_match_numpy_and_stay_on_the_device(cupy, monkeypatch):
    x, y = _indexed(1000, d=5)
    on_host = Minibatches(x, y, 64, seed=3)
    on_device = Minibatches(x, y, 64, xp=cupy, seed=3)
    assert isinstance(on_device.x, cupy.ndarray) and isinstance(on_device.y, cupy.ndarray)
    # Count host->device copies during an epoch: one, the permutation.
    copies = []
    real_asarray = cupy.asarray
    monkeypatch.setattr(cupy, "asarray", lambda *a, **k: copies.append(1) or real_asarray(*a, **k))
    for (xh, yh), (xd, yd) in zip(on_host.epoch(4), on_device.epoch(4), strict=True):
        assert isinstance(xd, cupy.ndarray) and xd.flags.c_contiguous and xd.dtype == cupy.float32
        assert yd.dtype == cupy.int64
        np.testing.assert_array_equal(cupy.asnumpy(xd), xh)
        np.testing.assert_array_equal(cupy.asnumpy(yd), yh)
    assert len(copies) == 1


def test_public_names_exported():
    assert backprop_xp.DataFormatError is DataFormatError and issubclass(DataFormatError, ValueError)
    assert backprop_xp.load_mnist is load_mnist
    assert os.fspath(data.cache_dir()).endswith(os.path.join("backprop_xp", "mnist"))


def test_minibatches_refuse_integer_pixels_as_the_model_does():
    """uint8 images would be served as floats 0-255 and train to chance level without a word."""
    x, y = np.full((8, 4), 200, np.uint8), np.arange(8) % 2
    with pytest.raises(ValueError, match=r"x holds integers \(pixel values 0-255\?\)"):
        Minibatches(x, y, 4)
    batches = Minibatches(np.eye(8, 4, dtype=np.uint8), y, 4)  # integer 0/1 features are fine
    assert next(iter(batches.epoch(0)))[0].dtype == np.float32
