"""``python -m backprop_xp.speed ENGINE ...``: one engine's worker process (started by the ``bench`` command)."""

import sys

from .worker import main

sys.exit(main())
