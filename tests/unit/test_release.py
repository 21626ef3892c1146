"""What a release is made of agrees with itself (issue 17): the lock file pins every runtime
dependency of pyproject.toml inside its range, with hashes; the image installs from it and
carries no dead layers; the build context leaves the caches out; the version is one number
from pyproject.toml to `pluginctl --version`, the User-Agent and the Deployment's image tag."""

from __future__ import annotations

import platform
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from importlib.metadata import requires
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from controller.domain.version import caller_of, user_agent, version, version_line

ROOT = Path(__file__).resolve().parents[2]
LOCK = "requirements.lock"
VENV = "/opt/pluginctl"
IMAGE = "ghcr.io/pluginctl/pluginctl"
#: The image's platform, which the lock file is made for (`.ci/lock`).
TARGET = {"implementation_name": "cpython", "platform_python_implementation": "CPython",
          "python_version": "3.11", "python_full_version": "3.11.0", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix"}


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def runtime_requirements() -> list[Requirement]:
    return [Requirement(line) for line in pyproject()["project"]["dependencies"]]


# --- the lock file ---------------------------------------------------------------------------

@dataclass
class Pin:
    version: Version
    hashes: list[str] = field(default_factory=list)


def parse_lock(text: str) -> dict[str, Pin]:
    """`name==version` entries and their `--hash=sha256:…` options, as pip reads them."""
    pins: dict[str, Pin] = {}
    for line in re.sub(r"\\\n", " ", text).splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        requirement = Requirement(words[0])
        (spec,) = requirement.specifier
        if spec.operator != "==":
            raise ValueError(f"{words[0]}: not pinned with ==")
        name = canonicalize_name(requirement.name)
        if name in pins:
            raise ValueError(f"{name}: pinned twice")
        pins[name] = Pin(Version(spec.version), [w.removeprefix("--hash=") for w in words[1:]
                                                 if w.startswith("--hash=")])
    return pins


def extra_names(requirement: Requirement) -> set[str]:
    """What the requirement's extras add (`psycopg[binary]` -> psycopg-binary) on the image's
    platform, by the installed distribution's metadata."""
    names: set[str] = set()
    for line in requires(requirement.name) or []:
        needed = Requirement(line)
        if needed.marker is not None and any(
                needed.marker.evaluate({**TARGET, "extra": extra}) for extra in requirement.extras):
            names.add(canonicalize_name(needed.name))
    return names


def lock_problems(requirements: list[Requirement], lock_text: str) -> list[str]:
    """What is wrong with a lock file for these runtime requirements; empty if nothing."""
    try:
        pins = parse_lock(lock_text)
    except ValueError as error:
        return [str(error)]
    problems = [f"{name}=={pin.version}: no sha256 hash" for name, pin in pins.items()
                if not pin.hashes or not all(re.fullmatch(r"sha256:[0-9a-f]{64}", h)
                                             for h in pin.hashes)]
    for requirement in requirements:
        if requirement.marker is not None and not requirement.marker.evaluate(TARGET):
            continue
        name = canonicalize_name(requirement.name)
        if name not in pins:
            problems.append(f"{requirement}: not in the lock file")
        elif not requirement.specifier.contains(pins[name].version, prereleases=True):
            problems.append(f"{requirement}: locked at {pins[name].version}, outside the range")
        problems += [f"{requirement}: {extra} (its extra) not in the lock file"
                     for extra in sorted(extra_names(requirement) - set(pins))]
    return problems


def test_the_lock_file_pins_every_runtime_dependency_within_its_range_with_hashes() -> None:
    text = (ROOT / LOCK).read_text()
    assert lock_problems(runtime_requirements(), text) == []
    pins = parse_lock(text)
    assert {"aiohttp", "kopf", "sqlalchemy", "pydantic", "psycopg-binary"} <= set(pins)
    assert ".ci/lock" in text.split("\n", 3)[1], "the lock file names its refresh command"


@pytest.mark.parametrize(("change", "problem"), [
    (lambda t: re.sub(r"^sqlalchemy==[^ ]+", "sqlalchemy==2.2.0", t, flags=re.M),
     "sqlalchemy<2.2,>=2.0: locked at 2.2.0, outside the range"),
    (lambda t: re.sub(r"^kopf==.*?(?=^\S)", "", t, flags=re.M | re.S),
     "kopf<2,>=1.37: not in the lock file"),
    (lambda t: re.sub(r"^psycopg-binary==.*?(?=^\S)", "", t, flags=re.M | re.S),
     "psycopg[binary]<4,>=3.1: psycopg-binary (its extra) not in the lock file"),
    (lambda t: re.sub(r"^(pyyaml==[^ ]+) \\\n(\s+--hash=\S+ \\\n)*\s+--hash=\S+\n", r"\1\n",
                      t, flags=re.M),
     "pyyaml==6"),
    (lambda t: t.replace("click==", "click>=", 1), "click>=8"),
])
def test_a_lock_file_that_disagrees_with_pyproject_is_caught(change: Any, problem: str) -> None:
    text = change((ROOT / LOCK).read_text())
    assert text != (ROOT / LOCK).read_text()
    assert any(p.startswith(problem) for p in lock_problems(runtime_requirements(), text)), \
        lock_problems(runtime_requirements(), text)


def test_the_lock_refresh_command_targets_the_image_platform() -> None:
    script = (ROOT / ".ci/lock").read_text()
    assert "--generate-hashes" in script
    assert f"--output-file {LOCK}" in script
    assert "--python-version 3.11" in script and "x86_64" in script
    assert Marker("python_version >= '3.11'").evaluate(TARGET)


# --- the image -------------------------------------------------------------------------------

@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse_dockerfile(text: str) -> list[Stage]:
    """The stages and their instructions (continuation lines joined, comments dropped)."""
    stages: list[Stage] = []
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    for instruction in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines():
        if not instruction.strip():
            continue
        keyword, _, rest = instruction.strip().partition(" ")
        keyword, rest = keyword.upper(), " ".join(rest.split())
        if keyword == "FROM":
            words = rest.split()
            stages.append(Stage(words[0], words[2] if len(words) == 3 else None))
        else:
            stages[-1].instructions.append((keyword, rest))
    return stages


def dead_weight(stages: list[Stage]) -> list[str]:
    """Paths that one layer copies in and a later layer of the same stage removes: the removal
    frees nothing, the copy stays in the image."""
    found = []
    for stage in stages:
        copied: list[str] = []
        for keyword, rest in stage.instructions:
            if keyword in ("COPY", "ADD"):
                copied.append([w for w in rest.split() if not w.startswith("--")][-1])
            elif keyword == "RUN":
                for command in re.split(r"&&|;|\|\|", rest):
                    words = command.split()
                    if words[:1] == ["rm"]:
                        found += [path for path in copied for target in words[1:]
                                  if target.rstrip("/*") == path.rstrip("/")
                                  or target.startswith(path.rstrip("/") + "/")]
    return found


def test_the_image_installs_the_locked_set_in_a_venv_and_copies_only_that() -> None:
    build, final = parse_dockerfile((ROOT / "Dockerfile").read_text())
    assert build.name == "build" and build.base == final.base
    runs = [rest for keyword, rest in build.instructions if keyword == "RUN"]
    assert any(f"-m venv --without-pip {VENV}" in run for run in runs)
    (locked,) = [run for run in runs if f"-r {LOCK}" in run]
    assert "--require-hashes" in locked and f"--python {VENV}/bin/python install" in locked
    copies = [rest for keyword, rest in build.instructions if keyword == "COPY"]
    assert copies[0] == f"{LOCK} ./", "the locked set installs before the code changes"
    (package,) = [run for run in runs if "install --no-deps ." in run]
    assert "check" in package  # the package needs nothing beyond the locked set
    assert [(k, rest) for k, rest in final.instructions if k in ("COPY", "ADD")] == \
        [("COPY", f"--from=build {VENV} {VENV}")]
    assert ("ENV", f"PATH={VENV}/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1") in \
        final.instructions
    assert ("USER", "10001:10001") in final.instructions
    assert dead_weight([build, final]) == []


def test_a_copy_that_a_later_layer_deletes_is_caught() -> None:
    """The image as it was before issue 17: the wheels copied, then removed in another layer."""
    before = """
        FROM python:3.11-slim AS build
        RUN pip wheel --no-cache-dir --wheel-dir /wheels .
        FROM python:3.11-slim
        COPY --from=build /wheels /wheels
        RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
    """
    assert dead_weight(parse_dockerfile(before)) == ["/wheels"]


def ignored(patterns: list[str], path: str) -> bool:
    """Whether the build context leaves `path` out: a .dockerignore pattern matches it or one
    of its folders (`**` any number of folders, `*` and `?` within one name)."""
    def regex(pattern: str) -> re.Pattern[str]:
        out = ""
        for part in re.split(r"(\*\*/|\*\*|\*|\?|\[[^]]*\])", pattern.strip("/")):
            out += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part) or (
                part if part.startswith("[") else re.escape(part))
        return re.compile(out)

    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    return any(regex(p).fullmatch(prefix) for p in patterns for prefix in prefixes)


def test_the_build_context_leaves_the_caches_out_and_keeps_what_the_image_needs() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert not any(p.startswith("!") for p in patterns)
    for cache in (".git/HEAD", ".venv/bin/python", "pluginctl.egg-info/PKG-INFO",
                  ".mypy_cache/3.11/x.json", ".hypothesis/examples/x", ".pytest_cache/v/x",
                  ".ruff_cache/x", ".import_linter_cache/x", "controller/__pycache__/a.pyc",
                  "controller/registry/__pycache__/app.cpython-311.pyc", "build/lib/x.py",
                  "pluginctl.db", "tests/unit/test_release.py", "manifests/base/deployment.yaml"):
        assert ignored(patterns, cache), cache
    copied = [LOCK, "pyproject.toml", "README.md", "controller/py.typed",
              *(str(p.relative_to(ROOT)) for p in (ROOT / "controller").rglob("*")
                if p.is_file() and "__pycache__" not in p.parts)]
    assert [path for path in copied if ignored(patterns, path)] == []


def images(document: Any) -> list[str]:
    if isinstance(document, dict):
        return [v for k, v in document.items() if k == "image" and isinstance(v, str)] + \
            [i for v in document.values() for i in images(v)]
    if isinstance(document, list):
        return [i for v in document for i in images(v)]
    return []


def test_the_manifests_run_the_image_of_this_version() -> None:
    package = pyproject()["project"]["version"]
    deployment = yaml.safe_load((ROOT / "manifests/base/deployment.yaml").read_text())
    assert images(deployment) == [f"{IMAGE}:{package}"] * 2  # the migration and the controller
    ours = [image for path in sorted((ROOT / "manifests").rglob("*.yaml"))
            for document in yaml.safe_load_all(path.read_text())
            for image in images(document) if image.startswith(f"{IMAGE}:")]
    assert set(ours) == {f"{IMAGE}:{package}"}, ours


# --- the version -----------------------------------------------------------------------------

def test_the_version_is_the_package_version_everywhere() -> None:
    package = pyproject()["project"]["version"]
    assert version() == installed_version("pluginctl") == package
    assert version_line() == f"pluginctl {package} (Python {platform.python_version()})"
    assert user_agent() == f"pluginctl/{package}"
    assert user_agent("replica-a") == f"pluginctl/{package} (replica-a)"


@pytest.mark.parametrize(("caller", "named"), [
    ("op-a", "op-a"), ("pod-7f9c@10.0.0.3", "pod-7f9c@10.0.0.3"),
    ("a (b)\\c", "a _b__c"), ("line\nbreak", "line_break"), ("café", "caf_"),
])
def test_the_user_agent_names_the_caller_and_stays_one_header_comment(
        caller: str, named: str) -> None:
    agent = user_agent(caller)
    assert agent.isprintable() and agent.isascii()
    assert caller_of(agent) == named


@pytest.mark.parametrize("agent", ["pluginctl/0.1.0", "curl/8.0 (x)", "", "pluginctl/1 ()"])
def test_a_user_agent_that_names_no_caller_of_ours(agent: str) -> None:
    assert caller_of(agent) is None


def test_pluginctl_version_as_a_process() -> None:
    script = Path(sys.executable).with_name("pluginctl")
    done = subprocess.run([str(script), "--version"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (
        0, f"pluginctl {pyproject()['project']['version']} (Python "
           f"{platform.python_version()})\n", "")
