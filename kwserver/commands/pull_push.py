"""`kwserver pull` and `kwserver push`, as kwctl users know them."""

from __future__ import annotations

import hashlib
from pathlib import Path

from kwserver.config import ServerSettings
from kwserver.evaluation.modes import read_metadata
from kwserver.metadata import MetadataError, WasmFormatError
from kwserver.sources.credentials import load_credentials
from kwserver.sources.errors import SourceError
from kwserver.sources.fetcher import ModuleFetcher
from kwserver.sources.file import FetchedModule, check_wasm
from kwserver.sources.oci import OciClient
from kwserver.sources.options import FetchOptions
from kwserver.sources.references import ImageReference, LocalReference, parse_image_reference, parse_reference
from kwserver.sources.trust import load_sources


def pull(settings: ServerSettings, reference: str) -> FetchedModule:
    """Download `reference` into the download directory, from the network even when it is there already."""
    fetcher = ModuleFetcher.from_settings(settings, Path.cwd())
    parsed = parse_reference(reference, Path.cwd())
    if isinstance(parsed, LocalReference):
        raise SourceError(f"{reference} is a local file: there is nothing to pull")
    wasm = fetcher.download(parsed)
    path = fetcher.store.save(parsed, wasm)
    return FetchedModule(reference, path, wasm, hashlib.sha256(wasm).hexdigest())


def push_annotations(wasm: bytes) -> dict[str, str]:
    """The module's metadata annotations that fit an OCI manifest (single-line strings), as kwctl pushes."""
    try:
        metadata = read_metadata(wasm)
    except (MetadataError, WasmFormatError) as exc:
        raise SourceError(f"cannot read the module's metadata: {exc}") from exc
    if metadata is None:
        return {}
    return {key: value for key, value in metadata.annotations.items()
            if isinstance(value, str) and "\n" not in value}


def push(settings: ServerSettings, module: Path, destination: str) -> tuple[ImageReference, str]:
    """Push `module` to `registry://...`; returns the reference and the manifest digest."""
    if not destination.startswith("registry://"):
        raise SourceError(f"the destination must be a registry:// reference, not {destination}")
    reference = parse_image_reference(destination)
    if reference.digest:
        raise SourceError("push to a tag, not to a digest")
    try:
        wasm = module.read_bytes()
    except OSError as exc:
        raise SourceError(f"cannot read {module}: {exc.strerror or exc}") from exc
    check_wasm(wasm, module)
    client = OciClient(reference.registry, load_sources(settings.sources_path),
                       load_credentials(settings.docker_config_json_path), FetchOptions.from_settings(settings))
    return reference, client.push(wasm, reference, push_annotations(wasm))
