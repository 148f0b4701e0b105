"""This deployment's listener: `python -m listener [SUBCOMMAND] ...` runs changeflow's listener CLI.

The listener itself is `changeflow.listener` (installed with changeflow); without `-A` it runs this
repository's app (tasks/app.py, through `worker.app`). This folder is the checkout's, not installed.
"""
