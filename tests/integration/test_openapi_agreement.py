"""The registry's OpenAPI document and the running server agree on what is a valid call: each
payload is validated against the document with `jsonschema` (ECMA-262-free patterns: the
same classes to every engine) and POSTed to a real registry on loopback; the document says
valid exactly when the server answers 200 (issue 15, finding 5)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from jsonschema import Draft202012Validator

from controller.registry import openapi
from tests.support.helpers import Registry

GOOD_URL = "http://127.0.0.1:8080"
SOURCE = "gitea://org/repo/agent-skills/seo-all#v1"


def plugin(name: str = "seo-all", source: str = SOURCE) -> dict[str, str]:
    return {"name": name, "source": source}


def validator(model: str) -> Draft202012Validator:
    document = json.loads(openapi.PATH.read_text())
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema",
              "$ref": f"#/components/schemas/{model}", "components": document["components"]}
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


REGISTERS: list[tuple[str, dict[str, Any]]] = [
    ("a good register", {"url": GOOD_URL}),
    ("an upper-case scheme and a path", {"url": "HTTPS://runtime-7.ns.svc:443/agent"}),
    ("an IPv6 runtime", {"url": "http://[::1]:8080"}),
    ("url 0", {"url": "0"}),
    ("an ftp url", {"url": "ftp://127.0.0.1/"}),
    ("no host", {"url": "http://:8080"}),
    ("a port out of range", {"url": "http://127.0.0.1:65536"}),
    ("credentials", {"url": "http://user:pw@127.0.0.1:8080"}),
    ("an empty query", {"url": "http://127.0.0.1:8080/?"}),
    ("a fragment", {"url": "http://127.0.0.1:8080/#x"}),
    ("a newline in the path", {"url": "http://127.0.0.1:8080/a\nb"}),
    ("a space in the host", {"url": "http://127.0 .0.1/"}),
    ("a plugin reported twice", {"url": GOOD_URL, "plugins": [plugin(), plugin()]}),
    ("seq 3.0", {"url": GOOD_URL, "seq": 3.0}),
    ("seq 3.5", {"url": GOOD_URL, "seq": 3.5}),
    ("seq '3'", {"url": GOOD_URL, "seq": "3"}),
    ("seq true", {"url": GOOD_URL, "seq": True}),
    ("seq 1e2", {"url": GOOD_URL, "seq": 1e2}),
    ("seq 2**63", {"url": GOOD_URL, "seq": 2**63}),
    *[(f"a source with U+{ord(c):04X}", {"url": GOOD_URL, "plugins": [plugin(
        source=f"gitea://org/repo/seo{c}all#v1")]})
      for c in ("\x85", "\ufeff", "\x1c", "\x1f", "\x00", " ", "\xa0", "\u2028", "\u3000",
                "\x7f", "\x9f")],
    ("a ref with U+FEFF", {"url": GOOD_URL, "plugins": [plugin(source=SOURCE + "\ufeff")]}),
    ("a non-ASCII letter in a source", {"url": GOOD_URL, "plugins": [plugin(
        source="gitea://org/repo/séo#v1")]}),
]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, Any], token: str
               ) -> tuple[int, Any]:
    async with http.post(url, data=json.dumps(body), headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {token}"}) as answer:
        return answer.status, await answer.json(content_type=None)


async def test_the_document_and_the_server_agree_on_registers(
    registry: Registry, http: aiohttp.ClientSession
) -> None:
    schema = validator("RegisterRequest")
    token = registry.token("ws-1")
    disagree = []
    for case, fields in REGISTERS:
        body = {"workspace_id": "ws-1", **fields}
        valid = schema.is_valid(body)
        status, answer = await post(http, registry.url + "/registry/register", body, token)
        assert status in (200, 422), (case, status, answer)
        if valid != (status == 200):
            disagree.append(f"{case}: document says {'valid' if valid else 'invalid'}, "
                            f"server {status} {answer}")
    assert disagree == []


async def test_the_document_and_the_server_agree_on_heartbeats(
    registry: Registry, http: aiohttp.ClientSession
) -> None:
    schema = validator("HeartbeatRequest")
    token = registry.token("ws-1")
    status, _ = await post(http, registry.url + "/registry/register",
                           {"workspace_id": "ws-1", "url": GOOD_URL}, token)
    assert status == 200
    disagree = []
    for case, fields in REGISTERS:
        body = {"workspace_id": "ws-1", **{k: v for k, v in fields.items() if k != "url"}}
        valid = schema.is_valid(body)
        status, answer = await post(http, registry.url + "/registry/heartbeat", body, token)
        assert status in (200, 422), (case, status, answer)
        if valid != (status == 200):
            disagree.append(f"{case}: document says {'valid' if valid else 'invalid'}, "
                            f"server {status} {answer}")
    assert disagree == []


def test_the_document_lists_the_timeout_answer_on_every_operation() -> None:
    document = json.loads(openapi.PATH.read_text())
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            answer = operation["responses"].get("408")
            assert answer is not None, f"{method.upper()} {path} lacks 408"
            assert answer["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/Error"}
