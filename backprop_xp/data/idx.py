"""The IDX file format MNIST ships in: reading one file, refusing anything it does not fully understand.

The format: a 4-byte magic number ``0x00 0x00 <type> <ndim>``, then ``ndim``
big-endian uint32 sizes, then the values, big-endian, row-major. ``read_idx``
reads one file, gzip-compressed or not, and raises ``DataFormatError`` naming
the file and the problem.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

# IDX type byte -> element type (big-endian, as stored).
IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
MAX_NDIM = 32  # what every NumPy version can hold; a larger count is a corrupt header
CHUNK_BYTES = 1 << 20  # read and download in 1 MiB pieces


class DataFormatError(ValueError):
    """A data file is not what it claims to be; the message names the file and the problem."""


def _describe_magic(magic: bytes) -> str:
    return "0x" + magic.hex().upper()


def _read_exactly(f, n: int, path: Path, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise DataFormatError(f"{path}: truncated: the file ends inside the {what} ({len(data)} of {n} bytes)")
    return data


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file into a NumPy array of native byte order.

    A name ending in ``.gz`` is decompressed on the fly. The header decides the
    element type (magic byte 3: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64) and the number of dimensions (byte 4); then come
    that many big-endian uint32 sizes, then exactly ``prod(sizes)`` values.

    Parameters
    ----------
    path : str or os.PathLike
        The file.

    Returns
    -------
    numpy.ndarray
        Shape given by the header, writable, in native byte order.

    Raises
    ------
    DataFormatError
        Not gzip although named ``.gz``; a corrupt gzip stream; an unknown magic
        number; fewer or more value bytes than the header's sizes promise. The
        message names the file and what is wrong.
    FileNotFoundError
        The file does not exist.

    Examples
    --------
    >>> import os, tempfile
    >>> p = os.path.join(tempfile.mkdtemp(), "tiny-idx2-ubyte")
    >>> _ = open(p, "wb").write(bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3, 4, 5, 6]))
    >>> read_idx(p)
    array([[1, 2, 3],
           [4, 5, 6]], dtype=uint8)
    """
    path = Path(path)
    gzipped = path.name.endswith(".gz")
    with open(path, "rb") as raw:
        if gzipped and raw.read(2) != b"\x1f\x8b":
            raise DataFormatError(f"{path}: not a gzip file, although its name ends in .gz")
        raw.seek(0)
        f = gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else raw
        try:
            return _read_idx_stream(f, path, gzipped)
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            # A damaged gzip stream: wrong CRC, cut short, or garbage inside.
            raise DataFormatError(f"{path}: truncated or corrupt gzip data ({exc or type(exc).__name__})") from None


def _read_idx_stream(f, path: Path, gzipped: bool) -> np.ndarray:
    magic = f.read(4)
    if len(magic) < 4:
        raise DataFormatError(f"{path}: too short for an IDX header ({len(magic)} bytes, need at least 4)")
    if magic[0] != 0 or magic[1] != 0 or magic[2] not in IDX_DTYPES:
        hint = " (it looks gzip-compressed: name it .gz)" if magic[:2] == b"\x1f\x8b" and not gzipped else ""
        raise DataFormatError(
            f"{path}: wrong magic number {_describe_magic(magic)}: an IDX file starts with 0x0000 then a type "
            f"byte in {{{', '.join(f'0x{t:02X}' for t in IDX_DTYPES)}}}{hint}"
        )
    dtype, ndim = IDX_DTYPES[magic[2]], magic[3]
    if not 1 <= ndim <= MAX_NDIM:
        raise DataFormatError(
            f"{path}: magic number {_describe_magic(magic)} gives {ndim} dimensions (need 1 to {MAX_NDIM})"
        )
    sizes = _read_exactly(f, 4 * ndim, path, "header's dimension sizes")
    shape = tuple(int.from_bytes(sizes[4 * i : 4 * i + 4], "big") for i in range(ndim))
    expected = math.prod(shape) * dtype.itemsize

    # Read what is there, never trusting the header with an allocation: a corrupt size
    # field can promise terabytes. Memory grows only with bytes actually read.
    payload = bytearray()
    while len(payload) < expected:
        chunk = f.read(min(CHUNK_BYTES, expected - len(payload)))
        if not chunk:
            raise DataFormatError(
                f"{path}: truncated: the header says shape {shape} of {dtype.name} ({expected} bytes of values), "
                f"the file holds {len(payload)}"
            )
        payload += chunk
    if f.read(1):
        extra = ""
        if not gzipped:
            extra = f" ({os.fstat(f.fileno()).st_size - 4 - 4 * ndim - expected} bytes too many)"
        raise DataFormatError(
            f"{path}: over-long: more bytes than the header's shape {shape} of {dtype.name} "
            f"({expected} bytes of values) accounts for{extra}"
        )
    try:
        values = np.frombuffer(payload, dtype=dtype).reshape(shape)
    except ValueError:  # e.g. a zero size beside sizes whose product overflows: NumPy cannot hold the shape
        raise DataFormatError(f"{path}: the header's shape {shape} is not a shape NumPy can hold") from None
    # Native byte order (CuPy and most code expect it); a no-op for one-byte types.
    return values if dtype.itemsize == 1 else values.astype(dtype.newbyteorder("="))
