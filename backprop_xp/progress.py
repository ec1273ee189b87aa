"""The one progress bar of the package (downloads and training epochs): tqdm on stderr, only where someone watches."""

from __future__ import annotations

import sys
from typing import Any


def progress_bar(total: int | None, description: str, *, unit: str = "img", enabled: bool | None = None) -> Any:
    """A tqdm bar on stderr that vanishes when done; disabled unless ``enabled`` (None: stderr is a terminal).

    ``unit="B"`` counts bytes in KiB/MiB. A disabled bar still accepts
    ``update``/``set_postfix``/``close``, so callers need no ``if``.
    """
    from tqdm import tqdm  # imported when a bar is made, not with the package

    on = sys.stderr.isatty() if enabled is None else enabled
    return tqdm(
        total=total, desc=description, unit=unit, unit_scale=True, unit_divisor=1024 if unit == "B" else 1000,
        leave=False, dynamic_ncols=True, disable=not on,
    )  # fmt: skip
