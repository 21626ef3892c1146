"""What the operator keeps of each watched object (`kube.operator._indexed`): a plain copy
without managedFields, whose keys and strings are shared with every other object's. kopf
parses each watch event on its own, so without that 10,000 Workspaces hold 10,000 copies of
each key and of each value they have in common."""

from __future__ import annotations

import json
from typing import Any

from controller.kube.operator import _indexed


def _event(name: str) -> dict[str, Any]:
    """One Workspace as a watch event brings it: parsed from its own text."""
    return json.loads(json.dumps({
        "apiVersion": "pluginctl.dev/v1alpha1", "kind": "Workspace",
        "metadata": {"name": name, "namespace": "team-a", "resourceVersion": "7",
                     "managedFields": [{"manager": "pluginctl", "operation": "Update"}]},
        "spec": {"templateRef": {"name": "base"}},
        "status": {"phase": "Online", "pluginsReady": "1/1", "plugins": [
            {"name": "seo-all", "source": "gitea://org/repo/seo-all#v1", "state": "Installed"}]},
    }))


def test_an_indexed_object_is_a_plain_copy_without_managed_fields() -> None:
    event = _event("w")
    kept = _indexed(event)
    assert "managedFields" not in kept["metadata"]
    assert kept["status"] == event["status"] and kept["spec"] == event["spec"]
    assert type(kept) is dict and type(kept["status"]["plugins"]) is list


def test_indexed_objects_share_their_keys_and_common_values() -> None:
    one, two = _indexed(_event("one")), _indexed(_event("two"))
    assert next(iter(one["status"])) is next(iter(two["status"]))  # the key "phase"
    assert one["status"]["phase"] is two["status"]["phase"]
    assert one["metadata"]["namespace"] is two["metadata"]["namespace"]
    plugin_one, plugin_two = one["status"]["plugins"][0], two["status"]["plugins"][0]
    assert plugin_one["source"] is plugin_two["source"]
    assert one["metadata"]["name"] == "one" and two["metadata"]["name"] == "two"
