"""Which class times each engine, and why an engine cannot run here: the one place that names them all.

``engines.py`` holds the eager engines, ``compiled.py`` the JAX and
``torch.compile`` ones (which build on ``engines.py``); this module imports
both, so neither imports the other's dependants (no import cycle).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..backend import error_line
from .compiled import JaxEngine, TorchCompileEngine, jax_missing
from .engines import (
    DEFAULT_OPTIMIZER,
    ENGINES,
    JAX_ENGINES,
    OPTIMIZERS,
    TORCH_COMPILE_ENGINES,
    TORCH_ENGINES,
    CupyEngine,
    Data,
    NumpyEngine,
    SklearnEngine,
    TorchEngine,
    TorchGraphEngine,
    device_of,
)


def missing_reason(engine: str) -> str | None:
    """None when ``engine`` can run here, else one line saying why not.

    Imports the engine's library (and, for a GPU engine, touches the device),
    so it runs in the engine's own worker process, never in the command's.
    """
    if engine == "numpy":
        return None
    if engine in ("cupy", "cupy-eager"):
        from ..backend import BackendError, get_backend

        try:
            get_backend("cupy")
        except BackendError as exc:
            return str(exc)
        return None
    if engine in JAX_ENGINES:
        return jax_missing(device_of(engine))
    if engine in TORCH_ENGINES + TORCH_COMPILE_ENGINES:
        try:
            import torch
        except ImportError:
            return "PyTorch is not installed (pip install torch)"
        except Exception as exc:  # a broken install fails here, not later in the middle of a timing
            return f"PyTorch is installed but fails to import ({error_line(exc, with_type=True)})"
        if device_of(engine) == "cuda" and not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            return f"PyTorch {torch.__version__} ({build}) sees no usable CUDA device"
        return None
    if engine == "sklearn":
        try:
            from sklearn.neural_network import MLPClassifier  # noqa: F401
        except ImportError:
            return "scikit-learn is not installed (pip install scikit-learn)"
        except Exception as exc:
            return f"scikit-learn is installed but fails to import ({error_line(exc, with_type=True)})"
        return None
    raise ValueError(f"unknown engine {engine!r}: choose from {', '.join(ENGINES)}")


# --------------------------------------------------------------------------- one place to build them


class Builder:
    """Builds one engine's contestant for a shape; keeps what its shapes share (data on the device, buffers)."""

    def __init__(
        self, engine: str, data: Data, clock: Callable[[], float] = time.perf_counter,
        optimizer: str = DEFAULT_OPTIMIZER,
    ) -> None:  # fmt: skip
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}: choose from {', '.join(OPTIMIZERS)}")
        self.engine, self.data, self.clock, self.optimizer = engine, data, clock, optimizer
        self.shared: dict[str, Any] = {}

    def __call__(self, hidden: int, batch: int) -> Any:
        e, data, shared, clock, opt = self.engine, self.data, self.shared, self.clock, self.optimizer
        if e == "numpy":
            return NumpyEngine(hidden, batch, data, clock, opt)
        if e == "sklearn":
            return SklearnEngine(hidden, batch, data, shared, clock, opt)
        if e == "torch-cpu":
            return TorchEngine(hidden, batch, data, shared, "cpu", clock, opt)
        if e == "torch-cuda":
            return TorchEngine(hidden, batch, data, shared, "cuda", clock, opt)
        if e == "torch-cuda-graph":
            return TorchGraphEngine(hidden, batch, data, shared, clock, opt)
        if e in ("cupy", "cupy-eager"):
            return CupyEngine(hidden, batch, data, shared, graphs=(e == "cupy"), optimizer=opt)
        if e in JAX_ENGINES:
            return JaxEngine(hidden, batch, data, shared, device_of(e), per_step="step" in e, optimizer=opt)
        if e in TORCH_COMPILE_ENGINES:
            return TorchCompileEngine(hidden, batch, data, shared, device_of(e), clock=clock, optimizer=opt)
        raise ValueError(f"unknown engine {e!r}")
