"""Store operations, by concern. Each takes the session first, may flush, never commits (the
caller owns the transaction) and returns plain domain values, never ORM objects. Callers use
`queries.<operation>`; the modules below say which concern an operation belongs to."""

from controller.store.queries.claims import claim, claim_of, release
from controller.store.queries.observed import load_observed, mark_synced, online_digests
from controller.store.queries.prune import Pruned, forget_workspaces, prune
from controller.store.queries.records import apply_many
from controller.store.queries.reports import (
    CLOCK_SKEW,
    Register,
    record_changed_report,
    record_register,
    record_registers,
    set_dormant,
    stored_report_digests,
    touch,
)
from controller.store.queries.rollouts import (
    forget_let_through,
    installed_since,
    load_let_through,
    load_rollouts,
    rollout_health_inputs,
    save_let_through,
    save_rollout,
    save_rollouts,
)
from controller.store.queries.seeding import naive_read, seed_fleet
from controller.store.queries.tokens import (
    REVOKED_TOKEN_RETENTION,
    active_tokens,
    add_token,
    add_tokens,
    all_active_tokens,
    forget_revoked_tokens,
    revoke_tokens,
    revoked_since,
    token_workspace,
    tokens_of,
    with_live_tokens,
)

__all__ = [
    "CLOCK_SKEW",
    "REVOKED_TOKEN_RETENTION",
    "Pruned",
    "Register",
    "active_tokens",
    "add_token",
    "add_tokens",
    "all_active_tokens",
    "apply_many",
    "claim",
    "claim_of",
    "forget_let_through",
    "forget_revoked_tokens",
    "forget_workspaces",
    "installed_since",
    "load_let_through",
    "load_observed",
    "load_rollouts",
    "mark_synced",
    "naive_read",
    "online_digests",
    "prune",
    "record_changed_report",
    "record_register",
    "record_registers",
    "release",
    "revoke_tokens",
    "revoked_since",
    "rollout_health_inputs",
    "save_let_through",
    "save_rollout",
    "save_rollouts",
    "seed_fleet",
    "set_dormant",
    "stored_report_digests",
    "token_workspace",
    "tokens_of",
    "touch",
    "with_live_tokens",
]
