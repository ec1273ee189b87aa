"""Where the GPU step's time goes: each launch of the step alone, captured in a CUDA graph and timed with events.

For each shape (784-H-10, batch B, float32), every launch of ``GpuStep.launches`` is
captured ``--reps`` times into one graph; the graph is replayed ``--rounds``
times between CUDA events and the median over rounds, divided by the reps, is
that launch's time. The whole step is timed the same way, so the table shows
both the parts and what they add up to inside one graph (launch gaps
included). Printed as a table (last) and written to ``--out`` as JSON.

    PYTHONPATH=. python bench/gpu_launches.py --out gpu_launches.json

Exit status 0, or 2 where there is no usable CUDA device. Runs only on a GPU:
``scripts/gpu_check.sh`` calls it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import backprop_xp as bx  # noqa: E402
from backprop_xp.backend import BackendError, get_backend  # noqa: E402
from backprop_xp.cuda.fused_gpu_step import make_gpu_step  # noqa: E402
from backprop_xp.files import atomic_write  # noqa: E402

SHAPES = [(128, 128), (800, 128), (128, 32), (800, 4096)]  # (hidden, batch)


def time_captured(cupy, step, work, reps: int, rounds: int) -> float:
    """Median µs of one ``work()`` call: ``reps`` calls captured in a graph, replayed ``rounds`` times."""
    stream = cupy.cuda.Stream(non_blocking=True)
    step.blas.use_stream(stream.ptr)  # cuBLAS's stream is set before the capture, never inside it
    with stream:
        stream.begin_capture()
        for _ in range(reps):
            work()
        graph = stream.end_capture()
        graph.upload(stream)
        graph.launch(stream)  # warm-up
        times = []
        for _ in range(rounds):
            start, stop = cupy.cuda.Event(), cupy.cuda.Event()
            start.record(stream)
            graph.launch(stream)
            stop.record(stream)
            stop.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, stop) * 1000 / reps)
    return statistics.median(times)


def measure(cupy, hidden: int, batch: int, reps: int, rounds: int) -> dict:
    rng = np.random.default_rng(0)
    model = bx.MLP(784, hidden, 10, backend="cupy")
    opt = bx.SGD(model, lr=1e-4, momentum=0.9)  # a small rate: hundreds of repeated updates stay finite
    step = make_gpu_step(model, opt, graphs=False, fused=True)
    x = cupy.asarray(rng.random((batch, 784), dtype=np.float32))
    y = cupy.asarray(rng.integers(0, 10, batch))
    step(x, y)  # compiles the kernels, allocates this batch size's buffers
    cupy.cuda.get_current_stream().synchronize()
    buf = step._workspaces[batch]
    rows = [
        {"launch": name, "us": time_captured(cupy, step, launch, reps, rounds)}
        for name, launch in step.launches(x, y, buf)
    ]
    whole = time_captured(cupy, step, lambda: step._launch(x, y, buf), reps, rounds)
    return {"hidden": hidden, "batch": batch, "fused": step.fused, "launches": rows, "step_us": whole,
            "epoch_ms_60000": whole * -(-60_000 // batch) / 1000}  # fmt: skip


def table(results: list[dict]) -> str:
    lines = []
    for r in results:
        lines.append(f"784-{r['hidden']}-10, batch {r['batch']}:")
        for row in r["launches"]:
            lines.append(f"    {row['us']:8.1f} µs  {row['launch']}")
        parts = sum(row["us"] for row in r["launches"])
        lines.append(
            f"    {r['step_us']:8.1f} µs  whole step in one graph (parts add to {parts:.1f}); "
            f"a 60,000-image epoch {r['epoch_ms_60000']:.1f} ms"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200, help="launches captured per graph")
    parser.add_argument("--rounds", type=int, default=7, help="timed replays (the median is kept)")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    try:
        backend = get_backend("cupy")
    except BackendError as exc:
        print(f"gpu_launches: no CUDA device: {exc}", file=sys.stderr)
        return 2
    cupy = backend.xp
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.runtime.getDevice())
    gpu = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    results = []
    for hidden, batch in SHAPES:
        results.append(measure(cupy, hidden, batch, args.reps, args.rounds))
        print(table(results[-1:]), flush=True)
    if args.out:
        with atomic_write(Path(args.out)) as f:
            json.dump({"gpu": gpu, "reps": args.reps, "rounds": args.rounds, "results": results}, f, indent=2)
    print(f"\n{gpu}: each launch captured {args.reps}x in a graph, median of {args.rounds} event-timed replays")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
