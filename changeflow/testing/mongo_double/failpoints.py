"""Fail points: configureFailPoint with failCommand and failGetMoreAfterCursorCheckout.

Semantics follow mongod's test-commands fail points, so a fault test written against this server
also runs against a real mongod started with enableTestCommands.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from changeflow.testing.mongo_double.errors import MongoError

SUPPORTED = ("failCommand", "failGetMoreAfterCursorCheckout")


@dataclass
class FailPoint:
    name: str
    mode: str = "off"  # off, alwaysOn, times, skip
    remaining: int = 0  # times: fires left; skip: calls to let through first
    data: dict[str, Any] = field(default_factory=dict)
    fired: int = 0


class FailPoints:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._points = {name: FailPoint(name) for name in SUPPORTED}

    def configure(self, cmd: dict[str, Any]) -> dict[str, Any]:
        name = cmd.get("configureFailPoint")
        if name not in self._points:
            raise MongoError(
                2, f"Cannot find failpoint '{name}' (the MongoDB test server knows {list(SUPPORTED)})"
            )
        mode = cmd.get("mode")
        data = cmd.get("data") or {}
        if not isinstance(data, dict):
            raise MongoError(14, "'data' must be an object")
        with self._lock:
            point = self._points[name]
            count = point.fired
            if mode == "off":
                point.mode, point.remaining = "off", 0
            elif mode == "alwaysOn":
                point.mode = "alwaysOn"
            elif isinstance(mode, dict) and "times" in mode:
                point.mode, point.remaining = "times", int(mode["times"])
                if point.remaining <= 0:
                    point.mode = "off"
            elif isinstance(mode, dict) and "skip" in mode:
                point.mode, point.remaining = "skip", int(mode["skip"])
            else:
                raise MongoError(2, f"invalid fail point mode: {mode!r}")
            point.data = dict(data)
            point.fired = 0
        return {"count": count}

    def check(
        self, name: str, command: str, app_name: str | None, ns_db: str, ns_coll: str | None
    ) -> dict[str, Any] | None:
        """The fail point's data if it fires for this command, else None (and nothing is consumed)."""
        with self._lock:
            point = self._points[name]
            if point.mode == "off":
                return None
            data = point.data
            if name == "failCommand" and command not in (data.get("failCommands") or []):
                return None
            if "appName" in data and data["appName"] != app_name:
                return None
            namespace = data.get("namespace")
            if namespace and namespace != (f"{ns_db}.{ns_coll}" if ns_coll else ns_db):
                return None
            if point.mode == "skip":
                if point.remaining > 0:
                    point.remaining -= 1
                    return None
            elif point.mode == "times":
                point.remaining -= 1
                if point.remaining <= 0:
                    point.mode = "off"
            point.fired += 1
            return dict(data)
