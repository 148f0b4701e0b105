"""The operator console (`changeflow console -A APP`): server-rendered pages on the stream, dead letters.

    /                       the stream: active listener, checkpoint position and age, gaps, queue headroom
    /dead-letters           dead letters, filtered by task and reason; replay (with refresh) and purge
    /dead-letters/{id}      one letter: its event, error and traceback

Everything behind HTTP basic auth (CONSOLE_USER, CONSOLE_PASSWORD; auth.py); state changes are POSTs
with a CSRF token and an Origin check (csrf.py). The pages call the code behind `changeflow health`,
`gaps` and `dead-letters` (status.py, changeflow/listener/dead_letters.py): one implementation each.
"""
