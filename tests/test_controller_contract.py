"""kwserver under the Kubewarden controller's contract: the policy-server Deployment it builds.

Checked against the controller at kubewarden/kubewarden-controller HEAD 3460bb71 (1.36.0-beta.1):
internal/controller/policyserver_controller_deployment.go, ..._service.go, ..._configmap.go,
internal/certs/certs.go, api/policies/v1/policyserver_types.go, internal/constants/constants.go.

The pod is laid out in a directory as the controller mounts it: certificates in /pki (the key as
controllers up to v1.32 wrote it: an EC key, SEC1 DER, under `RSA PRIVATE KEY`), policies.yml in
/config, the policy store emptyDir in /tmp, sources.yml in /sources, verification.yml in
/verification, Docker's config.json in /home/kubewarden/.docker, the sigstore trust root in
/sigstore-trust and the mTLS CAs in /ca and /client-ca. Everything but the emptyDir is read-only
(readOnlyRootFilesystem): chmod makes it so for an unprivileged user, and when the tests run as root
(which chmod does not stop) the server runs in a mount namespace of its own where those directories
are read-only bind mounts, and as the image's non-root user with every capability dropped and no
privilege escalation (the controller's default securityContext), through setpriv. Where the tests
can make a cgroup, the pod's `spec.limits` (1 CPU, 512 MiB) are a real cgroup around it.
The server gets exactly the controller's variables, with the paths rebased into that directory and
custom ports (spec.webhookPort, spec.readinessProbePort), and pulls its modules from a real TLS
registry with basic auth, checking cosign signatures. The container declares no ports and the
controller knows two: with its hostNetwork option every port the server binds is a port of the node.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec

from kwserver.sources.sigstore_trust import SHIPPED_TRUSTED_ROOT
from tests.support.certs import as_controller_v132_wrote_it, make_ca, make_cert
from tests.support.cgroups import Cgroup
from tests.support.paths import FIXTURES, SERVER_FIXTURES, TEST_POLICIES, as_review, load_json
from tests.support.pod import DEPLOYMENTS_NAMESPACE, Pod, privileged_review, read_only
from tests.support.registries import cosign_sign, docker_config, public_pem, start_registry
from tests.support.server import free_port, stop_process

pytestmark = pytest.mark.skipif(not shutil.which("docker-registry"), reason="needs Debian's docker-registry")

SIGNER = ec.generate_private_key(ec.SECP256R1())
READ_ONLY_MOUNTS = ("pki", "config", "sources", "verification", "home", "sigstore-trust", "ca", "client-ca")
# What a PolicyServer's spec.env adds (the controller appends it to its own variables) and what the
# controller sets with tracing and metrics on and the OTel sidecar injected.
SPEC_ENV = {"KUBEWARDEN_LOG_LEVEL": "info"}
# spec.limits, as a cgroup where the tests can make one; else spec.env sets the workers.
LIMITS = {"cpu_quota_us": 100_000, "memory": 512 * 1024 * 1024}
IMAGE_USER = 65532
TELEMETRY_ENV = {"KUBEWARDEN_ENABLE_METRICS": "true", "KUBEWARDEN_LOG_FMT": "otlp",
                 "OTEL_EXPORTER_OTLP_ENDPOINT": "http://localhost:4317"}


def _push(module: Path, reference: str, sources: Path, docker: Path, cwd: Path) -> str:
    result = subprocess.run([sys.executable, "-m", "kwserver", "push", str(module), reference,
                             "--sources-path", str(sources), "--docker-config-json-path", str(docker)],
                            capture_output=True, text=True, cwd=cwd, timeout=60,
                            env={k: v for k, v in os.environ.items() if not k.startswith(("KUBEWARDEN_", "KWSERVER_"))})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split("@")[1]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for mount in READ_ONLY_MOUNTS
            for p in (root / mount).rglob("*") if p.is_file()}


def _mount_namespaces() -> bool:
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


def _security_context() -> tuple[list[str], bool]:
    """The controller's securityContext as a command prefix: no privilege escalation, every capability
    dropped, and for tests run as root the image's user (runAsNonRoot) when that user can run this
    Python (it re-executes itself for downloads); and whether the server then runs as non-root."""
    if not shutil.which("setpriv"):
        return [], os.getuid() != 0
    if os.getuid() != 0:
        return ["setpriv", "--no-new-privs"], True
    drop = ["setpriv", "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all"]
    as_user = [*drop, f"--reuid={IMAGE_USER}", f"--regid={IMAGE_USER}", "--clear-groups"]
    nested = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import kwserver'], check=True)"
    if subprocess.run([*as_user, sys.executable, "-c", nested], capture_output=True).returncode == 0:
        return as_user, True
    return drop, False


def _with_read_only_mounts(command: list[str], mounts: list[Path]) -> list[str]:
    """Run `command` with `mounts` read-only even for root: bind mounts in a private mount namespace."""
    if os.getuid() != 0:
        return command
    remounts = [f"mount --bind {shlex.quote(str(m))} {shlex.quote(str(m))} && "
                f"mount -o remount,bind,ro {shlex.quote(str(m))}" for m in mounts]
    return ["unshare", "-m", "sh", "-c", " && ".join(remounts) + ' && exec "$@"', "sh", *command]


@pytest.fixture(scope="module")
def pod() -> Iterator[Pod]:
    # Not pytest's tmp_path: its base is private to root, and the server may run as another user.
    if os.getuid() == 0 and not _mount_namespaces():
        pytest.skip("running as root without mount namespaces (unshare -m): read-only mounts cannot be made")
    root = Path(tempfile.mkdtemp(prefix="kwserver-pod-"))
    root.chmod(0o755)
    work = root / "test-side"  # the registry, keys and the client's certificate: not part of the pod
    work.mkdir()
    registry = start_registry(work / "registry", tls=True, users={"puller": "s3cret"})
    process = None
    cgroup = Cgroup.make()
    try:
        # The controller's sources ConfigMap holds sources.yml as JSON, CAs inline (type Data).
        sources_doc = {"insecure_sources": [], "source_authorities": {
            registry.host: [{"type": "Data", "data": registry.tls.cert.read_text()}]}}
        (root / "sources").mkdir()
        (root / "sources" / "sources.yml").write_text(json.dumps(sources_doc))
        docker = docker_config(root / "home" / "kubewarden" / ".docker", {registry.host: ("puller", "s3cret")})

        references = {}
        for name in ("pod-privileged", "raw-mutation"):
            reference = registry.ref(f"kubewarden/policies/{name}:v1.0.0")
            digest = _push(TEST_POLICIES / f"{name}.wasm", reference, root / "sources" / "sources.yml", docker, work)
            cosign_sign(registry, f"kubewarden/policies/{name}", digest, [SIGNER])
            references[name] = reference

        (root / "verification").mkdir()
        (root / "verification" / "verification.yml").write_text(json.dumps(
            {"apiVersion": "v1", "allOf": [{"kind": "pubKey", "key": public_pem(SIGNER)}]}))
        (root / "sigstore-trust").mkdir()
        (root / "sigstore-trust" / "sigstore-trust-config.json").write_text(json.dumps({  # as the controller's
            "mediaType": "application/vnd.dev.sigstore.clienttrustconfig.v0.1+json",
            "trustedRoot": json.loads(SHIPPED_TRUSTED_ROOT.read_text())}))

        # The ConfigMap's policies.yml, as the controller writes it (JSON, with namespacedName and
        # hostCapabilities).
        raw_settings = {"forbiddenResources": ["banana", "carrot"], "defaultResource": "hay"}
        policies = {
            "clusterwide-pod-privileged": {
                "namespacedName": {"Namespace": "", "Name": "pod-privileged"},
                "module": references["pod-privileged"], "policyMode": "protect", "settings": {},
                "hostCapabilities": ["*"]},
            "namespaced-default-raw-mutation": {
                "namespacedName": {"Namespace": "default", "Name": "raw-mutation"},
                "module": references["raw-mutation"], "policyMode": "protect", "allowedToMutate": True,
                "settings": raw_settings, "hostCapabilities": []},
            "clusterwide-group": {
                "namespacedName": {"Namespace": "", "Name": "group"}, "policyMode": "protect",
                "policies": {"pod_privileged": {"module": references["pod-privileged"], "hostCapabilities": []}},
                "expression": "pod_privileged()", "message": "The group policy rejected your request"},
        }
        (root / "config").mkdir()
        (root / "config" / "policies.yml").write_text(json.dumps(policies))

        (root / "pki").mkdir()
        kubewarden_ca = make_ca(work, "kubewarden-ca")
        server = make_cert(work, "policy-server", kubewarden_ca)
        shutil.copy(server.cert, root / "pki" / "tls.crt")
        (root / "pki" / "tls.key").write_bytes(as_controller_v132_wrote_it(server.key.read_bytes()))
        client_ca = make_ca(work, "client-ca")
        client = make_cert(work, "api-server", client_ca)
        (root / "ca").mkdir()
        shutil.copy(kubewarden_ca.cert, root / "ca" / "ca.crt")
        (root / "client-ca").mkdir()
        shutil.copy(client_ca.cert, root / "client-ca" / "client-ca.crt")

        store = root / "tmp"  # the policy-store emptyDir: world-writable, as the kubelet makes it
        store.mkdir()
        store.chmod(0o1777)
        for mount in READ_ONLY_MOUNTS:
            read_only(root / mount)
        work.chmod(0o755)  # the client's files stay the test's; the pod never reads them
        before = _snapshot(root)

        port, readiness = free_port(), free_port()
        env = {
            # The controller's own variables (getPolicyServerContainer and its configure* helpers).
            "KUBEWARDEN_CERT_FILE": str(root / "pki" / "tls.crt"),
            "KUBEWARDEN_KEY_FILE": str(root / "pki" / "tls.key"),
            "KUBEWARDEN_PORT": str(port),
            "KUBEWARDEN_READINESS_PROBE_PORT": str(readiness),
            "KUBEWARDEN_POLICIES_DOWNLOAD_DIR": str(store),
            "KUBEWARDEN_POLICIES": str(root / "config" / "policies.yml"),
            "KUBEWARDEN_SIGSTORE_CACHE_DIR": str(store / "sigstore-data"),
            "KUBEWARDEN_VERIFICATION_CONFIG_PATH": str(root / "verification" / "verification.yml"),
            "KUBEWARDEN_SIGSTORE_TRUST_CONFIG_PATH": str(root / "sigstore-trust" / "sigstore-trust-config.json"),
            "KUBEWARDEN_DOCKER_CONFIG_JSON_PATH": str(root / "home" / "kubewarden" / ".docker"),
            "KUBEWARDEN_SOURCES_PATH": str(root / "sources" / "sources.yml"),
            "KUBEWARDEN_CLIENT_CA_FILE": f"{root / 'ca' / 'ca.crt'},{root / 'client-ca' / 'client-ca.crt'}",
            "KUBEWARDEN_ALWAYS_ACCEPT_ADMISSION_REVIEWS_ON_NAMESPACE": DEPLOYMENTS_NAMESPACE,
            **TELEMETRY_ENV,
            **SPEC_ENV,
            **({} if cgroup else {"KUBEWARDEN_WORKERS": "2"}),
            # Not the controller's: a shared test host needs loopback (the controller's 0.0.0.0 is the
            # pod's or, with hostNetwork, the node's addresses).
            "KUBEWARDEN_BIND_ADDRESS": "127.0.0.1",
            # The image's environment: a home directory on the read-only root filesystem; /tmp is the
            # emptyDir, which TMPDIR stands for here.
            "HOME": str(root / "home"),
            "TMPDIR": str(store),
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        }
        log = work / "server.log"
        with open(log, "wb") as out:
            # The image's entrypoint and command: the controller gives neither args nor command.
            security, non_root = _security_context()
            command = _with_read_only_mounts([*security, sys.executable, "-m", "kwserver", "serve"],
                                             [root / mount for mount in READ_ONLY_MOUNTS])
            if cgroup:
                cgroup.set_cpu(LIMITS["cpu_quota_us"])
                cgroup.set_memory(LIMITS["memory"])
                command = cgroup.wrap(command)
            process = subprocess.Popen(command, env=env, cwd=root / "config", stdout=out, stderr=subprocess.STDOUT)
        pod = Pod(root, process, port, readiness, (str(client.cert), str(client.key)), str(kubewarden_ca.cert), log)
        pod.wait_ready()
        pod.before = before
        pod.limited, pod.non_root = cgroup is not None, non_root
        yield pod
    finally:
        stop_process(process)
        if cgroup:
            cgroup.remove()
        registry.stop()
        for path in [root, *root.rglob("*")]:
            if path.is_dir() and not path.is_symlink():
                path.chmod(stat.S_IRWXU)
        shutil.rmtree(root, ignore_errors=True)


def test_validate_pulls_verified_modules_into_the_policy_store(pod):
    response = pod.post("/validate/clusterwide-pod-privileged", privileged_review())
    assert response.status_code == 200
    assert response.json()["response"]["allowed"] is False
    assert response.json()["response"]["status"]["message"] == "Privileged container is not allowed"
    stored = list((pod.root / "tmp" / "registry").rglob("pod-privileged:v1.0.0"))
    assert [p.read_bytes() for p in stored] == [(TEST_POLICIES / "pod-privileged.wasm").read_bytes()]


def test_audit_and_group(pod):
    audit = pod.post("/audit/clusterwide-pod-privileged", privileged_review())
    assert audit.status_code == 200 and audit.json()["response"]["allowed"] is False
    group = pod.post("/validate/clusterwide-group", privileged_review()).json()["response"]
    assert group["allowed"] is False
    assert group["status"]["message"] == "The group policy rejected your request"


def test_validate_raw_mutates(pod):
    response = pod.post("/validate_raw/namespaced-default-raw-mutation", load_json(SERVER_FIXTURES / "raw_review.json"))
    assert response.status_code == 200
    body = response.json()["response"]
    assert body["allowed"] is True and body["patchType"] == "JSONPatch" and body["patch"]


def test_requests_in_the_deployments_namespace_are_always_accepted(pod):
    review = privileged_review()
    review["request"]["namespace"] = DEPLOYMENTS_NAMESPACE
    response = pod.post("/validate/clusterwide-pod-privileged", review)
    assert response.status_code == 200 and response.json()["response"]["allowed"] is True


def test_clients_without_a_certificate_of_the_client_cas_are_refused(pod):
    # TLS 1.3 reports the missing certificate after the handshake: an SSL error or a closed connection.
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.post(f"https://127.0.0.1:{pod.port}/validate/clusterwide-pod-privileged", json=privileged_review(),
                      verify=pod.ca, timeout=10)
    assert pod.post("/validate/clusterwide-pod-privileged", privileged_review()).status_code == 200


def test_readiness_is_plain_http_on_the_probe_port(pod):
    response = requests.get(f"http://127.0.0.1:{pod.readiness}/readiness", timeout=5)
    assert response.status_code == 200


def test_only_the_emptydir_is_written_and_compiled_modules_are_cached_there(pod):
    assert _snapshot(pod.root) == pod.before
    cached = [path.name for path in (pod.root / "tmp").rglob("*.cwasm")]
    # One per unique module (the group's member shares pod-privileged's), each beside its pre-initialised copy
    assert len([name for name in cached if "-preinit" not in name]) == 2
    assert len([name for name in cached if "-preinit" in name]) == 2


def test_settings_without_effect_are_named_at_startup(pod):
    log = pod.log()
    assert "sigstore-cache-dir:" in log
    # They have an effect: OTLP metrics and spans, the trust root of keyless signatures (read, and usable).
    assert "Sigstore trust root" not in log
    for setting in ("enable-metrics", "log-fmt", "sigstore-trust-config"):
        assert f"{setting}:" not in log, setting
    assert "Traceback" not in log


def test_deployment_fixture_in_another_namespace_is_evaluated(pod):
    review = as_review(load_json(FIXTURES / "kubewarden-policy-server" / "deployment_admission_review.json"))
    response = pod.post("/validate/clusterwide-pod-privileged", review)
    assert response.status_code == 200 and response.json()["response"]["allowed"] is True


def _listening_ports(pod) -> set[int]:
    master = psutil.Process(pod.process.pid)
    processes = [master, *master.children(recursive=True)]
    return {c.laddr.port for p in processes for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN}


def test_only_the_controllers_two_ports_are_bound_and_metrics_are_on_the_readiness_one(pod):
    # With hostNetwork, each of these is a port of the node: a third one would collide with whatever
    # else runs there (node agents, another pod's sidecar on the metrics Service's 8080).
    assert _listening_ports(pod) == {pod.port, pod.readiness}
    metrics = requests.get(f"http://127.0.0.1:{pod.readiness}/metrics", timeout=5)
    assert metrics.status_code == 200 and "kubewarden_policy_evaluations_total" in metrics.text
    status = requests.get(f"http://127.0.0.1:{pod.readiness}/status", timeout=5).json()
    assert status["workers"] >= 1 and status["policies"] == 3


@pytest.mark.skipif(not shutil.which("setpriv"), reason="needs setpriv (util-linux)")
def test_the_server_runs_as_the_controllers_security_context_asks(pod):
    master = psutil.Process(pod.process.pid)
    for process in [master, *master.children(recursive=True)]:
        assert process.uids().effective != 0 or not pod.non_root  # runAsNonRoot, where this machine allows it
        status = Path(f"/proc/{process.pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        assert int(fields["CapEff"], 16) == 0 and fields["NoNewPrivs"].strip() == "1"


def test_workers_are_sized_to_the_pods_cpu_limit(pod):
    if not pod.limited:
        pytest.skip("no cgroup for the pod's limits on this machine")
    assert "starting: 1 worker: cgroup CPU quota 1 CPUs" in pod.log()
