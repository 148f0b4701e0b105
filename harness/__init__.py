"""Local, real processes for tests, the quickstart demo, benchmarks and the fault suite.

Nothing here is used in production: it starts redis-server on a free port, the MongoDB test server,
an SMTP sink, and changeflow's own listener and worker processes.
"""
