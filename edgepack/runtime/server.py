"""``python -m runtime serve`` (in a bundle or image) and ``edgepack serve``: verify, load, serve HTTP.

The bundle is verified before anything else: a tampered one never gets a port. The socket is then
bound and listening at once (clients queue instead of being refused) while the model loads in a
thread, so /v2/health/live answers during a long load and /v2/health/ready turns 200 once a
warm-up ran. uvicorn serves the app with uvloop and httptools when they are installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .batching import DEFAULT_MAX_BATCH
from .bundle import extract_archive, verify_dir
from .errors import EdgepackError, InputError, UnsupportedHere
from .requirements import SERVE
from .rollout_state import RolloutSpec

DEFAULT_PORT = 8080
UNPACKED_PREFIX = "edgepack-serve-"  # then the server's pid: see remove_stale_unpacked
# Longer than the idle timeout of common load balancers (60 s): a server that closes an idle
# connection first races the balancer's next request on it, which then fails with a 502.
KEEP_ALIVE_S = 75


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    max_body_mb: float = 32  # app.DEFAULT_MAX_BODY_MB: one 640x640x3 float32 image as v2 JSON (~24 MiB), see there
    allow_nonfinite: bool = False
    access_log: bool = False
    placement: str = "auto"  # where inference runs: auto, loop or thread (see models.INLINE_BUDGET_S)
    threads: int | None = None  # onnxruntime intra-op threads; None: the bundle's target profile's
    log_dir: Path | None = None  # the prediction log's folder; None: no log
    log_sample_rate: float = 0.01
    log_max_mb: float = 64.0
    log_keep: int = 5
    shadow: Path | None = None  # a candidate bundle (folder or archive) run in shadow of the served one
    shadow_queue: int = 64
    phased: Path | None = None  # a candidate bundle rolled out in steps over the served one
    rollout: RolloutSpec | None = None  # its schedule and gates (None: the defaults)
    state_dir: Path | None = None  # where the rollout's state survives restarts
    admin_token: str | None = None  # None: admin endpoints answer loopback clients only
    max_batch: int = DEFAULT_MAX_BATCH  # requests ready together that share one session.run (1: none)
    header_timeout_s: float = 10.0  # a request's headers complete within this of its first byte, else 408
    body_timeout_s: float = 60.0  # its body within this of its headers' end, else 408 (32 MiB at >= 0.55 MiB/s)
    keep_alive_s: float = KEEP_ALIVE_S  # a connection without a request in progress is closed after this
    max_connections: int | None = None  # None: the file-descriptor limit less connection_limits.FD_RESERVE
    body_memory_mb: float | None = None  # large bodies (> 1 MiB) in progress at once, summed; None: max_body_mb


def serve_path(path: Path, settings: ServeSettings, server_version: str | None = None) -> None:
    """Serve a bundle folder, or a bundle archive verified and unpacked into a temporary folder
    (the same for a --shadow or --phased candidate)."""
    with ExitStack() as stack:
        serve(_unpacked(path, stack, ""), _candidates_unpacked(settings, stack), server_version)


def _candidates_unpacked(settings: ServeSettings, stack: ExitStack) -> ServeSettings:
    from dataclasses import replace

    if settings.shadow is not None and settings.phased is not None:
        raise InputError("--shadow and --phased both given", "shadow a candidate first, then roll it out with --phased")
    if settings.shadow is not None:
        settings = replace(settings, shadow=_unpacked(settings.shadow, stack, "--shadow "))
    if settings.phased is not None:
        if settings.state_dir is None:
            raise InputError("--phased needs --state-dir DIR", "the rollout's step and counts are kept there "
                             "across restarts")
        settings = replace(settings, phased=_unpacked(settings.phased, stack, "--phased "))
    return settings


def _unpacked(path: Path, stack: ExitStack, flag: str) -> Path:
    if path.is_dir():
        return path
    if not path.is_file():
        raise InputError(f"{flag}{path}: no such bundle", "give a bundle .tar.gz or an unpacked bundle folder")
    removed = remove_stale_unpacked()
    if removed:
        print(f"note: removed {removed} unpacked bundle folder(s) of edgepack serve processes that ended without "
              f"cleaning up (killed)", file=sys.stderr, flush=True)
    tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"{UNPACKED_PREFIX}{os.getpid()}-"))
    return extract_archive(path, Path(tmp))


def remove_stale_unpacked(folder: Path | None = None) -> int:
    """Remove the unpacked archives (``edgepack-serve-PID-*`` in TMPDIR) whose server is gone: a
    kill -9 skips the cleanup. Only this user's folders, and only when no process has their pid (a
    reused pid keeps a folder until that process ends too). Returns how many went."""
    folder = Path(folder or tempfile.gettempdir())
    removed = 0
    for entry in folder.glob(f"{UNPACKED_PREFIX}*"):
        pid = entry.name[len(UNPACKED_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _running(int(pid)):
            continue
        try:
            info = entry.lstat()
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed += not entry.exists()
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def serve(root: Path, settings: ServeSettings, server_version: str | None = None) -> None:
    """Serve until SIGINT or SIGTERM; returns after a clean stop, raises EdgepackError when the model fails to load."""
    started = time.perf_counter()
    loop, http = _http_stack()
    manifest = verify_dir(root).manifest
    candidate_manifest = None
    for flag, candidate_root in (("--shadow", settings.shadow), ("--phased", settings.phased)):
        if candidate_root is None:
            continue
        if not candidate_root.is_dir():
            raise InputError(f"{flag} {candidate_root}: no such bundle folder",
                             "give an unpacked bundle folder (edgepack serve also takes a .tar.gz)")
        candidate_manifest = verify_dir(candidate_root).manifest  # both verified before anything starts
    if settings.max_body_mb <= 0:
        raise InputError(f"--max-body-mb {settings.max_body_mb:g}: expected a positive size", "e.g. --max-body-mb 32")
    if settings.max_batch < 1:
        raise InputError(f"--max-batch {settings.max_batch}: expected at least 1", "1 runs every request alone")
    for flag, seconds in (("--header-timeout", settings.header_timeout_s), ("--body-timeout", settings.body_timeout_s),
                          ("--keep-alive-timeout", settings.keep_alive_s)):
        if not seconds > 0:
            raise InputError(f"{flag} {seconds:g}: expected a positive number of seconds", f"e.g. {flag} 10")
    if settings.body_memory_mb is not None and settings.body_memory_mb < settings.max_body_mb:
        raise InputError(f"--body-memory-mb {settings.body_memory_mb:g} is below --max-body-mb "
                         f"{settings.max_body_mb:g}", "give at least --max-body-mb, or leave it out (then it is --max-body-mb)")
    if settings.max_connections is not None and settings.max_connections < 1:
        raise InputError(f"--max-connections {settings.max_connections}: expected at least 1",
                         "leave it out for the file-descriptor limit less a reserve")
    connection_limits(settings)  # refused here, before the model loads, when it does not fit ulimit -n
    from .metrics import ServerMetrics
    from .models import ModelSpec, Registry, SingleRoute
    from .prediction_log import PredictionLog

    metrics = ServerMetrics()
    spec = ModelSpec.from_bundle(root, manifest, settings.threads)
    stack = ExitStack()
    with stack:
        # Every refusal comes before anything is written: the log folder, the rollout's lock and state.
        candidate = None
        if settings.shadow is not None:
            # One intra-op thread for a shadow: it shares the host with the primary, which must not slow down.
            candidate = ModelSpec.from_bundle(settings.shadow, candidate_manifest, 1)  # type: ignore[arg-type]
        elif settings.phased is not None:
            candidate = ModelSpec.from_bundle(settings.phased, candidate_manifest, settings.threads)  # type: ignore[arg-type]
        if settings.phased is not None and candidate is not None and candidate.version == spec.version:
            raise InputError(f"--phased {spec.name} {spec.version} is the bundle already served: nothing to roll out",
                             "give the candidate bundle, built from the new model")
        if candidate is not None:
            from .shadow import check_signatures

            check_signatures(spec, candidate, "--shadow" if settings.shadow is not None else "--phased")
        rollout = None
        if settings.phased is not None:
            rollout = _rollout(settings, spec, candidate_manifest, stack)  # type: ignore[arg-type]
        log = None
        if settings.log_dir is not None:
            log = PredictionLog(settings.log_dir, settings.log_sample_rate, settings.log_max_mb, settings.log_keep)
        registry = Registry()
        if settings.shadow is not None:
            from .shadow import ShadowRoute

            registry.add(ShadowRoute(spec, candidate, settings.placement, metrics, log, settings.shadow_queue,  # type: ignore[arg-type]
                                     settings.max_batch))
            metrics.shadow = True
        elif rollout is not None:
            from .phased import PhasedRoute

            registry.add(PhasedRoute(spec, candidate, settings.placement, metrics, log, rollout,  # type: ignore[arg-type]
                                     settings.state_dir, max_batch=settings.max_batch))  # type: ignore[arg-type]
            metrics.phased = True
        else:
            registry.add(SingleRoute(spec, settings.placement, settings.max_batch))
        _run(root, manifest, settings, registry, metrics, log, server_version, started, loop, http)


def _rollout(settings: ServeSettings, spec, candidate_manifest: dict, stack: ExitStack):
    """The rollout to run: resumed from --state-dir when it holds one for these two bundles, else new.
    The folder stays locked while the server runs."""
    from .rollout_state import Rollout, StateLock, load, state_path

    folder: Path = settings.state_dir  # type: ignore[assignment]
    lock = StateLock(folder)
    if not lock.acquire():
        raise InputError(f"--state-dir {folder} is in use by another edgepack serve",
                         "stop that server, or give this one another --state-dir")
    stack.callback(lock.release)
    wanted = settings.rollout or RolloutSpec()
    rollout = load(folder)
    now = time.time()
    if rollout is None:
        return Rollout.start(wanted, spec.name, spec.version, candidate_manifest["version"], now)
    pair = (rollout.model, rollout.primary, rollout.candidate)
    if pair != (spec.name, spec.version, candidate_manifest["version"]):
        raise InputError(f"{state_path(folder)} holds the rollout of {pair[0]} {pair[2]} over {pair[1]}, not of "
                         f"{spec.name} {candidate_manifest['version']} over {spec.version}",
                         "give the same bundles to resume it, or another --state-dir to start a new rollout")
    if settings.rollout is not None:
        rollout.adopt(settings.rollout, now)
    rollout.resumed(now)
    return rollout


def _run(root: Path, manifest: dict, settings: ServeSettings, registry, metrics, log, server_version: str | None,
         started: float, loop: str, http: str) -> None:
    import uvicorn

    from .app import App, AppSettings

    version = server_version or (manifest.get("created_by") or {}).get("edgepack", "unknown")
    app = App(registry, metrics, AppSettings(int(settings.max_body_mb * 2**20), settings.allow_nonfinite,
                                             settings.access_log, version, settings.admin_token), log)
    sock = _listen(settings.host, settings.port)
    limit_concurrency = None
    if http == "httptools":  # the same, answering with one write and bounding what a client holds (see http_protocol)
        from .http_protocol import OneWriteHttpToolsProtocol
        http = OneWriteHttpToolsProtocol.with_limits(connection_limits(settings))
    else:  # h11: uvicorn's own limits only (503 past the cap; no header or body timeout)
        limit_concurrency = connection_limits(settings).max_connections
    config = uvicorn.Config(app, loop=loop, http=http, ws="none", interface="asgi3", lifespan="on",
                            log_config=None, log_level="warning", access_log=False, proxy_headers=False,
                            server_header=False, timeout_keep_alive=settings.keep_alive_s,  # type: ignore[arg-type]
                            limit_concurrency=limit_concurrency)
    server = uvicorn.Server(config)
    failures: list[EdgepackError] = []
    address = _url(settings.host, sock.getsockname()[1])
    loader = threading.Thread(target=_load, args=(registry, metrics, server, failures, address, started),
                              name="model-loader", daemon=True)
    with _signals_stop():
        loader.start()
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises the signal it stopped on, once it has stopped
            pass
    for route in registry:
        route.close()
    if log is not None:
        log.close()
    if failures:
        raise failures[0]
    print(f"stopped serving {manifest['name']} {manifest['version']}", file=sys.stderr, flush=True)


def connection_limits(settings: ServeSettings):
    """The limits the protocol enforces, the connection cap resolved: --max-connections, which must
    fit under the file-descriptor limit, else that limit less a reserve for the server's own files."""
    from .connection_limits import FD_RESERVE, ConnectionLimits, connection_cap

    fits = connection_cap()
    wanted = settings.max_connections
    if wanted is not None and wanted > fits:
        raise InputError(f"--max-connections {wanted}: this process may open {fits + FD_RESERVE} files "
                         f"(ulimit -n), {FD_RESERVE} of them kept for the server's own",
                         f"raise the limit (ulimit -n {wanted + FD_RESERVE}), or give --max-connections {fits} or less")
    memory_mb = settings.max_body_mb if settings.body_memory_mb is None else settings.body_memory_mb
    return ConnectionLimits(settings.header_timeout_s, settings.body_timeout_s, settings.keep_alive_s, wanted or fits,
                            int(memory_mb * 2**20))


def _return_freed_memory() -> None:
    """Hand the heap that loading freed (imports, the model's protobuf, warm-up buffers) back to
    the OS: ~3 MB of a small model server's RSS on glibc. Elsewhere (musl, macOS) a no-op."""
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _load(registry, metrics, server, failures: list[EdgepackError], address: str, started: float) -> None:
    try:
        for route in registry:
            route.load()
            metrics.ready.set(1, route.name, route.spec.version)
    except EdgepackError as err:
        failures.append(err)
        server.should_exit = True
        return
    while not server.started and not server.should_exit:  # the log line promises a port that answers
        time.sleep(0.002)
    _return_freed_memory()
    for route in registry:
        model = route.model
        print(f"serving {route.name} {route.spec.version} on {address} (ready in "
              f"{time.perf_counter() - started:.2f} s; one row runs in {model.warm_run_s * 1000:.3f} ms, "
              f"inference {model.where()})", file=sys.stderr, flush=True)
        candidate = getattr(route, "candidate", None)
        if candidate is not None and route.mode == "shadow":
            print(f"shadowing {route.name} with {candidate.spec.name} {candidate.spec.version} (one row runs in "
                  f"{candidate.warm_run_s * 1000:.3f} ms, off the request's path)", file=sys.stderr, flush=True)
        if candidate is not None and route.mode == "phased":
            rollout = route.rollout
            print(f"rolling out {candidate.spec.name} {candidate.spec.version} over {route.spec.version}: "
                  f"{rollout.state} at step {rollout.step + 1} of {len(rollout.spec.steps)} ({rollout.weight:g}%), "
                  f"one row runs in {candidate.warm_run_s * 1000:.3f} ms; state in {route.state_dir}",
                  file=sys.stderr, flush=True)


def _http_stack() -> tuple[str, str]:
    """uvloop and httptools when importable, else asyncio and h11, with a note saying so."""
    missing = [name for name in ("uvicorn", "orjson") if importlib.util.find_spec(name) is None]
    if missing:
        raise UnsupportedHere(f"serving needs {' and '.join(missing)}, which this Python cannot import",
                              f"pip install {' '.join(repr(r) for r in SERVE)}")
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    if (loop, http) != ("uvloop", "httptools"):
        print(f"note: serving with {loop} and {http} (slower): pip install uvloop httptools for the fast path",
              file=sys.stderr, flush=True)
    return loop, http


def _listen(host: str, port: int) -> socket.socket:
    """Bound and listening before the model loads: early clients queue in the backlog, and a busy
    port is a one-line error instead of uvicorn's log."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        raise InputError(f"cannot listen on {host}:{port}: {err.strerror or err}",
                         "choose another --port or --host, or stop what listens there") from None
    return sock


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextmanager
def _signals_stop() -> Iterator[None]:
    """SIGTERM stops like Ctrl-C: uvicorn shuts down gracefully on either, then re-raises it to the
    handler found before it started; this one makes that a KeyboardInterrupt, not the default
    action of SIGTERM (dying without cleanup, which would leave an unpacked archive behind)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _parser(default_host: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m runtime serve",
        description="Serve this bundle's model over HTTP: Open Inference Protocol (KServe v2) at /v2, plain JSON "
                    "at /predict, Prometheus at /metrics.")
    parser.add_argument("--bundle", type=Path, help="unpacked bundle folder (default: the one holding this runtime)")
    parser.add_argument("--host", default=default_host, help=f"address to listen on (default: {default_host})")
    parser.add_argument("--port", type=int, help=f"port (default: $PORT, else {DEFAULT_PORT}; 0: any free port)")
    parser.add_argument("--max-body-mb", type=float, default=ServeSettings.max_body_mb,
                        help="refuse request bodies larger than this with 413 (default: %(default)g, which takes one "
                             "640x640x3 float32 image as v2 JSON; binary tensors take ~5x less)")
    parser.add_argument("--allow-nonfinite", action="store_true", help="accept NaN and infinity in float inputs")
    parser.add_argument("--access-log", action="store_true", help="log one line per request to stderr")
    parser.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: the bundle's target)")
    add_log_and_shadow_flags(parser)
    add_phased_flags(parser)
    parser.add_argument("--inference", choices=("auto", "loop", "thread"), default="auto",
                        help="where session.run runs: on the event loop, in threads, or auto (the loop when the run "
                             "is expected to take under 1 ms with one worker thread, 0.2 ms with several)")
    parser.add_argument("--max-batch", type=int, default=ServeSettings.max_batch,
                        help="requests ready at the same time that share one session.run on the event loop "
                             f"(default: {DEFAULT_MAX_BATCH}; 1: each runs alone)")
    add_connection_flags(parser)
    return parser


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--header-timeout", type=float, default=ServeSettings.header_timeout_s,
                        help="seconds a request's headers may take from its first byte; then 408 and close "
                             "(default: %(default)g)")
    parser.add_argument("--body-timeout", type=float, default=ServeSettings.body_timeout_s,
                        help="seconds a request's body may take after its headers; then 408 and close "
                             "(default: %(default)g)")
    parser.add_argument("--keep-alive-timeout", type=float, default=ServeSettings.keep_alive_s,
                        help="seconds a connection may stay open with no request in progress (default: %(default)g, "
                             "longer than load balancers' 60)")
    parser.add_argument("--max-connections", type=int,
                        help="connections open at most; past it the one idle longest is closed, or the new one gets "
                             "503 when all are busy (default: the file-descriptor limit, ulimit -n, less "
                             "64 kept for the server's own files)")
    parser.add_argument("--body-memory-mb", type=float,
                        help="request bodies over 1 MiB are read and decoded at once while their sizes add up to at "
                             "most this; others wait, unread (default: --max-body-mb)")


def add_log_and_shadow_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-dir", type=Path, help="write the prediction log (JSON lines) into this folder")
    parser.add_argument("--log-sample-rate", type=float, default=ServeSettings.log_sample_rate,
                        help="share of requests whose inputs are logged in full (default: 0.01; failed runs always)")
    parser.add_argument("--log-max-mb", type=float, default=ServeSettings.log_max_mb,
                        help="rotate the log file past this size (default: 64)")
    parser.add_argument("--log-keep", type=int, default=ServeSettings.log_keep,
                        help="log files kept, the current one included (default: 5)")
    parser.add_argument("--shadow", type=Path, help="a candidate bundle folder to run in shadow of this one")
    parser.add_argument("--shadow-queue", type=int, default=ServeSettings.shadow_queue,
                        help="shadow runs waiting at most; past it they are dropped and counted (default: 64)")


def add_phased_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--phased", type=Path, help="a candidate bundle folder rolled out in steps over this one")
    parser.add_argument("--rollout-spec", type=Path, help="steps and gates from a JSON (or TOML) file; flags win")
    parser.add_argument("--steps", help="percent of requests the candidate answers at each step (default: 10,50,100)")
    parser.add_argument("--min-samples", type=int, help="candidate requests a step needs before it may pass (500)")
    parser.add_argument("--step-duration", type=float, help="seconds a step lasts at least (default: 60)")
    parser.add_argument("--max-error-rate", type=float, help="gate: share of candidate requests failing (0.01)")
    parser.add_argument("--max-p99-ms", type=float, help="gate: candidate p99 latency in ms (default: none)")
    parser.add_argument("--min-agreement", type=float, help="gate: share of rows agreeing with the primary (none)")
    parser.add_argument("--agreement-sample", type=float,
                        help="share of candidate requests the primary also runs to measure agreement (0.25)")
    parser.add_argument("--key-header", help="sticky assignment by this header (default: x-rollout-key), "
                                             "else by the input's hash")
    parser.add_argument("--state-dir", type=Path, help="where the rollout's state survives restarts (needed by --phased)")
    parser.add_argument("--admin-token", default=os.environ.get("EDGEPACK_ADMIN_TOKEN"),
                        help="require this bearer token on /admin (default: $EDGEPACK_ADMIN_TOKEN; none: loopback only)")


def rollout_from_args(args: argparse.Namespace) -> RolloutSpec | None:
    from .rollout_state import spec_from

    if args.phased is None:
        return None
    return spec_from(args.rollout_spec, args.steps, args.min_samples, args.step_duration, args.max_error_rate,
                     args.max_p99_ms, args.min_agreement, args.agreement_sample, args.key_header)


def main(argv: list[str], root: Path, default_host: str = "0.0.0.0") -> int:
    args = _parser(default_host).parse_args(argv)
    port = args.port
    if port is None:
        text = os.environ.get("PORT", str(DEFAULT_PORT))
        if not text.isdigit():
            raise InputError(f"PORT={text!r} is not a port number", "set PORT to a number such as 8080, or pass --port")
        port = int(text)
    settings = ServeSettings(
        host=args.host, port=port, max_body_mb=args.max_body_mb, allow_nonfinite=args.allow_nonfinite,
        access_log=args.access_log, placement=args.inference, threads=args.threads, log_dir=args.log_dir,
        log_sample_rate=args.log_sample_rate, log_max_mb=args.log_max_mb, log_keep=args.log_keep, shadow=args.shadow,
        shadow_queue=args.shadow_queue, phased=args.phased, rollout=rollout_from_args(args), state_dir=args.state_dir,
        admin_token=args.admin_token, max_batch=args.max_batch, header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout, keep_alive_s=args.keep_alive_timeout, max_connections=args.max_connections,
        body_memory_mb=args.body_memory_mb)
    with ExitStack() as stack:
        serve(args.bundle or root, _candidates_unpacked(settings, stack))
    return 0
