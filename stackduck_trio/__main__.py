"""``python -m stackduck_trio`` is ``stackduck-trio``."""

from __future__ import annotations

import sys

from ._cli import main

sys.exit(main())
