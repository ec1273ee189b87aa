"""train's and sweep's flags, one per setting of ``TrainConfig``, made from training/config.py's tables.

A flag's check is its setting's rule (``RULES``; a true/false rule makes a
switch) or its choices (``CHOICES``); its words are its ``FLAGS`` entry; a
setting in neither table is a folder to read from. A new setting is then
one field and its table entries in config.py, and no line here.

Every default here is None, so that a command can tell a flag the user gave
from one left alone (``--resume`` refuses changed settings); the real
defaults come from ``TrainConfig``.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Collection
from typing import Any

from ..checks import BOOLEAN
from ..training.config import CHOICES, FLAGS, RULES, TrainConfig
from .arguments import checked, choice_of, existing_dir, list_of


def add_setting_flags(p: argparse.ArgumentParser, defaults: TrainConfig, lists: Collection[str] = ()) -> None:
    """A flag for every setting, in ``FLAGS``'s order; the settings in ``lists`` take a comma-separated list."""
    for name in FLAGS:
        p.add_argument("--" + name.replace("_", "-"), **_flag(name, defaults, name in lists))


def _flag(name: str, defaults: TrainConfig, many: bool) -> dict[str, Any]:
    """``add_argument``'s keywords for the setting ``name``; its help shows its value in ``defaults``."""
    flag, default = FLAGS[name], getattr(defaults, name)
    words = {"default": f"{default:g}" if isinstance(default, float) else default, "each": flag.each if many else ""}
    if RULES.get(name) is BOOLEAN:
        return {"action": "store_true", "default": None, "help": flag.help.format(**words)}
    metavar = flag.metavar
    if name in CHOICES:
        parse = choice_of(CHOICES[name])
        metavar = "{" + ",".join(CHOICES[name]) + "}"
        words["choices"] = ", ".join(CHOICES[name])
    elif name in RULES:
        parse = checked(type(getattr(TrainConfig, name)), RULES[name])  # int or float, as its default
    else:
        parse = existing_dir
    return {"type": list_of(parse) if many else parse, "metavar": metavar, "help": flag.help.format(**words)}


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the user gave a flag for."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
