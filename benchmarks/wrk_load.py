"""Load from ``wrk`` with per-request latencies that are real samples, not wrk's corrected histogram.

wrk 4.x (``wg/wrk`` src/wrk.c, ``main``) calls ``stats_correct(statistics.latency, interval)``
after every run, whatever the options, with ``interval = runtime_us / (complete / connections)``
(the mean time between requests on one connection). ``stats_correct`` (src/stats.c) walks every
recorded latency ``n >= 2 * interval`` and adds synthetic samples at ``n - interval``,
``n - 2 * interval``, ... down to ``interval``: the requests a fixed-rate client "would have sent"
while that slow one was outstanding (coordinated-omission correction). It runs before the
``Latency`` line, the ``--latency`` percentiles and the ``latency`` object a Lua ``done()`` gets,
so every latency wrk reports holds these synthetic samples; on a closed-loop benchmark (each
connection sends its next request when the last one is answered) they inflate p99 above what any
request saw, and the real samples cannot be told apart afterwards.

So the Lua script here times each request itself: ``request()`` stamps ``clock_gettime(MONOTONIC)``
(LuaJIT's FFI), ``response()`` appends the elapsed microseconds to a list, and ``done()`` collects
every thread's list (``thread:get``) into a file. A wrk thread's Lua state cannot tell its
connections apart, so wrk runs one connection per thread (``-t N -c N``): request and response
then pair up exactly. Requests/s is wrk's own count (complete responses / runtime).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INSTALL_HINT = "wrk is missing: apt-get install wrk (Debian/Ubuntu), brew install wrk, or build github.com/wg/wrk"

LUA = r"""
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } ep_timespec;
int clock_gettime(int clk_id, ep_timespec *tp);
]]
local clock = ffi.new("ep_timespec")
local function now_us()
  ffi.C.clock_gettime(1, clock)  -- CLOCK_MONOTONIC
  return tonumber(clock.tv_sec) * 1000000 + tonumber(clock.tv_nsec) / 1000
end

local threads = {}
function setup(thread) table.insert(threads, thread) end

local request_bytes, started = nil, 0
samples, bad, count = {}, 0, 0

function init(args)
  local file = io.open(os.getenv("EP_BODY_FILE"), "rb")
  local body = file:read("*a")
  file:close()
  request_bytes = wrk.format("POST", nil, {["Content-Type"] = "application/json"}, body)
end

function request()
  started = now_us()
  return request_bytes
end

function response(status, headers, body)
  count = count + 1
  samples[count] = now_us() - started
  if status ~= 200 then bad = bad + 1 end
end

function done(summary, latency, requests)
  local out = io.open(os.getenv("EP_SAMPLES_FILE"), "w")
  for _, thread in ipairs(threads) do
    for _, value in ipairs(thread:get("samples")) do out:write(string.format("%.1f\n", value)) end
    out:write(string.format("#bad %d\n", thread:get("bad")))
  end
  out:close()
end
"""


@dataclass(frozen=True)
class LoadResult:
    connections: int
    rps: float
    p50_ms: float  # from the real samples
    p99_ms: float
    samples: int
    errors: int  # non-200 answers and socket errors
    wrk_p50_ms: float  # wrk's own --latency figures, coordinated-omission corrected, for comparison
    wrk_p99_ms: float

    def as_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


def check_wrk() -> str | None:
    return None if shutil.which("wrk") else INSTALL_HINT


def run_wrk(url: str, body: bytes, connections: int, seconds: float, cpu: int | None) -> LoadResult:
    """``connections`` keep-alive connections, one wrk thread each, for ``seconds``."""
    with tempfile.TemporaryDirectory(prefix="wrk-load-") as tmp:
        folder = Path(tmp)
        (folder / "load.lua").write_text(LUA)
        (folder / "body.json").write_bytes(body)
        env = {**os.environ, "EP_BODY_FILE": str(folder / "body.json"), "EP_SAMPLES_FILE": str(folder / "samples")}
        command = ["wrk", "-t", str(connections), "-c", str(connections), "-d", f"{seconds:g}s", "--latency",
                   "--timeout", "10s", "-s", str(folder / "load.lua"), url]
        if cpu is not None:
            command = ["taskset", "-c", str(cpu), *command]
        done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=seconds + 60)
        if done.returncode != 0 or not (folder / "samples").is_file():
            raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
        lines = (folder / "samples").read_text().splitlines()
    values = np.array([float(line) for line in lines if line and not line.startswith("#")]) / 1000
    bad = sum(int(line.split()[1]) for line in lines if line.startswith("#bad"))
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", done.stdout)
    if socket_errors:
        bad += sum(int(n) for n in socket_errors.groups())
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", done.stdout).group(1))
    return LoadResult(connections, rps, float(np.percentile(values, 50)) if len(values) else float("nan"),
                      float(np.percentile(values, 99)) if len(values) else float("nan"), len(values), bad,
                      _wrk_percentile(done.stdout, "50"), _wrk_percentile(done.stdout, "99"))


def _wrk_percentile(text: str, which: str) -> float:
    match = re.search(rf"^\s+{which}%\s+([\d.]+)(us|ms|s)\s*$", text, re.MULTILINE)
    return float(match.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[match.group(2)] if match else float("nan")
