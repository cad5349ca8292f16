"""A small client of the registry HTTP API v2 (the OCI distribution API), with urllib only.

Pull: a manifest or index by tag or digest, then configs and layers by digest (layers are kept in
edgepack's cache by digest, so a second build from the same base is offline). Push: each blob
unless the registry has it already (HEAD), uploaded whole (POST for an upload URL, then PUT with
``?digest=``), then the manifests by digest and the top one by tag. Authentication: none, basic,
or bearer tokens from the realm the registry names in its ``WWW-Authenticate`` challenge, with
credentials from the caller or ``~/.docker/config.json``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from edgepack.errors import ImageError, RegistryError
from edgepack.package.oci import INDEX_TYPES, MANIFEST_TYPES, OCI_INDEX, OCI_MANIFEST, Blob, BlobStore, check_digest

DOCKER_HUB = "registry-1.docker.io"
_ACCEPT = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))
_LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")
_CHUNK = 1 << 20
_NAME = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class Reference:
    host: str  # host[:port] as written, docker.io for Docker Hub
    repository: str
    reference: str  # a tag or sha256:... digest

    @classmethod
    def parse(cls, text: str, default_tag: str | None = "latest") -> "Reference":
        rest = text.strip().removeprefix("docker://")
        first, _, remainder = rest.partition("/")
        if remainder and ("." in first or ":" in first or first == "localhost"):
            host, rest = first, remainder
        else:
            host = "docker.io"
        if "@" in rest:
            rest, reference = rest.split("@", 1)
            check_digest(reference, text)
        else:
            head, sep, tail = rest.rpartition(":")
            rest, reference = (head, tail) if sep and "/" not in tail else (rest, default_tag or "")
        if host == "docker.io" and "/" not in rest:
            rest = f"library/{rest}"
        untagged_ok = default_tag is None and not reference  # the caller fills the tag in
        if not _NAME.match(rest) or (not reference and not untagged_ok) \
                or (reference and ":" not in reference and not _TAG.match(reference)):
            raise ImageError(f"{text!r} is not an image reference",
                             "write REGISTRY/REPOSITORY:TAG, e.g. 127.0.0.1:5000/models/digits:v1")
        return cls(host, rest, reference)

    @property
    def api_host(self) -> str:
        return DOCKER_HUB if self.host == "docker.io" else self.host

    def __str__(self) -> str:
        joiner = "@" if self.reference.startswith("sha256:") else ":"
        return f"{self.host}/{self.repository}{joiner}{self.reference}"


class RegistryClient:
    def __init__(self, ref: Reference, insecure: bool | None = None, timeout: float = 30.0,
                 credentials: tuple[str, str] | None = None, push: bool = False) -> None:
        self.ref = ref
        local = ref.api_host.rsplit(":", 1)[0] in _LOCAL_HOSTS or ref.api_host in _LOCAL_HOSTS
        self.base = f"{'http' if (insecure or (insecure is None and local)) else 'https'}://{ref.api_host}"
        self.timeout = timeout
        self.credentials = credentials or docker_config_credentials(ref.host)
        self.scope = f"repository:{ref.repository}:{'pull,push' if push else 'pull'}"
        self.authorization: str | None = None

    # --- plumbing -------------------------------------------------------------------------------
    def request(self, method: str, url: str, data: bytes | BinaryIO | None = None,
                headers: dict[str, str] | None = None, ok: tuple[int, ...] = (200,)) -> tuple[int, Any, bytes]:
        for attempt in (1, 2):
            request = urllib.request.Request(url if "://" in url else self.base + url, data=data, method=method,
                                             headers=headers or {})
            if self.authorization:
                # Unredirected: blob downloads are often redirected to storage that refuses a second
                # Authorization header.
                request.add_unredirected_header("Authorization", self.authorization)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.status, response.headers, response.read() if method != "HEAD" else b""
            except urllib.error.HTTPError as err:
                body = err.read() if method != "HEAD" else b""
                if err.code in ok:
                    return err.code, err.headers, body
                if err.code == 401 and attempt == 1 and (data is None or isinstance(data, bytes)):
                    self._authenticate(err.headers.get("WWW-Authenticate", ""))
                    continue
                raise self._error(method, url, err.code, body) from None
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, OSError) as err:
                reason = getattr(err, "reason", err)
                raise RegistryError(f"cannot reach the registry {self.ref.host} ({reason})",
                                    "check the address and that it runs; plain-http registries need --insecure"
                                    + ("; for a base image without network, give --base-image oci:PATH"
                                       if not self.scope.endswith("push") else "")) from None
        raise RegistryError(f"the registry {self.ref.host} refused the credentials", "check --username/--password-stdin")

    def _error(self, method: str, url: str, code: int, body: bytes) -> RegistryError:
        try:
            detail = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in json.loads(body).get("errors", []))
        except (ValueError, AttributeError):
            detail = body[:120].decode(errors="replace").strip()
        where = f"{self.ref.host}/{self.ref.repository}"
        if code in (401, 403):
            return RegistryError(f"the registry {where} denied {method} ({code}{': ' + detail if detail else ''})",
                                 "log in: --username NAME --password-stdin, or `docker login` for ~/.docker/config.json")
        if code == 404:
            return RegistryError(f"{where}: {url.rsplit('/', 1)[-1]} not found (404{': ' + detail if detail else ''})",
                                 "check the repository and tag")
        return RegistryError(f"the registry {where} answered {method} with {code}{': ' + detail if detail else ''}",
                             "see the registry's logs")

    def _authenticate(self, challenge: str) -> None:
        scheme, _, params = challenge.partition(" ")
        fields = dict(re.findall(r'(\w+)="([^"]*)"', params))
        basic = ("Basic " + base64.b64encode(f"{self.credentials[0]}:{self.credentials[1]}".encode()).decode()
                 if self.credentials else None)
        if scheme.lower() == "basic" and basic:
            self.authorization = basic
            return
        if scheme.lower() != "bearer" or "realm" not in fields:
            raise RegistryError(f"the registry {self.ref.host} asks for credentials ({challenge or 'no challenge'})",
                                "log in: --username NAME --password-stdin")
        # Our own scope, not the challenge's: a HEAD before a push is challenged for pull only.
        query = {"service": fields.get("service", ""), "scope": self.scope}
        request = urllib.request.Request(f"{fields['realm']}?{urllib.parse.urlencode(query)}")
        if basic:
            request.add_header("Authorization", basic)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError) as err:
            raise RegistryError(f"cannot get a token from {fields['realm']} ({getattr(err, 'reason', err)})",
                                "check the credentials and the network") from None
        token = body.get("token") or body.get("access_token")
        if not token:
            raise RegistryError(f"{fields['realm']} gave no token", "check the credentials")
        self.authorization = f"Bearer {token}"

    # --- pull -----------------------------------------------------------------------------------
    def manifest(self, reference: str) -> tuple[str, str, bytes]:
        """(media type, digest, bytes) of a manifest or index."""
        _, headers, body = self.request("GET", f"/v2/{self.ref.repository}/manifests/{reference}",
                                        headers={"Accept": _ACCEPT})
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise RegistryError(f"{self.ref}: the manifest does not match its digest", "try again; report the registry")
        media_type = headers.get("Content-Type", "").split(";")[0] or json.loads(body).get("mediaType", "")
        return media_type, digest, body

    def fetch_blob(self, descriptor: dict[str, Any], store: BlobStore) -> Blob:
        blob = Blob(descriptor["digest"], int(descriptor["size"]), descriptor["mediaType"])
        if store.has(blob.digest):
            return blob
        request = urllib.request.Request(f"{self.base}/v2/{self.ref.repository}/blobs/{blob.digest}")
        if self.authorization:
            request.add_unredirected_header("Authorization", self.authorization)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return store.put_stream(response, blob)
        except urllib.error.HTTPError as err:
            raise self._error("GET", blob.digest, err.code, err.read()) from None
        except (urllib.error.URLError, OSError) as err:
            raise RegistryError(f"download of {blob.digest[:19]} from {self.ref.host} failed "
                                f"({getattr(err, 'reason', err)})", "check the network and try again") from None

    # --- push -----------------------------------------------------------------------------------
    def has_blob(self, digest: str) -> bool:
        status, _, _ = self.request("HEAD", f"/v2/{self.ref.repository}/blobs/{digest}", ok=(200, 404))
        return status == 200

    def upload_blob(self, path: Path, blob: Blob) -> None:
        _, headers, _ = self.request("POST", f"/v2/{self.ref.repository}/blobs/uploads/", data=b"", ok=(202,))
        location = urllib.parse.urljoin(self.base + "/", headers.get("Location", ""))
        url = f"{location}{'&' if '?' in location else '?'}digest={urllib.parse.quote(blob.digest)}"
        with open(path, "rb") as body:
            self.request("PUT", url, data=body, ok=(201,),
                         headers={"Content-Type": "application/octet-stream", "Content-Length": str(blob.size)})

    def put_manifest(self, reference: str, data: bytes, media_type: str) -> str:
        _, headers, _ = self.request("PUT", f"/v2/{self.ref.repository}/manifests/{reference}", data=data,
                                     headers={"Content-Type": media_type}, ok=(201,))
        return headers.get("Docker-Content-Digest") or "sha256:" + hashlib.sha256(data).hexdigest()


def docker_config_credentials(host: str) -> tuple[str, str] | None:
    """``auths`` of ``~/.docker/config.json`` (or ``$DOCKER_CONFIG``) for ``host``, when there are any."""
    folder = Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker")
    try:
        auths = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("auths", {})
    except (OSError, ValueError, AttributeError):
        return None
    keys = [host, f"https://{host}", f"http://{host}"] + (["https://index.docker.io/v1/"] if host == "docker.io" else [])
    for key in keys:
        encoded = (auths.get(key) or {}).get("auth")
        if encoded:
            user, _, password = base64.b64decode(encoded).decode(errors="replace").partition(":")
            return user, password
    return None


def pull_base(text: str, timeout: float = 30.0, insecure: bool = False) -> list:
    """The platform images of a registry image, their layers fetched on demand into the cache."""
    from edgepack.package.base_image import BaseImage, Platform
    from edgepack.package.oci import TO_OCI
    from edgepack.package.wheels import cache_root

    ref = Reference.parse(text)
    client = RegistryClient(ref, insecure=insecure or None, timeout=timeout)
    cache = BlobStore(cache_root() / "blobs")
    media_type, digest, body = client.manifest(ref.reference)

    def layer_file(descriptor: dict[str, Any]) -> Path:
        return cache.path(client.fetch_blob(descriptor, cache).digest)

    children = [(digest, media_type, body)]
    if media_type in INDEX_TYPES:
        children = [(child["digest"], *client.manifest(child["digest"])[::2])
                    for child in json.loads(body).get("manifests", [])
                    if child.get("platform", {}).get("os") not in (None, "unknown")]
    images = []
    for child_digest, child_type, child_body in children:
        if child_type not in MANIFEST_TYPES:
            continue
        manifest = json.loads(child_body)
        config_blob = client.fetch_blob(manifest["config"], cache)
        config = json.loads(cache.read(config_blob.digest))
        layers = tuple({**layer, "mediaType": TO_OCI.get(layer["mediaType"], layer["mediaType"])}
                       for layer in manifest.get("layers", []))
        images.append(BaseImage(text, str(ref), child_digest,
                                Platform(str(config.get("os", "linux")), str(config.get("architecture", ""))),
                                config, layers, layer_file))
    return images


def push_layout(layout: Path, ref: Reference, client: RegistryClient) -> tuple[str, int, int]:
    """Every blob, the manifests by digest and the top one by ``ref``'s tag: (top digest, uploaded, skipped)."""
    store = BlobStore(layout, create=False)
    index = json.loads((layout / "index.json").read_text(encoding="utf-8"))
    descriptors = index.get("manifests") or []
    if len(descriptors) != 1:
        raise ImageError(f"{layout} holds {len(descriptors)} images; push takes a layout with one",
                         "push the layout edgepack build wrote")
    top = descriptors[0]
    manifests = [top]
    if top["mediaType"] in INDEX_TYPES:
        manifests = [d for d in json.loads(store.read(top["digest"]))["manifests"]] + [top]
    uploaded, skipped, seen = 0, 0, set()
    for descriptor in manifests:
        if descriptor["mediaType"] in INDEX_TYPES:
            continue
        manifest = json.loads(store.read(descriptor["digest"]))
        for blob in [manifest["config"], *manifest.get("layers", [])]:
            if blob["digest"] in seen:
                continue
            seen.add(blob["digest"])
            if client.has_blob(blob["digest"]):
                skipped += 1
                continue
            client.upload_blob(store.path(blob["digest"]), Blob(blob["digest"], int(blob["size"]), blob["mediaType"]))
            uploaded += 1
    pushed = ""
    for descriptor in manifests:
        reference = ref.reference if descriptor is top and not ref.reference.startswith("sha256:") \
            else descriptor["digest"]
        pushed = client.put_manifest(reference, store.read(descriptor["digest"]),
                                     descriptor.get("mediaType") or (OCI_INDEX if descriptor is top else OCI_MANIFEST))
    if pushed != top["digest"]:
        raise RegistryError(f"the registry stored {pushed}, not {top['digest']}", "it rewrote the manifest; report it")
    return pushed, uploaded, skipped
