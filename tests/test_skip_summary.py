"""The lines that end a test run: one per group of skipped tests, saying what they need and how to run them."""

from __future__ import annotations

import textwrap
from pathlib import Path

from skip_reasons import GROUPS

pytest_plugins = ["pytester"]

HERE = Path(__file__).resolve().parent
FLAGS = ("BACKPROP_XP_DATA", "BACKPROP_XP_REQUIRE_DATA", "BACKPROP_XP_REQUIRE_REFERENCES", "BACKPROP_XP_REQUIRE_FAST")

# Skips as the suite makes them: real MNIST through the conftest's fixture, a missing reference through
# reference_missing, the GPU's reason as backend.py words it, a whole module skipped at collection, a skipif.
SKIPPING_TESTS = """
    import pytest

    @pytest.mark.parametrize("i", range(3))
    def test_on_mnist(mnist_dir, i):
        pass

    @pytest.mark.parametrize("i", range(2))
    def test_on_a_gpu(i):
        pytest.skip("backend 'cupy': CuPy is installed but there is no CUDA device")

    def test_against_torch(reference_missing):
        reference_missing("torch cannot be imported (No module named 'torch'): the comparisons need it")

    def test_bench_engines():
        pytest.importorskip("no_such_module_here", reason="PyTorch not installed: the tiny run compares with torch-cpu")

    @pytest.mark.skipif(True, reason="g++ is not installed")
    def test_emulated():
        pass

    def test_proc():
        pytest.skip("no /proc here")

    def test_one():
        pass

    def test_two():
        pass
"""
MODULE_SKIPPED = """
    import pytest

    pytest.skip("Numba not installed: the fast CPU path is not tested", allow_module_level=True)
"""


def run_with_the_suites_conftest(pytester, monkeypatch, **files):
    for name in FLAGS:  # CI's flags turn these skips into failures; the data folder must be missing
        monkeypatch.delenv(name, raising=False)
    pytester.makeconftest((HERE / "conftest.py").read_text())
    pytester.makepyfile(**{name: textwrap.dedent(text) for name, text in files.items()})
    return pytester.runpytest("-q", "-p", "no:cacheprovider")


def test_a_run_ends_with_one_line_per_group_of_skipped_tests_saying_how_to_run_them(pytester, monkeypatch):
    result = run_with_the_suites_conftest(
        pytester, monkeypatch, test_skipping=SKIPPING_TESTS, test_module_skipped=MODULE_SKIPPED
    )
    result.assert_outcomes(passed=2, skipped=10)
    lines = result.outlines
    start = next(i for i, line in enumerate(lines) if "skipped tests: what they need" in line)
    assert lines[start + 1 : start + 7] == [
        "3 skipped: need MNIST — set BACKPROP_XP_DATA=../shared/mnist (or the folder of your MNIST files)",
        "2 skipped: need PyTorch — pip install torch",  # two reasons, one group; equal counts in the order of their text
        "2 skipped: need a CUDA GPU — on a machine with one: pip install -e '.[cuda12]' (or '.[cuda13]')",
        "1 skipped: need Numba — pip install -e '.[dev]'",
        "1 skipped: need g++ (the CUDA emulator compiles the kernels with it) — apt-get install g++",
        "1 skipped: no /proc here",  # a reason of no group is shown as it is
    ]
    assert lines[start + 7].startswith("2 passed, 10 skipped in ")  # the last lines: pytest's own count follows


def test_a_run_that_skips_nothing_adds_no_lines(pytester, monkeypatch):
    result = run_with_the_suites_conftest(pytester, monkeypatch, test_fine="def test_one():\n    pass\n")
    result.assert_outcomes(passed=1)
    assert not any("skipped" in line for line in result.outlines), result.outlines


def test_every_group_matches_a_skip_reason_the_suite_gives():
    # A reason reworded in a test file would otherwise fall out of its group and be shown bare.
    tests = [path for path in HERE.glob("test_*.py") if path.name != Path(__file__).name]  # not this file's examples
    sources = [path.read_text() for path in (*tests, HERE / "conftest.py")]
    sources += [(HERE.parent / name).read_text() for name in ("bench/conftest.py", "backprop_xp/backend.py")]
    for words, need, _ in GROUPS:
        for word in words:
            assert any(word in text for text in sources), f"{need}: {word!r} is in no skip reason"
