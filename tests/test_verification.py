"""verification.yml: cosign signatures (made here, with keys generated here) checked before use.

Against a real docker-registry: `kwserver verify`, `kwserver check` and the server's init errors.
"""

from __future__ import annotations

import shutil

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec

from tests.support.paths import REPO
from tests.support.registries import cosign_sign, public_pem, sources_file, start_registry
from tests.support.server import kwserver

pytestmark = pytest.mark.skipif(not shutil.which("docker-registry"), reason="needs Debian's docker-registry")

DIST = REPO / "policies" / "dist"
KEYS = {name: ec.generate_private_key(ec.SECP256R1()) for name in ("alice", "bob", "carol")}


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    """A registry with modules signed by some of the keys."""
    directory = tmp_path_factory.mktemp("signed")
    registry = start_registry(directory / "registry")
    sources = sources_file(directory, {"insecure_sources": [registry.host]})

    def push(module: str, repository: str) -> str:
        result = kwserver("push", str(DIST / f"{module}.wasm"), registry.ref(f"{repository}:v1"),
                          "--sources-path", str(sources), cwd=directory)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().split("@")[1]

    cosign_sign(registry, "signed/alice-prod", push("pod-privileged", "signed/alice-prod"), [KEYS["alice"]],
                {"env": "prod"})
    cosign_sign(registry, "signed/alice-bob", push("echo", "signed/alice-bob"), [KEYS["alice"], KEYS["bob"]])
    push("safe-labels", "signed/unsigned")
    old = push("echo", "signed/replaced")
    cosign_sign(registry, "signed/replaced", old, [KEYS["alice"]])
    push("pod-privileged", "signed/replaced")  # the tag now names another, unsigned manifest
    yield registry, sources
    registry.stop()


def config(directory, doc) -> str:
    path = directory / "verification.yml"
    path.write_text(yaml.safe_dump({"apiVersion": "v1", **doc}))
    return str(path)


def pub_key(name: str, **extra) -> dict:
    return {"kind": "pubKey", "key": public_pem(KEYS[name]), **extra}


def check(tmp_path, registry, sources, verification, modules: dict[str, str]):
    policies = tmp_path / "policies.yml"
    policies.write_text(yaml.safe_dump({name: {"module": ref if ref.startswith("/") else registry.ref(ref)}
                                        for name, ref in modules.items()}))
    return kwserver("check", "--policies", str(policies), "--sources-path", str(sources), "--verification-path",
                    verification, cwd=tmp_path, env={"KWSERVER_COMPILE_CACHE_DIR": str(tmp_path / "cache")})


def line_of(result, name: str) -> str:
    return next(line for line in result.stdout.splitlines() if line.startswith(f"{name}: "))


def test_kwserver_verify(signed, tmp_path):
    registry, sources = signed
    verification = config(tmp_path, {"allOf": [pub_key("alice", annotations={"env": "prod"})]})
    ok = kwserver("verify", registry.ref("signed/alice-prod:v1"), "--verification-path", verification,
                  "--sources-path", str(sources), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(f"verified {registry.ref('signed/alice-prod:v1')}: sha256:")
    unsigned = kwserver("verify", registry.ref("signed/unsigned:v1"), "--verification-path", verification,
                        "--sources-path", str(sources), cwd=tmp_path)
    assert unsigned.returncode == 1 and "no signatures found for image" in unsigned.stderr


def test_all_of_with_annotations(signed, tmp_path):
    registry, sources = signed
    verification = config(tmp_path, {"allOf": [pub_key("alice", annotations={"env": "prod"})]})
    result = check(tmp_path, registry, sources, verification, {
        "good": "signed/alice-prod:v1", "no-annotation": "signed/alice-bob:v1", "unsigned": "signed/unsigned:v1",
        "replaced": "signed/replaced:v1", "local": str(DIST / "echo.wasm")})
    assert result.returncode == 1
    assert line_of(result, "good") == "good: ok"
    assert "bootstrap failure: no-annotation: Policy 'no-annotation' cannot be verified: Image verification " \
           "failed: missing signatures\nThe following constraints" in result.stdout
    assert "annotations:\n  env: prod" in result.stdout
    assert "Policy 'unsigned' cannot be verified: no signatures found for image" in line_of(result, "unsigned")
    assert "Policy 'replaced' cannot be verified: no signatures found" in line_of(result, "replaced")
    assert "Policy 'local' cannot be verified: Verification only works with OCI images" in line_of(result, "local")


def test_any_of_minimum_matches(signed, tmp_path):
    registry, sources = signed
    verification = config(tmp_path, {"anyOf": {"minimumMatches": 2, "signatures": [
        pub_key("alice"), pub_key("bob"), pub_key("carol")]}})
    result = check(tmp_path, registry, sources, verification, {"two": "signed/alice-bob:v1",
                                                                "one": "signed/alice-prod:v1"})
    assert line_of(result, "two") == "two: ok"
    assert "Policy 'one' cannot be verified: Image verification failed: minimum number of signatures not " \
           "reached: needed 2, got 1" in result.stdout


def test_a_tampered_download_fails_the_checksum(signed, tmp_path):
    registry, sources = signed
    verification = config(tmp_path, {"allOf": [pub_key("alice")]})
    assert check(tmp_path, registry, sources, verification, {"p": "signed/alice-bob:v1"}).returncode == 0
    stored = tmp_path / "registry" / registry.host / "signed" / "alice-bob:v1"
    stored.write_bytes((DIST / "pod-privileged.wasm").read_bytes())  # another valid module in its place
    result = check(tmp_path, registry, sources, verification, {"p": "signed/alice-bob:v1"})
    assert "bootstrap failure: p: Verification of policy p failed: The digest of the local file doesn't match " \
           "with the one reported inside of the signed manifest" in result.stdout


@pytest.mark.parametrize("doc,message", [
    ({"apiVersion": "v2", "allOf": []}, "Not a supported configuration version"),
    ({"allOf": [{"kind": "pubKey", "key": "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n"}]},
     "`key` is not a valid PEM public key"),
    ({"allOf": [{"kind": "pubKey", "key": "k", "colour": "red"}]}, "unknown field(s) ['colour']"),
    ({"allof": []}, "unknown field(s) ['allof']"),
    ({}, "config is missing signatures in both allOf and anyOff list"),
    ({"allOf": [{"kind": "githubAction", "owner": "kubewarden", "repository": "x"}]},
     "unknown field(s) ['repository'] in a `githubAction` entry"),
    ({"anyOf": {"signatures": [{"kind": "genericIssuer", "issuer": "https://i", "subject": {"urlPrefix": "x"}}]}},
     "`subject.urlPrefix`: 'x' is not an absolute URL"),
])
def test_invalid_verification_files_refuse_to_start(tmp_path, doc, message):
    path = tmp_path / "verification.yml"
    path.write_text(yaml.safe_dump({"apiVersion": "v1", **doc}))
    policies = tmp_path / "policies.yml"
    policies.write_text(yaml.safe_dump({"p": {"module": str(DIST / "echo.wasm")}}))
    result = kwserver("serve", "--policies", str(policies), "--verification-path", str(path), "--port", "0",
                      "--readiness-probe-port", "0", "--metrics-port", "0", cwd=tmp_path)
    assert result.returncode != 0
    assert f"invalid verification file {path}" in result.stderr and message in result.stderr
