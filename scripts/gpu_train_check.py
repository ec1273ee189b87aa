"""A short real-MNIST training on the GPU, every way the library can run it, against NumPy.

Trains 784-128-10 (ReLU, batch 128, SGD lr 0.1 then 0.05, momentum 0.9) for
``--epochs`` epochs from the same initial weights and the same shuffles with:

* ``numpy``: the CPU reference (``train.make_step`` on NumPy);
* ``cupy_generic``: ``model.backprop`` + ``optimizer.step`` run on CuPy unchanged;
* ``cupy_eager``: the fused step, launched kernel by kernel;
* ``cupy_graphs``: the fused step as CUDA graphs (what ``train --backend cupy`` runs);
* ``cupy_graphs_tf32``: the same with TF32 matrix products (the accuracy effect of ``--tf32``).

``--optimizer adam`` (or ``adamw``) trains with that optimizer instead (lr
1e-3, then 5e-4) and runs ``numpy``, ``cupy_eager`` and ``cupy_graphs``: the
fused step with Adam's kernel, its per-step numbers refilled before each
replay; the graph run must also have used that kernel.

Each prints its test accuracy, training loss and seconds per epoch; the run
passes when every float32 GPU variant is within 1 point of NumPy's test
accuracy and above 95%, and the graph variants really ran as graphs (replays
counted) with the output-layer kernel each was meant to use. Results
go to ``$OUT/gpu_train_check.json`` (or ``--out``). Exit status 0 pass, 1 fail,
2 no CUDA device.

    PYTHONPATH=. python scripts/gpu_train_check.py --data data/mnist
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


import backprop_xp as bx  # noqa: E402
from backprop_xp.backend import BackendError, get_backend  # noqa: E402
from backprop_xp.data import Minibatches  # noqa: E402
from backprop_xp.files import atomic_write  # noqa: E402
from backprop_xp.training import evaluate, make_step, run_epoch  # noqa: E402

HIDDEN, BATCH, MOMENTUM, SEED = 128, 128, 0.9, 0
LRS = {"sgd": (0.1, 0.05), "adam": (1e-3, 5e-4), "adamw": (1e-3, 5e-4)}
VARIANTS = {
    "sgd": ("numpy", "cupy_generic", "cupy_eager", "cupy_graphs", "cupy_graphs_tf32"),
    "adam": ("numpy", "cupy_eager", "cupy_graphs"),
    "adamw": ("numpy", "cupy_eager", "cupy_graphs"),
}


def train_one(variant: str, data: tuple, epochs: int, optimizer: str = "sgd") -> dict:
    """Train one variant; its accuracy, loss, epoch times and (GPU) step mode."""
    x_train, y_train, x_test, y_test = data
    backend = "numpy" if variant == "numpy" else "cupy"
    model = bx.MLP(784, HIDDEN, 10, backend=backend, seed=SEED)
    lrs = LRS[optimizer]
    if optimizer == "sgd":
        opt = bx.SGD(model, lr=lrs[0], momentum=MOMENTUM)
    else:
        opt = bx.OPTIMIZERS[optimizer](model, lr=lrs[0])
    xp = model.xp
    if variant == "cupy_generic":

        def step(xb, yb):
            loss, n_correct = model.backprop(xb, yb)
            opt.step()
            return loss, n_correct

    elif variant == "numpy":
        step = make_step(model, opt)
    else:
        from backprop_xp.cuda.fused_gpu_step import make_gpu_step, set_tf32

        set_tf32(variant.endswith("tf32"))
        if variant == "cupy_graphs":
            step = make_step(model, opt)  # exactly what train runs
        else:
            step = make_gpu_step(
                model,
                opt,
                graphs=variant != "cupy_eager",
                tf32=variant.endswith("tf32"),
            )
    batches = Minibatches(x_train, y_train, BATCH, xp=xp, seed=SEED)
    test_x, test_y = model.as_input(x_test), xp.asarray(y_test)
    result = {"epoch_s": [], "train_loss": [], "test_accuracy": []}
    for epoch in range(epochs):
        opt.lr = lrs[min(epoch, len(lrs) - 1)]  # a learning-rate change between epochs: graphs must follow it
        t = time.perf_counter()
        sums = run_epoch(step, batches, epoch)  # reads the device once, at the end
        result["epoch_s"].append(time.perf_counter() - t)
        result["train_loss"].append(sums.loss_sum / sums.n_samples)
        result["test_accuracy"].append(evaluate(model, test_x, test_y)[1])
    result["mode"] = getattr(step, "mode", "numpy" if variant == "numpy" else "generic")
    for name in ("fused", "n_captures", "n_replays"):
        if hasattr(step, name):
            result[name] = getattr(step, name)
    kernel = getattr(getattr(step, "update", None), "kernel", None)  # the GPU step's (GPU_UPDATES)
    if kernel is not None:
        result["update"] = kernel
    if getattr(step, "capture_error", None):
        result["capture_error"] = step.capture_error
    if variant.endswith("tf32"):
        from backprop_xp.cuda.fused_gpu_step import set_tf32

        set_tf32(False)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Short real-MNIST training on the GPU, checked against NumPy.")
    parser.add_argument(
        "--data", default=os.environ.get("BACKPROP_XP_DATA"), help="MNIST folder (default $BACKPROP_XP_DATA)"
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--optimizer", choices=sorted(VARIANTS), default="sgd")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    try:
        get_backend("cupy")
    except BackendError as exc:
        print(f"gpu_train_check: no CUDA device: {exc}", file=sys.stderr)
        return 2
    if not args.data or not Path(args.data).is_dir():
        print(
            f"gpu_train_check: MNIST folder not found ({args.data!r}); pass --data or set BACKPROP_XP_DATA",
            file=sys.stderr,
        )
        return 1
    data = bx.load_mnist(args.data, download=False)
    results, ok, problems = {}, True, []
    for variant in VARIANTS[args.optimizer]:
        try:
            results[variant] = r = train_one(variant, data, args.epochs, args.optimizer)
        except Exception as exc:  # noqa: BLE001 - report it, go on with the others
            results[variant] = {"error": f"{type(exc).__name__}: {exc}"}
            problems.append(f"{variant}: {type(exc).__name__}: {exc}")
            print(f"{variant:18s} ERROR {type(exc).__name__}: {exc}", flush=True)
            continue
        print(
            f"{variant:18s} test accuracy {r['test_accuracy'][-1]:.4f}  train loss {r['train_loss'][-1]:.4f}  "
            f"epoch s {' '.join(f'{t:.3f}' for t in r['epoch_s'])}  mode {r['mode']}"
            + (f"  fused {r['fused']}  replays {r['n_replays']}" if "fused" in r else "")
            + (f"  capture error: {r['capture_error']}" if "capture_error" in r else ""),
            flush=True,
        )
    reference = results.get("numpy", {}).get("test_accuracy", [None])[-1]
    for variant, r in results.items():
        if variant == "numpy" or "error" in r:
            continue
        acc = r["test_accuracy"][-1]
        if acc < 0.95:
            problems.append(f"{variant}: test accuracy {acc:.4f} < 0.95")
        if reference is not None and not variant.endswith("tf32") and abs(acc - reference) > 0.01:
            problems.append(
                f"{variant}: test accuracy {acc:.4f} differs from NumPy's {reference:.4f} by more than 0.01"
            )
    for variant, fused in (("cupy_graphs", True), ("cupy_graphs_tf32", True)):
        r = results.get(variant, {})
        if "error" in r or variant not in VARIANTS[args.optimizer]:
            continue
        if r.get("mode") != "graphs" or not r.get("n_replays"):
            problems.append(
                f"{variant} ran {r.get('mode')} with {r.get('n_replays')} graph replays: {r.get('capture_error')}"
            )
        if r.get("fused") is not fused:
            problems.append(f"{variant}: fused output layer {r.get('fused')}, expected {fused}")
        kernel = "adam_update_" if args.optimizer.startswith("adam") else "sgd_momentum_"
        if kernel not in r.get("update", ""):
            problems.append(f"{variant}: update {r.get('update')!r}, expected the {kernel} kernel")
    if "error" in results.get("numpy", {}):
        problems.append("no NumPy reference")
    tf32, fp32 = results.get("cupy_graphs_tf32", {}), results.get("cupy_graphs", {})
    if "test_accuracy" in tf32 and "test_accuracy" in fp32:
        delta = tf32["test_accuracy"][-1] - fp32["test_accuracy"][-1]
        print(f"TF32 effect on test accuracy after {args.epochs} epochs: {delta:+.4f}")
        results["tf32_accuracy_delta"] = delta
    ok = not problems
    for line in problems:
        print(f"problem: {line}")
    out = Path(args.out) if args.out else Path(os.environ.get("OUT") or "bench/gpu-results") / "gpu_train_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as f:
        json.dump({"passed": ok, "problems": problems, "results": results}, f, indent=2, default=float)
    print(f"wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
