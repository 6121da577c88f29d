import json

import pytest

from kwserver.commands.cli import main
from kwserver.evaluation.modes import MODES, annotate, check_metadata, infer_metadata
from kwserver.evaluation.modes import read_metadata as parse_metadata
from kwserver.metadata import (
    MetadataError,
    PolicyMetadata,
    WasmFormatError,
    embed_custom_section,
    read_custom_section,
)
from tests.support.paths import CONFORMANCE

TINYGO = CONFORMANCE / "wasm/kubewarden-wapc/go-policy-template-tinygo-2022.wasm"
UNHAPPY = CONFORMANCE / "wasm/gatekeeper/gatekeeper_always_unhappy_policy.wasm"
EMPTY_MODULE = b"\0asm\x01\0\0\0"
METADATA = {"rules": [{"apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "operations": ["CREATE"]}],
            "mutating": False, "executionMode": "kubewarden-wapc", "protocolVersion": "v1"}


def test_upstream_annotated_module_is_read():
    meta = parse_metadata(UNHAPPY.read_bytes())
    assert meta.execution_mode == "gatekeeper"


def test_module_without_section():
    assert parse_metadata(TINYGO.read_bytes()) is None


def test_annotate_roundtrip_replaces_previous_section():
    once = annotate(EMPTY_MODULE, METADATA)
    twice = annotate(once, {**METADATA, "mutating": True})
    assert parse_metadata(twice).mutating is True
    assert twice.count(b"io.kubewarden.metadata") == 1


def test_declared_host_capabilities_are_kept():
    declared = ["kubernetes/list_resources_all", "oci/*"]
    assert parse_metadata(annotate(EMPTY_MODULE, {**METADATA, "hostCapabilities": declared})).host_capabilities \
        == declared
    with pytest.raises(MetadataError, match="`hostCapabilities`, expected a sequence of strings"):
        PolicyMetadata.from_json({**METADATA, "hostCapabilities": "oci/*"}, MODES)


def test_annotated_module_still_compiles():
    import wasmtime

    annotated = annotate(TINYGO.read_bytes(), METADATA)
    wasmtime.Module(wasmtime.Engine(), annotated)
    assert parse_metadata(annotated).protocol_version == "v1"


def test_other_custom_sections_are_kept():
    wasm = embed_custom_section(EMPTY_MODULE, b"data", name="other")
    assert read_custom_section(annotate(wasm, METADATA), "other") == b"data"


def test_not_wasm():
    with pytest.raises(WasmFormatError):
        parse_metadata(b"hello world")


def test_bad_json_section():
    with pytest.raises(MetadataError, match=r"cannot deserialize custom section `io\.kubewarden\.metadata`"):
        parse_metadata(embed_custom_section(EMPTY_MODULE, b"{not json"))


@pytest.mark.parametrize("changes,message", [
    ({"protocolVersion": None}, "Policy is missing protocol version"),
    ({"protocolVersion": "v2"}, "Policy uses protocol version Unknown but only V1 is supported"),
    ({"minimumKubewardenVersion": "1.99.0"}, "Policy required Kubewarden version 1.99.0 but is running on 1.31.0"),
])
def test_checks(changes, message):
    raw = {**METADATA, **changes}
    meta = PolicyMetadata.from_json({k: v for k, v in raw.items() if v is not None}, MODES)
    with pytest.raises(MetadataError, match=message):
        check_metadata(meta)


def test_minimum_version_ignores_patch():
    check_metadata(PolicyMetadata.from_json({**METADATA, "minimumKubewardenVersion": "1.31.9"}, MODES))


def test_protocol_version_only_matters_for_wapc():
    check_metadata(PolicyMetadata.from_json({"rules": [], "mutating": False, "executionMode": "opa"}, MODES))


def test_inferred_modes():
    assert infer_metadata({"__guest_call"}, set()).execution_mode == "kubewarden-wapc"
    assert infer_metadata({"_start"}, {"wasi_snapshot_preview1"}).execution_mode == "wasi"
    with pytest.raises(MetadataError):
        infer_metadata({"foo"}, set())


def test_cli_annotate_and_inspect(tmp_path, capsys):
    meta = tmp_path / "metadata.yml"
    meta.write_text(json.dumps(METADATA))
    out = tmp_path / "out.wasm"
    assert main(["annotate", str(TINYGO), "--metadata", str(meta), "-o", str(out)]) == 0
    assert main(["inspect", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["protocolVersion"] == "v1"
    assert main(["inspect", str(TINYGO)]) == 1
