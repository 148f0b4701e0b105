"""`python -m realtime ...`: the realtime gateway CLI (changeflow/realtime/__main__.py), in the checkout."""

import sys

from changeflow.realtime.__main__ import main

sys.exit(main())
