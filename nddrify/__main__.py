"""``python -m nddrify`` runs the command line (see :mod:`nddrify.cli`)."""

import sys

from .cli import main

sys.exit(main())
