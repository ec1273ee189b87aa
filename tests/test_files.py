"""Atomic writes under failure: the previous checkpoint.npz, metrics.json or model.npz survives, whole.

Every file the library writes goes through ``files.atomic_write`` (a temporary
file beside the target, renamed over it at the end). These tests break the
write in the middle, by an exception (a full disk) or by a signal to the
writing process, and look at what is left.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading

import numpy as np
import pytest

from backprop_xp import MLP, files
from backprop_xp.files import atomic_write, signals_as_interrupts
from backprop_xp.training import CHECKPOINT, METRICS_JSON, TrainConfig, train

SMALL = dict(hidden=8, train_size=500, epochs=2, batch_size=100, backend="numpy")


def _disk_full(f, start):
    f.write(start)
    f.flush()
    raise OSError(errno.ENOSPC, "No space left on device")


def savez_disk_full(f, **arrays):
    """A stand-in for numpy.savez that writes the start of a zip, then fails like a full disk."""
    _disk_full(f, b"PK\x03\x04 the start of a zip")


def json_dump_disk_full(obj, f, **kwargs):
    """A stand-in for json.dump that writes the start of the text, then fails like a full disk."""
    _disk_full(f, json.dumps(obj)[:20])


def _hidden_files(folder):
    """Temporary files of atomic_write (".<name>.<random>.tmp") left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("broken", [CHECKPOINT, METRICS_JSON])
def test_a_failure_writing_epoch_2_keeps_epoch_1s_files_whole(mnist_dir, tmp_path, monkeypatch, broken):
    config = TrainConfig(**SMALL, data_dir=str(mnist_dir))
    train(config, tmp_path, echo=None, pictures=False, stop_after=1)
    before = {name: (tmp_path / name).read_bytes() for name in (CHECKPOINT, METRICS_JSON)}
    if broken == CHECKPOINT:
        monkeypatch.setattr(np, "savez", savez_disk_full)
    else:
        monkeypatch.setattr(json, "dump", json_dump_disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        train(config, tmp_path, resume=True, echo=None, pictures=False)
    monkeypatch.undo()

    assert (tmp_path / broken).read_bytes() == before[broken]  # the previous file, byte for byte
    assert _hidden_files(tmp_path) == []  # and no temporary file
    if broken == CHECKPOINT:  # the checkpoint is written first: metrics.json still says epoch 1 too
        assert (tmp_path / METRICS_JSON).read_bytes() == before[METRICS_JSON]
    # The run is still resumable from what is there.
    metrics = train(config, tmp_path, resume=True, echo=None, pictures=False)
    assert metrics["status"] == "finished" and [r["epoch"] for r in metrics["epochs"]] == [1, 2]


def test_a_failure_writing_model_npz_keeps_the_previous_model(tmp_path, monkeypatch):
    path = tmp_path / "model.npz"
    MLP(784, 8, 10, seed=0).save(path)
    before = path.read_bytes()
    monkeypatch.setattr(np, "savez", savez_disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        MLP(784, 8, 10, seed=1).save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert _hidden_files(tmp_path) == []
    np.testing.assert_array_equal(MLP.load(path).params["W1"], MLP(784, 8, 10, seed=0).params["W1"])


def test_atomic_write_keeps_the_old_file_on_an_exception_and_replaces_it_on_success(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as f:
            f.write("half of the new")
            raise RuntimeError("stop")
    assert path.read_text() == "old" and _hidden_files(tmp_path) == []
    with atomic_write(path) as f:
        f.write("new")
    assert path.read_text() == "new" and _hidden_files(tmp_path) == []


# A process saving a model whose savez stops half-way and waits to be killed.
_WRITER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from backprop_xp import MLP, files

    def stalled_savez(f, **arrays):
        f.write(b"PK\\x03\\x04 half of a zip")
        f.flush()
        print("writing", flush=True)
        time.sleep(120)

    np.savez = stalled_savez
    MLP(784, 8, 10, seed=1).save(sys.argv[1])
    """
)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_a_process_killed_mid_write_leaves_the_previous_file_whole(tmp_path, sig):
    path = tmp_path / "model.npz"
    MLP(784, 8, 10, seed=0).save(path)
    before = path.read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "writing", proc.stderr.read()
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode != 0
    assert path.read_bytes() == before  # never torn, whatever the signal
    np.testing.assert_array_equal(MLP.load(path).params["W1"], MLP(784, 8, 10, seed=0).params["W1"])
    if sig == signal.SIGINT:  # Ctrl-C reaches Python: the temporary file is removed on the way out
        assert _hidden_files(tmp_path) == []
    # (A SIGKILL leaves the hidden temporary file ".model.npz.<random>.tmp" behind: nothing can run to
    # remove it. It never replaces model.npz, and the next save writes a new one and renames it over.)
    MLP(784, 8, 10, seed=2).save(path)
    np.testing.assert_array_equal(MLP.load(path).params["W1"], MLP(784, 8, 10, seed=2).params["W1"])


# --- a signal at the worst moment: just after the temporary file is made, or just as it is renamed
# (the CI run that found this: SIGTERM right after checkpoint.npz left ".metrics.csv.<random>.tmp")

SIGNALS = pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])


@pytest.fixture(autouse=True)
def python_default_handlers():
    """Python's own handlers, as in a terminal, even where the test runner was started with SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler), signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGINT, previous[0])
    signal.signal(signal.SIGTERM, previous[1])


def _then_signal(function, sig):
    """``function``, followed at once by ``sig`` sent to this process (its handler runs on the next bytecode)."""

    def wrapped(*args, **kwargs):
        result = function(*args, **kwargs)
        signal.raise_signal(sig)
        return result

    return wrapped


@SIGNALS
def test_a_signal_just_after_the_temporary_file_is_made_leaves_nothing_behind(tmp_path, monkeypatch, sig):
    path = tmp_path / "metrics.csv"
    path.write_text("old")
    monkeypatch.setattr(tempfile, "mkstemp", _then_signal(tempfile.mkstemp, sig))
    body_ran = False
    with pytest.raises(KeyboardInterrupt), signals_as_interrupts():
        with atomic_write(path) as f:
            body_ran = True
            f.write("new")
    assert not body_ran  # the interrupt came as soon as the temporary was accounted for
    assert path.read_text() == "old" and _hidden_files(tmp_path) == []


@SIGNALS
def test_a_signal_during_the_rename_lets_it_finish_then_interrupts(tmp_path, monkeypatch, sig):
    path = tmp_path / "metrics.csv"
    path.write_text("old")
    monkeypatch.setattr(os, "replace", _then_signal(os.replace, sig))
    with pytest.raises(KeyboardInterrupt), signals_as_interrupts():
        with atomic_write(path) as f:
            f.write("new")
    assert path.read_text() == "new" and _hidden_files(tmp_path) == []


@SIGNALS
def test_a_signal_while_writing_interrupts_at_once_and_keeps_the_old_file(tmp_path, sig):
    path = tmp_path / "metrics.csv"
    path.write_text("old")
    written = []
    with pytest.raises(KeyboardInterrupt), signals_as_interrupts():
        with atomic_write(path) as f:
            for line in ("a", "b", "c"):
                f.write(line)
                written.append(line)
                if line == "a":
                    signal.raise_signal(sig)
    assert written == ["a"]  # not held back to the end of the write: a long download stops when asked
    assert path.read_text() == "old" and _hidden_files(tmp_path) == []


def test_signals_as_interrupts_restores_the_handlers_and_leaves_an_ignored_signal_alone():
    with signals_as_interrupts():
        assert signal.getsignal(signal.SIGINT) is signal.getsignal(signal.SIGTERM) is files.interrupt
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == (
        signal.default_int_handler,
        signal.SIG_DFL,
    )
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as a user's nohup-like wrapper may have set it
    with signals_as_interrupts():
        assert signal.getsignal(signal.SIGINT) is files.interrupt
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN  # the user asked to ignore it
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN


def test_interrupt_thread_stops_only_that_thread_and_only_at_its_check():
    ready, asked = threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    def worker() -> None:
        files.check_interrupt()  # nothing asked yet
        ready.set()
        asked.wait(5)
        seen["before the check"] = "running"  # a request waits for the check: it never lands elsewhere
        try:
            files.check_interrupt()
        except KeyboardInterrupt:
            seen["at the check"] = "KeyboardInterrupt"
        files.check_interrupt()  # a request is used up by the interrupt it caused

    thread = threading.Thread(target=worker)
    thread.start()
    ready.wait(5)
    files.interrupt_thread(thread.ident)
    files.check_interrupt()  # the request is not this thread's
    asked.set()
    thread.join(5)
    assert seen == {"before the check": "running", "at the check": "KeyboardInterrupt"}


def test_a_request_the_thread_never_reached_is_forgotten_before_its_next_work():
    files.interrupt_thread(threading.get_ident())
    files.forget_interrupt()  # as a Dask worker's thread does when a run ends before its next step
    files.check_interrupt()  # the thread's next run is not interrupted
    files.interrupt_thread(threading.get_ident())
    with pytest.raises(KeyboardInterrupt):
        files.check_interrupt()


def test_a_folder_in_use_refuses_a_second_holder_naming_the_first_and_is_free_after(tmp_path):
    with files.in_use(tmp_path):
        held = (tmp_path / files.LOCK).read_text()
        assert held.startswith(f"process {os.getpid()} on ")
        refused: list[BaseException] = []

        def second() -> None:  # another open of the lock file: flock excludes it even in the same process
            try:
                with files.in_use(tmp_path):
                    pass
            except files.FolderInUse as exc:
                refused.append(exc)

        thread = threading.Thread(target=second)
        thread.start()
        thread.join(5)
        assert len(refused) == 1 and str(refused[0]).startswith(f"{tmp_path} is in use by {held}: ")
        assert isinstance(refused[0], OSError)  # the command line's one-line error, exit code 1
    assert not (tmp_path / files.LOCK).exists()  # nothing left behind
    with files.in_use(tmp_path):  # and free again
        pass


def test_a_lock_file_removed_as_it_is_locked_is_not_trusted(tmp_path, monkeypatch):
    """The holder before us removes the file just before it unlocks: locking that old file locks nothing."""
    import fcntl

    real_flock, calls = fcntl.flock, []

    def flock_as_the_holder_leaves(fd: int, op: int) -> None:
        real_flock(fd, op)
        calls.append(fd)
        if len(calls) == 1:  # the first file we lock is gone from the folder by then
            os.unlink(tmp_path / files.LOCK)

    monkeypatch.setattr(fcntl, "flock", flock_as_the_holder_leaves)
    with files.in_use(tmp_path):
        assert len(calls) == 2  # it locked again, the file that is now there
        assert (tmp_path / files.LOCK).read_text().startswith(f"process {os.getpid()} on ")
    assert not (tmp_path / files.LOCK).exists()


@SIGNALS
def test_a_signal_as_the_folder_lock_is_taken_leaves_the_folder_unlocked(tmp_path, monkeypatch, sig):
    """The interrupt waits for the lock to be taken, then is raised: the lock must go with it."""
    monkeypatch.setattr(files, "_lock", _then_signal(files._lock, sig))
    body_ran = False
    with pytest.raises(KeyboardInterrupt), signals_as_interrupts():
        with files.in_use(tmp_path):
            body_ran = True
    assert not body_ran and _hidden_files(tmp_path) == []
    monkeypatch.undo()
    with files.in_use(tmp_path):  # not held by this process's forgotten descriptor
        pass
