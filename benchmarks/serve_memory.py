"""Resident memory of ``python -m runtime serve`` under large request bodies.

Starts the server from an unpacked bundle (as a container runs it), then for each concurrency in
``--concurrency`` sends that many ``/predict`` bodies of ``--body-mb`` MiB at once (rows of the
bundle's own sample, repeated; one connection each) and prints the server's VmRSS before, its peak
(VmHWM, reset before each round through /proc/PID/clear_refs where writable, else the peak so far)
and VmRSS after, with the growth per request. Figures are printed; nothing is asserted.

    PYTHONPATH=$PWD python benchmarks/serve_memory.py [--bundle dist/x.tar.gz] [--body-mb 7]
                                                      [--concurrency 1,4,16] [--max-body-mb 32]

Without ``--bundle`` it builds ``examples/digits_mlp.skops`` (64 float inputs) for ``edge-1core``.
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
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_latency import build_example  # noqa: E402

from edgepack.runtime.bundle import extract_archive  # noqa: E402


def _status(pid: int) -> dict[str, float]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {line.split(":")[0]: int(line.split()[1]) / 1024 for line in text.splitlines()
            if line.startswith(("VmRSS", "VmHWM"))}


def _reset_peak(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _post(port: int, body: bytes, results: list, index: int) -> None:
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    connection.request("POST", "/predict", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    response.read()
    results[index] = (response.status, time.perf_counter() - started)
    connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="a bundle .tar.gz (default: build examples/digits_mlp.skops)")
    parser.add_argument("--body-mb", type=float, default=7.0)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--max-body-mb", type=float, default=32.0)
    parser.add_argument("--rounds", type=int, default=2, help="rounds per concurrency (the peak of all is kept)")
    parser.add_argument("--serve-args", default="", help="more flags for the server, e.g. '--body-memory-mb 8'")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="serve-memory-") as tmp:
        archive = args.bundle or build_example(Path(tmp) / "dist")
        root = extract_archive(archive, Path(tmp) / "bundle")
        manifest = json.loads((root / "manifest.json").read_text())
        with np.load(root / manifest["bench_input"]) as sample:
            rows = sample[manifest["inputs"][0]["name"]]
        one = json.dumps(rows.tolist()).encode()
        repeat = max(1, int(args.body_mb * 2**20 / len(one)))
        body = json.dumps({"rows": np.tile(rows, (repeat, 1)).tolist()}).encode()
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        process = subprocess.Popen([sys.executable, "-m", "runtime", "serve", "--host", "127.0.0.1", "--port", "0",
                                    "--max-body-mb", str(args.max_body_mb), *args.serve_args.split()], cwd=root, env=env,
                                   stderr=subprocess.PIPE, text=True)
        try:
            line = process.stderr.readline()
            match = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
            if not match:
                raise SystemExit(f"the server did not start: {line}{process.stderr.read()}")
            port = int(match.group(1))
            threading.Thread(target=process.stderr.read, daemon=True).start()
            print(f"body: {len(body) / 2**20:.2f} MiB ({len(rows) * repeat} rows of {rows.shape[1]} values), "
                  f"--max-body-mb {args.max_body_mb:g} {args.serve_args}")
            print(f"{'concurrent':>10} {'RSS before':>11} {'peak':>9} {'RSS after':>10} {'peak-before':>12} "
                  f"{'per request':>12} {'statuses':>10} {'max s':>6}")
            for count in (int(c) for c in args.concurrency.split(",")):
                before = _status(process.pid)["VmRSS"]
                exact = _reset_peak(process.pid)
                statuses, slowest = set(), 0.0
                for _ in range(args.rounds):
                    results: list = [None] * count
                    threads = [threading.Thread(target=_post, args=(port, body, results, i)) for i in range(count)]
                    for thread in threads:
                        thread.start()
                    for thread in threads:
                        thread.join()
                    statuses |= {status for status, _ in results}
                    slowest = max(slowest, *(took for _, took in results))
                after = _status(process.pid)
                grown = after["VmHWM"] - before
                print(f"{count:>10} {before:>9.1f}MB {after['VmHWM']:>7.1f}MB{'' if exact else '*'} "
                      f"{after['VmRSS']:>8.1f}MB {grown:>10.1f}MB {grown / count:>10.1f}MB "
                      f"{','.join(map(str, sorted(statuses))):>10} {slowest:>6.2f}")
            if not exact:
                print("* peak since the server started (/proc/PID/clear_refs not writable here)")
        finally:
            process.terminate()
            process.wait(timeout=30)


if __name__ == "__main__":
    main()
