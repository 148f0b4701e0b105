"""Client tokens: a user id signed with REALTIME_SECRET and a timestamp (itsdangerous).

A client connects to the gateway with `auth: {token}`; the gateway accepts it only when the signature
holds and the token is younger than REALTIME_TOKEN_TTL, and the client then joins its user's room
alone. Whoever issues tokens (the application's login, `changeflow realtime token USER_ID`, the demo
sign-in) must hold the same secret.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from itsdangerous import BadData, SignatureExpired, TimestampSigner, URLSafeTimedSerializer

# Tokens signed for another purpose with the same secret do not pass here.
SALT = "changeflow.realtime.token"
# Longer ids are not user ids: refused rather than put in a room name.
MAX_USER_ID_LENGTH = 200


class InvalidToken(ValueError):
    """A token the gateway refuses; `reason` is missing, forged or expired (safe to tell the client)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"{reason} token")
        self.reason = reason


def _serializer(secret: str, issued_at: int | None = None) -> URLSafeTimedSerializer:
    signer: type[TimestampSigner] = TimestampSigner
    if issued_at is not None:
        at = issued_at

        class _IssuedAt(TimestampSigner):
            def get_timestamp(self) -> int:
                return at

        signer = _IssuedAt
    return URLSafeTimedSerializer(secret, salt=SALT, signer=signer)


def make_token(user_id: object, secret: str, *, issued_at: int | None = None) -> str:
    """A token for `user_id` (its string form: an ObjectId gives its 24 hex digits).

    `issued_at` (epoch seconds) backdates it, for tests of expiry; default now.
    """
    user = str(user_id)
    if not user or len(user) > MAX_USER_ID_LENGTH:
        raise ValueError(f"a user id must have 1 to {MAX_USER_ID_LENGTH} characters")
    return _serializer(secret, issued_at).dumps({"sub": user})


def read_token(token: object, secret: str, max_age: int) -> str:
    """The user id `token` was made for; InvalidToken when it is missing, forged or expired."""
    if not isinstance(token, str) or not token:
        raise InvalidToken("missing")
    try:
        data = _serializer(secret).loads(token, max_age=max_age)
    except SignatureExpired:
        raise InvalidToken("expired") from None
    except BadData:  # a bad signature, a bad timestamp, a payload that is not ours
        raise InvalidToken("forged") from None
    user = data.get("sub") if isinstance(data, dict) else None
    if not isinstance(user, str) or not user or len(user) > MAX_USER_ID_LENGTH:
        raise InvalidToken("forged")
    return user


def token_of(auth: Any) -> object:
    """The token in a Socket.IO connect's `auth` ({"token": ...}); None when there is none."""
    return auth.get("token") if isinstance(auth, Mapping) else None
