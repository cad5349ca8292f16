"""``edgepack.lock``: the variant a build chose, so that later builds reuse it without timing.

Timing decides which variant ships, and timing is noisy; a CI rebuild must not re-decide. A build
records its decision here (per bundle name and profile) with a fingerprint of everything that
went into it; ``edgepack build --locked`` makes the recorded variant again, checks it comes out with
the same bytes and still passes the accuracy gate, and writes the manifest the decision was
recorded with: byte-identical bundles, no timing. A changed input is refused with what changed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from edgepack.errors import InputError
from edgepack.runtime.files import write_atomic

LOCK_SCHEMA = 1
FILE_NAME = "edgepack.lock"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LockEntry(_Strict):
    name: str
    profile: str
    fingerprint: dict[str, str]  # what the decision depends on; any change voids it
    variant: str
    sha256: str  # of the chosen model file
    excluded_nodes: list[str] = []
    variants: list[dict[str, Any]]  # the manifest's variant records, as decided
    quantization: dict[str, Any]  # the manifest's quantization block, as decided
    evidence: dict[str, Any] = {}  # the timing behind the decision, for people (never compared)

    @property
    def key(self) -> str:
        return entry_key(self.name, self.profile)


class LockFile(_Strict):
    schema_version: int = LOCK_SCHEMA
    entries: dict[str, LockEntry] = {}


def entry_key(name: str, profile: str) -> str:
    return f"{name}@{profile}"


def read_lock(path: Path) -> LockFile:
    if not path.exists():
        return LockFile()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        lock = LockFile.model_validate(data)
    except (OSError, ValueError, ValidationError) as err:
        first = err.errors()[0]["msg"] if isinstance(err, ValidationError) else str(err)
        raise InputError(f"{path}: not a readable edgepack lock file ({first})",
                         "delete it and build without --locked to record the decision again") from None
    if lock.schema_version != LOCK_SCHEMA:
        raise InputError(f"{path}: lock schema {lock.schema_version}, this edgepack reads {LOCK_SCHEMA}",
                         "build without --locked to record the decision again")
    return lock


def record(path: Path, entry: LockEntry) -> Path:
    """Add or replace ``entry``; other bundles' and profiles' entries stay as they are."""
    lock = read_lock(path)
    entries = {**lock.entries, entry.key: entry}
    body = LockFile(entries=dict(sorted(entries.items()))).model_dump(mode="json")
    try:
        return write_atomic(path, (json.dumps(body, indent=2, sort_keys=True) + "\n").encode())
    except OSError as err:
        raise InputError(f"{path}: cannot write the lock file ({err.strerror})",
                         "choose a writable --lock path") from None


def locked_entry(path: Path, name: str, profile: str, fingerprint: dict[str, str]) -> LockEntry:
    """The entry a ``--locked`` build reuses; refused when missing or made from other inputs."""
    if not path.is_file():
        raise InputError(f"--locked: {path} does not exist",
                         f"build once without --locked to record the decision in {path}, and commit it")
    entry = read_lock(path).entries.get(entry_key(name, profile))
    if entry is None:
        raise InputError(f"--locked: {path} has no decision for {name} on {profile}",
                         "build once without --locked to record it")
    changed = [f"{key} ({_short(entry.fingerprint.get(key))} → {_short(fingerprint.get(key))})"
               for key in sorted(set(entry.fingerprint) | set(fingerprint))
               if entry.fingerprint.get(key) != fingerprint.get(key)]
    if changed:
        raise InputError(f"--locked: the decision in {path} was made for other inputs: " + ", ".join(changed),
                         "build without --locked to decide again, then commit the lock file")
    return entry


def matching_entry(path: Path, name: str, profile: str, fingerprint: dict[str, str]) -> LockEntry | None:
    """The entry a default build reuses: one made from these very inputs, else None."""
    if not path.is_file():
        return None
    entry = read_lock(path).entries.get(entry_key(name, profile))
    return entry if entry is not None and entry.fingerprint == fingerprint else None


def _short(value: str | None) -> str:
    """A fingerprint value for a message: digests (alone or inside, e.g. "minmax <sha256>") cut to 12."""
    if value is None:
        return "none"
    return re.sub(r"\b[0-9a-f]{17,}\b", lambda digest: digest.group()[:12] + "…", value)
