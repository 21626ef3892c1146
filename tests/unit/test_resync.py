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


def _workspace(name: str, uid: str) -> dict[str, Any]:
    return {"apiVersion": "pluginctl.dev/v1alpha1", "kind": "Workspace",
            "metadata": {"namespace": "ns", "name": name, "uid": uid, "generation": 1},
            "spec": {"templateRef": {"name": "base"}}}


def test_desired_state_is_built_at_most_half_the_time_and_what_it_missed_is_hinted() -> None:
    """10,000 Workspaces created at once hint a pass each: building desired state for every
    one of them would take the whole loop. A pass soon after a build plans on that build,
    and the Workspaces it did not see are hinted again."""
    from freezegun import freeze_time

    from controller.engine.queue import WorkQueue
    from controller.kube.operator import Watch

    template = {"apiVersion": "pluginctl.dev/v1alpha1", "kind": "WorkspaceTemplate",
                "metadata": {"namespace": "ns", "name": "base", "uid": "t", "generation": 1},
                "spec": {"plugins": [{"name": "a", "source": "local://a"}]}}
    queue = WorkQueue()
    watch = Watch(queue)
    workspaces = {("ns", "w1"): [_workspace("w1", "u1")]}  # as kopf indexes: key -> store
    watch.indexes = {"workspace_index": workspaces,
                     "template_index": {("ns", "base"): [template]}}
    with freeze_time("2026-01-01", tick=True) as clock:
        assert set(watch.desired().workspaces) == {"w1"}
        workspaces[("ns", "w2")] = [_workspace("w2", "u2")]
        watch.workspace_changed(workspaces[("ns", "w2")][0], "ADDED")  # as kopf delivers it
        clock.tick(0)
        # Built a moment ago: the same build, and w2 hinted for a later pass.
        assert set(watch.desired().workspaces) == {"w1"}
        assert set(queue.take()) == {"w2"}
        clock.tick(60)
        assert set(watch.desired().workspaces) == {"w1", "w2"}
        assert queue.take() == {}
        assert watch._built is not None and watch._built.view is not None
        # A pass that plans on the build with nothing changed: no pass will need the objects
        # it was built from again, and they are not kept (a stale copy of every object).
        assert set(watch.desired().workspaces) == {"w1", "w2"}
        assert watch._built.view is None and watch.planned is not None
        assert len(watch.planned[0].workspaces) == 2
        workspaces[("ns", "w3")] = [_workspace("w3", "u3")]
        watch.workspace_changed(workspaces[("ns", "w3")][0], "ADDED")
        assert set(watch.desired().workspaces) == {"w1", "w2", "w3"}  # built again at once


def test_a_pass_compares_every_object_only_when_the_watch_saw_a_change_or_now_and_then(
) -> None:
    """Status writes (most watch events) change no spec: a pass then plans on the last
    build without comparing 10,000 objects. A change the events never showed is still
    found within CHECK_EVERY seconds."""
    from freezegun import freeze_time

    from controller.engine.queue import WorkQueue
    from controller.kube.operator import CHECK_EVERY, Watch

    watch = Watch(WorkQueue())
    workspaces = {("ns", "w1"): [_workspace("w1", "u1")]}
    watch.indexes = {"workspace_index": workspaces, "template_index": {}}
    with freeze_time("2026-01-01") as clock:
        first = watch.desired()
        status_write = dict(workspaces[("ns", "w1")][0], status={"phase": "Online"})
        watch.workspace_changed(status_write, "MODIFIED")
        assert watch.desired() is first and not watch.changed
        workspaces[("ns", "w2")] = [_workspace("w2", "u2")]  # its event is lost
        assert watch.desired() is first
        clock.tick(CHECK_EVERY + 1)
        assert set(watch.desired().workspaces) == {"w1", "w2"}
        watch.workspace_changed(workspaces[("ns", "w2")][0], "DELETED")
        del workspaces[("ns", "w2")]
        clock.tick(60)  # past the rate limit on building
        assert set(watch.desired().workspaces) == {"w1"}


def test_a_list_keeps_only_what_may_ever_win_and_the_merge_is_the_same() -> None:
    """`slimmed` drops the LIST's copies the watch already holds at least as new; merging
    with what is left gives the same view, now and after the watch moves on."""
    from controller.kube.operator import slimmed

    listed = [obj("same", "10"), obj("watch-newer", "10", 1), obj("list-newer", "20", 2),
              obj("lost-add", "15"), obj("no-version", None, 4)]
    watched = [obj("same", "10"), obj("watch-newer", "12", 3), obj("list-newer", "18", 1),
               obj("no-version", "9", 5), obj("created-since", "31")]
    slim, away = slimmed(watched, listed)
    assert sorted(names(slim)) == ["list-newer", "lost-add", "no-version"]
    assert away == {("ns", "same"), ("ns", "watch-newer")}
    later = [obj("same", "40", 7), obj("list-newer", "19", 1), obj("created-since", "31")]
    deleted = {("ns", "watch-newer"): 33, ("ns", "no-version"): 34}
    for now, gone in ((watched, {}), (later, deleted)):
        assert names(merge_listed(now, slim, "30", gone, slimmed_away=away)) == names(
            merge_listed(now, listed, "30", gone))


def test_a_view_is_merged_with_the_list_only_where_the_list_repairs_it() -> None:
    """After a LIST that shows what the watch shows, the view is the watch's own (no merge
    of every object every pass); a lost add or a lost delete is still repaired."""
    from controller.engine.queue import WorkQueue
    from controller.kube.operator import Watch
    from controller.kube.view import ClusterView

    watch = Watch(WorkQueue())
    index = {("ns", "a"): [obj("a", "10")], ("ns", "b"): [obj("b", "12")]}
    watch.indexes = {"workspace_index": index}
    listing = {"workspaces": "20", "templates": "20", "secrets": "20"}
    watch.resynced(ClusterView([obj("a", "10"), obj("b", "12")], [], [], versions=listing))
    assert watch.repairing == set()
    assert watch.view().workspaces == [index[("ns", "a")][0], index[("ns", "b")][0]]
    # The LIST lost b's DELETE and c's ADD: both repaired, for this kind only.
    watch.resynced(ClusterView([obj("a", "10"), obj("c", "15")], [], [], versions=listing))
    assert watch.repairing == {"workspaces"}
    assert names(watch.view().workspaces) == {"a": 1, "c": 1}
    index[("ns", "d")] = [obj("d", "25")]  # created since: the watch's own
    assert names(watch.view().workspaces) == {"a": 1, "c": 1, "d": 1}
