"""Every rule a setting must follow, declared once: the library, ``TrainConfig`` and the command line all check with these.

A rule is what a value must be (said the same way in every error message) and
the test of it. ``check`` raises ``error`` (ValueError by default) naming the
setting as its caller calls it: ``learning rate``, ``lr`` or ``--lr``.

>>> check("hidden", 0, AT_LEAST_1)
Traceback (most recent call last):
...
ValueError: hidden must be an integer >= 1, got 0
>>> check_choice("activation", "gelu", ("relu", "tanh"))
Traceback (most recent call last):
...
ValueError: unknown activation 'gelu': choose one of relu, tanh
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np


class Rule(NamedTuple):
    requirement: str  # what the value must be, as the error messages say it
    ok: Callable[[Any], bool]


def _integer(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer))


def _number(value: Any) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, (int, float, np.integer, np.floating))
        and math.isfinite(value)
    )


AT_LEAST_1 = Rule("an integer >= 1", lambda v: _integer(v) and v >= 1)
AT_LEAST_0 = Rule("an integer >= 0", lambda v: _integer(v) and v >= 0)
POSITIVE = Rule("a finite number > 0", lambda v: _number(v) and v > 0)
NON_NEGATIVE = Rule("a finite number >= 0", lambda v: _number(v) and v >= 0)
FRACTION = Rule("in [0, 1)", lambda v: _number(v) and 0 <= v < 1)  # momentum, Adam's betas
POSITIVE_FRACTION = Rule("in (0, 1)", lambda v: _number(v) and 0 < v < 1)  # Nesterov's momentum
BOOLEAN = Rule("true or false", lambda v: isinstance(v, bool))


def check(name: str, value: Any, rule: Rule, error: type[Exception] = ValueError) -> Any:
    """``value`` if it follows ``rule``, else ``error("<name> must be <requirement>, got <value>")``."""
    if not rule.ok(value):
        raise error(f"{name} must be {rule.requirement}, got {value!r}")
    return value


def check_choice(name: str, value: Any, allowed: Sequence[str], error: type[Exception] = ValueError) -> Any:
    """``value`` if it is one of ``allowed``, else ``error("unknown <name> <value>: choose one of ...")``."""
    if value not in allowed:
        raise error(f"unknown {name} {value!r}: choose one of {', '.join(allowed)}")
    return value
