"""Backoff arithmetic for failed actions: exponential, capped, jittered. Pure."""

from __future__ import annotations

from datetime import datetime, timedelta

from controller.domain.models import Attempt, Policy


def delay(failures: int, policy: Policy, rand: float) -> timedelta:
    """The wait after the `failures`-th consecutive failure: base doubling up to the cap, then
    shortened by up to `policy.backoff_jitter` of itself (`rand` in [0, 1)) so that workspaces
    that failed together do not retry together."""
    exponent = min(max(failures, 1) - 1, 32)
    full: timedelta = min(policy.backoff_cap, policy.backoff_base * (2**exponent))
    return full * (1.0 - policy.backoff_jitter * rand)


def after_failure(
    previous: Attempt | None, error: str, now: datetime, *, policy: Policy, rand: float
) -> Attempt:
    failures = (previous.failures if previous else 0) + 1
    return Attempt(
        failures=failures,
        last_error=error,
        last_attempt_at=now,
        next_retry_at=now + delay(failures, policy, rand),
    )


def is_due(attempt: Attempt | None, now: datetime, policy: Policy) -> bool:
    """True when an action may be tried now. A retry time further away than the cap can only
    come from a clock that jumped back; it is treated as due rather than waited out."""
    if attempt is None:
        return True
    return attempt.next_retry_at <= now or attempt.next_retry_at - now > policy.backoff_cap
