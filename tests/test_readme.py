"""The README's commands work as written on a fresh machine.

Every fenced ``bash`` command of README.md and docs/*.md is either run here, as written, from a folder laid
out as a fresh clone with ``../shared/mnist`` beside it (RUN), or listed in SKIPPED with the reason it is
not (it trains for minutes, needs a GPU, a cluster or the network, or installs packages). A new command that
is in neither list fails the inventory test: add it to one of them, after reading it. The ``python`` blocks
are the library examples, run by tests/test_library.py.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tomllib
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Run as written, in the order they appear (README.md, then docs/*.md): the later ones use the run the first trains.
RUN = (
    "python -m backprop_xp train --data-dir ../shared/mnist --out runs/first",
    "python -m backprop_xp train --help",
    "python -m backprop_xp evaluate runs/first --data-dir ../shared/mnist",
    "python -m backprop_xp predict runs/first my-digit.png --show runs/seen.png",
    "python -m backprop_xp show-data --data-dir ../shared/mnist",
    "export BACKPROP_XP_DATA=../shared/mnist",
    "backprop-xp show-data",  # docs/data.md, with the folder the export above named
)

LONG = "trains for minutes"
INSTALLS = "installs packages (the network, and it would change this environment)"
SKIPPED = {
    "pip install -e .": INSTALLS,
    "pip install -e '.[dev]'": INSTALLS,
    "pip install -e '.[bench]'": INSTALLS,
    "pip install -e '.[dask]'": INSTALLS,
    "pip install -e '.[cuda12]'": INSTALLS + "; and a GPU",
    "python -m pytest -q": "the whole test suite, of which this test is a part",
    "python scripts/check_accuracy.py --data-dir ../shared/mnist": LONG + " (two recipes, 45 s on a quiet machine)",
    "backprop-xp bench --data-dir ../shared/mnist": LONG + " (about 3 minutes)",
    "backprop-xp bench --engines numpy,torch-cpu --hidden 800 --batch-size 128 --epochs 5 --train-size 0": LONG
    + " (6 epochs of 60,000 images at hidden 800, twice)",
    "python -m backprop_xp sweep --data-dir ../shared/mnist --hidden 32,128,512 --lr 0.01,0.1,0.5 "
    "--batch-size 32,128 --epochs 3 --jobs 2 --out sweeps/first": LONG
    + " (18 runs, about 3 minutes; tests/test_sweep.py runs sweep small)",
    "python -m backprop_xp train --backend cupy --data-dir ../shared/mnist": "needs a GPU",
    "backprop-xp bench --data-dir ../shared/mnist --engines numpy,jax,jax-step,torch-cpu,torch-compile,sklearn "
    "--hidden 128,800 --batch-size 128 --threads 2 --epochs 9 --budget-s 400 --out runs/bench-jax": (
        "times six engines for a minute and a half (CI runs a tiny bench with jax)"
    ),
    "python -m backprop_xp train --data-dir ../shared/mnist --hidden 800 --epochs 150 --augment --preprocess deskew "
    "--val-size 5000 --keep-best --lr 0.1 --momentum 0.9 --out runs/record": LONG + " (38 minutes on the 2-core CPU)",
    "python -m backprop_xp sweep --data-dir ../shared/mnist --hidden 800 --epochs 100 --augment --preprocess "
    "deskew,none --seed 1,2 --val-size 5000 --keep-best --jobs 2 --out runs/committee": LONG + " (26 minutes)",
    "python -m backprop_xp evaluate --data-dir ../shared/mnist runs/record runs/committee/*/": (
        "needs the two runs above (an hour of training)"
    ),
    "python -m backprop_xp train --dataset fashion-mnist --data-dir /usr/share/datasets/fashion-mnist --hidden 1024 "
    "--epochs 40 --lr 0.05 --val-size 5000": LONG + " (a minute on a quiet machine; Debian's Fashion-MNIST path)",
    "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=1 dask scheduler --port 8786": "starts a Dask scheduler server",
    "dask worker tcp://SCHEDULER_HOST:8786 --nworkers 16 --nthreads 1": "needs a Dask scheduler on another machine",
    'CUDA_VISIBLE_DEVICES=0 dask worker tcp://SCHEDULER_HOST:8786 --nworkers 1 --nthreads 1 --name "$(hostname)-gpu0"': (
        "needs a Dask scheduler and a GPU"
    ),
    'CUDA_VISIBLE_DEVICES=1 dask worker tcp://SCHEDULER_HOST:8786 --nworkers 1 --nthreads 1 --name "$(hostname)-gpu1"': (
        "needs a Dask scheduler and two GPUs"
    ),
    "backprop-xp sweep --hidden 128,256,512 --lr 0.05,0.1 --epochs 10 --scheduler tcp://SCHEDULER_HOST:8786 "
    "--out /shared/sweeps/hidden-lr": "needs a Dask cluster",
}


def fenced_commands(text: str) -> list[str]:
    """Each command of the ``bash`` blocks: continuation lines joined, comments and blank lines dropped."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s+)#.*$", "", line)  # a comment line, or a comment after the command
            if line.strip():
                commands.append(" ".join(line.split()))
    return commands


def _every_command() -> dict[str, list[str]]:
    return {doc.name: fenced_commands(doc.read_text()) for doc in DOCUMENTS}


def test_every_fenced_command_is_run_or_skipped_with_a_reason():
    found = _every_command()
    unknown = [(name, c) for name, commands in found.items() for c in commands if c not in RUN and c not in SKIPPED]
    assert not unknown, (
        f"fenced commands neither run by this test nor listed in SKIPPED (read them, then add): {unknown}"
    )
    everywhere = {c for commands in found.values() for c in commands}
    stale = [c for c in (*RUN, *SKIPPED) if c not in everywhere]
    assert not stale, f"listed here but no longer in the README or docs/: {stale}"
    in_order = [c for commands in found.values() for c in commands if c in RUN]  # the README first, then docs/
    assert list(dict.fromkeys(in_order)) == list(RUN), "RUN is in the documents' order (a run, then what uses it)"


def _section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"README has no section {title!r}"
    return match.group(1)


def test_the_test_section_installs_what_the_tests_need():
    # `pip install -e .` alone gives "No module named pytest": the section must carry its own install line.
    commands = fenced_commands(_section("Run the tests"))
    install = [c for c in commands if c.startswith("pip install")]
    assert install and "pytest" in commands[-1], commands
    extra = re.search(r"\.\[(\w+)\]", install[0]).group(1)
    assert commands.index(install[0]) < len(commands) - 1  # installed before it is run
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][extra]
    assert any(req.startswith("pytest") for req in dev), dev


def test_every_python_block_is_a_library_example_that_test_library_runs():
    # tests/test_library.py executes the python blocks of "## The library"; one elsewhere would run nowhere.
    readme = (ROOT / "README.md").read_text()
    library = re.findall(r"^```python\n", _section("The library"), re.M)
    assert len(library) == len(re.findall(r"^```python\n", readme, re.M)) >= 2
    for doc in DOCUMENTS[1:]:
        assert "```python" not in doc.read_text(), f"{doc.name}: a python block no test runs"


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_reaches_a_file_and_heading():
    broken = []
    for doc in DOCUMENTS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            headings = (
                re.findall(r"^#+ (.*)$", file.read_text(), re.M) if file.suffix == ".md" and file.exists() else []
            )
            if not file.exists() or (anchor and anchor not in {_anchor(h) for h in headings}):
                broken.append(f"{doc.name}: {target}")
    assert not broken, broken


def _a_digit_as_a_user_photographs_it(mnist, path: Path) -> int:
    """my-digit.png, which the README's predict reads: MNIST's first test digit, dark ink on paper, 3 times larger."""
    _, _, x_test, y_test = mnist
    ink = (x_test[0].reshape(28, 28) * 255).astype(np.uint8)
    Image.fromarray(255 - ink).resize((84, 84), Image.BILINEAR).save(path)
    return int(y_test[0])


@pytest.mark.slow
def test_the_readmes_commands_run_as_written_from_a_fresh_clone(mnist_dir, mnist, tmp_path):
    # A fresh clone with the data beside it: tmp/repo is the clone (where the user types), tmp/shared/mnist the data.
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "mnist").symlink_to(mnist_dir, target_is_directory=True)
    repo = tmp_path / "repo"
    repo.mkdir()
    label = _a_digit_as_a_user_photographs_it(mnist, repo / "my-digit.png")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKPROP_XP_")}  # only what the README sets
    env |= {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # python, backprop-xp: this venv
        "XDG_CACHE_HOME": str(tmp_path / "cache"),  # a download would land here, and fail the check below
        "MPLBACKEND": "Agg",
    }
    outputs = {}
    for command in RUN:
        if command.startswith("export "):
            name, _, value = shlex.split(command)[1].partition("=")
            env[name] = value
            continue
        started = time.perf_counter()
        done = subprocess.run(["bash", "-c", command], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"$ {command}\nexit {done.returncode}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        outputs[command] = done.stdout
        print(f"{time.perf_counter() - started:6.1f} s  {command}")

    # What the README says train prints: where it runs, a line per epoch, and a last line with the accuracy it claims.
    trained = outputs[RUN[0]].splitlines()
    assert trained[0].startswith("backend numpy (") and len([x for x in trained if x.startswith("epoch ")]) == 10
    last = re.fullmatch(r"done: test accuracy (\d+\.\d+)% .* in runs/first", trained[-1])
    assert last and float(last.group(1)) >= 98.0, trained[-1]  # the README's 98.31%

    # What the README says train writes is there, and the chained commands used it.
    written = set(re.findall(r"`(\w+\.(?:npz|json|csv|png))`", _section("Train")))
    assert {"model.npz", "checkpoint.npz", "metrics.json", "curves.png"} <= written, written
    assert all((repo / "runs" / "first" / name).is_file() for name in written), sorted(written)
    assert (repo / "runs" / "seen.png").is_file() and (repo / "runs" / "digits.png").is_file()
    read = outputs["python -m backprop_xp predict runs/first my-digit.png --show runs/seen.png"]
    assert re.search(rf"my-digit\.png: {label} \(", read), read
    downloads = tmp_path / "cache" / "backprop_xp"
    assert not downloads.exists(), "a README command downloaded instead of reading ../shared/mnist"
