"""MNIST: reading the IDX files, downloading them once, splitting and batching.

Four parts, in the order data flows through them:

1. ``read_idx`` reads one IDX file (the format MNIST ships in), gzip-compressed
   or not, and refuses anything it does not fully understand with a
   ``DataFormatError`` naming the file and the problem.
2. ``load_mnist`` finds the four files (``data_dir``, else ``$BACKPROP_XP_DATA``,
   else a per-user cache that ``fetch_mnist`` fills from public mirrors,
   checking the SHA-256 of every download), checks that they fit together, and
   returns float32 images in [0, 1] and int64 labels.
3. ``train_val_split``, ``fit_standardizer`` and ``standardize`` prepare them.
4. ``Minibatches`` moves a set to the backend once (the GPU, for CuPy) and
   serves shuffled batches from there, so no step copies from the host.

The IDX format: a 4-byte magic number ``0x00 0x00 <type> <ndim>``, then ``ndim``
big-endian uint32 sizes, then the values, big-endian, row-major.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import math
import os
import sys
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np

from .files import atomic_write

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# SHA-256 of the *decompressed* files: the same whether a mirror serves .gz or not.
SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

# Base URLs serving "<name>.gz", tried in order. A list, so callers (and tests) can replace it.
MIRRORS = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
]

# Fashion-MNIST (Xiao, Rasul and Vollgraf, Zalando Research, MIT licence): the same layout and file
# names, 10 classes of clothing. SHA-256 of the decompressed files, which match the publisher's MD5s.
FASHION_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
FASHION_MIRRORS = [
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
]

# name -> (title, environment variable naming its folder, names of its SHA-256 table and mirror
# list in this module). Looked up by name at call time, so that tests can replace a table or list.
DATASETS = {
    "mnist": ("MNIST", "BACKPROP_XP_DATA", "SHA256", "MIRRORS"),
    "fashion-mnist": ("Fashion-MNIST", "BACKPROP_XP_FASHION_DATA", "FASHION_SHA256", "FASHION_MIRRORS"),
}


def _dataset(name: str) -> tuple[str, str, dict[str, str], list[str]]:
    """(title, environment variable, SHA-256 table, mirrors) of the data set ``name``."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}: choose one of {', '.join(DATASETS)}")
    title, env, sha256, mirrors = DATASETS[name]
    return title, env, globals()[sha256], globals()[mirrors]


# IDX type byte -> element type (big-endian, as stored).
IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
MAX_NDIM = 32  # what every NumPy version can hold; a larger count is a corrupt header
_CHUNK = 1 << 20  # read and download in 1 MiB pieces


class DataFormatError(ValueError):
    """A data file is not what it claims to be; the message names the file and the problem."""


class ChecksumError(DataFormatError):
    """A downloaded file's SHA-256 differs from the expected one (the download was deleted)."""


class DownloadError(FileNotFoundError):
    """A file is missing and no mirror could provide it; the message lists each mirror's failure.

    A ``FileNotFoundError`` because that is what it means to the caller: the
    data is not there. Code that handles a missing file handles this too.
    """


# ---------------------------------------------------------------------------------------------
# 1. The IDX reader


def _describe_magic(magic: bytes) -> str:
    return "0x" + magic.hex().upper()


def _read_exactly(f, n: int, path: Path, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise DataFormatError(f"{path}: truncated: the file ends inside the {what} ({len(data)} of {n} bytes)")
    return data


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file into a NumPy array of native byte order.

    A name ending in ``.gz`` is decompressed on the fly. The header decides the
    element type (magic byte 3: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64) and the number of dimensions (byte 4); then come
    that many big-endian uint32 sizes, then exactly ``prod(sizes)`` values.

    Parameters
    ----------
    path : str or os.PathLike
        The file.

    Returns
    -------
    numpy.ndarray
        Shape given by the header, writable, in native byte order.

    Raises
    ------
    DataFormatError
        Not gzip although named ``.gz``; a corrupt gzip stream; an unknown magic
        number; fewer or more value bytes than the header's sizes promise. The
        message names the file and what is wrong.
    FileNotFoundError
        The file does not exist.

    Examples
    --------
    >>> import os, tempfile
    >>> p = os.path.join(tempfile.mkdtemp(), "tiny-idx2-ubyte")
    >>> _ = open(p, "wb").write(bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3, 4, 5, 6]))
    >>> read_idx(p)
    array([[1, 2, 3],
           [4, 5, 6]], dtype=uint8)
    """
    path = Path(path)
    gzipped = path.name.endswith(".gz")
    with open(path, "rb") as raw:
        if gzipped and raw.read(2) != b"\x1f\x8b":
            raise DataFormatError(f"{path}: not a gzip file, although its name ends in .gz")
        raw.seek(0)
        f = gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else raw
        try:
            return _read_idx_stream(f, path, gzipped)
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            # A damaged gzip stream: wrong CRC, cut short, or garbage inside.
            raise DataFormatError(f"{path}: truncated or corrupt gzip data ({exc or type(exc).__name__})") from None


def _read_idx_stream(f, path: Path, gzipped: bool) -> np.ndarray:
    magic = f.read(4)
    if len(magic) < 4:
        raise DataFormatError(f"{path}: too short for an IDX header ({len(magic)} bytes, need at least 4)")
    if magic[0] != 0 or magic[1] != 0 or magic[2] not in IDX_DTYPES:
        hint = " (it looks gzip-compressed: name it .gz)" if magic[:2] == b"\x1f\x8b" and not gzipped else ""
        raise DataFormatError(
            f"{path}: wrong magic number {_describe_magic(magic)}: an IDX file starts with 0x0000 then a type "
            f"byte in {{{', '.join(f'0x{t:02X}' for t in IDX_DTYPES)}}}{hint}"
        )
    dtype, ndim = IDX_DTYPES[magic[2]], magic[3]
    if not 1 <= ndim <= MAX_NDIM:
        raise DataFormatError(f"{path}: magic number {_describe_magic(magic)} gives {ndim} dimensions (need 1 to {MAX_NDIM})")
    sizes = _read_exactly(f, 4 * ndim, path, "header's dimension sizes")
    shape = tuple(int.from_bytes(sizes[4 * i : 4 * i + 4], "big") for i in range(ndim))
    expected = math.prod(shape) * dtype.itemsize

    # Read what is there, never trusting the header with an allocation: a corrupt size
    # field can promise terabytes. Memory grows only with bytes actually read.
    payload = bytearray()
    while len(payload) < expected:
        chunk = f.read(min(_CHUNK, expected - len(payload)))
        if not chunk:
            raise DataFormatError(
                f"{path}: truncated: the header says shape {shape} of {dtype.name} ({expected} bytes of values), "
                f"the file holds {len(payload)}"
            )
        payload += chunk
    if f.read(1):
        extra = ""
        if not gzipped:
            extra = f" ({os.fstat(f.fileno()).st_size - 4 - 4 * ndim - expected} bytes too many)"
        raise DataFormatError(
            f"{path}: over-long: more bytes than the header's shape {shape} of {dtype.name} "
            f"({expected} bytes of values) accounts for{extra}"
        )
    try:
        values = np.frombuffer(payload, dtype=dtype).reshape(shape)
    except ValueError:  # e.g. a zero size beside sizes whose product overflows: NumPy cannot hold the shape
        raise DataFormatError(f"{path}: the header's shape {shape} is not a shape NumPy can hold") from None
    # Native byte order (CuPy and most code expect it); a no-op for one-byte types.
    return values if dtype.itemsize == 1 else values.astype(dtype.newbyteorder("="))


# ---------------------------------------------------------------------------------------------
# 2. Finding, downloading and loading MNIST


def cache_dir(dataset: str = "mnist") -> Path:
    """The per-user cache of a data set: ``$XDG_CACHE_HOME/backprop_xp/<dataset>``, else under ``~/.cache``."""
    _dataset(dataset)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "backprop_xp" / dataset


def find_file(folder: str | os.PathLike, name: str) -> Path | None:
    """``folder/name`` or ``folder/name.gz``, whichever exists (the plain one first), else None."""
    for candidate in (Path(folder) / name, Path(folder) / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


class _GunzipSha256:
    """SHA-256 of the decompressed content of a gzip stream fed in pieces."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._unzip = zlib.decompressobj(wbits=31)  # 31: expect the gzip wrapper

    def update(self, chunk: bytes) -> None:
        while chunk:
            if self._unzip.eof:  # a second gzip member follows the first
                self._unzip = zlib.decompressobj(wbits=31)
            self._sha.update(self._unzip.decompress(chunk))
            chunk = self._unzip.unused_data if self._unzip.eof else b""

    def hexdigest(self) -> str:
        if not self._unzip.eof:
            raise zlib.error("the gzip stream ends early")
        return self._sha.hexdigest()


def _progress_bar(total: int | None, name: str, progress: bool | None):
    from tqdm import tqdm

    enabled = sys.stderr.isatty() if progress is None else progress
    return tqdm(total=total, desc=name, unit="B", unit_scale=True, unit_divisor=1024, leave=False, disable=not enabled)


def download_file(
    url: str,
    dest: str | os.PathLike,
    sha256: str | None = None,
    *,
    timeout: float = 30.0,
    progress: bool | None = None,
) -> Path:
    """Download ``url`` to ``dest`` atomically, checking the SHA-256 of its content first.

    The bytes go to a temporary file beside ``dest``, which is renamed to
    ``dest`` only when the download is complete and the hash matches; on any
    failure the temporary file is deleted and ``dest`` is left as it was.

    Parameters
    ----------
    url : str
        What to download.
    dest : str or os.PathLike
        Where to put it. A name ending in ``.gz`` means gzip: the hash is then
        taken over the *decompressed* content.
    sha256 : str, optional
        Expected hex digest; None skips the check.
    timeout : float
        Seconds to wait for the connection or for the next bytes.
    progress : bool, optional
        Show a tqdm bar; None (default) shows it only when stderr is a terminal.

    Raises
    ------
    ChecksumError
        The hash differs (the message names the file and both hashes).
    DataFormatError
        ``.gz`` content that is not valid gzip, or fewer bytes than announced.
    urllib.error.URLError, http.client.HTTPException, OSError
        The server or the network failed.
    """
    dest = Path(dest)
    gzipped = dest.name.endswith(".gz")
    request = urllib.request.Request(url, headers={"User-Agent": "backprop-xp (python urllib)"})
    hasher = _GunzipSha256() if gzipped else hashlib.sha256()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        response = stack.enter_context(urllib.request.urlopen(request, timeout=timeout))
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        bar = stack.enter_context(_progress_bar(total, dest.name, progress))
        out = stack.enter_context(atomic_write(dest, "wb"))  # innermost: closed (renamed or deleted) first
        received = 0
        try:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                hasher.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
            if total is not None and received != total:
                raise DataFormatError(f"{url}: the server announced {total} bytes and sent {received}")
            got = hasher.hexdigest()
        except zlib.error as exc:  # an HTML error page served as 200, a cut stream, garbage
            raise DataFormatError(f"{url}: not a complete gzip file ({exc})") from None
        if sha256 is not None and got != sha256.lower():
            raise ChecksumError(
                f"{dest.name} from {url}: SHA-256 of the {'decompressed ' if gzipped else ''}content is {got}, "
                f"expected {sha256.lower()}; the download was deleted"
            )
    return dest


def fetch_mnist(
    folder: str | os.PathLike | None = None,
    *,
    mirrors: Sequence[str] | None = None,
    sha256: dict[str, str] | None = None,
    timeout: float = 30.0,
    progress: bool | None = None,
    dataset: str = "mnist",
) -> Path:
    """Download whichever of the four files of ``dataset`` (MNIST by default) are missing from ``folder``.

    Each missing file is fetched as ``<name>.gz`` from the first mirror that
    delivers it intact (the SHA-256 of its decompressed content must match);
    a failing mirror is reported and the next one tried.

    Parameters
    ----------
    folder : path, optional
        Where the files go; default ``cache_dir(dataset)``.
    mirrors : sequence of str, optional
        Base URLs (``<base><name>.gz``); default the data set's (``MIRRORS``, ``FASHION_MIRRORS``).
    sha256 : dict, optional
        Expected hashes by file name; default the data set's (``SHA256``, ``FASHION_SHA256``).
    timeout, progress
        As in ``download_file``.
    dataset : {"mnist", "fashion-mnist"}
        Which data set (see ``DATASETS``).

    Returns
    -------
    pathlib.Path
        The folder, now holding all four files.

    Raises
    ------
    ChecksumError
        Every mirror failed and at least one served content with a wrong hash.
    DownloadError
        Every mirror failed (a ``FileNotFoundError``); the message lists each failure.
    """
    title, _, known_sha256, known_mirrors = _dataset(dataset)
    folder = Path(folder) if folder is not None else cache_dir(dataset)
    mirrors = list(known_mirrors if mirrors is None else mirrors)
    sha256 = known_sha256 if sha256 is None else sha256
    if not mirrors:
        raise DownloadError(f"cannot download {title} into {folder}: the list of mirrors is empty")
    for name in FILES.values():
        if find_file(folder, name) is not None:
            continue
        failures = []
        for i, base in enumerate(mirrors):
            url = base.rstrip("/") + "/" + name + ".gz"
            try:
                download_file(url, folder / f"{name}.gz", sha256[name], timeout=timeout, progress=progress)
                break
            except (urllib.error.URLError, http.client.HTTPException, OSError, DataFormatError) as exc:
                reason = str(exc) or type(exc).__name__
                failures.append((exc, reason if url in reason else f"{url}: {reason}"))
                if i + 1 < len(mirrors):
                    print(f"backprop-xp: {failures[-1][1]}; trying the next mirror", file=sys.stderr)
        else:
            listing = "; ".join(reason for _, reason in failures)
            if any(isinstance(exc, ChecksumError) for exc, _ in failures):
                raise ChecksumError(f"no mirror delivered an intact {name} ({listing})")
            raise DownloadError(
                f"could not download {name} into {folder} from any mirror ({listing}). Offline? Put the four "
                f"{title} files in a folder and pass data_dir / --data-dir or set {_dataset(dataset)[1]}"
            )
    return folder


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
    title, env, _, _ = _dataset(dataset)
    if data_dir is not None:
        folder, chosen_by, may_download = Path(data_dir), "data_dir", False
    elif os.environ.get(env):
        folder, chosen_by, may_download = Path(os.environ[env]), f"${env}", False
    else:
        folder, chosen_by, may_download = cache_dir(dataset), "the cache", True

    missing = [name for name in FILES.values() if find_file(folder, name) is None]
    if missing and may_download and download:
        fetch_mnist(folder, dataset=dataset)
    elif missing:
        if not folder.is_dir():
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


def load_dataset(
    name: str = "mnist", data_dir: str | os.PathLike | None = None, *, download: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``load_mnist(data_dir, download=download, dataset=name)``: the data set called ``name``."""
    return load_mnist(data_dir, download=download, dataset=name)


# ---------------------------------------------------------------------------------------------
# 3. Validation split and standardisation


def _check_pair(x, y) -> int:
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
    n = _check_pair(x, y)
    if isinstance(val_size, bool) or not isinstance(val_size, (int, np.integer, float, np.floating)):
        raise ValueError(f"val_size must be an int count or a float fraction, got {val_size!r}")
    if isinstance(val_size, (float, np.floating)):
        if not 0.0 < val_size < 1.0:
            raise ValueError(f"val_size as a fraction must lie in (0, 1), got {val_size}")
        val_size = max(1, round(val_size * n))
    val_size = int(val_size)
    if not 0 <= val_size < n:
        raise ValueError(f"val_size must be in [0, {n - 1}] for {n} samples (some must remain to train on), got {val_size}")
    if val_size == 0:
        return x, y, x[:0], y[:0]
    # Its own stream (spawn_key), independent of the minibatch order drawn from [seed, epoch].
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
    is_val = np.zeros(n, dtype=bool)
    is_val[rng.choice(n, size=val_size, replace=False)] = True
    return x[~is_val], y[~is_val], x[is_val], y[is_val]


def fit_standardizer(x: np.ndarray, *, min_std: float = 0.1, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation of ``x`` (fit on training data only).

    Accumulated over row chunks in float64 (Chan's parallel update), so no
    full-size temporary is made and a large mean does not cancel the variance.

    Parameters
    ----------
    x : numpy.ndarray
        ``(n, d)``.
    min_std : float
        Floor for the standard deviation. Constant features (MNIST's border
        pixels) would otherwise divide by zero, and near-constant ones blow rare
        values up: on MNIST a floor of 0.1 keeps every standardized pixel within
        about +-10 (340 of 784 pixels hit it), while 1e-3 lets test pixels reach 400.
    chunk : int
        Rows per accumulation step.

    Returns
    -------
    mean, std : numpy.ndarray
        float32, shape ``(d,)``; ``std >= min_std``.

    Examples
    --------
    >>> mean, std = fit_standardizer(np.array([[0, 1], [0, 3]], dtype=np.float32))
    >>> mean.tolist(), std.tolist()
    ([0.0, 2.0], [0.10000000149011612, 1.0])
    """
    if getattr(x, "ndim", None) != 2 or len(x) == 0:
        raise ValueError(f"x must be a non-empty 2-D array (n_samples, n_features), got shape {getattr(x, 'shape', None)}")
    if not min_std > 0:
        raise ValueError(f"min_std must be > 0, got {min_std}")
    count, mean, m2 = 0, np.zeros(x.shape[1]), np.zeros(x.shape[1])
    for start in range(0, len(x), chunk):
        block = np.asarray(x[start : start + chunk], dtype=np.float64)
        k, block_mean = len(block), block.mean(axis=0)
        block_m2 = ((block - block_mean) ** 2).sum(axis=0)
        delta = block_mean - mean
        total = count + k
        mean += delta * (k / total)
        m2 += block_m2 + delta**2 * (count * k / total)
        count = total
    std = np.sqrt(m2 / count)
    return mean.astype(np.float32), np.maximum(std, min_std).astype(np.float32)


def standardize(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` as a new float32 array (``mean``, ``std`` from ``fit_standardizer``).

    >>> standardize(np.array([[1.0, 5.0]], np.float32), np.array([1.0, 1.0], np.float32), np.array([1.0, 2.0], np.float32))
    array([[0., 2.]], dtype=float32)
    """
    if getattr(x, "ndim", None) != 2:
        raise ValueError(f"x must be a 2-D array (n_samples, n_features), got shape {getattr(x, 'shape', None)}")
    d = x.shape[1]
    if np.shape(mean) != (d,) or np.shape(std) != (d,):
        raise ValueError(f"mean and std must have shape ({d},) to match x, got {np.shape(mean)} and {np.shape(std)}")
    out = np.subtract(x, np.asarray(mean, np.float32), dtype=np.float32)
    out /= np.asarray(std, np.float32)
    return out


# ---------------------------------------------------------------------------------------------
# 4. Minibatches on the backend


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The sample order of one epoch: a function of (seed, epoch) only, so a resumed run repeats it.

    >>> order = epoch_permutation(0, 3, 10)
    >>> sorted(order.tolist()) == list(range(10))  # every sample once
    True
    >>> [np.array_equal(epoch_permutation(0, e, 10), order) for e in (0, 1, 2, 3, 4, 13)]
    [False, False, False, True, False, False]
    >>> np.array_equal(epoch_permutation(1, 3, 10), order)  # the seed matters too
    False
    """
    return np.random.default_rng([seed, epoch]).permutation(n)


class Minibatches:
    """Shuffled minibatches served from arrays that live on the backend.

    Construction copies ``x`` and ``y`` to the backend once (for CuPy: to the
    device, for the whole run) and allocates two batch-sized buffers. Each
    epoch, the sample order is drawn on the host from
    ``numpy.random.default_rng([seed, epoch])`` (identical on every backend),
    sent to the backend as one index array, and each batch is gathered with
    ``xp.take`` into one of the two buffers, in turn, just before it is
    yielded. On CuPy that gather runs on the device: no host-to-device copy of
    data per step. Gathering batch by batch keeps the rows hot in the CPU
    cache for the step that uses them (2-3x faster on MNIST than shuffling the
    whole epoch up front), and two small buffers instead of a shuffled copy of
    the data set save its size in memory (188 MB for MNIST in float32).

    Parameters
    ----------
    x : array
        ``(n, d)`` inputs (NumPy or the backend's arrays).
    y : array
        ``(n,)`` integer labels.
    batch_size : int
        Rows per batch (the last batch of an epoch may be smaller).
    xp : module
        ``numpy`` or ``cupy``.
    seed : int
        Seeds the order of every epoch.
    shuffle : bool
        False serves the rows in order, as views of ``x`` itself (no buffer).
    dtype : str or numpy.dtype
        Element type of the served ``x`` (float32 unless the model is float64).

    Attributes
    ----------
    n_samples, batch_size : int

    Examples
    --------
    >>> batches = Minibatches(np.eye(5, dtype=np.float32), np.arange(5), 2, seed=0)
    >>> len(batches), [len(yb) for xb, yb in batches.epoch(0)]
    (3, [2, 2, 1])
    """

    def __init__(
        self,
        x,
        y,
        batch_size: int,
        *,
        xp: ModuleType = np,
        seed: int = 0,
        shuffle: bool = True,
        dtype="float32",
    ) -> None:
        self.n_samples = _check_pair(x, y)
        if self.n_samples == 0:
            raise ValueError("Minibatches needs at least one sample, got 0")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        if y.dtype.kind not in "iu":
            raise ValueError(f"y must hold integer labels, got dtype {y.dtype}")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.xp = xp
        # One copy to the backend (none when x already is a C-contiguous array of the right type there).
        self.x = xp.ascontiguousarray(xp.asarray(x, dtype=dtype))
        self.y = xp.ascontiguousarray(xp.asarray(y, dtype=xp.int64))
        if self.shuffle:
            size = min(self.batch_size, self.n_samples)
            self._x_buffers = [xp.empty((size, *self.x.shape[1:]), self.x.dtype) for _ in range(2)]
            self._y_buffers = [xp.empty(size, self.y.dtype) for _ in range(2)]

    def __len__(self) -> int:
        return -(-self.n_samples // self.batch_size)

    def __call__(self, epoch: int) -> Iterator[tuple]:
        return self.epoch(epoch)

    def epoch(self, epoch: int) -> Iterator[tuple]:
        """Yield ``(xb, yb)`` for every batch of epoch ``epoch``.

        Shuffled batches are C-contiguous views of two alternating buffers: a
        batch stays valid until the batch after next is gathered into its
        buffer (copy it to keep it longer). On CuPy the gathers and the steps
        are queued on the same stream, so a step always sees its own batch.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        if not self.shuffle:
            for start in range(0, self.n_samples, self.batch_size):
                yield self.x[start : start + self.batch_size], self.y[start : start + self.batch_size]
            return
        xp = self.xp
        order = xp.asarray(epoch_permutation(self.seed, int(epoch), self.n_samples))  # one copy per epoch
        for i, start in enumerate(range(0, self.n_samples, self.batch_size)):
            stop = min(start + self.batch_size, self.n_samples)
            rows = order[start:stop]
            xb, yb = self._x_buffers[i % 2][: stop - start], self._y_buffers[i % 2][: stop - start]
            xp.take(self.x, rows, axis=0, out=xb)
            xp.take(self.y, rows, axis=0, out=yb)
            yield xb, yb
