"""Test support for teams testing their own effects: the MongoDB wire-protocol test server.

`python -m changeflow.testing.mongo_double --port 0` (install `changeflow[testing]`); see
docs/mongo_double.md. Test and demo infrastructure only, never a database.
"""
