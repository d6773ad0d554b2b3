"""``python -m testbed``: the command line (``scripts/k8s-testbed`` runs this)."""

import sys

from testbed.cli import main

sys.exit(main())
