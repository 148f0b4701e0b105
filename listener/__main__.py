"""`python -m listener ...`: changeflow's listener CLI (changeflow/listener/__main__.py), in the checkout."""

import sys

from changeflow.listener.__main__ import main

sys.exit(main())
