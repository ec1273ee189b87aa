"""Writing files so that nothing is ever half-written: a temporary file, then a rename.

``os.replace`` is atomic on POSIX and Windows when both paths are on the same
file system, which is why the temporary file lives in the target's folder. A
crash or an exception mid-write leaves the old file (or none), never a torn one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import zipfile
from collections.abc import Iterator
from typing import IO, Any

import numpy as np

# The process's umask, read once: os.umask can only be read by setting it, which
# must not happen while other threads may be creating files.
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; rename it over ``path`` on success.

    >>> import json, os, tempfile
    >>> target = os.path.join(tempfile.mkdtemp(), "a.json")
    >>> with atomic_write(target) as f:
    ...     json.dump({"ok": True}, f)
    >>> open(target).read()
    '{"ok": true}'
    """
    if "r" in mode or "a" in mode or "+" in mode:
        raise ValueError(f"atomic_write writes whole files; mode {mode!r} is not supported")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    except FileNotFoundError as exc:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"cannot write {path}: folder {folder} does not exist") from None
        raise OSError(f"cannot write {path}: {_why(exc, path)}") from None
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private (0600); give it a plain open()'s mode
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _nearest_folder(path: str) -> str:
    """``path`` or its nearest ancestor that exists."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _why(exc: OSError, path: str) -> str:
    """The reason an OSError gives, without its "[Errno N]" and file name, and never a false "does not exist"."""
    if exc.errno == errno.ENOENT and os.path.isdir(_nearest_folder(path)):
        # /proc and similar exist but refuse new entries with ENOENT: say that, not "No such file".
        return f"{_nearest_folder(path)} does not accept new files or folders"
    return exc.strerror or str(exc)


def make_out_dir(path: str | os.PathLike) -> str:
    """Create the output folder ``path`` (and its parents) and check that a file can be written there.

    Raises an OSError whose message is one line, ``cannot create output folder
    PATH: <reason>`` (or ``cannot write into output folder PATH: <reason>``),
    before any work is done whose results would then have nowhere to go.
    """
    path = os.fspath(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise OSError(f"cannot create output folder {path}: {_why(exc, path)}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OSError(f"cannot write into output folder {path}: {_why(exc, os.path.join(path, 'x'))}") from None
    return path


def atomic_savez(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """``numpy.savez`` into ``path`` atomically (``path`` is used exactly as given)."""
    with atomic_write(path, "wb") as f:
        np.savez(f, **arrays)


def read_npz(path: str | os.PathLike, what: str = "an .npz file") -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file (read with ``allow_pickle=False``).

    Anything unreadable (missing, truncated, not a zip, a lone ``.npy``) is a
    ValueError (FileNotFoundError when missing) naming the file and ``what``
    it should have been, never a traceback from inside ``zipfile``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single array, not named arrays")
        with f:
            return {key: f[key] for key in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        # NumPy's message for a file that is not .npy/.npz at all advises loading it with
        # allow_pickle: never pass that on for a file that might come from anywhere.
        reason = "not an .npz file" if "pickle" in str(exc) else str(exc)
        raise ValueError(f"{path}: not {what} ({reason})") from exc
