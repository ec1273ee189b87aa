"""GPU benchmark for ``scripts/gpu_check.sh``: ``backprop-xp bench`` with the GPU engines, plus issue 12's targets.

The measuring is ``backprop_xp.speed`` (one implementation for every engine):
``cupy`` (our step with CUDA graphs), ``cupy-eager``, ``torch-cuda`` (PyTorch
eager) and ``torch-cuda-graph`` (PyTorch's whole step captured as one CUDA
graph), each in its own process, data on the device, the same shuffles, CUDA
events after a first epoch, medians of interleaved rounds. This script picks
those engines, writes ``bench.json``/``bench.md``/``bench.png`` beside
``--out`` and ``--out`` itself (the same result plus the targets), and prints
the table. Run from the repository root (no install needed)::

    PYTHONPATH=. python bench/bench_gpu.py --data data/mnist --out bench/gpu-results/bench_gpu.json

The same as a user runs it: ``backprop-xp bench --engines cupy,cupy-eager,torch-cuda,torch-cuda-graph``.
Without any usable GPU engine it says why and exits with status 2. Without
MNIST it times random data of the same shape (no test accuracy).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source tree, nothing installed

GPU_ENGINES = ["cupy", "cupy-eager", "torch-cuda", "torch-cuda-graph"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", default=os.environ.get("BACKPROP_XP_DATA"), help="MNIST folder (default $BACKPROP_XP_DATA)"
    )
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 800])
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 128, 512, 4096])
    parser.add_argument(
        "--epochs", type=int, default=3, help="timed rounds per engine and shape, after a first epoch (default 3)"
    )
    parser.add_argument(
        "--engines", nargs="+", default=GPU_ENGINES, choices=GPU_ENGINES + ["numpy", "torch-cpu", "sklearn"]
    )
    parser.add_argument(
        "--tf32", action="store_true", help="accepted for gpu_check.sh; the benchmark is float32 without TF32"
    )
    parser.add_argument(
        "--budget-s", type=float, default=150.0, help="start no round that would end after this (default 150)"
    )
    parser.add_argument(
        "--out", default=None, help="JSON file to write (default: $OUT/bench_gpu.json or bench/gpu-results/)"
    )
    args = parser.parse_args(argv)

    from backprop_xp.speed import Settings, run, write_files

    if args.tf32:
        print("bench_gpu: --tf32 is not measured here (float32 only); `train --tf32` shows its effect", file=sys.stderr)
    out = Path(args.out) if args.out else Path(os.environ.get("OUT") or "bench/gpu-results") / "bench_gpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    have_data = bool(args.data) and Path(args.data).is_dir()
    settings = Settings(
        hidden=args.hidden, batch_sizes=args.batch, engines=args.engines, epochs=args.epochs, budget_s=args.budget_s,
        data_dir=args.data if have_data else None, random_samples=0 if have_data else 60_000,
        command="python bench/bench_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    )  # fmt: skip
    result = run(settings)
    if not result["engines"]:
        reasons = "; ".join(f"{name}: {reason}" for name, reason in result["missing"].items())
        print(f"bench_gpu: no CUDA device, nothing to measure: {reasons}", file=sys.stderr)
        return 2
    result["targets"] = targets(result["rows"])
    write_files(result, out.parent)
    from backprop_xp.files import atomic_write

    with atomic_write(out) as f:
        json.dump(result, f, indent=1)
    print()
    print(table(result))
    print(f"\nwrote {out} and bench.json, bench.md, bench.png beside it")
    return 0 if result["rows"] and not result["errors"] else 1


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue 12's targets, measured (None where the numbers are missing)."""
    by = {(r["hidden"], r["batch"], r["engine"]): r for r in rows if r["workload"] == "epoch"}

    def speedup(hidden: int, batch: int) -> float | None:
        ours, graph = by.get((hidden, batch, "cupy")), by.get((hidden, batch, "torch-cuda-graph"))
        return ours["samples_per_s"] / graph["samples_per_s"] if ours and graph else None

    verdicts: dict[str, Any] = {}
    for hidden, minimum in ((128, 3.0), (800, 2.0)):
        value = speedup(hidden, 128)
        verdicts[f"cupy_vs_torch_graph_h{hidden}_b128"] = {
            "value": value,
            "target": f">= {minimum:g}",
            "met": None if value is None else value >= minimum,
        }
    row = by.get((128, 128, "cupy"))
    ms = 1000 * row["median_s"] if row else None
    verdicts["epoch_ms_h128_b128"] = {"value": ms, "target": "<= 20", "met": None if ms is None else ms <= 20}
    for hidden in (128, 800):  # the epoch over the five products alone, timed inside a graph
        row = by.get((hidden, 4096, "cupy"))
        over = 1 / row["fraction_of_bound"] if row else None
        verdicts[f"epoch_over_gemm_h{hidden}_b4096"] = {
            "value": over,
            "target": "<= 1.5",
            "met": None if over is None else over <= 1.5,
        }
    return verdicts


def table(report: dict[str, Any]) -> str:
    """The benchmark's table and the targets (``gpu_check.sh`` prints this from the JSON)."""
    from backprop_xp.speed import table as bench_table

    lines = [bench_table(report)]
    verdicts = report.get("targets") or {}
    if verdicts:
        lines.append("targets: " + "; ".join(f"{name} = {_verdict(v)}" for name, v in verdicts.items()))
    return "\n".join(lines)


def _verdict(v: dict[str, Any]) -> str:
    value = "n/a" if v["value"] is None else f"{v['value']:.2f}"
    met = "n/a" if v["met"] is None else "met" if v["met"] else "not met"
    return f"{value} ({v['target']}: {met})"


if __name__ == "__main__":
    sys.exit(main())
