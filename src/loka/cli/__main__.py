"""``python -m loka.cli``."""

import sys

from . import main

sys.exit(main())
