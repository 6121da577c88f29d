"""Where policy module bytes come from.

A module reference in policies.yml is a URL (`file:///abs/policy.wasm`) or a plain path (relative
paths are resolved against the directory of policies.yml, so a config and its modules can move
together). Remote references (`registry://`, `https://`, `http://`, bare `ghcr.io/...` image names)
are recognised and refused with a clear error: this build only loads local modules.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from kwserver.metadata import WASM_MAGIC

REMOTE_SCHEMES = ("registry", "https", "http")
# `host.tld/repo/name:tag` or `host:port/...`: how the reference tells a bare image name from a path.
_IMAGE_REFERENCE = re.compile(r"^[a-z0-9-]+(\.[a-z0-9-]+)+(:\d+)?/\S+$|^localhost(:\d+)?/\S+$")


class SourceError(Exception):
    """The module could not be fetched; the text completes `Error while downloading policy ...: `."""


@dataclass(frozen=True)
class FetchedModule:
    reference: str  # the literal `module` string from policies.yml
    path: Path
    wasm: bytes
    digest: str  # sha256 of the bytes


def resolve_local_path(reference: str, base_dir: Path) -> Path:
    parsed = urlparse(reference)
    if parsed.scheme == "file":
        path = Path(unquote(parsed.netloc + parsed.path))
    elif parsed.scheme in REMOTE_SCHEMES or (not parsed.scheme and _IMAGE_REFERENCE.match(reference)):
        raise SourceError(
            f"remote module references ({reference}) are not supported by this build; "
            "download the module and refer to it with a file:// URL or a path"
        )
    elif parsed.scheme and len(parsed.scheme) > 1:
        raise SourceError(f"unknown module URL scheme `{parsed.scheme}`")
    else:
        path = Path(reference)
    return path if path.is_absolute() else base_dir / path


def fetch(reference: str, base_dir: Path) -> FetchedModule:
    path = resolve_local_path(reference, base_dir)
    try:
        wasm = path.read_bytes()
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not wasm.startswith(WASM_MAGIC):
        raise SourceError(f"{path} is not a WebAssembly module (it does not start with the \\0asm magic)")
    return FetchedModule(reference=reference, path=path, wasm=wasm, digest=hashlib.sha256(wasm).hexdigest())
