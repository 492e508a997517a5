"""``python -m netforge`` runs the command line."""

import sys

from netforge.cli.main import main

sys.exit(main())
