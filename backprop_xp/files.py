"""Writing files so that nothing is ever half-written: a temporary file, then a rename.

``os.replace`` is atomic on POSIX and Windows when both paths are on the same
file system, which is why the temporary file lives in the target's folder. A
crash or an exception mid-write leaves the old file (or none), never a torn one.

A signal turned into KeyboardInterrupt (Ctrl-C, or SIGTERM under
``signals_as_interrupts``) can land between any two bytecodes, so the few steps
that create, rename or remove the temporary file hold it back until they are
done: otherwise a signal just after the temporary is made leaves it behind.
The writing itself stays interruptible at once.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from typing import IO, Any

import numpy as np

try:
    import fcntl
except ImportError:  # not POSIX: no flock, no folder locks (see in_use)
    fcntl = None

# The process's umask, read once: os.umask can only be read by setting it, which
# must not happen while other threads may be creating files.
_UMASK = os.umask(0)
os.umask(_UMASK)


class _Holds(threading.local):
    """How deep the current thread is in held bookkeeping, and whether a signal waits for its end."""

    depth = 0
    pending = False


_holds = _Holds()


def interrupt(signum: int, frame: Any) -> None:
    """A signal handler: KeyboardInterrupt now, or, inside ``atomic_write``'s bookkeeping, as that ends.

    ``signals_as_interrupts`` installs it for SIGINT and SIGTERM.
    """
    if _holds.depth:  # signal handlers run in the main thread, so this is the main thread's depth
        _holds.pending = True
        return
    _holds.pending = False
    raise KeyboardInterrupt


class _held:
    """A few steps that a signal (under ``signals_as_interrupts``) waits for; it is raised as they end."""

    def __enter__(self) -> None:
        _holds.depth += 1

    def __exit__(self, *exc_info: Any) -> None:
        _holds.depth -= 1
        if not _holds.depth and _holds.pending:
            _holds.pending = False
            raise KeyboardInterrupt


@contextlib.contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """Within this block, SIGINT (Ctrl-C) and SIGTERM (``kill``, a job scheduler's stop) raise KeyboardInterrupt.

    Unlike Python's own Ctrl-C handler, the KeyboardInterrupt never lands inside
    ``atomic_write``'s bookkeeping, so no temporary file is left behind. SIGTERM
    otherwise kills the process on the spot, with a file perhaps half-written
    beside its target and a run's metrics.json still saying "running".
    A signal that was set to something else (ignored, say) is left alone, and
    outside the main thread (where no handler can be set) nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    try:
        for signum, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
            if signal.getsignal(signum) is default:
                previous[signum] = signal.signal(signum, interrupt)
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# Signals reach only the main thread. A run on another thread (a sweep's run on a
# Dask worker's thread) is stopped by asking, and stops where it checks: between
# two training steps, never inside atomic_write.
_asked: set[int] = set()  # threading.get_ident() of the threads asked to stop


def interrupt_thread(ident: int) -> None:
    """Ask the thread ``ident`` to raise KeyboardInterrupt at its next ``check_interrupt()``."""
    _asked.add(ident)


def check_interrupt() -> None:
    """Raise KeyboardInterrupt if ``interrupt_thread`` asked this thread to stop (the training loop's check)."""
    if _asked and threading.get_ident() in _asked:  # an empty set is the per-step cost
        _asked.discard(threading.get_ident())
        raise KeyboardInterrupt


def forget_interrupt() -> None:
    """Withdraw a request that this thread did not reach (its work ended first), before the thread runs other work."""
    _asked.discard(threading.get_ident())


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
    tmp = f = None
    try:
        with _held():  # from its creation the temporary is named in `tmp`, so the except below removes it
            tmp = _temporary_beside(path, folder)
            f = _open_temporary(tmp, mode, **open_kwargs)
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        with _held():
            os.replace(tmp, path)
            tmp = None
    except BaseException:
        with _held():
            if f is not None:
                f.close()
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        raise


def _temporary_beside(path: str, folder: str) -> str:
    """Create an empty hidden temporary file in ``folder`` (``.NAME.<random>.tmp``) and return its path."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    except FileNotFoundError as exc:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"cannot write {path}: folder {folder} does not exist") from None
        raise OSError(f"cannot write {path}: {_why(exc, path)}") from None
    os.close(fd)
    return tmp


def _open_temporary(tmp: str, mode: str, **open_kwargs: Any) -> IO:
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private (0600); give it a plain open()'s mode
    return open(tmp, mode, **open_kwargs)


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


LOCK = ".lock"  # the lock file of a folder in use (see in_use)


class FolderInUse(OSError):
    """Another process (or thread) is writing into the folder: training the same run there."""


@contextlib.contextmanager
def in_use(folder: str | os.PathLike) -> Iterator[None]:
    """Hold ``folder``'s lock for the block, or raise FolderInUse naming the process that holds it.

    Two processes training into one run folder (two terminals resuming the
    same run, or a sweep started again while a worker still trains its runs)
    would each write checkpoints and metrics over the other's. The lock is an
    ``flock`` on ``folder/.lock``: the kernel releases it when its holder dies,
    however it dies, so a killed run never leaves the folder locked. Where the
    file system has no locks (some network file systems), nothing is locked.
    """
    path = os.path.join(os.fspath(folder), LOCK)
    fd = None
    try:
        with _held():  # a signal under signals_as_interrupts waits for the lock to be taken, then is raised
            fd = _lock(path, folder) if fcntl is not None else None
        if fd is not None:
            stamp = f"process {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
            os.write(fd, stamp.encode())
        yield
    finally:
        if fd is not None:
            with _held():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)  # before the lock goes: whoever then locks the old file sees it gone and retries
                os.close(fd)


def _lock(path: str, folder: str | os.PathLike) -> int | None:
    """A descriptor of ``path`` (emptied), exclusively locked; None where the file system has no locks."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            current = os.path.samestat(os.fstat(fd), os.stat(path))  # not a file its holder removed as it ended
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "a process"
            os.close(fd)
            raise FolderInUse(
                f"{folder} is in use by {holder}: wait for it to end or stop it (two processes writing one "
                "run would overwrite each other's checkpoints)"
            ) from None
        except FileNotFoundError:  # os.stat: removed by the holder before us, just now
            current = False
        except OSError:  # flock: no locks on this file system
            os.close(fd)
            return None
        except BaseException:  # Python's own Ctrl-C, outside signals_as_interrupts: no lock left held
            os.close(fd)
            raise
        if current:
            os.ftruncate(fd, 0)
            return fd
        os.close(fd)


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
