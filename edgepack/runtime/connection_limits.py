"""What one client may hold open: the timeouts and the connection cap, enforced by ``http_protocol``.

Apart from it so that ``server`` can resolve them without importing httptools (absent on some devices).
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

# Descriptors kept for everything but connections: the listening socket, the event loop's own,
# the model and prediction log files, a shadow worker's pipes, rollout state, the standard streams.
# The process uses ~20 of them; the rest is margin for refused connections in their last second.
FD_RESERVE = 64


@dataclass(frozen=True)
class ConnectionLimits:
    """What one client may hold (``edgepack serve --header-timeout ...``, see README "Limits")."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keep_alive_s: float = 75.0  # longer than common load balancers' idle timeout (60 s), see server.KEEP_ALIVE_S
    max_connections: int = 1 << 20  # server.connection_limits gives connection_cap() unless told
    # Bodies over LARGE_BODY_BYTES are received and decoded while their sizes add up to at most this
    # (one at least); the others wait, their connection paused (TCP back-pressure). None: no bound.
    body_memory_bytes: int | None = None


LARGE_BODY_BYTES = 1 << 20


def connection_cap(reserve: int = FD_RESERVE) -> int:
    """Connections that fit under this process's file-descriptor limit with ``reserve`` kept for the
    rest; the soft limit is first raised to the hard one, as the Go runtime does at start."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):  # above the kernel's nr_open: keep the soft limit
            pass
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(1, soft - reserve)
