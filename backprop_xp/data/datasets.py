"""Loading a data set as arrays: the four files checked to fit together, then a validation split.

``load_mnist`` finds the four files (``data_dir``, else ``$BACKPROP_XP_DATA``,
else the cache that ``download.fetch_mnist`` fills), checks that they fit
together, and returns float32 images in [0, 1] and int64 labels;
``train_val_split`` holds some out. ``data_env`` is the one reader of the
data sets' environment variables; ``folder_to_test_on`` says where a saved
model's test set is found.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .download import FILES, cache_dir, dataset_info, fetch_mnist, find_file
from .idx import DataFormatError, read_idx

# The name of each class, by label, for every data set: what pictures and printed tables show for a class.
CLASS_NAMES = {
    "mnist": ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9"),
    "fashion-mnist": (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ),
}  # fmt: skip


def class_names(dataset: str, n_classes: int = 10) -> list[str]:
    """The names of classes ``0 .. n_classes-1`` of ``dataset``; the labels as numbers where it has none.

    >>> class_names("fashion-mnist")[:3]
    ['T-shirt/top', 'Trouser', 'Pullover']
    >>> class_names("my-own-set", 3)
    ['0', '1', '2']
    """
    names = CLASS_NAMES.get(dataset, ())
    return list(names) if len(names) == n_classes else [str(k) for k in range(n_classes)]


def classes_of(config: dict, n_classes: int) -> list[str]:
    """The class names of a run, from its config: the ``classes`` it saved, else its ``dataset``'s (MNIST if none).

    >>> classes_of({"dataset": "fashion-mnist"}, 10)[-1], classes_of({}, 10)[-1]
    ('Ankle boot', '9')
    """
    saved = config.get("classes")
    if isinstance(saved, list) and len(saved) == n_classes:
        return [str(name) for name in saved]
    return class_names(str(config.get("dataset", "mnist")), n_classes)


def _check_images(images: np.ndarray, path: Path) -> None:
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DataFormatError(
            f"{path}: expected images (IDX magic 0x00000803: unsigned bytes, 3 dimensions), "
            f"found {images.dtype.name} with {images.ndim} dimension(s), shape {images.shape}"
        )
    if images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        raise DataFormatError(f"{path}: no images: shape {images.shape}")


def _check_labels(labels: np.ndarray, path: Path, images_path: Path, n_images: int) -> None:
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataFormatError(
            f"{path}: expected labels (IDX magic 0x00000801: unsigned bytes, 1 dimension), "
            f"found {labels.dtype.name} with {labels.ndim} dimension(s), shape {labels.shape}"
        )
    if len(labels) != n_images:
        raise DataFormatError(f"{path}: {len(labels)} labels, but {images_path} holds {n_images} images")
    if labels.max() > 9:
        bad = int(np.argmax(labels > 9))
        raise DataFormatError(f"{path}: label {labels[bad]} at index {bad} is outside 0-9")


def _to_unit_float32(images: np.ndarray) -> np.ndarray:
    """uint8 (n, rows, cols) -> float32 (n, rows*cols) in [0, 1], with no float64 copy on the way."""
    flat = images.reshape(len(images), -1)
    return np.divide(flat, np.float32(255), out=np.empty(flat.shape, np.float32))


def load_mnist(
    data_dir: str | os.PathLike | None = None, *, download: bool = True, dataset: str = "mnist"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load MNIST, Fashion-MNIST (``dataset="fashion-mnist"``) or any data set stored in their layout.

    Where it looks: ``data_dir`` if given, else the data set's environment
    variable if set (``$BACKPROP_XP_DATA`` for MNIST, ``$BACKPROP_XP_FASHION_DATA``
    for Fashion-MNIST), else the per-user cache (``cache_dir(dataset)``). Only the cache is ever
    downloaded into: a folder you name must already hold the four files
    (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally
    ``.gz``). Those are checked by structure, not by hash, so any image
    classification set in this layout (Fashion-MNIST, say) loads the same way.
    Files reach the cache only through ``fetch_mnist``, which renames each into
    place after its SHA-256 matched: the cache holds nothing unverified.

    Parameters
    ----------
    data_dir : path, optional
        Folder with the four files.
    download : bool
        Fetch files missing from the cache from the data set's mirrors (checked by SHA-256).
    dataset : {"mnist", "fashion-mnist"}
        Which data set; it decides the environment variable, cache, mirrors and hashes.

    Returns
    -------
    x_train, y_train, x_test, y_test : numpy.ndarray
        ``x`` float32 of shape ``(n, rows*cols)`` with values ``pixel / 255`` in
        [0, 1]; ``y`` int64 of shape ``(n,)`` with values 0-9. For MNIST, 60,000
        training and 10,000 test images of 28 x 28.

    Raises
    ------
    FileNotFoundError
        A file is missing from the folder and cannot be downloaded (the message
        names the folder and the files); ``DownloadError`` when mirrors failed.
    DataFormatError
        A file is malformed, images and labels disagree in count, a label is
        outside 0-9, or the training and test images differ in size.
    """
    title, env, _, _ = dataset_info(dataset)
    folder, chosen_by, may_download = data_folder(dataset, data_dir)
    missing = [name for name in FILES.values() if find_file(folder, name) is None]
    if missing and may_download and download:
        fetch_mnist(folder, dataset=dataset)
    elif missing:
        if folder.exists() and not folder.is_dir():
            problem = "is a file, not a folder"
        elif not folder.is_dir():
            problem = "does not exist"
        else:
            problem = "lacks " + ", ".join(f"{name}(.gz)" for name in missing)
        advice = (
            "call with download=True to fetch them"
            if may_download
            else f"point data_dir / --data-dir or {env} at a folder with the four {title} files"
        )
        raise FileNotFoundError(f"{title} folder {folder} ({chosen_by}) {problem}; {advice}")

    paths = {key: find_file(folder, name) for key, name in FILES.items()}
    out = []
    for split in ("train", "test"):
        images_path, labels_path = paths[f"{split}_images"], paths[f"{split}_labels"]
        images = read_idx(images_path)
        _check_images(images, images_path)
        labels = read_idx(labels_path)
        _check_labels(labels, labels_path, images_path, len(images))
        out += [_to_unit_float32(images), labels.astype(np.int64)]
        del images  # free the uint8 copy before reading the next file
    x_train, y_train, x_test, y_test = out
    if x_train.shape[1] != x_test.shape[1]:
        raise DataFormatError(
            f"{paths['test_images']}: test images have {x_test.shape[1]} pixels, "
            f"the training images in {paths['train_images']} have {x_train.shape[1]}"
        )
    return x_train, y_train, x_test, y_test


def data_folder(dataset: str = "mnist", data_dir: str | os.PathLike | None = None) -> tuple[Path, str, bool]:
    """Where ``load_mnist`` looks: ``(absolute folder, what chose it, whether it may be downloaded into)``.

    ``data_dir``, else the data set's environment variable, else its cache. A
    relative folder (``BACKPROP_XP_DATA=../shared/mnist``, ``--data-dir data``) is
    resolved here, once, against the folder the program runs in, so that a run
    that records it, or a process that works from another folder, still finds it.
    """
    env, named = data_env(dataset)
    if data_dir is not None:
        return Path(os.path.abspath(data_dir)), "data_dir", False
    if named:
        return Path(os.path.abspath(named)), f"${env}", False
    return Path(os.path.abspath(cache_dir(dataset))), "the cache", True


def data_env(dataset: str) -> tuple[str, str | None]:
    """The environment variable that names ``dataset``'s folder, and the folder it names (None when unset or empty).

    The one place that reads it: the loader and the command line's checks ask
    here, so that they cannot disagree on what an empty variable means.

    >>> data_env("fashion-mnist")[0]
    'BACKPROP_XP_FASHION_DATA'
    """
    env = dataset_info(dataset)[1]
    return env, os.environ.get(env) or None


def trained_on(config: dict) -> tuple[str, str | None]:
    """The data set a run's saved config says it was trained on, and the folder its data came from, if it says.

    Older model files say nothing: MNIST, from wherever the loader looks.

    >>> trained_on({"dataset": "fashion-mnist", "data_dir": "/data/f"}), trained_on({})
    (('fashion-mnist', '/data/f'), ('mnist', None))
    """
    folder = config.get("data_dir")
    return str(config.get("dataset", "mnist")), str(folder) if folder else None


def folder_to_test_on(config: dict, dataset: str, data_dir: str | None) -> str | None:
    """The folder to load ``dataset``'s test set from, for a model whose run saved ``config``.

    ``data_dir`` if given. Else, for the run's own data set, the folder the run
    read (if it still exists), unless the environment names one: the loader
    would otherwise try the download cache first. Else None: the loader's default.
    """
    run_dataset, run_folder = trained_on(config)
    if data_dir is None and dataset == run_dataset and run_folder and os.path.isdir(run_folder):
        if data_env(dataset)[1] is None:
            return run_folder
    return data_dir


def load_dataset(
    name: str = "mnist", data_dir: str | os.PathLike | None = None, *, download: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``load_mnist(data_dir, download=download, dataset=name)``: the data set called ``name``."""
    return load_mnist(data_dir, download=download, dataset=name)


def check_pair(x, y) -> int:
    if getattr(x, "ndim", None) != 2:
        raise ValueError(f"x must be a 2-D array (n_samples, n_features), got shape {getattr(x, 'shape', None)}")
    if getattr(y, "ndim", None) != 1:
        raise ValueError(f"y must be a 1-D array (n_samples,), got shape {getattr(y, 'shape', None)}")
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length: {len(x)} samples but {len(y)} labels")
    return len(x)


def train_val_split(
    x: np.ndarray, y: np.ndarray, val_size: int | float, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Carve a seeded random validation set out of a training set.

    Parameters
    ----------
    x, y : numpy.ndarray
        ``(n, d)`` inputs and ``(n,)`` labels.
    val_size : int or float
        How many samples to hold out (``0`` = none), or a fraction in (0, 1).
    seed : int
        Which samples: the same seed picks the same ones.

    Returns
    -------
    x_train, y_train, x_val, y_val : numpy.ndarray
        Each part keeps the original order. With ``val_size == 0``, ``x`` and
        ``y`` themselves (no copy) and empty validation arrays.

    Examples
    --------
    >>> x, y = np.arange(20, dtype=np.float32).reshape(10, 2), np.arange(10)
    >>> xt, yt, xv, yv = train_val_split(x, y, 3, seed=1)
    >>> len(yt), len(yv), sorted(np.concatenate([yt, yv]).tolist()) == list(range(10))
    (7, 3, True)
    """
    n = check_pair(x, y)
    if isinstance(val_size, bool) or not isinstance(val_size, (int, np.integer, float, np.floating)):
        raise ValueError(f"val_size must be an int count or a float fraction, got {val_size!r}")
    if isinstance(val_size, (float, np.floating)):
        if not 0.0 < val_size < 1.0:
            raise ValueError(f"val_size as a fraction must lie in (0, 1), got {val_size}")
        val_size = max(1, round(val_size * n))
    val_size = int(val_size)
    if not 0 <= val_size < n:
        raise ValueError(
            f"val_size must be in [0, {n - 1}] for {n} samples (some must remain to train on), got {val_size}"
        )
    if val_size == 0:
        return x, y, x[:0], y[:0]
    # Its own stream (spawn_key), independent of the minibatch order drawn from [seed, epoch].
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
    is_val = np.zeros(n, dtype=bool)
    is_val[rng.choice(n, size=val_size, replace=False)] = True
    return x[~is_val], y[~is_val], x[is_val], y[is_val]
