"""Matrix products of the GPU step through a cuBLAS handle of our own, so that CUDA graphs can capture them.

CuPy refuses every cuBLAS call made while a stream is being captured (its
handle's ``setStream`` raises ``NotImplementedError`` in every release so far,
whatever the environment), so the GPU step cannot use ``cupy.matmul`` inside a
CUDA graph. NVIDIA's nvmath-python exposes cuBLAS itself
(``nvmath.bindings.cublas``); ``sgemm``/``dgemm`` on a handle we own, whose
stream and workspace are set *before* the capture begins, record into a CuPy
stream capture like any kernel and replay with the same results.

Two conventions, chosen once here:

* Row-major arrays, column-major cuBLAS. A C-contiguous ``(r, c)`` array is,
  to cuBLAS, the column-major ``(c, r)`` matrix, its transpose. So
  ``out = op(a) op(b)`` is computed as ``outᵀ = op(b)ᵀ op(a)ᵀ``: the operands
  swap, and each one's transpose flag is its own ``transpose_*`` argument
  (``gemm_arguments``; ``tests/test_cublas.py`` checks it against a
  column-major GEMM written from the BLAS definition).
* ``alpha`` and ``beta`` are host scalars (pointer mode HOST). cuBLAS reads
  them when the call is made, so a captured graph holds the constants 1 and
  0, which is all the step uses. (Device scalars would let a graph change
  them between replays; nothing here needs that.)
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from ..backend import error_line

# cuBLAS's own recommendation for Hopper is 32 MiB (4 MiB for older GPUs); the
# workspace is set explicitly so that cuBLAS never allocates during a capture.
WORKSPACE_BYTES = 32 * 1024 * 1024


class GemmArguments(NamedTuple):
    """One cuBLAS GEMM call, column-major: ``C(m×n) = op_a(A) op_b(B)``, leading dimensions ``ld*``."""

    transpose_a: bool
    transpose_b: bool
    m: int
    n: int
    k: int
    a: Any  # the arrays whose memory cuBLAS reads as A and B (row-major b and a, swapped)
    lda: int
    b: Any
    ldb: int
    ldc: int


def gemm_arguments(a: Any, b: Any, out: Any, *, transpose_a: bool = False, transpose_b: bool = False) -> GemmArguments:
    """The column-major GEMM that computes the row-major ``out = op(a) op(b)``.

    ``a``, ``b`` and ``out`` must be C-contiguous 2-D arrays of one float
    dtype; ``op(a)`` is ``aᵀ`` when ``transpose_a``. Raises ValueError on
    shapes that do not multiply (never a wild read by cuBLAS).
    """
    for name, array in (("a", a), ("b", b), ("out", out)):
        if array.ndim != 2 or not array.flags.c_contiguous:
            raise ValueError(f"gemm: {name} must be a C-contiguous 2-D array, got shape {tuple(array.shape)}")
        if array.dtype != out.dtype:
            raise ValueError(f"gemm: {name} has dtype {array.dtype}, out has {out.dtype}")
    rows, inner = (a.shape[1], a.shape[0]) if transpose_a else a.shape
    inner_b, cols = (b.shape[1], b.shape[0]) if transpose_b else b.shape
    if inner != inner_b or out.shape != (rows, cols):
        raise ValueError(
            f"gemm: op(a) {rows}x{inner} times op(b) {inner_b}x{cols} does not give out {tuple(out.shape)}"
        )
    # outᵀ (cols × rows, column-major = out's memory) = op(b)ᵀ op(a)ᵀ. b's memory, read column-major,
    # is bᵀ: that is op(b)ᵀ as it is when b is not transposed, and needs cuBLAS's transpose when it is.
    return GemmArguments(
        transpose_a=transpose_b, transpose_b=transpose_a, m=cols, n=rows, k=inner,
        a=b, lda=b.shape[1], b=a, ldb=a.shape[1], ldc=out.shape[1],
    )  # fmt: skip


def _address(array: Any) -> int:
    """Device (CuPy) or host (NumPy, for the tests' emulated cuBLAS) address of the first element."""
    data = array.data
    return data.ptr if hasattr(data, "ptr") else array.ctypes.data


class CublasUnavailable(ImportError):
    """nvmath-python's cuBLAS bindings cannot be used here (the message says why); CuPy itself still works."""


def import_bindings() -> ModuleType:
    """``nvmath.bindings.cublas``, or CublasUnavailable saying why not."""
    try:
        from nvmath.bindings import cublas
    except ImportError as exc:
        raise CublasUnavailable("nvmath-python (the fused step's cuBLAS calls) is not installed") from exc
    except Exception as exc:  # noqa: BLE001 - a broken install (a cuda-bindings of another major) fails here
        raise CublasUnavailable(f"nvmath-python fails to import ({error_line(exc, with_type=True)})") from exc
    return cublas


class Blas:
    """A cuBLAS handle owned by one GPU step: its stream, its workspace, its math mode.

    Parameters
    ----------
    xp : module
        The array module that allocates the workspace (``cupy``).
    tf32 : bool, default False
        Let float32 products use TF32 tensor cores (about 10 mantissa bits).
    bindings : module, optional
        ``nvmath.bindings.cublas`` (the default) or a stand-in with the same
        functions (the tests emulate cuBLAS on the CPU).

    Raises
    ------
    CublasUnavailable
        nvmath-python is not installed, fails to import, or cannot open cuBLAS.
    """

    def __init__(self, xp: ModuleType, *, tf32: bool = False, bindings: ModuleType | None = None) -> None:
        self._cublas = bindings or import_bindings()
        self._workspace = xp.empty(WORKSPACE_BYTES, xp.uint8)
        # alpha = 1 and beta = 0 for each float type, in host memory (pointer mode HOST)
        self._scalars = {np.dtype(t): (np.ones(1, t), np.zeros(1, t)) for t in (np.float32, np.float64)}
        self._gemm = {np.dtype(np.float32): self._cublas.sgemm, np.dtype(np.float64): self._cublas.dgemm}
        try:  # the bindings load libcublas at the first call
            self.handle = self._cublas.create()
        except Exception as exc:  # noqa: BLE001 - reported: whatever the cause, this handle cannot be had
            raise CublasUnavailable(f"nvmath-python cannot open cuBLAS ({error_line(exc)})") from exc
        self._cublas.set_pointer_mode(self.handle, self._cublas.PointerMode.HOST)
        self.stream_ptr: int | None = None
        self.tf32 = tf32
        math = self._cublas.Math.TF32_TENSOR_OP_MATH if tf32 else self._cublas.Math.DEFAULT_MATH
        self._cublas.set_math_mode(self.handle, math)

    def use_stream(self, stream_ptr: int) -> None:
        """Queue the following products on ``stream_ptr`` (a ``cudaStream_t``; 0 is the legacy default).

        Must be called before a capture begins, never during one.
        ``cublasSetStream`` also resets the workspace to cuBLAS's own pool, so
        ours is set again right after it.
        """
        if stream_ptr == self.stream_ptr:
            return
        self._cublas.set_stream(self.handle, stream_ptr)
        self._cublas.set_workspace(self.handle, _address(self._workspace), WORKSPACE_BYTES)
        self.stream_ptr = stream_ptr

    def matmul(self, a: Any, b: Any, out: Any, *, transpose_a: bool = False, transpose_b: bool = False) -> Any:
        """``out = op(a) op(b)`` for C-contiguous 2-D arrays (see ``gemm_arguments``); returns ``out``."""
        g = gemm_arguments(a, b, out, transpose_a=transpose_a, transpose_b=transpose_b)
        one, zero = self._scalars[out.dtype]
        op_n, op_t = self._cublas.Operation.N, self._cublas.Operation.T
        self._gemm[out.dtype](
            self.handle, op_t if g.transpose_a else op_n, op_t if g.transpose_b else op_n, g.m, g.n, g.k,
            one.ctypes.data, _address(g.a), g.lda, _address(g.b), g.ldb, zero.ctypes.data, _address(out), g.ldc,
        )  # fmt: skip
        return out

    def close(self) -> None:
        """Destroy the handle (also done when the object is collected)."""
        if getattr(self, "handle", None) is not None:
            self._cublas.destroy(self.handle)
            self.handle = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at interpreter exit the library may already be gone
            pass
