"""The dedup key: one stable id per (event, task), used as the Celery task id and the idempotency key."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from typing import Any

# Fixed forever: changing it changes every key, so events already processed would run again.
# (It is uuid5(NAMESPACE_DNS, "changeflow.dedup"), written out so nobody "fixes" the derivation.)
CHANGEFLOW_NAMESPACE = uuid.UUID("e91306e0-cb63-5d4e-9e08-d9bc87584537")

# uuid5 is sha1(namespace bytes + name), its first 16 bytes with the version and variant bits set.
# The listener makes one key per message: hashing from a copy of the namespace's sha1 state and
# formatting the hex digest directly costs a quarter of uuid.uuid5 + str (no UUID object, no int).
_NAMESPACE_SHA1 = hashlib.sha1(CHANGEFLOW_NAMESPACE.bytes)
# The variant's hex digit (the 17th): its two high bits become 10 (RFC 4122), 0-f -> 8, 9, a, b.
_VARIANT_DIGIT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def dedup_key(resume_token: Mapping[str, Any], task_name: str) -> str:
    """str(uuid5(CHANGEFLOW_NAMESPACE, task_name + "\\n" + resume_token["_data"])).

    `resume_token` is the change event's `_id`. Its `_data` string is unique per event within a
    deployment, and the task name keeps one event's several tasks apart.
    """
    # type() first: the isinstance check against the Mapping ABC is slow, and tokens are plain dicts.
    is_mapping = type(resume_token) is dict or isinstance(resume_token, Mapping)
    data = resume_token.get("_data") if is_mapping else None
    if not isinstance(data, str) or not data:
        raise ValueError(
            f"malformed resume token {resume_token!r}: expected a mapping with a non-empty '_data' string"
        )
    if not task_name:
        raise ValueError("task_name must not be empty")
    sha1 = _NAMESPACE_SHA1.copy()
    sha1.update((task_name + "\n" + data).encode("utf-8"))
    h = sha1.hexdigest()
    # 8-4-4-4-12 hex digits of the first 16 bytes; version 5 in the 13th digit, the variant in the 17th.
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT_DIGIT[h[16]]}{h[17:20]}-{h[20:32]}"
