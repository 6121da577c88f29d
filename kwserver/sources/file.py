"""Local modules: `file://` URLs and paths (relative ones against the directory of policies.yml)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from kwserver.metadata import WASM_MAGIC
from kwserver.sources.errors import LocalModuleError, SourceError
from kwserver.sources.references import LocalReference, parse_reference


@dataclass(frozen=True)
class FetchedModule:
    reference: str  # the literal `module` string from policies.yml
    path: Path
    wasm: bytes
    digest: str  # sha256 of the bytes


def resolve_local_path(reference: str, base_dir: Path) -> Path:
    parsed = parse_reference(reference, base_dir)
    if not isinstance(parsed, LocalReference):
        raise SourceError(
            f"remote module references ({reference}) are not supported by this build; "
            "download the module and refer to it with a file:// URL or a path"
        )
    return parsed.path


def check_wasm(wasm: bytes, where: object, error: type[SourceError] = SourceError) -> None:
    if not wasm.startswith(WASM_MAGIC):
        raise error(f"{where} is not a WebAssembly module (it does not start with the \\0asm magic)")


def read_module(reference: str, path: Path) -> FetchedModule:
    try:
        wasm = path.read_bytes()
    except FileNotFoundError as exc:
        raise LocalModuleError(f"module file {path} does not exist") from exc
    except OSError as exc:
        raise LocalModuleError(f"cannot read module file {path}: {exc.strerror or exc}") from exc
    check_wasm(wasm, f"module file {path}", LocalModuleError)
    return FetchedModule(reference=reference, path=path, wasm=wasm, digest=hashlib.sha256(wasm).hexdigest())


def fetch(reference: str, base_dir: Path) -> FetchedModule:
    return read_module(reference, resolve_local_path(reference, base_dir))
