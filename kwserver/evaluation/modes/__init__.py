"""The execution modes: one module each, registered in `MODES` here.

A mode owns what differs between Kubewarden's runtimes: its names (the metadata's, kwctl's aliases),
what it requires of a module's metadata and how a module without metadata is recognised, how a
compiled module is linked (its runtime in kwserver.runtime), what is checked once per policy at boot,
the documents a request becomes, and how the guest's answer and its failures turn into the vanilla
AdmissionResponse. Nothing outside these modules compares mode names: a new mode is one module here
and one entry in `MODES`.

The table also decides what a module's metadata may say about its mode; kwserver.metadata knows the
section's format, not which modes exist. Every reader of metadata goes through the functions below.
"""

from __future__ import annotations

from typing import Any

from kwserver.evaluation.modes import gatekeeper, opa, wapc, wasi
from kwserver.evaluation.modes.base import ExecutionMode
from kwserver.metadata import (
    SECTION_NAME,
    MetadataError,
    PolicyMetadata,
    check_minimum_version,
    embed_metadata,
    parse_metadata,
)
from kwserver.runtime import InstantiationFailure

# In the reference's order (its ExecutionMode enum), which is also the order modules without metadata
# are recognised in.
MODES: dict[str, ExecutionMode] = {mode.name: mode for mode in (wapc.MODE, opa.MODE, gatekeeper.MODE, wasi.MODE)}
# kwctl's names for `--execution-mode`: every mode's, and their aliases.
CLI_NAMES: dict[str, ExecutionMode] = {
    **{alias: mode for mode in MODES.values() for alias in mode.aliases}, **MODES}

__all__ = ["CLI_NAMES", "MODES", "ExecutionMode", "annotate", "check_metadata", "infer_metadata",
           "metadata_for_mode", "mode_named", "read_metadata"]


def mode_named(name: str) -> ExecutionMode:
    try:
        return MODES[name]
    except KeyError:
        raise InstantiationFailure(
            f"execution mode `{name}` is not supported by this build (supported: {', '.join(MODES)})"
        ) from None


# --- what modules say about their mode ----------------------------------------------------------------

def read_metadata(wasm: bytes) -> PolicyMetadata | None:
    """The module's metadata section (None when it has none), naming one of the modes of this table."""
    return parse_metadata(wasm, MODES)


def check_metadata(metadata: PolicyMetadata) -> None:
    """The reference's bootstrap checks of a module's metadata: its mode's, then the minimum version."""
    MODES[metadata.execution_mode].check_metadata(metadata)
    check_minimum_version(metadata)


def annotate(wasm: bytes, metadata: dict[str, Any]) -> bytes:
    """Embed checked metadata in a module (what `kwctl annotate` does)."""
    checked = PolicyMetadata.from_json(metadata, MODES)
    check_metadata(checked)
    return embed_metadata(wasm, checked)


def _assumed(mode: ExecutionMode) -> PolicyMetadata:
    """The metadata of a module that has none, run in `mode`."""
    return PolicyMetadata(rules=[], mutating=False, execution_mode=mode.name, protocol_version=mode.protocol_version,
                          inferred=True)


def infer_metadata(export_names: set[str], import_modules: set[str]) -> PolicyMetadata:
    """Best guess for a module without metadata, from what it exports and imports."""
    for mode in MODES.values():
        if mode.recognises(export_names, import_modules):
            return _assumed(mode)
    raise MetadataError(
        f"module has no `{SECTION_NAME}` section and its execution mode cannot be inferred "
        "from its exports; annotate it with `kwserver annotate`"
    )


def metadata_for_mode(found: PolicyMetadata | None, requested: str, export_names: set[str]) -> PolicyMetadata:
    """The metadata to run a module with when the user names its execution mode, by kwctl's rules: the
    mode must agree with the module's metadata (when it has some) and with whether it is Rego."""
    mode = MODES.get(requested)
    if mode is None:
        raise MetadataError(f"unknown execution mode `{requested}` (expected one of {', '.join(MODES)})")
    if found is not None and found.execution_mode != requested:
        raise MetadataError(
            "The policy execution mode specified via CLI flag is different from the one reported inside of "
            f"policy's metadata. Metadata reports {found.execution_mode} instead of {requested}"
        )
    is_rego = opa.is_rego_module(export_names)
    if is_rego and not mode.rego:
        raise MetadataError("The policy has been created with Rego, the policy execution mode specified via "
                            "CLI flag is wrong")
    if mode.rego and not is_rego:
        raise MetadataError("The policy has not been created with Rego, the policy execution mode specified via "
                            "CLI flag is wrong")
    return found if found is not None else _assumed(mode)
