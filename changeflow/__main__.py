"""`python -m changeflow ...`: the `changeflow` command (changeflow/cli.py)."""

import sys

from changeflow.cli import main

sys.exit(main())
