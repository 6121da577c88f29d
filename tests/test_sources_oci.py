"""OCI registries: `kwserver push` / `kwserver pull` / `kwserver check` against Debian's docker-registry.

Registries are started by the tests on free loopback ports: plain HTTP (an insecure source), TLS
with a CA made for the test (a source authority), htpasswd basic auth, and token auth with a token
service of the test's own.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal

import pytest
import requests
import yaml

from tests.support.paths import REPO, upstream_request
from tests.support.registries import (
    ForwardProxy,
    TokenServer,
    blob_path,
    docker_config,
    push_library,
    raw_push,
    sources_file,
    start_registry,
)
from tests.support.server import check_config, free_port, kwserver, wait_for

pytestmark = pytest.mark.skipif(not shutil.which("docker-registry"), reason="needs Debian's docker-registry")

DIST = REPO / "policies" / "dist"
MODULE = DIST / "pod-privileged.wasm"
WASM_LAYER = "application/vnd.wasm.content.layer.v1+wasm"
WASM_CONFIG = "application/vnd.wasm.config.v1+json"


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    registry = start_registry(tmp_path_factory.mktemp("plain-registry"))
    yield registry
    registry.stop()


@pytest.fixture
def insecure(plain, tmp_path):
    """CLI arguments that make the plain registry an insecure source."""
    return ["--sources-path", str(sources_file(tmp_path, {"insecure_sources": [plain.host]}))]


def push(module, ref, *args, cwd):
    result = kwserver("push", str(module), ref, *args, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_push_writes_kubewardens_artifact_format_and_pull_gets_it_back(plain, insecure, tmp_path):
    immutable = push(MODULE, plain.ref("kubewarden/pod-privileged:v0.1.0"), *insecure, cwd=tmp_path)
    manifest_response = requests.get(f"http://{plain.host}/v2/kubewarden/pod-privileged/manifests/v0.1.0",
                                     headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}, timeout=10)
    manifest = manifest_response.json()
    assert immutable == f"{plain.host}/kubewarden/pod-privileged@sha256:" \
        + hashlib.sha256(manifest_response.content).hexdigest()
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["config"]["mediaType"] == WASM_CONFIG
    assert [layer["mediaType"] for layer in manifest["layers"]] == [WASM_LAYER]
    assert manifest["layers"][0]["digest"] == "sha256:" + hashlib.sha256(MODULE.read_bytes()).hexdigest()
    assert manifest["annotations"]["io.kubewarden.policy.title"] == "pod-privileged"

    result = kwserver("pull", plain.ref("kubewarden/pod-privileged:v0.1.0"), *insecure, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    stored = tmp_path / "registry" / plain.host / "kubewarden" / "pod-privileged:v0.1.0"
    assert stored.read_bytes() == MODULE.read_bytes()
    assert f"sha256:{hashlib.sha256(MODULE.read_bytes()).hexdigest()}" in result.stdout

    by_digest = kwserver("pull", f"registry://{immutable}", *insecure, cwd=tmp_path)
    assert by_digest.returncode == 0, by_digest.stderr
    digest = immutable.split("@")[1]
    assert (tmp_path / "registry" / plain.host / "kubewarden" / f"pod-privileged@{digest}").exists()


def test_artifacts_of_other_oci_clients_pull(plain, insecure, tmp_path):
    # What `oras push` writes for a module: its own config type, a Docker v2 manifest elsewhere.
    raw_push(plain, "others/oras", "v1", [(WASM_LAYER, MODULE.read_bytes())],
             config=("application/vnd.oci.empty.v1+json", b"{}"))
    raw_push(plain, "others/docker", "v1", [(WASM_LAYER, MODULE.read_bytes())],
             manifest_type="application/vnd.docker.distribution.manifest.v2+json")
    for ref in ("others/oras:v1", "others/docker:v1"):
        result = check_config(tmp_path, f"{plain.host}/{ref}", *insecure)  # bare reference: registry://
        assert result.returncode == 0, result.stdout + result.stderr


def test_latest_is_pulled_again_other_tags_are_reused(plain, insecure, tmp_path):
    push(DIST / "echo.wasm", plain.ref("reuse/p:latest"), *insecure, cwd=tmp_path)
    push(DIST / "echo.wasm", plain.ref("reuse/p:v1"), *insecure, cwd=tmp_path)
    for ref in ("reuse/p", "reuse/p:v1"):
        assert check_config(tmp_path, plain.ref(ref), *insecure).returncode == 0
    push(MODULE, plain.ref("reuse/p:latest"), *insecure, cwd=tmp_path)
    push(MODULE, plain.ref("reuse/p:v1"), *insecure, cwd=tmp_path)
    for ref in ("reuse/p", "reuse/p:v1"):
        assert check_config(tmp_path, plain.ref(ref), *insecure).returncode == 0
    store = tmp_path / "registry" / plain.host / "reuse"
    assert (store / "p:latest").read_bytes() == MODULE.read_bytes()
    assert (store / "p:v1").read_bytes() == (DIST / "echo.wasm").read_bytes()


def test_bad_artifacts_are_that_policys_init_error(plain, insecure, tmp_path):
    raw_push(plain, "bad/media-type", "v1", [("application/vnd.oci.image.layer.v1.tar+gzip", b"\0asm")])
    raw_push(plain, "bad/two-layers", "v1", [(WASM_LAYER, MODULE.read_bytes()), (WASM_LAYER, b"\0asm")])
    raw_push(plain, "bad/not-wasm", "v1", [(WASM_LAYER, b"#!/bin/sh\necho not wasm\n")])
    raw_push(plain, "bad/big", "v1", [(WASM_LAYER, b"\0asm\1\0\0\0" + bytes(2 * 1024 * 1024))])
    tampered = b"\0asm\1\0\0\0" + b"x" * 100
    raw_push(plain, "bad/tampered", "v1", [(WASM_LAYER, tampered)])
    path = blob_path(plain, "sha256:" + hashlib.sha256(tampered).hexdigest())
    path.write_bytes(b"\0asm\1\0\0\0" + b"y" * 100)
    cases = {
        "bad/media-type:v1": "its manifest must have one layer of media type " + WASM_LAYER,
        "bad/two-layers:v1": "its manifest must have one layer of media type",
        "bad/not-wasm:v1": "is not a WebAssembly module",
        "bad/big:v1": "more than the limit of 1048576 bytes",
        "bad/tampered:v1": "the layer's digest does not match the manifest",
        "bad/unknown-tag:v9": "manifest unknown",
    }
    config = tmp_path / "policies.yml"
    config.write_text(yaml.safe_dump({f"p{i}": {"module": plain.ref(ref)} for i, ref in enumerate(cases)}))
    result = kwserver("check", "--policies", str(config), *insecure, "--max-module-size-mib", "1", cwd=tmp_path,
                      env={"KWSERVER_COMPILE_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 1
    for i, (ref, message) in enumerate(cases.items()):
        line = next(line for line in result.stdout.splitlines() if line.startswith(f"p{i}: "))
        assert f"Error while downloading policy 'p{i}' from {plain.ref(ref)}: " in line, line
        assert message in line, line


def test_unknown_host_and_closed_port(tmp_path):
    closed = check_config(tmp_path, f"registry://127.0.0.1:{free_port()}/x/y:v1")
    assert closed.returncode == 1 and "cannot connect to https://127.0.0.1:" in closed.stdout
    # A name that fails to resolve without asking any DNS server (a label longer than 63 bytes).
    host = "a" * 64 + ".example"
    unknown = check_config(tmp_path, f"registry://{host}/x/y:v1")
    assert unknown.returncode == 1 and f"cannot connect to https://{host}" in unknown.stdout


def test_a_registry_with_tls_and_a_source_authority(tmp_path):
    registry = start_registry(tmp_path / "tls-registry", tls=True)
    try:
        without_ca = kwserver("push", str(MODULE), registry.ref("tls/p:v1"), cwd=tmp_path)
        assert without_ca.returncode == 1 and "certificate verify failed" in without_ca.stderr
        sources = sources_file(tmp_path, {"source_authorities": {
            registry.host: [{"type": "Path", "path": str(registry.tls.cert)}]}})
        push(MODULE, registry.ref("tls/p:v1"), "--sources-path", str(sources), cwd=tmp_path)
        result = check_config(tmp_path, registry.ref("tls/p:v1"), "--sources-path", str(sources))
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        registry.stop()


def test_htpasswd_basic_auth_with_docker_config(tmp_path):
    registry = start_registry(tmp_path / "auth-registry", users={"alice": "s3cret"})
    sources = ["--sources-path", str(sources_file(tmp_path, {"insecure_sources": [registry.host]}))]
    good = docker_config(tmp_path / "good", {registry.host: ("alice", "s3cret")})
    bad = docker_config(tmp_path / "bad", {registry.host: ("alice", "wrong")})
    try:
        anonymous = kwserver("push", str(MODULE), registry.ref("auth/p:v1"), *sources, cwd=tmp_path)
        assert anonymous.returncode == 1 and "requires authentication" in anonymous.stderr
        push(MODULE, registry.ref("auth/p:v1"), *sources, "--docker-config-json-path", str(good), cwd=tmp_path)
        wrong = check_config(tmp_path, registry.ref("auth/p:v1"), *sources, "--docker-config-json-path", str(bad))
        assert wrong.returncode == 1
        assert f"{registry.host} refused the credentials of user `alice`" in wrong.stdout
        ok = kwserver("pull", registry.ref("auth/p:v1"), *sources, cwd=tmp_path,
                      env={"DOCKER_CONFIG": str(good)})
        assert ok.returncode == 0, ok.stderr
    finally:
        registry.stop()


def test_bearer_token_flow(tmp_path):
    tokens = TokenServer(tmp_path / "token", {"bob": "hunter2"})
    registry = start_registry(tmp_path / "token-registry", token=tokens)
    sources = ["--sources-path", str(sources_file(tmp_path, {"insecure_sources": [registry.host]}))]
    good = docker_config(tmp_path / "good", {registry.host: ("bob", "hunter2")})
    try:
        anonymous = kwserver("push", str(MODULE), registry.ref("tok/p:v1"), *sources, cwd=tmp_path)
        assert anonymous.returncode == 1, anonymous.stdout
        push(MODULE, registry.ref("tok/p:v1"), *sources, "--docker-config-json-path", str(good), cwd=tmp_path)
        scopes = {scope for r in tokens.requests for scope in r["query"].get("scope", [])}
        assert any(s.startswith("repository:tok/p:") and "push" in s.split(":")[2].split(",") for s in scopes), scopes
        result = check_config(tmp_path, registry.ref("tok/p:v1"), *sources, "--docker-config-json-path", str(good))
        assert result.returncode == 0, result.stdout + result.stderr
        assert any(r["query"].get("service") == [tokens.service] and r["authorization"] for r in tokens.requests)
    finally:
        registry.stop()
        tokens.stop()


def test_invalid_docker_config_is_refused(tmp_path):
    (tmp_path / "dc").mkdir()
    (tmp_path / "dc" / "config.json").write_text("{not json")
    result = check_config(tmp_path, str(MODULE), "--docker-config-json-path", str(tmp_path / "dc"))
    assert result.returncode == 1 and "is not valid JSON" in result.stderr


def test_server_downloads_concurrently_and_reload_pulls_only_what_changed(run_server, tmp_path):
    """A server from registry references; a reload pulls only new references, and a registry that is
    down during a reload leaves the running policies in service."""
    registry = start_registry(tmp_path / "reload-registry")
    try:
        for name in ("echo", "pod-privileged", "safe-labels"):
            push(DIST / f"{name}.wasm", registry.ref(f"lib/{name}:v1"),
                 "--sources-path", str(sources_file(tmp_path, {"insecure_sources": [registry.host]})), cwd=tmp_path)
        push(DIST / "echo.wasm", registry.ref("lib/echo:latest"), "--sources-path",
             str(tmp_path / "sources.yml"), cwd=tmp_path)
        policies = {"echo": {"module": registry.ref("lib/echo:latest")},
                    "pod-privileged": {"module": registry.ref("lib/pod-privileged:v1")}}
        env = {"KUBEWARDEN_SOURCES_PATH": str(tmp_path / "sources.yml"),
               "KUBEWARDEN_POLICIES_DOWNLOAD_DIR": str(tmp_path / "downloads")}
        server = run_server(policies, env=env)
        assert "over 2 unique modules (2 downloaded" in server.log()
        review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                  "request": upstream_request("pod-privileged-policy/test_data/privileged_container.json")}
        assert server.post("/validate/pod-privileged", review).json()["response"]["allowed"] is False

        config = server.log_path.parent / "policies.yml"
        config.write_text(yaml.safe_dump({**policies, "safe-labels": {"module": registry.ref("lib/safe-labels:v1")}}))
        os.kill(server.process.pid, signal.SIGHUP)
        wait_for(lambda: server.log().count("reloaded") == 1)
        # pod-privileged:v1 came from the download directory; latest and the new reference were pulled.
        assert "over 3 unique modules (2 downloaded" in server.log()
        wait_for(lambda: server.post("/validate/safe-labels", review).status_code == 200)

        registry.stop()
        os.kill(server.process.pid, signal.SIGHUP)
        wait_for(lambda: server.log().count("reloaded") == 2)
        assert "download failed, the running module is kept" not in server.log()  # warnings go to the log line
        assert "keeping the module in service" in server.log()
        for policy in ("echo", "pod-privileged", "safe-labels"):
            assert server.post(f"/validate/{policy}", review).status_code == 200, policy

        config.write_text(yaml.safe_dump({**policies, "new": {"module": registry.ref("lib/new:v1")}}))
        os.kill(server.process.pid, signal.SIGHUP)
        wait_for(lambda: "reload refused" in server.log())
        assert server.post("/validate/safe-labels", review).status_code == 200
        assert server.post("/validate/new", review).status_code == 404
    finally:
        registry.stop()


def test_the_ten_policy_example_by_registry_reference(run_server, tmp_path):
    example = REPO / "deploy" / "examples"
    by_registry = yaml.safe_load((example / "policies-registry.yml").read_text())
    by_file = yaml.safe_load((example / "policies.yml").read_text())
    # The same configuration, only the modules are referred to by registry reference.
    assert {name: {**entry, "module": None} for name, entry in by_registry.items()} == \
        {name: {**entry, "module": None} for name, entry in by_file.items()}
    for name, entry in by_file.items():
        stem = entry["module"].rsplit("/", 1)[1].removesuffix(".wasm")
        assert by_registry[name]["module"] == f"registry://localhost:5000/kubewarden/policies/{stem}:v1.0.0"

    registry = start_registry(tmp_path / "example-registry")
    try:
        sources = sources_file(tmp_path, {"insecure_sources": [registry.host]})
        push_library(registry, DIST, sources, tmp_path)
        policies = {name: {**entry, "module": entry["module"].replace("localhost:5000", registry.host)}
                    for name, entry in by_registry.items()}
        server = run_server(policies, env={"KUBEWARDEN_SOURCES_PATH": str(sources),
                                           "KUBEWARDEN_POLICIES_DOWNLOAD_DIR": str(tmp_path / "downloads")})
        assert "over 8 unique modules (8 downloaded" in server.log()
        review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                  "request": upstream_request("pod-privileged-policy/test_data/privileged_container.json")}
        for name in policies:
            reply = server.post(f"/validate/{name}", review)
            assert reply.status_code == 200 and reply.json()["response"]["uid"] == review["request"]["uid"], name
        # Monitor mode (the chart's default for cluster-wide policies): evaluated, and accepted; the privileged
        # Pod policy is in protect mode.
        assert server.post("/validate/clusterwide-no-host-namespace-sharing", review).json()["response"][
            "allowed"] is True
        assert server.post("/validate/clusterwide-no-privileged-pod", review).json()["response"]["allowed"] is False
    finally:
        registry.stop()


def test_proxies_from_the_environment_are_used_except_for_no_proxy(plain, insecure, tmp_path):
    proxy = ForwardProxy()
    try:
        push(MODULE, plain.ref("proxied/p:v1"), *insecure, cwd=tmp_path)
        env = {"HTTP_PROXY": proxy.url, "HTTPS_PROXY": proxy.url, "NO_PROXY": ""}
        through = kwserver("pull", plain.ref("proxied/p:v1"), *insecure, cwd=tmp_path, env=env)
        assert through.returncode == 0, through.stderr
        assert f"CONNECT {plain.host}" in proxy.forwarded  # HTTPS first (refused by this proxy), then HTTP
        assert f"GET http://{plain.host}/v2/proxied/p/manifests/v1" in proxy.forwarded
        proxy.forwarded.clear()
        direct = kwserver("pull", plain.ref("proxied/p:v1"), *insecure, cwd=tmp_path,
                          env={**env, "NO_PROXY": "127.0.0.1"})
        assert direct.returncode == 0, direct.stderr
        assert proxy.forwarded == []
    finally:
        proxy.stop()
