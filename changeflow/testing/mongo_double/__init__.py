"""mongo_double: a MongoDB wire-protocol test server (test and demo infrastructure, never a database).

from changeflow.testing.mongo_double import MongoDouble
with MongoDouble(port=0) as server:
    client = pymongo.MongoClient(server.uri)
"""

from changeflow.testing.mongo_double.server import MongoDouble

__all__ = ["MongoDouble"]
