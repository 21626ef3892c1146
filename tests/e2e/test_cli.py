"""The command line as a user runs it: real processes, real databases, real runtimes on
loopback, and the documented exit codes (0 in sync, 2 out of sync, 1 could not run)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path

import pytest

from controller.agent.simulated import Faults
from controller.registry.serving import free_port
from tests.support.helpers import (
    TEMPLATE,
    Registry,
    RuntimeFactory,
    pluginctl,
    wait_for,
    workspace_yaml,
)


@pytest.fixture
def manifest_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "manifests"
    directory.mkdir()
    (directory / "template.yaml").write_text(TEMPLATE)
    (directory / "workspaces.yaml").write_text(
        workspace_yaml("ws-1") + "---\n" + workspace_yaml("ws-2"))
    return directory


async def test_reconcile_exit_codes_dry_run_and_json(
    db_url: str, registry: Registry, runtime_factory: RuntimeFactory, manifest_dir: Path
) -> None:
    one = await runtime_factory("ws-1", report=False)
    two = await runtime_factory("ws-2")
    await one.register()
    await two.register()
    base = ["reconcile", "--once", "--manifests", str(manifest_dir), "--db", db_url]

    code, out, err = await pluginctl(*base, "--dry-run")
    assert code == 2, err
    assert "would observe" in out and "would install notes (missing)" in out
    assert "drift found" in out
    assert one.calls == [] and two.calls == []

    code, out, err = await pluginctl(*base, "-o", "json")
    assert code == 0, (out, err)
    result = json.loads(out)
    assert result["in_sync"] is True
    assert result["summary"]["installed"] == 4 and result["summary"]["online"] == 2
    assert set(one.plugins) == set(two.plugins) == {"seo-all", "notes"}

    code, out, _ = await pluginctl(*base)
    assert code == 0 and "-> in sync" in out


async def test_reconcile_reports_failures_with_exit_2(
    db_url: str, registry: Registry, runtime_factory: RuntimeFactory, manifest_dir: Path
) -> None:
    broken = await runtime_factory("ws-1", faults=Faults(failing_plugins={"notes"}))
    await broken.register()
    code, out, _ = await pluginctl("reconcile", "--once", "--manifests", str(manifest_dir),
                                   "--db", db_url)
    assert code == 2
    assert "install notes (missing): FAILED" in out and "failed 1" in out
    await broken.restarted()  # the box is back and has reported (not a race with status)

    code, out, _ = await pluginctl("status", "--db", db_url, "--manifests",
                                   str(manifest_dir), "-o", "json")
    assert code == 0
    ws1 = next(w for w in json.loads(out)["workspaces"] if w["workspace_id"] == "ws-1")
    assert ws1["phase"] == "Online" and ws1["in_sync"] is False
    assert ws1["installed"] == 1 and ws1["desired"] == 2
    assert "broken plugin" in ws1["last_error"] and ws1["next_retry_at"]
    notes = next(p for p in ws1["plugins"] if p["name"] == "notes")
    assert notes["state"] == "Failed" and notes["attempts"] == 1

    code, out, _ = await pluginctl("status", "--db", db_url, "--manifests",
                                   str(manifest_dir))
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "Online" in lines["ws-1"] and "1/2" in lines["ws-1"] and "notes: failed" in lines["ws-1"]
    assert "Unregistered" in lines["ws-2"]


async def test_unpinned_source_is_refused_unless_allowed(
    db_url: str, registry: Registry, runtime_factory: RuntimeFactory, manifest_dir: Path
) -> None:
    (manifest_dir / "workspaces.yaml").write_text(workspace_yaml(
        "ws-1", plugins=[{"source": "github://example/tool"}]))
    runtime = await runtime_factory("ws-1")
    await runtime.register()
    base = ["reconcile", "--once", "--manifests", str(manifest_dir), "--db", db_url]

    code, out, err = await pluginctl(*base)
    assert code == 2, (out, err)
    await runtime.restarted()  # the box is back and has reported
    assert "refused tool: source github://example/tool is not pinned" in out
    assert set(runtime.plugins) == {"seo-all", "notes"}  # the rest is installed
    assert runtime.count("PUT", "/plugins/tool") == 0

    code, out, _ = await pluginctl("status", "--db", db_url, "--manifests", str(manifest_dir),
                                   "-o", "json")
    ws1 = json.loads(out)["workspaces"][0]
    tool = next(p for p in ws1["plugins"] if p["name"] == "tool")
    assert tool["state"] == "Refused" and "--allow-unpinned" in tool["message"]
    assert ws1["in_sync"] is False and ws1["installed"] == 2

    code, out, err = await pluginctl(*base, "--allow-unpinned")
    assert code == 0, (out, err)
    assert set(runtime.plugins) == {"seo-all", "notes", "tool"}


@pytest.mark.parametrize(("args", "message"), [
    (["reconcile", "--manifests", "{dir}"], "add --once"),
    (["reconcile", "--once", "--manifests", "{dir}/missing"], "does not exist"),
    (["reconcile", "--once", "--manifests", "{dir}", "--concurrency", "0"], "--concurrency"),
    (["reconcile", "--once", "--manifests", "{dir}", "--bogus"], "No such option"),
    (["reconcile", "--once", "--manifests", "{dir}", "--db", "nosuchdb://x"], "database"),
    (["reconcile", "--once", "--manifests", "{dir}", "--db",
      "postgresql+psycopg://nobody@127.0.0.1:{port}/x"], "cannot reach the database"),
    (["token", "create", "bad id!"], "invalid workspace id"),
])
async def test_could_not_run_is_exit_1_with_one_line(
    args: list[str], message: str, manifest_dir: Path, tmp_path: Path
) -> None:
    args = [a.format(dir=manifest_dir, port=free_port()) for a in args]
    code, out, err = await pluginctl(*args, env={"PLUGINCTL_DB": f"sqlite:///{tmp_path}/x.db"})
    assert code == 1, (out, err)
    assert message in err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


async def test_bad_manifest_reports_file_and_still_reconciles_the_rest(
    db_url: str, registry: Registry, runtime_factory: RuntimeFactory, manifest_dir: Path
) -> None:
    (manifest_dir / "zz-broken.yaml").write_text("apiVersion: [\n")
    runtime = await runtime_factory("ws-1")
    await runtime.register()
    code, _, err = await pluginctl("reconcile", "--once", "--manifests", str(manifest_dir),
                                   "--db", db_url)
    assert code == 1
    assert "zz-broken.yaml" in err
    assert set(runtime.plugins) == {"seo-all", "notes"}


async def test_postgres_needs_an_explicit_migration(
    postgres_url: str, manifest_dir: Path
) -> None:
    from tests.support.helpers import fresh_postgres_database

    url, drop = fresh_postgres_database(postgres_url)
    try:
        code, _, err = await pluginctl("reconcile", "--once", "--manifests", str(manifest_dir),
                                       "--db", url)
        assert code == 1 and "pluginctl db upgrade" in err
        code, out, _ = await pluginctl("db", "upgrade", "--db", url, "--dry-run")
        assert code == 0 and "would upgrade the database from empty to revision" in out
        code, out, _ = await pluginctl("db", "upgrade", "--db", url)
        assert code == 0 and "upgraded from empty" in out
        code, out, _ = await pluginctl("db", "upgrade", "--db", url)
        assert code == 0 and "already at" in out
        code, out, _ = await pluginctl("reconcile", "--once", "--manifests", str(manifest_dir),
                                       "--db", url)
        assert code == 0, out
    finally:
        drop()


async def test_token_create_and_pause_resume(sqlite_url: str) -> None:
    code, out, _ = await pluginctl("token", "create", "ws-9", "--db", sqlite_url, "--dry-run")
    assert code == 0 and out == "would create a token for workspace ws-9 (it has 0 live)\n"
    code, token, _ = await pluginctl("token", "create", "ws-9", "--db", sqlite_url)
    assert code == 0 and token.strip().startswith("plc_")
    code, out, _ = await pluginctl("workspace", "pause", "ws-9", "--db", sqlite_url,
                                   "--dry-run")
    assert code == 0 and out == "workspace ws-9 would be paused (dormant) (now active)\n"
    code, out, _ = await pluginctl("status", "--db", sqlite_url, "-o", "json")
    assert json.loads(out)["workspaces"][0]["phase"] == "Unregistered"
    code, out, _ = await pluginctl("workspace", "pause", "ws-9", "--db", sqlite_url)
    assert code == 0 and "paused" in out
    code, out, _ = await pluginctl("status", "--db", sqlite_url, "-o", "json")
    assert json.loads(out)["workspaces"][0]["phase"] == "Dormant"
    code, out, _ = await pluginctl("workspace", "resume", "ws-9", "--db", sqlite_url)
    assert code == 0 and "resumed" in out
    code, out, _ = await pluginctl("status", "--db", sqlite_url, "-o", "json")
    assert json.loads(out)["workspaces"][0]["phase"] == "Unregistered"


async def test_standalone_run_with_agent_processes_converges_and_follows_edits(
    tmp_path: Path, manifest_dir: Path
) -> None:
    """`pluginctl run` and two `pluginctl agent` processes, as the README shows: one agent
    only registers, the other heartbeats. Both converge; an edited manifest is picked up."""
    db = f"sqlite:///{tmp_path / 'run.db'}"
    code, _, _ = await pluginctl("db", "upgrade", "--db", db)
    assert code == 0
    tokens = {}
    for ws in ("ws-1", "ws-2"):
        _, out, _ = await pluginctl("token", "create", ws, "--db", db)
        tokens[ws] = out.strip()

    processes = []
    logs = tmp_path / "logs"
    logs.mkdir()

    async def spawn(*args: str, token: str | None = None) -> Path:
        env = {**os.environ, "PLUGINCTL_TOKEN": token} if token else None
        log = logs / f"{len(processes)}-{args[0]}.log"
        with log.open("wb") as stderr:  # read on failure, and for the bound address
            processes.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "controller", *args, env=env,
                stdout=asyncio.subprocess.DEVNULL, stderr=stderr))
        return log

    async def statuses() -> dict[str, dict[str, object]]:
        _, out, _ = await pluginctl("status", "--db", db, "--manifests", str(manifest_dir),
                                    "-o", "json", "--offline-after", "600")
        return {w["workspace_id"]: w for w in json.loads(out)["workspaces"]}

    try:
        # Port 0: the kernel picks a free port, so no other test can take it first.
        run_log = await spawn("run", "--manifests", str(manifest_dir), "--db", db,
                              "--listen", "127.0.0.1:0", "--interval", "1")
        listening = re.compile(r"registry listening on (http://127\.0\.0\.1:\d+)")

        async def bound() -> str | None:
            assert processes[0].returncode is None, run_log.read_text(errors="replace")
            found = listening.search(run_log.read_text(errors="replace"))
            return found.group(1) if found else None

        registry = await wait_for(bound, what="pluginctl run listening", timeout=60)

        await spawn("agent", "--workspace-id", "ws-1", "--registry", registry,
                    "--register-only", "--no-report", token=tokens["ws-1"])
        await spawn("agent", "--workspace-id", "ws-2", "--registry", registry,
                    "--heartbeat-interval", "0.5", token=tokens["ws-2"])

        async def converged() -> bool:
            state = await statuses()
            return all(state[w]["installed"] == 2 for w in ("ws-1", "ws-2"))

        await wait_for(converged, what="both workspaces converged")

        (manifest_dir / "workspaces.yaml").write_text(
            workspace_yaml("ws-1") + "---\n" + workspace_yaml(
                "ws-2", plugins=[{"source": "local://more/extra"}]))

        async def followed_edit() -> bool:
            state = await statuses()
            return bool(state["ws-2"]["in_sync"]) and state["ws-2"]["installed"] == 3

        await wait_for(followed_edit, what="the edited manifest applied")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            await asyncio.wait_for(process.wait(), 20)
    assert processes[0].returncode == 0  # `run` stops cleanly on SIGTERM


async def test_progress_is_shown_on_a_terminal_only(
    db_url: str, registry: Registry, manifest_dir: Path
) -> None:
    import pty

    from controller.domain.models import utcnow
    from controller.store import queries, transaction
    from tests.support.helpers import NOTES, SEO

    names = [f"ws-{i}" for i in range(25)]
    (manifest_dir / "workspaces.yaml").write_text("---\n".join(workspace_yaml(n) for n in names))
    with transaction(registry.sessions) as session:
        for name in names:  # converged already: the pass has nothing to do but check
            queries.record_register(session, name, "http://127.0.0.1:9", report=[SEO, NOTES],
                                    now=utcnow())
    args = ["reconcile", "--once", "--manifests", str(manifest_dir), "--db", db_url]

    code, _, err = await pluginctl(*args)
    assert code == 0 and "reconciling" not in err  # not a terminal: no progress bar

    controller_fd, terminal_fd = pty.openpty()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controller", *args, stdout=asyncio.subprocess.PIPE,
        stderr=terminal_fd)
    os.close(terminal_fd)
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    shown = b""
    while True:
        try:
            chunk = os.read(controller_fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller_fd)
    assert process.returncode == 0, out
    assert b"reconciling" in shown and b"25/25" in shown, shown


async def test_demo_converges_every_example_workspace() -> None:
    examples = Path(__file__).parents[2] / "manifests" / "examples"
    before = {path.name: path.read_text() for path in examples.glob("*.yaml")}
    code, out, err = await pluginctl("demo", "--manifests", str(examples), "--seconds", "30")
    assert code == 0, out + err
    assert {path.name: path.read_text() for path in examples.glob("*.yaml")} == before
    lines = out.splitlines()
    story = [line.split("] ", 1)[1] for line in lines if line.startswith("[")]

    def said(who: str, text: str) -> int:
        """The index of the first line `who` said containing `text`."""
        return next(i for i, line in enumerate(story)
                    if line.split()[0] == who and text in line)

    # The publisher: real tags in real bare repositories, one of them held back.
    assert said("publisher", "gitea://agents/skills: pushed tags v1 (seo-all), v1.4.0 "
                             "(web-search); tagged v1.5.0 (web-search), not pushed yet") >= 0
    assert said("publisher", "github://example/notebook-plugin: pushed tag v2.0.0") >= 0
    assert said("publisher", "plugin library: local://plugins/translator") >= 0
    assert "registered without a report and never heartbeats" in story[said("alpha", "")]
    assert "scratchpad/, a plugin directory its user made by hand" in story[said("beta", "")]
    assert "box will be re-created later" in story[said("delta", "")]
    assert "pins web-search v1.5.0, a tag its publisher has not pushed yet" in story[
        said("gamma", "")]
    # The unpublished tag: the real fetch fails 3 times (backing off, then retried), the
    # publisher pushes the tag, the next retry installs it.
    failed = [line for line in story if line.startswith("gamma ") and "install web-search "
              "(missing) -> failed: PUT /plugins/web-search: HTTP 422:" in line]
    assert len(failed) == 3 and all("no tag or branch 'v1.5.0'" in line for line in failed)
    # (A pass is narrated when it ends: on a busy machine the first retry, run by a later
    # pass, may be told before the first attempt.)
    assert sorted(line.rsplit(" ", 1)[1] for line in failed) == ["[registry]", "[retry]",
                                                                  "[retry]"]
    assert sum(line.startswith("gamma ") and "backing off: web-search failed" in line
               for line in story) == 3
    pushed = said("publisher", "pushed tag v1.5.0 of gitea://agents/skills")
    assert said("gamma", "install web-search (missing) -> ok [retry]") > pushed
    converged = said("controller", "all 4 workspaces converged: every plugin on disk")
    # The box re-created: every plugin installed again, from the agent's own cache.
    recreated = said("delta", "box re-created: its plugins directory emptied (.pluginctl/ "
                              "too); its agent registers again")
    again = said("controller", "converged again (delta's plugins copied from its agent's "
                               "cache: nothing fetched again)")
    assert converged < recreated < again
    assert sum(line.startswith("delta ") and "install" in line and "(missing) -> ok" in line
               for line in story[recreated:again]) == 3
    # The template moves web-search to v1.5.0: swapped in wherever the template gives it.
    moved = said("manifests", "template.yaml: web-search #v1.4.0 -> #v1.5.0")
    upgraded = said("controller", "web-search v1.4.0 -> v1.5.0 swapped in on alpha, beta, "
                                  "delta")
    assert again < moved < upgraded
    for workspace in ("alpha", "beta", "delta"):
        assert moved < said(workspace, "install web-search (source gitea://agents/skills/"
                                       "web-search#v1.4.0 -> gitea://agents/skills/"
                                       "web-search#v1.5.0) -> ok") < upgraded
    # A release that cannot be installed, rolled out in waves: the first wave (one of four)
    # fails, the rollout halts, the other three get no call for it; abort puts it back.
    released = said("manifests", "template default/research adds broken-tool")
    halted = said("controller", "rollout halted: wave 1 of 2: 1 workspace failed")
    first = story[halted].split("allowed): ", 1)[1].split(":", 1)[0]
    spared = said("controller", "no call for broken-tool; still on the previous revision")
    named = story[spared].split(None, 1)[1].split(":", 1)[0].split(", ")
    assert set(named) == {"alpha", "beta", "delta", "gamma"} - {first}
    assert all("install broken-tool" not in line for line in story
               if not line.startswith(first + " "))
    aborted = said("you", "pluginctl rollout abort default/research")
    back = said("controller", "every workspace in sync on revision")
    assert upgraded < released < halted < spared < aborted < back
    assert said("beta", "user-installed scratchpad still there, byte for byte") > back

    rows = [line.split() for line in lines if line.startswith(("alpha", "beta", "gamma",
                                                                "delta"))]
    assert [row[:4] for row in rows if len(row) == 5] == [
        ["alpha", "Online", "3/3", "yes"], ["beta", "Online", "3/3", "yes"],
        ["delta", "Online", "3/3", "yes"], ["gamma", "Online", "3/3", "yes"]]
    # The listing of beta's plugins directory, read from disk at the end: every file with
    # its size, the .complete markers, the user's own directory, and v1.5.0's content.
    listing = lines[lines.index("beta's plugins directory (boxes/beta/plugins/), every file "
                                "and its size:") + 1:]
    files = {}
    for line in listing:
        if not line.strip():
            break
        size, unit, path = line.split()
        assert unit == "B"
        files[path] = int(size)
    assert set(files) == {
        f"{name}/{file}" for name in ("notebook", "translator", "web-search")
        for file in (".complete", "README.md", "plugin.json")
    } | {f".pluginctl/records/{name}.json" for name in ("notebook", "translator", "web-search")
         } | {"scratchpad/notes.md"}
    assert all(files[f"{name}/.complete"] == len("sha256:") + 64 + 1
               for name in ("notebook", "translator", "web-search"))
    assert files["web-search/plugin.json"] == len('{"name": "web-search", "version": "1.5.0"}\n')
    assert lines[-2:] == ["web-search/plugin.json:",
                          '  {"name": "web-search", "version": "1.5.0"}']


async def test_token_rotation_without_downtime_and_revocation(
    db_url: str, registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    """Two live tokens at once; the runtime moves to the new one; the old one is revoked by
    reading it from stdin and stops working on the running registry within a second, while
    the new one never stops. Bad revocations change nothing. Tokens never reach the logs."""
    import logging

    import aiohttp

    caplog.set_level(logging.DEBUG)
    _, old, _ = await pluginctl("token", "create", "ws-1", "--db", db_url)
    _, new, _ = await pluginctl("token", "create", "ws-1", "--db", db_url)
    old, new = old.strip(), new.strip()
    assert old != new and old.startswith("plc_")

    async with aiohttp.ClientSession() as client:
        async def call(token: str, path: str = "/registry/heartbeat") -> int:
            body = {"workspace_id": "ws-1"}
            if path.endswith("register"):
                body["url"] = "http://127.0.0.1:9/"
            async with client.post(registry.url + path, json=body,
                                   headers={"Authorization": f"Bearer {token}"}) as answer:
                return answer.status

        assert await call(old, "/registry/register") == 200
        assert await call(new) == 200  # both live: the runtime can switch at any time

        code, out, _ = await pluginctl("token", "list", "ws-1", "--db", db_url, "-o", "json")
        listed = json.loads(out)["tokens"]
        assert code == 0 and len(listed) == 2 and all(t["revoked"] is None for t in listed)
        assert old not in out and new not in out

        for bad in (["--fingerprint", "abc"], ["--fingerprint", "0123456789ab"], []):
            code, _, err = await pluginctl("token", "revoke", "ws-1", "--db", db_url, *bad)
            assert code == 1 and err.strip(), bad
        code, out, _ = await pluginctl("token", "revoke", "ws-1", "--db", db_url, "--all",
                                       "--dry-run")
        assert code == 0 and out.startswith("would revoke 2 token(s) of workspace ws-1: ")
        assert await call(old) == 200 and await call(new) == 200
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "controller", "token", "revoke", "ws-1", "--db", db_url,
            "--token-stdin", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        out_bytes, _ = await process.communicate(old.encode() + b"\n")
        assert process.returncode == 0 and b"revoked 1 token" in out_bytes

        async def refused() -> bool:
            assert await call(new) == 200  # no downtime for the runtime's current token
            return await call(old) == 401

        await wait_for(refused, timeout=5, what="the revoked token refused")

    code, out, _ = await pluginctl("token", "list", "ws-1", "--db", db_url, "-o", "json")
    assert sorted(t["revoked"] is None for t in json.loads(out)["tokens"]) == [False, True]
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert old not in logged and new not in logged


async def test_token_runtime_secret_prints_the_derived_secret(tmp_path: Path) -> None:
    from controller.domain.tokens import runtime_secret_for

    secret_file = tmp_path / "runtime-secret"
    secret_file.write_text("the-controllers-secret\n")
    code, out, err = await pluginctl("token", "runtime-secret", "ws-1",
                                     "--runtime-secret-file", str(secret_file))
    assert code == 0, err
    assert out.strip() == runtime_secret_for("the-controllers-secret", "ws-1")
    code, _, err = await pluginctl("token", "runtime-secret", "ws-1", "--runtime-secret-file",
                                   str(tmp_path / "missing"))
    assert code != 0 and "cannot read" in err
    code, _, err = await pluginctl("reconcile", "--once", "--manifests", str(tmp_path),
                                   "--runtime-secret-per-workspace")
    assert code != 0 and "needs --runtime-secret-file" in err


async def test_json_logs_carry_workspace_plugin_action_and_trigger(
    db_url: str, registry: Registry, runtime_factory: RuntimeFactory, manifest_dir: Path
) -> None:
    runtime = await runtime_factory("ws-1")
    await runtime.register()
    code, _, err = await pluginctl("--log-format", "json", "reconcile", "--once",
                                   "--manifests", str(manifest_dir), "--db", db_url)
    assert code == 0, err
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert records and len(records) == len(err.splitlines())  # every line is one object
    installs = {r["plugin"]: r for r in records if r.get("action") == "install"}
    assert set(installs) == {"seo-all", "notes"}
    assert all(r["workspace"] == "ws-1" and r["trigger"] == "manual" and r["result"] == "ok"
               and r["level"] == "info" and r["time"] for r in installs.values())


async def test_explain_says_why_a_workspace_is_or_is_not_in_sync(
    db_url: str, registry: Registry, runtime_factory: RuntimeFactory, manifest_dir: Path
) -> None:
    """A broken plugin, a plugin its user installed, and the restart budget: explain names
    the declaring template entry, the owner, the last error and the next retry."""
    from controller.domain.models import Plugin

    user = Plugin("scratchpad", "local://user/scratchpad")
    broken = await runtime_factory("ws-1", faults=Faults(failing_plugins={"notes"}),
                                   plugins=[user])
    await broken.register()
    # A long first backoff: the retry must still be ahead when explain runs, however slow
    # the machine is.
    await pluginctl("reconcile", "--once", "--manifests", str(manifest_dir), "--db", db_url,
                    "--backoff-base", "300")
    await broken.restarted()  # the box is back and has reported
    explain = ["explain", "--manifests", str(manifest_dir), "--db", db_url]

    code, out, err = await pluginctl(*explain, "ws-1", "-o", "json")
    assert code == 2, err
    found = json.loads(out)
    assert found["phase"] == "Online" and found["in_sync"] is False
    assert "notes failed" in found["why"] and "broken plugin" in found["why"]
    plugins = {p["name"]: p for p in found["plugins"]}
    assert plugins["notes"]["declared_by"] == "WorkspaceTemplate default/base spec.plugins[1]"
    assert plugins["notes"]["state"] == "Failed" and plugins["notes"]["failures"] == 1
    assert plugins["notes"]["next_retry_at"] is not None
    assert plugins["seo-all"]["owner"] == "pluginctl"
    assert plugins["seo-all"]["installed"]["source"].endswith("seo-all#v1")
    assert plugins["scratchpad"] == {**plugins["scratchpad"], "declared_by": None,
                                     "owner": "not pluginctl", "state": "LeftAlone"}
    assert found["restart_budget"] == 3 and found["restarts_left"] == 3 - found["restarts_used"]
    assert found["report_at"] is not None and found["acting_replica"] is None
    assert any(line.startswith("wait until") and "notes" in line
               for line in found["next_pass"]), found["next_pass"]

    code, out, _ = await pluginctl(*explain, "ws-1")
    assert code == 2
    assert "Why:            out of sync: notes failed" in out
    assert "WorkspaceTemplate default/base spec.plugins[1]" in out and "Next pass:" in out

    code, out, err = await pluginctl(*explain, "ws-2")  # declared, never registered
    assert code == 2 and "has not registered" in out, err
    code, _, err = await pluginctl(*explain, "nobody")
    assert code == 1 and "no workspace nobody" in err


async def test_plan_then_apply_performs_exactly_the_plan_and_refuses_stale_ones(
    db_url: str, registry: Registry, runtime_factory: RuntimeFactory, manifest_dir: Path,
    tmp_path: Path,
) -> None:
    from controller.domain.models import Plugin

    runtime = await runtime_factory("ws-1")
    await runtime.register()
    source = ["--manifests", str(manifest_dir), "--db", db_url]
    plan_file = tmp_path / "plan.json"

    async def plan() -> dict[str, object]:
        code, out, err = await pluginctl("plan", *source, "-o", "json")
        assert code == 2, err
        plan_file.write_text(out)
        return dict(json.loads(out))

    planned = await plan()
    assert [(a["action"], a["plugin"]["name"])  # type: ignore[index]
            for w in planned["workspaces"] for a in w["actions"]] == [  # type: ignore[attr-defined]
        ("install", "notes"), ("install", "seo-all")]
    assert runtime.calls == []  # planning calls nobody

    code, out, err = await pluginctl("apply", str(plan_file), *source, "--dry-run")
    assert code == 0 and "would install notes" in out, err
    assert runtime.calls == []

    # The runtime's report changes after the plan was made: apply refuses, does nothing.
    runtime.plugins["scratchpad"] = Plugin("scratchpad", "local://user/scratchpad")
    await runtime.heartbeat()
    code, out, err = await pluginctl("apply", str(plan_file), *source)
    assert code == 1 and "ws-1: its runtime's report changed" in err and "nothing was done" in err
    assert runtime.calls == []

    await plan()
    code, out, err = await pluginctl("apply", str(plan_file), *source)
    assert code == 0, (out, err)
    assert {"seo-all", "notes"} <= set(runtime.plugins)
    # Exactly the plan: the restart the installs asked for was not planned, so not made.
    assert [(c.method, c.path) for c in runtime.calls] == [
        ("PUT", "/plugins/notes"), ("PUT", "/plugins/seo-all")]
    assert "restart pending" in out

    code, _, err = await pluginctl("apply", str(plan_file), *source)  # applied already
    assert code == 1 and "pluginctl acted on it since" in err

    for broken, message in (("{", "Invalid JSON"), ('{"kind": "pluginctl/Plan"}', "version"),
                            (plan_file.read_text().replace("seo-all#v1", "no spaces allowed"),
                             "actions[1].plugin.source: String should match pattern")):
        bad = tmp_path / "bad.json"
        bad.write_text(broken)
        code, _, err = await pluginctl("apply", str(bad), *source)
        assert code == 1 and "is not a usable plan" in err and message in err, err


async def test_blast_radius_guard_from_the_command_line(
    db_url: str, registry: Registry, runtime_factory: RuntimeFactory, manifest_dir: Path,
    tmp_path: Path,
) -> None:
    one = await runtime_factory("ws-1")
    two = await runtime_factory("ws-2")
    for runtime in (one, two):
        await runtime.register()
    source = ["--manifests", str(manifest_dir), "--db", db_url, "--max-workspaces", "1"]

    code, out, _ = await pluginctl("reconcile", "--once", *source)
    assert code == 2 and "guard held this pass: it would act on 2 workspaces" in out
    assert one.calls == [] and two.calls == []

    code, out, _ = await pluginctl("plan", *source, "-o", "json")
    assert code == 2 and json.loads(out)["guard"].startswith("would act on 2 workspaces")
    (tmp_path / "plan.json").write_text(out)
    code, _, err = await pluginctl("apply", str(tmp_path / "plan.json"), *source)
    assert code == 1 and "blast-radius guard held this plan" in err
    assert one.calls == [] and two.calls == []

    code, out, err = await pluginctl("reconcile", "--once", *source, "--force")
    assert code == 0, (out, err)
    assert {"seo-all", "notes"} <= set(one.plugins) and {"seo-all", "notes"} <= set(two.plugins)
