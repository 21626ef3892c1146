"""Ending the child processes the simulations start (controller, fleet, operator): asked to
stop, then killed if they do not within the grace period."""

from __future__ import annotations

import subprocess


def end(process: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL; returns once it is gone."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(grace)
