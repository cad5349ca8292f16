"""The ASGI application: routes, body limits, status codes and metrics around the registry.

Hand-written (no framework): the hot path of an inference request is one path split, one body
read, the codec and the route, which keeps the server's own share of a tiny model's latency small.
Any request is answered: refusals with 4xx (onnxruntime's refusal of an input included), a run out
of memory with 503, other onnxruntime failures and bugs with 500, and the server goes on serving
either way.
"""

from __future__ import annotations

import hmac
import ipaddress
import itertools
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import orjson

from . import openapi, v2
from .batching import BACKLOG
from .errors import EdgepackError, InferenceFailed, RequestError
from .metrics import CONTENT_TYPE, ServerMetrics
from .models import OutOfMemory, Registry
from .prediction_log import PredictionLog, add_outputs, digest, now, tensors

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_JSON = b"application/json"
_POST_ENDPOINTS = ("infer", "predict", "rollout_promote", "rollout_rollback")
_INFERENCE = ("infer", "predict")
_BODY_HEADERS = (b"content-length", b"content-encoding", b"expect", b"inference-header-content-length")
# A refused body is read (and dropped) up to this many times the limit, so that the client reads
# the 413; past that the server answers at once and drops the connection.
_DRAIN_FACTOR = 4
_CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # what uvicorn refuses in a header value
# The default body limit (--max-body-mb) takes one 640x640x3 float32 image (a detector's input)
# sent as v2 JSON, the way clients send it without the binary extension (tritonclient with
# binary_data=False, or json.dumps of arr.flatten().tolist()): with random values in [0, 1) the
# body is 23.8 MiB (24,906,010 bytes; 22.6 MiB from tritonclient, which writes no spaces). A value
# takes at most 22 characters and ", " (28.1 MiB), 23 with a sign (29.3 MiB, a normalised image):
# 32 MiB holds even that. The same image as binary data is 4.7 MiB. server.ServeSettings and
# `edgepack serve` repeat the figure (they cannot import this module before orjson is checked).
DEFAULT_MAX_BODY_MB = 32


@dataclass(frozen=True)
class AppSettings:
    max_body_bytes: int = DEFAULT_MAX_BODY_MB << 20
    allow_nonfinite: bool = False
    access_log: bool = False
    server_version: str = "unknown"
    admin_token: str | None = None  # None: admin endpoints answer loopback clients only


class _Disconnected(Exception):
    """The client went away before its request was read: there is nobody to answer."""


class _Call:
    """What a request is, as known so far: filled in while routing, read by metrics and the log."""

    __slots__ = ("endpoint", "model", "request_id", "version", "feed", "inputs_sha256", "outputs", "extra", "batch",
                 "error", "settle")

    def __init__(self) -> None:
        self.endpoint = "unknown"
        self.model = ""
        self.request_id = ""
        self.version: str | None = None
        self.feed: dict[str, Any] | None = None  # the parsed inputs, once accepted
        self.inputs_sha256: str | None = None  # their digest, once something needed it
        self.outputs: dict[str, Any] | None = None
        self.extra: dict[str, Any] | None = None
        self.batch = 1  # requests its session.run answered
        self.error: str | None = None
        # A phased route's hook, told the status the client is sent (its gates count that).
        self.settle: Callable[[int], None] | None = None


class App:
    def __init__(self, registry: Registry, metrics: ServerMetrics, settings: AppSettings,
                 log: PredictionLog | None = None) -> None:
        self.registry = registry
        self.metrics = metrics
        self.settings = settings
        self.log = log
        if log is not None:
            metrics.watch_log(log)
        # Request ids are only worth finding (or making) when something records them.
        self.tracing = log is not None or any(route.mode != "single" for route in registry)
        self._server_metadata = orjson.dumps({"name": "edgepack", "version": settings.server_version,
                                              "extensions": list(v2.EXTENSIONS)})
        self._openapi = orjson.dumps(openapi.document(registry, settings.server_version))

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        BACKLOG.started()
        started = time.perf_counter()
        call = _Call()
        metrics = self.metrics
        metrics.in_flight.inc()
        status = 499  # client closed the request, as nginx counts it
        try:
            status, body, headers = await self._answer(call, scope, receive)
            if self.log is not None and call.endpoint in _INFERENCE:
                # Written before the answer is sent: an acknowledged request has its line while the log
                # can be written. When it cannot, PredictionLog drops and counts the line (one stderr line
                # per change, /metrics) and the answer goes out unchanged: a log fault never reaches the client.
                self._log(call, scope, status, time.perf_counter() - started)
                headers.append((b"x-request-id", _header_value(call.request_id)))
            if call.settle is not None:
                call.settle(status)  # a rollout's gates count the status the client is sent
            await send({"type": "http.response.start", "status": status,
                        "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
        except _Disconnected:
            pass
        finally:
            metrics.in_flight.dec()
            metrics.requests.inc(call.model, call.endpoint, str(status))
            elapsed = time.perf_counter() - started
            if call.endpoint in _INFERENCE and status == 200:
                metrics.latency.observe(elapsed, call.model, call.endpoint)
            if self.settings.access_log:
                client = scope.get("client") or ("-", 0)
                print(f'{client[0]}:{client[1]} "{scope["method"]} {scope["path"]}" {status} '
                      f"{elapsed * 1000:.2f} ms", file=sys.stderr, flush=True)

    def _log(self, call: _Call, scope: dict[str, Any], status: int, elapsed: float) -> None:
        """One prediction log line (see README "Prediction log"): inputs sampled, and always kept
        for a failed run (refused by onnxruntime, out of memory, a 500) so it can be replayed;
        outputs themselves when small, else a digest."""
        log = self.log
        if not call.request_id:  # refused before the request id was known (bad JSON, 404, too long...)
            call.request_id = _request_id(scope, refuse_long=False)
        record: dict[str, Any] = {"id": call.request_id, "time": now(), "model": call.model,
                                  "version": call.version, "role": "primary", "endpoint": call.endpoint,
                                  "status": status, "latency_ms": elapsed * 1000}
        feed = call.feed
        if feed is not None:
            record["inputs_sha256"] = call.inputs_sha256 or digest(feed)
            if status != 200 or log.sampled():  # type: ignore[union-attr]  # parsed, so it reached a run
                record["inputs"] = tensors(feed)
        if call.outputs is not None:
            add_outputs(record, call.outputs)
        if call.extra is not None:
            record.update(call.extra)
        if call.batch > 1:
            record["batch"] = call.batch
        if call.error is not None:
            record["error"] = call.error
        log.write(record)  # type: ignore[union-attr]

    async def _answer(self, call: _Call, scope: dict[str, Any], receive: Receive) -> tuple[int, bytes, list]:
        try:
            return await self._dispatch(call, scope, receive)
        except RequestError as err:
            call.error = err.one_line()
            headers = [(b"content-type", _JSON)]
            if err.status == 405:
                allowed = b"POST" if call.endpoint in _POST_ENDPOINTS else b"GET"
                headers.append((b"allow", allowed))
            return err.status, _error(err), headers
        except InferenceFailed as err:  # the server's fault (onnxruntime's refusals are RequestErrors)
            call.error = err.one_line()
            print(f"error: {err.one_line()}", file=sys.stderr, flush=True)
            return (503 if isinstance(err, OutOfMemory) else 500), _error(err), [(b"content-type", _JSON)]
        except _Disconnected:
            raise
        except Exception as err:  # noqa: BLE001 - a bug must cost one request, not the server
            where = traceback.extract_tb(err.__traceback__)[-1]
            call.error = f"internal error: {type(err).__name__}: {err}"
            print(f"internal error: {type(err).__name__}: {err} at {where.filename}:{where.lineno} "
                  f"({scope['method']} {scope['path']})", file=sys.stderr, flush=True)
            return 500, orjson.dumps({"error": f"internal error: {type(err).__name__}: {err}"}), [(b"content-type", _JSON)]

    async def _dispatch(self, call: _Call, scope: dict[str, Any], receive: Receive) -> tuple[int, bytes, list]:
        endpoint, name, version = route_of(scope["path"])
        call.endpoint = endpoint
        method = scope["method"]
        wanted = "POST" if endpoint in _POST_ENDPOINTS else "GET"
        if endpoint == "unknown":
            raise RequestError(f"no such endpoint: {method} {scope['path']}",
                               "see GET /v2, /v2/models, /v2/models/NAME/infer, /predict, /metrics", 404)
        if method != wanted and not (method == "HEAD" and wanted == "GET"):
            raise RequestError(f"{endpoint} takes {wanted}, not {method}", f"use {wanted} {scope['path']}", 405)
        if endpoint == "infer":
            route = self.registry.get(name, version)
            call.model = route.name
            body, headers = await self._body(scope, receive)
            request = v2.parse_infer(body, _header_length(headers), route.signature, self.settings.allow_nonfinite)
            if self.tracing:
                call.request_id = request.id or _request_id(scope)
                call.feed = request.inputs
            answer = await route.infer(list(request.outputs), request.inputs, call.request_id,
                                       _sticky_key(call, scope, route.key_header, request.inputs), version)
            call.version, call.outputs, call.extra, call.batch = answer.version, answer.outputs, answer.extra, answer.batch
            call.settle = getattr(answer, "settle", None)
            self.metrics.run.observe(answer.run_s, route.name, answer.version)
            payload, json_length = v2.encode_infer(route.name, answer.version, request, answer.outputs)
            if json_length is None:
                return 200, payload, [(b"content-type", _JSON)]
            return 200, payload, [(b"content-type", b"application/octet-stream"),
                                  (b"inference-header-content-length", str(json_length).encode())]
        if endpoint == "predict":
            route = self.registry.default()
            call.model = route.name
            body, _ = await self._body(scope, receive)
            feed = v2.parse_predict(body, route.signature, self.settings.allow_nonfinite)
            if self.tracing:
                call.request_id = _request_id(scope)
                call.feed = feed
            answer = await route.infer(None, feed, call.request_id,
                                       _sticky_key(call, scope, route.key_header, feed))
            call.version, call.outputs, call.extra, call.batch = answer.version, answer.outputs, answer.extra, answer.batch
            call.settle = getattr(answer, "settle", None)
            self.metrics.run.observe(answer.run_s, route.name, answer.version)
            return 200, v2.encode_predict(route.name, answer.version, answer.outputs), [(b"content-type", _JSON)]
        if endpoint == "metrics":
            return 200, self.metrics.exposition(), [(b"content-type", CONTENT_TYPE.encode())]
        if endpoint.startswith("rollout_"):
            return await self._admin(call, endpoint, scope, receive)
        return self._describe(call, endpoint, name, version)

    async def _admin(self, call: _Call, endpoint: str, scope: dict[str, Any], receive: Receive) -> tuple[int, bytes, list]:
        """GET /admin/rollout, POST /admin/rollout/promote|rollback (body: optional {"reason": "..."})."""
        self._authorize(scope)
        route = self.registry.default()
        call.model = route.name
        as_json = [(b"content-type", _JSON)]
        if endpoint == "rollout_status":
            return 200, orjson.dumps(route.status()), as_json
        body, _ = await self._body(scope, receive)
        return 200, orjson.dumps(route.steer(endpoint.removeprefix("rollout_"), _reason(body))), as_json

    def _authorize(self, scope: dict[str, Any]) -> None:
        token = self.settings.admin_token
        if token:
            given = _header(scope, b"authorization") or ""
            if not hmac.compare_digest(given.encode("latin-1"), f"Bearer {token}".encode("latin-1")):
                raise RequestError("admin endpoints need this server's admin token",
                                   "send Authorization: Bearer TOKEN (edgepack rollout --token)", 401)
            return
        client = (scope.get("client") or ("",))[0]
        try:
            local = ipaddress.ip_address(client).is_loopback
        except ValueError:
            local = False
        if not local:
            raise RequestError("admin endpoints answer only clients on this host when no admin token is set",
                               "call from the server's host, or start it with --admin-token", 403)

    def _describe(self, call: _Call, endpoint: str, name: str | None, version: str | None) -> tuple[int, bytes, list]:
        as_json = [(b"content-type", _JSON)]
        if endpoint == "live":
            return 200, b'{"live":true}', as_json
        if endpoint == "ready":
            ready = self.registry.ready
            return (200 if ready else 503), orjson.dumps({"ready": ready}), as_json
        if endpoint == "server_metadata":
            return 200, self._server_metadata, as_json
        if endpoint == "openapi":
            return 200, self._openapi, as_json
        if endpoint == "models":
            return 200, orjson.dumps({"models": [{"name": r.name, "versions": r.versions, "platform": v2.PLATFORM,
                                                  "ready": r.ready} for r in self.registry]}), as_json
        route = self.registry.get(name or "", version)
        call.model = route.name
        if endpoint == "model_ready":
            return (200 if route.ready else 503), orjson.dumps({"name": route.name, "ready": route.ready}), as_json
        return 200, orjson.dumps(route.metadata()), as_json

    async def _body(self, scope: dict[str, Any], receive: Receive) -> tuple[bytes, dict[bytes, bytes]]:
        """The whole body, or 413 once it is known to be larger than the limit."""
        headers = {key: value for key, value in scope["headers"] if key in _BODY_HEADERS}
        limit = self.settings.max_body_bytes
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            # A client waiting for "100 Continue" never sends the body; one past the cap is not worth reading.
            if headers.get(b"expect", b"").lower() == b"100-continue" or int(declared) > _DRAIN_FACTOR * limit:
                raise _too_large(limit)
            await _drain(receive, 0, _DRAIN_FACTOR * limit)
            raise _too_large(limit)
        encoding = headers.get(b"content-encoding", b"identity").lower()
        if encoding != b"identity":
            raise RequestError(f"Content-Encoding {encoding.decode(errors='replace')} is not supported",
                               "send the body uncompressed", 415)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                if message.get("more_body", False):
                    await _drain(receive, size, _DRAIN_FACTOR * limit)
                raise _too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return (chunks[0] if len(chunks) == 1 else b"".join(chunks)), headers


def _request_id(scope: dict[str, Any], refuse_long: bool = True) -> str:
    """The client's X-Request-Id, else a fresh one (the v2 body's "id" wins over both). One longer
    than v2.MAX_REQUEST_ID is refused (400), or replaced by a fresh one for the log line of a refusal."""
    given = _header(scope, b"x-request-id")
    if given is not None and len(given) > v2.MAX_REQUEST_ID:
        if refuse_long:
            raise RequestError(f"X-Request-Id is {len(given)} characters long, at most {v2.MAX_REQUEST_ID} are taken",
                               "it is echoed in the answer's X-Request-Id header: send a shorter one (a uuid)")
        given = None
    return given if given is not None else f"{_ids.prefix}{next(_ids.counter):016x}"


class _Ids:
    """Generated request ids: 32 hex digits like a uuid4's, a random per-process prefix then a
    counter: unique without a uuid4's urandom call per request (a few µs on the hot path)."""

    def __init__(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count()


_ids = _Ids()
os.register_at_fork(after_in_child=_ids.__init__)  # a forked worker must not repeat its parent's ids


def _sticky_key(call: _Call, scope: dict[str, Any], header: bytes | None, feed: dict[str, Any]) -> str | None:
    """A phased route's assignment key: the request's key header, else the inputs' digest, which
    the log line then reuses; None for routes that assign nothing."""
    if header is None:
        return None
    given = _header(scope, header)
    if given is not None:
        return given
    call.inputs_sha256 = digest(feed)
    return call.inputs_sha256


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    """A request header's value (``name`` in lower case, as ASGI gives them); None when absent."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _reason(body: bytes) -> str:
    if not body.strip():
        return ""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise RequestError("the body is not JSON", 'send {"reason": "..."} or nothing') from None
    if not isinstance(data, dict) or not isinstance(data.get("reason", ""), str):
        raise RequestError('expected {"reason": "..."}', "the reason is a string, for the rollout's history")
    return data.get("reason", "")[:500]


def _header_value(text: str) -> bytes:
    """A request id as a header value: in latin-1, as a client's X-Request-Id came, else in UTF-8;
    with control characters, which would end the header, %-escaped (the body echoes the id as is)."""
    if text.isascii() and text.isprintable():  # the usual id (generated, a uuid): nothing to escape
        return text.encode("ascii")
    try:
        value = text.encode("latin-1")
    except UnicodeEncodeError:
        value = text.encode("utf-8", "backslashreplace")
    return _CONTROL_BYTES.sub(lambda match: b"%%%02X" % match[0][0], value)


def _too_large(limit: int) -> RequestError:
    return RequestError(f"the body is larger than the server's limit of {limit / 2**20:g} MiB",
                        "send tensors as binary data (the v2 binary tensor extension: a JSON header of "
                        "Inference-Header-Content-Length bytes, then the raw tensors, as tritonclient does with "
                        "binary_data=True: 4 bytes a float32 value instead of ~20 in JSON), send fewer rows per "
                        "request, or start the server with a larger --max-body-mb", 413)


async def _drain(receive: Receive, size: int, cap: int) -> None:
    """Read and drop the rest of a refused body, up to ``cap`` bytes in all. Answering before the
    client has sent it all would close the connection under it when it asked for Connection: close
    (urllib always does): the unread bytes turn the close into a reset, and the client sees that
    instead of the 413."""
    while size <= cap:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def route_of(path: str) -> tuple[str, str | None, str | None]:
    """(endpoint, model name, version) for a path; endpoint "unknown" outside the API."""
    parts = path.strip("/").split("/")
    if parts[0] == "v2":
        if len(parts) == 1:
            return "server_metadata", None, None
        if len(parts) == 3 and parts[1] == "health" and parts[2] in ("live", "ready"):
            return parts[2], None, None
        if parts[1] == "models":
            if len(parts) == 2:
                return "models", None, None
            name, rest, version = parts[2], parts[3:], None
            if len(rest) >= 2 and rest[0] == "versions":
                version, rest = rest[1], rest[2:]
            if not rest:
                return "model_metadata", name, version
            if rest == ["ready"]:
                return "model_ready", name, version
            if rest == ["infer"]:
                return "infer", name, version
    elif len(parts) == 1 and parts[0] in ("predict", "metrics"):
        return parts[0], None, None
    elif parts == ["openapi.json"]:
        return "openapi", None, None
    elif parts[0] == "admin" and len(parts) in (2, 3) and parts[1] == "rollout":
        if len(parts) == 2:
            return "rollout_status", None, None
        if parts[2] in ("promote", "rollback"):
            return f"rollout_{parts[2]}", None, None
    return "unknown", None, None


def _header_length(headers: dict[bytes, bytes]) -> int | None:
    value = headers.get(b"inference-header-content-length")
    if value is None:
        return None
    if not value.isdigit():
        raise RequestError(f"Inference-Header-Content-Length {value.decode(errors='replace')!r} is not a number",
                           "give the size of the JSON part of the body in bytes")
    return int(value)


def _error(err: EdgepackError) -> bytes:
    return orjson.dumps({"error": err.one_line()})


async def _lifespan(receive: Receive, send: Send) -> None:
    # Models load in a thread the server starts itself (see ``server``): startup has nothing to wait for.
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
