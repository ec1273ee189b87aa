"""The contestants of ``backprop-xp bench``: one class per engine, run inside that engine's worker.

Every engine trains the same network on the same data: 784-H-10, ReLU,
softmax cross-entropy, float32, with the same optimizer at a constant
learning rate (``OPTIMIZERS``: SGD with momentum 0.9, or Adam with PyTorch's
conventions, ``bench --optimizer``). Where the engine allows it, the initial parameters are ours (He
normal, zero biases, seed 0) and the sample order of epoch ``e`` is ours,
``data.epoch_permutation(0, e, n)``. scikit-learn allows neither an initial
state through its public API nor our shuffle inside ``partial_fit``: it gets
our order by being handed the epoch's rows already shuffled (the same one
gather per epoch that every engine pays), and its own initialisation.

A contestant is built for one shape (hidden units, batch size) and has:

* ``epoch(e) -> seconds``: one training epoch (shuffle included), timed on the
  engine's own clock: ``time.perf_counter`` on the CPU, CUDA events on a GPU;
* ``bound(workload) -> seconds``: the step's five matrix products alone
  (``x W1ᵀ``, ``a1 W2ᵀ``, ``δ2ᵀ a1``, ``δ2 W2``, ``δ1ᵀ x``), on the engine's
  own BLAS, for as many steps as the workload has: no implementation that
  calls that BLAS for them can be faster;
* ``test_accuracy() -> float``: on the test set, after whatever it has trained.

The CPU engines also time ``step`` (training steps on batches already in
memory) and ``infer`` (predicted labels, forward only): ``bench/compare.py``
reports those beside the epoch.

Nothing here is imported by ``import backprop_xp``; PyTorch, CuPy and
scikit-learn are imported inside the engine that needs them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import error_line

N_INPUTS, N_OUTPUTS = 784, 10
LR, MOMENTUM = 0.05, 0.9
SEED = 0
# The optimizers every engine can train with (``bench --optimizer``): name -> its settings, under the names
# ``optimizers.py``'s classes take them. Each engine builds its own library's form of the same rule.
OPTIMIZERS: dict[str, dict[str, float]] = {
    "sgd": {"lr": LR, "momentum": MOMENTUM},
    "adam": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8},
}
DEFAULT_OPTIMIZER = "sgd"
BOUND_SAMPLES = 8192  # the bound is timed over this many samples' steps, then scaled (it is linear in steps)

# name: (device, one line on what it is); the order is the table's order.
ENGINES: dict[str, tuple[str, str]] = {
    "numpy": ("cpu", "backprop-xp on NumPy: train's own step and epoch loop"),
    "cupy": ("cuda", "backprop-xp on CuPy: train's step with CUDA graphs"),
    "cupy-eager": ("cuda", "backprop-xp on CuPy: train's step, kernels launched one by one"),
    "jax": ("cpu", "JAX on the CPU: the whole epoch in one jitted lax.scan"),
    "jax-step": ("cpu", "JAX on the CPU: the step jitted, called once per batch"),
    "jax-cuda": ("cuda", "JAX on the GPU: the whole epoch in one jitted lax.scan"),
    "jax-step-cuda": ("cuda", "JAX on the GPU: the step jitted, called once per batch"),
    "torch-cpu": ("cpu", "PyTorch eager on the CPU"),
    "torch-compile": ("cpu", "PyTorch on the CPU, forward, loss and optimizer step under torch.compile"),
    "torch-cuda": ("cuda", "PyTorch eager on the GPU"),
    "torch-cuda-graph": ("cuda", "PyTorch with the whole step captured as one CUDA graph"),
    "torch-compile-cuda": ("cuda", "PyTorch on the GPU under torch.compile(mode='reduce-overhead'): CUDA graphs"),
    "sklearn": ("cpu", "scikit-learn MLPClassifier (solver sgd, partial_fit)"),
}
# The "vs fastest PyTorch" column's references: eager, and the whole step as one CUDA graph.
TORCH_ENGINES = ("torch-cpu", "torch-cuda", "torch-cuda-graph")
JAX_ENGINES = ("jax", "jax-step", "jax-cuda", "jax-step-cuda")
TORCH_COMPILE_ENGINES = ("torch-compile", "torch-compile-cuda")
# What bench runs without --engines: all but torch.compile, whose compiling takes about a minute per shape on 2 cores.
DEFAULT_ENGINES = [name for name in ENGINES if name not in TORCH_COMPILE_ENGINES]


def device_of(engine: str) -> str:
    """``"cpu"`` or ``"cuda"``.

    >>> device_of("torch-cuda-graph"), device_of("sklearn")
    ('cuda', 'cpu')
    """
    return ENGINES[engine][0]


def describe_optimizer(name: str) -> str:
    """The optimizer's rule and settings in words, for the table and ``bench.md``.

    >>> describe_optimizer("sgd"), describe_optimizer("adam")
    ('SGD lr 0.05 momentum 0.9', 'Adam lr 0.001 betas 0.9/0.999 eps 1e-08')
    """
    s = OPTIMIZERS[name]
    if name == "sgd":
        return f"SGD lr {s['lr']:g} momentum {s['momentum']:g}"
    return f"Adam lr {s['lr']:g} betas {s['beta1']:g}/{s['beta2']:g} eps {s['eps']:g}"


def our_optimizer(name: str, model: Any) -> Any:
    """Ours: ``optimizers.SGD`` or ``optimizers.Adam`` for ``model``, with ``OPTIMIZERS[name]``'s settings."""
    from ..optimizers import OPTIMIZERS as RULES

    return RULES[name](model, **OPTIMIZERS[name])


def torch_optimizer(torch: Any, params: Any, name: str, *, capturable: bool = False) -> Any:
    """PyTorch's own form of the same rule: ``torch.optim.SGD`` or ``torch.optim.Adam``.

    ``capturable`` (Adam only): the step count lives on the GPU, so that a CUDA
    graph can hold the whole step (PyTorch's own requirement for capturing Adam).
    """
    s = OPTIMIZERS[name]
    if name == "sgd":
        return torch.optim.SGD(params, lr=s["lr"], momentum=s["momentum"])
    extra = {"capturable": True} if capturable else {}
    return torch.optim.Adam(params, lr=s["lr"], betas=(s["beta1"], s["beta2"]), eps=s["eps"], **extra)


def restart_torch_optimizer(optimizer: Any) -> None:
    """Every state tensor of ``optimizer`` zeroed in place: as if it had never stepped.

    For engines that warm up (captures, compiles) and must then start from
    step 0: SGD's momentum buffers (a zero buffer gives the first step's
    ``v = g`` exactly) and Adam's moments and step count (``t = 0``, so the
    next step's bias correction is the first one's). In place, because a
    captured graph or compiled code holds these very tensors.
    """
    for state in optimizer.state.values():
        for value in state.values():
            if hasattr(value, "zero_"):
                value.zero_()


# --------------------------------------------------------------------------- discovery


# --------------------------------------------------------------------------- data


@dataclass
class Data:
    """Training and test arrays (NumPy, float32 in [0, 1], int64 labels) and where they came from."""

    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    source: str


def mnist_shaped(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random images in [0, 1) (float32, C-contiguous ``(n, 784)``) and int64 labels.

    Speed does not depend on the pixel values (dense BLAS, no data-dependent
    branches), so random data stands in for MNIST where only time matters.
    """
    rng = np.random.default_rng(seed)
    x = rng.random((n, N_INPUTS), dtype=np.float32)
    y = rng.integers(0, N_OUTPUTS, size=n, dtype=np.int64)
    return x, y


def load_data(data_dir: str | None, train_size: int = 0, random_samples: int = 0) -> Data:
    """MNIST (the first ``train_size`` training images if > 0), or ``random_samples`` random stand-ins."""
    if random_samples:
        x, y = mnist_shaped(random_samples)
        return Data(x, y, None, None, f"{random_samples:,} random MNIST-shaped examples (no test accuracy)")
    from ..data import load_mnist

    x, y, x_test, y_test = load_mnist(data_dir)
    if train_size:
        if train_size > len(x):
            raise ValueError(f"train-size {train_size} is more than the {len(x)} training images")
        x, y = x[:train_size], y[:train_size]
    where = data_dir or "$BACKPROP_XP_DATA or the cache"
    return Data(
        np.ascontiguousarray(x),
        y,
        x_test,
        y_test,
        f"MNIST from {where}: {len(x):,} training, {len(x_test):,} test images",
    )


def initial_params(hidden: int, seed: int = SEED) -> dict[str, np.ndarray]:
    """Our initial parameters (He normal, zero biases), as NumPy float32 arrays."""
    from ..model import MLP

    model = MLP(N_INPUTS, hidden, N_OUTPUTS, activation="relu", backend="numpy", dtype="float32", seed=seed)
    return {name: value.copy() for name, value in model.params.items()}


def batch_slices(n: int, batch: int) -> list[slice]:
    """The slices of one epoch's batches, the last one possibly shorter.

    >>> batch_slices(5, 2)
    [slice(0, 2, None), slice(2, 4, None), slice(4, 5, None)]
    """
    return [slice(start, min(start + batch, n)) for start in range(0, n, batch)]


def fixed_batch_count(n: int, batch: int) -> int:
    """How many in-memory batches ``step`` and ``infer`` go over (about 4096 samples and 8 batches more)."""
    return max(1, min(n // batch, 4096 // batch + 8))


def seconds_per_call(
    fn: Callable[[], Any],
    *,
    min_seconds: float = 0.2,
    min_calls: int = 3,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Time of one call of ``fn``: the median over as many calls as fit in ``min_seconds``."""
    fn()  # warm up: buffers, caches, thread pools
    times = []
    start_all = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start_all < min_seconds:
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return float(np.median(times))


def _bound_scale(n: int, batch: int) -> tuple[list[slice], float]:
    """The batches the bound is timed over, and the factor from them to a whole epoch."""
    every = batch_slices(n, batch)
    timed = batch_slices(min(n, max(batch, BOUND_SAMPLES)), batch)
    return timed, len(every) / len(timed)


# --------------------------------------------------------------------------- the CPU bound


class GemmBound:
    """The five matrix products of a training step, alone, into preallocated NumPy buffers.

    Forward ``x W1ᵀ`` and ``a1 W2ᵀ``; backward ``δ2ᵀ a1``, ``δ2 W2`` and
    ``δ1ᵀ x``. ``forward`` keeps the first two (the bound for inference).
    ``step`` stores ``a1`` and ``δ1`` hidden-major where our step does (batches
    up to ``HIDDEN_MAJOR_MAX_BATCH``): the same products, which OpenBLAS runs
    faster that way, so the bound stays a bound for ours.
    """

    def __init__(self, hidden: int, batch: int, seed: int = 0) -> None:
        from ..cpu.fused_cpu_step import HIDDEN_MAJOR_MAX_BATCH

        rng = np.random.default_rng(seed)
        f32 = np.float32
        self.hidden_major = batch <= HIDDEN_MAJOR_MAX_BATCH
        self.a1h = np.empty((hidden, batch), f32)
        self.delta1h = np.empty((hidden, batch), f32)
        self.a1_rows = np.empty((batch, hidden), f32)  # forward's: inference keeps rows
        self.x = rng.random((batch, N_INPUTS), dtype=f32)
        self.w1 = rng.random((hidden, N_INPUTS), dtype=f32)
        self.w2 = rng.random((N_OUTPUTS, hidden), dtype=f32)
        # What step writes, (B, H) in shape: views of the (H, B) buffers where it stores them hidden-major.
        self.a1 = self.a1h.T if self.hidden_major else np.empty((batch, hidden), f32)
        self.z2 = np.empty((batch, N_OUTPUTS), f32)
        self.delta2 = rng.random((batch, N_OUTPUTS), dtype=f32)
        self.delta1 = self.delta1h.T if self.hidden_major else np.empty((batch, hidden), f32)
        self.g1 = np.empty((hidden, N_INPUTS), f32)
        self.g2 = np.empty((N_OUTPUTS, hidden), f32)

    def forward(self, x: np.ndarray | None = None) -> None:
        """The forward products on ``x`` (a batch of the run's data; default: a fixed one)."""
        x = self.x if x is None else x
        b = x.shape[0]
        np.matmul(x, self.w1.T, out=self.a1_rows[:b])
        np.matmul(self.a1_rows[:b], self.w2.T, out=self.z2[:b])

    def step(self, x: np.ndarray | None = None) -> None:
        """The five products of a training step on ``x``.

        Timed over the run's own batches, so that the bound pays the same
        cache misses on fresh input rows as the step does.
        """
        x = self.x if x is None else x
        b = x.shape[0]
        if self.hidden_major:  # as cpu/hidden_major.py computes them
            a1h, d1h, d2 = self.a1h[:, :b], self.delta1h[:, :b], self.delta2[:b]
            np.matmul(self.w1, x.T, out=a1h)  # z1ᵀ = W1 xᵀ
            np.matmul(a1h.T, self.w2.T, out=self.z2[:b])
            np.matmul(d2.T, a1h.T, out=self.g2)
            np.matmul(self.w2.T, d2.T, out=d1h)  # δ1ᵀ = W2ᵀ δ2ᵀ
            np.matmul(d1h, x, out=self.g1)
            return
        a1, d2, d1 = self.a1[:b], self.delta2[:b], self.delta1[:b]
        np.matmul(x, self.w1.T, out=a1)
        np.matmul(a1, self.w2.T, out=self.z2[:b])
        np.matmul(d2.T, a1, out=self.g2)
        np.matmul(d2, self.w2, out=d1)
        np.matmul(d1.T, x, out=self.g1)


class _CpuEngine:
    """What the CPU engines share: the data, the clock, the NumPy GEMM bound, fixed batches."""

    def __init__(self, hidden: int, batch: int, data: Data, clock: Callable[[], float]) -> None:
        self.hidden, self.batch, self.data, self.clock = hidden, batch, data, clock
        self.fixed = batch_slices(fixed_batch_count(len(data.x), batch) * batch, batch)

    def _timed(self, fn: Callable[[], Any]) -> float:
        t0 = self.clock()
        fn()
        return self.clock() - t0

    def bound(self, workload: str) -> float:
        """The five products (two for ``infer``) over the workload's batches, on NumPy's BLAS."""
        gemm = GemmBound(self.hidden, self.batch)
        run = gemm.forward if workload == "infer" else gemm.step
        if workload == "epoch":
            slices, scale = _bound_scale(len(self.data.x), self.batch)
        else:
            slices, scale = self.fixed, 1.0
        x = self.data.x

        def go() -> None:
            for s in slices:
                run(x[s])

        return seconds_per_call(go, min_seconds=0.1, clock=self.clock) * scale


# --------------------------------------------------------------------------- numpy (ours)


class NumpyEngine(_CpuEngine):
    """Ours on NumPy: ``train.make_step`` over ``data.Minibatches`` with ``train.run_epoch``, as ``train`` does."""

    def __init__(
        self, hidden: int, batch: int, data: Data, clock: Callable[[], float] = time.perf_counter,
        optimizer: str = DEFAULT_OPTIMIZER,
    ) -> None:  # fmt: skip
        from ..data import Minibatches
        from ..model import MLP
        from ..training import make_step

        super().__init__(hidden, batch, data, clock)
        self.model = MLP(N_INPUTS, hidden, N_OUTPUTS, activation="relu", backend="numpy", dtype="float32", seed=SEED)
        self.rule = our_optimizer(optimizer, self.model)
        self.train_step = make_step(self.model, self.rule, checked=False)
        self.batches = Minibatches(data.x, data.y, batch, xp=np, seed=SEED)

    def epoch(self, epoch: int) -> float:
        from ..training import run_epoch

        def go() -> None:
            sums = run_epoch(self.train_step, self.batches, epoch)
            self.last_loss, self.last_correct = sums.loss_sum / sums.n_samples, sums.n_correct

        return self._timed(go)

    def params(self) -> dict[str, np.ndarray]:
        """The parameters now, as NumPy arrays (``tests/test_bench_compiled.py`` compares every engine's)."""
        return {name: value.copy() for name, value in self.model.params.items()}

    def step(self) -> float:
        x, y = self.data.x, self.data.y

        def go() -> None:
            for s in self.fixed:
                self.train_step(x[s], y[s])

        return seconds_per_call(go, min_seconds=0.3, clock=self.clock)

    def infer(self) -> float:
        x = self.data.x
        return seconds_per_call(
            lambda: [self.model.predict(x[s]) for s in self.fixed], min_seconds=0.3, clock=self.clock
        )

    def test_accuracy(self) -> float | None:
        if self.data.x_test is None:
            return None
        return float(np.mean(self.model.predict(self.data.x_test) == self.data.y_test))


# --------------------------------------------------------------------------- scikit-learn


def _shared(shared: dict[str, Any], key: str, make: Callable[[], Any]) -> Any:
    """``shared[key]``, made on first use: the big arrays one worker's shapes share instead of each copying."""
    if key not in shared:
        shared[key] = make()
    return shared[key]


class SklearnEngine(_CpuEngine):
    """scikit-learn's ``MLPClassifier``: solver sgd, momentum 0.9 (not Nesterov), no L2, constant rate; or solver adam.

    Its Adam has the same betas, ε and rate; it adds ε to ``√v`` before the
    bias correction rather than after (``η √(1−β₂ᵗ)/(1−β₁ᵗ) · m / (√v + ε)``),
    a difference in the ε term alone.

    Each epoch is one ``partial_fit`` over the epoch's rows, gathered in our
    order into one preallocated buffer (``shuffle=False``: sklearn then keeps
    that order and cuts the same batches, the last one shorter).
    """

    def __init__(
        self,
        hidden: int,
        batch: int,
        data: Data,
        shared: dict[str, Any],
        clock: Callable[[], float] = time.perf_counter,
        optimizer: str = DEFAULT_OPTIMIZER,
    ) -> None:
        from sklearn.neural_network import MLPClassifier

        super().__init__(hidden, batch, data, clock)
        s = OPTIMIZERS[optimizer]
        if optimizer == "sgd":
            rule = {"solver": "sgd", "momentum": s["momentum"], "nesterovs_momentum": False}
        else:
            rule = {"solver": "adam", "beta_1": s["beta1"], "beta_2": s["beta2"], "epsilon": s["eps"]}
        self.clf = MLPClassifier(
            hidden_layer_sizes=(hidden,), activation="relu", alpha=0.0, batch_size=batch,
            learning_rate="constant", learning_rate_init=s["lr"], shuffle=False, random_state=SEED, **rule,
        )  # fmt: skip
        # One gather buffer per worker, shared by every shape (each epoch rewrites it whole): float32 in, float32 math.
        self.xs, self.ys = _shared(shared, "gather", lambda: (np.empty_like(data.x), np.empty_like(data.y)))
        self.classes = np.arange(N_OUTPUTS)

    def epoch(self, epoch: int) -> float:
        from ..data import epoch_permutation

        def go() -> None:
            order = epoch_permutation(SEED, epoch, len(self.data.x))
            np.take(self.data.x, order, axis=0, out=self.xs)
            np.take(self.data.y, order, axis=0, out=self.ys)
            self.clf.partial_fit(self.xs, self.ys, classes=self.classes)

        return self._timed(go)

    def test_accuracy(self) -> float | None:
        if self.data.x_test is None:
            return None
        return float(np.mean(self.clf.predict(self.data.x_test) == self.data.y_test))


# --------------------------------------------------------------------------- PyTorch


def torch_mlp(torch: Any, hidden: int, device: str = "cpu", seed: int = SEED) -> Any:
    """``nn.Sequential(Linear, ReLU, Linear)`` holding our initial parameters, on ``device``."""
    net = torch.nn.Sequential(torch.nn.Linear(N_INPUTS, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, N_OUTPUTS))
    init = initial_params(hidden, seed)
    with torch.no_grad():  # the very same start as ours (He normal, zero biases)
        net[0].weight.copy_(torch.from_numpy(init["W1"]))
        net[0].bias.copy_(torch.from_numpy(init["b1"]))
        net[2].weight.copy_(torch.from_numpy(init["W2"]))
        net[2].bias.copy_(torch.from_numpy(init["b2"]))
    return net.to(device)


class TorchEngine:
    """PyTorch eager, on the CPU or a GPU: the loop a PyTorch user writes.

    ``zero_grad(set_to_none=True)``, forward, ``cross_entropy``, backward,
    ``SGD(momentum=0.9).step()`` or ``Adam.step()`` (their default foreach
    implementations). Each
    epoch gathers the shuffled rows once (``index_select`` into a
    preallocated buffer; a DataLoader would only be slower), then takes
    contiguous slices. Loss and correct count are summed on the device and
    read once per epoch, as ours are. TF32 stays off.
    """

    def __init__(
        self,
        hidden: int,
        batch: int,
        data: Data,
        shared: dict[str, Any],
        device: str = "cpu",
        clock: Callable[[], float] = time.perf_counter,
        optimizer: str = DEFAULT_OPTIMIZER,
        capturable: bool = False,
    ) -> None:
        import torch

        self.torch, self.device, self.clock = torch, device, clock
        self.hidden, self.batch, self.data = hidden, batch, data
        if device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
        self.net = torch_mlp(torch, hidden, device)
        self.optimizer = self.rule = torch_optimizer(torch, self.net.parameters(), optimizer, capturable=capturable)
        # The data on the device once, like our Minibatches, and one gather buffer: shared by every shape.
        self.x, self.y = _shared(
            shared, "data", lambda: (torch.from_numpy(data.x).to(device), torch.from_numpy(data.y).to(device))
        )
        self.xs, self.ys = _shared(shared, "gather", lambda: (torch.empty_like(self.x), torch.empty_like(self.y)))
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.n_correct = torch.zeros((), dtype=torch.int64, device=device)
        self.fixed = batch_slices(fixed_batch_count(len(data.x), batch) * batch, batch)

    def train_step(self, xb: Any, yb: Any) -> None:
        torch = self.torch
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.net(xb)
        loss = torch.nn.functional.cross_entropy(logits, yb)
        loss.backward()
        self.optimizer.step()
        self.loss_sum.add_(loss.detach() * xb.shape[0])
        self.n_correct.add_((logits.detach().argmax(dim=1) == yb).sum())

    def _order(self, epoch: int) -> Any:
        from ..data import epoch_permutation

        return self.torch.from_numpy(epoch_permutation(SEED, epoch, len(self.data.x))).to(self.device)

    def _run_epoch(self, epoch: int) -> None:
        torch = self.torch
        self.loss_sum.zero_()
        self.n_correct.zero_()
        order = self._order(epoch)
        torch.index_select(self.x, 0, order, out=self.xs)
        torch.index_select(self.y, 0, order, out=self.ys)
        for s in batch_slices(len(self.data.x), self.batch):
            self.train_step(self.xs[s], self.ys[s])
        self._read_sums()

    def _read_sums(self) -> None:
        """The epoch's one read from the device: its mean loss and correct count."""
        self.last_loss = self.loss_sum.item() / len(self.data.x)
        self.last_correct = self.n_correct.item()

    def params(self) -> dict[str, np.ndarray]:
        """The parameters now, as NumPy arrays, under our names."""
        net = self.net
        layers = {"W1": net[0].weight, "b1": net[0].bias, "W2": net[2].weight, "b2": net[2].bias}
        return {name: value.detach().cpu().numpy().copy() for name, value in layers.items()}

    def epoch(self, epoch: int) -> float:
        return self._time(lambda: self._run_epoch(epoch))

    def _time(self, fn: Callable[[], Any]) -> float:
        """Seconds of ``fn``: CUDA events around it on a GPU, the clock on the CPU."""
        if self.device != "cuda":
            t0 = self.clock()
            fn()
            return self.clock() - t0
        torch = self.torch
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / 1000.0

    def step(self) -> float:
        def go() -> None:
            for s in self.fixed:
                self.train_step(self.x[s], self.y[s])

        return seconds_per_call(go, min_seconds=0.3, clock=self.clock)

    def infer(self) -> float:
        torch = self.torch

        def go() -> None:
            with torch.inference_mode():
                for s in self.fixed:
                    self.net(self.x[s]).argmax(dim=1)

        return seconds_per_call(go, min_seconds=0.3, clock=self.clock)

    def bound(self, workload: str) -> float:
        """The step's five products (two for ``infer``) with ``torch.matmul(..., out=)``; a CUDA graph on a GPU."""
        torch, h, b = self.torch, self.hidden, self.batch
        if workload == "epoch":
            slices, scale = _bound_scale(len(self.data.x), b)
        else:
            slices, scale = self.fixed, 1.0
        forward_only = workload == "infer"
        rand = lambda *shape: torch.rand(*shape, device=self.device)  # noqa: E731 - values do not matter
        w1, w2, d2 = rand(h, N_INPUTS), rand(N_OUTPUTS, h), rand(b, N_OUTPUTS)
        a1, z2, d1 = rand(b, h), rand(b, N_OUTPUTS), rand(b, h)
        g1, g2 = torch.empty_like(w1), torch.empty_like(w2)

        def five(x: Any) -> None:
            n = x.shape[0]
            torch.matmul(x, w1.T, out=a1[:n])
            torch.matmul(a1[:n], w2.T, out=z2[:n])
            if not forward_only:
                torch.matmul(d2[:n].T, a1[:n], out=g2)
                torch.matmul(d2[:n], w2, out=d1[:n])
                torch.matmul(d1[:n].T, x, out=g1)

        if self.device != "cuda":
            x = self.x

            def go() -> None:
                for s in slices:
                    five(x[s])

            return seconds_per_call(go, min_seconds=0.1, clock=self.clock) * scale
        return _torch_graph_bound(torch, five, self.x, slices) * scale

    def test_accuracy(self) -> float | None:
        if self.data.x_test is None:
            return None
        torch = self.torch
        with torch.no_grad():
            x = torch.from_numpy(self.data.x_test).to(self.device)
            y = torch.from_numpy(self.data.y_test).to(self.device)
            return int((self.net(x).argmax(dim=1) == y).sum().item()) / len(y)


def _torch_graph_bound(torch: Any, five: Callable[[Any], None], x: Any, slices: list[slice]) -> float:
    """Seconds for ``five`` over every slice: one CUDA graph per batch size, replayed, timed with events."""
    graphs = {}
    sizes = sorted({s.stop - s.start for s in slices})
    for size in sizes:
        static_x = x[:size]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside capture: cuBLAS picks and allocates its workspace
            five(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            five(static_x)
        graphs[size] = graph
    for graph in graphs.values():
        graph.replay()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for s in slices:
        graphs[s.stop - s.start].replay()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) / 1000.0


class TorchGraphEngine(TorchEngine):
    """PyTorch with forward, backward and ``optimizer.step()`` captured once as a CUDA graph.

    The strongest thing a PyTorch user would write, as PyTorch's CUDA-graphs
    documentation does it ("whole network capture"): static input buffers;
    a few warm-up steps on a side stream (lazy state such as the momentum
    buffers and cuBLAS workspaces is created there, outside capture); grads
    set to None before capture so that backward allocates them from the
    graph's private pool; then one capture of the whole step, including the
    loss and correct-count sums. Every batch is gathered into the static
    buffers (``index_select(..., out=)``) and the graph replayed. One graph
    per batch size: the full batch and, when the epoch does not divide, the
    last one. The warm-up steps change the parameters, so the initial
    parameters are put back and the optimizer's state zeroed after capture
    (``restart_torch_optimizer``: the momentum buffers, or Adam's moments and
    step count). Adam is built ``capturable`` for this engine.
    """

    def __init__(
        self,
        hidden: int,
        batch: int,
        data: Data,
        shared: dict[str, Any],
        clock: Callable[[], float] = time.perf_counter,
        optimizer: str = DEFAULT_OPTIMIZER,
    ) -> None:
        # Adam's step count on the GPU (capturable): the graph then holds the bias correction too.
        super().__init__(hidden, batch, data, shared, "cuda", clock, optimizer, capturable=True)
        torch = self.torch
        start = [p.detach().clone() for p in self.net.parameters()]
        sizes = sorted({s.stop - s.start for s in batch_slices(len(data.x), batch)})
        self.graphs = {size: self._capture(size) for size in sizes}
        with torch.no_grad():
            for p, p0 in zip(self.net.parameters(), start):
                p.copy_(p0)
            restart_torch_optimizer(self.optimizer)
        torch.cuda.synchronize()

    def _capture(self, size: int) -> tuple[Any, Any, Any]:
        torch = self.torch
        static_x = self.x[:size].clone()
        static_y = self.y[:size].clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.train_step(static_x, static_y)  # zero_grad(set_to_none=True) inside
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            logits = self.net(static_x)
            loss = torch.nn.functional.cross_entropy(logits, static_y)
            loss.backward()
            self.optimizer.step()
            self.loss_sum.add_(loss.detach() * size)
            self.n_correct.add_((logits.detach().argmax(dim=1) == static_y).sum())
        return graph, static_x, static_y

    def _run_epoch(self, epoch: int) -> None:
        torch = self.torch
        self.loss_sum.zero_()
        self.n_correct.zero_()
        order = self._order(epoch)
        for s in batch_slices(len(self.data.x), self.batch):
            graph, static_x, static_y = self.graphs[s.stop - s.start]
            rows = order[s]
            torch.index_select(self.x, 0, rows, out=static_x)  # the batch into the graph's input buffers
            torch.index_select(self.y, 0, rows, out=static_y)
            graph.replay()
        self._read_sums()


# --------------------------------------------------------------------------- CuPy (ours)


class CupyEngine:
    """Ours on CuPy: ``train.make_step(model, optimizer, graphs=...)`` over device-resident ``Minibatches``.

    The epoch is ``train.run_epoch``, exactly as ``train --backend cupy`` runs
    it (its one read of the loss and accuracy at the end synchronises),
    timed with CUDA events.
    """

    def __init__(
        self, hidden: int, batch: int, data: Data, shared: dict[str, Any], graphs: bool,
        optimizer: str = DEFAULT_OPTIMIZER,
    ) -> None:  # fmt: skip
        import cupy as cp

        from ..data import Minibatches
        from ..model import MLP
        from ..training import make_step

        self.cp, self.hidden, self.batch, self.data = cp, hidden, batch, data
        self.model = MLP(N_INPUTS, hidden, N_OUTPUTS, activation="relu", backend="cupy", dtype="float32", seed=SEED)
        self.rule = our_optimizer(optimizer, self.model)
        self.train_step = make_step(self.model, self.rule, graphs=graphs)
        # One device copy shared by every shape (Minibatches does not copy a contiguous device array again).
        self.x, self.y = _shared(shared, "data", lambda: (cp.asarray(data.x), cp.asarray(data.y)))
        self.batches = Minibatches(self.x, self.y, batch, xp=cp, seed=SEED)

    def epoch(self, epoch: int) -> float:
        from ..training import run_epoch

        cp = self.cp
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        run_epoch(self.train_step, self.batches, epoch)
        stop.record()
        stop.synchronize()
        return cp.cuda.get_elapsed_time(start, stop) / 1000.0

    def bound(self, workload: str) -> float:
        """The five products through our cuBLAS handle, captured as CUDA graphs (``cupy_gemm_bound``)."""
        slices, scale = _bound_scale(len(self.data.x), self.batch)
        seconds, self.bound_note = cupy_gemm_bound(self.cp, self.x, self.hidden, self.batch, slices)
        return seconds * scale

    def test_accuracy(self) -> float | None:
        if self.data.x_test is None:
            return None
        from ..training import evaluate

        return float(evaluate(self.model, self.data.x_test, self.data.y_test)[1])


def cupy_gemm_bound(
    cp: Any, x: Any, hidden: int, batch: int, slices: list[slice], make_blas: Callable[[], Any] | None = None
) -> tuple[float, str]:
    """Seconds of the step's five products over ``slices`` of ``x``, and how they were timed.

    The products go through ``cuda.cublas.Blas`` with the GPU step's own
    calls (same operands, same transpose flags), captured as one CUDA graph
    per batch size and replayed, timed with CUDA events: the same GEMMs, the
    same launch path as the step's graphs, so ``fraction_of_bound`` compares
    like with like (and with PyTorch's graph-replayed bound). ``cupy.matmul``
    cannot be used here: CuPy refuses cuBLAS calls during stream capture.
    Without nvmath-python (``make_blas`` fails) or where capture fails, the
    products run eagerly and the note says why: that bound includes launch
    overhead and is not comparable.
    """
    from ..cuda.cublas import Blas

    f = cp.float32
    rand = lambda *shape: cp.random.random_sample(shape, dtype=f)  # noqa: E731 - values do not matter
    w1, w2, d2 = rand(hidden, N_INPUTS), rand(N_OUTPUTS, hidden), rand(batch, N_OUTPUTS)
    a1, z2, d1 = cp.empty((batch, hidden), f), cp.empty((batch, N_OUTPUTS), f), cp.empty((batch, hidden), f)
    g1, g2 = cp.empty_like(w1), cp.empty_like(w2)
    stream = cp.cuda.Stream(non_blocking=True)  # capture needs a stream other than the default one
    try:
        blas = (make_blas or (lambda: Blas(cp)))()
    except ImportError as exc:
        blas, note = None, f"eager cupy.matmul launches ({error_line(exc, with_type=True)})"

    def five(x: Any) -> None:  # as cuda/fused_gpu_step.py calls them: z1, z2, ∂L/∂W2, δ1, ∂L/∂W1
        n = x.shape[0]
        blas.matmul(x, w1, a1[:n], transpose_b=True)
        blas.matmul(a1[:n], w2, z2[:n], transpose_b=True)
        blas.matmul(d2[:n], a1[:n], g2, transpose_a=True)
        blas.matmul(d2[:n], w2, d1[:n])
        blas.matmul(d1[:n], x, g1, transpose_a=True)

    def five_cupy(x: Any) -> None:  # the fallback: CuPy's own GEMM, eagerly
        n = x.shape[0]
        cp.matmul(x, w1.T, out=a1[:n])
        cp.matmul(a1[:n], w2.T, out=z2[:n])
        cp.matmul(d2[:n].T, a1[:n], out=g2)
        cp.matmul(d2[:n], w2, out=d1[:n])
        cp.matmul(d1[:n].T, x, out=g1)

    launch: dict[int, Callable[[], None]] = {}
    if blas is not None:
        note = "CUDA graph of the five cuBLAS products (the step's own calls), replayed"
        blas.use_stream(stream.ptr)  # before any capture begins: cuBLAS may not be reconfigured inside one
    with stream:
        for size in sorted({s.stop - s.start for s in slices}):
            xs = x[:size]
            if blas is None:
                launch[size] = lambda xs=xs: five_cupy(xs)
                continue
            five(xs)  # warm-up outside capture
            try:
                stream.begin_capture()
                try:
                    five(xs)
                finally:
                    graph = stream.end_capture()
                launch[size] = graph.launch
            except Exception as exc:  # noqa: BLE001 - fall back to eager launches, and say so
                note = f"eager cuBLAS launches (graph capture failed: {error_line(exc, with_type=True)})"
                launch[size] = lambda xs=xs: five(xs)
        for go in launch.values():
            go()
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        for s in slices:
            launch[s.stop - s.start]()
        stop.record()
        stop.synchronize()
    return cp.cuda.get_elapsed_time(start, stop) / 1000.0, note
