"""Wire compression (OP_COMPRESSED) as MongoDB 7.0 negotiates it; the test server offers zlib.

Found through the Node.js driver's `compressors` option: the server ignored the offer, so a client
configured for compression silently talked uncompressed, unlike against mongod.
"""

from __future__ import annotations

import socket
import struct
import zlib

import bson
import pymongo
import pytest
from pymongo.database import Database

OP_MSG, OP_COMPRESSED, ZLIB = 2013, 2012, 2


def _address(client: pymongo.MongoClient) -> tuple[str, int]:
    address = client.primary or client.address
    assert address is not None
    return address


def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def _roundtrip(client: pymongo.MongoClient, message: bytes) -> bytes:
    with socket.create_connection(_address(client), timeout=5.0) as sock:
        sock.sendall(message)
        header = _recv(sock, 16)
        return header + _recv(sock, struct.unpack_from("<i", header)[0] - 16)


def _compressed_op_msg(doc: dict, request_id: int, compressor: int = ZLIB) -> bytes:
    body = struct.pack("<I", 0) + b"\x00" + bson.encode(doc)
    packed = struct.pack("<iiB", OP_MSG, len(body), compressor) + zlib.compress(body)
    return struct.pack("<iiii", 16 + len(packed), request_id, 0, OP_COMPRESSED) + packed


def test_hello_answers_the_shared_compressors(mongo_client: pymongo.MongoClient) -> None:
    reply = mongo_client.admin.command("hello", compression=["lz4-none", "zlib"])
    assert reply["compression"] == ["zlib"]
    assert "compression" not in mongo_client.admin.command("hello")


def test_compressed_request_gets_a_compressed_reply(mongo_client: pymongo.MongoClient, db: Database) -> None:
    doc = {"insert": "z", "documents": [{"_id": 1, "text": "z" * 100_000}], "$db": db.name}
    reply = _roundtrip(mongo_client, _compressed_op_msg(doc, request_id=91))
    length, _rid, response_to, op_code = struct.unpack_from("<iiii", reply)
    assert (length, response_to, op_code) == (len(reply), 91, OP_COMPRESSED)
    original, size, compressor = struct.unpack_from("<iiB", reply, 16)
    assert (original, compressor) == (OP_MSG, ZLIB)
    body = zlib.decompress(reply[25:])
    assert len(body) == size
    assert bson.decode(body[5:])["n"] == 1
    assert db.z.find_one()["text"] == "z" * 100_000


def test_pymongo_with_zlib_compression(mongodb_uri: str, db: Database) -> None:
    client: pymongo.MongoClient = pymongo.MongoClient(
        mongodb_uri, compressors="zlib", serverSelectionTimeoutMS=10_000
    )
    try:
        coll = client[db.name].big
        coll.insert_many([{"_id": i, "text": "x" * 200_000} for i in range(5)])
        assert [d["_id"] for d in coll.find({}, batch_size=2)] == list(range(5))
        with client.start_session() as session:
            session.with_transaction(lambda s: coll.insert_one({"_id": "t"}, session=s))
        assert coll.count_documents({}) == 6
    finally:
        client.close()


def test_unknown_compressor_closes_only_that_connection(
    mongo_client: pymongo.MongoClient, only_double: None
) -> None:
    with pytest.raises(ConnectionError):
        _roundtrip(mongo_client, _compressed_op_msg({"ping": 1, "$db": "admin"}, 92, compressor=9))
    assert mongo_client.admin.command("ping")["ok"] == 1.0
