"""This deployment's realtime gateway: `python -m realtime` (changeflow/realtime/, from the checkout)."""
