"""Fixtures that start real servers on free ports.

MongoDB-facing tests run against the MongoDB wire-protocol test server (mongo_double) unless
MONGODB_URI names a real server (a replica set: change streams need one). Against a real server each
test works in a database of its own, named test_<random>, and drops only that database.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pymongo
import pytest
from pymongo.database import Database

from harness.redis_server import RedisServer


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server on a free port; tests may stop() and restart() it."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def mongodb_uri() -> Iterator[str]:
    """MONGODB_URI when set (a real MongoDB replica set), else a MongoDB test server of our own."""
    uri = os.environ.get("MONGODB_URI")
    if uri:
        yield uri
        return
    from changeflow.testing.mongo_double import MongoDouble

    with MongoDouble(port=0) as server:
        yield server.uri


@pytest.fixture(scope="session")
def real_mongodb() -> bool:
    """True when the tests run against a real MongoDB (MONGODB_URI set), not the test server."""
    return bool(os.environ.get("MONGODB_URI"))


@pytest.fixture(scope="session")
def mongo_client(mongodb_uri: str) -> Iterator[pymongo.MongoClient]:
    client: pymongo.MongoClient = pymongo.MongoClient(mongodb_uri, serverSelectionTimeoutMS=10_000)
    yield client
    client.close()


@pytest.fixture
def db(mongo_client: pymongo.MongoClient) -> Iterator[Database]:
    """A database of this test's own, dropped afterwards."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    yield mongo_client[name]
    mongo_client.drop_database(name)
