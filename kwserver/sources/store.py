"""The download directory (`--policies-download-dir`), laid out as the reference lays it out.

`<dir>/<scheme>/<host[:port]>/<path segments>/<last segment>`, e.g.
`registry/ghcr.io/kubewarden/policies/pod-privileged:v0.2.7`, so a directory filled by the
reference server (or kwctl with the same root) is reused as is. Files are written atomically: a
crash mid-download never leaves a truncated module behind.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from kwserver.metadata import WASM_MAGIC
from kwserver.sources.errors import SourceError
from kwserver.sources.references import ImageReference, UrlReference

log = logging.getLogger(__name__)


def relative_path(reference: ImageReference | UrlReference) -> Path:
    if isinstance(reference, ImageReference):
        leaf = f"@{reference.digest}" if reference.digest else f":{reference.tag}"
        parts = ["registry", reference.registry, *reference.repository.split("/")]
        parts[-1] += leaf
    else:
        segments = [s for s in reference.path.split("/") if s]
        if not segments or reference.path.endswith("/"):
            raise SourceError(f"the URL {reference.url} does not name a file")
        parts = [reference.scheme, reference.host, *segments]
    if any(part in (".", "..") for part in parts):
        raise SourceError(f"the reference {reference} has `.` or `..` path segments")
    return Path(*parts)


class DownloadStore:
    def __init__(self, root: Path | str):
        self.root = Path(root)

    def path_for(self, reference: ImageReference | UrlReference) -> Path:
        return self.root / relative_path(reference)

    def cached(self, reference: ImageReference | UrlReference) -> bytes | None:
        """A module downloaded before, or None when it must be downloaded (again)."""
        if isinstance(reference, ImageReference) and reference.always_pull:
            return None
        path = self.path_for(reference)
        try:
            wasm = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("download directory: cannot read %s (%s); downloading it again", path, exc)
            return None
        if not wasm.startswith(WASM_MAGIC):
            log.warning("download directory: %s is not a WebAssembly module; downloading it again", path)
            return None
        return wasm

    def save(self, reference: ImageReference | UrlReference, wasm: bytes) -> Path:
        path = self.path_for(reference)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            with os.fdopen(fd, "wb") as stream:
                stream.write(wasm)
            os.replace(temporary, path)
        except OSError as exc:
            raise SourceError(f"wasm module cannot be saved to {str(path)!r}: {exc.strerror or exc}") from exc
        return path
