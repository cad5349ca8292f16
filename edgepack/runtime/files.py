"""Writing a file so that a crash never leaves half of it: the one atomic writer of edgepack.

It lives in the runtime because the runtime writes state a restart must find whole (a phased
rollout's ``rollout.json``) and ships alone; the build side imports it from here.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(target: Path, data: bytes) -> Path:
    """Write to a temporary file beside ``target``, fsync it, rename it over ``target`` and fsync
    the folder: readers, and a restart after a crash or kill -9, see the old file or the new one, whole."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as raw:
            raw.write(data)
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(temp_name, 0o644)
        os.replace(temp_name, target)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    folder = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a crash
    finally:
        os.close(folder)
    return target
