"""Fixtures for the conformance suite: fail points and double-only tests.

The suite talks to the server only through pymongo (and raw sockets for framing tests), so it runs
unchanged against a real MongoDB 7.0 replica set when MONGODB_URI is set.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pymongo
import pytest
from pymongo.errors import OperationFailure

from tests.mongo_double.helpers import FailPoint


@pytest.fixture(scope="session")
def test_commands(mongo_client: pymongo.MongoClient) -> bool:
    """Whether configureFailPoint exists (a real mongod needs --setParameter enableTestCommands=1)."""
    try:
        mongo_client.admin.command("configureFailPoint", "failCommand", mode="off")
    except OperationFailure:
        return False
    return True


@pytest.fixture
def fail_point(mongo_client: pymongo.MongoClient, test_commands: bool) -> Iterator[FailPoint]:
    """configure(name="failCommand", mode=..., data=...) and switch every used fail point off afterwards."""
    if not test_commands:
        pytest.skip("the server has no configureFailPoint (start mongod with enableTestCommands=1)")
    used: set[str] = set()

    def configure(mode: Any, data: dict[str, Any] | None = None, name: str = "failCommand") -> dict[str, Any]:
        used.add(name)
        return mongo_client.admin.command({"configureFailPoint": name, "mode": mode, "data": data or {}})

    yield configure
    for name in used:
        mongo_client.admin.command({"configureFailPoint": name, "mode": "off"})


@pytest.fixture
def only_double(real_mongodb: bool) -> None:
    if real_mongodb:
        pytest.skip("specific to the MongoDB test server (mongo_double)")
