"""Small IDX files written by the tests themselves: no network, no shared data."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np

from backprop_xp.data import FILES

TYPE_BYTES = {"uint8": 0x08, "int8": 0x09, "int16": 0x0B, "int32": 0x0C, "float32": 0x0D, "float64": 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of ``array``: magic, big-endian sizes, big-endian values."""
    array = np.asarray(array)
    header = bytes([0, 0, TYPE_BYTES[array.dtype.name], array.ndim])
    header += b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` as IDX to ``path``, gzip-compressed when the name ends in .gz."""
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data, mtime=0) if path.name.endswith(".gz") else data)
    return path


def fake_mnist(
    n_train: int = 30, n_test: int = 12, rows: int = 4, cols: int = 5, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random uint8 images and labels in MNIST's layout, keyed like ``FILES``.

    Both ends of the pixel range and every label occur, so range checks see them.
    """
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, rows, cols), dtype=np.uint8)
        images[0, 0, 0], images[-1, -1, -1] = 0, 255
        labels = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(labels)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    return arrays


def write_mnist_folder(folder: Path, arrays: dict[str, np.ndarray] | None = None, *, gz: bool | dict = False) -> dict:
    """Write the four files into ``folder``; ``gz`` True, False, or per key. Returns the arrays."""
    arrays = fake_mnist() if arrays is None else arrays
    folder.mkdir(parents=True, exist_ok=True)
    for key, name in FILES.items():
        compressed = gz.get(key, False) if isinstance(gz, dict) else gz
        write_idx(folder / (name + ".gz" if compressed else name), arrays[key])
    return arrays


def sha256_of(array: np.ndarray) -> str:
    """SHA-256 of the (uncompressed) IDX encoding of ``array``."""
    return hashlib.sha256(idx_bytes(array)).hexdigest()
