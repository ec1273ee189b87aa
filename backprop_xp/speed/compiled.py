"""The compiled peers of ``backprop-xp bench``: JAX under ``jax.jit`` and PyTorch under ``torch.compile``.

Same network, start and sample order as every engine (``engines.py``): 784-H-10,
ReLU, mean softmax cross-entropy, SGD ``v ← μ v + g, w ← w − η v`` (μ 0.9,
η 0.05) or Adam (``jax_optimizer``: written here in ``jax.numpy`` with
``optimizers.Adam``'s conventions, no optax), float32, our He-normal initial
parameters, epoch ``e`` in the order ``data.epoch_permutation(0, e, n)`` cut
into contiguous batches, the last one shorter.

* ``jax``: the whole epoch is one jitted function: gather the epoch's rows,
  ``lax.scan`` the step over the full batches, then the last, shorter batch.
  No Python runs between steps: the strongest form a JAX user writes.
* ``jax-step``: the step alone is jitted and called once per batch from
  Python (the batch cut from the gathered epoch inside the step).
* ``torch-compile``: the forward pass with its loss (AOTAutograd compiles the
  backward too) and the optimizer's step, each under ``torch.compile``; on a
  GPU with ``mode="reduce-overhead"`` (CUDA graphs).

Compiling happens when the contestant is built, for every batch size the
epoch uses, and is timed on its own (``compile_s``), apart from the epochs.
A compiler that fails raises ``CompileFailed``: the bench then lists the
engine as not run, with the reason, as it does a missing library.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..backend import error_line
from .engines import (
    DEFAULT_OPTIMIZER,
    N_INPUTS,
    N_OUTPUTS,
    OPTIMIZERS,
    SEED,
    Data,
    TorchEngine,
    _bound_scale,
    _shared,
    batch_slices,
    initial_params,
    restart_torch_optimizer,
    seconds_per_call,
)


class CompileFailed(RuntimeError):
    """The engine's compiler refused the training step; the message is one line saying why."""


# --------------------------------------------------------------------------- JAX


def jax_optimizer(jax: Any, name: str) -> tuple[Callable, Callable]:
    """``(init, update)`` of optimizer ``name`` with ``OPTIMIZERS[name]``'s settings, as pure JAX functions.

    ``init(params) -> state``; ``update(params, grads, state) -> (params, state)``.
    SGD's state is the velocity; Adam's is ``(m, v, t)``, its lines those of
    ``optimizers.Adam.step`` in the same order (``tests/test_bench.py``
    checks them against it).
    """
    jnp, s = jax.numpy, OPTIMIZERS[name]
    if name == "sgd":
        lr, mu = s["lr"], s["momentum"]

        def sgd(params: dict, grads: dict, velocity: dict) -> tuple[dict, dict]:
            velocity = {k: mu * velocity[k] + grads[k] for k in params}  # v ← μ v + g
            return {k: params[k] - lr * velocity[k] for k in params}, velocity  # w ← w − η v

        return (lambda params: {k: jnp.zeros_like(w) for k, w in params.items()}), sgd
    lr, b1, b2, eps = s["lr"], s["beta1"], s["beta2"], s["eps"]
    # 1 − βᵗ as −expm1(t log β), log β in float64 here: in float32, 1 − 0.999ᵗ would keep only 4 of its
    # digits (0.999 is 0.99900001 in float32), where Adam's other lines keep 7.
    log_b1, log_b2 = math.log(b1), math.log(b2)

    def adam(params: dict, grads: dict, state: tuple) -> tuple[dict, tuple]:
        m, v, t = state
        t = t + 1
        m = {k: m[k] * b1 + grads[k] * (1 - b1) for k in params}  # m ← β₁ m + (1 − β₁) g
        v = {k: v[k] * b2 + (grads[k] * grads[k]) * (1 - b2) for k in params}  # v ← β₂ v + (1 − β₂) g²
        tf = t.astype(jnp.float32)
        root2 = jnp.sqrt(-jnp.expm1(tf * log_b2))  # √(1 − β₂ᵗ)
        step = lr / -jnp.expm1(tf * log_b1)  # η / (1 − β₁ᵗ)
        # w ← w − η m̂ / (√v̂ + ε), computed as optimizers.Adam does: (m / (√v / √(1 − β₂ᵗ) + ε)) · η / (1 − β₁ᵗ)
        params = {k: params[k] - (m[k] / (jnp.sqrt(v[k]) / root2 + eps)) * step for k in params}
        return params, (m, v, t)

    def init(params: dict) -> tuple:
        zeros = lambda: {k: jnp.zeros_like(w) for k, w in params.items()}  # noqa: E731
        return zeros(), zeros(), jnp.zeros((), jnp.int32)

    return init, adam


def jax_step(jax: Any, optimizer: str = DEFAULT_OPTIMIZER) -> Callable:
    """The training step as a pure function ``(state, (xb, yb)) -> (state, None)``, the shape ``lax.scan`` wants.

    ``state`` is ``(params, optimizer_state, loss_sum, n_correct)``; the sums
    are carried so that an epoch reads them from the device once.
    """
    jnp = jax.numpy
    update = jax_optimizer(jax, optimizer)[1]

    def loss(params: dict, xb: Any, yb: Any) -> tuple[Any, Any]:
        a1 = jnp.maximum(xb @ params["W1"].T + params["b1"], 0.0)  # a1 = ReLU(x W1ᵀ + b1)
        z2 = a1 @ params["W2"].T + params["b2"]
        log_p = jax.nn.log_softmax(z2)
        return -jnp.mean(jnp.take_along_axis(log_p, yb[:, None], axis=1)), z2  # L = mean −log ŷ_y

    value_and_grad = jax.value_and_grad(loss, has_aux=True)

    def step(state: tuple, batch: tuple) -> tuple[tuple, None]:
        params, opt_state, loss_sum, n_correct = state
        xb, yb = batch
        (value, z2), grads = value_and_grad(params, xb, yb)
        params, opt_state = update(params, grads, opt_state)
        loss_sum = loss_sum + value * xb.shape[0]
        n_correct = n_correct + jnp.sum(jnp.argmax(z2, axis=1) == yb)
        return (params, opt_state, loss_sum, n_correct), None

    return step


def jax_epoch(jax: Any, step: Callable, n: int, batch: int) -> Callable:
    """``(state, x, y, order) -> state``: one epoch, the full batches under ``lax.scan``, then the last one."""
    jnp = jax.numpy
    full = n // batch * batch

    def epoch(state: tuple, x: Any, y: Any, order: Any) -> tuple:
        xs, ys = jnp.take(x, order, axis=0), jnp.take(y, order, axis=0)  # the epoch's rows, gathered once
        batches = (xs[:full].reshape(-1, batch, x.shape[1]), ys[:full].reshape(-1, batch))
        state, _ = jax.lax.scan(step, state, batches)
        if full < n:  # sizes are static: the shorter last batch is traced once, after the scan
            state, _ = step(state, (xs[full:], ys[full:]))
        return state

    return epoch


def jax_missing(device: str) -> str | None:
    """None when JAX can run an engine on ``device`` (``"cpu"`` or ``"cuda"``), else one line why not."""
    try:
        import jax
    except ImportError:
        return "JAX is not installed (pip install 'backprop-xp[bench]', or pip install 'jax[cpu]')"
    except Exception as exc:  # noqa: BLE001 - a broken install is reported, not raised mid-timing
        return f"JAX is installed but fails to import ({error_line(exc, with_type=True)})"
    platform = "gpu" if device == "cuda" else "cpu"
    try:
        jax.devices(platform)
    except RuntimeError:
        return f"JAX {jax.__version__} sees no {platform.upper()} (its backends: {jax.default_backend()})"
    return None


class JaxEngine:
    """JAX on the CPU or a GPU: the whole epoch jitted (``per_step=False``) or the step jitted alone."""

    def __init__(
        self, hidden: int, batch: int, data: Data, shared: dict[str, Any], device: str, per_step: bool,
        optimizer: str = DEFAULT_OPTIMIZER,
    ) -> None:  # fmt: skip
        import jax

        self.jax, self.hidden, self.batch, self.data, self.per_step = jax, hidden, batch, data, per_step
        self.optimizer = optimizer
        self.trained_with = optimizer  # the update jax_step builds (the worker reports it)
        self.device = jax.devices("gpu" if device == "cuda" else "cpu")[0]
        put = lambda a: jax.device_put(a, self.device)  # noqa: E731
        self.put = put
        # int32 labels: JAX without x64 has no int64. The data on the device once for every shape.
        self.x, self.y = _shared(shared, "data", lambda: (put(data.x), put(data.y.astype(np.int32))))
        params = {k: put(v) for k, v in initial_params(hidden).items()}  # ours: He normal, zero biases, seed 0
        self.state = (params, jax.device_put(jax_optimizer(jax, optimizer)[0](params), self.device))
        start = time.perf_counter()
        try:
            self._compile()
        except Exception as exc:  # noqa: BLE001 - any compiler error: the engine is listed as not run
            raise CompileFailed(f"jax.jit failed: {error_line(exc, with_type=True)}") from exc
        self.compile_s = time.perf_counter() - start
        self.last_loss = self.last_correct = None

    def _sums(self) -> tuple[Any, Any]:
        return self.put(np.float32(0)), self.put(np.int32(0))

    def _compile(self) -> None:
        """Compile ahead of time (``jit(...).lower(...).compile()``), so no epoch pays for it."""
        jax, n, b = self.jax, len(self.data.x), self.batch
        step = jax_step(jax, self.optimizer)
        state = (*self.state, *self._sums())
        order = self.put(np.arange(n, dtype=np.int32))
        if not self.per_step:
            fn = jax.jit(jax_epoch(jax, step, n, b), donate_argnums=0)
            self._epoch = fn.lower(state, self.x, self.y, order).compile()
            return
        jnp = jax.numpy
        gather = jax.jit(lambda x, y, order: (jnp.take(x, order, axis=0), jnp.take(y, order, axis=0)))
        self._gather = gather.lower(self.x, self.y, order).compile()
        xs, ys = self._gather(self.x, self.y, order)

        def one_batch(state: tuple, xs: Any, ys: Any, start: Any, size: int) -> tuple:
            cut = lambda a: jax.lax.dynamic_slice_in_dim(a, start, size)  # noqa: E731 - the batch, inside the step
            return step(state, (cut(xs), cut(ys)))[0]

        fn = jax.jit(one_batch, donate_argnums=0, static_argnums=4)
        start = self.put(np.int32(0))
        self._steps = {
            size: fn.lower(state, xs, ys, start, size).compile()
            for size in {s.stop - s.start for s in batch_slices(n, b)}
        }

    def _run_epoch(self, epoch: int) -> None:
        from ..data import epoch_permutation

        n = len(self.data.x)
        order = self.put(epoch_permutation(SEED, epoch, n).astype(np.int32))
        state = (*self.state, *self._sums())
        if not self.per_step:
            state = self._epoch(state, self.x, self.y, order)
        else:
            xs, ys = self._gather(self.x, self.y, order)
            for s in batch_slices(n, self.batch):
                state = self._steps[s.stop - s.start](state, xs, ys, np.int32(s.start))
        self.state = state[:2]
        self.last_loss, self.last_correct = float(state[2]) / n, int(state[3])  # the epoch's one read

    def epoch(self, epoch: int) -> float:
        """Seconds of one epoch on the wall clock (XLA computes on its own threads: a thread's CPU time misses it)."""
        start = time.perf_counter()
        self._run_epoch(epoch)
        return time.perf_counter() - start

    def params(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in self.state[0].items()}

    def bound(self, workload: str) -> float:
        """The step's five products, as ``jax_gemm_bound`` times them."""
        slices, scale = _bound_scale(len(self.data.x), self.batch)
        return jax_gemm_bound(self.jax, self.device, self.x, self.hidden, slices) * scale

    def test_accuracy(self) -> float | None:
        if self.data.x_test is None:
            return None
        jax, jnp = self.jax, self.jax.numpy
        predict = jax.jit(lambda p, x: jnp.argmax(jnp.maximum(x @ p["W1"].T + p["b1"], 0) @ p["W2"].T + p["b2"], 1))
        labels = np.asarray(predict(self.state[0], self.put(self.data.x_test)))
        return float(np.mean(labels == self.data.y_test))


def jax_gemm_bound(jax: Any, device: Any, x: Any, hidden: int, slices: list[slice]) -> float:
    """Seconds of the five products over ``slices`` of ``x``, in one jitted ``lax.scan`` (no Python between batches).

    Each batch's products feed the next ones as the step's do (``δ2`` is
    ``z2`` here), and the last results are returned, so XLA can neither hoist
    nor drop any of them.
    """
    jnp = jax.numpy
    rng = np.random.default_rng(0)
    w1, w2 = (
        jax.device_put(rng.random(s, dtype=np.float32), device) for s in ((hidden, N_INPUTS), (N_OUTPUTS, hidden))
    )

    def five(carry: tuple, xb: Any) -> tuple[tuple, None]:
        a1 = xb @ w1.T
        z2 = a1 @ w2.T
        return (z2.T @ a1, (z2 @ w2).T @ xb), None  # ∂L/∂W2 = δ2ᵀ a1, δ1 = δ2 W2, ∂L/∂W1 = δ1ᵀ x

    def scan(xs: Any) -> tuple:
        zero = (jnp.zeros((N_OUTPUTS, hidden), xs.dtype), jnp.zeros((hidden, N_INPUTS), xs.dtype))
        return jax.lax.scan(five, zero, xs)[0]

    groups: dict[int, list[slice]] = {}
    for s in slices:
        groups.setdefault(s.stop - s.start, []).append(s)
    stacks = [jnp.stack([x[s] for s in group]) for group in groups.values()]
    compiled = [jax.jit(scan).lower(xs).compile() for xs in stacks]

    def go() -> None:
        jax.block_until_ready([fn(xs) for fn, xs in zip(compiled, stacks)])

    return seconds_per_call(go, min_seconds=0.1)


# --------------------------------------------------------------------------- torch.compile


class TorchCompileEngine(TorchEngine):
    """PyTorch with its forward + loss (backward by AOTAutograd) and ``optimizer.step`` under ``torch.compile``.

    The loop is ``TorchEngine``'s. ``dynamic=False``: one specialised graph
    per batch size, as our GPU step keeps one CUDA graph per size. Compiled at
    build time on warm-up steps (three at the full batch: the optimizer's
    step recompiles once its state exists; two at the last batch's size),
    after which the initial parameters are put back and the optimizer's state
    zeroed (``restart_torch_optimizer``: SGD's momentum buffers, Adam's moments
    and step count).
    """

    def __init__(
        self, hidden: int, batch: int, data: Data, shared: dict[str, Any], device: str = "cpu", **kwargs: Any
    ) -> None:
        super().__init__(hidden, batch, data, shared, device, **kwargs)
        torch, net = self.torch, self.net
        mode = "reduce-overhead" if device == "cuda" else None  # CUDA graphs on a GPU

        def forward(xb: Any, yb: Any) -> tuple[Any, Any]:
            logits = net(xb)
            return torch.nn.functional.cross_entropy(logits, yb), logits

        self._forward = torch.compile(forward, mode=mode, dynamic=False)
        optimizer = self.optimizer

        def update() -> None:  # PyTorch's recipe for a compiled optimizer: its step inside a compiled function
            optimizer.step()

        self._update = torch.compile(update, dynamic=False)
        start = time.perf_counter()
        try:
            self._warm_up()
        except Exception as exc:  # noqa: BLE001 - inductor's errors (no C++ compiler, ...): listed as not run
            raise CompileFailed(f"torch.compile failed: {error_line(exc, with_type=True)}") from exc
        self.compile_s = time.perf_counter() - start

    def _warm_up(self) -> None:
        torch = self.torch
        start = [p.detach().clone() for p in self.net.parameters()]
        for size in sorted({s.stop - s.start for s in batch_slices(len(self.data.x), self.batch)}, reverse=True):
            for _ in range(3 if size == self.batch else 2):
                self.train_step(self.x[:size], self.y[:size])
        with torch.no_grad():
            for p, p0 in zip(self.net.parameters(), start):
                p.copy_(p0)
            restart_torch_optimizer(self.optimizer)
        if self.device == "cuda":
            torch.cuda.synchronize()

    def train_step(self, xb: Any, yb: Any) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss, logits = self._forward(xb, yb)
        loss.backward()
        self._update()
        self.loss_sum.add_(loss.detach() * xb.shape[0])
        self.n_correct.add_((logits.detach().argmax(dim=1) == yb).sum())
