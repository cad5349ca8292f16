"""edgepack's error tree. The root lives in the runtime (it ships alone); the build side adds here.

Every error carries a one-line message and a hint; ``edgepack.cli`` turns them into exit codes.
"""

from __future__ import annotations

from edgepack.runtime.errors import EdgepackError, ExitCode, InputError, IntegrityError, UnsupportedHere

__all__ = [
    "BudgetExceeded",
    "ConversionError",
    "DeviceError",
    "EdgepackError",
    "ExitCode",
    "ImageError",
    "InputError",
    "IntegrityError",
    "ParityError",
    "RegistryError",
    "UnsupportedHere",
]


class ConversionError(EdgepackError):
    """The model could not be turned into ONNX."""

    exit_code = ExitCode.CONVERSION


class ParityError(EdgepackError):
    """The ONNX model does not answer like the original, past tolerance."""

    exit_code = ExitCode.PARITY


class BudgetExceeded(EdgepackError):
    """A latency, size or memory budget was exceeded."""

    exit_code = ExitCode.BUDGET


class DeviceError(EdgepackError):
    """Work on a real device failed: unreachable, refused the key, no usable Python, or its run failed."""

    exit_code = ExitCode.DEVICE


class ImageError(InputError):
    """A container image cannot be made from what was given: no such base, a base without the
    platform or the Python asked for, a bad platform name."""


class RegistryError(EdgepackError):
    """A container registry cannot be reached, refuses the credentials, or rejects a pull or push."""

    exit_code = ExitCode.UNSUPPORTED_HERE
