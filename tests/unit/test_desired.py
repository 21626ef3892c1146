"""Desired state: plugin names, the merge of template and workspace, and manifests that are
broken in one place without stopping the rest."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from controller.domain.models import InvalidSpec, derive_plugin_name
from controller.domain.reasons import InvalidReason
from controller.engine import manifests
from tests.support.helpers import TEMPLATE, desired_from, workspace_yaml


@pytest.mark.parametrize(("source", "name"), [
    ("gitea://org/repo/agent-skills/seo-all#v1", "seo-all"),
    ("local://plugins/notes", "notes"),
    ("https://example.com/a/b/tool/#main", "tool"),
    ("github://org/repo#3f2a9c1", "repo"),
])
def test_plugin_name_is_the_last_path_segment_without_ref(source: str, name: str) -> None:
    assert derive_plugin_name(source) == name


@pytest.mark.parametrize("source", ["seo-all", "gitea://", "local://#v1", "x://a b", ""])
def test_bad_sources_are_refused(source: str) -> None:
    with pytest.raises(InvalidSpec):
        derive_plugin_name(source)


def test_merge_template_minus_excluded_plus_own_with_workspace_winning() -> None:
    state = desired_from(TEMPLATE, workspace_yaml(
        "ws", excludePlugins=["notes"],
        plugins=[{"source": "gitea://org/repo/agent-skills/seo-all#v2"},
                 {"name": "extra", "source": "local://x/y", "digest": "sha256:1"}]))
    ws = state.workspaces["ws"]
    assert ws.error is None
    assert {n: (p.source, p.digest) for n, p in ws.plugins.items()} == {
        "seo-all": ("gitea://org/repo/agent-skills/seo-all#v2", None),
        "extra": ("local://x/y", "sha256:1"),
    }
    assert ws.declared_by["seo-all"].kind == "Workspace"


def test_workspace_id_defaults_to_the_object_name() -> None:
    state = desired_from(TEMPLATE, workspace_yaml("a"), workspace_yaml("b", workspaceId="uuid-7"))
    assert set(state.workspaces) == {"a", "uuid-7"}
    assert state.workspaces["uuid-7"].object_ref == "default/b"


def test_template_with_two_entries_of_one_name_fails_its_workspaces_only() -> None:
    broken = TEMPLATE.replace("name: base", "name: broken").replace(
        "local://plugins/notes", "local://other/seo-all")
    state = desired_from(TEMPLATE, broken, workspace_yaml("ok"),
                         workspace_yaml("uses-broken", templateRef={"name": "broken"}))
    assert state.workspaces["ok"].error is None
    error = state.workspaces["uses-broken"].error or ""
    assert "both declare plugin 'seo-all'" in error and "default/broken" in error
    assert state.workspaces["uses-broken"].reason is InvalidReason.TEMPLATE_INVALID
    assert state.workspaces["ok"].reason is None


def test_two_sources_for_one_name_in_a_workspace_is_an_error_for_it() -> None:
    state = desired_from(TEMPLATE, workspace_yaml("ws", plugins=[
        {"source": "local://a/tool"}, {"source": "local://b/tool"}]), workspace_yaml("fine"))
    assert "declared twice with different sources" in (state.workspaces["ws"].error or "")
    assert state.workspaces["ws"].reason is InvalidReason.CONFLICTING_PLUGIN
    assert state.workspaces["fine"].error is None


def test_unknown_template_is_reported_on_that_workspace() -> None:
    state = desired_from(workspace_yaml("ws", templateRef={"name": "nope"}))
    assert state.workspaces["ws"].error == "template default/nope not found"
    assert state.workspaces["ws"].reason is InvalidReason.TEMPLATE_NOT_FOUND


def test_duplicate_workspace_id_is_rejected_with_a_reason() -> None:
    state = desired_from(TEMPLATE, workspace_yaml("a", workspaceId="same"),
                         workspace_yaml("b", workspaceId="same"))
    assert state.workspaces["same"].object_ref == "default/a"
    assert len(state.rejected) == 1
    assert "already claimed by default/a" in (state.rejected[0].error or "")
    assert state.rejected[0].reason is InvalidReason.DUPLICATE_WORKSPACE_ID


def test_spec_typos_and_wrong_types_are_errors_naming_the_field() -> None:
    state = desired_from(TEMPLATE, workspace_yaml("ws", suspnd=True),
                         workspace_yaml("ws2", suspend="yes"))
    messages = [str(e) for e in state.errors]
    assert any("Workspace default/ws" in m and "spec.suspnd" in m for m in messages), messages
    assert any("Workspace default/ws2" in m and "spec.suspend" in m for m in messages), messages
    assert {e.reason for e in state.errors} == {InvalidReason.BAD_SPEC}
    assert state.workspaces == {}


def test_every_invalid_workspace_carries_its_reason_beside_the_message() -> None:
    """Each way a workspace can be invalid sets a reason; none is read back from prose."""
    state = desired_from(
        TEMPLATE,
        workspace_yaml("bad-id", workspaceId="no spaces"),
        workspace_yaml("bad-plugin", plugins=[{"source": "not a source"}]),
        workspace_yaml("no-template", templateRef={"name": "nope"}))
    assert {w.object_ref: w.reason for w in state.workspaces.values()} == {
        "default/bad-id": InvalidReason.BAD_WORKSPACE_ID,
        "default/bad-plugin": InvalidReason.BAD_PLUGIN,
        "default/no-template": InvalidReason.TEMPLATE_NOT_FOUND,
    }
    assert all(w.error for w in state.workspaces.values())
    with pytest.raises(ValueError, match="together"):
        replace(state.workspaces["bad-plugin"], reason=None)  # an error never travels alone


def test_manifest_directory_broken_file_named_others_carry_on(tmp_path: Path) -> None:
    (tmp_path / "template.yaml").write_text(TEMPLATE)
    (tmp_path / "good.yaml").write_text(workspace_yaml("good") + "---\n" + workspace_yaml("two"))
    (tmp_path / "broken.yaml").write_text("kind: Workspace\nspec: [unclosed\n")
    (tmp_path / "kustomization.yaml").write_text("resources: [template.yaml]\n")
    (tmp_path / "notes.txt").write_text("not yaml at all: [")
    (tmp_path / "wrong-kind.yml").write_text(
        "apiVersion: pluginctl.dev/v1alpha1\nkind: Workspce\nmetadata: {name: x}\n")

    state = manifests.load(tmp_path)

    assert set(state.workspaces) == {"good", "two"}
    errors = [str(e) for e in state.errors]
    assert len(errors) == 2, errors
    assert any("broken.yaml" in e and "cannot read" in e for e in errors)
    assert any("wrong-kind.yml" in e and "Workspce" in e for e in errors)
    assert {e.reason for e in state.errors} == {InvalidReason.UNREADABLE,
                                                InvalidReason.FOREIGN_VERSION}


def test_manifests_are_re_read_so_edits_apply(tmp_path: Path) -> None:
    (tmp_path / "t.yaml").write_text(TEMPLATE)
    (tmp_path / "w.yaml").write_text(workspace_yaml("ws"))
    assert set(manifests.load(tmp_path).workspaces["ws"].plugins) == {"seo-all", "notes"}
    (tmp_path / "w.yaml").write_text(workspace_yaml("ws", excludePlugins=["notes"]))
    assert set(manifests.load(tmp_path).workspaces["ws"].plugins) == {"seo-all"}


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(manifests.ManifestDirError, match="does not exist"):
        manifests.load(tmp_path / "nope")


def test_example_manifests_are_valid() -> None:
    examples = Path(__file__).parents[2] / "manifests" / "examples"
    state = manifests.load(examples)
    assert state.errors == ()
    assert len(state.workspaces) == 4
    assert all(w.error is None and w.plugins for w in state.workspaces.values())


def test_manifest_source_parses_again_only_when_a_file_changed(tmp_path: Path) -> None:
    (tmp_path / "t.yaml").write_text(TEMPLATE)
    (tmp_path / "w.yaml").write_text(workspace_yaml("ws-1"))
    source = manifests.Source(tmp_path)
    first = source()
    assert source() is first  # nothing changed: not parsed again
    (tmp_path / "w.yaml").write_text(workspace_yaml("ws-2"))  # same size, new content
    second = source()
    assert second is not first and set(second.workspaces) == {"ws-2"}
    (tmp_path / "more.yml").write_text(workspace_yaml("ws-3"))
    assert set(source().workspaces) == {"ws-2", "ws-3"}
    (tmp_path / "more.yml").unlink()
    assert set(source().workspaces) == {"ws-2"}
