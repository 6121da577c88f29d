"""OCI, sigstore and crypto host callbacks end to end: a kwserver whose policies (the raw waPC host-caller of
tests/test_kubernetes_callbacks.py) ask Debian's docker-registry, started on a free loopback port, about
images and cosign signatures pushed by the test, and check certificates the test makes."""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import platform
import shutil
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.modules import answer, host_policy
from tests.support.registries import cosign_sign, docker_config, public_pem, raw_push, sources_file, start_registry
from tests.support.sigstore import GITHUB_ISSUER, Sigstore, cosign_sign_keyless, github, simple_signing

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not shutil.which("docker-registry"), reason="needs Debian's docker-registry")]

FAILURE = "Callback evaluation failure: "
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
IMAGE_CONFIG = {"architecture": "amd64", "os": "linux", "config": {"Env": ["PATH=/bin"]},
                "rootfs": {"type": "layers", "diff_ids": []}}
TRUSTED = Sigstore("callbacks")
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    registry = start_registry(tmp_path_factory.mktemp("callback-registry"))
    yield registry
    registry.stop()


def oci(tmp_path: Path, name: str, operation: str, payload: Any, **policy: Any) -> dict[str, Any]:
    return host_policy(tmp_path, name, operation, payload, namespace="oci", **policy)


def serve(run_server, tmp_path: Path, policies: dict[str, Any], insecure: list[str], *args: str):
    tmp_path.mkdir(parents=True, exist_ok=True)
    sources = sources_file(tmp_path, {"insecure_sources": insecure})
    return run_server(policies, args=["--sources-path", str(sources), *args], env={"KUBEWARDEN_WORKERS": "1"})


def push_image(registry, repository: str, tag: str, layer: bytes = b"layer") -> str:
    return raw_push(registry, repository, tag, [(LAYER, layer)],
                    config=(OCI_CONFIG, json.dumps(IMAGE_CONFIG).encode()), manifest_type=OCI_MANIFEST)


def push_index(registry, repository: str, tag: str, entries: list[tuple[str, str]]) -> str:
    """An image index naming already pushed manifests of `repository` by (digest, architecture)."""
    base = f"http://{registry.host}/v2/{repository}/manifests"
    manifests = []
    for digest, arch in entries:
        size = len(requests.get(f"{base}/{digest}", headers={"Accept": OCI_MANIFEST}, timeout=10).content)
        manifests.append({"mediaType": OCI_MANIFEST, "digest": digest, "size": size,
                          "platform": {"architecture": arch, "os": "linux"}})
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}).encode()
    requests.put(f"{base}/{tag}", data=body, headers={"Content-Type": OCI_INDEX}, timeout=10).raise_for_status()
    return "sha256:" + hashlib.sha256(body).hexdigest()


# --- OCI manifests --------------------------------------------------------------------------------

def test_manifest_digest_manifest_and_config_come_from_the_registry(run_server, registry, tmp_path):
    digest = push_image(registry, "apps/web", "1.0")
    other = push_image(registry, "apps/web", "1.0-other", b"other layer")
    index = push_index(registry, "apps/web", "multi", [(other, "s390x-not-here"), (digest, ARCH)])
    web, multi = f"{registry.host}/apps/web:1.0", f"{registry.host}/apps/web:multi"
    policies = {
        "digest": oci(tmp_path, "digest", "v1/manifest_digest", web),
        "by-digest": oci(tmp_path, "by-digest", "v1/manifest_digest", f"{registry.host}/apps/web@{digest}"),
        "manifest": oci(tmp_path, "manifest", "v1/oci_manifest", web),
        "index": oci(tmp_path, "index", "v1/oci_manifest", multi),
        "config": oci(tmp_path, "config", "v1/oci_manifest_config", web),
        "index-config": oci(tmp_path, "index-config", "v1/oci_manifest_config", multi),
    }
    server = serve(run_server, tmp_path, policies, [registry.host])

    assert answer(server, "digest") == ("ok", {"digest": digest})
    assert answer(server, "by-digest") == ("ok", {"digest": digest})

    outcome, manifest = answer(server, "manifest")
    assert outcome == "ok" and manifest["schemaVersion"] == 2 and manifest["mediaType"] == OCI_MANIFEST
    assert manifest["config"]["mediaType"] == OCI_CONFIG
    assert [layer["digest"] for layer in manifest["layers"]] == ["sha256:" + hashlib.sha256(b"layer").hexdigest()]

    outcome, listed = answer(server, "index")
    assert outcome == "ok" and listed["mediaType"] == OCI_INDEX
    assert [(m["digest"], m["platform"]) for m in listed["manifests"]] == [
        (other, {"architecture": "s390x-not-here", "os": "linux"}), (digest, {"architecture": ARCH, "os": "linux"})]

    outcome, both = answer(server, "config")
    assert outcome == "ok" and both["digest"] == digest and both["config"] == IMAGE_CONFIG
    assert both["manifest"] == manifest
    # An index is resolved to this machine's platform first, as the reference's client does.
    outcome, resolved = answer(server, "index-config")
    assert outcome == "ok" and resolved["digest"] == digest and resolved["config"] == IMAGE_CONFIG
    assert index != digest


def test_a_wasm_policy_artifacts_config_is_empty(run_server, registry, tmp_path):
    digest = raw_push(registry, "policies/p", "v1", [("application/vnd.wasm.content.layer.v1+wasm", b"\0asm")])
    server = serve(run_server, tmp_path, {"p": oci(tmp_path, "p", "v1/oci_manifest_config",
                                                   f"{registry.host}/policies/p:v1")}, [registry.host])
    outcome, both = answer(server, "p")
    assert outcome == "ok" and both["digest"] == digest and both["config"] == {}


def test_unknown_images_and_unreachable_registries_are_host_errors(run_server, registry, tmp_path):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{closed.getsockname()[1]}"
    policies = {
        "missing": oci(tmp_path, "missing", "v1/manifest_digest", f"{registry.host}/apps/nope:1.0"),
        "nobody": oci(tmp_path, "nobody", "v1/oci_manifest", f"{nobody}/apps/web:1.0"),
        "invalid": oci(tmp_path, "invalid", "v1/manifest_digest", "Not/An/Image:"),
        "not-a-string": oci(tmp_path, "not-a-string", "v1/manifest_digest", {"image": "busybox"}),
        "unknown": oci(tmp_path, "unknown", "v1/nothing", "busybox", hostCapabilities=["oci/*"]),
    }
    server = serve(run_server, tmp_path, policies, [registry.host, nobody])
    outcome, text = answer(server, "missing")
    assert outcome == "error" and text.startswith(FAILURE) and "manifest unknown" in text
    outcome, text = answer(server, "nobody")
    assert outcome == "error" and text.startswith(FAILURE) and "cannot connect" in text
    outcome, text = answer(server, "invalid")
    assert outcome == "error" and text.startswith(FAILURE + "Invalid OCI image reference")
    assert answer(server, "not-a-string") == ("error", "invalid type: map, expected a string")
    assert answer(server, "unknown") == ("error", "unknown operation: v1/nothing")


def test_registry_credentials_come_from_the_docker_config(run_server, tmp_path):
    secured = start_registry(tmp_path / "secured", users={"alice": "s3cret"})
    try:
        digest = push_image(secured, "private/app", "1.0")
        image = f"{secured.host}/private/app:1.0"
        policies = {"p": oci(tmp_path, "p", "v1/manifest_digest", image)}
        anonymous = serve(run_server, tmp_path / "anonymous", policies, [secured.host])
        outcome, text = answer(anonymous, "p")
        assert outcome == "error" and "requires authentication" in text and text.startswith(FAILURE)

        config = docker_config(tmp_path / "docker", {secured.host: ("alice", "s3cret")})
        with_login = serve(run_server, tmp_path / "login", policies, [secured.host],
                           "--docker-config-json-path", str(config))
        assert answer(with_login, "p") == ("ok", {"digest": digest})
    finally:
        secured.stop()


def test_answers_are_cached_and_shared_by_the_policies_of_a_process(run_server, registry, tmp_path):
    first = push_image(registry, "apps/moving", "latest", b"first")
    image = f"{registry.host}/apps/moving:latest"
    policies = {"a": oci(tmp_path, "a", "v1/manifest_digest", image),
                "b": oci(tmp_path, "b", "v1/manifest_digest", image),
                "manifest": oci(tmp_path, "manifest", "v1/oci_manifest", image)}
    server = serve(run_server, tmp_path, policies, [registry.host])
    assert answer(server, "a") == ("ok", {"digest": first})
    first_manifest = answer(server, "manifest")[1]

    second = push_image(registry, "apps/moving", "latest", b"second")
    assert second != first
    # The tag moved, but for 60 s the answers of every policy in this worker are the cached ones.
    assert answer(server, "a") == ("ok", {"digest": first})
    assert answer(server, "b") == ("ok", {"digest": first})
    assert answer(server, "manifest") == ("ok", first_manifest)
    fresh = serve(run_server, tmp_path / "fresh", policies, [registry.host])
    assert answer(fresh, "a") == ("ok", {"digest": second})


class BlackHole:
    """Accepts connections and never answers: a registry that hangs."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{self.socket.getsockname()[1]}"
        self.connections: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                self.connections.append(self.socket.accept()[0])
            except OSError:
                return

    def stop(self) -> None:
        self.socket.close()
        for connection in self.connections:
            connection.close()


def test_a_hanging_registry_costs_the_policy_its_timeout_not_more(run_server, tmp_path):
    hole = BlackHole()
    try:
        policies = {"p": oci(tmp_path, "p", "v1/manifest_digest", f"{hole.host}/apps/web:1.0",
                             timeoutEvalSeconds=1)}
        server = serve(run_server, tmp_path, policies, [hole.host])
        response = server.post("/validate_raw/p", {"request": {"uid": "u"}}).json()["response"]
        assert response["allowed"] is False
        # The call gave up at the deadline; the guest was then stopped as any policy out of time.
        assert response["status"]["message"] == \
            "Policy execution interrupted because it exceeded the allowed execution time"
    finally:
        hole.stop()


def test_a_wait_that_ends_at_the_deadline_is_a_timeout_whichever_side_gives_up_first():
    import time

    from kwserver.capabilities.waiting import until_deadline
    from kwserver.runtime import GuestTimeout

    def gives_up_late():  # the request's own timeout, cut to the time left, fires just after the deadline
        time.sleep(0.15)
        raise OSError("read timed out")

    for work in (gives_up_late, lambda: time.sleep(1)):
        with pytest.raises(GuestTimeout):
            until_deadline(time.monotonic() + 0.1, work, "manifest digest example.com/app")
    with pytest.raises(OSError, match="refused"):  # before the deadline, a failure is the guest's to read
        until_deadline(time.monotonic() + 5, lambda: (_ for _ in ()).throw(OSError("refused")), "x")


# --- sigstore -------------------------------------------------------------------------------------

def test_public_key_signatures_are_verified(run_server, registry, tmp_path):
    signer, stranger = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    signed = push_image(registry, "signed/app", "1.0")
    cosign_sign(registry, "signed/app", signed, [signer], annotations={"env": "prod"})
    push_image(registry, "signed/unsigned", "1.0", b"unsigned")
    forged = push_image(registry, "signed/forged", "1.0", b"forged")
    # A signature layer for the right digest whose bytes were signed over another payload.
    cosign_sign(registry, "signed/forged", forged, [signer])
    manifest_url = f"http://{registry.host}/v2/signed/forged/manifests/{forged.replace(':', '-')}.sig"
    sig_manifest = requests.get(manifest_url, headers={"Accept": OCI_MANIFEST}, timeout=10).json()
    other_signature = cosign_sign_bytes(signer, b"some other payload")
    sig_manifest["layers"][0]["annotations"]["dev.cosignproject.cosign/signature"] = other_signature
    requests.put(manifest_url, data=json.dumps(sig_manifest), headers={"Content-Type": OCI_MANIFEST},
                 timeout=10).raise_for_status()

    image, key, wrong = f"{registry.host}/signed/app:1.0", public_pem(signer), public_pem(stranger)

    def v1(name: str, keys: list[str], annotations: dict[str, str] | None = None, target: str = image):
        return oci(tmp_path, name, "v1/verify", {"SigstorePubKeyVerify": {
            "image": target, "pub_keys": keys, "annotations": annotations}})

    def v2(name: str, keys: list[str], annotations: dict[str, str] | None = None, target: str = image):
        return oci(tmp_path, name, "v2/verify", {"type": "SigstorePubKeyVerify", "image": target,
                                                  "pub_keys": keys, "annotations": annotations})

    policies = {
        "v1": v1("v1", [key]), "v2": v2("v2", [key]), "annotated": v2("annotated", [key], {"env": "prod"}),
        "other-annotation": v2("other-annotation", [key], {"env": "dev"}), "wrong-key": v1("wrong-key", [wrong]),
        "both-keys": v2("both-keys", [key, wrong]), "no-keys": v1("no-keys", []),
        "unsigned": v1("unsigned", [key], target=f"{registry.host}/signed/unsigned:1.0"),
        "forged": v1("forged", [key], target=f"{registry.host}/signed/forged:1.0"),
        "bad-pem": v2("bad-pem", ["not a key"]),
    }
    server = serve(run_server, tmp_path, policies, [registry.host])

    trusted = ("ok", {"is_trusted": True, "digest": signed})
    assert answer(server, "v1") == trusted
    assert answer(server, "v2") == trusted
    assert answer(server, "annotated") == trusted
    for name in ("other-annotation", "wrong-key", "both-keys", "forged"):
        outcome, text = answer(server, name)
        assert outcome == "error", name
        assert text.startswith(FAILURE + "Image verification failed: missing signatures"), (name, text)
    outcome, text = answer(server, "wrong-key")
    assert wrong.splitlines()[1] in text and "kind: pubKey" in text
    assert answer(server, "no-keys") == ("error", FAILURE + "Must provide at least one pub key")
    outcome, text = answer(server, "unsigned")
    assert (outcome, text) == ("error", FAILURE + f"no signatures found for image: {registry.host}/signed/unsigned:1.0")
    outcome, text = answer(server, "bad-pem")
    assert outcome == "error" and text.startswith(FAILURE + "the public key is not a valid PEM public key")


def cosign_sign_bytes(key: Any, payload: bytes) -> str:
    return base64.b64encode(key.sign(payload, ec.ECDSA(hashes.SHA256()))).decode()


def test_keyless_requests_are_checked_against_the_trust_root(run_server, registry, tmp_path):
    trust = TRUSTED.write_trust_root(tmp_path / "trust.json")
    digest = push_image(registry, "keyless/app", "1.0")
    cosign_sign_keyless(registry, "keyless/app", digest, TRUSTED, [github("kubewarden/app")])
    keyed = push_image(registry, "keyless/keyed", "1.0", b"keyed")
    cosign_sign(registry, "keyless/keyed", keyed, [ec.generate_private_key(ec.SECP256R1())])
    image, subject = f"{registry.host}/keyless/app:1.0", github("kubewarden/app").subject

    def exact(name: str, issuer: str, target: str = image) -> dict[str, Any]:
        return oci(tmp_path, name, "v1/verify", {"SigstoreKeylessVerify": {
            "image": target, "keyless": [{"issuer": issuer, "subject": subject}], "annotations": None}})

    def prefix(name: str, url: str) -> dict[str, Any]:
        return oci(tmp_path, name, "v2/verify", {"type": "SigstoreKeylessPrefixVerify", "image": image,
                                                  "keyless_prefix": [{"issuer": GITHUB_ISSUER, "url_prefix": url}]})

    def owner(name: str, who: str, repo: str | None = None) -> dict[str, Any]:
        return oci(tmp_path, name, "v2/verify", {"type": "SigstoreGithubActionsVerify", "image": image,
                                                  "owner": who, "repo": repo})

    policies = {
        "exact": exact("exact", GITHUB_ISSUER), "other-issuer": exact("other-issuer", "https://issuer.example"),
        "keyed": exact("keyed", GITHUB_ISSUER, f"{registry.host}/keyless/keyed:1.0"),
        "prefix": prefix("prefix", "https://github.com/kubewarden"), "org": prefix("org", "https://github.com/org"),
        "github": owner("github", "kubewarden", "app"), "other-owner": owner("other-owner", "kubewarden-x"),
        "no-info": oci(tmp_path, "no-info", "v2/verify", {"type": "SigstoreKeylessVerify", "image": image,
                                                           "keyless": []}),
        "no-owner": owner("no-owner", ""),
        "unknown-variant": oci(tmp_path, "unknown-variant", "v1/verify", {"SigstoreGithubActionsVerify": {}}),
    }
    server = serve(run_server, tmp_path, policies, [registry.host], "--sigstore-trust-config", str(trust))
    for name in ("exact", "prefix", "github"):
        assert answer(server, name) == ("ok", {"is_trusted": True, "digest": digest}), name
    # (the host-calling policy hands the error back on one line)
    missing = FAILURE + "Image verification failed: missing signatures The following constraints were not " \
                        "satisfied: "
    assert answer(server, "other-issuer") == ("error", missing + "kind: genericIssuer issuer: "
                                              f"https://issuer.example subject: !equal {subject} annotations: null ")
    assert answer(server, "org") == ("error", missing + f"kind: genericIssuer issuer: {GITHUB_ISSUER} "
                                     "subject: !urlPrefix https://github.com/org annotations: null ")
    assert answer(server, "other-owner") == ("error", missing + "kind: githubAction owner: kubewarden-x "
                                             "repo: null annotations: null ")
    outcome, text = answer(server, "keyed")  # signed with a key: no certificate, so no identity
    assert outcome == "error" and text.startswith(missing) and "could not be trusted" not in text
    assert answer(server, "no-info") == ("error", FAILURE + "Must provide keyless info")
    assert answer(server, "no-owner") == ("error", FAILURE + "Must provide owner info")
    outcome, text = answer(server, "unknown-variant")
    assert outcome == "error" and text.startswith("unknown variant, expected one of `SigstorePubKeyVerify`")


# --- crypto ---------------------------------------------------------------------------------------

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


def certificate(name: str, issuer: tuple[x509.Certificate, Any] | None = None, *, ca: bool = False,
                not_before: datetime.datetime = NOW - DAY, not_after: datetime.datetime = NOW + 30 * DAY):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, signing_key = (issuer[0].subject, issuer[1]) if issuer else (subject, key)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    return builder.sign(signing_key, hashes.SHA256()), key


def chain(**leaf: Any):
    authorities = {"ca": True, "not_before": NOW - 60 * DAY, "not_after": NOW + 60 * DAY}
    root = certificate("root", **authorities)
    intermediate = certificate("intermediate", root, **authorities)
    return certificate("leaf", intermediate, **leaf)[0], intermediate[0], root[0]


def pem(cert: x509.Certificate) -> dict[str, Any]:
    return {"encoding": "Pem", "data": list(cert.public_bytes(serialization.Encoding.PEM))}


def der(cert: x509.Certificate) -> dict[str, Any]:
    return {"encoding": "Der", "data": list(cert.public_bytes(serialization.Encoding.DER))}


def rfc3339(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_certificates_are_checked_against_their_chain(run_server, tmp_path):
    leaf, intermediate, root = chain()
    stranger = chain()
    expired = chain(not_before=NOW - 30 * DAY, not_after=NOW - DAY)
    future = chain(not_before=NOW + DAY, not_after=NOW + 30 * DAY)
    old_root = certificate("old root", ca=True, not_before=NOW - 60 * DAY, not_after=NOW - 30 * DAY)
    old_intermediate = certificate("old intermediate", old_root, ca=True)
    under_old_root = certificate("leaf", old_intermediate)[0]
    second_root = certificate("second root", ca=True)
    expired_intermediate = certificate("expired intermediate", second_root, ca=True, not_before=NOW - 30 * DAY,
                                       not_after=NOW - DAY)
    not_a_ca = certificate("not a ca", second_root)
    requests_by_name = {
        "trusted": {"cert": pem(leaf), "cert_chain": [pem(intermediate), pem(root)], "not_after": None},
        "trusted-der": {"cert": der(leaf), "cert_chain": [der(intermediate), der(root)]},
        "other-chain": {"cert": pem(leaf), "cert_chain": [pem(stranger[1]), pem(stranger[2])]},
        "no-intermediate": {"cert": pem(leaf), "cert_chain": [pem(root)]},
        "empty-chain": {"cert": pem(leaf), "cert_chain": []},
        "expired": {"cert": pem(expired[0]), "cert_chain": [pem(expired[1]), pem(expired[2])]},
        "expired-then-valid": {"cert": pem(expired[0]), "cert_chain": [pem(expired[1]), pem(expired[2])],
                               "not_after": rfc3339(NOW - 2 * DAY)},
        "valid-later-expired": {"cert": pem(leaf), "cert_chain": [pem(intermediate), pem(root)],
                                "not_after": rfc3339(NOW + 60 * DAY)},
        "empty-not-after": {"cert": pem(leaf), "cert_chain": [pem(intermediate), pem(root)], "not_after": ""},
        "not-yet-valid": {"cert": pem(future[0]), "cert_chain": [pem(future[1]), pem(future[2])]},
        "old-root": {"cert": pem(under_old_root), "cert_chain": [pem(old_intermediate[0]), pem(old_root[0])]},
        "expired-intermediate": {"cert": pem(certificate("leaf", expired_intermediate)[0]),
                                 "cert_chain": [pem(expired_intermediate[0]), pem(second_root[0])]},
        "not-a-ca": {"cert": pem(certificate("leaf", not_a_ca)[0]),
                     "cert_chain": [pem(not_a_ca[0]), pem(second_root[0])]},
        "ca-as-leaf": {"cert": pem(intermediate), "cert_chain": [pem(root)]},
        "self-made-no-chain": {"cert": pem(leaf), "cert_chain": None},
        "bad-pem": {"cert": {"encoding": "Pem", "data": list(b"hello")}},
        "bad-der": {"cert": {"encoding": "Der", "data": [1, 2, 3]}},
        "bad-time": {"cert": pem(leaf), "not_after": "yesterday"},
    }
    policies = {name: host_policy(tmp_path, name, "v1/is_certificate_trusted", request, namespace="crypto")
                for name, request in requests_by_name.items()}
    server = run_server(policies, env={"KUBEWARDEN_WORKERS": "1"})

    trusted = ("ok", {"trusted": True, "reason": ""})
    unknown = ("ok", {"trusted": False, "reason": "Certificate is not trusted by the provided cert chain"})
    expired_reason = ("ok", {"trusted": False, "reason": "Certificate is being used after its expiration date"})
    for name in ("trusted", "trusted-der", "expired-then-valid", "empty-not-after", "old-root"):
        assert answer(server, name) == trusted, name
    for name in ("other-chain", "no-intermediate", "empty-chain", "self-made-no-chain"):
        assert answer(server, name) == unknown, name
    assert answer(server, "expired") == expired_reason
    assert answer(server, "valid-later-expired") == expired_reason
    assert answer(server, "expired-intermediate") == expired_reason
    for name, problem in (("not-a-ca", "EndEntityUsedAsCa"), ("ca-as-leaf", "CaUsedAsEndEntity")):
        assert answer(server, name) == ("ok", {"trusted": False, "reason": f"Certificate not trusted: {problem}"})
    assert answer(server, "not-yet-valid") == ("ok", {"trusted": False,
                                                      "reason": "Certificate is being used before its validity date"})
    outcome, text = answer(server, "bad-pem")
    assert outcome == "error" and text.startswith(FAILURE + "Certificate PEM data is not valid: ")
    outcome, text = answer(server, "bad-der")
    assert outcome == "error" and text.startswith(FAILURE + "Certificate is not a valid end-entity certificate: ")
    assert answer(server, "bad-time") == ("error", FAILURE + "Timestamp not_after is not in RFC3339 format")


def test_certificate_signatures_are_verified_offline(run_server, registry, tmp_path):
    root = chain()[2]
    authorities = {"ca": True, "not_before": NOW - 60 * DAY, "not_after": NOW + 60 * DAY}
    ca = certificate("sigstore root", **authorities)
    signing_cert, signing_key = certificate("signer@example.com", ca)
    other_cert = certificate("someone else", ca)[0]
    digest = push_image(registry, "certified/app", "1.0", b"certified")
    cosign_sign(registry, "certified/app", digest, [signing_key], annotations={"env": "prod"})
    image = f"{registry.host}/certified/app:1.0"
    # The same key's signature of another image, with a Rekor bundle of the test's Sigstore.
    logged_digest = push_image(registry, "certified/logged", "1.0", b"logged")
    payload = simple_signing(registry, "certified/logged", logged_digest, None)
    signature = signing_key.sign(payload, ec.ECDSA(hashes.SHA256()))
    raw_push(registry, "certified/logged", logged_digest.replace(":", "-") + ".sig", [(
        "application/vnd.dev.cosign.simplesigning.v1+json", payload,
        {"dev.cosignproject.cosign/signature": base64.b64encode(signature).decode(),
         "dev.sigstore.cosign/bundle": TRUSTED.bundle(payload, signature, signing_cert)})],
        config=(OCI_CONFIG, b"{}"))
    trust = TRUSTED.write_trust_root(tmp_path / "trust.json")

    def request(name: str, cert: x509.Certificate, cert_chain: list[x509.Certificate] | None, *,
                rekor: bool = False, annotations: dict[str, str] | None = None, target: str = image) -> dict[str, Any]:
        body = {"type": "SigstoreCertificateVerify", "image": target, "certificate": pem(cert)["data"],
                "certificate_chain": None if cert_chain is None else [pem(c)["data"] for c in cert_chain],
                "require_rekor_bundle": rekor, "annotations": annotations}
        return oci(tmp_path, name, "v2/verify", body)

    policies = {
        "chained": request("chained", signing_cert, [ca[0]], annotations={"env": "prod"}),
        "unchained": request("unchained", signing_cert, None),
        "wrong-chain": request("wrong-chain", signing_cert, [root]),
        "other-cert": request("other-cert", other_cert, [ca[0]]),
        "other-annotation": request("other-annotation", signing_cert, None, annotations={"env": "dev"}),
        "rekor": request("rekor", signing_cert, [ca[0]], rekor=True),
        "logged": request("logged", signing_cert, [ca[0]], rekor=True, target=f"{registry.host}/certified/logged:1.0"),
    }
    server = serve(run_server, tmp_path, policies, [registry.host], "--sigstore-trust-config", str(trust))
    assert answer(server, "chained") == ("ok", {"is_trusted": True, "digest": digest})
    assert answer(server, "unchained") == ("ok", {"is_trusted": True, "digest": digest})
    assert answer(server, "wrong-chain") == ("error", FAILURE + "verification failed: the certificate is not "
                                             "trusted: Certificate is not trusted by the provided cert chain")
    for name in ("other-cert", "other-annotation", "rekor"):
        outcome, text = answer(server, name)
        assert outcome == "error" and text.startswith(FAILURE + "verification failed: "), (name, text)
    assert "not in the transparency log as required: - sha256:" in answer(server, "rekor")[1]
    assert answer(server, "logged") == ("ok", {"is_trusted": True, "digest": logged_digest})


def kwserver_run(tmp_path: Path, module: Path, *args: str) -> tuple[str, Any]:
    """`kwserver run --raw` of a host-calling policy: the outcome and answer of its host call."""
    import subprocess
    import sys

    request = tmp_path / "request.json"
    request.write_text(json.dumps({"request": {"uid": "u"}}))
    result = subprocess.run([sys.executable, "-m", "kwserver", "run", "--raw", "-r", str(request), str(module),
                             *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    outcome, _, text = json.loads(result.stdout)["status"]["message"].partition(":")
    return outcome, json.loads(text) if outcome == "ok" else text


def test_registry_answers_record_and_replay_with_kwserver_run(registry, tmp_path):
    first = push_image(registry, "recorded/app", "1.0", b"recorded first")
    sources = sources_file(tmp_path, {"insecure_sources": [registry.host]})
    found = Path(oci(tmp_path, "found", "v1/manifest_digest", f"{registry.host}/recorded/app:1.0")["module"])
    missing = Path(oci(tmp_path, "missing", "v1/manifest_digest", f"{registry.host}/recorded/nope:1.0")["module"])
    session, failed = tmp_path / "found.yml", tmp_path / "missing.yml"
    assert kwserver_run(tmp_path, found, "--sources-path", str(sources), "--record-host-capabilities-interactions",
                        str(session)) == ("ok", {"digest": first})
    outcome, error = kwserver_run(tmp_path, missing, "--sources-path", str(sources),
                                  "--record-host-capabilities-interactions", str(failed))
    assert outcome == "error" and error.startswith(FAILURE) and "manifest unknown" in error

    push_image(registry, "recorded/app", "1.0", b"recorded second")
    assert kwserver_run(tmp_path, found, "--replay-host-capabilities-interactions", str(session)) == \
        ("ok", {"digest": first})
    # The guest reads a replayed failure exactly as the recorded one.
    assert kwserver_run(tmp_path, missing, "--replay-host-capabilities-interactions", str(failed)) == \
        ("error", error)
