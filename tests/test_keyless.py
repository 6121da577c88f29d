"""Keyless signatures (Fulcio certificate, Rekor bundle) checked against a Sigstore trust root, offline.

The Sigstore here is made by the tests (tests/support/sigstore.py); the public-good trust root shipped with
kwserver is checked against sigstore-python's reading of the same file.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import shutil

import pytest
import yaml

from kwserver.sources import keyless, sigstore_trust, verification
from kwserver.sources.keyless import Identity
from kwserver.sources.sigstore_trust import TrustRootError, load_trust_root, parse_trust_root
from tests.support.paths import REPO
from tests.support.paths import upstream_request as fixture
from tests.support.registries import sources_file, start_registry
from tests.support.server import kwserver
from tests.support.sigstore import NOW, Signer, Sigstore, cosign_sign_keyless, github, keyless_layer

DIST = REPO / "policies" / "dist"
TRUSTED = Sigstore("trusted")
OTHER = Sigstore("other")
needs_registry = pytest.mark.skipif(not shutil.which("docker-registry"), reason="needs Debian's docker-registry")


def check(signer: Signer, root: sigstore_trust.TrustRoot | None = None) -> Identity:
    _, payload, annotations = keyless_layer(TRUSTED, b'{"critical":{"image":{}}}', signer)
    return keyless.check(payload, base64.b64decode(annotations["dev.cosignproject.cosign/signature"]),
                         annotations["dev.sigstore.cosign/certificate"], annotations.get("dev.sigstore.cosign/bundle"),
                         root or parse_trust_root(TRUSTED.trusted_root(), "trusted.json"))


# --- the trust root --------------------------------------------------------------------------------

def test_the_shipped_public_good_root_reads_as_sigstore_python_reads_it():
    from sigstore.models import TrustedRoot

    ours = load_trust_root(None)
    theirs = TrustedRoot.from_file(str(sigstore_trust.SHIPPED_TRUSTED_ROOT))
    assert [c for ca in ours.authorities for c in ca.certificates] == theirs.get_fulcio_certs()
    assert "c0d23d6ad406973f9559f3ba2d1ca01f84147d8ffc5b8445c224f98b9591801d" in ours.rekor_logs  # rekor.sigstore.dev
    assert {log.base_url for log in ours.ct_logs.values()} >= {"https://ctfe.sigstore.dev/2022"}


@pytest.mark.parametrize("client_trust_config", [True, False])
def test_a_client_trust_config_or_a_bare_trusted_root(tmp_path, client_trust_config):
    path = TRUSTED.write_trust_root(tmp_path / "trust.json", client_trust_config=client_trust_config)
    root = load_trust_root(str(path))
    assert [c.subject.rfc4514_string() for c in root.authorities[0].certificates] == [
        "CN=trusted-fulcio-intermediate,O=sigstore.test", "CN=trusted-fulcio-root,O=sigstore.test"]
    assert list(root.rekor_logs) == [TRUSTED.rekor_log_id] and len(root.ct_logs) == 1
    assert check(github("kubewarden/policies"), root).github_repository == "kubewarden/policies"


def test_protobuf_field_names_are_read_too():
    doc = {"trusted_root": json.loads(json.dumps(TRUSTED.trusted_root()).replace(
        "certificateAuthorities", "certificate_authorities").replace("rawBytes", "raw_bytes"))}
    assert len(parse_trust_root(doc, "snake.json").authorities) == 1


@pytest.mark.parametrize("content,message", [
    ("{not json", "is not valid JSON"),
    (json.dumps([]), "cannot be used: the top level is not a JSON object"),
    (json.dumps(TRUSTED.trusted_root(authorities=False)), "it has no Fulcio certificate authority"),
    (json.dumps({**TRUSTED.trusted_root(), "tlogs": []}), "it has no Rekor transparency log"),
    (json.dumps({"mediaType": "application/vnd.dev.sigstore.clienttrustconfig.v0.1+json"}), "has no trustedRoot"),
    (json.dumps(TRUSTED.trusted_root()).replace('"rawBytes": "MII', '"rawBytes": "AAA', 1),
     "certificateAuthorities[0].certChain.certificates[0] is not a DER certificate"),
])
def test_unusable_trust_roots_say_why(tmp_path, content, message):
    path = tmp_path / "trust.json"
    path.write_text(content)
    with pytest.raises(TrustRootError) as error:
        load_trust_root(str(path))
    assert str(path) in str(error.value) and message in str(error.value)


# --- one signature ---------------------------------------------------------------------------------

def test_a_github_actions_signature_and_an_email_signature_hold():
    found = check(github("kubewarden/policies"))
    assert found == Identity("https://github.com/kubewarden/policies/.github/workflows/release.yml@refs/tags/v1.0.0",
                             True, "https://token.actions.githubusercontent.com", "kubewarden/policies")
    assert check(Signer("alice@example.com", "https://accounts.google.com")) == \
        Identity("alice@example.com", False, "https://accounts.google.com", None)


@pytest.mark.parametrize("signer,message", [
    (github("kubewarden/p", sigstore=OTHER),
     "(issued by CN=other-fulcio-intermediate,O=sigstore.test) does not chain to a Fulcio CA of the trust root"),
    (github("kubewarden/p", integrated_time=NOW + datetime.timedelta(hours=1)),
     "the certificate was not valid when the signature was logged"),
    (github("kubewarden/p", not_before=NOW - datetime.timedelta(days=3000),
            integrated_time=NOW - datetime.timedelta(days=3000)), "no Fulcio CA of the trust root"),
    (github("kubewarden/p", log_key=OTHER.rekor_key),
     f"the Rekor bundle is signed by log {OTHER.rekor_log_id}, which is not a Rekor log of the trust root"),
    (github("kubewarden/p", tamper_payload=True), "the Rekor entry is for another payload"),
    (github("kubewarden/p", sct=False), "the certificate has no embedded SCT"),
    (github("kubewarden/p", bundle=False), "no Rekor bundle (dev.sigstore.cosign/bundle)"),
])
def test_untrusted_signatures_say_why(signer, message):
    with pytest.raises(keyless.KeylessError) as error:
        check(signer)
    assert message in str(error.value)


def test_a_forged_set_and_a_moved_bundle_are_refused():
    _, payload, annotations = keyless_layer(TRUSTED, b"payload", github("kubewarden/p"))
    signature = base64.b64decode(annotations["dev.cosignproject.cosign/signature"])
    root = parse_trust_root(TRUSTED.trusted_root(), "trusted.json")
    bundle = json.loads(annotations["dev.sigstore.cosign/bundle"])
    bundle["Payload"]["logIndex"] += 1  # the SET no longer covers it
    with pytest.raises(keyless.KeylessError, match="signed entry timestamp does not verify"):
        keyless.check(payload, signature, annotations["dev.sigstore.cosign/certificate"], json.dumps(bundle), root)
    _, _, other = keyless_layer(TRUSTED, b"payload", github("kubewarden/p"))  # another signature's bundle
    with pytest.raises(keyless.KeylessError, match="the Rekor entry is for another signature"):
        keyless.check(payload, signature, annotations["dev.sigstore.cosign/certificate"],
                      other["dev.sigstore.cosign/bundle"], root)


def test_without_ct_logs_in_the_trust_root_no_sct_is_required():
    root = parse_trust_root(TRUSTED.trusted_root(ctlogs=False), "no-ct.json")
    assert check(github("kubewarden/p", sct=False), root).issuer == "https://token.actions.githubusercontent.com"


# --- identities, as the reference matches and prints them -------------------------------------------

def payload_of(identity: Identity, annotations: dict[str, str] | None = None) -> verification.SignedPayload:
    return verification.SignedPayload(b"", b"", annotations or {}, identity=identity)


def test_identity_rules_of_the_reference():
    action = Identity("https://github.com/kubewarden/policies/.github/workflows/release.yml@refs/heads/main", True,
                      "https://token.actions.githubusercontent.com", "kubewarden/policies")
    hacker = Identity("https://github.com/kubewarden-hacker/policies/.github/workflows/release.yml@refs/heads/main",
                      True, "https://token.actions.githubusercontent.com", "kubewarden-hacker/policies")
    prefix = verification.GenericIssuer(action.issuer, verification.url_prefix("https://github.com/kubewarden"), True)
    assert prefix.subject == "https://github.com/kubewarden/"
    assert prefix.satisfied_by(payload_of(action)) and not prefix.satisfied_by(payload_of(hacker))
    assert verification.GenericIssuer(action.issuer, action.subject).satisfied_by(payload_of(action))
    assert not verification.GenericIssuer("https://other", action.subject).satisfied_by(payload_of(action))
    assert verification.GithubAction("kubewarden").satisfied_by(payload_of(action))
    assert verification.GithubAction("kubewarden", "policies").satisfied_by(payload_of(action))
    assert not verification.GithubAction("kubewarden", "other").satisfied_by(payload_of(action))
    assert not verification.GithubAction("kubewarden").satisfied_by(payload_of(hacker))
    email = Identity("kubewarden@example.com", False, action.issuer, "kubewarden/policies")
    assert not verification.GithubAction("kubewarden").satisfied_by(payload_of(email))  # a URI subject only
    with_env = verification.GithubAction("kubewarden", annotations={"env": "prod"})
    assert with_env.satisfied_by(payload_of(action, {"env": "prod"})) and not with_env.satisfied_by(payload_of(action))


def test_constraints_are_printed_as_the_reference_prints_them():
    config = verification.parse_verification(yaml.safe_load("""
        apiVersion: v1
        allOf:
          - {kind: genericIssuer, issuer: "https://github.com/login/oauth", subject: {equal: user1@provider.com}}
          - {kind: genericIssuer, issuer: "https://token.actions.githubusercontent.com",
             subject: {urlPrefix: "https://github.com/kubewarden"}, annotations: {env: prod}}
          - {kind: githubAction, owner: kubewarden}
    """))
    with pytest.raises(verification.VerificationError) as error:
        verification.check_constraints(config, [])
    assert str(error.value) == (
        "Image verification failed: missing signatures\nThe following constraints were not satisfied:\n"
        "kind: genericIssuer\nissuer: https://github.com/login/oauth\nsubject: !equal user1@provider.com\n"
        "annotations: null\n"
        "kind: genericIssuer\nissuer: https://token.actions.githubusercontent.com\n"
        "subject: !urlPrefix https://github.com/kubewarden/\nannotations:\n  env: prod\n"
        "kind: githubAction\nowner: kubewarden\nrepo: null\nannotations: null\n")


@pytest.mark.parametrize("entry,message", [
    ({"kind": "genericIssuer", "issuer": "https://i", "subject": {"urlPrefix": "not a url"}},
     "`subject.urlPrefix`: 'not a url' is not an absolute URL"),
    ({"kind": "genericIssuer", "issuer": "https://i", "subject": {"prefix": "x"}}, "`subject` must be one of"),
    ({"kind": "githubAction"}, "missing field `owner`"),
    ({"kind": "genericIssuer", "issuer": "https://i"}, "missing field `subject`"),
])
def test_invalid_keyless_entries(entry, message):
    with pytest.raises(verification.ConfigError, match=message.replace("(", r"\(").replace("`", ".")):
        verification.parse_verification({"apiVersion": "v1", "allOf": [entry]})


# --- modules in a registry -------------------------------------------------------------------------

GITHUB_ENTRY = {"kind": "githubAction", "owner": "kubewarden"}
ISSUER_ENTRY = {"kind": "genericIssuer", "issuer": "https://token.actions.githubusercontent.com",
                "subject": {"urlPrefix": "https://github.com/kubewarden/"}}
MISSING_GITHUB = ("Image verification failed: missing signatures\nThe following constraints were not satisfied:\n"
                  "kind: githubAction\nowner: kubewarden\nrepo: null\nannotations: null\n")


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    """A registry whose modules carry keyless signatures, good and bad, and the trust root to check them."""
    directory = tmp_path_factory.mktemp("keyless")
    registry = start_registry(directory / "registry")
    sources = sources_file(directory, {"insecure_sources": [registry.host]})
    trust = TRUSTED.write_trust_root(directory / "trust.json")

    def push(repository: str, *signers: Signer) -> None:
        result = kwserver("push", str(DIST / "pod-privileged.wasm"), registry.ref(f"{repository}:v1"),
                          "--sources-path", str(sources), cwd=directory)
        assert result.returncode == 0, result.stderr
        cosign_sign_keyless(registry, repository, result.stdout.strip().split("@")[1], TRUSTED, list(signers))

    push("keyless/good", github("kubewarden/pod-privileged-policy"))
    push("keyless/another-identity", github("someone-else/pod-privileged-policy"))
    push("keyless/another-ca", github("kubewarden/pod-privileged-policy", sigstore=OTHER))
    push("keyless/expired", github("kubewarden/pod-privileged-policy",
                                   integrated_time=NOW + datetime.timedelta(hours=2)))
    push("keyless/unknown-log", github("kubewarden/pod-privileged-policy", log_key=OTHER.rekor_key))
    push("keyless/tampered", github("kubewarden/pod-privileged-policy", tamper_payload=True))
    push("keyless/wrong-issuer", Signer("https://github.com/kubewarden/pod-privileged-policy/.github/workflows/"
                                        "release.yml@refs/heads/main", "https://accounts.google.com",
                                        github_repository="kubewarden/pod-privileged-policy"))
    yield registry, sources, trust
    registry.stop()


def config_file(directory, doc) -> str:
    path = directory / "verification.yml"
    path.write_text(yaml.safe_dump({"apiVersion": "v1", **doc}))
    return str(path)


def kwserver_check(tmp_path, registry, sources, verification_path, trust, modules):
    policies = tmp_path / "policies.yml"
    policies.write_text(yaml.safe_dump({name: {"module": registry.ref(ref)} for name, ref in modules.items()}))
    return kwserver("check", "--policies", str(policies), "--sources-path", str(sources), "--verification-path",
                    verification_path, "--sigstore-trust-config", str(trust), cwd=tmp_path,
                    env={"KWSERVER_COMPILE_CACHE_DIR": str(tmp_path / "cache")})


@needs_registry
def test_keyless_entries_checked_at_load(signed, tmp_path):
    registry, sources, trust = signed
    verification_path = config_file(tmp_path, {"allOf": [GITHUB_ENTRY], "anyOf": {"signatures": [ISSUER_ENTRY]}})
    result = kwserver_check(tmp_path, registry, sources, verification_path, trust, {
        "good": "keyless/good:v1", "another-identity": "keyless/another-identity:v1",
        "another-ca": "keyless/another-ca:v1", "expired": "keyless/expired:v1",
        "unknown-log": "keyless/unknown-log:v1", "tampered": "keyless/tampered:v1",
        "wrong-issuer": "keyless/wrong-issuer:v1"})
    assert result.returncode == 1
    out = result.stdout
    assert "good: ok" in out.splitlines()
    # Another identity: the reference's message, exactly.
    assert f"another-identity: ERROR: bootstrap failure: another-identity: Policy 'another-identity' cannot be " \
           f"verified: {MISSING_GITHUB}" in out
    assert "Policy 'wrong-issuer' cannot be verified: " + MISSING_GITHUB in out
    for name, reason in [("another-ca", "does not chain to a Fulcio CA of the trust root"),
                         ("expired", "the certificate was not valid when the signature was logged"),
                         ("unknown-log", "which is not a Rekor log of the trust root"),
                         ("tampered", "the Rekor entry is for another payload")]:
        assert f"Policy '{name}' cannot be verified: {MISSING_GITHUB}Keyless signatures that could not be " \
               f"trusted:\n- sha256:" in out, name
        section = out[out.index(f"Policy '{name}' cannot be verified"):]
        assert reason in section.split("\n- ", 1)[1].split("\n", 1)[0], name


@needs_registry
@pytest.mark.parametrize("content,message", [
    ("{", "is not valid JSON"),
    (json.dumps(TRUSTED.trusted_root(authorities=False)), "it has no Fulcio certificate authority"),
])
def test_an_unusable_trust_root_is_each_keyless_policys_error(signed, tmp_path, content, message):
    registry, sources, _ = signed
    trust = tmp_path / "broken-trust.json"
    trust.write_text(content)
    result = kwserver_check(tmp_path, registry, sources, config_file(tmp_path, {"allOf": [GITHUB_ENTRY]}), trust,
                            {"one": "keyless/good:v1", "two": "keyless/expired:v1"})
    for name in ("one", "two"):
        assert f"Policy '{name}' cannot be verified: the Sigstore trust root {trust} " in result.stdout
    assert result.stdout.count(message) == 2


@needs_registry
def test_kwserver_verify_and_run_with_keyless_entries(signed, tmp_path):
    registry, sources, trust = signed
    verification_path = config_file(tmp_path, {"allOf": [ISSUER_ENTRY]})
    common = ("--verification-path", verification_path, "--sources-path", str(sources),
              "--sigstore-trust-config", str(trust))
    ok = kwserver("verify", registry.ref("keyless/good:v1"), *common, cwd=tmp_path)
    assert ok.returncode == 0 and ok.stdout.startswith(f"verified {registry.ref('keyless/good:v1')}: sha256:")
    bad = kwserver("verify", registry.ref("keyless/another-identity:v1"), *common, cwd=tmp_path)
    assert bad.returncode == 1 and "subject: !urlPrefix https://github.com/kubewarden/" in bad.stderr
    # Without the test trust root, the shipped public-good one cannot trust these certificates.
    public = kwserver("verify", registry.ref("keyless/good:v1"), *common[:4], cwd=tmp_path)
    assert public.returncode == 1 and "Keyless signatures that could not be trusted" in public.stderr
    assert str(sigstore_trust.SHIPPED_TRUSTED_ROOT) in public.stderr

    request = tmp_path / "request.json"
    request.write_text(json.dumps(fixture("pod-privileged-policy/test_data/privileged_container.json")))
    run = kwserver("run", "--request-path", str(request), "--verification-config-path", verification_path,
                   "--sources-path", str(sources), "--sigstore-trust-config", str(trust),
                   registry.ref("keyless/good:v1"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["allowed"] is False  # verified, then evaluated: a privileged pod is rejected
    refused = kwserver("run", "--request-path", str(request), "--verification-config-path", verification_path,
                       "--sources-path", str(sources), "--sigstore-trust-config", str(trust),
                       registry.ref("keyless/another-identity:v1"), cwd=tmp_path)
    assert refused.returncode != 0 and "cannot be verified: Image verification failed" in refused.stderr



@needs_registry
def test_kwctl_verification_flags_of_run(signed, tmp_path):
    registry, sources, trust = signed
    request = tmp_path / "request.json"
    request.write_text(json.dumps(fixture("pod-privileged-policy/test_data/privileged_container.json")))

    def run(reference: str, *flags: str):
        return kwserver("run", "--request-path", str(request), "--sources-path", str(sources),
                        "--sigstore-trust-config", str(trust), *flags, registry.ref(reference), cwd=tmp_path)

    assert run("keyless/good:v1", "--github-owner", "kubewarden", "--github-repo",
               "pod-privileged-policy").returncode == 0
    subject = github("kubewarden/pod-privileged-policy").subject
    assert run("keyless/good:v1", "--cert-email", subject, "--cert-oidc-issuer",
               "https://token.actions.githubusercontent.com").returncode == 0
    refused = run("keyless/another-identity:v1", "--github-owner", "kubewarden")
    assert refused.returncode != 0 and MISSING_GITHUB in refused.stderr
    for flags, message in [
        (("--github-repo", "x"), "Intending to verify GitHub actions signature, but the repository owner is missing."),
        (("--cert-email", "me@example.com"), "Intending to verify OIDC issuer, but no email or issuer were provided"),
        (("-a", "env=prod"), "Intending to verify annotations, but no verification keys, OIDC issuer or GitHub owner"),
        (("--github-owner", "kubewarden", "--verification-config-path", "v.yml"),
         "verification-config-path cannot be used in conjunction with other verification flags"),
    ]:
        result = run("keyless/good:v1", *flags)
        assert result.returncode != 0 and message in result.stderr, (flags, result.stderr)

# --- the ten-policy example, signed keyless --------------------------------------------------------

EXAMPLE_VERIFICATION = {"apiVersion": "v1", "allOf": [GITHUB_ENTRY],
                        "anyOf": {"minimumMatches": 1, "signatures": [ISSUER_ENTRY]}}


@needs_registry
@pytest.mark.integration
def test_the_ten_policy_example_signed_keyless_starts_and_another_identity_is_an_init_error(
        run_server, tmp_path):
    import requests

    from tests.support.registries import LIBRARY_REPOSITORY, push_library

    registry = start_registry(tmp_path / "example-registry")
    try:
        sources = sources_file(tmp_path, {"insecure_sources": [registry.host]})
        references = push_library(registry, DIST, sources, tmp_path)

        def sign(stem: str, signer: Signer) -> None:
            repository = f"{LIBRARY_REPOSITORY}/{stem}"
            manifest = requests.get(f"http://{registry.host}/v2/{repository}/manifests/v1.0.0", timeout=10,
                                    headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
            digest = "sha256:" + hashlib.sha256(manifest.content).hexdigest()
            cosign_sign_keyless(registry, repository, digest, TRUSTED, [signer])

        for stem in references:
            sign(stem, github(f"kubewarden/{stem}-policy"))
        example = yaml.safe_load((REPO / "deploy" / "examples" / "policies-registry.yml").read_text())
        policies = {name: {**entry, "module": entry["module"].replace("localhost:5000", registry.host)}
                    for name, entry in example.items()}
        env = {"KUBEWARDEN_SOURCES_PATH": str(sources),
               "KUBEWARDEN_VERIFICATION_CONFIG_PATH": config_file(tmp_path, EXAMPLE_VERIFICATION),
               "KUBEWARDEN_SIGSTORE_TRUST_CONFIG_PATH": str(TRUSTED.write_trust_root(tmp_path / "trust.json"))}
        review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                  "request": fixture("pod-privileged-policy/test_data/privileged_container.json")}
        # Without --continue-on-errors: it starts only when every module's signature holds.
        server = run_server(policies, env={**env, "KUBEWARDEN_POLICIES_DOWNLOAD_DIR": str(tmp_path / "dl1")})
        for name in policies:
            reply = server.post(f"/validate/{name}", review)
            assert reply.status_code == 200 and reply.json()["response"]["uid"] == review["request"]["uid"], name

        # The module of one policy is now signed by another identity only: that policy's init error.
        sign("pod-privileged", github("someone-else/pod-privileged-policy"))
        bad = next(name for name, entry in example.items() if "/pod-privileged:" in entry["module"])
        server = run_server(policies, args=["--continue-on-errors"],
                            env={**env, "KUBEWARDEN_POLICIES_DOWNLOAD_DIR": str(tmp_path / "dl2")})
        response = server.post(f"/validate/{bad}", review).json()["response"]
        assert response["allowed"] is False and response["status"]["code"] == 500
        assert f"Policy '{bad}' cannot be verified: {MISSING_GITHUB}" in response["status"]["message"]
        for name in (name for name in policies if name != bad):
            assert (server.post(f"/validate/{name}", review).json()["response"].get("status") or {}).get("code") != 500
    finally:
        registry.stop()


# --- refreshing the shipped trust root through TUF ---------------------------------------------------

def tuf_repository(directory, trusted_root: bytes, *, served: bytes | None = None) -> bytes:
    """A TUF repository (one key for every role) whose target `trusted_root.json` is `trusted_root`; the
    file served may differ (`served`). Returns the root metadata a client starts from."""
    from securesystemslib.signer import CryptoSigner
    from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp

    signer = CryptoSigner.generate_ecdsa()
    expires = NOW + datetime.timedelta(days=7)
    root = Root(expires=expires, consistent_snapshot=False)
    for role in ("root", "targets", "snapshot", "timestamp"):
        root.add_key(signer.public_key, role)
    targets = Targets(expires=expires)
    targets.targets["trusted_root.json"] = TargetFile.from_data("trusted_root.json", trusted_root, ["sha256"])
    snapshot, timestamp = Snapshot(expires=expires), Timestamp(expires=expires)
    snapshot.meta["targets.json"] = MetaFile(version=1)
    timestamp.snapshot_meta = MetaFile(version=1)
    (directory / "targets").mkdir(parents=True)
    for name, signed in (("1.root", root), ("targets", targets), ("snapshot", snapshot), ("timestamp", timestamp)):
        metadata = Metadata(signed)
        metadata.sign(signer)
        metadata.to_file(str(directory / f"{name}.json"))
    (directory / "targets" / "trusted_root.json").write_bytes(trusted_root if served is None else served)
    return (directory / "1.root.json").read_bytes()


@pytest.fixture
def web_root(tmp_path):
    """A plain HTTP server on loopback for the files under the returned directory."""
    import functools
    import http.server
    import threading

    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("tampered", [False, True])
def test_the_trust_root_is_refreshed_through_tuf(web_root, tmp_path, tampered):
    directory, url = web_root
    fresh = json.dumps(TRUSTED.trusted_root()).encode()
    bootstrap = tmp_path / "tuf-root.json"
    bootstrap.write_bytes(tuf_repository(directory / "repo", fresh, served=fresh + b" " if tampered else None))
    output = tmp_path / "trusted_root.json"
    output.write_text("{}")
    result = kwserver("sigstore-trust-root", "--refresh", "--tuf-url", f"{url}/repo", "--tuf-root", str(bootstrap),
                      "--output", str(output), cwd=tmp_path)
    if tampered:  # TUF refuses a target whose hash is not the signed one; the old file stays
        assert result.returncode == 1 and f"TUF update from {url}/repo failed" in result.stderr
        assert output.read_text() == "{}"
        return
    assert result.returncode == 0, result.stderr
    assert output.read_bytes() == fresh
    assert f"Rekor log https://rekor.trusted.test [2020-01-01 .. now]: {TRUSTED.rekor_log_id}" in result.stdout
    shown = kwserver("sigstore-trust-root", "--sigstore-trust-config", str(output), cwd=tmp_path)
    assert shown.returncode == 0 and shown.stdout == result.stdout


def test_an_unusable_trust_root_is_a_warning_at_start(tmp_path):
    trust = tmp_path / "trust.json"
    trust.write_text("{")
    policies = tmp_path / "policies.yml"
    policies.write_text(yaml.safe_dump({"p": {"module": str(DIST / "echo.wasm")}}))
    result = kwserver("check", "--policies", str(policies), "--sigstore-trust-config", str(trust), cwd=tmp_path,
                      env={"KWSERVER_COMPILE_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 0 and "p: ok" in result.stdout
    assert f"the Sigstore trust root {trust} is not valid JSON" in result.stderr
    assert "keyless signatures cannot be verified" in result.stderr
