"""MongoDB's hashed-index function (`$toHashedIndexKey`, hashed shard keys), bit for bit.

mongod (src/mongo/db/hasher.cpp, BSONElementHasher::hash64 with seed 0) feeds MD5 with the seed
(int32 LE), then the value as a BSON element named "": its canonical type (int32 LE), then the
value's bytes, where every number (int, long, double, decimal) becomes an int64 LE first (truncated,
NaN 0, clamped), so 1, 1.0, 1.9 and Decimal128("1") hash alike; documents and arrays recurse over
their elements, field names included, ending with the EOO element. The result is the digest's first
8 bytes as a little-endian int64. MongoDB's own check: {check: 42} hashes to -944302157085130861.
"""

from __future__ import annotations

import decimal
import hashlib
import math
import struct
from typing import Any

import bson
from bson import Decimal128, Int64

HASH_SEED = 0
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_TWO_63 = 2.0**63
# mongod's canonical type per BSON element type byte (bsontypes.h canonicalizeBSONType).
_CANONICAL = {
    0x00: 0,  # EOO (a missing value)
    0x06: 0,  # undefined
    0xFF: -1,  # MinKey
    0x7F: 127,  # MaxKey
    0x0A: 5,  # null
    0x01: 10,  # double
    0x10: 10,  # int32
    0x12: 10,  # int64
    0x13: 10,  # decimal128
    0x02: 15,  # string
    0x0E: 15,  # symbol
    0x03: 20,  # object
    0x04: 25,  # array
    0x05: 30,  # binary
    0x07: 35,  # ObjectId
    0x08: 40,  # bool
    0x09: 45,  # date
    0x11: 47,  # timestamp
    0x0B: 50,  # regex
    0x0C: 55,  # DBPointer
    0x0D: 60,  # code
    0x0F: 65,  # code with scope
}
MISSING: Any = object()  # hash of a missing value (mongod hashes an EOO element)


def to_hashed_index_key(value: Any) -> Int64:
    """What `{$toHashedIndexKey: value}` evaluates to on mongod (missing: pass MISSING)."""
    md5 = hashlib.md5(struct.pack("<i", HASH_SEED))
    if value is MISSING:
        md5.update(struct.pack("<i", 0))
    else:
        raw = bson.encode({"": value})
        _hash_element(md5, raw, 4, include_name=False)
    return Int64(struct.unpack("<q", md5.digest()[:8])[0])


def _hash_element(md5: Any, raw: bytes, at: int, include_name: bool) -> int:
    """Hash the element at `at` of an encoded document; returns where the next element starts."""
    kind = raw[at]
    name_end = raw.index(b"\x00", at + 1)
    md5.update(struct.pack("<i", _CANONICAL[kind]))
    if include_name:
        md5.update(raw[at + 1 : name_end + 1])  # the name and its terminating NUL
    start = name_end + 1
    end = start + _value_size(kind, raw, start)
    if kind in (0x03, 0x04):
        inner = start + 4
        while raw[inner] != 0:
            inner = _hash_element(md5, raw, inner, include_name=True)
        md5.update(struct.pack("<i", 0))  # the EOO element: its type only (no name, no value)
    elif kind == 0x0F:
        code_len = struct.unpack_from("<i", raw, start + 4)[0]
        md5.update(raw[start + 8 : start + 8 + code_len])
        scope = start + 8 + code_len
        inner = scope + 4
        while raw[inner] != 0:
            inner = _hash_element(md5, raw, inner, include_name=True)
        md5.update(struct.pack("<i", 0))
    elif _CANONICAL[kind] == 10:
        md5.update(struct.pack("<q", _number_as_long(_number_at(kind, raw, start))))
    else:
        md5.update(raw[start:end])
    return end


def _value_size(kind: int, raw: bytes, start: int) -> int:
    fixed = {0x01: 8, 0x07: 12, 0x08: 1, 0x09: 8, 0x0A: 0, 0x06: 0, 0x10: 4, 0x11: 8, 0x12: 8, 0x13: 16}
    if kind in fixed:
        return fixed[kind]
    if kind in (0xFF, 0x7F):
        return 0
    if kind in (0x02, 0x0D, 0x0E):
        return 4 + struct.unpack_from("<i", raw, start)[0]
    if kind in (0x03, 0x04, 0x0F):
        return struct.unpack_from("<i", raw, start)[0]
    if kind == 0x05:
        return 5 + struct.unpack_from("<i", raw, start)[0]
    if kind == 0x0B:
        pattern_end = raw.index(b"\x00", start)
        return raw.index(b"\x00", pattern_end + 1) + 1 - start
    if kind == 0x0C:
        return 4 + struct.unpack_from("<i", raw, start)[0] + 12
    raise ValueError(f"unknown BSON type 0x{kind:02X}")


def _number_at(kind: int, raw: bytes, start: int) -> Any:
    if kind == 0x01:
        return struct.unpack_from("<d", raw, start)[0]
    if kind == 0x10:
        return struct.unpack_from("<i", raw, start)[0]
    if kind == 0x12:
        return struct.unpack_from("<q", raw, start)[0]
    return Decimal128.from_bid(raw[start : start + 16])


def _number_as_long(value: Any) -> int:
    """mongod's BSONElement::safeNumberLongForHash."""
    if isinstance(value, float):
        if math.isnan(value):
            return 0
        if value == _TWO_63:
            return _INT64_MIN  # kept from older servers, where the cast of 2^63 wrapped around
        if value >= _TWO_63:
            return _INT64_MAX
        if value < -_TWO_63:
            return _INT64_MIN
        return int(value)  # truncates toward zero, as the C++ cast
    if isinstance(value, Decimal128):
        number = value.to_decimal()
        if number.is_nan():
            return 0
        if number > _INT64_MAX:
            return _INT64_MAX
        if number < _INT64_MIN:
            return _INT64_MIN
        # BSONElement::numberLong on a decimal: Decimal128::toLong, rounding half to even.
        return int(number.to_integral_value(rounding=decimal.ROUND_HALF_EVEN))
    return int(value)
