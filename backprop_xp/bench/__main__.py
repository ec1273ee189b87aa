"""``python -m backprop_xp.bench ENGINE ...``: one engine's worker process (started by the ``bench`` command)."""

import sys

from .worker import main

sys.exit(main())
