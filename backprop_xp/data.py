"""MNIST from the standard IDX files. (Minimal first version; hardened by the data issue.)"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


class DataFormatError(ValueError):
    """A data file is not what it claims to be; the message names the file and the problem."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataFormatError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(folder: Path, name: str) -> Path:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{name}(.gz) not found in {folder}")


def load_mnist(data_dir=None, *, download=True):
    folder = Path(data_dir or os.environ.get("BACKPROP_XP_DATA") or Path.home() / ".cache/backprop_xp/mnist")
    arrays = {key: read_idx(_find(folder, name)) for key, name in FILES.items()}
    to_x = lambda a: (a.reshape(a.shape[0], -1).astype(np.float32) / 255.0)
    return (
        to_x(arrays["train_images"]),
        arrays["train_labels"].astype(np.int64),
        to_x(arrays["test_images"]),
        arrays["test_labels"].astype(np.int64),
    )
