"""Registry tokens: random, shown once, stored only as a SHA-256 digest (a token has 256 bits
of entropy, so a fast hash is enough and lookups stay cheap)."""

from __future__ import annotations

import hashlib
import hmac
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


RUNTIME_SECRET_PREFIX = "pcs_"


def runtime_secret_for(secret: str, workspace_id: str) -> str:
    """The secret the controller shows one workspace's runtime (HMAC-SHA256 of the workspace
    id under the controller's secret): each runtime can check calls with its own, and a
    runtime that leaks it cannot pass for the controller with any other runtime."""
    mac = hmac.new(secret.encode("utf-8"), workspace_id.encode("utf-8"), hashlib.sha256)
    return RUNTIME_SECRET_PREFIX + mac.hexdigest()
