"""uvicorn's httptools protocol, answering each response with one write instead of two, and
counting requests whose handling has not begun (``batching.BACKLOG``).

uvicorn writes a response's head and its body with two ``transport.write`` calls, and uvloop sends
each at once: two syscalls and two TCP segments per answer, the second of which wakes the client
again. The protocol here hands uvicorn a transport that holds a write until the next one (the body
follows the head within the same step of the request's task) and sends both together; anything
left held (a HEAD answer, ``100 Continue``) goes out at the end of the loop's current iteration.

It also bounds what a client may hold (uvicorn bounds only the idle time after an answer):
- a connection that has sent no byte of a request (new, or after an answer) is closed after the
  keep-alive timeout, silently;
- a request's headers must be complete within the header timeout of its first byte, and its body
  within the body timeout of the end of its headers; else the server answers 408 and closes;
- at most ``max_connections`` are open (kept under the file-descriptor limit, see
  ``connection_cap``). A connection past it evicts the one idle longest (no request in progress:
  a slowloris holds no request), and is refused with 503 when every one is busy;
- requests with a large body (over ``LARGE_BODY_BYTES``, or chunked) start while their declared
  sizes add up to at most ``body_memory_bytes``: the rest wait with reading paused, so the body
  stays in the client's socket instead of the server's heap. Decoding a JSON body takes ~15 times
  its size in Python objects, and 16 bodies of 7 MB at once took 600 MB (benchmarks/serve_memory.py).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .batching import BACKLOG
from .connection_limits import LARGE_BODY_BYTES, ConnectionLimits

_REFUSED_LINGER_S = 1.0  # a refused connection reads (and drops) its request this long, so the 503 is read
_FULL = (b'{"error":"the server has --max-connections connections open, each with a request in progress; '
         b'retry in a moment"}')
_REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"retry-after: 1\r\nconnection: close\r\n\r\n%s" % (len(_FULL), _FULL))
_TIMED_OUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
              b"connection: close\r\n\r\n%s")


class _Coalescing:
    __slots__ = ("_transport", "_held", "_loop")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is None:
            self._held = data
            self._loop.call_soon(self._flush)
        else:
            self._held = None
            self._transport.writelines((held, data))

    def _flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _BodyMemory:
    __slots__ = ("used", "waiting")

    def __init__(self) -> None:
        self.used = 0  # declared bytes of the large bodies of requests in progress
        self.waiting: deque[tuple[OneWriteHttpToolsProtocol, Any, Any, int]] = deque()


class OneWriteHttpToolsProtocol(HttpToolsProtocol):
    """See the module's docstring; ``with_limits`` gives the class a server uses."""

    limits = ConnectionLimits()
    idle: dict[OneWriteHttpToolsProtocol, None] = {}  # connections without a request in progress, oldest first
    bodies = None  # _BodyMemory: large bodies in progress and waiting (per server, see with_limits)

    @classmethod
    def with_limits(cls, limits: ConnectionLimits) -> type[OneWriteHttpToolsProtocol]:
        if limits.max_connections < 1:
            raise ValueError("max_connections is resolved before the protocol is made")
        return type(cls.__name__, (cls,), {"limits": limits, "idle": {}, "bodies": _BodyMemory()})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._timer: asyncio.TimerHandle | None = None
        self._waiting = ""  # what the timer waits for: idle, headers or body
        self._refused = False
        self._holding = 0  # bytes of _BodyMemory this connection's request holds
        self._queued = False
        if len(self.connections) >= self.limits.max_connections and not self._evict_idlest():
            self._refuse(transport)
            return
        super().connection_made(_Coalescing(transport, self.loop))  # type: ignore[arg-type]
        self._became_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        if self._refused:
            return
        self.idle.pop(self, None)
        self._release()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # read and dropped until the client closes or the linger ends
        if self._timer is None or self._waiting == "idle":
            if self.cycle is None or self.cycle.response_complete:  # the first bytes of the next request
                self._arm("headers", self.limits.header_timeout_s)
        super().data_received(data)

    def eof_received(self) -> bool | None:  # type: ignore[override]
        if self._refused:
            self.transport.close()
        return None

    def on_headers_complete(self) -> None:
        self._cancel()
        self.idle.pop(self, None)
        super().on_headers_complete()
        if not self._queued:  # a queued request's body timeout starts with it
            self._arm("body", self.limits.body_timeout_s)  # on_message_complete disarms it, at once for a GET

    def on_message_complete(self) -> None:
        if self._waiting == "body":
            self._cancel()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        self._release()
        super().on_response_complete()
        if not self.transport.is_closing() and self.timeout_keep_alive_task is not None:
            self._became_idle()  # uvicorn's timer closes it after --keep-alive-timeout

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        size = self._large_body(cycle)
        bodies = self.bodies
        if size and bodies is not None and bodies.used and bodies.used + size > (self.limits.body_memory_bytes or 0):
            self.flow.pause_reading()  # cycle.receive resumes it once the request starts
            self._queued = True
            bodies.waiting.append((self, cycle, app, size))
            return
        self._begin(cycle, app, size)

    def _begin(self, cycle: Any, app: Any, size: int) -> None:
        if size and self.bodies is not None:
            self._holding = size
            self.bodies.used += size
        BACKLOG.arrived()  # the app says started() when the task begins
        super()._start_asgi_task(cycle, app)

    def _large_body(self, cycle: Any) -> int:
        """The body's declared size when large (chunked: the whole budget, its size being unknown), else 0."""
        if self.limits.body_memory_bytes is None:
            return 0
        for name, value in cycle.scope["headers"]:
            if name == b"content-length":
                size = int(value) if value.isdigit() else 0
                return size if size > LARGE_BODY_BYTES else 0
            if name == b"transfer-encoding" and b"chunked" in value.lower():
                return self.limits.body_memory_bytes
        return 0

    def _release(self) -> None:
        """This connection's request is answered or gone: start the queued ones that now fit."""
        bodies = self.bodies
        if bodies is None:
            return
        if self._queued:
            self._queued = False
            bodies.waiting = deque(entry for entry in bodies.waiting if entry[0] is not self)
        if not self._holding:
            return
        bodies.used -= self._holding
        self._holding = 0
        budget = self.limits.body_memory_bytes or 0
        while bodies.waiting and (not bodies.used or bodies.used + bodies.waiting[0][3] <= budget):
            protocol, cycle, app, size = bodies.waiting.popleft()
            protocol._queued = False
            if protocol.transport.is_closing():
                continue
            protocol._begin(cycle, app, size)
            if cycle.more_body:
                protocol._arm("body", protocol.limits.body_timeout_s)

    def _became_idle(self) -> None:
        self.idle.pop(self, None)
        self.idle[self] = None
        if self.timeout_keep_alive_task is None:  # a new connection: uvicorn arms nothing
            self._arm("idle", self.limits.keep_alive_s)

    def _evict_idlest(self) -> bool:
        for oldest in self.idle:
            del self.idle[oldest]
            oldest._expire(evicted=True)
            return True
        return False

    def _refuse(self, transport: asyncio.Transport) -> None:
        """503 at once, then read and drop the request for a moment: closing on unread bytes would
        reset the connection, and the client would see that instead of the 503."""
        self._refused = True
        self.transport = transport
        transport.write(_REFUSED)
        try:
            transport.write_eof()
        except (NotImplementedError, OSError, RuntimeError):
            transport.close()
            return
        self._timer = self.loop.call_later(_REFUSED_LINGER_S, transport.close)

    def _arm(self, waiting: str, seconds: float) -> None:
        self._cancel()
        self._waiting = waiting
        self._timer = self.loop.call_later(seconds, self._expire)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._waiting = ""

    def _expire(self, evicted: bool = False) -> None:
        """Idle: closed silently. Headers or body not complete in time (or the headers of one
        evicted for a new connection): 408, then closed; a body's request task sees a disconnect and
        answers nothing."""
        waiting = self._waiting or "idle"
        self._cancel()
        self.idle.pop(self, None)
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if waiting == "body" and cycle is not None and cycle.response_started:
            self.transport.close()  # the answer is under way: it has nothing more to wait for
            return
        if evicted and waiting != "idle":
            message = (b'{"error":"the request\'s headers were still incomplete when the server, at '
                       b'--max-connections, needed the connection for another"}')
            self.transport.write(_TIMED_OUT % (len(message), message))
        elif waiting != "idle":
            limit = self.limits.header_timeout_s if waiting == "headers" else self.limits.body_timeout_s
            message = (b'{"error":"the request\'s %s did not arrive within the server\'s %gs (--%s-timeout)"}'
                       % (waiting.encode(), limit, b"header" if waiting == "headers" else b"body"))
            self.transport.write(_TIMED_OUT % (len(message), message))
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()
