"""Registry tokens: random, shown once, stored only as a SHA-256 digest (a token has 256 bits
of entropy, so a fast hash is enough and lookups stay cheap)."""

from __future__ import annotations

import hashlib
import secrets

PREFIX = "plc_"


def generate() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


FINGERPRINT_LENGTH = 12


def fingerprint(token_hash: str) -> str:
    """How a stored token is named to people (`pluginctl token list`): the start of its
    hash. It reveals nothing of the token."""
    return token_hash[:FINGERPRINT_LENGTH]
