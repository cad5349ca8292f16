"""The root of edgepack's error tree and its exit codes.

It lives in the runtime because the runtime ships alone inside bundles and images and must report
failures with the same codes as the build side; the build side extends this tree in
``edgepack.errors``.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    INTERNAL = 1
    USAGE = 2
    BAD_INPUT = 3
    CONVERSION = 4
    PARITY = 5
    BUDGET = 6
    INTEGRITY = 7
    UNSUPPORTED_HERE = 8
    DEVICE = 9


class EdgepackError(Exception):
    """A failure the user can act on: ``str(err)`` says what is wrong, ``hint`` what to do."""

    exit_code: ExitCode = ExitCode.INTERNAL

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class InputError(EdgepackError):
    """A file, flag or data the user gave is missing, malformed or inconsistent."""

    exit_code = ExitCode.BAD_INPUT


class IntegrityError(EdgepackError):
    """A bundle is tampered, truncated or unsafe to unpack."""

    exit_code = ExitCode.INTEGRITY


class UnsupportedHere(EdgepackError):
    """The request is valid but this host cannot do it (another architecture, a missing extra)."""

    exit_code = ExitCode.UNSUPPORTED_HERE


class RequestError(InputError):
    """An HTTP request the server refuses: ``status`` is its 4xx code, the message names what is wrong.

    The server answers it and goes on; it never ends a process, so its exit code is only nominal.
    """

    def __init__(self, message: str, hint: str | None = None, status: int = 400) -> None:
        super().__init__(message, hint)
        self.status = status


class InferenceFailed(EdgepackError):
    """onnxruntime raised on input the server had accepted: answered with 500, the server keeps running."""
