"""Bundles cannot carry a bomb or foreign code past verification (issue 13, items 4 and 5).

Real archives made with tarfile's headers and gzip: a 1 GiB member of zeros is compressed once per
session (about 1 MB) and spliced into bundles as its own gzip member, which gzip readers and
``tar xzf`` take as one stream. Real processes verify them: ``python -m edgepack verify`` and
``python -m runtime verify`` / ``./run verify`` inside an unpacked bundle, with their peak RSS read by
a parent process that runs nothing else (``RUSAGE_CHILDREN``).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib._bootstrap_external as bootstrap_external
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgepack.cli import app
from edgepack.errors import IntegrityError
from edgepack.runtime.bundle import extract_archive, verify_archive
from edgepack.runtime.unpack_limits import MAX_UNPACKED_ENV

GIB = 1 << 30
RSS_LIMIT_MB = 100
# Runs argv[1:] as its only child and prints the child's peak RSS (KiB on Linux) as its last stderr line.
_MEASURE = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
            "sys.exit(done.returncode)")


def _run_measured(argv: list[str], cwd: Path | None = None, env: dict | None = None,
                  timeout: float = 120) -> tuple[subprocess.CompletedProcess, float, float]:
    """The finished process, its peak RSS in MB and its wall time in seconds."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _MEASURE, *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    seconds = time.perf_counter() - started
    *lines, rss_kib = done.stderr.rstrip("\n").split("\n")
    done.stderr = "\n".join(lines)
    return done, int(rss_kib) / 1024, seconds


def _edgepack_verify(bundle: Path, **env: str):
    return _run_measured([sys.executable, "-m", "edgepack", "verify", str(bundle)], env={**os.environ, **env})


def _runtime_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # a device has no edgepack


def _report(name: str, done, rss_mb: float, seconds: float) -> None:
    # Shown with pytest -s; the figures go in the closing note.
    print(f"\n[{name}] exit {done.returncode}, peak RSS {rss_mb:.1f} MB, {seconds:.2f} s")


# --- archives, built from parts ---------------------------------------------------------------------

@pytest.fixture(scope="session")
def zeros_gz() -> tuple[bytes, str]:
    """1 GiB of zeros as one gzip member, made chunk by chunk (never 1 GiB in memory), and its SHA-256."""
    chunk = bytes(1 << 20)
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: a gzip header and trailer
    digest = hashlib.sha256()
    parts = []
    for _ in range(GIB // len(chunk)):
        parts.append(packer.compress(chunk))
        digest.update(chunk)
    parts.append(packer.flush())
    return b"".join(parts), digest.hexdigest()


def _members(bundle: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(bundle) as archive:
        return [(m, archive.extractfile(m).read() if m.isfile() else None) for m in archive.getmembers()]


def _tar(entries, end: bool = True) -> bytes:
    """Tar bytes of ``entries`` (TarInfo, data or None); a (TarInfo, int) entry is only a header
    whose data the caller splices in after it."""
    out = io.BytesIO()
    for info, data in entries:
        if isinstance(data, bytes):
            info.size = len(data)
        out.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        if isinstance(data, bytes):
            out.write(data + bytes(-len(data) % tarfile.BLOCKSIZE))
    if end:
        out.write(bytes(2 * tarfile.BLOCKSIZE))
    return out.getvalue()


def _spliced(target: Path, before, big: tarfile.TarInfo | None, zeros: bytes, after) -> Path:
    """``before``, then ``big``'s header and 1 GiB of zeros (``zeros``: its gzip member), then ``after``."""
    parts = [gzip.compress(_tar(before + ([(big, 0)] if big else []), end=False), 9, mtime=0)]
    if big is not None:
        parts.append(zeros)
    parts.append(gzip.compress(_tar(after), 9, mtime=0))
    target.write_bytes(b"".join(parts))
    return target


def _file(name: str, size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode = size, 0o644
    return info


def _with_listed(members, path: str, digest: str, size: int):
    """``members`` whose SHA256SUMS and manifest list ``path`` consistently."""
    out = []
    manifest = json.loads(next(d for i, d in members if i.name.endswith("/manifest.json")))
    manifest["files"] = sorted(manifest["files"] + [{"path": path, "sha256": digest, "size": size}],
                               key=lambda entry: entry["path"])
    manifest_bytes = json.dumps(manifest, indent=2).encode()
    for info, data in members:
        if info.name.endswith("/manifest.json"):
            data = manifest_bytes
        elif info.name.endswith("/SHA256SUMS"):
            sums = dict(reversed(line.split("  ", 1)) for line in data.decode().splitlines())
            sums[path] = digest
            sums["manifest.json"] = hashlib.sha256(manifest_bytes).hexdigest()
            data = "".join(f"{sums[p]}  {p}\n" for p in sorted(sums)).encode()
        out.append((info, data))
    return out


def _split_at(members, name: str):
    """The members sorted as edgepack writes them, split where ``name`` would go."""
    ordered = sorted(members, key=lambda m: m[0].name)
    before = [m for m in ordered if m[0].name < name]
    return before, [m for m in ordered if m[0].name >= name]


@pytest.fixture(scope="module")
def root_name(built_bundle: Path) -> str:
    return built_bundle.name.removesuffix(".tar.gz")


@pytest.fixture(scope="module")
def listed_bomb(built_bundle, root_name, zeros_gz, tmp_path_factory) -> Path:
    """A bundle whose SHA256SUMS and manifest list ``big.bin``, 1 GiB of zeros, consistently."""
    zeros, digest = zeros_gz
    members = _with_listed(_members(built_bundle), "big.bin", digest, GIB)
    before, after = _split_at(members, f"{root_name}/big.bin")
    return _spliced(tmp_path_factory.mktemp("bomb") / "listed.tar.gz", before,
                    _file(f"{root_name}/big.bin", GIB), zeros, after)


# --- 1. decompression bombs -------------------------------------------------------------------------

def test_a_consistently_listed_gib_is_refused_at_its_header(listed_bomb):
    assert listed_bomb.stat().st_size < 2 << 20  # 1 GiB unpacked from a ~1 MB archive
    done, rss_mb, seconds = _edgepack_verify(listed_bomb)
    _report("listed 1 GiB, default limit", done, rss_mb, seconds)
    assert done.returncode == 7, done.stderr
    assert "big.bin and the files before it would unpack to 1024." in done.stderr
    assert MAX_UNPACKED_ENV in done.stderr  # the way to let a trusted large bundle through
    assert rss_mb < RSS_LIMIT_MB and seconds < 10


def test_a_raised_limit_streams_the_gib_in_bounded_memory(listed_bomb):
    done, rss_mb, seconds = _edgepack_verify(listed_bomb, **{MAX_UNPACKED_ENV: "2048"})
    _report("listed 1 GiB, limit raised to 2048 MiB", done, rss_mb, seconds)
    assert done.returncode == 0, done.stderr
    assert "intact" in done.stdout
    assert rss_mb < RSS_LIMIT_MB and seconds < 20


def test_serve_unpacks_nothing_of_a_bomb(listed_bomb, tmp_path):
    # What `edgepack serve BUNDLE.tar.gz` and the bench runner unpack through.
    dest = tmp_path / "unpacked"
    dest.mkdir()
    with pytest.raises(IntegrityError, match="past the limit"):
        extract_archive(listed_bomb, dest)
    assert not any(dest.iterdir())
    with pytest.raises(IntegrityError, match="past the limit"):
        verify_archive(listed_bomb, max_unpacked_mb=512)
    assert verify_archive(listed_bomb, max_unpacked_mb=1100).sums["big.bin"]


def test_an_unlisted_gib_is_refused_before_its_data_is_read(built_bundle, root_name, zeros_gz, tmp_path):
    zeros, _ = zeros_gz
    before, after = _split_at(_members(built_bundle), f"{root_name}/big.bin")
    bomb = _spliced(tmp_path / "unlisted.tar.gz", before, _file(f"{root_name}/big.bin", GIB), zeros, after)
    done, rss_mb, seconds = _edgepack_verify(bomb, **{MAX_UNPACKED_ENV: "100000"})
    _report("unlisted 1 GiB, limit raised", done, rss_mb, seconds)
    assert done.returncode == 7 and "big.bin is not listed in SHA256SUMS" in done.stderr
    assert rss_mb < RSS_LIMIT_MB and seconds < 5

    # A header claiming 10 GiB followed by 1 MiB: reading its data would end in "not a complete gzip
    # tar"; the refusal names the entry, so nothing past its header was read.
    claimed = tmp_path / "claims-10gib.tar.gz"
    claimed.write_bytes(gzip.compress(_tar(before, end=False) + _tar([(_file(f"{root_name}/big.bin", 10 * GIB), 0)],
                                                                   end=False) + bytes(1 << 20), 9, mtime=0))
    done, rss_mb, seconds = _edgepack_verify(claimed, **{MAX_UNPACKED_ENV: "100000"})
    _report("unlisted 10 GiB header", done, rss_mb, seconds)
    assert done.returncode == 7 and "big.bin is not listed in SHA256SUMS" in done.stderr
    assert seconds < 5


@pytest.mark.parametrize("name", ["SHA256SUMS", "manifest.json"])
def test_a_gib_of_metadata_is_refused_unread(built_bundle, root_name, zeros_gz, tmp_path, name):
    zeros, digest = zeros_gz
    members = [(i, d) for i, d in _members(built_bundle) if not i.name.endswith(f"/{name}")]
    if name == "manifest.json":  # listed with the checksum of its 1 GiB, so only its size gives it away
        sums_at = next(n for n, (i, _) in enumerate(members) if i.name.endswith("/SHA256SUMS"))
        info, data = members[sums_at]
        lines = [line for line in data.decode().splitlines() if not line.endswith("  manifest.json")]
        members[sums_at] = (info, "".join(f"{line}\n" for line in sorted(lines + [f"{digest}  manifest.json"],
                                                                         key=lambda x: x[66:])).encode())
    before, after = _split_at(members, f"{root_name}/{name}")
    bomb = _spliced(tmp_path / "meta.tar.gz", before, _file(f"{root_name}/{name}", GIB), zeros, after)
    done, rss_mb, seconds = _edgepack_verify(bomb, **{MAX_UNPACKED_ENV: "100000"})
    _report(f"1 GiB {name}", done, rss_mb, seconds)
    assert done.returncode == 7, done.stderr
    assert f"{name} is {GIB} bytes, more than the" in done.stderr
    assert rss_mb < RSS_LIMIT_MB and seconds < 5


def test_a_gib_tar_header_is_refused_unread(built_bundle, root_name, zeros_gz, tmp_path):
    # tarfile reads a pax extended header whole: 1 GiB of it would be 1 GiB in memory.
    zeros, _ = zeros_gz
    before, after = _split_at(_members(built_bundle), f"{root_name}/big.bin")
    header = _file(f"{root_name}/././@PaxHeader", GIB)
    header.type = tarfile.XHDTYPE
    bomb = _spliced(tmp_path / "pax.tar.gz", before, header, zeros, after)
    done, rss_mb, seconds = _edgepack_verify(bomb, **{MAX_UNPACKED_ENV: "100000"})
    _report("1 GiB pax header", done, rss_mb, seconds)
    assert done.returncode == 7 and f"an archive header asks for {GIB} bytes at once" in done.stderr
    assert rss_mb < RSS_LIMIT_MB and seconds < 5


def test_a_sparse_entry_is_refused(built_bundle, root_name, tmp_path):
    # Its holes read back as zeros: a few stored bytes could stand for a terabyte.
    sparse = _file(f"{root_name}/model.onnx")
    sparse.type = tarfile.GNUTYPE_SPARSE
    members = sorted([m for m in _members(built_bundle) if not m[0].name.endswith("/model.onnx")]
                     + [(sparse, b"")], key=lambda m: m[0].name)
    bad = tmp_path / "sparse.tar.gz"
    bad.write_bytes(gzip.compress(_tar(members), 9, mtime=0))
    with pytest.raises(IntegrityError, match="is a sparse file"):
        verify_archive(bad)


@pytest.mark.parametrize("name", ["SHA256SUMS", "manifest.json"])
def test_the_runtime_reads_no_gib_of_metadata(built_bundle, tmp_path, name):
    root = extract_archive(built_bundle, tmp_path)
    with open(root / name, "r+b") as handle:  # sparse: 1 GiB on paper, nothing on disk
        handle.truncate(GIB)
    done, rss_mb, seconds = _run_measured([sys.executable, "-m", "runtime", "verify"], cwd=root, env=_runtime_env())
    _report(f"runtime verify, 1 GiB {name} on disk", done, rss_mb, seconds)
    assert done.returncode == 7, done.stderr
    assert rss_mb < RSS_LIMIT_MB and seconds < 10
    if name == "SHA256SUMS":
        assert "more than the 8388608 bytes" in done.stderr
    else:  # its checksum no longer matches: refused before it is parsed
        assert "checksum mismatch for manifest.json" in done.stderr


def test_a_bad_limit_is_an_input_error(built_bundle):
    done = subprocess.run([sys.executable, "-m", "edgepack", "verify", str(built_bundle)], capture_output=True,
                          text=True, env={**os.environ, MAX_UNPACKED_ENV: "lots"}, timeout=120)
    assert done.returncode == 3 and MAX_UNPACKED_ENV in done.stderr


# --- 2. truncated streams ---------------------------------------------------------------------------

def test_a_cut_gzip_trailer_is_refused(built_bundle, tmp_path):
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(built_bundle.read_bytes()[:-8])  # the CRC-32 and length of the gzip stream
    assert subprocess.run(["tar", "xzf", str(cut)], cwd=tmp_path, capture_output=True).returncode != 0
    done, rss_mb, seconds = _edgepack_verify(cut)
    _report("gzip trailer cut", done, rss_mb, seconds)
    assert done.returncode == 7 and "not a complete gzip tar" in done.stderr


def test_a_corrupt_gzip_crc_is_refused(built_bundle, tmp_path):
    raw = bytearray(built_bundle.read_bytes())
    raw[-8] ^= 0xFF
    bad = tmp_path / "crc.tar.gz"
    bad.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="not a complete gzip tar"):
        verify_archive(bad)


def test_a_tar_without_its_end_is_refused(built_bundle, tmp_path):
    members = sorted(_members(built_bundle), key=lambda m: m[0].name)
    whole = tmp_path / "whole.tar.gz"
    whole.write_bytes(gzip.compress(_tar(members), 9, mtime=0))
    assert verify_archive(whole).manifest["name"] == "classifier"  # the parts make a good bundle
    endless = tmp_path / "endless.tar.gz"
    endless.write_bytes(gzip.compress(_tar(members, end=False), 9, mtime=0))  # a valid gzip of a cut tar
    with pytest.raises(IntegrityError, match="without its end-of-archive blocks"):
        verify_archive(endless)
    garbage = tmp_path / "garbage.tar.gz"  # a broken header after the last entry: tarfile stops quietly
    garbage.write_bytes(gzip.compress(_tar(members, end=False) + b"\x01" * 1024, 9, mtime=0))
    with pytest.raises(IntegrityError, match="without its end-of-archive blocks"):
        verify_archive(garbage)


# --- 3. foreign code and special files in an unpacked bundle ----------------------------------------

def _plant_pyc(root: Path, module: str) -> Path:
    """A valid bytecode cache of ``runtime/<module>.py`` that Python would take for it (same mtime and
    size in its header) and that writes PWNED instead."""
    source = root / "runtime" / f"{module}.py"
    code = compile("import pathlib; pathlib.Path('PWNED').write_text('x'); print('ok: pwned, 99 files verified')",
                   str(source), "exec")
    info = source.stat()
    pyc = root / "runtime" / "__pycache__" / f"{module}.{sys.implementation.cache_tag}.pyc"
    pyc.parent.mkdir(exist_ok=True)
    pyc.write_bytes(bootstrap_external._code_to_timestamp_pyc(code, int(info.st_mtime), info.st_size))
    return pyc


@pytest.mark.parametrize("module", ["__main__", "bundle", "__init__"])
def test_a_planted_pyc_never_runs_under_the_launcher(built_bundle, tmp_path, module):
    root = extract_archive(built_bundle, tmp_path)
    _plant_pyc(root, module)
    done = subprocess.run(["./run", "verify"], cwd=root, capture_output=True, text=True, env=_runtime_env(),
                          timeout=120)
    assert done.returncode == 7, done.stdout + done.stderr
    assert "runtime/__pycache__ is not part of this bundle" in done.stderr
    assert not (root / "PWNED").exists()


@pytest.mark.parametrize("module", ["__main__", "bundle"])
def test_a_planted_pyc_never_runs_under_python_m_runtime(built_bundle, tmp_path, module):
    # Without the launcher the package's own __init__ is compiled by Python as usual (see the
    # report); every module it imports comes from its checksummed source.
    root = extract_archive(built_bundle, tmp_path)
    _plant_pyc(root, module)
    done = subprocess.run([sys.executable, "-m", "runtime", "verify"], cwd=root, capture_output=True, text=True,
                          env=_runtime_env(), timeout=120)
    assert done.returncode == 7, done.stdout + done.stderr
    assert "runtime/__pycache__ is not part of the bundle (a bytecode cache" in done.stderr
    assert not (root / "PWNED").exists()


def test_running_the_runtime_writes_no_bytecode(built_bundle, tmp_path):
    root = extract_archive(built_bundle, tmp_path)
    for argv in ([sys.executable, "-m", "runtime", "verify"], ["./run", "verify"],
                 [sys.executable, "-m", "runtime", "verify"]):
        done = subprocess.run(argv, cwd=root, capture_output=True, text=True, env=_runtime_env(), timeout=120)
        assert done.returncode == 0 and "files verified" in done.stdout, done.stderr
    assert not list(root.rglob("__pycache__"))


def test_an_unlisted_pyc_in_the_archive_is_refused(built_bundle, root_name, tmp_path):
    members = sorted(_members(built_bundle) + [(_file(f"{root_name}/runtime/__pycache__/bundle.pyc"), b"x")],
                     key=lambda m: m[0].name)
    bad = tmp_path / "pyc.tar.gz"
    bad.write_bytes(gzip.compress(_tar(members), 9, mtime=0))
    done, _, _ = _edgepack_verify(bad)
    assert done.returncode == 7 and "not listed in SHA256SUMS" in done.stderr


def _special_files():
    yield pytest.param("fifo", lambda path: os.mkfifo(path), "a pipe (FIFO)", id="fifo")
    yield pytest.param("link", lambda path: os.symlink("/etc/passwd", path), "a link", id="symlink")
    yield pytest.param("dev", lambda path: os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3)), "a device",
                       id="char-device", marks=pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root"))


@pytest.mark.parametrize("name, make, kind", list(_special_files()))
@pytest.mark.parametrize("where", ["", "runtime/"])
def test_special_files_in_the_unpacked_folder_are_refused(built_bundle, tmp_path, name, make, kind, where):
    root = extract_archive(built_bundle, tmp_path)
    make(root / f"{where}{name}")
    done = subprocess.run([sys.executable, "-m", "runtime", "verify"], cwd=root, capture_output=True, text=True,
                          env=_runtime_env(), timeout=60)
    assert done.returncode == 7, done.stdout + done.stderr
    assert f"{where}{name} is {kind}; a bundle holds only regular files and folders" in done.stderr


def test_a_listed_file_swapped_for_a_fifo_is_refused_without_blocking(built_bundle, tmp_path):
    root = extract_archive(built_bundle, tmp_path)
    (root / "model.onnx").unlink()
    os.mkfifo(root / "model.onnx")
    done = subprocess.run([sys.executable, "-m", "runtime", "verify"], cwd=root, capture_output=True, text=True,
                          env=_runtime_env(), timeout=60)
    assert done.returncode == 7 and "model.onnx is a pipe (FIFO)" in done.stderr


# --- 4. exit codes ----------------------------------------------------------------------------------

def test_verify_of_a_missing_path_is_an_input_error(tmp_path):
    result = CliRunner().invoke(app, ["verify", str(tmp_path / "nothing.tar.gz")])
    assert result.exit_code == 3, result.output
    assert "no such bundle file" in result.output
