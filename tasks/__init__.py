"""changeflow's own side effects, one module per domain, declared on the app of tasks/app.py.

A task is one function decorated with `@app.on(collection, operation_types, ...)`, taking the change
event: the route lives beside it. Importing this package creates nothing; tasks/app.py does.
"""
