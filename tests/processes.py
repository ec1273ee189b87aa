"""The command line as a real process, stopped the way a terminal or a job scheduler stops it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def start(argv: Sequence[str]) -> subprocess.Popen:
    """``python -m backprop_xp ARGV`` in a session of its own, its output captured.

    The child gets Python's own Ctrl-C handler even where the test runner's
    SIGINT is ignored (a background job), as it would in a terminal.
    """
    return subprocess.Popen(
        [sys.executable, "-m", "backprop_xp", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_until_written(proc: subprocess.Popen, paths: Sequence[Path], *, timeout: float = 120.0) -> None:
    """Return once every one of ``paths`` exists; fail (and kill ``proc``) if it ended first or took too long."""
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    ended, missing = proc.poll() is not None, [str(p) for p in paths if not p.exists()]
    if missing:
        kill(proc)
    assert not ended, "the command ended before the test could act in the middle of it"
    assert not missing, f"not written within {timeout:g} s: {missing}"


def stop(proc: subprocess.Popen, signum: int, *, group: bool = False, timeout: float = 60.0) -> tuple[str, str]:
    """Send ``signum`` to ``proc``, or to its whole process group (a terminal's Ctrl-C, a job scheduler's stop).

    Returns its stdout and stderr once it has exited; kills the group if it
    is still there ``timeout`` seconds later (the test then fails on its exit code).
    """
    try:
        if group:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        return "", f"still running {timeout:g} s after the signal"
    finally:
        kill(proc)


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and everything in its session, if it is still running; reap it."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
