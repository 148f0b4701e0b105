"""The fault-injection suite (issue 4): `python -m tests.faults` prints the table; `pytest -m faults` asserts.

See docs/faults.md for what each scenario does, what it expects and how "time to recover" is measured.
"""
