"""The `io.kubewarden.metadata` custom section of a policy module: read, check, embed.

Pure functions over bytes; nothing here knows about wasmtime.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from kwserver import KUBEWARDEN_COMPAT_VERSION

log = logging.getLogger(__name__)

SECTION_NAME = "io.kubewarden.metadata"
WASM_MAGIC = b"\0asm"
WASM_VERSION_1 = b"\x01\0\0\0"

# Execution modes, as the metadata names them (the runtimes are registered in kwserver.evaluation.modes).
WAPC, OPA, GATEKEEPER, WASI = "kubewarden-wapc", "opa", "gatekeeper", "wasi"
EXECUTION_MODES = (WAPC, OPA, GATEKEEPER, WASI)


class MetadataError(ValueError):
    """The module's metadata is missing something the server needs, or is malformed."""


class WasmFormatError(ValueError):
    """The bytes are not a WebAssembly module."""


@dataclass(frozen=True)
class PolicyMetadata:
    rules: list[dict[str, Any]]
    mutating: bool
    execution_mode: str = WAPC
    protocol_version: str | None = None
    policy_type: str = "kubernetes"
    background_audit: bool = True
    annotations: dict[str, str] = field(default_factory=dict)
    context_aware_resources: list[dict[str, str]] = field(default_factory=list)
    minimum_kubewarden_version: str | None = None
    entrypoint: str | None = None  # OPA/Gatekeeper: entrypoint name to evaluate (kwserver extension)
    # The host calls the policy says it makes (informational, as in the reference; policies.yml grants them).
    host_capabilities: list[str] | None = None
    # True when the module carried no metadata section and the mode was inferred from its exports.
    inferred: bool = False

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> PolicyMetadata:
        if not isinstance(raw, dict):
            raise MetadataError("metadata must be a JSON object")
        for key in ("rules", "mutating"):
            if key not in raw:
                raise MetadataError(f"missing field `{key}`")
        mode = raw.get("executionMode", WAPC)
        if mode not in EXECUTION_MODES:
            raise MetadataError(
                f"unknown variant `{mode}`, expected one of {', '.join(f'`{m}`' for m in EXECUTION_MODES)}"
            )
        if not isinstance(raw["mutating"], bool):
            raise MetadataError("invalid type for `mutating`, expected a boolean")
        if not isinstance(raw["rules"], list):
            raise MetadataError("invalid type for `rules`, expected a sequence")
        declared = raw.get("hostCapabilities")
        if declared is not None and (not isinstance(declared, list) or not all(isinstance(c, str) for c in declared)):
            raise MetadataError("invalid type for `hostCapabilities`, expected a sequence of strings")
        return cls(
            rules=raw["rules"],
            mutating=raw["mutating"],
            execution_mode=mode,
            protocol_version=raw.get("protocolVersion"),
            policy_type=raw.get("policyType", "kubernetes"),
            background_audit=raw.get("backgroundAudit", True),
            annotations=raw.get("annotations") or {},
            context_aware_resources=raw.get("contextAwareResources") or [],
            minimum_kubewarden_version=raw.get("minimumKubewardenVersion"),
            entrypoint=raw.get("entrypoint") if isinstance(raw.get("entrypoint"), str) else None,
            host_capabilities=declared,
        )

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "protocolVersion": self.protocol_version,
            "rules": self.rules,
            "annotations": self.annotations,
            "mutating": self.mutating,
            "backgroundAudit": self.background_audit,
            "contextAwareResources": self.context_aware_resources,
            "executionMode": self.execution_mode,
            "policyType": self.policy_type,
            "minimumKubewardenVersion": self.minimum_kubewarden_version,
            "entrypoint": self.entrypoint,
            "hostCapabilities": self.host_capabilities,
        }
        return {k: v for k, v in doc.items() if v is not None}


# --- wasm binary format: just enough to walk sections -------------------------------------------

def _read_leb128(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise WasmFormatError("truncated LEB128 integer")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 35:
            raise WasmFormatError("LEB128 integer too long")


def _leb128(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _sections(wasm: bytes) -> Iterator[tuple[int, int, int, int]]:
    """Yield (section id, start of section header, start of payload, end of payload)."""
    if wasm[:4] != WASM_MAGIC:
        raise WasmFormatError("not a WebAssembly module (missing \\0asm magic)")
    if wasm[4:8] != WASM_VERSION_1:
        raise WasmFormatError("unsupported WebAssembly binary version")
    pos = 8
    while pos < len(wasm):
        header = pos
        section_id = wasm[pos]
        size, payload = _read_leb128(wasm, pos + 1)
        end = payload + size
        if end > len(wasm):
            raise WasmFormatError("section extends past the end of the module")
        yield section_id, header, payload, end
        pos = end


def _custom_section_name(wasm: bytes, payload: int, end: int) -> tuple[str, int]:
    name_len, name_start = _read_leb128(wasm, payload)
    name_end = name_start + name_len
    if name_end > end:
        raise WasmFormatError("custom section name extends past its section")
    return wasm[name_start:name_end].decode("utf-8", "replace"), name_end


def read_custom_section(wasm: bytes, name: str = SECTION_NAME) -> bytes | None:
    found = None
    for section_id, _, payload, end in _sections(wasm):
        if section_id == 0:
            section_name, data_start = _custom_section_name(wasm, payload, end)
            if section_name == name:
                found = wasm[data_start:end]  # the last one wins, as a re-annotation appends
    return found


def embed_custom_section(wasm: bytes, data: bytes, name: str = SECTION_NAME) -> bytes:
    """Return the module with every section called `name` replaced by one holding `data`."""
    kept = bytearray(wasm[:8])
    for section_id, header, payload, end in _sections(wasm):
        if section_id == 0 and _custom_section_name(wasm, payload, end)[0] == name:
            continue
        kept += wasm[header:end]
    encoded_name = name.encode()
    body = _leb128(len(encoded_name)) + encoded_name + data
    return bytes(kept) + b"\x00" + _leb128(len(body)) + body


# --- reading and checking ----------------------------------------------------------------------

def _version_major_minor(version: str) -> tuple[int, int]:
    core = version.strip().lstrip("v").split("+", 1)[0].split("-", 1)[0]
    parts = core.split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError as exc:
        raise MetadataError(f"invalid semantic version `{version}`") from exc


def parse_metadata(wasm: bytes) -> PolicyMetadata | None:
    """The module's metadata, or None when it has no metadata section."""
    raw = read_custom_section(wasm)
    if raw is None:
        return None
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MetadataError(f"cannot deserialize custom section `{SECTION_NAME}` of wasm module: {exc}") from exc
    try:
        return PolicyMetadata.from_json(doc)
    except MetadataError as exc:
        raise MetadataError(f"cannot deserialize custom section `{SECTION_NAME}` of wasm module: {exc}") from exc


def infer_metadata(export_names: set[str], import_modules: set[str]) -> PolicyMetadata:
    """Best guess for a module without metadata, from what it exports and imports."""
    if "__guest_call" in export_names:
        mode = WAPC
    elif "opa_eval_ctx_new" in export_names:
        # Both Rego flavours look alike; Gatekeeper is the more common un-annotated one.
        mode = GATEKEEPER
    elif "_start" in export_names and "wasi_snapshot_preview1" in import_modules:
        mode = WASI
    else:
        raise MetadataError(
            f"module has no `{SECTION_NAME}` section and its execution mode cannot be inferred "
            "from its exports; annotate it with `kwserver annotate`"
        )
    return PolicyMetadata(
        rules=[], mutating=False, execution_mode=mode,
        protocol_version="v1" if mode == WAPC else None, inferred=True,
    )


def is_rego_module(export_names: set[str]) -> bool:
    """Rego compiled by OPA exports its ABI functions (`opa_eval`, `opa_malloc`, ...); kwctl's test too."""
    return any(name.startswith("opa_") for name in export_names)


def metadata_for_mode(found: PolicyMetadata | None, requested: str, is_rego: bool) -> PolicyMetadata:
    """The metadata to run a module with when the user names its execution mode, by kwctl's rules: the
    mode must agree with the module's metadata (when it has some) and with whether it is Rego."""
    if requested not in EXECUTION_MODES:
        raise MetadataError(f"unknown execution mode `{requested}` (expected one of {', '.join(EXECUTION_MODES)})")
    if found is not None and found.execution_mode != requested:
        raise MetadataError(
            "The policy execution mode specified via CLI flag is different from the one reported inside of "
            f"policy's metadata. Metadata reports {found.execution_mode} instead of {requested}"
        )
    rego_mode = requested in (OPA, GATEKEEPER)
    if is_rego and not rego_mode:
        raise MetadataError("The policy has been created with Rego, the policy execution mode specified via "
                            "CLI flag is wrong")
    if rego_mode and not is_rego:
        raise MetadataError("The policy has not been created with Rego, the policy execution mode specified via "
                            "CLI flag is wrong")
    if found is not None:
        return found
    return PolicyMetadata(rules=[], mutating=False, execution_mode=requested,
                          protocol_version="v1" if requested == WAPC else None, inferred=True)


def check_metadata(meta: PolicyMetadata, server_version: str = KUBEWARDEN_COMPAT_VERSION) -> None:
    """The bootstrap checks of the reference server (protocol version, minimum version)."""
    if meta.execution_mode == WAPC:
        if meta.protocol_version is None:
            raise MetadataError(
                "Policy is missing protocol version, which is required for KubewardenWapc execution mode"
            )
        if meta.protocol_version != "v1":
            raise MetadataError("Policy uses protocol version Unknown but only V1 is supported")
    if meta.minimum_kubewarden_version:
        required = _version_major_minor(meta.minimum_kubewarden_version)
        running = _version_major_minor(server_version)
        if running < required:
            raise MetadataError(
                f"Policy required Kubewarden version {required[0]}.{required[1]}.0 "
                f"but is running on {running[0]}.{running[1]}.0"
            )


def annotate(wasm: bytes, metadata: dict[str, Any]) -> bytes:
    """Embed validated metadata in a module (what `kwctl annotate` does)."""
    meta = PolicyMetadata.from_json(metadata)
    check_metadata(meta)
    return embed_custom_section(wasm, orjson.dumps(meta.to_json()))
