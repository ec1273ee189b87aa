"""The network: one hidden layer, forward and backward passes derived by hand.

For a batch ``x`` of shape ``(B, n_inputs)`` (one example per row)::

    z1 = x W1ᵀ + b1          a1 = f(z1)
    z2 = a1 W2ᵀ + b2         ŷ  = softmax(z2)
    L  = mean_b −Σ_k y_k log ŷ_k                      (y one-hot of the labels)

and, by the chain rule::

    δ2 = (ŷ − y) / B         ∂L/∂W2 = δ2ᵀ a1     ∂L/∂b2 = Σ_b δ2
    δ1 = δ2 W2 ⊙ f'(z1)      ∂L/∂W1 = δ1ᵀ x      ∂L/∂b1 = Σ_b δ1

``MLP.backprop`` is exactly these lines, written against the array module
``xp`` (NumPy or CuPy) into buffers allocated once per batch size
(``workspace.py``), so the training loop allocates nothing large per step. It
is the definition: the fused steps (``cpu/fused_cpu_step.py``,
``cuda/fused_gpu_step.py``) compute the same lines in fewer passes and are
checked against it; ``step.make_step`` is the one place that chooses.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import numpy as np

from .activations import ACTIVATIONS, activation_forward_
from .backend import get_backend, resolve_dtype, to_numpy
from .checks import AT_LEAST_0, AT_LEAST_1, check, check_choice
from .files import atomic_savez, read_npz
from .loss import check_labels, softmax_, softmax_cross_entropy_
from .workspace import PerBatchSize, Workspace

PARAM_NAMES = ("W1", "b1", "W2", "b2")
# Rows of a batch pushed through the network at once by predict/evaluate: big
# enough to keep BLAS busy, small enough to bound memory (4096 x 800 x 4 B = 13 MB).
EVAL_CHUNK = 4096


class MLP:
    """A fully connected network with one hidden layer and a softmax output.

    Parameters
    ----------
    n_inputs, n_hidden, n_outputs : int
        Layer sizes (784, for example, 128, 10 for MNIST).
    activation : str, default "relu"
        The hidden layer's ``f``: a name in ``activations.ACTIVATIONS`` (relu, sigmoid, tanh, leaky_relu, elu).
    backend : {"numpy", "cupy", "auto"}, default "numpy"
        Where the arrays live; see ``backprop_xp.get_backend``.
    dtype : {"float32", "float64"}, default "float32"
        Every parameter, activation and gradient has this dtype.
    seed : int, default 0
        Seeds the initialisation. The same seed gives the same parameters on
        every backend (they are drawn with NumPy, then copied).

    Attributes
    ----------
    params : dict of str to array
        ``"W1"`` ``(n_hidden, n_inputs)``, ``"b1"`` ``(n_hidden,)``, ``"W2"``
        ``(n_outputs, n_hidden)``, ``"b2"`` ``(n_outputs,)``: views into
        ``flat_params``, so in-place edits (``m.params["W1"][...] = w``) change
        the model.
    grads : dict of str to array
        The same keys and shapes, views into ``flat_grads``; filled by ``backprop``.
    xp : module
        ``numpy`` or ``cupy``.
    path : str or None
        The file ``load`` read the model from; None for a model made here.

    Notes
    -----
    Initialisation: He (normal, variance 2/fan_in) for ReLU, Glorot (uniform,
    variance 2/(fan_in+fan_out)) for sigmoid and tanh; biases zero.
    """

    path: str | None = None  # set by load

    def __init__(
        self,
        n_inputs: int,
        n_hidden: int,
        n_outputs: int,
        *,
        activation: str = "relu",
        backend: str = "numpy",
        dtype: str = "float32",
        seed: int = 0,
    ) -> None:
        arguments = {"n_inputs": n_inputs, "n_hidden": n_hidden, "n_outputs": n_outputs}
        arguments.update(activation=activation, dtype=dtype, seed=seed)
        for name, value in arguments.items():
            _check_argument(name, value)
        self.backend = get_backend(backend)
        self.xp = self.backend.xp
        self.dtype = resolve_dtype(dtype)
        self.n_inputs, self.n_hidden, self.n_outputs = int(n_inputs), int(n_hidden), int(n_outputs)
        self.activation = activation
        self.seed = int(seed)

        shapes = _param_shapes(self.n_inputs, self.n_hidden, self.n_outputs)
        # One flat buffer for all parameters (and one for all gradients): the
        # optimizer updates everything with a few whole-buffer operations.
        self.flat_params, self.params = _flat_buffer(self.xp, shapes, self.dtype)
        self.flat_grads, self.grads = _flat_buffer(self.xp, shapes, self.dtype)
        self.flat_params[...] = 0
        self.flat_grads[...] = 0
        for name, value in _initial_params(shapes, activation, self.seed).items():
            self.params[name][...] = self.xp.asarray(value.astype(self.dtype))
        # Training and evaluation keep separate caches, so that evaluating (in
        # chunks of other sizes) never evicts the training step's buffers.
        self._workspaces = PerBatchSize(functools.partial(self._new_workspace, training=True))
        self._eval_workspaces = PerBatchSize(functools.partial(self._new_workspace, training=False))

    # ------------------------------------------------------------------ config
    @property
    def config(self) -> dict[str, Any]:
        """The constructor's arguments (backend as the one actually in use)."""
        return {
            "n_inputs": self.n_inputs,
            "n_hidden": self.n_hidden,
            "n_outputs": self.n_outputs,
            "activation": self.activation,
            "backend": self.backend.name,
            "dtype": self.dtype.name,
            "seed": self.seed,
        }

    def __repr__(self) -> str:
        return (
            f"MLP({self.n_inputs}, {self.n_hidden}, {self.n_outputs}, activation={self.activation!r}, "
            f"backend={self.backend.name!r}, dtype={self.dtype.name!r})"
        )

    # ------------------------------------------------------------------ the math
    def workspace(self, batch: int) -> Workspace:
        """The training buffers for ``batch`` rows (built on first use, then reused; the fused CPU step writes here too)."""
        return self._workspaces(batch)

    def _new_workspace(self, batch: int, *, training: bool) -> Workspace:
        return Workspace(self.xp, batch, self.n_hidden, self.n_outputs, self.dtype, training=training)

    def forward_into(self, x: Any, ws: Workspace, *, keep_fprime: bool = False) -> None:
        """z1 = x W1ᵀ + b1, a1 = f(z1), z2 = a1 W2ᵀ + b2, into the workspace (and f'(z1) if asked)."""
        xp, p = self.xp, self.params
        xp.matmul(x, p["W1"].T, out=ws.a1)
        ws.a1 += p["b1"]
        # ReLU always goes through its mask: z ⊙ [z > 0] is cheaper than NumPy's maximum.
        keep_fprime = keep_fprime or self.activation == "relu"
        activation_forward_(ws.a1, self.activation, fprime=ws.fprime if keep_fprime else None)
        xp.matmul(p["W2"], ws.a1.T, out=ws.z2.T)  # z2ᵀ = W2 a1ᵀ: z2 = a1 W2ᵀ into its (K, B) buffer
        ws.z2 += p["b2"]

    def backprop(self, x: Any, labels: Any) -> tuple[Any, Any]:
        """One forward and backward pass; fills ``grads`` in place.

        The training loop's hot path: ``x`` must already be a C-contiguous
        array of this model's backend and dtype, and ``labels`` integers of the
        same backend already checked to be in range (``loss_and_grads`` is the
        checked, convenient form).

        Returns
        -------
        loss : 0-d array
            Mean cross-entropy over the batch, left on the device.
        n_correct : 0-d array
            How many rows the forward pass classified correctly.
        """
        xp = self.xp
        if x.ndim != 2 or labels.shape != (x.shape[0],):  # a fused step would read past the labels
            raise ValueError(f"backprop needs x (batch, {self.n_inputs}) and labels (batch,), got "
                             f"{tuple(x.shape)} and {tuple(labels.shape)}")  # fmt: skip
        ws = self._workspaces(x.shape[0])
        self.forward_into(x, ws, keep_fprime=True)
        n_correct = xp.count_nonzero(ws.z2.argmax(axis=1) == labels)
        loss = softmax_cross_entropy_(ws.z2, labels, out=ws.delta2, rows=ws.rows)  # δ2 = (ŷ − y) / B
        self.backward_into(x, ws)
        return loss, n_correct

    def backward_into(self, x: Any, ws: Workspace) -> None:
        """From ``δ2`` (in ``ws.delta2``) back to every gradient: ``∂L/∂W2``, ``∂L/∂b2``, ``δ1``, ``∂L/∂W1``, ``∂L/∂b1``."""
        xp, p, g = self.xp, self.params, self.grads
        xp.matmul(ws.delta2.T, ws.a1, out=g["W2"])  # ∂L/∂W2 = δ2ᵀ a1
        xp.matmul(ws.delta2.T, ws.ones, out=g["b2"])  # ∂L/∂b2 = Σ_b δ2 = δ2ᵀ 1
        xp.matmul(ws.delta2, p["W2"], out=ws.delta1)
        ws.delta1 *= ws.fprime  # δ1 = δ2 W2 ⊙ f'(z1)
        xp.matmul(ws.delta1.T, x, out=g["W1"])  # ∂L/∂W1 = δ1ᵀ x
        xp.matmul(ws.ones, ws.delta1, out=g["b1"])  # ∂L/∂b1 = Σ_b δ1 = 1ᵀ δ1

    # ------------------------------------------------------------------ public API
    def as_input(self, x: Any) -> Any:
        """``x`` as a C-contiguous ``(B, n_inputs)`` array of this model's backend and dtype, all finite."""
        xp = self.xp
        if xp is np:
            x = to_numpy(x)
        if not hasattr(x, "dtype"):
            x = np.asarray(x)
        if x.dtype.kind in "iu" and x.size and float(x.max()) > 1:
            # uint8 pixels 0-255 train to a loss of hundreds and no error: refuse them by name.
            raise ValueError("x holds integers (pixel values 0-255?): give float images scaled to [0, 1], e.g. x / 255")
        x = xp.ascontiguousarray(xp.asarray(x, dtype=self.dtype))
        if x.ndim != 2 or x.shape[1] != self.n_inputs:
            raise ValueError(f"x must have shape (batch, {self.n_inputs}), got {tuple(x.shape)}")
        finite = xp.isfinite(x).all(axis=1)
        if not bool(finite.all()):  # one NaN pixel makes that row's class a guess, and a step's update all NaN
            raise ValueError(f"x holds NaN or infinite values (row {int(xp.argmin(finite))} is the first)")
        return x

    def as_labels(self, labels: Any, n_rows: int) -> Any:
        """``labels`` as integers of this model's backend, checked to be in ``[0, n_outputs)``."""
        xp = self.xp
        if xp is np:
            labels = to_numpy(labels)
        labels = xp.asarray(labels)
        check_labels(labels, n_rows, self.n_outputs)
        return labels.astype(xp.int64, copy=False)

    def loss_and_grads(self, x: Any, labels: Any) -> tuple[float, dict[str, Any]]:
        """Mean cross-entropy on a batch and its gradient for every parameter.

        Parameters
        ----------
        x : array of shape (B, n_inputs)
            NumPy or this model's backend; converted to the model's dtype.
        labels : integer array of shape (B,)
            Classes in ``[0, n_outputs)``.

        Returns
        -------
        loss : float
        grads : dict
            ``"W1"``, ``"b1"``, ``"W2"``, ``"b2"``: the model's own gradient
            arrays (``self.grads``, views into ``flat_grads``), not copies.
            Editing them in place (``np.clip(g, -1, 1, out=g)``) changes what
            ``SGD.step()`` applies; the next call overwrites them, so copy
            what you want to keep.
        """
        x = self.as_input(x)
        if x.shape[0] == 0:
            raise ValueError("loss_and_grads needs at least one example")
        labels = self.as_labels(labels, x.shape[0])
        loss, _ = self.backprop(x, labels)
        return float(loss), dict(self.grads)  # a new dict of the same arrays: rebinding a key leaves the model alone

    def logits(self, x: Any) -> Any:
        """``z2`` for every row of ``x``, computed in chunks of ``EVAL_CHUNK`` rows."""
        x = self.as_input(x)
        out = self.xp.empty((x.shape[0], self.n_outputs), self.dtype)
        for start in range(0, x.shape[0], EVAL_CHUNK):
            chunk = x[start : start + EVAL_CHUNK]
            ws = self._eval_workspaces(chunk.shape[0])
            self.forward_into(chunk, ws)
            out[start : start + chunk.shape[0]] = ws.z2
        return out

    def predict_proba(self, x: Any) -> Any:
        """Class probabilities ``ŷ = softmax(z2)``, shape ``(B, n_outputs)``, rows summing to 1."""
        return softmax_(self.logits(x))

    def predict(self, x: Any) -> Any:
        """The most probable class of each row, as integers of the model's backend."""
        return self.logits(x).argmax(axis=1)

    # ------------------------------------------------------------------ saving
    def save(self, path: str | os.PathLike, **extra: Any) -> None:
        """Write parameters and config to an ``.npz`` file, atomically.

        ``extra`` arrays or scalars (a training state, say) are stored beside
        them. Everything is plain arrays, so ``numpy.load(path,
        allow_pickle=False)`` reads it.
        """
        arrays = {name: to_numpy(value) for name, value in self.params.items()}
        arrays.update({f"config.{key}": np.asarray(value) for key, value in self.config.items()})
        arrays.update({key: np.asarray(value) for key, value in extra.items()})
        atomic_savez(path, arrays)

    @classmethod
    def load(cls, path: str | os.PathLike, *, backend: str = "numpy") -> MLP:
        """Read a model written by ``save`` onto ``backend`` (NumPy unless asked).

        A model trained on a GPU loads anywhere; pass ``backend="auto"`` or
        ``"cupy"`` to put it on a GPU. A file that is not such a model (a
        config field that breaks the constructor's rules, a parameter of the
        wrong shape or holding NaN or infinity) is a ValueError naming the
        file, the field or parameter, and what is wrong with it.
        """
        arrays = read_npz(path, "a model file written by backprop-xp")
        config = {}
        for key, value in arrays.items():
            if key.startswith("config."):
                field = key[len("config.") :]
                if value.size != 1:
                    raise ValueError(f"{path}: config field {field} holds {value.size} values, not one")
                config[field] = value.item()
        params = {name: arrays[name] for name in PARAM_NAMES if name in arrays}
        missing = [key for key in ("n_inputs", "n_hidden", "n_outputs", "activation", "dtype") if key not in config]
        missing += [name for name in PARAM_NAMES if name not in params]
        if missing:
            raise ValueError(f"{path}: not a backprop-xp model file (missing {', '.join(missing)})")

        # Every field is checked by the constructor's own rules, one at a time, so
        # that an error can say which field of which file holds what.
        arguments = {name: config.get(name, 0) for name in ("n_inputs", "n_hidden", "n_outputs", "seed")}
        arguments.update(activation=str(config["activation"]), dtype=str(config["dtype"]))
        for name, value in arguments.items():
            if name not in ("activation", "dtype"):
                if isinstance(value, float) and value.is_integer():
                    value = arguments[name] = int(value)  # 16.0 from a hand-written file is 16
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"{path}: config field {name} is {config[name]!r}, not a whole number")
            try:
                _check_argument(name, value)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{path}: config field {name} is {config.get(name)!r} ({exc})") from None

        # The arrays against the config before the model allocates anything: a
        # corrupt size must not ask for terabytes.
        dtype = resolve_dtype(arguments["dtype"])
        shapes = _param_shapes(arguments["n_inputs"], arguments["n_hidden"], arguments["n_outputs"])
        for name, value in params.items():
            if value.dtype.kind not in "fiu":
                raise ValueError(f"{path}: parameter {name} holds {value.dtype} values, not numbers")
            if value.shape != shapes[name]:
                raise ValueError(
                    f"{path}: parameter {name} has shape {value.shape}, but the config says {shapes[name]}"
                )
            with np.errstate(over="ignore"):  # float64 past float32's range becomes inf: counted just below
                params[name] = value = value.astype(dtype, copy=False)
            bad = value.size - int(np.count_nonzero(np.isfinite(value)))
            if bad:
                values = "1 value that is" if bad == 1 else f"{bad} values that are"
                raise ValueError(f"{path}: parameter {name} has {values} NaN or infinite")

        model = cls(**arguments, backend=backend)
        for name, value in params.items():
            model.params[name][...] = model.xp.asarray(value)
        model.path = os.fspath(path)
        return model


def _check_argument(name: str, value: Any) -> None:
    """The constructor's rule for one of its arguments (backend aside); a ValueError naming it if broken.

    One argument at a time, so that ``MLP.load`` can say which field of a
    file is wrong.
    """
    if name in ("n_inputs", "n_hidden", "n_outputs"):
        check(name, value, AT_LEAST_1)
        if name == "n_outputs" and value < 2:
            raise ValueError(f"n_outputs must be at least 2 for a softmax, got {value}")
    elif name == "seed":
        check(name, value, AT_LEAST_0)  # NumPy's own message for a negative seed names nothing
    elif name == "activation":
        check_choice(name, value, ACTIVATIONS)
    elif name == "dtype":
        resolve_dtype(value)


def _param_shapes(n_inputs: int, n_hidden: int, n_outputs: int) -> dict[str, tuple[int, ...]]:
    """The shape of each parameter: ``W1`` ``(n_hidden, n_inputs)``, ``b1``, ``W2``, ``b2``."""
    return {"W1": (n_hidden, n_inputs), "b1": (n_hidden,), "W2": (n_outputs, n_hidden), "b2": (n_outputs,)}


def _flat_buffer(xp: Any, shapes: dict[str, tuple[int, ...]], dtype: np.dtype) -> tuple[Any, dict[str, Any]]:
    """One array holding every named shape, and C-contiguous views into it.

    Each view starts on a 64-byte boundary so BLAS sees aligned matrices.
    """
    align = max(1, 64 // dtype.itemsize)
    offsets, total = {}, 0
    for name, shape in shapes.items():
        offsets[name] = total
        total += -(-math.prod(shape) // align) * align
    flat = xp.empty(total, dtype)
    views = {
        name: flat[offsets[name] : offsets[name] + math.prod(shape)].reshape(shape) for name, shape in shapes.items()
    }
    return flat, views


def _initial_params(shapes: dict[str, tuple[int, ...]], activation: str, seed: int) -> dict[str, np.ndarray]:
    """Zero biases, and weights drawn in float64 with NumPy as the activation's table entry says (He for ReLU,
    Glorot for sigmoid and tanh: ``activations.ACTIVATIONS``)."""
    rng = np.random.default_rng(seed)
    draw = ACTIVATIONS[activation].init
    return {name: np.zeros(shape) if name.startswith("b") else draw(rng, shape) for name, shape in shapes.items()}
