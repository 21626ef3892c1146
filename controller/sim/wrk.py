"""The bench's heartbeat load from wrk (a C load generator, Debian's `wrk`): authenticated
heartbeat POSTs rotating over prepared (token, body) pairs, driven by a Lua script whose
`done()` prints the figures as one JSON line. Used by `controller.sim.bench` when `wrk` is
on PATH; the Python client there is the fallback."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MARK = "PLUGINCTL_WRK "  # the line done() prints; everything else wrk prints is ignored

# Each wrk thread has its own Lua state: init() reads the pairs and formats every request
# once, then request() only hands them out in turn, each thread from its own offset (so the
# threads do not send the same workspace at the same moment). No response() callback: it
# would make wrk parse every response into Lua.
SCRIPT = r"""
local pairs_file = os.getenv("PLUGINCTL_WRK_PAIRS")
local threads_seen = 0
local formatted = {}
local next_one = 1

function setup(thread)
  thread:set("offset", threads_seen)
  threads_seen = threads_seen + 1
end

function init(args)
  local path = wrk.path
  for line in io.lines(pairs_file) do
    local tab = string.find(line, "\t", 1, true)
    local token = string.sub(line, 1, tab - 1)
    local body = string.sub(line, tab + 1)
    formatted[#formatted + 1] = wrk.format("POST", path, {
      ["Authorization"] = "Bearer " .. token,
      ["Content-Type"] = "application/json"}, body)
  end
  local share = math.floor(#formatted / math.max(1, tonumber(args[1]) or 1))
  next_one = (offset or 0) * share % #formatted + 1
end

function request()
  local r = formatted[next_one]
  next_one = next_one % #formatted + 1
  return r
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "max_us": %d, ' ..
    '"connect_errors": %d, "read_errors": %d, "write_errors": %d, "status_errors": %d, ' ..
    '"timeouts": %d}\n',
    os.getenv("PLUGINCTL_WRK_MARK"), summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


class WrkError(RuntimeError):
    pass


@dataclass(frozen=True)
class Pair:
    """One heartbeat of the rotation: the bearer token and the JSON body sent with it."""

    token: str
    body: bytes


def available() -> str | None:
    """The wrk executable on PATH, if any."""
    return shutil.which("wrk")


@dataclass(frozen=True)
class Load:
    """How hard to push: wrk's connections and threads, for this long (wrk counts whole
    seconds)."""

    seconds: float
    connections: int
    threads: int = 2

    def flags(self) -> list[str]:
        threads = max(1, min(self.threads, self.connections))
        return ["-t", str(threads), "-c", str(self.connections),
                "-d", f"{max(1, round(self.seconds))}s", "--timeout", "10s"]


def _write_pairs(path: Path, pairs: Sequence[Pair]) -> None:
    with path.open("wb") as out:
        for pair in pairs:
            if b"\n" in pair.body or "\t" in pair.token or "\n" in pair.token:
                raise ValueError("a token or body of the rotation spans lines")
            out.write(pair.token.encode() + b"\t" + pair.body + b"\n")


def parse(output: str) -> dict[str, Any]:
    """The figures of one wrk run, from the JSON line the script's done() printed."""
    for line in output.splitlines():
        if line.startswith(MARK):
            raw = json.loads(line[len(MARK):])
            break
    else:
        raise WrkError(f"wrk printed no figures:\n{output[-2000:]}")
    seconds = raw["duration_us"] / 1e6
    errors = sum(raw[key] for key in ("connect_errors", "read_errors", "write_errors",
                                      "status_errors", "timeouts"))
    return {
        "requests_per_second": round(raw["requests"] / seconds, 1) if seconds else None,
        "p50_ms": round(raw["p50_us"] / 1000, 2), "p99_ms": round(raw["p99_us"] / 1000, 2),
        "max_ms": round(raw["max_us"] / 1000, 2),
        "requests": raw["requests"], "errors": errors,
        "non_2xx": raw["status_errors"], "seconds": round(seconds, 3),
    }


async def measure(url: str, pairs: Sequence[Pair], load: Load) -> dict[str, Any]:
    """Run wrk against `url` (a full URL; every request POSTs to its path) and return rate,
    p50, p99 (ms), requests and errors."""
    executable = available()
    if executable is None:
        raise WrkError("wrk is not on PATH")
    if not pairs:
        raise ValueError("no heartbeats to send")
    with tempfile.TemporaryDirectory(prefix="pluginctl-wrk-") as scratch:
        script, data = Path(scratch) / "heartbeat.lua", Path(scratch) / "pairs.tsv"
        script.write_text(SCRIPT)
        _write_pairs(data, pairs)
        process = await asyncio.create_subprocess_exec(
            executable, *load.flags(), "-s", str(script), url, "--",
            str(max(1, min(load.threads, load.connections))),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={"PLUGINCTL_WRK_PAIRS": str(data), "PLUGINCTL_WRK_MARK": MARK,
                 "PATH": "/usr/bin:/bin"})
        out, err = await process.communicate()
    if process.returncode != 0:
        raise WrkError(f"wrk exited with {process.returncode}: {err.decode()[-2000:]}")
    return parse(out.decode())
