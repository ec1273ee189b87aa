"""``python -m backprop_xp``: the command line (see ``cli.py``)."""

from .cli import main

raise SystemExit(main())
