"""``python -m embkern.bench`` is ``python -m embkern bench``."""

import sys

from .runner import main

sys.exit(main())
