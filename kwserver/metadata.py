"""The `io.kubewarden.metadata` custom section of a policy module: read, check, embed.

Pure functions over bytes; nothing here knows about wasmtime. Which execution modes exist, and what
each requires of the metadata, is the mode table's (kwserver.evaluation.modes): readers pass the names
it accepts, and `modes.read_metadata`, `check_metadata` and `annotate` do so.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from kwserver import KUBEWARDEN_COMPAT_VERSION

log = logging.getLogger(__name__)

SECTION_NAME = "io.kubewarden.metadata"
WASM_MAGIC = b"\0asm"
WASM_VERSION_1 = b"\x01\0\0\0"

# The format's default when a module's metadata names no `executionMode`.
DEFAULT_EXECUTION_MODE = "kubewarden-wapc"


class MetadataError(ValueError):
    """The module's metadata is missing something the server needs, or is malformed."""


class WasmFormatError(ValueError):
    """The bytes are not a WebAssembly module."""


@dataclass(frozen=True)
class PolicyMetadata:
    rules: list[dict[str, Any]]
    mutating: bool
    execution_mode: str = DEFAULT_EXECUTION_MODE
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
    def from_json(cls, raw: dict[str, Any], execution_modes: Collection[str]) -> PolicyMetadata:
        """`raw` checked as the reference deserialises it; `executionMode` must be one of `execution_modes`."""
        if not isinstance(raw, dict):
            raise MetadataError("metadata must be a JSON object")
        for key in ("rules", "mutating"):
            if key not in raw:
                raise MetadataError(f"missing field `{key}`")
        mode = raw.get("executionMode", DEFAULT_EXECUTION_MODE)
        if not isinstance(mode, str) or mode not in execution_modes:
            raise MetadataError(
                f"unknown variant `{mode}`, expected one of {', '.join(f'`{m}`' for m in execution_modes)}"
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


def uleb128(value: int) -> bytes:
    """`value` in unsigned LEB128, as the Wasm binary format writes sizes and indexes."""
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
    body = uleb128(len(encoded_name)) + encoded_name + data
    return bytes(kept) + b"\x00" + uleb128(len(body)) + body


# --- reading and checking ----------------------------------------------------------------------

def _version_major_minor(version: str) -> tuple[int, int]:
    core = version.strip().lstrip("v").split("+", 1)[0].split("-", 1)[0]
    parts = core.split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError as exc:
        raise MetadataError(f"invalid semantic version `{version}`") from exc


def parse_metadata(wasm: bytes, execution_modes: Collection[str]) -> PolicyMetadata | None:
    """The module's metadata, or None when it has no metadata section."""
    raw = read_custom_section(wasm)
    if raw is None:
        return None
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MetadataError(f"cannot deserialize custom section `{SECTION_NAME}` of wasm module: {exc}") from exc
    try:
        return PolicyMetadata.from_json(doc, execution_modes)
    except MetadataError as exc:
        raise MetadataError(f"cannot deserialize custom section `{SECTION_NAME}` of wasm module: {exc}") from exc


def check_minimum_version(meta: PolicyMetadata, server_version: str = KUBEWARDEN_COMPAT_VERSION) -> None:
    """The reference's bootstrap check of `minimumKubewardenVersion` (major and minor only)."""
    if meta.minimum_kubewarden_version:
        required = _version_major_minor(meta.minimum_kubewarden_version)
        running = _version_major_minor(server_version)
        if running < required:
            raise MetadataError(
                f"Policy required Kubewarden version {required[0]}.{required[1]}.0 "
                f"but is running on {running[0]}.{running[1]}.0"
            )


def embed_metadata(wasm: bytes, meta: PolicyMetadata) -> bytes:
    """The module with `meta` as its metadata section (replacing any previous one)."""
    return embed_custom_section(wasm, orjson.dumps(meta.to_json()))
