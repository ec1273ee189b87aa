"""What a benchmark run leaves: the printed table, ``bench.json``, ``bench.md`` and ``bench.png``.

Every file is written atomically; the table in ``bench.md`` and the printed
one are the same cells, made from ``result["rows"]``, which ``runner.summarize``
computes from the rounds stored in ``bench.json``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..files import atomic_write
from .engines import ENGINES, describe_optimizer

HEADER = ("hidden", "batch", "engine", "samples/s", "ms per epoch (min-max)", "vs fastest PyTorch", "test accuracy",
          "of GEMM bound", "first epoch")  # fmt: skip


def cells(row: dict[str, Any]) -> tuple[str, ...]:
    """One row of the table, as text."""
    ratio = row["ratio_to_torch"]
    return (
        str(row["hidden"]),
        str(row["batch"]) if row["workload"] == "epoch" else f"{row['batch']} ({row['workload']})",
        row["engine"],
        f"{row['samples_per_s']:,.0f}",
        f"{1000 * row['median_s']:,.1f} ({1000 * row['min_s']:,.1f}-{1000 * row['max_s']:,.1f})",
        "-" if ratio is None else f"{ratio:.2f}x {row['torch_reference']}" + _spread(row),
        "-" if row["test_accuracy"] is None else f"{100 * row['test_accuracy']:.2f}%",
        f"{100 * row['fraction_of_bound']:.0f}%",
        _first(row),
    )


def _first(row: dict[str, Any]) -> str:
    """The first epoch, and for a compiled engine its compile time beside it (never inside the epochs)."""
    if row["first_epoch_s"] is None:
        return "-"
    compiled = row.get("compile_s")
    return f"{row['first_epoch_s']:.2f} s" + ("" if compiled is None else f" (+{compiled:.1f} s compile)")


def _spread(row: dict[str, Any]) -> str:
    """`` (min-max)`` of the per-round ratios, where there are several rounds and the row is not the reference."""
    low, high = row.get("ratio_min"), row.get("ratio_max")
    if low is None or row["engine"] == row["torch_reference"] or row.get("rounds", 1) < 2:
        return ""
    return f" ({low:.2f}-{high:.2f})"


def table(result: dict[str, Any]) -> str:
    """The rows as aligned text, then the engines that did not run and why."""
    rows = [HEADER] + [cells(r) for r in result["rows"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    lines = [
        "  ".join(c.ljust(w) if i == 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows
    ]
    if not result["rows"]:
        lines.append("(no engine finished a timed round)")
    lines += [f"not run: {name}: {reason}" for name, reason in result["missing"].items()]
    lines.append(optimizer_line(result))
    lines.append(threads_line(result))
    if result["machine"].get("load_warning"):
        lines.append(f"warning: {result['machine']['load_warning']}")
    if result["stopped"]:
        lines.append(f"stopped: {result['stopped']}")
    return "\n".join(lines)


def optimizer_line(result: dict[str, Any]) -> str:
    """Which optimizer every engine trained with (``bench --optimizer``; a file from before the flag: SGD)."""
    name = result["settings"].get("optimizer", "sgd")
    return f"optimizer: {describe_optimizer(name)}, every engine (--optimizer {name})"


def threads_line(result: dict[str, Any]) -> str:
    """How many CPU threads each engine had, and whether that was the default or asked for."""
    s = result["settings"]
    if s.get("threads_from", "default") == "default":
        why = "the default: one per engine, the setting that gives steady numbers on a shared machine"
    else:
        why = "--threads; the default is 1"
    return f"threads: {s['threads']} per CPU engine ({why})"


def cpu_step(info: dict[str, Any]) -> str:
    """Which CPU step ours ran, from ``numba_loops.info()``: the fused loops with their threads, or plain NumPy."""
    if not info.get("enabled"):
        return "the plain NumPy path (no Numba, or BACKPROP_XP_FAST=0)"
    return (
        f"fused Numba {info.get('numba')} loops (backprop_xp.cpu.numba_loops; BACKPROP_XP_FAST=0 turns them off), "
        f"{info.get('threads')} thread(s) for the parallel ones ({info.get('threading_layer')} layer"
        + ("; NumPy's OpenBLAS on the same threads, cpu/blas_pool.py)" if info.get("blas_on_these_threads") else ")")
    )


def _versions(result: dict[str, Any]) -> list[str]:
    engines = result["engines"]
    lines = []
    cpu_info = next((e for e in engines.values() if "blas" in e), None)
    if cpu_info:
        kernel = cpu_info.get("blas_kernel") or "?"
        lines.append(
            f"- NumPy {cpu_info['numpy']}, BLAS {cpu_info['blas']} ({kernel} kernels, {cpu_info.get('blas_threading') or '?'}, "
            f"{cpu_info.get('blas_threads') or '?'} threads), Python {cpu_info['python']}"
        )
    step = engines.get("numpy", {}).get("cpu_step")
    if step:
        lines.append(f"- our CPU step: {cpu_step(step)}")
    torch_info = next((e for e in engines.values() if "torch" in e), None)
    if torch_info:
        lines.append(
            f"- PyTorch {torch_info['torch']} ({torch_info['torch_threads']} CPU threads, BLAS {torch_info['torch_blas']})"
        )
    jax_info = next((e for e in engines.values() if "jax" in e), None)
    if jax_info:
        lines.append(f"- JAX {jax_info['jax']} (CPU threads: {jax_info['jax_threads']})")
    if "sklearn" in engines:
        lines.append(f"- scikit-learn {engines['sklearn']['sklearn']}")
    gpu = next((e for e in engines.values() if "gpu" in e), None)
    if gpu:
        extra = (
            f", CuPy {gpu['cupy']}, CUDA runtime {gpu['cuda_runtime']}, driver {gpu['cuda_driver']}"
            if "cupy" in gpu
            else ""
        )
        lines.append(f"- GPU: {gpu['gpu']}{extra}")
    return lines


def markdown(result: dict[str, Any]) -> str:
    """``bench.md``: how it was run, the table, what did not run."""
    m, s = result["machine"], result["settings"]
    load = lambda v: ", ".join(f"{x:.1f}" for x in v) if v else "?"  # noqa: E731
    env = ", ".join(f"{k}={v}" for k, v in m["openblas_env"].items()) or "neither set"
    data = next((e["data"] for e in result["engines"].values()), "no engine loaded it")
    lines = [
        "# backprop-xp bench",
        "",
        *([f"**Stopped early: {result['stopped']}.**", ""] if result["stopped"] else []),
        f"`{result['command']}`, {result['date']}, {result['seconds']:.0f} s.",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores; {threads_line(result)}",
        f"- {optimizer_line(result)}",
        *([f"- **warning: {m['load_warning']}**"] if m.get("load_warning") else []),
        *_versions(result),
        f"- OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE: {env} (left as they were)",
        f"- load average (1, 5, 15 min): {load(m['load_average_start'])} at the start, {load(m.get('load_average_end'))} at the end",
        f"- data: {data}",
        f"- 784-H-10, ReLU, softmax cross-entropy, {describe_optimizer(s.get('optimizer', 'sgd'))}, float32; one first "
        f"epoch, then up to {s['epochs']} timed rounds, engines interleaved; every number is the median over the rounds",
        "- first epoch: compilation, allocation and graph capture happen there; a compiled engine (JAX, torch.compile) "
        "compiles before it, and that time is given beside it, never counted in an epoch",
        "- vs fastest PyTorch: samples/s over those of the fastest eager or CUDA-graph PyTorch engine on the same device and shape "
        "(in brackets: the lowest and highest ratio of a single round)",
        "- of GEMM bound: time of the step's five matrix products alone (same shapes, the engine's own BLAS) over the epoch's time",
        "- test accuracy: on the 10,000 test images after all the epochs trained (first epoch included)",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join("---" if i == 2 else "---:" for i in range(len(HEADER))) + "|",
        *("| " + " | ".join(cells(r)) + " |" for r in result["rows"]),
        "",
    ]
    if result["missing"]:
        lines += ["Not run here:", ""] + [f"- `{name}`: {reason}" for name, reason in result["missing"].items()] + [""]
    if result["errors"]:
        lines += (
            ["Errors:", ""]
            + [f"- `{e['engine']}`: {e.get('during', '')} {e['error']}".replace("  ", " ") for e in result["errors"]]
            + [""]
        )
    return "\n".join(lines)


def bar_chart(result: dict[str, Any], path: str | os.PathLike) -> None:
    """``bench.png``: training samples/s per engine, grouped by shape, log scale."""
    from ..plots import _pyplot, save_figure

    plt = _pyplot()
    rows = [r for r in result["rows"] if r["workload"] == "epoch"]
    shapes = list(dict.fromkeys((r["hidden"], r["batch"]) for r in rows))
    engines = [name for name in ENGINES if any(r["engine"] == name for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 + 0.35 * len(shapes) * max(len(engines), 1)), 4.5))
    width = 0.8 / max(len(engines), 1)
    colors = plt.get_cmap("tab10")
    for j, name in enumerate(engines):
        mine = {(r["hidden"], r["batch"]): r["samples_per_s"] for r in rows if r["engine"] == name}
        xs = [i + (j - (len(engines) - 1) / 2) * width for i, shape in enumerate(shapes) if shape in mine]
        values = [mine[shape] for shape in shapes if shape in mine]
        ax.bar(xs, values, width * 0.9, color=colors(j % 10), label=name)
        for x, value in zip(xs, values):
            ax.text(x, value, _short(value), ha="center", va="bottom", fontsize=7, rotation=90)
    if engines:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.set_yscale("log")
        speeds = [r["samples_per_s"] for r in rows]
        ax.set_ylim(min(speeds) / 3, max(speeds) * 3)  # room for the labels above the bars
    ax.set_xticks(range(len(shapes)), [f"784-{h}-10\nbatch {b}" for h, b in shapes])
    ax.set_ylabel("training samples/s (log scale, higher is better)")
    m = result["machine"]
    ax.set_title(f"backprop-xp bench: {m['cpu']}, {result['settings']['threads']} CPU thread(s)", fontsize=9)
    ax.grid(axis="y", which="both", alpha=0.3)
    save_figure(fig, path)


def _short(value: float) -> str:
    """``1234567 -> '1.2M'``.

    >>> _short(1234567), _short(98765), _short(512)
    ('1.2M', '99k', '512')
    """
    if value >= 1e6:
        return f"{value / 1e6:.1f}M"
    if value >= 1e3:
        return f"{value / 1e3:.0f}k"
    return f"{value:.0f}"


def write_files(result: dict[str, Any], out: str | os.PathLike, *, picture: bool = True) -> list[Path]:
    """Write ``bench.json``, ``bench.md`` and (with ``picture``) ``bench.png`` into ``out``; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "bench.json", out / "bench.md"]
    with atomic_write(paths[0]) as f:
        json.dump(_finite(result), f, indent=1)
        f.write("\n")
    with atomic_write(paths[1]) as f:
        f.write(markdown(result))
    if picture:
        paths.append(out / "bench.png")
        bar_chart(result, paths[2])
    return paths


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: such numbers become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
