"""Module references: what a `module:` string in policies.yml names, parsed once.

Forms, as the reference server reads them: `registry://host[:port]/repo[:tag|@digest]`, a bare
`host/repo:tag` (read as `registry://`), `https://` and `http://` URLs, `file://` URLs and plain
paths.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from kwserver.sources.errors import SourceError

REMOTE_SCHEMES = ("registry", "https", "http")
# `host.tld/repo/name:tag` or `host:port/...`: how the reference tells a bare image name from a path.
_IMAGE_REFERENCE = re.compile(r"^[a-z0-9-]+(\.[a-z0-9-]+)+(:\d+)?/\S+$|^localhost(:\d+)?/\S+$")


@dataclass(frozen=True)
class LocalReference:
    path: Path


@dataclass(frozen=True)
class RemoteReference:
    scheme: str
    text: str  # the literal module string


def parse_reference(reference: str, base_dir: Path) -> LocalReference | RemoteReference:
    parsed = urlparse(reference)
    if parsed.scheme == "file":
        path = Path(unquote(parsed.netloc + parsed.path))
    elif parsed.scheme in REMOTE_SCHEMES:
        return RemoteReference(parsed.scheme, reference)
    elif not parsed.scheme and _IMAGE_REFERENCE.match(reference):
        return RemoteReference("registry", reference)
    elif parsed.scheme and len(parsed.scheme) > 1 and not _IMAGE_REFERENCE.match(reference):
        raise SourceError(f"unknown module URL scheme `{parsed.scheme}`")
    elif parsed.scheme and len(parsed.scheme) > 1:
        return RemoteReference("registry", reference)
    else:
        path = Path(reference)
    return LocalReference(path if path.is_absolute() else base_dir / path)
