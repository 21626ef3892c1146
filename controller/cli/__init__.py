"""The `pluginctl` command line: the standalone controller and the operator (`run`), one-shot
passes (`reconcile --once`, `plan`, `apply`), inspection (`status`, `explain`), tokens,
pausing, rollouts, migrations, the reference runtime (`agent`), `bench`, `soak` and the `demo`.
Exit codes: 0 in sync / done, 2 out of sync, 1 could not run."""

from controller.cli import admin, inspection, loop, rollout, tools
from controller.cli.base import cli, main

__all__ = ["admin", "cli", "inspection", "loop", "main", "rollout", "tools"]
