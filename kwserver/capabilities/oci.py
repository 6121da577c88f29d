"""`kubewarden/oci/v1/manifest_digest`, `v1/oci_manifest`, `v1/oci_manifest_config`: what a registry says
about an image, through the registry client of the policy sources (kwserver.sources.oci: sources.yml's
insecure hosts and CAs, Docker's config.json credentials, timeouts and size limits).

Answers are cached 60 s per operation and image string, as the reference's (RegistryAccess.answers).
Manifests are answered in the shape the reference's OCI client serialises them: its known fields, in its
order, absent ones left out.
"""

from __future__ import annotations

import platform
from typing import Any

import orjson

from kwserver.capabilities.callback_requests import HostCallError, HostRequest
from kwserver.capabilities.registry_access import RegistryAccess
from kwserver.capabilities.waiting import CALLBACK_FAILURE, until_deadline
from kwserver.sources.errors import SourceError
from kwserver.sources.oci import DOCKER_LIST, OCI_INDEX, Manifest, OciClient
from kwserver.sources.references import ImageReference, parse_image_reference

OPERATIONS = {"OciManifestDigest": "v1/manifest_digest", "OciManifest": "v1/oci_manifest",
              "OciManifestAndConfig": "v1/oci_manifest_config"}
_DESCRIPTOR_FIELDS = ("mediaType", "digest", "size", "urls", "annotations")
_INDEX_ENTRY_FIELDS = ("mediaType", "digest", "size", "platform", "annotations")
_PLATFORM_FIELDS = ("architecture", "os", "os.version", "os.features", "variant", "features")
# Go's names for the machine, as image indexes name platforms.
_GO_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "armv7l": "arm",
            "ppc64le": "ppc64le", "s390x": "s390x"}


def image_reference(image: str) -> ImageReference:
    try:
        return parse_image_reference(image)
    except SourceError as exc:
        raise HostCallError(CALLBACK_FAILURE.format(exc)) from exc


def answer(request: HostRequest, access: RegistryAccess, deadline: float | None = None) -> bytes:
    """This build's answer to a decoded OCI image request; `deadline` (monotonic) bounds the wait."""
    image = request.fields["image"]
    compute = {"OciManifestDigest": _manifest_digest, "OciManifest": _oci_manifest,
               "OciManifestAndConfig": _manifest_and_config}[request.kind]
    reference = image_reference(image)

    def fetch() -> bytes:
        return until_deadline(deadline, lambda: compute(access.client(reference, deadline), reference),
                              f"{OPERATIONS[request.kind]} {image}")
    return access.answers.cached((request.kind, image), lambda: _host_errors(fetch))


def _host_errors(fetch: Any) -> bytes:
    try:
        return fetch()
    except SourceError as exc:
        raise HostCallError(CALLBACK_FAILURE.format(exc)) from exc


def _manifest_digest(client: OciClient, reference: ImageReference) -> bytes:
    return orjson.dumps({"digest": client.manifest(reference).digest})


def _oci_manifest(client: OciClient, reference: ImageReference) -> bytes:
    return orjson.dumps(manifest_document(client.manifest(reference)))


def _manifest_and_config(client: OciClient, reference: ImageReference) -> bytes:
    manifest = client.manifest(reference)
    if is_index(manifest.document):
        manifest = client.manifest(reference.with_digest(platform_manifest_digest(manifest, reference)))
    descriptor = manifest.document.get("config")
    if not isinstance(descriptor, dict) or not isinstance(descriptor.get("digest"), str):
        raise SourceError(f"{reference}: the manifest has no config descriptor")
    blob = client.blob(reference, descriptor["digest"], descriptor.get("size"))
    try:
        config = orjson.loads(blob)
    except orjson.JSONDecodeError as exc:
        raise SourceError(f"{reference}: the image config is not JSON: {exc}") from exc
    return orjson.dumps({"manifest": image_manifest(manifest.document), "digest": manifest.digest,
                         "config": config})


# --- the reference client's manifest shapes -------------------------------------------------------

def is_index(document: dict[str, Any]) -> bool:
    return document.get("mediaType") in (OCI_INDEX, DOCKER_LIST) or "manifests" in document


def manifest_document(manifest: Manifest) -> dict[str, Any]:
    """An image manifest or an image index, as the reference answers `v1/oci_manifest` (untagged)."""
    return image_index(manifest.document) if is_index(manifest.document) else image_manifest(manifest.document)


def _known(document: Any, names: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(document, dict):
        return {}
    kept = {name: document[name] for name in names if document.get(name) is not None}
    if isinstance(kept.get("annotations"), dict):
        kept["annotations"] = dict(sorted(kept["annotations"].items()))
    return kept


def image_manifest(document: dict[str, Any]) -> dict[str, Any]:
    shaped: dict[str, Any] = {"schemaVersion": document.get("schemaVersion")}
    if document.get("mediaType") is not None:
        shaped["mediaType"] = document["mediaType"]
    shaped["config"] = _known(document.get("config"), _DESCRIPTOR_FIELDS)
    layers = document.get("layers")
    shaped["layers"] = [_known(layer, _DESCRIPTOR_FIELDS) for layer in layers] if isinstance(layers, list) else []
    if isinstance(document.get("subject"), dict):
        shaped["subject"] = _known(document["subject"], _DESCRIPTOR_FIELDS)
    shaped.update(_known(document, ("artifactType", "annotations")))
    return shaped


def image_index(document: dict[str, Any]) -> dict[str, Any]:
    shaped: dict[str, Any] = {"schemaVersion": document.get("schemaVersion")}
    if document.get("mediaType") is not None:
        shaped["mediaType"] = document["mediaType"]
    entries = document.get("manifests")
    shaped["manifests"] = []
    for entry in entries if isinstance(entries, list) else []:
        kept = _known(entry, _INDEX_ENTRY_FIELDS)
        if "platform" in kept:
            kept["platform"] = _known(kept["platform"], _PLATFORM_FIELDS)
        shaped["manifests"].append(kept)
    shaped.update(_known(document, ("artifactType", "annotations")))
    return shaped


def platform_manifest_digest(index: Manifest, reference: ImageReference) -> str:
    """The entry of an image index for this machine's platform (linux/<arch>), as the reference's client
    resolves an index before it reads the config."""
    arch = _GO_ARCH.get(platform.machine().lower(), platform.machine().lower())
    for entry in index.document.get("manifests") or []:
        target = entry.get("platform") if isinstance(entry, dict) else None
        if isinstance(target, dict) and target.get("os") == "linux" and target.get("architecture") == arch \
                and isinstance(entry.get("digest"), str):
            return entry["digest"]
    raise SourceError(f"{reference} is an image index without a manifest for linux/{arch}")
