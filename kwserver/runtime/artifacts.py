"""Cached artifacts on disk, each checked against a digest stored beside it before anyone loads it.

wasmtime loads a compiled module's native code without checking it (`Module.deserialize_file`
trusts its input: damaged bytes crash the process), so no cached file is handed to it unchecked: every
artifact is written with `<name>.sha256` beside it, and read back only if its bytes still have that
digest. A damaged, truncated or half-written artifact (or one from before digests were kept) is not
loaded; its caller rebuilds it. This guards against damage (a disk, a copy, a crash while writing), not
against someone who may write to the cache directory: the directory must be private (see
runtime/engine.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

DIGEST_SUFFIX = ".sha256"


class DamagedArtifact(Exception):
    """An artifact whose bytes do not match the digest stored beside it (or that has none)."""


def digest_path(path: Path) -> Path:
    return path.with_name(path.name + DIGEST_SUFFIX)


def store(path: Path, data: bytes) -> None:
    """Write `data` to `path` and its digest beside it, each replaced at once (never seen half-written)."""
    _replace(digest_path(path), hashlib.sha256(data).hexdigest().encode() + b"\n")
    _replace(path, data)


def _replace(path: Path, data: bytes) -> None:
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def verified(path: Path) -> Iterator[str]:
    """A path to the content of `path`, checked against its digest, for as long as the block runs.

    The path names the very file that was checked (`/proc/self/fd/N`), so a file swapped in after the
    check is not the one loaded. FileNotFoundError when there is no artifact; DamagedArtifact when its
    bytes are not what was stored.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            expected = digest_path(path).read_text().strip()
        except FileNotFoundError:
            raise DamagedArtifact(f"{path}: no digest beside it ({digest_path(path).name})") from None
        with open(fd, "rb", closefd=False) as stream:
            actual = hashlib.file_digest(stream, "sha256").hexdigest()
        if actual != expected:
            raise DamagedArtifact(f"{path}: its sha256 is {actual[:16]}..., not {expected[:16]}... as stored")
        pinned = f"/proc/self/fd/{fd}"
        yield pinned if os.path.exists(pinned) else str(path)
    finally:
        os.close(fd)
