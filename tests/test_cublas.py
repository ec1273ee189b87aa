"""The GPU step's cuBLAS calls, checked on the CPU against a column-major GEMM written from the BLAS definition.

``Blas`` turns a row-major product ``out = op(a) op(b)`` into a column-major
cuBLAS call (operands swapped, leading dimensions, transpose flags). Getting
one of those wrong gives garbage or an out-of-bounds read on the GPU, so here
the calls go to a stand-in for ``nvmath.bindings.cublas`` that reads the
operands from the raw host addresses it is given, exactly as cuBLAS reads
device memory: element ``(i, j)`` of a column-major matrix with leading
dimension ``ld`` is at ``base + i + j·ld``. The stand-in also records the call
order (stream, then workspace), which capture depends on.
"""

from __future__ import annotations

import ctypes
import enum
import sys
import types

import numpy as np
import pytest

from backprop_xp.cuda.cublas import WORKSPACE_BYTES, Blas, CublasUnavailable, gemm_arguments


def _column_major(address: int, dtype: np.dtype, rows: int, cols: int, ld: int) -> np.ndarray:
    """A writable (rows, cols) view of column-major memory at ``address`` with leading dimension ``ld``."""
    assert ld >= rows, "BLAS requires ld >= the number of rows"
    ctype = ctypes.c_float if dtype == np.float32 else ctypes.c_double
    flat = np.ctypeslib.as_array((ctype * (ld * cols)).from_address(address))
    return flat.reshape(cols, ld).T[:rows, :]


def emulated_cublas(calls: list) -> types.SimpleNamespace:
    """The nvmath.bindings.cublas functions Blas uses, computing on host memory."""

    def gemm(dtype):
        def call(handle, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
            calls.append(("gemm", transa, transb, m, n, k))
            ctype = ctypes.c_float if dtype == np.float32 else ctypes.c_double
            alpha_value, beta_value = ctype.from_address(alpha).value, ctype.from_address(beta).value
            op_a = _column_major(a, dtype, *((m, k) if transa == Op.N else (k, m)), lda)
            op_b = _column_major(b, dtype, *((k, n) if transb == Op.N else (n, k)), ldb)
            op_a = op_a if transa == Op.N else op_a.T
            op_b = op_b if transb == Op.N else op_b.T
            out = _column_major(c, dtype, m, n, ldc)
            product = alpha_value * (op_a.astype(np.float64) @ op_b)
            out[...] = product if beta_value == 0 else product + beta_value * out  # BLAS: beta = 0 ignores C

        return call

    class Op(enum.IntEnum):
        N = 0
        T = 1

    return types.SimpleNamespace(
        Operation=Op,
        PointerMode=enum.IntEnum("PointerMode", {"HOST": 0, "DEVICE": 1}),
        Math=enum.IntEnum("Math", {"DEFAULT_MATH": 0, "TF32_TENSOR_OP_MATH": 3}),
        create=lambda: calls.append(("create",)) or 7,
        destroy=lambda handle: calls.append(("destroy", handle)),
        set_pointer_mode=lambda handle, mode: calls.append(("pointer_mode", mode.name)),
        set_math_mode=lambda handle, mode: calls.append(("math_mode", mode.name)),
        set_stream=lambda handle, stream: calls.append(("stream", stream)),
        set_workspace=lambda handle, ptr, size: calls.append(("workspace", size)),
        sgemm=gemm(np.float32),
        dgemm=gemm(np.float64),
    )


# Every product of the GPU step, as (a shape, b shape, transpose_a, transpose_b), at B=37, H=29, K=10, D=23.
STEP_PRODUCTS = {
    "z1 = x W1ᵀ": ((37, 23), (29, 23), False, True),
    "z2 = a1 W2ᵀ": ((37, 29), (10, 29), False, True),
    "∂L/∂W2 = δ2ᵀ a1": ((37, 10), (37, 29), True, False),
    "δ1 = δ2 W2": ((37, 10), (10, 29), False, False),
    "∂L/∂W1 = δ1ᵀ x": ((37, 29), (37, 23), True, False),
    "∂L/∂b1 = 1ᵀ δ1": ((1, 37), (37, 29), False, False),
    "both transposed": ((8, 5), (6, 8), True, True),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", STEP_PRODUCTS)
def test_matmul_equals_numpy_through_column_major_cublas(name, dtype):
    a_shape, b_shape, ta, tb = STEP_PRODUCTS[name]
    rng = np.random.default_rng(len(name))
    a, b = rng.normal(size=a_shape).astype(dtype), rng.normal(size=b_shape).astype(dtype)
    expected = (a.T if ta else a).astype(np.float64) @ (b.T if tb else b)
    out = np.full(expected.shape, np.nan, dtype)  # every element must be written
    blas = Blas(np, bindings=emulated_cublas([]))
    assert blas.matmul(a, b, out, transpose_a=ta, transpose_b=tb) is out
    np.testing.assert_allclose(out, expected, rtol=1e-5 if dtype == np.float32 else 1e-12)


def test_output_layer_weight_gradient_is_an_h_by_10_product():
    """∂L/∂W2 = δ2ᵀ a1 goes to cuBLAS as m = H, n = 10: the layout measured fast on an H200 (10×H took 52 µs)."""
    args = gemm_arguments(np.empty((128, 10)), np.empty((128, 512)), np.empty((10, 512)), transpose_a=True)
    assert (args.m, args.n, args.k) == (512, 10, 128) and not args.transpose_a and args.transpose_b


@pytest.mark.parametrize(
    "a, b, out, ta, message",
    [
        ((4, 3), (4, 5), (3, 5), False, "does not give out"),  # inner sizes differ without the transpose
        ((4, 3), (3, 5), (4, 6), False, "does not give out"),
        ((4, 3), (3,), (4,), False, "2-D"),
    ],
)
def test_shapes_that_do_not_multiply_are_refused(a, b, out, ta, message):
    with pytest.raises(ValueError, match=message):
        gemm_arguments(np.empty(a), np.empty(b), np.empty(out), transpose_a=ta)


def test_views_and_mixed_dtypes_are_refused():
    a = np.zeros((6, 4))
    with pytest.raises(ValueError, match="C-contiguous"):
        gemm_arguments(a[:, :3], np.zeros((3, 2)), np.zeros((6, 2)))
    with pytest.raises(ValueError, match="dtype float32"):
        gemm_arguments(a.astype(np.float32), np.zeros((4, 2)), np.zeros((6, 2)))


def test_handle_setup_order():
    """Pointer mode HOST once; every stream change re-sets our workspace (cublasSetStream resets it)."""
    calls = []
    blas = Blas(np, tf32=True, bindings=emulated_cublas(calls))
    blas.use_stream(0)
    blas.use_stream(0)  # unchanged: no call
    blas.use_stream(1234)
    blas.close()
    blas.close()  # idempotent
    assert calls == [
        ("create",), ("pointer_mode", "HOST"), ("math_mode", "TF32_TENSOR_OP_MATH"),
        ("stream", 0), ("workspace", WORKSPACE_BYTES),
        ("stream", 1234), ("workspace", WORKSPACE_BYTES),
        ("destroy", 7),
    ]  # fmt: skip
    assert Blas(np, bindings=emulated_cublas(calls)).tf32 is False and calls[-1] == ("math_mode", "DEFAULT_MATH")


def test_blas_without_usable_nvmath_raises_the_error_make_step_falls_back_on(monkeypatch):
    """Only CublasUnavailable makes ``make_step`` run the generic step instead: both causes must raise it."""
    monkeypatch.setitem(sys.modules, "nvmath", None)
    with pytest.raises(CublasUnavailable, match=r"^nvmath-python \(the fused step's cuBLAS calls\) is not installed$"):
        Blas(np)
    monkeypatch.undo()

    def no_library():
        raise RuntimeError("libcublas.so.12: cannot open shared object file")

    bindings = emulated_cublas([])
    bindings.create = no_library
    with pytest.raises(CublasUnavailable, match=r"^nvmath-python cannot open cuBLAS \(libcublas.so.12: cannot open"):
        Blas(np, bindings=bindings)


def test_real_bindings_have_the_functions_blas_calls(reference_missing):
    """Where nvmath-python is installed (CI), its cuBLAS bindings offer every name and enum member used."""
    try:
        from nvmath.bindings import cublas
    except ImportError as exc:
        reference_missing(f"nvmath-python is not installed ({exc}): pip install nvmath-python")
    for name in (
        "create",
        "destroy",
        "set_stream",
        "set_workspace",
        "set_pointer_mode",
        "set_math_mode",
        "sgemm",
        "dgemm",
    ):
        assert callable(getattr(cublas, name)), name
    assert cublas.Operation.N != cublas.Operation.T
    assert {"HOST"} <= set(cublas.PointerMode.__members__)
    assert {"DEFAULT_MATH", "TF32_TENSOR_OP_MATH"} <= set(cublas.Math.__members__)
    assert "intptr_t alpha" in cublas.sgemm.__doc__  # host scalars are passed by address
