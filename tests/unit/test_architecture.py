"""The layering and typing promises, checked by the tools that enforce them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    found = BIN / name if (BIN / name).exists() else shutil.which(name)
    assert found, f"{name} is not installed: pip install -e '.[test]'"
    return str(found)


def test_import_contracts_hold() -> None:
    result = subprocess.run([_tool("lint-imports")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_passes(request: pytest.FixtureRequest) -> None:
    from tests.conftest import MYPY, start_mypy

    # Started when the suite was collected if it runs in one process (see conftest).
    mypy = request.config.stash.get(MYPY, None) or start_mypy()
    output, _ = mypy.communicate(timeout=600)
    assert mypy.returncode == 0, output


def test_ruff_passes() -> None:
    result = subprocess.run([_tool("ruff"), "check", "controller", "tests"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.xdist_group("kubernetes")
def test_xdist_groups_reach_the_scheduler(request: pytest.FixtureRequest) -> None:
    """On xdist workers, a test's group travels in its node id (`…@kubernetes`): if a pytest
    release stops carrying it, the Kubernetes tests spread over the workers, each starting a
    control plane of its own (pytest 9.2 did; pyproject pins below it)."""
    if os.environ.get("PYTEST_XDIST_WORKER") is not None:
        assert request.node.nodeid.endswith("@kubernetes"), request.node.nodeid
