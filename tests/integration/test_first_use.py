"""First use of a fresh embedded SQLite file by several `pluginctl` processes at once: each
one migrates the file before use (store/database.py, under the file lock beside it), and
none may trip over another's half-made schema."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from controller.domain import tokens
from controller.store import (
    current_revision,
    head_revision,
    make_engine,
    make_sessions,
    queries,
    transaction,
)
from tests.support.helpers import fleet_dir

# The real CLI entry point, in a process that has done its (slow, uneven) imports and then
# waits for the word: the test lets every process go at the same moment, so they reach the
# migration together instead of one import time apart.
LAUNCHER = (
    "import sys\n"
    "from controller.cli import main\n"
    "print('ready', flush=True)\n"
    "sys.stdin.readline()\n"
    "main(sys.argv[1:])\n"
)
TOKENS = 6


async def _start(*args: str) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LAUNCHER, *args, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert process.stdout is not None
    ready = await asyncio.wait_for(process.stdout.readline(), 60)
    assert ready == b"ready\n", ready
    return process


async def _finish(process: asyncio.subprocess.Process) -> tuple[int, str, str]:
    out, err = await asyncio.wait_for(process.communicate(b"go\n"), 120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_processes_starting_together_on_a_fresh_file_all_succeed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    manifests = fleet_dir(tmp_path, ["ws-1", "ws-2"])
    commands = [
        *(["token", "create", f"ws-{n}", "--db", url] for n in range(TOKENS)),
        ["db", "upgrade", "--db", url],
        ["reconcile", "--once", "--manifests", str(manifests), "--db", url],
        ["status", "--manifests", str(manifests), "--db", url],
    ]
    processes = await asyncio.gather(*(_start(*command) for command in commands))
    results = await asyncio.gather(*(_finish(process) for process in processes))

    failed = [(command, result) for command, result in zip(commands, results, strict=True)
              if result[0] != 0]
    assert not failed, failed
    engine = make_engine(url)
    try:
        assert current_revision(engine) == head_revision()
        with transaction(make_sessions(engine)) as session:
            for n, (_, out, _) in enumerate(results[:TOKENS]):
                digest = tokens.digest(out.strip())
                assert queries.token_workspace(session, digest) == f"ws-{n}"
    finally:
        engine.dispose()
