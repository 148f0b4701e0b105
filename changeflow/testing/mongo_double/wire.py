"""Framing: parse OP_MSG / OP_QUERY requests and encode OP_MSG / OP_REPLY replies.

Only what drivers send is accepted; anything else raises MalformedMessage, and the connection that
sent it is closed (a peer that breaks the framing cannot be resynchronised).
"""

from __future__ import annotations

import socket
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import bson
from bson.codec_options import CodecOptions

OP_REPLY = 1
OP_QUERY = 2004
OP_MSG = 2013
OP_COMPRESSED = 2012

# Compressors this server accepts (OP_COMPRESSED ids), in the names drivers negotiate in hello.
# snappy (1) and zstd (3) need libraries the server does not depend on; a driver offering them too
# falls back to zlib, or to no compression.
ZLIB = 2
COMPRESSORS = {"zlib": ZLIB}

MORE_TO_COME = 1 << 1
CHECKSUM_PRESENT = 1 << 0
EXHAUST_ALLOWED = 1 << 16
# Bits a client may set; any other required bit (0-15) is an error per the OP_MSG spec.
_KNOWN_FLAGS = CHECKSUM_PRESENT | MORE_TO_COME | EXHAUST_ALLOWED

MAX_MESSAGE_SIZE = 48_000_000
_HEADER = struct.Struct("<iiii")

# tz_aware=False keeps datetimes naive UTC, as mongomock stores them.
CODEC = CodecOptions(tz_aware=False)


class MalformedMessage(Exception):
    """The bytes on the wire are not a message this server understands."""


@dataclass
class Request:
    request_id: int
    op_code: int
    command: dict[str, Any]
    more_to_come: bool = False
    # OP_QUERY only: the namespace it addressed (e.g. "admin.$cmd").
    legacy_ns: str | None = None
    # The compressor id of an OP_COMPRESSED request; the reply is compressed with it too, as mongod does.
    compressor: int | None = None


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_request(sock: socket.socket) -> Request:
    header = _recv_exact(sock, 16)
    length, request_id, _response_to, op_code = _HEADER.unpack(header)
    if length < 16 or length > MAX_MESSAGE_SIZE:
        raise MalformedMessage(f"invalid message length {length}")
    body = _recv_exact(sock, length - 16)
    compressor = None
    if op_code == OP_COMPRESSED:
        op_code, body, compressor = _decompress(body)
        if op_code == OP_COMPRESSED:
            raise MalformedMessage("OP_COMPRESSED inside OP_COMPRESSED")
    request = _parse(request_id, op_code, body)
    request.compressor = compressor
    return request


def _parse(request_id: int, op_code: int, body: bytes) -> Request:
    if op_code == OP_MSG:
        return _parse_op_msg(request_id, body)
    if op_code == OP_QUERY:
        return _parse_op_query(request_id, body)
    raise MalformedMessage(f"unsupported opCode {op_code}")


def _decompress(body: bytes) -> tuple[int, bytes, int]:
    """An OP_COMPRESSED body: (originalOpcode, the original message's body, compressorId)."""
    if len(body) < 9:
        raise MalformedMessage("OP_COMPRESSED too short")
    original, size, compressor = struct.unpack_from("<iiB", body, 0)
    if compressor != ZLIB:
        raise MalformedMessage(f"unsupported compressor id {compressor} (this server negotiates zlib only)")
    if size < 0 or size > MAX_MESSAGE_SIZE:
        raise MalformedMessage(f"invalid uncompressedSize {size}")
    try:
        inflater = zlib.decompressobj()
        data = inflater.decompress(body[9:], size + 1)
    except zlib.error as exc:
        raise MalformedMessage(f"invalid zlib data: {exc}") from exc
    if len(data) != size or not inflater.eof:
        raise MalformedMessage(f"OP_COMPRESSED: {len(data)} bytes uncompressed, uncompressedSize says {size}")
    return original, data, compressor


def _decode_doc(data: bytes, offset: int) -> tuple[dict[str, Any], int]:
    if offset + 4 > len(data):
        raise MalformedMessage("truncated BSON document")
    (size,) = struct.unpack_from("<i", data, offset)
    if size < 5 or offset + size > len(data):
        raise MalformedMessage(f"invalid BSON document size {size}")
    try:
        doc = bson.decode(data[offset : offset + size], codec_options=CODEC)
    except Exception as exc:  # bson raises several types for bad input
        raise MalformedMessage(f"invalid BSON: {exc}") from exc
    return doc, offset + size


def _cstring(data: bytes, offset: int, end: int) -> tuple[str, int]:
    nul = data.find(b"\x00", offset, end)
    if nul < 0:
        raise MalformedMessage("unterminated cstring")
    try:
        return data[offset:nul].decode(), nul + 1
    except UnicodeDecodeError as exc:
        raise MalformedMessage("cstring is not UTF-8") from exc


def _parse_op_msg(request_id: int, body: bytes) -> Request:
    if len(body) < 5:
        raise MalformedMessage("OP_MSG too short")
    (flags,) = struct.unpack_from("<I", body, 0)
    if flags & 0xFFFF & ~_KNOWN_FLAGS:
        raise MalformedMessage(f"unknown required OP_MSG flag bits {flags:#x}")
    end = len(body) - (4 if flags & CHECKSUM_PRESENT else 0)
    offset = 4
    command: dict[str, Any] | None = None
    sequences: dict[str, list[dict[str, Any]]] = {}
    while offset < end:
        kind = body[offset]
        offset += 1
        if kind == 0:
            if command is not None:
                raise MalformedMessage("OP_MSG has more than one kind-0 section")
            command, offset = _decode_doc(body, offset)
        elif kind == 1:
            if offset + 4 > end:
                raise MalformedMessage("truncated kind-1 section")
            (size,) = struct.unpack_from("<i", body, offset)
            section_end = offset + size
            if size < 5 or section_end > end:
                raise MalformedMessage(f"invalid kind-1 section size {size}")
            ident, pos = _cstring(body, offset + 4, section_end)
            docs = []
            while pos < section_end:
                doc, pos = _decode_doc(body, pos)
                docs.append(doc)
            if pos != section_end:
                raise MalformedMessage("kind-1 section overruns its size")
            sequences.setdefault(ident, []).extend(docs)
            offset = section_end
        else:
            raise MalformedMessage(f"unknown OP_MSG section kind {kind}")
    if offset != end:
        raise MalformedMessage("OP_MSG sections overrun the message")
    if command is None:
        raise MalformedMessage("OP_MSG without a kind-0 section")
    if not command:
        raise MalformedMessage("empty command document")
    for ident, docs in sequences.items():
        if ident in command:
            raise MalformedMessage(f"field {ident!r} given both in the body and as a document sequence")
        command[ident] = docs
    return Request(request_id, OP_MSG, command, more_to_come=bool(flags & MORE_TO_COME))


def _parse_op_query(request_id: int, body: bytes) -> Request:
    if len(body) < 4:
        raise MalformedMessage("OP_QUERY too short")
    ns, offset = _cstring(body, 4, len(body))
    offset += 8  # numberToSkip, numberToReturn
    query, offset = _decode_doc(body, offset)
    if not ns.endswith(".$cmd"):
        raise MalformedMessage(f"OP_QUERY on {ns!r}: only commands on <db>.$cmd are supported")
    # Legacy drivers may wrap the command: {$query: {...}, $readPreference: ...}.
    if "$query" in query:
        query = dict(query["$query"])
    if not query:
        raise MalformedMessage("empty command document")
    query.setdefault("$db", ns[: -len(".$cmd")])
    return Request(request_id, OP_QUERY, query, legacy_ns=ns)


def encode_op_msg(
    response_to: int, request_id: int, doc: dict[str, Any], compressor: int | None = None
) -> bytes:
    payload = b"\x00" + bson.encode(doc, codec_options=CODEC)
    body = struct.pack("<I", 0) + payload
    if compressor == ZLIB:
        packed = struct.pack("<iiB", OP_MSG, len(body), ZLIB) + zlib.compress(body)
        return _HEADER.pack(16 + len(packed), request_id, response_to, OP_COMPRESSED) + packed
    return _HEADER.pack(16 + len(body), request_id, response_to, OP_MSG) + body


def encode_op_reply(response_to: int, request_id: int, doc: dict[str, Any]) -> bytes:
    # responseFlags (AwaitCapable = 8), cursorID 0, startingFrom 0, numberReturned 1.
    body = struct.pack("<iqii", 8, 0, 0, 1) + bson.encode(doc, codec_options=CODEC)
    return _HEADER.pack(16 + len(body), request_id, response_to, OP_REPLY) + body
