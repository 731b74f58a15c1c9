"""``python -m ecf8``: the ecf8 command line (see ecf8/cli.py)."""

import sys

from .cli import main

sys.exit(main())
