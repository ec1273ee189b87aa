"""Where the time of one training step goes: each piece of ``MLP.backprop`` and ``SGD.step`` alone.

    OPENBLAS_NUM_THREADS=1 python bench/profile_step.py                 # CPU time, one thread (bench/NOTES.md)
    python bench/profile_step.py --clock wall --hidden 800 --batch 128  # wall time, best window

Each piece is the very call the step makes, on the model's own buffers, timed
alone; ``backprop+step`` is the real thing over 8 different batches. With
``--clock cpu`` (the default) it is the CPU time of this thread, which other
processes barely disturb; that is only the whole cost with one BLAS thread.
The reported number is the best of 15 windows (timeit's convention: the least
disturbed run).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads as w  # noqa: E402

import backprop_xp as bx  # noqa: E402
from backprop_xp.activations import activation_forward_
from backprop_xp.loss import softmax_cross_entropy_  # noqa: E402


def best_time(fn, clock, calls: int = 20, windows: int = 15) -> float:
    """Microseconds per call of ``fn``: the best of ``windows`` windows of ``calls`` calls."""
    fn()
    best = float("inf")
    for _ in range(windows):
        t0 = clock()
        for _ in range(calls):
            fn()
        best = min(best, (clock() - t0) / calls)
    return best * 1e6


def profile(hidden: int, batch: int, clock) -> dict[str, float]:
    x, y = w.mnist_shaped(batch * 8, seed=0)
    batches = w.batches_of(x, y, batch)
    m = bx.MLP(784, hidden, 10)
    opt = bx.SGD(m, lr=0.01, momentum=0.9)
    bound = w.GemmBound(hidden, batch)
    xb, yb = batches[0]
    m.backprop(xb, yb)
    ws, p, g = m._workspaces(batch), m.params, m.grads

    def steps():
        for a, b in batches:
            m.backprop(a, b)
            opt.step()

    def gemms():
        for a, _ in batches:
            bound.step(a)

    pieces = {
        "backprop+step": lambda: steps(),
        "gemm bound": lambda: gemms(),
        "SGD.step": opt.step,
        "x W1ᵀ": lambda: np.matmul(xb, p["W1"].T, out=ws.a1),
        "+ b1": lambda: np.add(ws.a1, p["b1"], out=ws.a1),
        "relu (with mask)": lambda: activation_forward_(ws.a1, "relu", fprime=ws.fprime),
        "z2ᵀ = W2 a1ᵀ": lambda: np.matmul(p["W2"], ws.a1.T, out=ws.z2.T),
        "argmax count": lambda: np.count_nonzero(ws.z2.argmax(axis=1) == yb),
        "softmax+xent": lambda: softmax_cross_entropy_(ws.z2, yb, out=ws.delta2, rows=ws.rows),
        "δ2ᵀ a1": lambda: np.matmul(ws.delta2.T, ws.a1, out=g["W2"]),
        "δ2ᵀ 1": lambda: np.matmul(ws.delta2.T, ws.ones, out=g["b2"]),
        "δ2 W2": lambda: np.matmul(ws.delta2, p["W2"], out=ws.delta1),
        "⊙ f'(z1)": lambda: np.multiply(ws.delta1, ws.fprime, out=ws.delta1),
        "δ1ᵀ x": lambda: np.matmul(ws.delta1.T, xb, out=g["W1"]),
        "1ᵀ δ1": lambda: np.matmul(ws.ones, ws.delta1, out=g["b1"]),
    }
    times = {}
    for name, fn in pieces.items():
        calls = 2 if name in ("backprop+step", "gemm bound") else 20
        per_call = best_time(fn, clock, calls=calls)
        times[name] = per_call / (len(batches) if name in ("backprop+step", "gemm bound") else 1)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 800])
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = parser.parse_args()
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    for hidden in args.hidden:
        for batch in args.batch:
            times = profile(hidden, batch, clock)
            print(f"hidden {hidden} batch {batch} ({args.clock} time, µs per call, best of 15 windows)")
            for name, t in times.items():
                print(f"  {name:18s} {t:9.1f}")
            print(f"  of bound: {times['gemm bound'] / times['backprop+step']:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
