"""Finding the data set's files, and downloading them once from public mirrors, checked by SHA-256.

``fetch_mnist`` fills a per-user cache (``cache_dir``) from the mirrors in
turn, writes atomically and checks the SHA-256 of every decompressed file.
The tables below are looked up by name at call time, so tests can replace a
mirror list or a hash table.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from pathlib import Path

from ..files import atomic_write
from ..progress import progress_bar
from .idx import CHUNK_BYTES, DataFormatError

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


def dataset_info(name: str) -> tuple[str, str, dict[str, str], list[str]]:
    """(title, environment variable, SHA-256 table, mirrors) of the data set ``name``."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}: choose one of {', '.join(DATASETS)}")
    title, env, sha256, mirrors = DATASETS[name]
    return title, env, globals()[sha256], globals()[mirrors]


class ChecksumError(DataFormatError):
    """A downloaded file's SHA-256 differs from the expected one (the download was deleted)."""


class DownloadError(FileNotFoundError):
    """A file is missing and no mirror could provide it; the message lists each mirror's failure.

    A ``FileNotFoundError`` because that is what it means to the caller: the
    data is not there. Code that handles a missing file handles this too.
    """


def cache_dir(dataset: str = "mnist") -> Path:
    """The per-user cache of a data set: ``$XDG_CACHE_HOME/backprop_xp/<dataset>``, else under ``~/.cache``."""
    dataset_info(dataset)
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
        bar = stack.enter_context(progress_bar(total, dest.name, unit="B", enabled=progress))
        out = stack.enter_context(atomic_write(dest, "wb"))  # innermost: closed (renamed or deleted) first
        received = 0
        try:
            while chunk := response.read(CHUNK_BYTES):
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
    title, _, known_sha256, known_mirrors = dataset_info(dataset)
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
                f"{title} files in a folder and pass data_dir / --data-dir or set {dataset_info(dataset)[1]}"
            )
    return folder
