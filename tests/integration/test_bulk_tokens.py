"""`pluginctl token create --from-file`: provisioning a fleet's registry tokens in one real
process and one transaction, on each database; every token printed is one the registry
accepts (its lookup by digest), and a bad file writes nothing."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from controller.domain import tokens
from controller.store import Sessions, queries, transaction
from tests.support.helpers import pluginctl, snapshot

FLEET = [f"ws-{n:03d}" for n in range(120)]


async def _pluginctl_stdin(stdin: str, *args: str) -> tuple[int, str, str]:
    """`pluginctl ARGS` fed `stdin`."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controller", *args, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(stdin.encode()), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def _issued(out: str) -> dict[str, str]:
    """workspace id -> token, from the JSON lines printed (each id once)."""
    issued: dict[str, str] = {}
    for line in out.splitlines():
        entry = json.loads(line)
        assert set(entry) == {"workspace_id", "token"}
        assert entry["workspace_id"] not in issued
        issued[entry["workspace_id"]] = entry["token"]
    return issued


def _authenticates(sessions: Sessions, issued: dict[str, str]) -> dict[str, str | None]:
    """workspace id -> the workspace the registry's lookup finds for its printed token."""
    with transaction(sessions) as session:
        return {workspace_id: queries.token_workspace(session, tokens.digest(token))
                for workspace_id, token in issued.items()}


async def test_one_token_per_line_each_authenticating_its_workspace(
    sessions: Sessions, db_url: str, tmp_path: Path
) -> None:
    ids = tmp_path / "fleet.txt"
    # Blank lines and comments, whole-line or trailing, are not workspaces.
    ids.write_text("# the fleet\n\n" + "".join(f"  {w}  # box {n}\n" if n % 7 == 0 else f"{w}\n"
                                               for n, w in enumerate(FLEET)) + "\n")

    code, out, err = await pluginctl("token", "create", "--from-file", str(ids), "--db", db_url)

    assert code == 0, err
    issued = _issued(out)
    assert list(issued) == FLEET  # in the file's order
    assert _authenticates(sessions, issued) == {w: w for w in FLEET}
    assert len(set(issued.values())) == len(FLEET)
    with transaction(sessions) as session:  # the hashes only, never the tokens themselves
        assert all(len(queries.tokens_of(session, w)) == 1 for w in FLEET)
        stored = {h for w in FLEET for h, *_ in queries.tokens_of(session, w)}
    assert not stored & set(issued.values())


async def test_a_bad_or_repeated_line_fails_the_whole_file_and_writes_nothing(
    sessions: Sessions, db_url: str, tmp_path: Path
) -> None:
    ids = tmp_path / "fleet.txt"
    ids.write_text("ws-1\nws-2\nnot a workspace!\nws-3\nws-1\n")
    before = snapshot(sessions)

    code, out, err = await pluginctl("token", "create", "--from-file", str(ids), "--db", db_url)

    assert code == 1
    assert out == ""
    assert f"{ids}:3: invalid workspace id 'not a workspace!'" in err
    assert f"{ids}:5: workspace id 'ws-1' repeats line 1" in err
    assert "no token was created" in err
    assert snapshot(sessions) == before


async def test_ids_from_stdin_and_a_dry_run_that_writes_nothing(
    sessions: Sessions, db_url: str
) -> None:
    before = snapshot(sessions)
    code, out, err = await _pluginctl_stdin("ws-a\nws-b\n", "token", "create", "--from-file",
                                            "-", "--dry-run", "--db", db_url)
    assert code == 0, err
    assert "would create a token for each of 2 workspace(s)" in out
    assert snapshot(sessions) == before

    code, out, err = await _pluginctl_stdin("ws-a\n# more later\nws-b\n", "token", "create",
                                            "--from-file", "-", "--db", db_url)

    assert code == 0, err
    issued = _issued(out)
    assert _authenticates(sessions, issued) == {"ws-a": "ws-a", "ws-b": "ws-b"}


async def test_a_workspace_argument_and_a_file_are_exclusive(tmp_path: Path) -> None:
    ids = tmp_path / "fleet.txt"
    ids.write_text("ws-1\n")
    db = f"sqlite:///{tmp_path / 'unused.db'}"

    both = await pluginctl("token", "create", "ws-1", "--from-file", str(ids), "--db", db)
    neither = await pluginctl("token", "create", "--db", db)

    assert both[0] == 1 and "give either WORKSPACE_ID or --from-file FILE, not both" in both[2]
    assert neither[0] == 1 and "give either WORKSPACE_ID or --from-file FILE" in neither[2]
    assert not (tmp_path / "unused.db").exists()
