"""``edgepack rollout status|promote|rollback``: steer a phased rollout, through the server or its state file.

A running server holds a lock on its ``--state-dir``; when the lock is free the server is down and
the command reads (status) or rewrites (promote, rollback) the state file itself, atomically and
under the same lock, so the next start resumes from what the operator decided. Otherwise it calls
the server's admin endpoints (``/admin/rollout[/promote|/rollback]``), which answer loopback
clients, or anyone with the server's ``--admin-token``.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from edgepack.errors import InputError
from edgepack.runtime.rollout_state import StateLock, load, save, state_path

DEFAULT_URL = "http://127.0.0.1:8080"


def rollout_command(action: str, url: str | None, state_dir: Path | None, token: str | None,
                    reason: str = "", timeout_s: float = 10.0) -> dict[str, Any]:
    """``action`` is status, promote or rollback; the status afterwards, with ``source`` saying where from."""
    if state_dir is not None:
        if not state_dir.is_dir():
            raise InputError(f"--state-dir {state_dir}: no such folder", "give the folder `edgepack serve --state-dir` used")
        lock = StateLock(state_dir)
        if lock.acquire():  # no server holds it: the file is the truth
            try:
                return _offline(action, state_dir, reason)
            finally:
                lock.release()
    return _online(action, url or DEFAULT_URL, token, reason, timeout_s, state_dir is not None)


def _offline(action: str, folder: Path, reason: str) -> dict[str, Any]:
    rollout = load(folder)
    if rollout is None:
        raise InputError(f"--state-dir {folder}: no {state_path(folder).name} in it",
                         "give the folder a `edgepack serve --phased` used")
    now = time.time()
    if action != "status":
        rollout.steer(action, now, f"{reason or 'operator'} (while the server was down)")
        save(folder, rollout.to_json())
    return {**rollout.status(now), "source": "state file", "server": "down"}


def _online(action: str, url: str, token: str | None, reason: str, timeout_s: float, had_state_dir: bool) -> dict[str, Any]:
    path = "/admin/rollout" if action == "status" else f"/admin/rollout/{action}"
    body = None if action == "status" else json.dumps({"reason": reason}).encode()
    request = urllib.request.Request(url.rstrip("/") + path, data=body, method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status = json.loads(response.read())
    except urllib.error.HTTPError as err:
        try:
            message = json.loads(err.read())["error"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {err.code} {err.reason}"
        raise InputError(f"{url}: {message}", None) from None
    except (urllib.error.URLError, OSError) as err:
        why = getattr(err, "reason", None) or err
        hint = ("the state folder is locked, so a server runs: check --url" if had_state_dir
                else "start the server, or give --state-dir DIR to use its state file while it is down")
        raise InputError(f"no server answers at {url} ({why})", hint) from None
    except ValueError:
        raise InputError(f"{url}{path}: the answer is not JSON", "is --url an edgepack server?") from None
    if status.get("mode") != "phased":
        raise InputError(f"{url} serves {status.get('model')} in {status.get('mode')} mode: there is no rollout",
                         "start the server with --phased CANDIDATE --state-dir DIR")
    return {**status, "source": "server", "server": url}


def render_status(status: dict[str, Any]) -> str:
    gates, figures = status["gates"], status["figures"]

    def share(value: float | None) -> str:
        return "-" if value is None else f"{value:.2%}"

    state = {"running": "running", "rolled_back": "ROLLED BACK (primary answers all)",
             "complete": "complete"}[status["state"]]
    lines = [f"{status['model']}: candidate {status['candidate']} over {status['primary']} — {state}, step "
             f"{status['step']}/{len(status['steps'])} ({status['weight']:g}% of requests; steps "
             f"{','.join(f'{s:g}' for s in status['steps'])}) [from the {status['source']}]",
             f"this step: {figures['candidate_requests']} candidate requests (needs {status['min_samples']}), "
             f"{figures['primary_requests']} primary ({figures.get('primary_errors', 0)} answered 5xx), "
             f"{status['step_elapsed_s']:.0f} s (needs {status['step_duration_s']:g} s)"]
    if gates["max_error_rate"] is not None:
        lines.append(f"  error rate {share(figures['error_rate'])} ({figures['errors']} failed), gate ≤ "
                     f"{gates['max_error_rate']:.2%}")
    if gates["max_p99_ms"] is not None:
        lines.append(f"  p99 over {gates['max_p99_ms']:g} ms: {figures['slow']} requests ({share(figures['slow_share'])}),"
                     f" gate ≤ 1%")
    if gates["min_agreement"] is not None:
        lines.append(f"  agreement {share(figures['agreement'])} of {figures['checked_rows']} checked rows (needs "
                     f"{status['min_checked_rows']}), gate ≥ {gates['min_agreement']:.2%}")
    if status.get("failing"):
        lines.append(f"  failing: {status['failing']}")
    if status.get("held"):
        lines.append(f"  held (no promotion until it clears): {status['held']}")
    for entry in status["history"][-5:]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["time"]))
        lines.append(f"{when} {entry['event']}: step {entry['step']} ({entry['weight']:g}%) — {entry['reason']}")
    return "\n".join(lines)
