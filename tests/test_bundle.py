"""Bundles: deterministic bytes, every checksum verified, unsafe or altered archives refused."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from edgepack.errors import IntegrityError
from edgepack.pipeline import build
from edgepack.runtime.bundle import extract_archive, verify_archive, verify_dir
from edgepack.verify import verify_bundle


def _members(bundle: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(bundle) as archive:
        return [(m, archive.extractfile(m).read() if m.isfile() else None) for m in archive.getmembers()]


def _rewrite(bundle: Path, target: Path, change) -> Path:
    """Write a copy of ``bundle`` whose members went through ``change(members) -> members``."""
    with tarfile.open(target, "w:gz") as archive:
        for info, data in change(_members(bundle)):
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return target


def test_verify_accepts_a_fresh_bundle(built_bundle):
    result = verify_bundle(built_bundle)
    assert result["ok"] and result["files"] >= 8 and result["name"] == "classifier"


def test_building_twice_gives_identical_bytes(spec_for, tmp_path):
    first = build(spec_for("pipeline.skops", quantize="none", out=tmp_path / "a"))
    second = build(spec_for("pipeline.skops", quantize="none", out=tmp_path / "b"))
    assert first.bundle.name == second.bundle.name
    assert first.bundle.read_bytes() == second.bundle.read_bytes()
    # gzip header without a timestamp, tar entries with fixed owners and times, sorted.
    raw = first.bundle.read_bytes()
    assert raw[4:8] == b"\0\0\0\0"
    names = [info.name for info, _ in _members(first.bundle)]
    assert names == sorted(names)
    assert {(info.uid, info.gid, info.uname, info.mtime) for info, _ in _members(first.bundle)} == {(0, 0, "", 0)}


def test_identical_across_processes_with_different_hash_seeds(data_dir, tmp_path):
    """Set and dict order inside converters and quantizers must not leak into the bytes."""
    import os
    import subprocess
    import sys

    digests = set()
    for seed in ("1", "2", "3"):
        out = tmp_path / seed
        done = subprocess.run(
            [sys.executable, "-m", "edgepack", "build", str(data_dir / "classifier.skops"), "--sample",
             str(data_dir / "sample.npy"), "--quantize", "int8-dynamic", "--target", "edge-arm64-4c-4gb",
             "--out", str(out), "--quiet", "--json"],
            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONHASHSEED": seed})
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout)
        assert summary["variant"] == "int8-dynamic"
        digests.add(summary["bundle_sha256"])
    assert len(digests) == 1


def test_source_date_epoch_sets_entry_times(spec_for, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    result = build(spec_for("regressor.skops", quantize="none"))
    assert {info.mtime for info, _ in _members(result.bundle)} == {1700000000}


def test_tampered_model_is_refused(built_bundle, tmp_path):
    def flip(members):
        for info, data in members:
            if info.name.endswith("/model.onnx"):
                data = data[:-1] + bytes([data[-1] ^ 1])
            yield info, data

    with pytest.raises(IntegrityError, match="checksum mismatch for model.onnx"):
        verify_archive(_rewrite(built_bundle, tmp_path / "t.tar.gz", flip))


def test_truncated_bundle_is_refused(built_bundle, tmp_path):
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(built_bundle.read_bytes()[: built_bundle.stat().st_size // 2])
    with pytest.raises(IntegrityError, match="not a complete gzip tar"):
        verify_archive(cut)


def test_not_gzip_is_refused(tmp_path):
    (tmp_path / "x.tar.gz").write_bytes(b"hello")
    with pytest.raises(IntegrityError, match="not a complete gzip tar"):
        verify_archive(tmp_path / "x.tar.gz")


def _with_extra(info: tarfile.TarInfo, data: bytes | None = None):
    def add(members):
        yield from members
        yield info, data

    return add


def _file(name: str, data: bytes = b"x") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info


def _special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


@pytest.mark.parametrize("make_entry, data, message", [
    (lambda root: _file("/etc/evil"), b"x", "unsafe path"),
    (lambda root: _file(f"{root}/../evil"), b"x", "unsafe path"),
    (lambda root: _special(f"{root}/link", tarfile.SYMTYPE, "/etc/passwd"), None, "is a link"),
    (lambda root: _special(f"{root}/hard", tarfile.LNKTYPE, f"{root}/model.onnx"), None, "is a link"),
    (lambda root: _special(f"{root}/dev", tarfile.CHRTYPE), None, "device or pipe"),
    (lambda root: _special(f"{root}/fifo", tarfile.FIFOTYPE), None, "device or pipe"),
    (lambda root: _file(f"{root}/extra.txt"), b"x", "not listed in SHA256SUMS"),
    (lambda root: _file("other/x"), b"x", "outside the bundle folder"),
])
def test_unsafe_or_extra_entries_are_refused(built_bundle, tmp_path, make_entry, data, message):
    root = built_bundle.name.removesuffix(".tar.gz")
    bad = _rewrite(built_bundle, tmp_path / "bad.tar.gz", _with_extra(make_entry(root), data))
    with pytest.raises(IntegrityError, match=message):
        verify_archive(bad)
    with pytest.raises(IntegrityError):
        extract_archive(bad, tmp_path / "unpacked")
    assert not (tmp_path / "unpacked").exists() or not any((tmp_path / "unpacked").iterdir())


def test_manifest_must_agree_with_checksums(built_bundle, tmp_path):
    # Editing the manifest and its line in SHA256SUMS consistently still breaks the file list.
    import hashlib

    def edit(members):
        members = list(members)
        manifest_info, manifest = next((i, d) for i, d in members if i.name.endswith("/manifest.json"))
        data = json.loads(manifest)
        data["files"] = data["files"][1:]
        new = json.dumps(data).encode()
        out = []
        for info, payload in members:
            if info.name.endswith("/manifest.json"):
                info.size, payload = len(new), new
            elif info.name.endswith("/SHA256SUMS"):
                lines = [line for line in payload.decode().splitlines() if not line.endswith("  manifest.json")]
                lines.append(f"{hashlib.sha256(new).hexdigest()}  manifest.json")
                payload = ("\n".join(lines) + "\n").encode()
                info.size = len(payload)
            out.append((info, payload))
        return out

    with pytest.raises(IntegrityError, match="disagree"):
        verify_archive(_rewrite(built_bundle, tmp_path / "m.tar.gz", edit))


def test_runtime_verifies_unpacked_folder(built_bundle, tmp_path):
    root = extract_archive(built_bundle, tmp_path)
    assert verify_dir(root).manifest["name"] == "classifier"
    # A bytecode cache would run instead of the checksummed sources: refused like any extra file
    # (the runtime never writes one; tests/test_bundle_hardening.py runs it).
    (root / "runtime" / "__pycache__").mkdir(exist_ok=True)
    (root / "runtime" / "__pycache__" / "bench.cpython-311.pyc").write_bytes(b"cache")
    with pytest.raises(IntegrityError, match="bytecode cache"):
        verify_dir(root)
    shutil.rmtree(root / "runtime" / "__pycache__")
    verify_dir(root)
    (root / "model.onnx").write_bytes((root / "model.onnx").read_bytes() + b"\0")
    with pytest.raises(IntegrityError, match="checksum mismatch for model.onnx"):
        verify_dir(root)
    shutil.rmtree(root)


def test_gzip_member_name_and_time_are_empty(built_bundle):
    with gzip.open(built_bundle) as handle:
        handle.read(1)
    header = built_bundle.read_bytes()[:10]
    assert header[3] & 0x08 == 0  # FNAME flag unset: no temp file name leaks into the bundle
