"""``python -m backprop_xp``: the command line (see ``cli/``)."""

from .cli import main

raise SystemExit(main())
