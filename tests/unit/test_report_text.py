"""Reports read as JSON text: parsed once per distinct text, yet every caller gets a dict
of its own; SQL NULL and JSON null both mean "no report"."""

from __future__ import annotations

import json

from controller.domain.models import Plugin
from controller.store.queries.rows import report_from_json, report_from_text, report_to_json

PLUGINS = [Plugin("notes", "https://example.com/notes.git", "sha256:" + "a" * 64),
           Plugin("seo", "https://example.com/seo.git", modified=True)]


def test_text_reads_as_the_json_does() -> None:
    text = json.dumps(report_to_json(PLUGINS))
    assert report_from_text(text) == report_from_json(report_to_json(PLUGINS))
    assert report_from_text(text) == {p.name: p for p in PLUGINS}


def test_no_report_is_none_whether_sql_null_or_json_null() -> None:
    assert report_from_text(None) is None
    assert report_from_text("null") is None
    assert report_from_text("[]") == {}


def test_each_caller_gets_its_own_dict_over_shared_plugins() -> None:
    text = json.dumps(report_to_json(PLUGINS))
    first, second = report_from_text(text), report_from_text(text)
    assert first is not None and second is not None
    assert first is not second
    assert first["notes"] is second["notes"]  # parsed once, shared (Plugin is frozen)
    del first["notes"]
    assert set(second) == {"notes", "seo"}
    assert set(report_from_text(text) or {}) == {"notes", "seo"}
