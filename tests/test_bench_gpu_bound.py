"""The ``cupy`` bench engine's GEMM bound, on the CPU: a CuPy stand-in that refuses matmul during capture.

CuPy refuses every cuBLAS call made while a stream is captured, so a bound
timed with ``cupy.matmul`` inside ``begin_capture()`` never captures and
falls back to eager launches (issue 23, item 3). The bound must go through
``cuda.cublas.Blas``, as the GPU step does. Here NumPy stands in for CuPy:
its ``matmul`` raises while a capture is open, as CuPy's does, and the cuBLAS
stand-in of ``test_cublas.py`` records the calls made during a capture into
the graph instead of running them, as a real capture does; a replay runs them.
The stand-in's CUDA events count the GEMMs executed between them (1 ms each),
so the bound's seconds say what was launched.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
from test_cublas import emulated_cublas

from backprop_xp.cuda.cublas import Blas
from backprop_xp.speed.engines import N_INPUTS, N_OUTPUTS, _bound_scale, batch_slices, cupy_gemm_bound


class FakeCuda:
    """Streams, capture, graphs and events of ``cupy.cuda``, on the host."""

    def __init__(self) -> None:
        self.capturing: list | None = None  # the calls recorded by the open capture
        self.gemms_run = 0  # GEMMs executed so far (eagerly or by a replay)
        self.graphs = 0
        outer = self

        class Stream:
            ptr = 0x5EED

            def __init__(self, non_blocking: bool = False) -> None:
                assert non_blocking, "capture needs a non-blocking stream"

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def begin_capture(self) -> None:
                outer.capturing = []

            def end_capture(self):
                recorded, outer.capturing = outer.capturing, None
                outer.graphs += 1
                return types.SimpleNamespace(launch=lambda: [call() for call in recorded])

        class Event:
            def record(self) -> None:
                self.gemms = outer.gemms_run

            def synchronize(self) -> None:
                pass

        self.Stream, self.Event = Stream, Event

    def get_elapsed_time(self, start, stop) -> float:
        return float(stop.gemms - start.gemms)  # milliseconds: 1 per GEMM


def fake_cupy() -> types.SimpleNamespace:
    cuda = FakeCuda()

    def matmul(*args, **kwargs):
        if cuda.capturing is not None:  # what CuPy does: its handle's setStream refuses a capturing stream
            raise NotImplementedError("cuBLAS calls are not supported during stream capture")
        cuda.gemms_run += 1
        return np.matmul(*args, **kwargs)

    return types.SimpleNamespace(
        float32=np.float32, uint8=np.uint8, empty=np.empty, empty_like=np.empty_like, matmul=matmul, cuda=cuda,
        random=types.SimpleNamespace(random_sample=lambda shape, dtype: np.random.random_sample(shape).astype(dtype)),
    )  # fmt: skip


def capturing_cublas(cp: types.SimpleNamespace, calls: list) -> types.SimpleNamespace:
    """``test_cublas.emulated_cublas`` whose GEMMs are recorded, not run, while a capture is open."""
    bindings = emulated_cublas(calls)
    run = bindings.sgemm

    def sgemm(*args):
        def call():
            cp.cuda.gemms_run += 1
            run(*args)

        if cp.cuda.capturing is not None:
            cp.cuda.capturing.append(call)
        else:
            call()

    bindings.sgemm = sgemm
    return bindings


H, B, N = 24, 32, 200  # 6 full batches and one of 8 rows: two batch sizes, two graphs


def test_bound_captures_the_steps_five_cublas_products_and_replays_them():
    cp, calls = fake_cupy(), []
    x = np.random.default_rng(0).random((N, N_INPUTS), dtype=np.float32)
    slices = batch_slices(N, B)
    seconds, note = cupy_gemm_bound(cp, x, H, B, slices, lambda: Blas(cp, bindings=capturing_cublas(cp, calls)))
    assert note.startswith("CUDA graph of the five cuBLAS products"), note
    assert cp.cuda.graphs == 2  # one per batch size: 32 and the last batch's 8
    # The timed region replays one graph per batch: five GEMMs each, nothing else.
    assert seconds == pytest.approx(5 * len(slices) / 1000.0)
    # The step's products, with its shapes (column-major m, n, k: cuBLAS computes outᵀ = op(b)ᵀ op(a)ᵀ).
    gemms = [c[3:] for c in calls if c[0] == "gemm"]
    for n in (B, N % B):
        assert (H, n, N_INPUTS) in gemms  # z1 = x W1ᵀ
        assert (N_OUTPUTS, n, H) in gemms  # z2 = a1 W2ᵀ
        assert (H, N_OUTPUTS, n) in gemms  # ∂L/∂W2 = δ2ᵀ a1
        assert (H, n, N_OUTPUTS) in gemms  # δ1 = δ2 W2
        assert (N_INPUTS, H, n) in gemms  # ∂L/∂W1 = δ1ᵀ x
    # The stream and workspace were set once, before the first capture began.
    assert [c[0] for c in calls[:7]] == ["create", "pointer_mode", "math_mode", "stream", "workspace", "gemm", "gemm"]
    assert sum(c[0] == "stream" for c in calls) == 1


def test_bound_on_an_epoch_scales_the_timed_batches_to_the_whole_epoch():
    cp = fake_cupy()
    n = 20_000  # more than BOUND_SAMPLES: only the first 8192 samples' batches are timed
    x = np.zeros((n, N_INPUTS), np.float32)
    slices, scale = _bound_scale(n, 128)
    seconds, _ = cupy_gemm_bound(cp, x, 8, 128, slices, lambda: Blas(cp, bindings=capturing_cublas(cp, [])))
    assert len(slices) == 64 and scale == pytest.approx(157 / 64)
    assert seconds == pytest.approx(5 * 64 / 1000.0)


def test_without_nvmath_the_bound_runs_eagerly_and_says_why():
    cp = fake_cupy()

    def no_nvmath():
        raise ImportError("the GPU step calls cuBLAS through nvmath-python, which is not installed")

    x = np.zeros((N, N_INPUTS), np.float32)
    seconds, note = cupy_gemm_bound(cp, x, H, B, batch_slices(N, B), no_nvmath)
    assert note == (
        "eager cupy.matmul launches (ImportError: the GPU step calls cuBLAS through nvmath-python, which is not installed)"
    )
    assert cp.cuda.graphs == 0 and seconds == pytest.approx(5 * 7 / 1000.0)
