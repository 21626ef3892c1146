"""Wire shapes of the registry API (what runtimes send pluginctl), validated strictly:
wrong types, missing fields and unknown fields are errors, never silently dropped."""

from __future__ import annotations

import re
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

#: Characters no URL may hold (models.SOURCE_PATTERN's class; see there): the C0 and C1
#: controls, DEL, space, every other Unicode space and the BOM. Only `\xHH` and `\uHHHH`
#: escapes: Python's `re`, pydantic's Rust engine and ECMA-262 read them alike.
_UNSAFE = r"\x00-\x20\x7f-\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
_H16 = "[0-9A-Fa-f]{1,4}"
_OCTET = "(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_LS32 = rf"({_H16}:{_H16}|{_OCTET}(\.{_OCTET}){{3}})"


def _groups_then(most: int) -> str:
    """RFC 3986's `[ *most( h16 ":" ) h16 ]`."""
    return f"(({_H16}:){{0,{most}}}{_H16})?"


#: An IPv6 literal as RFC 3986 spells it (what urlsplit accepts between brackets; `[317]`
#: is not one).
_IPV6 = "(" + "|".join([
    f"({_H16}:){{6}}{_LS32}", f"::({_H16}:){{5}}{_LS32}",
    f"{_groups_then(0)}::({_H16}:){{4}}{_LS32}", f"{_groups_then(1)}::({_H16}:){{3}}{_LS32}",
    f"{_groups_then(2)}::({_H16}:){{2}}{_LS32}", f"{_groups_then(3)}::{_H16}:{_LS32}",
    f"{_groups_then(4)}::{_LS32}", f"{_groups_then(5)}::{_H16}", f"{_groups_then(6)}::",
]) + ")"
_PORT = ("(0*(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}"
         "|[0-9]{1,4}))?")
#: An http(s) URL with a host, an optional port in range, an optional path, and no
#: credentials, query or fragment: what `_runtime_url` accepts, in a form the OpenAPI
#: document can carry (so that a client validating against it agrees with the server).
RUNTIME_URL_PATTERN = (
    r"^[Hh][Tt][Tt][Pp][Ss]?://"
    rf"([A-Za-z0-9._~!$&'()*+,;=%-]+|\[{_IPV6}\])"
    f"(:{_PORT})?"
    rf"(/[^?#{_UNSAFE}]*)?$"
)

WorkspaceId = Annotated[str, StringConstraints(pattern=WORKSPACE_ID_PATTERN)]
PluginName = Annotated[str, StringConstraints(pattern=PLUGIN_NAME_PATTERN)]
Source = Annotated[str, StringConstraints(max_length=MAX_SOURCE_LENGTH,
                                          pattern=SOURCE_PATTERN)]
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
    # JSON Schema cannot say "unique by name"; `uniqueItems` at least tells a client that
    # the same entry twice is refused, and the description says the rest.
    pydantic.Field(max_length=MAX_PLUGINS, json_schema_extra={
        "uniqueItems": True,
        "description": "What the runtime has installed; each plugin name at most once "
                       "(422 otherwise)."}),
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
    if _RUNTIME_URL.fullmatch(url) is None:  # what is left: stray characters, a bare `?`
        raise ValueError("must be scheme://host[:port][/path] with no spaces, control "
                         "characters, query or fragment")
    return url


_RUNTIME_URL = re.compile(RUNTIME_URL_PATTERN)

RuntimeUrl = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_URL_LENGTH),
    # Checked by `_runtime_url` (after the checks with plainer messages); the document
    # carries it so that a client validating against it agrees with the server.
    pydantic.Field(json_schema_extra={"pattern": RUNTIME_URL_PATTERN}),
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


def _integral(value: object) -> object:
    """JSON has numbers, not integers and floats: `3.0` is the integer 3 to JSON Schema (and
    to the OpenAPI document), so the server takes it as 3 too. Anything else is left to the
    strict int check (`3.5`, `"3"`, `true` stay errors)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


#: An optional counter a runtime increases with every call it makes; a call with a lower
#: one than the stored report's never overwrites it (replayed or late heartbeats).
Seq = Annotated[int, pydantic.Field(ge=0, le=2**63 - 1), pydantic.BeforeValidator(_integral)]


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
