"""Conformance: handshake, framing, CRUD, bulk writes, indexes, collections, bad input.

Runs against mongo_double, or a real MongoDB 7.0 replica set when MONGODB_URI is set.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
import uuid

import bson
import pymongo
import pytest
from bson import ObjectId
from pymongo import ReturnDocument
from pymongo.database import Database
from pymongo.errors import BulkWriteError, DuplicateKeyError, OperationFailure
from pymongo.write_concern import WriteConcern

OP_REPLY, OP_QUERY, OP_MSG = 1, 2004, 2013


def _address(client: pymongo.MongoClient) -> tuple[str, int]:
    address = client.primary or client.address
    assert address is not None
    return address


# ---------------------------------------------------------------------------------------------
# Handshake


def test_replica_set_discovery(mongo_client: pymongo.MongoClient) -> None:
    hello = mongo_client.admin.command("hello")
    host, port = _address(mongo_client)
    assert hello["isWritablePrimary"] is True
    assert hello["setName"] == mongo_client.topology_description.replica_set_name
    assert f"{host}:{port}" in hello["hosts"]
    assert hello["primary"] == f"{host}:{port}"
    assert hello["maxWireVersion"] >= 21
    assert isinstance(hello["logicalSessionTimeoutMinutes"], int)
    assert mongo_client.topology_description.topology_type_name == "ReplicaSetWithPrimary"


def test_setname_is_rs0_on_the_double(mongo_client: pymongo.MongoClient, only_double: None) -> None:
    host, port = _address(mongo_client)
    hello = mongo_client.admin.command("hello")
    assert hello["setName"] == "rs0"
    assert hello["hosts"] == [f"{host}:{port}"]


def test_legacy_ismaster_reply_field(mongo_client: pymongo.MongoClient) -> None:
    assert mongo_client.admin.command("isMaster")["ismaster"] is True


def test_direct_connection(mongo_client: pymongo.MongoClient, mongodb_uri: str) -> None:
    host, port = _address(mongo_client)
    direct: pymongo.MongoClient = pymongo.MongoClient(
        host, port, directConnection=True, serverSelectionTimeoutMS=10_000
    )
    try:
        name = f"test_{uuid.uuid4().hex[:12]}"
        direct[name].c.insert_one({"_id": 1})
        assert direct[name].c.find_one() == {"_id": 1}
        assert direct.topology_description.topology_type_name == "Single"
        direct.drop_database(name)
    finally:
        direct.close()


def _raw_roundtrip(client: pymongo.MongoClient, message: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(_address(client), timeout=timeout) as sock:
        sock.sendall(message)
        header = _recv(sock, 16)
        (length,) = struct.unpack_from("<i", header)
        return header + _recv(sock, length - 16)


def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def test_legacy_op_query_handshake_gets_op_reply(mongo_client: pymongo.MongoClient) -> None:
    query = bson.encode({"isMaster": 1, "client": {"driver": {"name": "legacy", "version": "0"}}})
    body = struct.pack("<i", 0) + b"admin.$cmd\x00" + struct.pack("<ii", 0, -1) + query
    reply = _raw_roundtrip(mongo_client, struct.pack("<iiii", 16 + len(body), 4242, 0, OP_QUERY) + body)
    length, _request_id, response_to, op_code = struct.unpack_from("<iiii", reply)
    assert (length, response_to, op_code) == (len(reply), 4242, OP_REPLY)
    _flags, cursor_id, starting_from, number_returned = struct.unpack_from("<iqii", reply, 16)
    assert (cursor_id, starting_from, number_returned) == (0, 0, 1)
    doc = bson.decode(reply[36:])
    assert doc["ok"] == 1.0
    assert doc["ismaster"] is True
    assert doc["maxWireVersion"] >= 21


def _op_msg(doc: dict, request_id: int = 7, flags: int = 0, sequences: dict | None = None) -> bytes:
    body = struct.pack("<I", flags) + b"\x00" + bson.encode(doc)
    for ident, docs in (sequences or {}).items():
        payload = ident.encode() + b"\x00" + b"".join(bson.encode(d) for d in docs)
        body += b"\x01" + struct.pack("<i", 4 + len(payload)) + payload
    return struct.pack("<iiii", 16 + len(body), request_id, 0, OP_MSG) + body


def test_op_msg_kind1_document_sequence(mongo_client: pymongo.MongoClient, db: Database) -> None:
    message = _op_msg({"insert": "seq", "$db": db.name}, sequences={"documents": [{"_id": 1}, {"_id": 2}]})
    reply = _raw_roundtrip(mongo_client, message)
    _length, _rid, response_to, op_code = struct.unpack_from("<iiii", reply)
    assert (response_to, op_code) == (7, OP_MSG)
    assert struct.unpack_from("<I", reply, 16)[0] == 0 and reply[20] == 0
    assert bson.decode(reply[21:])["n"] == 2
    assert sorted(d["_id"] for d in db.seq.find()) == [1, 2]


def test_unacknowledged_write_more_to_come(db: Database) -> None:
    unacked = db.get_collection("w0", write_concern=WriteConcern(w=0))
    result = unacked.insert_one({"_id": "fire-and-forget"})
    assert result.acknowledged is False
    deadline = time.monotonic() + 10
    while db.w0.find_one({"_id": "fire-and-forget"}) is None:
        assert time.monotonic() < deadline, "w:0 insert never applied"
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------------
# CRUD


def test_insert_and_find_with_filter_projection_sort_skip_limit(db: Database) -> None:
    db.people.insert_many(
        [{"_id": i, "name": f"p{i}", "age": 20 + i % 5, "tags": ["a", "b"]} for i in range(10)]
    )
    docs = list(
        db.people.find({"age": {"$gte": 22}}, {"name": 1, "_id": 0}).sort("name", -1).skip(1).limit(3)
    )
    assert docs == [{"name": "p8"}, {"name": "p7"}, {"name": "p4"}]
    assert db.people.find_one({"_id": 3}, {"tags": 0}) == {"_id": 3, "name": "p3", "age": 23}


def test_find_batches_with_get_more(db: Database) -> None:
    db.many.insert_many([{"_id": i} for i in range(250)])
    cursor = db.many.find().sort("_id", 1).batch_size(7)
    assert [d["_id"] for d in cursor] == list(range(250))
    # Default first batch (101) then getMore for the rest.
    assert len(list(db.many.find())) == 250


def test_update_operators_upsert_and_array_filters(db: Database) -> None:
    db.u.insert_one({"_id": 1, "n": 1, "items": [{"sku": "a", "q": 1}, {"sku": "b", "q": 1}]})
    result = db.u.update_one({"_id": 1}, {"$inc": {"n": 2}, "$set": {"s": "x"}})
    assert (result.matched_count, result.modified_count) == (1, 1)
    db.u.update_one({"_id": 1, "items.sku": "b"}, {"$set": {"items.$.q": 5}})
    assert db.u.find_one({"_id": 1}) == {
        "_id": 1,
        "n": 3,
        "items": [{"sku": "a", "q": 1}, {"sku": "b", "q": 5}],
        "s": "x",
    }
    up = db.u.update_one({"_id": 2}, {"$setOnInsert": {"created": True}, "$inc": {"n": 1}}, upsert=True)
    assert up.upserted_id == 2 and up.matched_count == 0
    assert db.u.find_one({"_id": 2}) == {"_id": 2, "created": True, "n": 1}
    many = db.u.update_many({}, {"$set": {"all": 1}})
    assert (many.matched_count, many.modified_count) == (2, 2)
    noop = db.u.update_one({"_id": 1}, {"$set": {"all": 1}})
    assert (noop.matched_count, noop.modified_count) == (1, 0)
    replaced = db.u.replace_one({"_id": 2}, {"only": "this"})
    assert replaced.modified_count == 1 and db.u.find_one({"_id": 2}) == {"_id": 2, "only": "this"}


def test_array_filters(db: Database, real_mongodb: bool) -> None:
    db.u.insert_one({"_id": 1, "grades": [80, 95, 100]})
    try:
        db.u.update_one({"_id": 1}, {"$set": {"grades.$[g]": 0}}, array_filters=[{"g": {"$gte": 95}}])
    except pymongo.errors.WriteError as err:
        # mongomock has no arrayFilters: the double must say so, naming the feature.
        assert not real_mongodb and err.code == 115 and "Array filters" in str(err)
        return
    assert db.u.find_one({"_id": 1}) == {"_id": 1, "grades": [80, 0, 0]}


def test_delete(db: Database) -> None:
    db.d.insert_many([{"k": i % 2} for i in range(6)])
    assert db.d.delete_one({"k": 0}).deleted_count == 1
    assert db.d.delete_many({"k": 1}).deleted_count == 3
    assert db.d.count_documents({}) == 2


def test_find_and_modify(db: Database) -> None:
    db.f.insert_many([{"_id": 1, "v": 1}, {"_id": 2, "v": 2}])
    before = db.f.find_one_and_update({"v": {"$gte": 1}}, {"$inc": {"v": 10}}, sort=[("v", -1)])
    assert before == {"_id": 2, "v": 2}
    after = db.f.find_one_and_update({"_id": 1}, {"$set": {"w": 1}}, return_document=ReturnDocument.AFTER)
    assert after == {"_id": 1, "v": 1, "w": 1}
    upserted = db.f.find_one_and_update(
        {"_id": 3}, {"$set": {"v": 3}}, upsert=True, return_document=ReturnDocument.AFTER
    )
    assert upserted == {"_id": 3, "v": 3}
    assert db.f.find_one_and_delete({"_id": 1}) == {"_id": 1, "v": 1, "w": 1}
    assert db.f.find_one_and_replace({"_id": 3}, {"r": 1}, projection={"_id": 0}) == {"v": 3}
    assert db.f.find_one_and_delete({"_id": 99}) is None


def test_counts_distinct_and_aggregate(db: Database) -> None:
    db.a.insert_many([{"g": "x", "n": 1}, {"g": "x", "n": 2}, {"g": "y", "n": 3}])
    assert db.a.count_documents({"g": "x"}) == 2
    assert db.a.estimated_document_count() == 3
    assert db.command("count", "a", query={"n": {"$gt": 1}})["n"] == 2
    assert sorted(db.a.distinct("g")) == ["x", "y"]
    out = list(
        db.a.aggregate(
            [
                {"$match": {"n": {"$gte": 1}}},
                {"$group": {"_id": "$g", "total": {"$sum": "$n"}}},
                {"$sort": {"_id": 1}},
            ]
        )
    )
    assert out == [{"_id": "x", "total": 3}, {"_id": "y", "total": 3}]


def test_bulk_write_ordered_stops_at_first_error(db: Database) -> None:
    db.b.insert_one({"_id": 2})
    with pytest.raises(BulkWriteError) as info:
        db.b.insert_many([{"_id": 1}, {"_id": 2}, {"_id": 3}], ordered=True)
    details = info.value.details
    assert details["nInserted"] == 1
    assert [(e["index"], e["code"]) for e in details["writeErrors"]] == [(1, 11000)]
    assert sorted(d["_id"] for d in db.b.find()) == [1, 2]


def test_bulk_write_unordered_continues(db: Database) -> None:
    db.b.insert_one({"_id": 2})
    with pytest.raises(BulkWriteError) as info:
        db.b.bulk_write(
            [
                pymongo.InsertOne({"_id": 1}),
                pymongo.InsertOne({"_id": 2}),
                pymongo.InsertOne({"_id": 3}),
                pymongo.UpdateOne({"_id": 1}, {"$set": {"x": 1}}),
                pymongo.DeleteOne({"_id": 3}),
            ],
            ordered=False,
        )
    details = info.value.details
    assert (details["nInserted"], details["nModified"], details["nRemoved"]) == (2, 1, 1)
    assert [e["index"] for e in details["writeErrors"]] == [1]


# ---------------------------------------------------------------------------------------------
# Indexes and collections


def test_unique_index_enforced(db: Database) -> None:
    name = db.users.create_index("email", unique=True)
    db.users.insert_one({"email": "a@x"})
    with pytest.raises(DuplicateKeyError) as info:
        db.users.insert_one({"email": "a@x"})
    assert info.value.code == 11000
    db.users.insert_one({"email": "b@x"})
    with pytest.raises(DuplicateKeyError):
        db.users.update_one({"email": "b@x"}, {"$set": {"email": "a@x"}})
    with pytest.raises(DuplicateKeyError):
        db.users.find_one_and_update({"email": "b@x"}, {"$set": {"email": "a@x"}})
    indexes = {ix["name"]: ix for ix in db.users.list_indexes()}
    assert indexes[name]["unique"] is True and indexes[name]["key"] == {"email": 1}
    assert "_id_" in indexes
    db.users.drop_index(name)
    db.users.insert_one({"email": "a@x"})
    assert [ix["name"] for ix in db.users.list_indexes()] == ["_id_"]


def test_create_unique_index_on_duplicates_fails(db: Database) -> None:
    db.dups.insert_many([{"k": 1}, {"k": 1}])
    with pytest.raises(OperationFailure) as info:
        db.dups.create_index("k", unique=True)
    assert info.value.code == 11000


def test_create_drop_list_rename_collections(db: Database) -> None:
    db.create_collection("one")
    with pytest.raises(OperationFailure) as info:
        db.create_collection("one", check_exists=False)
    assert info.value.code == 48
    db.two.insert_one({"_id": 1})
    assert sorted(db.list_collection_names()) == ["one", "two"]
    assert [c["name"] for c in db.list_collections(filter={"name": "two"})] == ["two"]
    db.two.rename("three")
    assert sorted(db.list_collection_names()) == ["one", "three"]
    assert db.three.find_one() == {"_id": 1}
    with pytest.raises(OperationFailure) as info:
        db.one.rename("three")
    assert info.value.code == 48
    db.one.drop()
    db.missing.drop()  # dropping a collection that does not exist is fine
    assert db.list_collection_names() == ["three"]
    assert db.name in db.client.list_database_names()


def test_coll_mod_pre_and_post_images(db: Database) -> None:
    db.create_collection("img")
    db.command("collMod", "img", changeStreamPreAndPostImages={"enabled": True})
    (info,) = db.list_collections(filter={"name": "img"})
    assert info["options"]["changeStreamPreAndPostImages"] == {"enabled": True}
    with pytest.raises(OperationFailure) as err:
        db.command("collMod", "nope", changeStreamPreAndPostImages={"enabled": True})
    assert err.value.code == 26


# ---------------------------------------------------------------------------------------------
# Bad input


def test_unknown_command(db: Database) -> None:
    with pytest.raises(OperationFailure) as info:
        db.command("noSuchCommandHere")
    assert info.value.code == 59
    assert info.value.details["codeName"] == "CommandNotFound"


def test_unknown_stage_is_named(db: Database) -> None:
    db.s.insert_one({"x": 1})
    with pytest.raises(OperationFailure) as info:
        list(db.s.aggregate([{"$noSuchStage": {}}]))
    assert "$noSuchStage" in str(info.value)
    try:  # a valid stage the double may not implement: then the error must name it
        list(db.s.aggregate([{"$bucketAuto": {"groupBy": "$x", "buckets": 1}}]))
    except OperationFailure as err:
        assert "$bucketAuto" in str(err)


def test_unknown_query_operator_is_named(db: Database) -> None:
    db.s.insert_one({"x": 1})
    with pytest.raises(OperationFailure) as info:
        db.s.find_one({"x": {"$noSuchOp": 1}})
    assert "$noSuchOp" in str(info.value)


def test_unknown_update_operator_is_named(db: Database) -> None:
    db.s.insert_one({"_id": 1})
    with pytest.raises(OperationFailure) as info:
        db.s.update_one({"_id": 1}, {"$noSuchModifier": {"x": 1}})
    assert "$noSuchModifier" in str(info.value)


@pytest.mark.parametrize(
    "garbage",
    [
        struct.pack("<iiii", 5, 1, 0, OP_MSG),  # length smaller than a header
        struct.pack("<iiii", 26, 1, 0, OP_MSG) + b"\x00\x00\x00\x00\x00\xff\xff\xff\xff\x00",  # bad BSON size
        struct.pack("<iiii", 21, 1, 0, 9999) + b"\x00" * 5,  # unknown opcode
        struct.pack("<iiii", 2_000_000_000, 1, 0, OP_MSG),  # absurd length
        struct.pack("<iiii", 26, 1, 0, OP_MSG)
        + b"\x00\x00\x00\x00\x07"
        + b"\x05\x00\x00\x00\x00",  # section kind 7
    ],
)
def test_malformed_message_closes_only_that_connection(
    mongo_client: pymongo.MongoClient, garbage: bytes, only_double: None
) -> None:
    with socket.create_connection(_address(mongo_client), timeout=5) as sock:
        sock.sendall(garbage)
        with contextlib.suppress(ConnectionResetError):  # closed, possibly with unread input: a reset
            assert sock.recv(1) == b""
    assert mongo_client.admin.command("ping")["ok"] == 1.0


def test_every_reply_has_cluster_and_operation_time(db: Database) -> None:
    reply = db.command("ping")
    assert isinstance(reply["operationTime"], bson.Timestamp)
    assert isinstance(reply["$clusterTime"]["clusterTime"], bson.Timestamp)
    first = reply["operationTime"]
    db.t.insert_one({"_id": ObjectId()})
    assert db.command("ping")["operationTime"] > first


@pytest.mark.parametrize("mechanism", [None, "SCRAM-SHA-1", "SCRAM-SHA-256"])
def test_credentials_of_an_unknown_user_fail_with_authentication_failed(
    mongodb_uri: str, mechanism: str | None
) -> None:
    # mongod answers any mechanism's first step for a user it does not know with code 18 (and never
    # says which part was wrong); the test server has no users, so it always answers so.
    options = {"authMechanism": mechanism} if mechanism else {}
    client: pymongo.MongoClient = pymongo.MongoClient(
        mongodb_uri,
        username=f"nobody-{uuid.uuid4().hex[:8]}",
        password="wrong",
        serverSelectionTimeoutMS=10_000,
        **options,
    )
    try:
        with pytest.raises(OperationFailure) as raised:
            client.admin.command("ping")
    finally:
        client.close()
    assert raised.value.code == 18
    assert raised.value.details is not None
    assert raised.value.details["codeName"] == "AuthenticationFailed"
    assert raised.value.details["errmsg"] == "Authentication failed."


def test_sorting_by_a_timestamp_follows_mongodbs_order(db: Database) -> None:
    # Timestamps by (time, inc); in a mixed field after dates, before regular expressions.
    from datetime import datetime

    from bson import Timestamp
    from bson.regex import Regex

    values = [Timestamp(9, 1), Regex("^a"), Timestamp(8, 5), datetime(2026, 1, 1), Timestamp(9, 0), 3]
    db.ts.insert_many([{"_id": i, "v": v} for i, v in enumerate(values)])
    assert [d["_id"] for d in db.ts.find().sort("v", 1)] == [5, 3, 2, 4, 0, 1]
    assert [d["_id"] for d in db.ts.find({"v": {"$gt": Timestamp(8, 5)}}).sort("v", -1)] == [0, 4]
