"""The operator's resync is pure where it matters: the watch's view corrected by the last
LIST, so that a lost watch event (an ADD, a MODIFY or a DELETE) is repaired."""

from __future__ import annotations

from typing import Any

from controller.kube.operator import merge_listed


def obj(name: str, version: str | None, generation: int = 1) -> dict[str, Any]:
    metadata: dict[str, Any] = {"namespace": "ns", "name": name, "generation": generation}
    if version is not None:
        metadata["resourceVersion"] = version
    return {"metadata": metadata}


def names(objects: list[dict[str, Any]]) -> dict[str, int]:
    return {o["metadata"]["name"]: o["metadata"]["generation"] for o in objects}


def test_the_newer_copy_wins() -> None:
    watched = [obj("a", "10", 1), obj("b", "30", 3)]
    listed = [obj("a", "20", 2), obj("b", "25", 2)]
    assert names(merge_listed(watched, listed, "25", {})) == {"a": 2, "b": 3}


def test_a_lost_add_is_repaired_unless_the_watch_saw_it_deleted_since() -> None:
    listed = [obj("lost-add", "15"), obj("deleted-since", "16")]
    assert names(merge_listed([], listed, "20", {("ns", "deleted-since"): 22})) == {
        "lost-add": 1}


def test_a_lost_delete_is_repaired_but_a_newer_object_stays() -> None:
    watched = [obj("lost-delete", "12"), obj("created-since", "31")]
    assert names(merge_listed(watched, [], "30", {})) == {"created-since": 1}


def test_versions_that_are_not_numbers_leave_the_watch_in_charge() -> None:
    watched = [obj("a", "x", 5), obj("b", None, 1)]
    listed = [obj("a", "y", 4)]
    assert names(merge_listed(watched, listed, "z", {})) == {"a": 5, "b": 1}
