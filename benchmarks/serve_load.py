"""edgepack serve under load from wrk, beside a bare ``session.run`` and peer servers, in one run.

On 127.0.0.1, with the server pinned to one core (``taskset -c 0``) and wrk to the other (``-c 1``):

1. trains a 30-feature random forest (50 trees, depth 8) and a second one (another seed) and
   builds both with ``edgepack build --target edge`` (one onnxruntime thread): the served bundle
   and the ``--shadow`` candidate;
2. the raw in-process ``session.run`` p50 at batch 1, in a subprocess on the server's core;
3. ``edgepack serve`` with ``--log-dir`` (input validation and metrics are always on): time from
   spawn to ``/v2/health/ready`` = 200, p50/p99 and requests/s at concurrency 1 and 16 (one-row
   v2 JSON POSTs), resident memory after the load (VmRSS and peak VmHWM from /proc);
4. the same with ``--shadow CANDIDATE`` (the candidate's worker process shares the server's core);
5. peers on the same model.onnx, each from its own venv under ``~/.cache/edgepack/bench-venvs``
   (made on first use, see ``serve_peers.py``): a hand-written FastAPI + uvicorn (uvloop,
   httptools) endpoint, KServe's Python ``ModelServer`` and BentoML 1.4. A peer that does not
   install or start is reported and skipped;
6. one table of medians over ``--rounds`` (every server once per round, rounds interleaved so
   slow noise on this shared host hits all alike) and the targets with PASS/FAIL.

Latency percentiles are from real per-request samples: wrk's own histogram always holds synthetic
samples added by its coordinated-omission correction (see ``wrk_load.py``); wrk's figures are kept
in the ``--json`` output as ``wrk_p50_ms``/``wrk_p99_ms`` for comparison. Requests/s is wrk's.

    python benchmarks/serve_load.py [--rounds 3] [--duration 10] [--peers fastapi,kserve,bentoml]
                                    [--skip-peers] [--json figures.json]

Needs wrk (``apt-get install wrk``) and taskset (util-linux); run from the repository root with
edgepack importable (``PYTHONPATH=$PWD``).
"""

from __future__ import annotations

import argparse
import functools
import http.client
import json
import math
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_latency import RAW_LOOP
from serve_peers import PEERS, Peer, ensure_venv
from wrk_load import check_wrk, run_wrk

REPO = Path(__file__).resolve().parents[1]
SERVER_CPU, CLIENT_CPU = 0, 1
NAME = "rf30"
TARGETS = {"c1_p50_ms": 0.35, "c16_vs_fastapi": 1.1, "shadow_p99_ratio": 1.05, "startup_s": 0.5, "rss_mb": 90.0}

TRAIN = """
import sys
import numpy as np
import skops.io as sio
from sklearn.ensemble import RandomForestClassifier
seed, out = int(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(0)
X = rng.normal(size=(4000, 30)).astype(np.float32)
y = (X[:, 0] + X[:, 1] * X[:, 2] - 0.5 * X[:, 3] > 0).astype(np.int64)
model = RandomForestClassifier(n_estimators=50, max_depth=8, random_state=seed).fit(X, y)
sio.dump(model, f"{out}/forest{seed}.skops")
np.save(f"{out}/sample.npy", X[:256])
"""

RAW = RAW_LOOP  # the bare session.run loop serve_latency.py times, in a subprocess on the server's core


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def build_bundles(folder: Path) -> tuple[Path, Path, bytes]:
    """(served bundle folder, shadow candidate folder, a one-row v2 JSON body)."""
    from edgepack.runtime.bundle import extract_archive

    roots = []
    for seed in (0, 1):
        subprocess.run([sys.executable, "-c", TRAIN, str(seed), str(folder)], check=True, env=_env())
        command = [sys.executable, "-m", "edgepack", "build", str(folder / f"forest{seed}.skops"), "--sample",
                   str(folder / "sample.npy"), "--target", "edge", "--quantize", "none", "--name", NAME,
                   "--trust", "sklearn.tree._tree.Tree", "--out", str(folder / f"dist{seed}"), "--json"]
        done = subprocess.run(command, check=False, capture_output=True, text=True, env=_env(), cwd=folder)
        if done.returncode != 0:
            raise SystemExit(f"edgepack build failed:\n{done.stderr}")
        roots.append(extract_archive(folder / json.loads(done.stdout)["bundle"], folder / f"bundle{seed}"))
    row = np.load(folder / "sample.npy")[:1]
    body = json.dumps({"inputs": [{"name": "X", "shape": [1, 30], "datatype": "FP32",
                                   "data": row.reshape(-1).tolist()}]}).encode()
    return roots[0], roots[1], body


def raw_session_run(root: Path, seconds: float) -> dict[str, float]:
    done = subprocess.run(["taskset", "-c", str(SERVER_CPU), sys.executable, "-c", RAW, str(root), str(seconds)],
                          capture_output=True, text=True, check=True, timeout=seconds + 120)
    return json.loads(done.stdout)


class Server:
    """A server process pinned to SERVER_CPU; ready once ``ready_path`` answers 200."""

    def __init__(self, command: list[str], env: dict[str, str], cwd: Path, log: Path, ready_path: str,
                 port: int | None) -> None:
        self.log = log
        self.started = time.perf_counter()
        with open(log, "wb") as out:
            self.process = subprocess.Popen(["taskset", "-c", str(SERVER_CPU), *command], env=env, cwd=cwd,
                                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.port = port or self._port_from_log()
        self.ready_s = self._wait(ready_path)

    def _port_from_log(self, timeout: float = 60) -> int:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            match = re.search(r"on http://127\.0\.0\.1:(\d+)", self.log.read_text(errors="replace"))
            if match:
                return int(match.group(1))
            if self.process.poll() is not None:
                break
            time.sleep(0.002)
        self.stop()
        raise RuntimeError(f"no port in the server's log: {self.log.read_text(errors='replace')[-2000:]}")

    def _wait(self, path: str, timeout: float = 120) -> float:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}): "
                                   f"{self.log.read_text(errors='replace')[-2000:]}")
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                connection.request("GET", path)
                if connection.getresponse().status == 200:
                    return time.perf_counter() - self.started
            except OSError:
                pass
            time.sleep(0.002)
        self.stop()
        raise RuntimeError(f"not ready within {timeout} s: {self.log.read_text(errors='replace')[-2000:]}")

    def memory_mb(self) -> tuple[float, float]:
        """(VmRSS, VmHWM) summed over the server's process tree (BentoML runs several processes)."""
        rss = hwm = 0.0
        for pid in _tree(self.process.pid):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            fields = {line.split(":")[0]: int(line.split()[1]) / 1024 for line in status.splitlines()
                      if line.startswith(("VmRSS", "VmHWM"))}
            rss, hwm = rss + fields.get("VmRSS", 0), hwm + fields.get("VmHWM", 0)
        return rss, hwm

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass


def _tree(pid: int) -> list[int]:
    pids, queue = [], [pid]
    while queue:
        current = queue.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                queue.extend(int(child) for child in (task / "children").read_text().split())
            except OSError:
                pass
    return pids


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(server: Server, body: bytes, seconds: float) -> dict:
    url = f"http://127.0.0.1:{server.port}/v2/models/{NAME}/infer"
    run_wrk(url, body, 1, min(2.0, seconds), CLIENT_CPU)  # warm-up
    c1 = run_wrk(url, body, 1, seconds, CLIENT_CPU)
    c16 = run_wrk(url, body, 16, seconds, CLIENT_CPU)
    rss, hwm = server.memory_mb()
    return {"startup_s": server.ready_s, "c1": c1.as_dict(), "c16": c16.as_dict(), "rss_mb": rss, "hwm_mb": hwm}


def start_edgepack(root: Path, work: Path, shadow: Path | None, tag: str) -> Server:
    log_dir = work / f"predictions-{tag}"
    command = [sys.executable, "-m", "edgepack", "serve", str(root), "--host", "127.0.0.1", "--port", "0",
               "--log-dir", str(log_dir)]
    if shadow is not None:
        command += ["--shadow", str(shadow)]
    return Server(command, _env(), work, work / f"{tag}.log", "/v2/health/ready", None)


def start_peer(peer: Peer, root: Path, work: Path) -> Server:
    port = _free_port()
    command, extra = peer.command(work, root / "model.onnx", NAME, port)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return Server(command, {**env, **extra}, work, work / f"{peer.name}.log", peer.ready_path, port)


def run_round(servers: dict, body: bytes, seconds: float) -> dict[str, dict]:
    figures = {}
    for name, start in servers.items():
        say(f"  {name}")
        try:
            server = start()
        except (RuntimeError, OSError) as err:
            say(f"    {name} did not start: {err}")
            continue
        try:
            figures[name] = measure(server, body, seconds)
            f = figures[name]
            say(f"    ready {f['startup_s']:.2f} s; c=1 p50 {f['c1']['p50_ms']:.3f} ms p99 {f['c1']['p99_ms']:.3f} ms; "
                f"c=16 {f['c16']['rps']:.0f} req/s p99 {f['c16']['p99_ms']:.2f} ms; RSS {f['rss_mb']:.0f} MB")
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            say(f"    {name} failed under load: {err}")
        finally:
            server.stop()
    return figures


def medians(rounds: list[dict[str, dict]]) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    names = [name for name in rounds[0]] + [n for r in rounds[1:] for n in r if n not in rounds[0]]
    for name in dict.fromkeys(names):
        seen = [r[name] for r in rounds if name in r]
        row = {key: statistics.median(f[level][metric] for f in seen) for key, level, metric in (
            ("c1_p50_ms", "c1", "p50_ms"), ("c1_p99_ms", "c1", "p99_ms"), ("c16_p50_ms", "c16", "p50_ms"),
            ("c16_p99_ms", "c16", "p99_ms"), ("c16_rps", "c16", "rps"), ("c1_wrk_p99_ms", "c1", "wrk_p99_ms"))}
        row.update({key: statistics.median(f[key] for f in seen) for key in ("startup_s", "rss_mb", "hwm_mb")})
        row["errors"] = sum(f["c1"]["errors"] + f["c16"]["errors"] for f in seen)
        ratios = [r[name]["c16"]["rps"] / r["fastapi"]["c16"]["rps"] for r in rounds if name in r and "fastapi" in r]
        row["vs_fastapi"] = statistics.median(ratios) if ratios else float("nan")
        row["rounds"] = len(seen)
        table[name] = row
    return table


def same_round_ratio(rounds: list[dict[str, dict]], level: str, metric: str) -> float:
    ratios = [r["edgepack+shadow"][level][metric] / r["edgepack"][level][metric] for r in rounds
              if "edgepack" in r and "edgepack+shadow" in r]
    return statistics.median(ratios) if ratios else float("nan")


def verdicts(table: dict[str, dict[str, float]], rounds: list[dict[str, dict]]) -> list[tuple[str, str, str, str]]:
    edge = table.get("edgepack", {})
    checks = [("c=1 p50 (edgepack)", edge.get("c1_p50_ms"), TARGETS["c1_p50_ms"], "ms", "<="),
              ("c=16 req/s vs FastAPI", edge.get("vs_fastapi"), TARGETS["c16_vs_fastapi"], "x", ">="),
              ("shadow/no-shadow c=1 p99", same_round_ratio(rounds, "c1", "p99_ms"), TARGETS["shadow_p99_ratio"], "x", "<="),
              ("startup to ready", edge.get("startup_s"), TARGETS["startup_s"], "s", "<="),
              ("RSS after load (VmRSS)", edge.get("rss_mb"), TARGETS["rss_mb"], "MB", "<=")]
    lines = []
    for label, value, target, unit, sense in checks:
        if value is None or math.isnan(value):
            lines.append((label, "n/a", f"{sense} {target:g} {unit}", "n/a"))
            continue
        passed = value <= target if sense == "<=" else value >= target
        lines.append((label, f"{value:.3f} {unit}", f"{sense} {target:g} {unit}", "PASS" if passed else "FAIL"))
    return lines


def _ratio(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="repeat every server this many times, interleaved")
    parser.add_argument("--peers", default="fastapi,kserve,bentoml")
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    if problem := check_wrk():
        raise SystemExit(problem)
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs two cores (server on one, wrk on the other)")
    peers = [] if args.skip_peers else [p for p in args.peers.split(",") if p]
    if unknown := [p for p in peers if p not in PEERS]:
        raise SystemExit(f"unknown peer(s) {unknown}: choose from {', '.join(PEERS)}")
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        work = Path(tmp)
        say("building the bundles (random forest, 30 features, 50 trees, depth 8)")
        root, candidate, body = build_bundles(work)
        servers = {"edgepack": lambda: start_edgepack(root, work, None, "edgepack"),
                   "edgepack+shadow": lambda: start_edgepack(root, work, candidate, "shadow")}
        skipped = {}
        for name in peers:
            if why := ensure_venv(PEERS[name], say):
                say(f"skipping {name}: {why}")
                skipped[name] = why
            else:
                servers[name] = functools.partial(start_peer, PEERS[name], root, work)
        raw = raw_session_run(root, min(args.duration, 5))
        say(f"raw session.run (batch 1, 1 thread, CPU {SERVER_CPU}): p50 {raw['p50_ms']:.4f} ms")
        rounds = []
        for index in range(args.rounds):
            say(f"round {index + 1}/{args.rounds}")
            order = list(servers)
            order = order[index % len(order):] + order[:index % len(order)]  # who goes first rotates
            rounds.append(run_round({name: servers[name] for name in order}, body, args.duration))
    table = medians([r for r in rounds if r])
    print(f"\nraw in-process session.run p50 {raw['p50_ms']:.4f} ms (batch 1)\n"
          f"medians of {args.rounds} round(s), {args.duration:g} s per wrk run; server on CPU {SERVER_CPU}, "
          f"wrk on CPU {CLIENT_CPU}; latencies from real samples (ms)")
    header = (f"{'server':<16} {'c=1 p50':>8} {'c=1 p99':>8} {'c=16 p50':>9} {'c=16 p99':>9} {'c=16 req/s':>11} "
              f"{'vs FastAPI':>11} {'startup s':>10} {'RSS MB':>7} {'peak MB':>8}")
    print(header)
    print("-" * len(header))
    for name, row in table.items():
        print(f"{name:<16} {row['c1_p50_ms']:>8.3f} {row['c1_p99_ms']:>8.3f} {row['c16_p50_ms']:>9.3f} "
              f"{row['c16_p99_ms']:>9.3f} {row['c16_rps']:>11.0f} {_ratio(row['vs_fastapi']):>11} "
              f"{row['startup_s']:>10.3f} {row['rss_mb']:>7.1f} {row['hwm_mb']:>8.1f}"
              + (f"  ({row['errors']} errors)" if row["errors"] else ""))
    for name, why in skipped.items():
        print(f"{name:<16} skipped: {why}")
    print(f"\nshadow/no-shadow p99 (median of same-round ratios): c=1 {same_round_ratio(rounds, 'c1', 'p99_ms'):.3f}, "
          f"c=16 {same_round_ratio(rounds, 'c16', 'p99_ms'):.3f}; the candidate's process shares the server's core")
    print("\ntargets (edgepack with validation, metrics and the prediction log on):")
    results = verdicts(table, rounds)
    for label, value, target, verdict in results:
        print(f"  {label:<26} {value:>12} {target:>12}  {verdict}")
    if args.json:
        args.json.write_text(json.dumps({"raw_session_run": raw, "rounds": rounds, "medians": table,
                                         "skipped": skipped, "targets": [dict(zip(("check", "value", "target",
                                                                                   "verdict"), r)) for r in results],
                                         "duration_s": args.duration, "server_cpu": SERVER_CPU,
                                         "client_cpu": CLIENT_CPU}, indent=2))
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
