"""Why tests were skipped, and how to run them: the lines that end a test run (conftest.py's terminal summary).

A plain ``pytest -q`` that skips hundreds of tests says only "337 skipped".
These lines say which groups were skipped and the one step that runs each:

    73 skipped: need MNIST — set BACKPROP_XP_DATA=../shared/mnist (or the folder of your MNIST files)
"""

from __future__ import annotations

from collections import Counter

# (words found in the skip reasons of a group, what its tests need, how to get it). The reasons are the
# suite's own: the fixtures of conftest.py, the skips in the test files. The first match wins (the GPU's
# reasons can mention nvmath-python).
GROUPS = (
    (("real MNIST not available",), "need MNIST", "set BACKPROP_XP_DATA=../shared/mnist (or the folder of your MNIST files)"),
    (("backend 'cupy'",), "need a CUDA GPU", "on a machine with one: pip install -e '.[cuda12]' (or '.[cuda13]')"),
    (("Numba not installed",), "need Numba", "pip install -e '.[dev]'"),
    (("NVRTC",), "need NVRTC 12 and 13", "pip install -e '.[dev]'"),
    (("nvmath-python",), "need nvmath-python", "pip install -e '.[dev]'"),
    (("torch cannot be imported", "PyTorch not installed"), "need PyTorch", "pip install torch"),
    (("scikit-learn not installed",), "need scikit-learn", "pip install -e '.[dev]'"),
    (("distributed is not installed",), "need Dask's distributed", "pip install -e '.[dev]'"),
    (("dataset-fashion-mnist",), "need Fashion-MNIST", "apt-get install dataset-fashion-mnist"),
    (("g++ is not installed",), "need g++ (the CUDA emulator compiles the kernels with it)", "apt-get install g++"),
)  # fmt: skip


def group_of(reason: str) -> str:
    """The line's text for one skip reason: its group's need and remedy, or the reason itself.

    >>> group_of("Skipped: real MNIST not available (BACKPROP_XP_DATA=None)")[:12]
    'need MNIST —'
    >>> group_of("Skipped: no /proc here")
    'no /proc here'
    """
    reason = reason.removeprefix("Skipped: ")
    for words, need, remedy in GROUPS:
        if any(word in reason for word in words):
            return f"{need} — {remedy}"
    return reason


def summary_lines(reasons: list[str]) -> list[str]:
    """One line per group of skipped tests, the largest group first: ``"73 skipped: need MNIST — set ..."``.

    >>> summary_lines(["Skipped: no /proc here", "Skipped: torch cannot be imported (x)", "PyTorch not installed"])
    ['2 skipped: need PyTorch — pip install torch', '1 skipped: no /proc here']
    """
    counts = Counter(group_of(reason) for reason in reasons)
    return [f"{n} skipped: {text}" for text, n in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]
