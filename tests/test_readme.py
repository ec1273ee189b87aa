"""The README's commands work as written on a fresh machine."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def _section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, f"README has no section {title!r}"
    return match.group(1)


def test_the_test_section_installs_what_the_tests_need():
    # `pip install -e .` alone gives "No module named pytest": the section must carry its own install line.
    commands = re.findall(r"```bash\n(.*?)```", _section("Run the tests"), re.S)[0].splitlines()
    install = [c for c in commands if c.startswith("pip install")]
    assert install and "pytest" in commands[-1], commands
    extra = re.search(r"\.\[(\w+)\]", install[0]).group(1)
    assert commands.index(install[0]) < len(commands) - 1  # installed before it is run
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][extra]
    assert any(req.startswith("pytest") for req in dev), dev
