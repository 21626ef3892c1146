"""The `pluginctl` command line: the standalone controller and the operator (`run`), one-shot
passes (`reconcile --once`, `plan`, `apply`), inspection (`status`, `explain`), tokens,
pausing, rollouts, migrations, the reference runtime (`agent`), `bench`, `soak` and the `demo`.
Exit codes: 0 in sync / done, 2 out of sync, 1 could not run.

Each command's module loads when that command runs (`base.COMMAND_MODULES`; all of them for
`--help` and for `controller.cli.cli`), so that a command starts without the libraries only
others use, and the kubectl plugin (`controller.cli.kubectl`), a sibling that needs none of
them, starts in a fraction of the time."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

#: The modules that add their commands to `cli` when imported.
COMMANDS = ("admin", "inspection", "loop", "rollout", "tools")


def main(argv: Sequence[str] | None = None) -> None:
    """`pluginctl`: the entry point of `controller.cli.base`."""
    from controller.cli.base import main as run

    run(argv)


def __getattr__(name: str) -> Any:
    if name == "cli":
        for module in COMMANDS:
            importlib.import_module(f"{__name__}.{module}")
        from controller.cli.base import cli

        return cli
    if name in COMMANDS:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["admin", "cli", "inspection", "loop", "main", "rollout", "tools"]
