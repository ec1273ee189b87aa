"""backprop-xp against PyTorch on the CPU, measured in the same run; writes the results table.

    python bench/compare.py                  # the full run (a few minutes on 2 cores)
    python bench/compare.py --quick          # a tiny run, to check that it works

For every hidden size (128, 800) and batch size (32, 128, 512), float32:

* ``epoch``: a full training epoch (shuffle, forward, backward, SGD with
  momentum, loss and accuracy) over ``--samples`` MNIST-shaped examples,
* ``step``: training steps on batches already in memory,
* ``infer``: predicted labels of batches (forward pass only),

each for ours and for PyTorch, interleaved (ours, theirs, theirs, ours, ...)
for ``--rounds`` rounds, plus the matrix-product bound (``workloads.GemmBound``)
at the same shape. Every number is the median over the rounds; the ratio is the
median of the per-round ratios, so that a machine slowed down for a moment
slows both sides of a pair alike.

Each contestant runs in its own worker process (this script with ``--worker``),
driven one job at a time over a pipe. In one process, OpenBLAS's threads and
PyTorch's OpenMP threads each busy-wait for a while after a call and steal the
cores from the other side's next call; that made same-process timings swing
by 10x on a 2-core machine. Separate processes are also how users run them.

The table is printed, and written to ``bench/results-cpu.json`` and
``bench/RESULTS.md`` together with the CPU, the core count, the NumPy, BLAS and
PyTorch versions and the thread counts.

OpenBLAS environment: some machines set ``OPENBLAS_CORETYPE`` and
``OPENBLAS_L2_SIZE``, which make a current NumPy's OpenBLAS pick slower
kernels than the CPU allows. A user's machine does not set them, so this
script removes both from its own environment (and only its own: it re-executes
itself without them) and says so. Tests and CI never do this.
"""

from __future__ import annotations

import os
import sys

OPENBLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
_REEXEC_FLAG = "BACKPROP_XP_BENCH_REEXEC"


def _drop_openblas_env() -> list[str]:
    """Remove the OpenBLAS variables; re-execute this script if NumPy is already loaded.

    OpenBLAS reads them once, when the library is loaded, so they must be gone
    before ``import numpy``. Returns the ``NAME=value`` pairs removed.
    """
    removed = [f"{name}={os.environ[name]}" for name in OPENBLAS_VARS if name in os.environ]
    if not removed:
        return [item for item in os.environ.get(_REEXEC_FLAG, "").split(";") if item]
    for name in OPENBLAS_VARS:
        os.environ.pop(name, None)
    if "numpy" in sys.modules:
        os.environ[_REEXEC_FLAG] = ";".join(removed)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    return removed


def _parse(argv):
    import argparse
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import workloads as w

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=list(w.HIDDEN_SIZES))
    parser.add_argument("--batch", type=int, nargs="+", default=list(w.BATCH_SIZES))
    parser.add_argument("--samples", type=int, default=60_000, help="examples per training epoch (default 60000)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved repetitions; the median is reported")
    parser.add_argument("--threads", type=int, default=None, help="BLAS and PyTorch threads (default: the cores)")
    parser.add_argument("--quick", action="store_true", help="a tiny run that only checks the script works")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time (the real measure); cpu: CPU time of the one thread doing the work, "
        "which other processes on a busy machine barely disturb (needs --threads 1)",
    )
    parser.add_argument("--out", help="folder for results-cpu.json and RESULTS.md (default: bench/; a temporary one with --quick)")
    parser.add_argument("--keep-openblas-env", action="store_true", help="leave OPENBLAS_CORETYPE/L2_SIZE alone (tests)")
    parser.add_argument("--worker", choices=("ours", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.rounds = min(args.samples, 2048), min(args.rounds, 2)
    if args.out is None:
        import tempfile

        args.out = tempfile.mkdtemp(prefix="backprop-xp-bench-") if args.quick else str(Path(__file__).resolve().parent)
    for name in ("samples", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    args.threads = args.threads or os.cpu_count() or 1
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures one thread's CPU time: use it with --threads 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Before anything imports NumPy. Tests keep the machine's environment as it is.
    removed = [] if "--keep-openblas-env" in argv else _drop_openblas_env()
    args = _parse(argv)
    if args.worker:
        return _worker(args)

    import datetime
    import json
    import time
    from pathlib import Path

    import numpy as np

    from backprop_xp.files import atomic_write

    try:
        import torch  # noqa: F401  (only to fail early, with a clear message)
    except ImportError:
        print("compare.py needs PyTorch for the comparison (pip install torch==2.13.0, the CPU build)", file=sys.stderr)
        return 1
    if removed:
        print(f"compare.py: removed {', '.join(removed)} from its own environment and its workers' (see the docstring)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = _output_names(out, args.clock)

    def write(rows, elapsed, complete):
        # Rewritten after every shape, so that a run cut short still leaves what it measured.
        result = {
            "command": "python bench/compare.py " + " ".join(sys.argv[1:]),
            "clock": args.clock,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "seconds": round(elapsed, 1),
            "complete": complete,
            "samples_per_epoch": args.samples,
            "rounds": args.rounds,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "machine": machine,
            "rows": rows,
            "targets": _targets(rows),
        }
        with atomic_write(json_path) as f:
            json.dump(result, f, indent=1)
        with atomic_write(md_path) as f:
            f.write(_markdown(result))
        return result

    workers = {who: _Worker(who, args) for who in ("ours", "torch")}
    try:
        machine = {**workers["ours"].info, **workers["torch"].info, "openblas_env_removed": removed}
        print("  ".join(f"{key}: {value}" for key, value in machine.items()))
        rows = []
        started = time.perf_counter()
        for hidden in args.hidden:
            for batch in args.batch:
                rows.extend(_measure_shape(workers, hidden, batch, args, np))
                for row in rows[-3:]:
                    print(_format_row(row), flush=True)
                write(rows, time.perf_counter() - started, complete=False)
        elapsed = time.perf_counter() - started
        result = write(rows, elapsed, complete=True)
    finally:
        for worker in workers.values():
            worker.close()

    print()
    print(_table(rows))
    for target in result["targets"]:
        print(_format_target(target))
    print(f"wrote {json_path} and {md_path} ({elapsed:.0f} s)")
    return 0


def _output_names(out, clock: str):
    """``results-cpu.json`` and ``RESULTS.md`` for wall time; ``*-cputime`` for the CPU-time cross-check."""
    suffix = "" if clock == "wall" else "-cputime"
    return out / f"results-cpu{suffix}.json", out / f"RESULTS{suffix}.md"


# --------------------------------------------------------------------------- the worker processes


class _Worker:
    """A ``compare.py --worker WHO`` process: one line of JSON per job, one line back."""

    def __init__(self, who: str, args) -> None:
        import json
        import subprocess

        self.who, self._json = who, json
        command = [sys.executable, os.path.abspath(__file__), "--worker", who, "--samples", str(args.samples),
                   "--threads", str(args.threads), "--clock", args.clock, "--keep-openblas-env"]  # fmt: skip
        # The BLAS thread count is also set through the environment, which the
        # worker's BLAS reads when it loads: that works without threadpoolctl.
        env = {**os.environ, "OPENBLAS_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env
        )
        self.info = self.ask({"job": "info"})

    def ask(self, request: dict):
        self.process.stdin.write(self._json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.who} worker died (its error is printed above)")
        return self._json.loads(line)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=30)


def _worker(args) -> int:
    """Serve timing jobs on stdin/stdout: ``{"job", "hidden", "batch"}`` -> seconds for the whole job."""
    import json
    import platform

    import numpy as np

    import workloads as w

    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:  # the environment variables set by the parent still apply
        threadpool_info, threadpool_limits = (lambda: []), (lambda *a, **k: None)
    threadpool_limits(args.threads, user_api="blas")
    if args.worker == "torch":
        import torch

        torch.set_num_threads(args.threads)
        info = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                "torch_blas": _torch_blas(torch)}  # fmt: skip
    else:
        blas = next((i for i in threadpool_info() if i["user_api"] == "blas"), {"internal_api": "(install threadpoolctl)"})
        info = {
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "threads": args.threads,
            "python": platform.python_version(),
            "numpy": np.__version__,
            "blas": f"{blas.get('internal_api', '?')} {blas.get('version', '?')} ({blas.get('architecture', '?')} "
            f"kernels, {blas.get('threading_layer', '?')}, {blas.get('num_threads', '?')} threads)",
            "train_loop": "backprop_xp.training.run_epoch + data.Minibatches + training.make_step",
        }
    x, y = w.mnist_shaped(args.samples, seed=0)
    shape, jobs = None, {}
    for line in sys.stdin:
        request = json.loads(line)
        if request["job"] == "info":
            print(json.dumps(info), flush=True)
            continue
        if (request["hidden"], request["batch"]) != shape:
            shape = (request["hidden"], request["batch"])
            jobs = _jobs(w, args.worker, *shape, x, y, args.clock)
        print(json.dumps(jobs[request["job"]]()), flush=True)
    return 0


def _jobs(w, who, hidden, batch, x, y, clock_name):
    """Timed jobs at one shape: each returns the seconds of one repetition."""
    import time

    n_fixed = max(1, min(len(x) // batch, 4096 // batch + 8))  # in-memory batches for step and infer
    fixed = w.batches_of(x[: n_fixed * batch], y[: n_fixed * batch], batch)
    if who == "ours":
        net, bound = w.Ours(hidden), w.GemmBound(hidden, batch)
        jobs = {
            "gemm_step": w.run_all(lambda xb, yb: bound.step(xb), fixed),
            "gemm_infer": w.run_all_x(bound.forward, fixed),
        }
    else:
        net = w.TorchNet(hidden)
        fixed = [net.as_batch(xb, yb) for xb, yb in fixed]
        jobs = {}
    run_epoch = net.epoch_runner(x, y, batch)
    epochs = iter(range(1 << 30))
    step, infer = w.run_all(net.step, fixed), w.run_all_x(net.infer, fixed)
    clock = time.thread_time if clock_name == "cpu" else time.perf_counter
    timed = {"epoch": lambda: _once(lambda: run_epoch(next(epochs)), clock)}
    timed.update({name: (lambda fn=fn: w.seconds_per_call(fn, min_seconds=0.3, clock=clock)) for name, fn in
                  {"step": step, "infer": infer, **jobs}.items()})  # fmt: skip
    timed["epoch"]()  # warm-up epoch: buffers, caches, thread pools, first-touch pages
    return timed


def _once(fn, clock) -> float:
    t0 = clock()
    fn()
    return clock() - t0


def _torch_blas(torch) -> str:
    config = torch.__config__.show()
    blas = next((part.split("=")[1] for part in config.replace(",", " ").split() if part.startswith("BLAS_INFO=")), "?")
    return f"{blas} (+ oneDNN)" if torch.backends.mkldnn.is_available() else blas


def _measure_shape(workers, hidden, batch, args, np):
    """Rows for ``epoch``, ``step`` and ``infer`` at one shape, the two workers interleaved."""
    n_fixed = max(1, min(args.samples // batch, 4096 // batch + 8))
    samples = {"epoch": args.samples, "step": n_fixed * batch, "infer": n_fixed * batch}
    jobs = [("epoch", "ours"), ("epoch", "torch"), ("step", "ours"), ("step", "torch"), ("step", "gemm"),
            ("infer", "ours"), ("infer", "torch"), ("infer", "gemm")]  # fmt: skip
    times = {job: [] for job in jobs}
    for r in range(args.rounds):
        for workload in ("epoch", "step", "infer"):
            order = ["ours", "gemm", "torch"] if r % 2 == 0 else ["torch", "gemm", "ours"]
            for who in order:
                if (workload, who) not in times:
                    continue
                worker = workers["ours" if who == "gemm" else who]
                job = f"gemm_{workload}" if who == "gemm" else workload
                times[(workload, who)].append(worker.ask({"job": job, "hidden": hidden, "batch": batch}))
    rows = []
    for workload in ("epoch", "step", "infer"):
        t_ours, t_torch = np.array(times[(workload, "ours")]), np.array(times[(workload, "torch")])
        gemm = times[("step" if workload == "epoch" else workload, "gemm")]
        # The epoch's bound: its number of examples at the step's GEMM time per example.
        scale = args.samples / samples["step"] if workload == "epoch" else 1.0
        t_gemm, t_gemm_best = float(np.median(gemm)) * scale, float(np.min(gemm)) * scale
        n = samples[workload]
        rows.append(
            {
                "hidden": hidden,
                "batch": batch,
                "workload": workload,
                "ours_samples_per_s": n / float(np.median(t_ours)),
                "torch_samples_per_s": n / float(np.median(t_torch)),
                "ratio": float(np.median(t_torch / t_ours)),
                "ratio_min": float(np.min(t_torch / t_ours)),
                "ratio_max": float(np.max(t_torch / t_ours)),
                # Best round against best round: what each side does when nothing else gets in
                # its way. On a busy shared machine this is closer to a user's quiet machine.
                "ratio_best": float(np.min(t_torch) / np.min(t_ours)),
                "gemm_bound_samples_per_s": n / t_gemm,
                "fraction_of_gemm_bound": t_gemm / float(np.median(t_ours)),
                "fraction_of_gemm_bound_best": t_gemm_best / float(np.min(t_ours)),
                "ours_seconds": [round(t, 5) for t in t_ours.tolist()],
                "torch_seconds": [round(t, 5) for t in t_torch.tolist()],
                "gemm_seconds": [round(t, 6) for t in gemm],
            }
        )
    return rows


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


TARGETS = [  # (hidden, batch, minimum ratio to PyTorch, minimum fraction of the GEMM bound or None)
    (128, 128, 1.5, None),
    (128, 32, 1.6, None),
    (800, 128, 1.3, 0.75),
]


def _targets(rows):
    found = []
    for hidden, batch, min_ratio, min_fraction in TARGETS:
        row = next((r for r in rows if (r["hidden"], r["batch"], r["workload"]) == (hidden, batch, "epoch")), None)
        if row is None:
            continue
        met = row["ratio"] >= min_ratio and (min_fraction is None or row["fraction_of_gemm_bound"] >= min_fraction)
        met_best = row["ratio_best"] >= min_ratio and (
            min_fraction is None or row["fraction_of_gemm_bound_best"] >= min_fraction
        )
        found.append(
            {
                "hidden": hidden,
                "batch": batch,
                "min_ratio": min_ratio,
                "ratio": round(row["ratio"], 3),
                "min_fraction_of_gemm_bound": min_fraction,
                "fraction_of_gemm_bound": round(row["fraction_of_gemm_bound"], 3),
                "met": bool(met),
                "ratio_best": round(row["ratio_best"], 3),
                "fraction_of_gemm_bound_best": round(row["fraction_of_gemm_bound_best"], 3),
                "met_best": bool(met_best),
            }
        )
    return found


def _format_target(t) -> str:
    want = f">= {t['min_ratio']}x PyTorch"
    got = f"{t['ratio']:.2f}x"
    if t["min_fraction_of_gemm_bound"] is not None:
        want += f" and >= {t['min_fraction_of_gemm_bound']:.0%} of the GEMM bound"
        got += f", {t['fraction_of_gemm_bound']:.0%}"
    best = f"{t['ratio_best']:.2f}x"
    if t["min_fraction_of_gemm_bound"] is not None:
        best += f", {t['fraction_of_gemm_bound_best']:.0%}"
    return (
        f"target hidden {t['hidden']} batch {t['batch']}: {want}: median {got}: {'met' if t['met'] else 'NOT met'}; "
        f"best rounds {best}: {'met' if t['met_best'] else 'NOT met'}"
    )


HEADER = ("hidden", "batch", "workload", "ours samples/s", "PyTorch samples/s", "ratio (min-max)", "GEMM bound samples/s",
          "of bound", "best: ratio, of bound")  # fmt: skip


def _cells(row):
    return (
        str(row["hidden"]),
        str(row["batch"]),
        row["workload"],
        f"{row['ours_samples_per_s']:,.0f}",
        f"{row['torch_samples_per_s']:,.0f}",
        f"{row['ratio']:.2f} ({row['ratio_min']:.2f}-{row['ratio_max']:.2f})",
        f"{row['gemm_bound_samples_per_s']:,.0f}",
        f"{row['fraction_of_gemm_bound']:.0%}",
        f"{row['ratio_best']:.2f}, {row['fraction_of_gemm_bound_best']:.0%}",
    )


def _format_row(row) -> str:
    return "  ".join(_cells(row))


def _table(rows) -> str:
    cells = [HEADER] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    return "\n".join("  ".join(c[i].rjust(widths[i]) for i in range(len(HEADER))) for c in cells)


def _markdown(result) -> str:
    m = result["machine"]
    removed = ", ".join(m["openblas_env_removed"]) or "none were set"
    load = result.get("load_average")
    lines = [
        "# CPU benchmark: backprop-xp against PyTorch",
        "",
        *([] if result.get("complete", True) else ["**Incomplete: the run was cut short; these are the shapes it finished.**", ""]),
        f"Written by `{result['command'].strip()}` on {result['date']} ({result['seconds']:.0f} s). "
        "Reproduce with `python bench/compare.py`; `bench/NOTES.md` says how each number is measured and what changed.",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores; {m['threads']} thread(s) for NumPy's BLAS and for PyTorch",
        f"- Python {m['python']}, NumPy {m['numpy']}, BLAS {m['blas']}",
        f"- PyTorch {m['torch']} ({m['torch_threads']} thread(s), matrix products by {m['torch_blas']})",
        f"- our training loop: {m['train_loop']}",
        f"- OpenBLAS variables removed from the benchmark's own environment: {removed}",
        f"- machine load average (1, 5, 15 min) at the end: {', '.join(f'{v:.1f}' for v in load) if load else '?'}",
        f"- float32; epoch = {result['samples_per_epoch']:,} MNIST-shaped examples; median of {result['rounds']} "
        "interleaved rounds; ratio = PyTorch time / our time (median of the per-round ratios, min-max in brackets)",
        "- of bound = the time of the step's five matrix products alone (same shapes, same BLAS) / our time",
        "- best = the fastest round of each side against each other (and against the fastest bound): "
        "what each does when nothing else on the machine gets in its way",
        "- clock: " + ("wall time" if result["clock"] == "wall" else "CPU time of the working thread (one thread; "
                       "robust to other processes on the machine, not a user's wall time)"),
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join("---:" if i != 2 else "---" for i in range(len(HEADER))) + "|",
    ]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in result["rows"]]
    lines += ["", "## Targets (training epoch)", ""]
    lines += [f"- {_format_target(t)}" for t in result["targets"]]
    if result["clock"] == "wall":
        lines += ["", "`RESULTS-cputime.md` (`python bench/compare.py --threads 1 --clock cpu`) has the same table in "
                  "single-thread CPU time, a cross-check that other processes on a busy machine barely move."]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
