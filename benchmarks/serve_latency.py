"""What does the HTTP server add over a bare ``session.run``, and where should inference run?

In one run, on one bundle: the raw in-process ``session.run`` p50 (one row, the bundle's threads);
then, for each placement of inference (``--inference loop``: on the event loop; ``thread``: in a
thread pool; ``auto``: the loop for runs expected under 1 ms), a fresh ``python -m runtime serve``
started from the unpacked bundle as a container would run it, with its time from spawn to
``/v2/health/ready`` = 200 and its resident memory, p50/p99 at concurrency 1 over one keep-alive
connection (``http.client``; v2 JSON infer and ``/predict``), and requests/s at concurrency 16
(``wrk`` with a Lua script for the POST body when installed, else 16 client threads). The server is
pinned to one core (``taskset -c 0``), the client to the other. Figures are printed; nothing is asserted.

    python benchmarks/serve_latency.py [--bundle dist/x.tar.gz] [--seconds 5] [--placements auto,loop,thread]

Without ``--bundle`` it builds ``examples/digits_mlp.skops`` (a 2x512 MLP) for ``edge-1core`` first.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from edgepack.runtime.bundle import extract_archive

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

RAW_LOOP = """
import json, sys, time
from pathlib import Path
import numpy as np
sys.path.insert(0, sys.argv[1])
from runtime.session import create_session, load_inputs, make_feed
root, seconds = Path(sys.argv[1]), float(sys.argv[2])
manifest = json.loads((root / "manifest.json").read_text())
session, _ = create_session(root / manifest["model"], manifest["target"]["threads"])
feed, _ = make_feed(session, load_inputs(root / manifest["bench_input"]), batch=1)
for _ in range(500):
    session.run(None, feed)
samples, deadline = [], time.perf_counter() + seconds
while time.perf_counter() < deadline:
    t0 = time.perf_counter_ns()
    session.run(None, feed)
    samples.append(time.perf_counter_ns() - t0)
print(json.dumps({"p50_ms": float(np.median(samples)) / 1e6, "p99_ms": float(np.percentile(samples, 99)) / 1e6}))
"""


def pinned(cpu: int | None, command: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *command] if cpu is not None and shutil.which("taskset") else command


def raw_p50(root: Path, cpu: int | None, seconds: float) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(pinned(cpu, [sys.executable, "-c", RAW_LOOP, str(root), str(seconds)]), env=env,
                          capture_output=True, text=True, check=True, timeout=seconds + 120)
    return json.loads(done.stdout)


class Server:
    """``python -m runtime serve`` from the unpacked bundle, only the bundle on its path."""

    def __init__(self, root: Path, placement: str, cpu: int | None) -> None:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            pinned(cpu, [sys.executable, "-m", "runtime", "serve", "--host", "127.0.0.1", "--port", "0",
                         "--inference", placement]), cwd=root, env=env, stderr=subprocess.PIPE, text=True)
        line = self.process.stderr.readline()
        match = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
        if not match:
            self.process.kill()
            raise SystemExit(f"the server did not start: {line}{self.process.stderr.read()}")
        self.port = int(match.group(1))
        self.log_line = line.strip()
        self.ready_s = self._wait_ready()

    def _wait_ready(self) -> float:
        while True:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                connection.request("GET", "/v2/health/ready")
                if connection.getresponse().status == 200:
                    return time.perf_counter() - self.started
            except OSError:
                pass
            time.sleep(0.002)

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> tuple[float, float]:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        values = {line.split(":")[0]: int(line.split()[1]) / 1024 for line in status.splitlines()
                  if line.startswith(("VmRSS", "VmHWM"))}
        return values["VmRSS"], values["VmHWM"]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def c1_latency(port: int, path: str, body: bytes | None, seconds: float) -> dict[str, float]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Content-Type": "application/json"}
    method = "GET" if body is None else "POST"

    def once() -> None:
        connection.request(method, path, body, headers)
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise SystemExit(f"{path} answered {response.status}")

    for _ in range(300):
        once()
    samples, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter_ns()
        once()
        samples.append(time.perf_counter_ns() - t0)
    connection.close()
    ms = np.asarray(samples) / 1e6
    return {"p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)), "runs": len(samples)}


def throughput(port: int, path: str, body: bytes, seconds: float, concurrency: int) -> dict[str, float | str]:
    if shutil.which("wrk"):
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
            script.write(f'wrk.method = "POST"\nwrk.body = {json.dumps(body.decode())}\n'
                         'wrk.headers["Content-Type"] = "application/json"\n')
        try:
            done = subprocess.run(["wrk", "-t", "2", "-c", str(concurrency), "-d", f"{seconds:g}s", "--latency",
                                   "-s", script.name, f"http://127.0.0.1:{port}{path}"],
                                  capture_output=True, text=True, check=True, timeout=seconds + 60)
        finally:
            os.unlink(script.name)
        rate = float(re.search(r"Requests/sec:\s+([\d.]+)", done.stdout).group(1))
        non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", done.stdout)
        p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", done.stdout)
        p99_ms = float(p99.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[p99.group(2)] if p99 else float("nan")
        return {"rps": rate, "p99_ms": p99_ms, "errors": int(non_2xx.group(1)) if non_2xx else 0, "client": "wrk"}
    counts = [0] * concurrency
    deadline = time.perf_counter() + seconds

    def worker(index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while time.perf_counter() < deadline:
            connection.request("POST", path, body, {"Content-Type": "application/json"})
            connection.getresponse().read()
            counts[index] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"rps": sum(counts) / (time.perf_counter() - started), "p99_ms": float("nan"), "errors": 0,
            "client": "python threads"}


def build_example(out: Path) -> Path:
    from edgepack.pipeline import build
    from edgepack.spec import BuildSpec

    spec = BuildSpec(model=EXAMPLES / "digits_mlp.skops", sample=EXAMPLES / "digits_sample.npy", target="edge-1core",
                     out=out, quantize="none", bench_time_s=0.2)
    return build(spec).bundle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="a bundle .tar.gz (default: build examples/digits_mlp.skops)")
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--placements", default="auto,loop,thread")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="serve-latency-") as tmp:
        archive = args.bundle or build_example(Path(tmp) / "dist")
        root = extract_archive(archive, Path(tmp) / "bundle")
        if not (root / "runtime" / "server.py").is_file():
            raise SystemExit(f"{archive} was built before the server existed: rebuild it")
        manifest = json.loads((root / "manifest.json").read_text())
        with np.load(root / manifest["bench_input"]) as sample:
            row = sample[manifest["inputs"][0]["name"]][:1]
        name, features = manifest["name"], manifest["inputs"][0]
        v2_body = json.dumps({"inputs": [{"name": features["name"], "shape": list(row.shape),
                                          "datatype": "FP32", "data": row.reshape(-1).tolist()}]}).encode()
        predict_body = json.dumps({"rows": row.tolist()}).encode()
        infer_path = f"/v2/models/{name}/infer"
        if hasattr(os, "sched_setaffinity") and args.client_cpu is not None:
            os.sched_setaffinity(0, {args.client_cpu})
        raw = raw_p50(root, args.server_cpu, args.seconds)
        print(f"bundle {name} {manifest['version']} ({manifest['variant']}, {len(row.reshape(-1))} input values, "
              f"target threads {manifest['target']['threads']}); server on CPU {args.server_cpu}, client on CPU "
              f"{args.client_cpu}")
        print(f"raw session.run, in process: p50 {raw['p50_ms'] * 1000:.1f} us, p99 {raw['p99_ms'] * 1000:.1f} us")
        rows = []
        for placement in args.placements.split(","):
            server = Server(root, placement, args.server_cpu)
            try:
                rss, hwm = server.rss_mb()
                live = c1_latency(server.port, "/v2/health/live", None, args.seconds / 2)
                v2 = c1_latency(server.port, infer_path, v2_body, args.seconds)
                predict = c1_latency(server.port, "/predict", predict_body, args.seconds)
                cpu_before, wall_before = server.cpu_s(), time.perf_counter()
                loaded = throughput(server.port, infer_path, v2_body, args.seconds, args.concurrency)
                # Requests per CPU-second of the server: on a shared host the server's share of its
                # core varies run to run (other load, how many threads it has), this does not.
                loaded["per_cpu_s"] = loaded["rps"] * (time.perf_counter() - wall_before) / max(server.cpu_s() - cpu_before, 1e-9)
                rss_after, hwm_after = server.rss_mb()
            finally:
                server.stop()
            rows.append((placement, server.ready_s, rss, hwm_after, live, v2, predict, loaded))
            print(f"  {server.log_line}")
        print(f"\n{'inference':<10} {'ready s':>8} {'RSS MB':>7} {'peak MB':>8} {'live p50':>9} {'v2 p50':>7} "
              f"{'v2 p99':>7} {'predict p50':>12} {'req/s c=' + str(args.concurrency):>12} {'p99 ms':>7} {'req/CPU-s':>10}")
        for placement, ready_s, rss, hwm, live, v2, predict, loaded in rows:
            print(f"{placement:<10} {ready_s:>8.3f} {rss:>7.1f} {hwm:>8.1f} {live['p50_ms'] * 1000:>9.0f} "
                  f"{v2['p50_ms'] * 1000:>7.0f} {v2['p99_ms'] * 1000:>7.0f} {predict['p50_ms'] * 1000:>12.0f} "
                  f"{loaded['rps']:>12.0f} {loaded['p99_ms']:>7.2f} {loaded['per_cpu_s']:>10.0f}"
                  + (f"  ({loaded['errors']} errors)" if loaded["errors"] else ""))
        overhead = statistics.median(row[5]["p50_ms"] for row in rows) - raw["p50_ms"]
        floor = statistics.median(row[4]["p50_ms"] for row in rows)
        print(f"(latencies in us at c=1, one keep-alive connection; live p50 = the HTTP round trip with this "
              f"client and no work)\nserver + client overhead at c=1 (median over placements, v2 JSON): "
              f"{overhead * 1000:.0f} us per request, of which {floor * 1000:.0f} us is the bare round trip; "
              f"c={args.concurrency} client: {rows[0][7]['client']}")


if __name__ == "__main__":
    main()
