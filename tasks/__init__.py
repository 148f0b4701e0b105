"""changeflow's side effects, one module per domain, each task registered as `tasks.<function>`.

A task is one function decorated with `worker.task`, taking the change event; the event-to-task
mapping (the route) lives in listener/routes.py.
"""
