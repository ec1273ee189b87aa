"""GPU benchmark: backprop-xp on CuPy (generic, fused eager, fused + CUDA graphs) against PyTorch CUDA eager.

Same run, same GPU, same work: one epoch of MNIST (60 000 images, 784-H-10,
ReLU, cross-entropy, SGD with momentum 0.9) with the data already on the
device, shuffled on the device at the start of every epoch (one gather into a
preallocated buffer, counted in the epoch), then every minibatch in order,
the last one partial. Each contestant also counts its loss and correct
predictions on the device (backprop-xp's step does that anyway; for PyTorch it
is ``loss_sum += loss.detach() * B`` and ``correct += (argmax == y).sum()``),
and nothing is read back until the epoch ends. Timing: CUDA events around
whole epochs, after one warm-up epoch; the best of ``--epochs`` timed epochs
(``ms``, shuffle included, what samples/s and the PyTorch ratio use), and of
the steps alone after the shuffle (``step_ms``, what the ratio to the matrix
products, ``over_gemm``, uses).

Contestants (columns):

* ``xp_generic``: ``model.backprop`` + ``optimizer.step()`` run on CuPy
  unchanged (the reference code, ~25 launches a step);
* ``xp_eager``: the fused step of ``gpu_step.py``, kernels launched one by one;
* ``xp_graphs``: the same captured as a CUDA graph per batch size and replayed;
* ``torch``: ``nn.Sequential(Linear, ReLU, Linear)``, ``F.cross_entropy``,
  ``torch.optim.SGD(momentum=0.9)`` (default foreach implementation),
  ``zero_grad(set_to_none=True)``, TF32 off;
* ``gemm``: the five matrix products of a step alone (cuBLAS via
  ``cupy.matmul`` into preallocated buffers, replayed as a CUDA graph so
  launch overhead does not count), times the number of steps: a lower bound
  for any implementation that uses cuBLAS for them.

Run from the repository root (no install needed)::

    CUPY_EXPERIMENTAL_CUDA_LIB_GRAPH_CAPTURE=1 PYTHONPATH=. python bench/bench_gpu.py --data data/mnist --out results.json

Without a CUDA device it says so and exits with status 2. Without MNIST it
uses random data of the same shape (speed does not depend on the values) and
records that in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("CUPY_EXPERIMENTAL_CUDA_LIB_GRAPH_CAPTURE", "1")  # before cupy is imported
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source tree, nothing installed

import numpy as np  # noqa: E402

N_INPUTS, N_OUTPUTS = 784, 10
LR, MOMENTUM = 0.05, 0.9


def no_device_reason() -> str | None:
    """None when CuPy sees a usable CUDA device, else why not (one line)."""
    try:
        from backprop_xp.backend import BackendError, get_backend

        get_backend("cupy")
    except BackendError as exc:
        return str(exc)
    return None


def load_data(data_dir: str | None) -> tuple[np.ndarray, np.ndarray, str]:
    """MNIST training images (float32 in [0, 1]) and labels, or random stand-ins; and which it is."""
    if data_dir and Path(data_dir).is_dir():
        from backprop_xp import load_mnist

        x, y, _, _ = load_mnist(data_dir, download=False)
        return np.ascontiguousarray(x, np.float32), y.astype(np.int64), f"MNIST from {data_dir}"
    rng = np.random.default_rng(0)
    x = rng.random((60_000, N_INPUTS), dtype=np.float32)
    y = rng.integers(0, N_OUTPUTS, 60_000)
    return x, y, "random MNIST-shaped data (no MNIST folder given)"


# --------------------------------------------------------------------------- contestants
# Each is built once per (hidden, batch) and returns run_epoch(), which
# enqueues one whole epoch on the current stream and returns device sums.


def ours(cp: Any, x: Any, y: Any, hidden: int, batch: int, mode: str, tf32: bool = False) -> Callable[[int], Any]:
    import backprop_xp as bx
    from backprop_xp.cuda.step import make_gpu_step, set_tf32

    set_tf32(tf32)
    model = bx.MLP(N_INPUTS, hidden, N_OUTPUTS, backend="cupy", seed=0)
    opt = bx.SGD(model, lr=LR, momentum=MOMENTUM)
    n = x.shape[0]
    xs, ys = cp.empty_like(x), cp.empty_like(y)
    if mode == "generic":
        loss_sum, correct_sum = cp.zeros((), cp.float64), cp.zeros((), cp.int64)

        def run_epoch(epoch: int, mark: Callable[[], None]) -> Any:
            loss_sum.fill(0)
            correct_sum.fill(0)
            perm = cp.random.permutation(n)
            cp.take(x, perm, axis=0, out=xs)
            cp.take(y, perm, axis=0, out=ys)
            mark()
            for start in range(0, n, batch):
                xb, yb = xs[start : start + batch], ys[start : start + batch]
                loss, n_correct = model.backprop(xb, yb)
                opt.step()
                cp.add(loss_sum, loss * xb.shape[0], out=loss_sum)
                cp.add(correct_sum, n_correct, out=correct_sum)
            return loss_sum, correct_sum

        return run_epoch

    step = make_gpu_step(model, opt, graphs=(mode == "graphs"))

    def run_epoch(epoch: int, mark: Callable[[], None]) -> Any:
        step.reset_sums()
        perm = cp.random.permutation(n)
        cp.take(x, perm, axis=0, out=xs)
        cp.take(y, perm, axis=0, out=ys)
        mark()
        for start in range(0, n, batch):
            step(xs[start : start + batch], ys[start : start + batch])
        loss_sum, correct_sum, _ = step.sums()
        return loss_sum, correct_sum

    run_epoch.step = step  # type: ignore[attr-defined]
    return run_epoch


def pytorch(torch: Any, x: Any, y: Any, hidden: int, batch: int) -> Callable[[int], Any]:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    net = torch.nn.Sequential(
        torch.nn.Linear(N_INPUTS, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, N_OUTPUTS)
    ).cuda()
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    n = x.shape[0]
    xs, ys = torch.empty_like(x), torch.empty_like(y)
    loss_sum = torch.zeros((), dtype=torch.float64, device="cuda")
    correct = torch.zeros((), dtype=torch.int64, device="cuda")

    def run_epoch(epoch: int, mark: Callable[[], None]) -> Any:
        loss_sum.zero_()
        correct.zero_()
        perm = torch.randperm(n, device="cuda")
        torch.index_select(x, 0, perm, out=xs)
        torch.index_select(y, 0, perm, out=ys)
        mark()
        for start in range(0, n, batch):
            xb, yb = xs[start : start + batch], ys[start : start + batch]
            logits = net(xb)
            loss = torch.nn.functional.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum.add_(loss.detach() * xb.shape[0])
            correct.add_((logits.detach().argmax(1) == yb).sum())
        return loss_sum, correct

    return run_epoch


def time_epochs(run_epoch: Callable[..., Any], epochs: int, events: tuple[Callable[[], Any], Callable[[Any, Any], float]]) -> dict[str, Any]:
    """Warm-up epoch, then ``epochs`` timed ones: the best epoch time in ms (``ms``, shuffle included),
    the best time of its steps alone (``step_ms``, after the shuffle), all times, and the last sums."""
    record, elapsed_ms = events
    sums = run_epoch(0, lambda: None)
    read = lambda s: (float(s[0]), int(s[1]))  # noqa: E731 - the one device read per epoch
    read(sums)
    times, step_times = [], []
    for epoch in range(1, epochs + 1):
        marks = [record()]
        sums = run_epoch(epoch, lambda: marks.append(record()))
        marks.append(record())
        loss_sum, n_correct = read(sums)  # waits for the epoch
        times.append(elapsed_ms(marks[0], marks[-1]))
        step_times.append(elapsed_ms(marks[1], marks[-1]))
    return {
        "ms": min(times),
        "step_ms": min(step_times),
        "ms_all": times,
        "train_loss": loss_sum / 60_000,
        "train_accuracy": n_correct / 60_000,
    }


def cupy_events(cp: Any) -> tuple[Callable[[], Any], Callable[[Any, Any], float]]:
    def record() -> Any:
        event = cp.cuda.Event()
        event.record()
        return event

    def elapsed(start: Any, stop: Any) -> float:
        stop.synchronize()
        return cp.cuda.get_elapsed_time(start, stop)

    return record, elapsed


def torch_events(torch: Any) -> tuple[Callable[[], Any], Callable[[Any, Any], float]]:
    def record() -> Any:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed(start: Any, stop: Any) -> float:
        stop.synchronize()
        return start.elapsed_time(stop)

    return record, elapsed


def gemm_bound_ms(cp: Any, hidden: int, batch: int, n: int) -> tuple[float, str]:
    """The five matrix products of every step of an epoch (full batches and the last, partial one), in ms."""
    full_ms, how = _gemm_step_ms(cp, hidden, batch)
    total = (n // batch) * full_ms
    if n % batch:
        total += _gemm_step_ms(cp, hidden, n % batch)[0]
    return total, how


def _gemm_step_ms(cp: Any, hidden: int, batch: int) -> tuple[float, str]:
    """The five matrix products of one step at these shapes (ms), and how they were timed."""
    f = cp.float32
    rand = lambda *shape: cp.random.random_sample(shape, dtype=f)  # noqa: E731 - values do not matter
    x = rand(batch, N_INPUTS)
    w1, w2 = rand(hidden, N_INPUTS), rand(N_OUTPUTS, hidden)
    a1, z2 = cp.empty((batch, hidden), f), cp.empty((batch, N_OUTPUTS), f)
    d2, d1 = rand(batch, N_OUTPUTS), cp.empty((batch, hidden), f)
    g1, g2 = cp.empty_like(w1), cp.empty_like(w2)

    def five() -> None:
        cp.matmul(x, w1.T, out=a1)  # z1 = x W1ᵀ
        cp.matmul(a1, w2.T, out=z2)  # z2 = a1 W2ᵀ
        cp.matmul(d2.T, a1, out=g2)  # ∂L/∂W2 = δ2ᵀ a1
        cp.matmul(d2, w2, out=d1)  # δ1 = δ2 W2
        cp.matmul(d1.T, x, out=g1)  # ∂L/∂W1 = δ1ᵀ x

    five()
    reps = 200
    record, elapsed = cupy_events(cp)
    how = "CUDA graph of the five products, replayed"
    try:
        stream = cp.cuda.Stream(non_blocking=True)
        with stream:
            stream.begin_capture()
            try:
                five()
            finally:
                graph = stream.end_capture()
        graph.launch()
        start = record()
        for _ in range(reps):
            graph.launch()
        ms = elapsed(start, record()) / reps
    except Exception as exc:  # noqa: BLE001 - fall back to eager launches, and say so
        how = f"eager launches (graph capture failed: {type(exc).__name__}: {exc})"
        start = record()
        for _ in range(reps):
            five()
        ms = elapsed(start, record()) / reps
    return ms, how


# --------------------------------------------------------------------------- the run


def device_info(cp: Any) -> dict[str, Any]:
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return {
        "gpu": name,
        "compute_capability": dev.compute_capability,
        "cupy": cp.__version__,
        "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
        "cuda_driver": cp.cuda.runtime.driverGetVersion(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.environ.get("BACKPROP_XP_DATA"), help="MNIST folder (default $BACKPROP_XP_DATA)")
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 800])
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 128, 512, 4096])
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per contestant, after one warm-up (default 2)")
    parser.add_argument("--contestants", nargs="+", default=["xp_generic", "xp_eager", "xp_graphs", "torch", "gemm"])
    parser.add_argument("--tf32", action="store_true", help="also time xp_graphs with TF32 matrix products (xp_graphs_tf32)")
    parser.add_argument("--budget-s", type=float, default=150.0, help="skip what is left after this many seconds (default 150)")
    parser.add_argument("--out", default=None, help="JSON file to write (default: $OUT/bench_gpu.json or bench/gpu-results/)")
    args = parser.parse_args(argv)

    reason = no_device_reason()
    if reason is not None:
        print(f"bench_gpu: no CUDA device, nothing to measure: {reason}", file=sys.stderr)
        return 2
    import cupy as cp

    try:
        import torch

        torch_reason = None if torch.cuda.is_available() else "torch.cuda.is_available() is False"
    except ImportError as exc:
        torch, torch_reason = None, f"PyTorch not installed ({exc})"

    out = Path(args.out) if args.out else Path(os.environ.get("OUT") or "bench/gpu-results") / "bench_gpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    x_host, y_host, data_note = load_data(args.data)
    x, y = cp.asarray(x_host), cp.asarray(y_host)
    x_torch = torch.from_numpy(x_host).cuda() if torch_reason is None else None
    y_torch = torch.from_numpy(y_host).cuda() if torch_reason is None else None
    contestants = list(args.contestants) + (["xp_graphs_tf32"] if args.tf32 else [])
    info = device_info(cp)
    info.update(torch=getattr(torch, "__version__", None), torch_skipped=torch_reason, data=data_note, epochs=args.epochs, lr=LR, momentum=MOMENTUM)
    print(f"bench_gpu: {info['gpu']} (cc {info['compute_capability']}), CuPy {info['cupy']}, torch {info['torch']}; {data_note}", flush=True)

    results, t0 = [], time.perf_counter()
    for hidden in args.hidden:
        for batch in args.batch:
            row: dict[str, Any] = {"hidden": hidden, "batch": batch}
            for name in contestants:
                if time.perf_counter() - t0 > args.budget_s:
                    row[name] = {"skipped": f"time budget of {args.budget_s:.0f} s used up"}
                    continue
                try:
                    if name == "gemm":
                        ms, how = gemm_bound_ms(cp, hidden, batch, x.shape[0])
                        row[name] = {"ms": ms, "how": how}
                    elif name == "torch":
                        if torch_reason:
                            row[name] = {"skipped": torch_reason}
                            continue
                        row[name] = time_epochs(pytorch(torch, x_torch, y_torch, hidden, batch), args.epochs, torch_events(torch))
                    else:
                        mode = {"xp_generic": "generic", "xp_eager": "eager", "xp_graphs": "graphs", "xp_graphs_tf32": "graphs"}[name]
                        run = ours(cp, x, y, hidden, batch, mode, tf32=name.endswith("tf32"))
                        row[name] = time_epochs(run, args.epochs, cupy_events(cp))
                        step = getattr(run, "step", None)
                        if step is not None:
                            row[name]["mode"] = step.mode
                            if step.capture_error:
                                row[name]["capture_error"] = step.capture_error
                except Exception as exc:  # noqa: BLE001 - one failing contestant must not lose the others
                    row[name] = {"error": f"{type(exc).__name__}: {exc}"}
                finally:
                    if name == "xp_graphs_tf32":
                        try:
                            from backprop_xp.cuda.step import set_tf32

                            set_tf32(False)
                        except Exception as exc:  # noqa: BLE001
                            row[name]["tf32_reset_error"] = f"{type(exc).__name__}: {exc}"
                if "ms" in row[name]:
                    row[name]["samples_per_s"] = x.shape[0] / (row[name]["ms"] / 1000)
            torch_ms = row.get("torch", {}).get("ms")
            for name in contestants:
                if torch_ms and "ms" in row[name] and name != "torch":
                    row[name]["speedup_vs_torch"] = torch_ms / row[name]["ms"]
            gemm_ms = row.get("gemm", {}).get("ms")
            for name in contestants:  # the steps alone (shuffle excluded) against the products alone
                if gemm_ms and "step_ms" in row.get(name, {}):
                    row[name]["over_gemm"] = row[name]["step_ms"] / gemm_ms
            results.append(row)
            print(_row_line(row, contestants), flush=True)

    verdicts = _targets(results)
    report = {"device": info, "results": results, "targets": verdicts, "wall_s": time.perf_counter() - t0}
    from backprop_xp.files import atomic_write

    with atomic_write(out) as f:
        json.dump(report, f, indent=2)
    print()
    print(table(report))
    print(f"\nwrote {out}")
    return 0


def _targets(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's three targets, measured (None where the numbers are missing)."""
    by = {(r["hidden"], r["batch"]): r for r in results}
    verdicts: dict[str, Any] = {}
    r = by.get((128, 128), {})
    ratio = r.get("xp_graphs", {}).get("speedup_vs_torch")
    ms = r.get("xp_graphs", {}).get("ms")
    verdicts["ratio_vs_torch_h128_b128"] = {"value": ratio, "target": ">= 3", "met": None if ratio is None else ratio >= 3}
    verdicts["epoch_ms_h128_b128"] = {"value": ms, "target": "<= 15 (H100)", "met": None if ms is None else ms <= 15}
    for hidden in (128, 800):  # the better of the two fused modes (at large batches eager may win: no input copy)
        row = by.get((hidden, 4096), {})
        modes = {name: row[name]["over_gemm"] for name in ("xp_graphs", "xp_eager") if "over_gemm" in row.get(name, {})}
        best = min(modes, key=modes.get) if modes else None
        over = modes.get(best) if best else None
        verdicts[f"step_over_gemm_h{hidden}_b4096"] = {
            "value": over, "target": "<= 1.5", "met": None if over is None else over <= 1.5, "mode": best
        }
    return verdicts


def _cell(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "-"
    if "ms" in entry:
        return f"{entry['ms']:.1f}"
    return "skip" if "skipped" in entry else "ERR"


def _row_line(row: dict[str, Any], contestants: list[str]) -> str:
    return f"  hidden {row['hidden']:4d} batch {row['batch']:5d}: " + ", ".join(f"{name} {_cell(row.get(name))} ms" for name in contestants)


def table(report: dict[str, Any]) -> str:
    """The results as a text table: ms per epoch, and graphs' speed-up over PyTorch and ratio to the GEMMs."""
    names = [n for n in ("xp_generic", "xp_eager", "xp_graphs", "xp_graphs_tf32", "torch", "gemm") if any(n in r for r in report["results"])]
    head = f"{'hidden':>6} {'batch':>5} | " + " ".join(f"{n:>14}" for n in names) + " | graphs/torch  graphs/gemm  Msamples/s"
    lines = [f"ms per epoch (60 000 images), best of {report['device'].get('epochs')}; {report['device'].get('gpu')}", head, "-" * len(head)]
    for r in report["results"]:
        g = r.get("xp_graphs", {})
        speed = g.get("speedup_vs_torch")
        over = g.get("over_gemm")
        sps = g.get("samples_per_s")
        lines.append(
            f"{r['hidden']:>6} {r['batch']:>5} | "
            + " ".join(f"{_cell(r.get(n)):>14}" for n in names)
            + f" | {_ratio(speed):>12} {_ratio(over):>12} {'-' if sps is None else f'{sps / 1e6:.2f}':>11}"
        )
    lines.append("targets: " + "; ".join(f"{k} = {_fmt(v['value'])} ({v['target']}: {'met' if v['met'] else 'not met' if v['met'] is False else 'n/a'})" for k, v in report["targets"].items()))
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    sys.exit(main())
