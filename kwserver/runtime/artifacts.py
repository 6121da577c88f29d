"""Cached artifacts on disk, each checked against a digest stored beside it before anyone loads it.

wasmtime loads a compiled module's native code without checking it (`Module.deserialize_file`
trusts its input: damaged bytes crash the process), so no cached file is handed to it unchecked: every
artifact is written with `<name>.sha256` beside it, and read back only if its bytes still have that
digest; what is loaded is a sealed in-memory copy of the bytes that were checked. A damaged, truncated
or half-written artifact (or one from before digests were kept) is not loaded; its caller rebuilds it.
This guards against damage (a disk, a copy, a crash while writing, a file rewritten in place while the
server runs), not against someone who may write to the cache directory: the directory must be private
(see runtime/engine.py).
"""

from __future__ import annotations

import contextlib
import fcntl
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

    The checked bytes are copied into a sealed memory file (memfd) and that is what the path names:
    wasmtime maps its code from there, so a cache file damaged or rewritten in place later (its pages
    would change under every process that maps it) cannot reach a running server; the pages are still
    shared by the workers forked after the load. FileNotFoundError when there is no artifact;
    DamagedArtifact when its bytes are not what was stored.
    """
    with open(path, "rb") as stream:
        data = stream.read()
    try:
        expected = digest_path(path).read_text().strip()
    except FileNotFoundError:
        raise DamagedArtifact(f"{path}: no digest beside it ({digest_path(path).name})") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise DamagedArtifact(f"{path}: its sha256 is {actual[:16]}..., not {expected[:16]}... as stored")
    fd = _sealed_copy(path.name, data)
    if fd is None:  # no memfd (not Linux): the checked file itself
        yield str(path)
        return
    try:
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _sealed_copy(name: str, data: bytes) -> int | None:
    if not hasattr(os, "memfd_create") or not os.path.isdir("/proc/self/fd"):
        return None
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK
                    | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd
