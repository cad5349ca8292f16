"""What do the prediction log and shadow mode cost the primary at concurrency 1?

Three servers of one bundle run at once, each ``python -m runtime serve`` pinned to core 0:
``plain`` (no log), ``log`` (``--log-dir``: one flushed line per request) and ``log+shadow``
(``--log-dir --shadow`` the same bundle, so the candidate's work equals the primary's). One client
on core 1 sends one-row v2 infer requests round-robin over three keep-alive connections, so the
three share the same noise; p50/p99 of each are printed. Nothing is asserted.

    python benchmarks/shadow_overhead.py BUNDLE.tar.gz [--requests 3000]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgepack.runtime.bundle import extract_archive


def start(root: Path, extra: list[str]) -> tuple[subprocess.Popen, int]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    process = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-m", "runtime", "serve", "--host",
                                "127.0.0.1", "--port", "0", *extra], cwd=root, env=env, stderr=subprocess.PIPE,
                               text=True)
    for line in process.stderr:  # type: ignore[union-attr]
        if match := re.search(r"^serving \S+ \S+ on http://127\.0\.0\.1:(\d+) ", line):
            return process, int(match.group(1))
    raise SystemExit(f"server did not start: {extra}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    os.sched_setaffinity(0, {1})
    with tempfile.TemporaryDirectory() as tmp:
        root = extract_archive(args.bundle, Path(tmp) / "b")
        manifest = json.loads((root / "manifest.json").read_text())
        width = manifest["inputs"][0]["shape"][1]
        configs = {"plain": [], "log": ["--log-dir", f"{tmp}/log1"],
                   "log+shadow": ["--log-dir", f"{tmp}/log2", "--shadow", str(root)]}
        servers = {name: start(root, extra) for name, extra in configs.items()}
        time.sleep(1)
        body = json.dumps({"inputs": [{"name": manifest["inputs"][0]["name"], "shape": [1, width],
                                       "datatype": "FP32", "data": [0.5] * width}]})
        path = f"/v2/models/{manifest['name']}/infer"
        connections = {name: http.client.HTTPConnection("127.0.0.1", port) for name, (_, port) in servers.items()}
        times: dict[str, list[float]] = {name: [] for name in servers}
        for i in range(args.requests + 300):
            for name, connection in connections.items():
                started = time.perf_counter()
                connection.request("POST", path, body, {"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    raise SystemExit(f"{name}: status {response.status}")
                if i >= 300:  # warm-up excluded
                    times[name].append(time.perf_counter() - started)
        for name, values in times.items():
            values.sort()
            p50, p99 = values[len(values) // 2], values[int(len(values) * 0.99)]
            print(f"{name:11s} p50 {p50 * 1e6:7.1f} us  p99 {p99 * 1e6:7.1f} us  ({len(values)} requests)")
        for process, _ in servers.values():
            process.terminate()
            process.wait()


if __name__ == "__main__":
    main()
