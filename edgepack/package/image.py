"""A cloud image of a bundle, written without an engine: base layers, then deps, model and app layers.

``ImageBuild`` works in three steps around the rest of a build: ``prepare`` (before conversion, so
a missing base, platform or Python fails fast) reads the bases and makes the dependency layers,
both kept in edgepack's cache; ``assemble`` (once the bundle's files exist) writes, in a staging
folder inside the output folder, the layout with the model and app layers, configs and manifests,
the docker-archive tar, the Dockerfile with its context and the SBOM, and checks the size budget
first; ``publish`` renames them into place. Nothing is in the output folder under its final name
before ``publish``, and ``discard`` removes the staging folder of a build that failed on the way.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepack.bench.profiles import host_arch
from edgepack.errors import BudgetExceeded, ImageError, IntegrityError
from edgepack.package.base_image import BaseImage, Platform, open_base, python_file, split_tag
from edgepack.package.builders import EngineBuild, builder_for
from edgepack.package.bundle import LAUNCHER_NAME, source_date_epoch
from edgepack.runtime.files import write_atomic
from edgepack.package.docker_archive import write_docker_archive
from edgepack.package.dockerfile import base_args, dockerfile_text, write_context
from edgepack.package.image_config import APP_DIR, image_config, image_env, image_labels
from edgepack.package.image_deps import DEPS_DIR, deps_layer
from edgepack.package.oci import (OCI_INDEX, OCI_MANIFEST, REF_NAME, Blob, BlobStore, LayerEntries, LayerScan,
                                  replace_dir, scan_layer, write_layer, write_layout)
from edgepack.package.sbom import created_at, image_sbom
from edgepack.package.wheels import DEFAULT_PYTHON, WheelRequest, WheelSet, cache_root

MODEL_NAME = "model.onnx"


@dataclass(frozen=True)
class ImageRequest:
    bases: tuple[str, ...]
    platforms: tuple[Platform, ...]
    onnxruntime: str  # the profile's: the version the deps layer installs
    python: str | None = None  # --python-version: the deps' Python, trusted when the base hides its own
    default_python: str | None = None  # the profile's [image] python, when the base does not say
    builder: str = "native"
    max_image_mb: float | None = None
    timeout_s: float = 30.0
    where: str = "the profile"


@dataclass
class _Platformed:
    platform: Platform
    base: BaseImage
    base_layers: list[tuple[Path, Blob]]  # local file, blob with diff_id and tar size
    python: str
    deps: tuple[Path, Blob]
    wheels: WheelSet


@dataclass(frozen=True)
class LayerReport:
    role: str  # base | deps | model | app
    digest: str
    diff_id: str
    size_bytes: int
    uncompressed_bytes: int

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ImageResult:
    ref: str
    tag: str
    digest: str
    media_type: str
    layout: Path
    archive: Path
    archive_platform: str
    dockerfile: Path
    context: Path
    sbom: Path
    sbom_sha256: str
    builder: str
    platforms: dict[str, dict[str, Any]]  # "linux/amd64" -> digest, base, python, layers, sizes
    engine_image: str | None = None
    next_steps: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        body = {key: str(value) if isinstance(value, Path) else value for key, value in self.__dict__.items()}
        body.pop("next_steps")
        return body


class ImageBuild:
    def __init__(self, request: ImageRequest, out: Path, reporter: Any = None, debug: bool = False) -> None:
        self.request, self.out, self.reporter, self.debug = request, out, reporter, debug
        self.builder = builder_for(request.builder)
        self.staging: Path | None = None
        self.images: list[_Platformed] = []
        self.outputs: dict[str, Path] = {}
        self.result: ImageResult | None = None
        self.engine_request: EngineBuild | None = None

    def discard(self) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None

    def _say(self, method: str, stage: str, text: str) -> None:
        if self.reporter:
            getattr(self.reporter, method)(stage, text)

    # --- before conversion ----------------------------------------------------------------------
    def prepare(self) -> None:
        request = self.request
        self.builder.check(list(request.bases))
        self._say("start", "base", f"Reading base image {', '.join(request.bases)}")
        offered = [image for spec in request.bases for image in open_base(spec, request.timeout_s)]
        for platform in request.platforms:
            base = next((image for image in offered if (image.platform.os, image.platform.architecture)
                         == (platform.os, platform.architecture)), None)
            if base is None:
                have = ", ".join(sorted({str(image.platform) for image in offered})) or "no platform"
                raise ImageError(f"base image {', '.join(request.bases)} provides {have}, not {platform}",
                                 "give a multi-platform (index) base, or one --base-image per platform")
            layers, names = self._read_base(base)
            python = self._python_for(base, names)
            self._say("finish", "base", f"{base.name} for {platform}: {len(layers)} layers, Python {python}")
            wheels_request = WheelRequest(arch=platform.arch, python=python, onnxruntime=request.onnxruntime,
                                          where=request.where, serve=True)
            deps_file, deps, wheels = deps_layer(wheels_request, self.reporter, self.debug)
            self.images.append(_Platformed(platform, base, layers, python, (deps_file, deps), wheels))

    def _read_base(self, base: BaseImage) -> tuple[list[tuple[Path, Blob]], list[tuple[str, ...]]]:
        """Each layer's file, checked against its diff_id, and the names in it that may be Python."""
        diff_ids = list(base.config.get("rootfs", {}).get("diff_ids") or [])
        if len(diff_ids) != len(base.layers):
            raise IntegrityError(f"base image {base.source}: {len(base.layers)} layers but {len(diff_ids)} diff_ids",
                                 "the base image is damaged; fetch it again")
        blobs, names = [], []
        for descriptor, diff_id in zip(base.layers, diff_ids):
            if not descriptor["mediaType"].endswith(("tar+gzip", "tar")):
                raise ImageError(f"base image {base.source}: a {descriptor['mediaType']} layer",
                                 "use a base whose layers are gzip tars (most are)")
            path = base.layer_file(descriptor)
            scan = _scan_base_layer(path, descriptor["digest"], base.source)
            if scan.diff_id != diff_id:
                raise IntegrityError(f"base image {base.source}: layer {descriptor['digest'][:19]} does not match "
                                     "its diff_id", "the base image is damaged; fetch it again")
            blobs.append((path, Blob(descriptor["digest"], int(descriptor["size"]), descriptor["mediaType"],
                                     scan.diff_id, scan.uncompressed_size)))
            names.append(scan.names)
        return blobs, names

    def _python_for(self, base: BaseImage, names: list[tuple[str, ...]]) -> str:
        found = base.python_versions(names)
        asked = self.request.python
        if asked is not None and (asked in found or not found):
            return asked  # --python-version: trusted where the base hides its Python
        if asked is not None:
            raise ImageError(f"base image {base.source} has Python {', '.join(sorted(found))}, not {asked} "
                             "(--python-version)", f"drop --python-version or pass {sorted(found)[-1]}")
        if len(found) == 1:
            return found.pop()
        if not found:
            raise ImageError(f"base image {base.source} ({base.platform}) has no python3.X in /usr/bin or "
                             "/usr/local/bin and no PYTHON_VERSION in its environment",
                             "use a base with Python 3 such as python:3.11-slim, or pass --python-version X.Y "
                             "if its Python is elsewhere")
        preferred = self.request.default_python or DEFAULT_PYTHON
        if preferred in found:
            return preferred
        raise ImageError(f"base image {base.source} has Python {', '.join(sorted(found))}; which one runs the "
                         "server is not clear", "pass --python-version X.Y")

    # --- after the bundle -----------------------------------------------------------------------
    def assemble(self, files: dict[str, bytes], name: str, version: str, description: str) -> None:
        """``files``: the bundle's, by path inside it. Raises BudgetExceeded before writing anything."""
        if MODEL_NAME not in files:
            raise IntegrityError("the bundle has no model.onnx to put in the image", "report this as a bug")
        self.out.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=".edgepack-image-", dir=self.out))
        self.store = BlobStore(self.staging / "layout")
        try:
            self._assemble(files, name, version, description)
        except BaseException:
            self.discard()
            raise

    def _assemble(self, files: dict[str, bytes], name: str, version: str, description: str) -> None:
        assert self.staging is not None
        mtime, created = source_date_epoch(), created_at()
        model_entries, app_entries = LayerEntries(), LayerEntries()
        model_entries.add(f"{APP_DIR}/{MODEL_NAME}", files[MODEL_NAME])
        app_files = {path: (data, 0o755 if path == LAUNCHER_NAME else 0o644) for path, data in files.items()
                     if path != MODEL_NAME}
        for path, (data, mode) in app_files.items():
            app_entries.add(f"{APP_DIR}/{path}", data, mode)
        model = self._layer(model_entries, "model")
        app = self._layer(app_entries, "app")
        model_sha256 = hashlib.sha256(files[MODEL_NAME]).hexdigest()
        sbom = image_sbom(name, version, model_sha256, {str(i.platform): i.wheels for i in self.images})
        sbom_sha256 = hashlib.sha256(sbom).hexdigest()
        tag, repo_tag = version, f"edgepack/{name}:{version}"
        stem = f"{name}-{version}"

        descriptors, reports, labels_of = [], {}, {}
        for image in self.images:
            for path, blob in [*image.base_layers, image.deps]:
                self.store.put_file(path, blob)
            layers = [*(blob for _, blob in image.base_layers), image.deps[1], model, app]
            labels = image_labels(name, version, created, image.base, model_sha256, sbom_sha256, description)
            labels_of[image.platform.architecture] = labels
            config = image_config(image.base, [layer.diff_id or "" for layer in layers], labels, created, DEPS_DIR,
                                  [f"COPY deps {DEPS_DIR} (CPython {image.python})", f"COPY {MODEL_NAME} {APP_DIR}/",
                                   f"COPY app {APP_DIR}/"])
            config_blob = self.store.put_json(config, "application/vnd.oci.image.config.v1+json")
            manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_blob.descriptor(),
                        "layers": [layer.descriptor() for layer in layers], "annotations": labels}
            manifest_blob = self.store.put_json(manifest, OCI_MANIFEST)
            descriptors.append(manifest_blob.descriptor(platform=image.platform.oci()))
            roles = ["base"] * len(image.base_layers) + ["deps", "model", "app"]
            report = [LayerReport(role, layer.digest, layer.diff_id or "", layer.size, layer.uncompressed_size or 0)
                      for role, layer in zip(roles, layers)]
            reports[str(image.platform)] = {
                "digest": manifest_blob.digest, "config_digest": config_blob.digest, "python": image.python,
                "base": {"name": image.base.name, "digest": image.base.digest, "source": image.base.source},
                "size_bytes": sum(r.size_bytes for r in report) + config_blob.size + manifest_blob.size,
                "uncompressed_bytes": sum(r.uncompressed_bytes for r in report),
                "added_bytes": sum(r.size_bytes for r in report if r.role != "base"),
                "layers": [r.to_json() for r in report],
                "manifest": manifest,
            }
        self._check_budget(reports)
        if len(descriptors) == 1:
            top = {**descriptors[0]}
        else:
            index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors,
                     "annotations": {key: labels_of[self.images[0].platform.architecture][key] for key in
                                     ("org.opencontainers.image.title", "org.opencontainers.image.version",
                                      "org.opencontainers.image.created")}}
            top = self.store.put_json(index, OCI_INDEX).descriptor()
        write_layout(self.store.root, [{**top, "annotations": {REF_NAME: tag}}])

        archive_image = next((i for i in self.images if i.platform.arch == host_arch()), self.images[0])
        chosen = reports[str(archive_image.platform)]
        write_docker_archive(self.store, chosen["manifest"], repo_tag, self.staging / "image.tar")
        for report in reports.values():
            del report["manifest"]
        bases = {i.platform.architecture: _from_reference(i.base) for i in self.images}
        _, env = image_env([], DEPS_DIR)
        config = image_config(self.images[0].base, [], {}, created, DEPS_DIR, [])["config"]
        dockerfile = dockerfile_text(bases, env, labels_of, config, DEPS_DIR, APP_DIR)
        write_atomic(self.staging / "Dockerfile", dockerfile.encode())
        write_context(self.staging / "context", self.store,
                      {i.platform.architecture: i.deps[1].digest for i in self.images},
                      DEPS_DIR, files[MODEL_NAME], app_files)
        write_atomic(self.staging / "sbom.cdx.json", sbom)
        self.outputs = {"layout": self.out / f"{stem}.oci", "archive": self.out / f"{stem}.image.tar",
                        "dockerfile": self.out / f"{stem}.Dockerfile", "context": self.out / f"{stem}.context",
                        "sbom": self.out / f"{stem}.sbom.cdx.json"}
        first_labels = labels_of[self.images[0].platform.architecture]
        # The engine's manifest annotations are the native manifest's (its labels), where all platforms agree.
        self.engine_request = EngineBuild(
            dockerfile=self.outputs["dockerfile"], context=self.outputs["context"], tag=repo_tag,
            platforms=tuple(_with_variant(i.platform) for i in self.images), base_args=base_args(bases),
            annotations={key: value for key, value in first_labels.items()
                         if all(labels.get(key) == value for labels in labels_of.values())},
            timestamp=mtime)
        self.result = ImageResult(
            ref=repo_tag, tag=tag, digest=top["digest"], media_type=top["mediaType"], layout=self.outputs["layout"],
            archive=self.outputs["archive"], archive_platform=str(archive_image.platform),
            dockerfile=self.outputs["dockerfile"], context=self.outputs["context"], sbom=self.outputs["sbom"],
            sbom_sha256=sbom_sha256, builder=self.builder.name, platforms=reports)

    def _layer(self, entries: LayerEntries, role: str) -> Blob:
        assert self.staging is not None
        partial = self.staging / f"{role}.layer"
        blob = write_layer(entries, partial, source_date_epoch())
        self.store.put_file(partial, blob)
        partial.unlink()
        return blob

    def _check_budget(self, reports: dict[str, dict[str, Any]]) -> None:
        limit = self.request.max_image_mb
        if not limit:
            return
        for platform, report in reports.items():
            if report["size_bytes"] > limit * 2**20:
                largest = max(report["layers"], key=lambda layer: layer["size_bytes"])
                raise BudgetExceeded(f"image size {report['size_bytes'] / 2**20:.1f} MB ({platform}, compressed) "
                                     f"exceeds the budget of {limit:g} MB",
                                     f"its largest layer is the {largest['role']} layer "
                                     f"({largest['size_bytes'] / 2**20:.1f} MB); use a smaller base or raise "
                                     "--max-image-mb")

    def publish(self) -> ImageResult:
        """Every output under its final name (each rename atomic), then the engine build if one was asked."""
        assert self.result is not None and self.staging is not None and self.engine_request is not None
        replace_dir(self.staging / "layout", self.outputs["layout"])
        replace_dir(self.staging / "context", self.outputs["context"])
        for key, staged in (("archive", "image.tar"), ("dockerfile", "Dockerfile"), ("sbom", "sbom.cdx.json")):
            (self.staging / staged).replace(self.outputs[key])
        self.discard()
        if self.builder.name != "native":
            self._say("start", "engine", f"Building {self.result.ref} with {self.builder.name}")
            self.result.engine_image = self.builder.build(self.engine_request)
            self._say("finish", "engine", f"{self.builder.name}: {self.result.engine_image}")
        layout, archive = self.outputs["layout"], self.outputs["archive"]
        self.result.next_steps = [f"podman load -i {archive}   # or docker load -i",
                                  f"skopeo inspect oci:{layout}:{self.result.tag}",
                                  f"edgepack push {layout} REGISTRY/REPOSITORY:{self.result.tag}"]
        return self.result


_SCAN_FORMAT = 1  # bump when what a scan records (python_file's names) changes


def _scan_base_layer(path: Path, digest: str, source: str) -> LayerScan:
    """``scan_layer`` of a base layer, remembered by its digest after checking the file has that digest.

    Decompressing a Python base's layers to list their files takes seconds on every build; hashing
    the compressed file is a tenth of that, and a file with the right digest has the same contents,
    so the same diff_id and names, as when it was scanned.
    """
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            hasher.update(chunk)
    if f"sha256:{hasher.hexdigest()}" != digest:
        raise IntegrityError(f"base image {source}: layer {digest[:19]} does not have its digest",
                             "the base image is damaged; fetch it again")
    record = cache_root() / "base-scans" / f"{digest.split(':')[1]}.v{_SCAN_FORMAT}.json"
    try:
        known = json.loads(record.read_text(encoding="utf-8"))
        return LayerScan(known["diff_id"], int(known["uncompressed_size"]), tuple(known["names"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    scan = scan_layer(path, python_file)
    write_atomic(record, json.dumps({"diff_id": scan.diff_id, "uncompressed_size": scan.uncompressed_size,
                                     "names": list(scan.names)}, sort_keys=True).encode())
    return scan
def _with_variant(platform: Platform) -> str:
    """linux/arm64/v8: an engine then records the variant, as the native index does."""
    oci = platform.oci()
    return "/".join(part for part in (oci["os"], oci["architecture"], oci.get("variant")) if part)


def _from_reference(base: BaseImage) -> str:
    """How a Dockerfile names the base: registry images pinned by digest, local ones by absolute path (an
    engine reads a relative one from its own working folder, not the caller's)."""
    if base.source.startswith("oci:"):
        path, tag = split_tag(base.source[len("oci:"):])
        return f"oci:{os.path.abspath(path)}" + (f":{tag}" if tag else "")
    if base.source.startswith("docker-archive:"):
        return f"docker-archive:{os.path.abspath(base.source[len('docker-archive:'):])}"
    name = base.name.split("@")[0]
    head, sep, tail = name.rpartition(":")
    return f"{head if sep and '/' not in tail else name}@{base.digest}"


def bundle_files(archive: bytes) -> dict[str, bytes]:
    """The files of a bundle archive by their path inside its top folder: what the image carries."""
    import io
    import tarfile

    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as bundle:
        for member in bundle.getmembers():
            if member.isfile():
                files[member.name.split("/", 1)[1]] = bundle.extractfile(member).read()  # type: ignore[union-attr]
    return files
