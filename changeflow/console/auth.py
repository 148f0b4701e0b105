"""HTTP basic auth for the console: parsing the header and comparing in constant time."""

from __future__ import annotations

import base64
import binascii
import hmac

REALM = "changeflow console"


def credentials(header: str | None) -> tuple[str, str] | None:
    """(user, password) of an `Authorization: Basic ...` header, or None when absent or malformed."""
    if not header:
        return None
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic" or not encoded.strip():
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, colon, password = decoded.partition(":")
    return (user, password) if colon else None


def authorized(header: str | None, user: str, password: str) -> bool:
    """Whether the header names `user` with `password`; both compared in constant time, always both."""
    given = credentials(header)
    if given is None:
        return False
    user_ok = hmac.compare_digest(given[0].encode(), user.encode())
    password_ok = hmac.compare_digest(given[1].encode(), password.encode())
    return user_ok and password_ok


def challenge() -> dict[str, str]:
    """The header of a 401 reply: the browser asks for the user and password."""
    return {"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'}
