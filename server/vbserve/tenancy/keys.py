"""API keys: how they look, how they are stored, how they are checked.

A key is `vbs.<key_id>.<secret>`: `key_id` (12 hex digits) finds the stored record in one
lookup, `secret` (256 random bits) proves possession. Only HMAC-SHA256(pepper, key) is
stored, and it is compared in constant time. A slow password hash (bcrypt, scrypt) buys
nothing here: it protects low-entropy passwords from offline guessing, and a 256-bit
random secret cannot be guessed; it would only add milliseconds to every request. The
pepper (`VBSERVE_KEY_PEPPER`) lives in the servers' environment, not in the database, so
a leaked database alone does not even let one test a candidate key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

PREFIX = "vbs"
_KEY = re.compile(rf"{PREFIX}\.([0-9a-f]{{12}})\.([A-Za-z0-9_-]{{43}})")
# Used when no pepper is configured: hashes stay unguessable (the secret is random), they
# are only testable offline by whoever holds the database.
DEFAULT_PEPPER = b"vbserve-api-key-v1"


def new_key() -> tuple[str, str]:
    """A fresh (key_id, key). The key is shown to its owner once and never stored."""
    key_id = secrets.token_hex(6)
    return key_id, f"{PREFIX}.{key_id}.{secrets.token_urlsafe(32)}"


def key_id_of(key: str) -> str | None:
    """The key id of a well-formed key, else None (nothing to look up)."""
    match = _KEY.fullmatch(key)
    return match.group(1) if match else None


def hash_key(key: str, pepper: bytes) -> str:
    return hmac.new(pepper, key.encode(), hashlib.sha256).hexdigest()


def key_matches(key: str, stored_hash: str, pepper: bytes) -> bool:
    return hmac.compare_digest(hash_key(key, pepper), stored_hash)


def secret_matches(given: str, expected: str) -> bool:
    """Constant-time comparison of a presented secret with a configured one (the admin key)."""
    return hmac.compare_digest(given.encode(), expected.encode())
