"""uvicorn's httptools protocol, answering each response with one write instead of two, and
counting requests whose handling has not begun (``batching.BACKLOG``).

uvicorn writes a response's head and its body with two ``transport.write`` calls, and uvloop sends
each at once: two syscalls and two TCP segments per answer, the second of which wakes the client
again. The protocol here hands uvicorn a transport that holds a write until the next one (the body
follows the head within the same step of the request's task) and sends both together; anything
left held (a HEAD answer, ``100 Continue``) goes out at the end of the loop's current iteration.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .batching import BACKLOG


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


class OneWriteHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_Coalescing(transport, self.loop))  # type: ignore[arg-type]

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        BACKLOG.arrived()  # the app says started() when the task begins
        super()._start_asgi_task(cycle, app)
