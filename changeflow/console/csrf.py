"""CSRF protection for the console's POSTs: a per-session token in a signed cookie, sent back in the form.

A browser session gets a random token in a cookie signed with the console's key (itsdangerous): a
page's forms carry the same token in a hidden field. A POST passes only when the cookie's signature
holds, the field equals the cookie's token (constant time), and the Origin header, when the browser
sends one, is the console's own origin. Another site can make the browser send the cookie, but can
neither read it nor forge a signed one.
"""

from __future__ import annotations

import hmac
import secrets

from itsdangerous import BadSignature, URLSafeSerializer

COOKIE = "changeflow_console_csrf"
FIELD = "csrf_token"
_SALT = "changeflow-console-csrf"


class CsrfTokens:
    def __init__(self, key: str | bytes) -> None:
        self._serializer = URLSafeSerializer(key, salt=_SALT)

    def new(self) -> tuple[str, str]:
        """(token for the forms, cookie value)."""
        token = secrets.token_urlsafe(32)
        return token, self._serializer.dumps(token)

    def token_of(self, cookie: str | None) -> str | None:
        """The token a cookie carries, or None when it is missing or its signature is wrong."""
        if not cookie:
            return None
        try:
            token = self._serializer.loads(cookie)
        except BadSignature:
            return None
        return token if isinstance(token, str) and token else None

    def valid(self, cookie: str | None, submitted: str | None) -> bool:
        token = self.token_of(cookie)
        if token is None or not submitted:
            return False
        return hmac.compare_digest(token.encode(), submitted.encode())


def same_origin(origin: str | None, scheme: str, host: str | None) -> bool:
    """Whether a request's Origin (if any) is the console itself (`scheme://host` as the browser sent it).

    No Origin: a browser always sends one with a cross-site form POST, so its absence is a
    same-origin request or a non-browser client (which cannot carry the victim's cookies anyway).
    """
    if origin is None:
        return True
    if not host:
        return False
    return origin.rstrip("/").lower() == f"{scheme}://{host}".lower()
