"""Wire shapes of the registry API (what runtimes send pluginctl), validated strictly:
wrong types, missing fields and unknown fields are errors, never silently dropped."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlsplit

import pydantic
from pydantic import StringConstraints

from controller.domain.models import (
    MAX_DIGEST_LENGTH,
    MAX_SOURCE_LENGTH,
    PLUGIN_NAME_PATTERN,
    SOURCE_PATTERN,
    WORKSPACE_ID_PATTERN,
    Plugin,
)

WorkspaceId = Annotated[str, StringConstraints(pattern=WORKSPACE_ID_PATTERN)]
PluginName = Annotated[str, StringConstraints(pattern=PLUGIN_NAME_PATTERN)]
Source = Annotated[str, StringConstraints(max_length=MAX_SOURCE_LENGTH, pattern=SOURCE_PATTERN)]
Digest = Annotated[str, StringConstraints(min_length=1, max_length=MAX_DIGEST_LENGTH)]
MAX_URL_LENGTH = 2048
MAX_PLUGINS = 500


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", strict=True, frozen=True)


class PluginReport(_Strict):
    name: PluginName
    source: Source
    digest: Digest | None = None
    #: What is on disk is not what was installed (edited by hand, or incomplete): the loop
    #: installs it again.
    modified: bool = False

    def to_plugin(self) -> Plugin:
        return Plugin(self.name, self.source, self.digest, self.modified)


def _unique(plugins: list[PluginReport]) -> list[PluginReport]:
    seen: set[str] = set()
    for plugin in plugins:
        if plugin.name in seen:
            raise ValueError(f"plugin {plugin.name!r} is reported twice")
        seen.add(plugin.name)
    return plugins


Report = Annotated[
    list[PluginReport],
    pydantic.Field(max_length=MAX_PLUGINS),
    pydantic.AfterValidator(_unique),
]


def _runtime_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError("must be an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError("must name a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry credentials")
    if parts.query or parts.fragment:
        raise ValueError("must not carry a query or fragment")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as error:
        raise ValueError(f"has a bad port: {error}") from error
    return url


RuntimeUrl = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_URL_LENGTH),
    pydantic.AfterValidator(_runtime_url),
]


def _with_report(error: str | None, info: pydantic.ValidationInfo) -> str | None:
    if error is not None and info.data.get("plugins") is None:
        raise ValueError("is part of a report: send it with plugins")
    return error


#: The runtime's own trouble (a restart command that failed), one line; part of the report.
RuntimeTrouble = Annotated[
    str, StringConstraints(min_length=1, max_length=1000, pattern=r"^[^\x00-\x1f\x7f]*$"),
]

#: An optional counter a runtime increases with every call it makes; a call with a lower
#: one than the stored report's never overwrites it (replayed or late heartbeats).
Seq = Annotated[int, pydantic.Field(ge=0, le=2**63 - 1)]


class RegisterRequest(_Strict):
    workspace_id: WorkspaceId
    url: RuntimeUrl
    plugins: Report | None = None
    seq: Seq | None = None
    error: RuntimeTrouble | None = None

    _error_with_report = pydantic.field_validator("error")(_with_report)

    def report(self) -> list[Plugin] | None:
        return None if self.plugins is None else [p.to_plugin() for p in self.plugins]


class HeartbeatRequest(_Strict):
    workspace_id: WorkspaceId
    plugins: Report | None = None
    seq: Seq | None = None
    error: RuntimeTrouble | None = None

    _error_with_report = pydantic.field_validator("error")(_with_report)

    def report(self) -> list[Plugin] | None:
        return None if self.plugins is None else [p.to_plugin() for p in self.plugins]


def describe_errors(error: pydantic.ValidationError) -> str:
    """One line naming every bad field, e.g. `plugins[0].source: Field required`."""
    parts = []
    for item in error.errors():
        location = ""
        for part in item["loc"]:
            location += f"[{part}]" if isinstance(part, int) else (f".{part}" if location else part)
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        parts.append(f"{location or 'body'}: {message}")
    return "; ".join(parts)
