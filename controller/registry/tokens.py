"""Issuing registry tokens: the secrets go to the caller, to be shown once; the store keeps
only their digests. Apart from the registry server, so that `pluginctl token create` starts
without it."""

from __future__ import annotations

from collections.abc import Sequence

from controller.domain import tokens
from controller.domain.models import utcnow
from controller.store import Sessions, queries, transaction


def issue_tokens(sessions: Sessions, workspace_ids: Sequence[str], *, issuer: str = "cli"
                 ) -> list[str]:
    """One new token for each workspace (created if not known yet), all in one transaction;
    returns the secrets in the order of `workspace_ids`, once they are committed."""
    secrets = [tokens.generate() for _ in workspace_ids]
    with transaction(sessions) as session:
        queries.add_tokens(session, [(workspace_id, tokens.digest(secret)) for
                                     workspace_id, secret in zip(workspace_ids, secrets,
                                                                 strict=True)],
                           now=utcnow(), issuer=issuer)
    return secrets


def issue_token(sessions: Sessions, workspace_id: str, issuer: str = "cli") -> str:
    """Create a registry token for a workspace; the caller shows it once."""
    return issue_tokens(sessions, [workspace_id], issuer=issuer)[0]
