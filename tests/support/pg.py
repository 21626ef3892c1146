"""A throwaway PostgreSQL server for the test suite: initdb into a temporary directory, start
it on a free loopback port, stop and delete it afterwards. Uses the server binaries of
Debian's `postgresql` package (or PLUGINCTL_PG_BINDIR)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from controller.registry.serving import free_port


class PostgresUnavailable(RuntimeError):
    pass


def find_bindir() -> Path:
    explicit = os.environ.get("PLUGINCTL_PG_BINDIR")
    candidates = [explicit] if explicit else []
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                         key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit()
                         else 0, reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(str(Path(initdb).resolve().parent))
    for candidate in candidates:
        if candidate and (Path(candidate) / "initdb").exists() and (
                Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    raise PostgresUnavailable(
        "PostgreSQL server binaries not found: install Debian's `postgresql` package "
        "(bash .ci/run does), set PLUGINCTL_PG_BINDIR, or point PLUGINCTL_TEST_PG_URL at a server"
    )


@dataclass
class PostgresServer:
    url: str  # postgresql+psycopg://postgres@127.0.0.1:PORT/postgres
    datadir: Path
    bindir: Path
    as_user: list[str]

    def pg_ctl(self, *args: str) -> None:
        subprocess.run([*self.as_user, str(self.bindir / "pg_ctl"), "-D", str(self.datadir),
                        *args], check=True, capture_output=True, timeout=120)

    def stop(self) -> None:
        self.pg_ctl("stop", "-m", "immediate", "-w")

    def start(self) -> None:
        self.pg_ctl("start", "-w", "-l", str(self.datadir / "server.log"))


def start(durable: bool = False) -> PostgresServer:
    """A new server. Not `durable`: commits may be lost when it is killed (fast); durable:
    a commit survives `stop()` (immediate shutdown), as on a real server."""
    bindir = find_bindir()
    base = Path(tempfile.mkdtemp(prefix="pluginctl-pg-"))
    datadir = base / "data"
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root: run the server as `postgres`
        if shutil.which("runuser") is None:
            raise PostgresUnavailable("running as root without `runuser` to drop to postgres")
        shutil.chown(base, user="postgres", group="postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(datadir), "-U", "postgres",
                    "-A", "trust", "-E", "UTF8", "--no-sync"],
                   check=True, capture_output=True, timeout=300)
    with (datadir / "postgresql.conf").open("a") as conf:
        conf.write(f"\nlisten_addresses = '127.0.0.1'\nport = {port}\n"
                   f"unix_socket_directories = '{datadir}'\nfsync = off\n"
                   f"synchronous_commit = {'on' if durable else 'off'}\n"
                   "full_page_writes = off\nmax_connections = 200\n")
    server = PostgresServer(f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres",
                            datadir, bindir, as_user)
    server.start()
    return server


def destroy(server: PostgresServer) -> None:
    try:
        server.stop()
    finally:
        shutil.rmtree(server.datadir.parent, ignore_errors=True)
