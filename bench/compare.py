"""backprop-xp against PyTorch on the CPU, with step and inference rows: a caller of ``backprop-xp bench``.

    python bench/compare.py                  # the full run (a few minutes on 2 cores)
    python bench/compare.py --quick          # a tiny run, to check that it works

The measuring is ``backprop_xp.speed`` (engines ``numpy`` and ``torch-cpu``,
each in its own worker process, rounds interleaved); this script only picks
its settings and writes the results in the format of ``bench/RESULTS.md``,
which ``backprop-xp bench`` does not: on MNIST-shaped random data (no MNIST
needed), for every hidden size (128, 800) and batch size (32, 128, 512),
float32,

* ``epoch``: a full training epoch (shuffle, forward, backward, SGD with
  momentum, loss and accuracy) over ``--samples`` examples,
* ``step``: training steps on batches already in memory,
* ``infer``: predicted labels of batches (forward pass only),

each for ours and for PyTorch, for ``--rounds`` rounds, plus the matrix-product
bound on NumPy's BLAS at the same shape. Every number is the median over the
rounds; the ratio is the median of the per-round ratios, so that a machine
slowed down for a moment slows both sides of a pair alike.

The table is printed, and written to ``bench/results-cpu.json`` and
``bench/RESULTS.md`` together with the CPU, the core count, the NumPy, BLAS and
PyTorch versions and the thread counts.

OpenBLAS environment: some machines set ``OPENBLAS_CORETYPE`` and
``OPENBLAS_L2_SIZE``, which make a current NumPy's OpenBLAS pick slower
kernels than the CPU allows. A user's machine does not set them, so this
script removes both from its own environment (and only its own: it re-executes
itself without them; the workers inherit that) and says so. ``backprop-xp
bench`` leaves them as they are. Tests and CI never remove them.
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

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source tree, nothing installed
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 800])
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 128, 512])
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
    parser.add_argument(
        "--out", help="folder for results-cpu.json and RESULTS.md (default: bench/; a temporary one with --quick)"
    )
    parser.add_argument(
        "--keep-openblas-env", action="store_true", help="leave OPENBLAS_CORETYPE/L2_SIZE alone (tests)"
    )
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

    import json
    import math
    from pathlib import Path

    from backprop_xp.files import atomic_write
    from backprop_xp.speed import Settings, run

    if removed:
        print(f"compare.py: removed {', '.join(removed)} from its own environment and its workers' (see the docstring)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = _output_names(out, args.clock)
    settings = Settings(
        hidden=args.hidden, batch_sizes=args.batch, engines=["numpy", "torch-cpu"], epochs=args.rounds,
        budget_s=math.inf, threads=args.threads, random_samples=args.samples, workloads=("epoch", "step", "infer"),
        clock=args.clock, command="python bench/compare.py " + " ".join(argv),
    )  # fmt: skip
    bench = run(settings)
    if "torch-cpu" in bench["missing"]:
        print(f"compare.py needs PyTorch for the comparison: {bench['missing']['torch-cpu']}", file=sys.stderr)
        return 1
    if bench["errors"] or "numpy" in bench["missing"]:
        print(f"compare.py: the run failed: {bench['errors'] or bench['missing']}", file=sys.stderr)
        return 1
    rows = _rows(bench)
    result = {
        "command": settings.command,
        "clock": args.clock,
        "date": bench["date"],
        "seconds": bench["seconds"],
        "complete": bench["complete"],
        "samples_per_epoch": args.samples,
        "rounds": args.rounds,
        "load_average": bench["machine"]["load_average_end"],
        "machine": _machine(bench, args.threads, removed),
        "rows": rows,
        "targets": _targets(rows),
    }
    with atomic_write(json_path) as f:
        json.dump(result, f, indent=1)
    with atomic_write(md_path) as f:
        f.write(_markdown(result))
    print()
    print(_table(rows))
    for target in result["targets"]:
        print(_format_target(target))
    print(f"wrote {json_path} and {md_path} ({bench['seconds']:.0f} s)")
    return 0 if bench["complete"] else 130


def _machine(bench: dict, threads: int, removed: list[str]) -> dict:
    """The machine keys of ``RESULTS.md``, from what the two workers reported."""
    from backprop_xp.speed.report import cpu_step

    ours, theirs = bench["engines"]["numpy"], bench["engines"]["torch-cpu"]
    return {
        "cpu": bench["machine"]["cpu"],
        "cores": bench["machine"]["cores"],
        "threads": threads,
        "python": ours["python"],
        "numpy": ours["numpy"],
        "blas": f"{ours['blas']} ({ours.get('blas_kernel') or '?'} kernels, {ours.get('blas_threading') or '?'}, "
        f"{ours.get('blas_threads') or '?'} threads)",
        "torch": theirs["torch"],
        "torch_threads": theirs["torch_threads"],
        "torch_blas": theirs["torch_blas"],
        "train_loop": "backprop_xp.training.run_epoch + data.Minibatches + training.make_step (backprop_xp.speed engine numpy)",
        "cpu_step": cpu_step(ours["cpu_step"]) if ours.get("cpu_step") else "?",
        "openblas_env_removed": removed,
    }


def _rows(bench: dict) -> list[dict]:
    """One row per (shape, workload): ours and PyTorch paired round by round, the bound on NumPy's BLAS."""
    import numpy as np

    rows = []
    by_key = {(r["hidden"], r["batch"], r["workload"], r["engine"]): r for r in bench["rows"]}
    for row in bench["rows"]:
        if row["engine"] != "numpy" or (row["hidden"], row["batch"], row["workload"], "torch-cpu") not in by_key:
            continue
        hidden, batch, workload = row["hidden"], row["batch"], row["workload"]
        theirs = by_key[(hidden, batch, workload, "torch-cpu")]
        rounds = min(row["rounds"], theirs["rounds"])  # pairs: the same round of each
        t_ours, t_torch = np.array(row["seconds"][:rounds]), np.array(theirs["seconds"][:rounds])
        gemm = [
            m["bound_seconds"]
            for m in bench["rounds"]
            if (m["engine"], m["hidden"], m["batch"], m["workload"]) == ("numpy", hidden, batch, workload)
        ]
        n = row["samples"]
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
                "gemm_bound_samples_per_s": n / float(np.median(gemm)),
                "fraction_of_gemm_bound": float(np.median(gemm)) / float(np.median(t_ours)),
                "fraction_of_gemm_bound_best": float(np.min(gemm)) / float(np.min(t_ours)),
                # The ratio ours would have if its step took exactly the five products' time.
                # Not a hard ceiling: the fused CPU loop does the three small products itself.
                "ratio_at_bound": float(np.median(t_torch)) / float(np.median(gemm)),
                "ours_seconds": [round(t, 5) for t in t_ours.tolist()],
                "torch_seconds": [round(t, 5) for t in t_torch.tolist()],
                "gemm_seconds": [round(t, 6) for t in gemm],
            }
        )
    return rows


def _output_names(out, clock: str):
    """``results-cpu.json`` and ``RESULTS.md`` for wall time; ``*-cputime`` for the CPU-time cross-check."""
    suffix = "" if clock == "wall" else "-cputime"
    return out / f"results-cpu{suffix}.json", out / f"RESULTS{suffix}.md"


TARGETS = [  # (hidden, batch, minimum ratio to PyTorch, minimum fraction of the GEMM bound or None): issue 18's
    (128, 128, 1.8, None),
    (128, 32, 2.0, None),
    (800, 128, 1.5, 0.80),
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
                "ratio": row["ratio"],
                "min_fraction_of_gemm_bound": min_fraction,
                "fraction_of_gemm_bound": row["fraction_of_gemm_bound"],
                "met": bool(met),
                "ratio_best": row["ratio_best"],
                "fraction_of_gemm_bound_best": row["fraction_of_gemm_bound_best"],
                "met_best": bool(met_best),
                "ratio_at_bound": row["ratio_at_bound"],
            }
        )
    return found


def _format_target(t) -> str:
    want = f">= {t['min_ratio']}x PyTorch"
    got = f"{t['ratio']:.3f}x"  # three decimals: 1.797x is not 1.8x
    if t["min_fraction_of_gemm_bound"] is not None:
        want += f" and >= {t['min_fraction_of_gemm_bound']:.0%} of the GEMM bound"
        got += f", {t['fraction_of_gemm_bound']:.0%}"
    best = f"{t['ratio_best']:.3f}x"
    if t["min_fraction_of_gemm_bound"] is not None:
        best += f", {t['fraction_of_gemm_bound_best']:.0%}"
    return (
        f"target hidden {t['hidden']} batch {t['batch']}: {want}: median {got}: {'met' if t['met'] else 'NOT met'}; "
        f"best rounds {best}: {'met' if t['met_best'] else 'NOT met'}; "
        f"a step at the GEMM bound would be {t['ratio_at_bound']:.2f}x"
    )


HEADER = ("hidden", "batch", "workload", "ours samples/s", "PyTorch samples/s", "ratio (min-max)", "GEMM bound samples/s",
          "of bound", "best: ratio, of bound", "ratio at bound")  # fmt: skip


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
        f"{row['ratio_at_bound']:.2f}",
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
        *(
            []
            if result.get("complete", True)
            else ["**Incomplete: the run was cut short; these are the shapes it finished.**", ""]
        ),
        f"Written by `{result['command'].strip()}` on {result['date']} ({result['seconds']:.0f} s). "
        "Reproduce with `python bench/compare.py`; `bench/NOTES.md` says how each number is measured and what changed.",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores; {m['threads']} thread(s) for NumPy's BLAS and for PyTorch",
        f"- Python {m['python']}, NumPy {m['numpy']}, BLAS {m['blas']}",
        f"- PyTorch {m['torch']} ({m['torch_threads']} thread(s), matrix products by {m['torch_blas']})",
        f"- our training loop: {m['train_loop']}",
        f"- our CPU step: {m.get('cpu_step', '?')}",
        f"- OpenBLAS variables removed from the benchmark's own environment: {removed}",
        f"- machine load average (1, 5, 15 min) at the end: {', '.join(f'{v:.1f}' for v in load) if load else '?'}",
        f"- float32; epoch = {result['samples_per_epoch']:,} MNIST-shaped examples; median of {result['rounds']} "
        "interleaved rounds; ratio = PyTorch time / our time (median of the per-round ratios, min-max in brackets)",
        "- of bound = the time of the step's five matrix products alone (same shapes, same BLAS) / our time",
        "- best = the fastest round of each side against each other (and against the fastest bound): "
        "what each does when nothing else on the machine gets in its way",
        "- ratio at bound = PyTorch's time / the GEMM bound's (medians): the ratio ours would reach if its step "
        "cost as much as its five matrix products alone (not a hard ceiling: the fused CPU loop does the three "
        "small ones itself, so a step can beat the bound)",
        "- clock: "
        + (
            "wall time"
            if result["clock"] == "wall"
            else "CPU time of the working thread (one thread; "
            "robust to other processes on the machine, not a user's wall time)"
        ),
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
