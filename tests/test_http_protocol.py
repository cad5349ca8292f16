"""The server's HTTP/1.1 framing over raw sockets: head and body of an answer are held and sent
together (``runtime/http_protocol.py``), so what is sent without a body must still go out."""

from __future__ import annotations

import json
import socket
import sys
import time

import pytest

from edgepack.runtime.bundle import extract_archive
from test_serve import Served

SERVE = [sys.executable, "-m", "runtime", "serve", "--host", "127.0.0.1", "--port", "0"]
INFER = b'{"inputs": [{"name": "X", "shape": [1, 6], "datatype": "FP32", "data": [0.5, -1, 0.25, 2, 0, 1.5]}]}'


@pytest.fixture(scope="module")
def served(built_bundle, tmp_path_factory):
    root = extract_archive(built_bundle, tmp_path_factory.mktemp("bundle"))
    server = Served(SERVE, root)
    yield server
    server.process.terminate()
    server.process.wait(timeout=30)


def _connect(served: Served) -> socket.socket:
    return socket.create_connection(("127.0.0.1", served.port), timeout=5)


def _read_until(sock: socket.socket, data: bytes, marker: bytes) -> bytes:
    while marker not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed; got {data!r}"
        data += chunk
    return data


def _response(sock: socket.socket, data: bytes = b"", head_only: bool = False) -> tuple[bytes, bytes, bytes]:
    """(head, body, bytes past this response) of the next response on ``sock``."""
    data = _read_until(sock, data, b"\r\n\r\n")
    head, _, rest = data.partition(b"\r\n\r\n")
    length = 0 if head_only else int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                          if line.lower().startswith(b"content-length")))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "the connection closed inside a body"
        rest += chunk
    return head, rest[:length], rest[length:]


def _post(path: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
            % (path, len(body), extra, body))


def test_a_head_answer_goes_out_without_a_body_and_the_connection_goes_on(served):
    with _connect(served) as sock:
        sock.sendall(b"HEAD /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, rest = _response(sock, head_only=True)
        assert head.startswith(b"HTTP/1.1 200") and b"content-length: 13" in head.lower() and rest == b""
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        head, body, _ = _response(sock)
        assert head.startswith(b"HTTP/1.1 200") and json.loads(body) == {"live": True}


def test_100_continue_comes_before_the_body_is_sent(served):
    with _connect(served) as sock:
        request = _post(b"/v2/models/classifier/infer", INFER, b"Expect: 100-continue\r\n")
        head, _, body = request.partition(b"\r\n\r\n")
        sock.sendall(head + b"\r\n\r\n")
        interim = _read_until(sock, b"", b"\r\n\r\n")
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        head, answer, _ = _response(sock, interim[len(b"HTTP/1.1 100 Continue\r\n\r\n"):])
        assert head.startswith(b"HTTP/1.1 200") and json.loads(answer)["model_name"] == "classifier"


def test_pipelined_requests_are_answered_in_order_each_whole(served):
    with _connect(served) as sock:
        sock.sendall(_post(b"/v2/models/classifier/infer", INFER) + b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n"
                     + _post(b"/predict", b"[[0.5, -1, 0.25, 2, 0, 1.5]]"))
        first, body, rest = _response(sock)
        assert first.startswith(b"HTTP/1.1 200") and json.loads(body)["model_name"] == "classifier"
        second, body, rest = _response(sock, rest)
        assert second.startswith(b"HTTP/1.1 200") and json.loads(body) == {"ready": True}
        third, body, rest = _response(sock, rest)
        assert third.startswith(b"HTTP/1.1 200") and "label" in json.loads(body)["outputs"]


def test_a_malformed_request_gets_a_400_and_the_connection_closes(served):
    with _connect(served) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
        head, body, _ = _response(sock)
        assert head.startswith(b"HTTP/1.1 400") and b"connection: close" in head.lower()
        deadline = time.monotonic() + 5
        while sock.recv(65536):
            assert time.monotonic() < deadline
    with _connect(served) as sock:  # the server goes on
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _response(sock)[0].startswith(b"HTTP/1.1 200")


def test_connection_close_gets_the_whole_answer_then_the_close(served):
    with _connect(served) as sock:
        sock.sendall(_post(b"/predict", b"[[0.5, -1, 0.25, 2, 0, 1.5]]", b"Connection: close\r\n"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and "label" in json.loads(body)["outputs"]
