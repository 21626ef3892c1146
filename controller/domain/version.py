"""Which build this is: the package version (from the installed distribution's metadata) and
the Python that runs it, as `pluginctl --version`, the User-Agent of the calls to runtimes,
`/healthz` and the build-info metric all show it."""

from __future__ import annotations

import platform
from functools import cache
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as distribution_version

DISTRIBUTION = "pluginctl"
#: What a checkout that was never installed calls itself (PEP 440: a local version of 0).
UNKNOWN = "0+unknown"


@cache
def version() -> str:
    """The installed package's version, e.g. `0.1.0`."""
    try:
        return distribution_version(DISTRIBUTION)
    except PackageNotFoundError:
        return UNKNOWN


def python_version() -> str:
    """The running interpreter's version, e.g. `3.11.7`."""
    return platform.python_version()


def version_line() -> str:
    """What `pluginctl --version` prints: `pluginctl 0.1.0 (Python 3.11.7)`."""
    return f"{DISTRIBUTION} {version()} (Python {python_version()})"


def user_agent(caller: str | None = None) -> str:
    """The User-Agent of the controller's calls (RFC 9110 product and comment):
    `pluginctl/0.1.0`, or `pluginctl/0.1.0 (replica-a)` naming the replica that calls."""
    product = f"{DISTRIBUTION}/{version()}"
    if not caller:
        return product
    comment = "".join(c if c.isascii() and c.isprintable() and c not in "()\\" else "_"
                      for c in caller)
    return f"{product} ({comment})"


def caller_of(agent: str) -> str | None:
    """The caller named by a `user_agent(caller)`; None if it names none or is not ours."""
    product, _, comment = agent.partition(" ")
    if not product.startswith(f"{DISTRIBUTION}/") or not (
            comment.startswith("(") and comment.endswith(")")):
        return None
    return comment[1:-1] or None
