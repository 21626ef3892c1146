"""A `pluginctl` command loads what it uses: its own module of `controller.cli` (found through
`COMMAND_MODULES`), not the registry server, the Kubernetes client or Alembic, unless it
needs them. Every command a user types on call, and every process a test starts, pays the
import time of what it loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import controller.cli
from controller.cli.base import COMMAND_MODULES

# Runs the real entry point, then says which of the heavy libraries the command loaded.
PROBE = (
    "import atexit, sys\n"
    "HEAVY = ('aiohttp', 'alembic', 'kopf', 'kubernetes')\n"
    "atexit.register(lambda: print('loaded:', *[m for m in HEAVY if m in sys.modules],"
    " file=sys.stderr))\n"
    "from controller.cli import main\n"
    "main(sys.argv[1:])\n"
)


def test_every_command_is_found_in_the_module_the_map_names() -> None:
    commands = controller.cli.cli.commands  # every command module imported
    assert set(commands) == set(COMMAND_MODULES)
    for name, command in commands.items():
        assert command.callback is not None
        assert command.callback.__module__ == f"controller.cli.{COMMAND_MODULES[name]}", name
    assert set(COMMAND_MODULES.values()) == set(controller.cli.COMMANDS)


def _loaded(*args: str) -> set[str]:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("loaded:"), done.stderr
    return set(line.split()[1:])


@pytest.mark.parametrize("command", [
    ["status"],
    ["token", "create", "ws-1"],
    ["token", "list", "ws-1"],
    ["workspace", "pause", "ws-1"],
])
def test_a_store_command_loads_neither_the_server_nor_kubernetes_nor_alembic(
        tmp_path: Path, command: list[str]) -> None:
    db = f"sqlite:///{tmp_path / 'pluginctl.db'}"
    assert _loaded("db", "upgrade", "--db", db) == {"alembic"}  # migrating is Alembic's job
    assert _loaded(*command, "--db", db) == set()


def test_help_lists_every_command() -> None:
    done = subprocess.run([sys.executable, "-m", "controller", "--help"], capture_output=True,
                          text=True, timeout=60, check=True)
    listed = {line.split()[0] for line in done.stdout.split("Commands:")[1].splitlines()
              if line.strip()}
    assert listed == set(COMMAND_MODULES)
