"""Real-time notifications over WebSockets (Socket.IO), fed by changeflow tasks.

    task (worker) --emit--> Redis pub/sub channel REALTIME_CHANNEL --> gateway(s) --> browser / app

`emitter.py`: the tasks' side, python-socketio's write-only Redis manager. `server.py`: the gateway,
a python-socketio AsyncServer on uvicorn subscribed to the same channel, so any number of gateways
serve clients. `tokens.py`: the signed tokens clients connect with. `messages.py`: room names and
payloads. `__main__.py`: `changeflow realtime` / `python -m realtime`. Importing configures nothing.
"""
