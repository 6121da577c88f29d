"""Module references: what a `module:` string in policies.yml names, parsed once.

Forms, as the reference server reads them: `registry://host[:port]/repo[:tag|@digest]`, a bare
`host/repo:tag` (read as `registry://`), `https://` and `http://` URLs, `file://` URLs and plain
paths (relative ones against the directory of policies.yml).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from kwserver.sources.errors import SourceError

URL_SCHEMES = ("https", "http")
DOCKER_HUB = "docker.io"
# `host.tld/repo/name:tag` or `host:port/...`: how the reference tells a bare image name from a path.
_IMAGE_REFERENCE = re.compile(r"^[a-z0-9-]+(\.[a-z0-9-]+)+(:\d+)?/\S+$|^localhost(:\d+)?/\S+$")
# The distribution spec's grammar for repository names, tags and digests.
_PATH_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")
_HOST = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+)(:\d+)?$")


@dataclass(frozen=True)
class LocalReference:
    path: Path


@dataclass(frozen=True)
class UrlReference:
    """An `https://` or `http://` URL of a module file."""

    url: str
    scheme: str
    host: str  # host[:port], as sources.yml names it
    path: str  # the URL's path, percent-decoded


@dataclass(frozen=True)
class ImageReference:
    """An OCI artifact: `registry://host[:port]/repository[:tag][@sha256:...]`."""

    registry: str  # host[:port], as sources.yml and Docker's config.json name it
    repository: str
    tag: str | None
    digest: str | None
    text: str  # the reference as written, without `registry://`

    @property
    def reference(self) -> str:
        """What the manifest endpoint is asked for: the digest when pinned, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def always_pull(self) -> bool:
        # The reference pulls `latest` again on every start; everything else is reused once downloaded.
        return self.digest is None and self.reference == "latest"

    def with_digest(self, digest: str) -> ImageReference:
        return ImageReference(self.registry, self.repository, None, digest,
                              f"{self.registry}/{self.repository}@{digest}")

    def __str__(self) -> str:
        return self.text


ModuleReference = LocalReference | UrlReference | ImageReference


def parse_image_reference(text: str) -> ImageReference:
    """Parse `[registry://]host[:port]/repo[:tag][@digest]` (or a Docker Hub short name)."""
    image = text.removeprefix("registry://")
    name, at, digest = image.partition("@")
    if at and not _DIGEST.match(digest):
        raise SourceError(f"Invalid OCI image reference: {text}: `{digest}` is not a sha256 digest")
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        registry, remainder = first, rest
    else:
        registry, remainder = DOCKER_HUB, name
    if not _HOST.match(registry):
        raise SourceError(f"Invalid OCI image reference: {text}: `{registry}` is not a registry host")
    repository, tag = remainder, None
    last = remainder.rsplit("/", 1)[-1]
    if ":" in last:
        repository, _, tag = remainder.rpartition(":")
        if not _TAG.match(tag):
            raise SourceError(f"Invalid OCI image reference: {text}: `{tag}` is not a valid tag")
    if registry == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    if not repository or not all(_PATH_COMPONENT.match(part) for part in repository.split("/")):
        raise SourceError(f"Invalid OCI image reference: {text}: `{repository}` is not a valid repository name")
    if tag is None and not at:
        tag = "latest"
    return ImageReference(registry, repository, tag, digest or None, image)


def _url_reference(text: str) -> UrlReference:
    parsed = urlparse(text)
    if not parsed.hostname:
        raise SourceError(f"invalid URL: {text}")
    host = parsed.netloc.rpartition("@")[2]
    return UrlReference(url=text, scheme=parsed.scheme, host=host, path=unquote(parsed.path))


def parse_reference(reference: str, base_dir: Path) -> ModuleReference:
    parsed = urlparse(reference)
    if parsed.scheme == "file":
        path = Path(unquote(parsed.netloc + parsed.path))
    elif parsed.scheme == "registry" or _IMAGE_REFERENCE.match(reference):
        # `ghcr.io:443/...` and `localhost:5000/...` parse with the host as the URL scheme.
        return parse_image_reference(reference)
    elif parsed.scheme in URL_SCHEMES:
        return _url_reference(reference)
    elif parsed.scheme and len(parsed.scheme) > 1:  # one letter: a Windows drive, read as a path
        raise SourceError(f"unknown module URL scheme `{parsed.scheme}`")
    else:
        path = Path(reference)
    return LocalReference(path if path.is_absolute() else base_dir / path)
