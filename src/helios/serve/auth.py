"""Who is asking: the access token (when the server has one) and the client id that owns jobs.

Client ids are issued by the server and signed with a per-process secret, so a client cannot pick
another client's id by guessing a short name; a missing or forged id just gets a fresh one.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Mapping
from urllib.parse import urlsplit

from helios.serve.limits import token_matches
from helios.serve.protocol import CLIENT_COOKIE, CLIENT_HEADER, TOKEN_COOKIE, TOKEN_HEADER


class ClientIds:
    def __init__(self, secret: bytes | None = None):
        self._secret = secret or secrets.token_bytes(32)

    def _sign(self, raw: str) -> str:
        return hmac.new(self._secret, raw.encode(), hashlib.sha256).hexdigest()[:32]

    def issue(self) -> str:
        raw = secrets.token_urlsafe(18)
        return f"{raw}.{self._sign(raw)}"

    def valid(self, value: str | None) -> bool:
        if not value or value.count(".") != 1 or len(value) > 128:
            return False
        raw, sig = value.split(".")
        return hmac.compare_digest(sig, self._sign(raw))

    def resolve(self, headers: Mapping[str, str], cookies: Mapping[str, str]) -> tuple[str, bool]:
        """(client id, whether it is new). The header wins over the cookie (scripts vs. the page)."""
        for value in (headers.get(CLIENT_HEADER), cookies.get(CLIENT_COOKIE)):
            if self.valid(value):
                return value, False
        return self.issue(), True


def given_token(headers: Mapping[str, str], cookies: Mapping[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return headers.get(TOKEN_HEADER) or cookies.get(TOKEN_COOKIE)


def authorized(headers: Mapping[str, str], cookies: Mapping[str, str], token: str | None) -> bool:
    return token_matches(given_token(headers, cookies), token)


def same_origin(headers: Mapping[str, str]) -> bool:
    """A browser's WebSocket carries cookies cross-site; refuse pages from another origin (scripts send none)."""
    origin = headers.get("origin")
    if not origin or origin == "null":
        return origin is None
    return urlsplit(origin).netloc.lower() == headers.get("host", "").lower()
