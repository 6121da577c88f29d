"""The container image (deploy/build-image.sh): built here from Debian packages, run as the controller runs it.

The image is built with policies baked in (their compiled-module cache warmed at build time) and
kept under ~/.cache/kwserver-image-test/<hash of its inputs>, so an unchanged tree reuses it. It
runs with `podman run` when podman works here (read-only root, all capabilities dropped, the
controller's mounts and variables), otherwise from its unpacked layer: a private mount namespace
where the tree is read-only, the pod's directories are bind mounts, and chroot drops to the image's
user. Either way it gets AdmissionReviews over mTLS on loopback ports.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.support.certs import make_ca, make_cert
from tests.support.paths import REPO
from tests.support.pod import DEPLOYMENTS_NAMESPACE, Pod, privileged_review, read_only
from tests.support.server import free_port, stop_process

pytestmark = pytest.mark.integration

BUILD = REPO / "deploy" / "build-image.sh"
LIBRARY = "/opt/kwserver/policies/dist"
# Fixed: the cache key is the content, so the image's dates and revision label must not follow the commits.
SOURCE_DATE_EPOCH = "1767225600"
REVISION = "kwserver-image-test"
BAKED_POLICIES = {
    "privileged": {"module": str(REPO / "policies" / "dist" / "pod-privileged.wasm"), "settings": {}},
    "group": {"policies": {"pod_privileged": {"module": str(REPO / "policies" / "dist" / "pod-privileged.wasm")}},
              "expression": "pod_privileged()", "message": "The group policy rejected your request"},
}
# The controller's ConfigMap names the same modules by where the image keeps them (as `kwserver manifests` does).
POD_POLICIES = {
    "clusterwide-privileged": {"module": f"{LIBRARY}/pod-privileged.wasm", "policyMode": "protect", "settings": {}},
    "clusterwide-group": {"policies": {"pod_privileged": {"module": f"{LIBRARY}/pod-privileged.wasm"}},
                          "expression": "pod_privileged()", "message": "The group policy rejected your request"},
}
POD_MOUNTS = ("pki", "config", "client-ca")
# podman's defaults that a container sandbox refuses: raising rlimits needs CAP_SYS_RESOURCE.
CONTAINERS_CONF = "[containers]\ndefault_ulimits = []\n"


def _inputs() -> list[Path]:
    files = [BUILD, REPO / "deploy" / "image-packages.txt", REPO / "deploy" / "image-requirements.txt",
             REPO / "pyproject.toml", REPO / "README.md"]
    files += [p for p in (REPO / "kwserver").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    files += [p for p in (REPO / "policies").glob("*") if p.is_file()]
    files += list((REPO / "policies" / "dist").glob("*.wasm"))
    return sorted(files)


def _input_hash() -> str:
    digest = hashlib.sha256(json.dumps(BAKED_POLICIES, sort_keys=True).encode())
    for path in _inputs():
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:20]


def _why_not_buildable() -> str | None:
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return f"the image is built for linux/x86_64, this is {platform.system()}/{platform.machine()}"
    missing = [tool for tool in ("mmdebstrap", "buildah") if not shutil.which(tool)]
    if missing:
        return f"needs {' and '.join(missing)} (apt-get install mmdebstrap buildah; .ci/run does)"
    if os.getuid() != 0 and subprocess.run(["buildah", "unshare", "true"], capture_output=True).returncode:
        return "not root and `buildah unshare` cannot make a user namespace"
    mirrors = subprocess.run([str(BUILD), "--print-mirrors"], capture_output=True, text=True, check=True).stdout
    for line in mirrors.splitlines():
        mirror, suite = line.split()
        try:
            requests.head(f"{mirror}/dists/{suite}/Release", timeout=15).raise_for_status()
        except requests.RequestException as exc:
            return f"the Debian mirror is not reachable: {exc}"
    return None


def _build(output: Path, tag: str) -> dict[str, str]:
    output.mkdir(parents=True, exist_ok=True)
    policies = output / "policies.yml"
    policies.write_text(json.dumps(BAKED_POLICIES))
    result = subprocess.run(
        [str(BUILD), "--python", sys.executable, "--policies", str(policies), "--revision", REVISION,
         "--tag", tag, "--output", str(output), "--storage", str(output / "storage")],
        capture_output=True, text=True, timeout=900, env={**os.environ, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH})
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    return dict(line.split("=", 1) for line in (output / "build.env").read_text().splitlines())


@dataclass
class Image:
    record: dict[str, str]
    storage: Path
    directory: Path

    @property
    def archive(self) -> Path:
        return Path(self.record["ARCHIVE"])

    def blob(self, digest: str) -> bytes:
        with tarfile.open(self.archive) as archive:
            return archive.extractfile(f"blobs/sha256/{digest.removeprefix('sha256:')}").read()

    def manifest(self) -> dict:
        with tarfile.open(self.archive) as archive:
            index = json.load(archive.extractfile("index.json"))
        return json.loads(self.blob(index["manifests"][0]["digest"]))

    def config(self) -> dict:
        return json.loads(self.blob(self.manifest()["config"]["digest"]))

    def layer(self) -> tarfile.TarFile:
        [layer] = self.manifest()["layers"]
        return tarfile.open(fileobj=io.BytesIO(gzip.decompress(self.blob(layer["digest"]))))


@pytest.fixture(scope="module")
def image() -> Image:
    reason = _why_not_buildable()
    if reason:
        pytest.skip(reason)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kwserver-image-test"
    key = _input_hash()
    directory = cache / key
    if not (directory / "build.env").exists():
        for stale in cache.glob("*"):  # one image at a time: each is ~300 MB with its storage
            shutil.rmtree(stale, ignore_errors=True)
        _build(directory, f"localhost/kwserver-test:{key}")
    record = dict(line.split("=", 1) for line in (directory / "build.env").read_text().splitlines())
    return Image(record, directory / "storage", directory)


def _podman(image: Image) -> list[str]:
    # Not under the storage: podman wants a run root of at most 50 characters.
    runroot = Path(tempfile.gettempdir()) / f"kwserver-podman-{image.directory.name[:8]}"
    return ["podman", "--root", str(image.storage), "--runroot", str(runroot),
            "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs"]


def _podman_runtime(image: Image, conf: Path) -> list[str] | None:
    """The podman options that run a container here, or None: crun refuses hybrid cgroup set-ups, runc copes."""
    if not shutil.which("podman") or os.environ.get("KWSERVER_TEST_IMAGE_RUNNER") == "chroot":
        return None
    for runtime in ([], ["--runtime", "runc"]):
        result = subprocess.run([*_podman(image), *runtime, "run", "--rm", "--network", "host",
                                 image.record["IMAGE"], "--version"],
                                capture_output=True, text=True, timeout=120,
                                env={**os.environ, "CONTAINERS_CONF": str(conf)})
        if result.returncode == 0:
            return runtime
    return None


def _unpack(image: Image, target: Path) -> None:
    with image.layer() as layer:
        layer.extractall(target, numeric_owner=True, filter="fully_trusted")


def _controller_env(port: int, readiness: int) -> dict[str, str]:
    return {
        "KUBEWARDEN_CERT_FILE": "/pki/tls.crt",
        "KUBEWARDEN_KEY_FILE": "/pki/tls.key",
        "KUBEWARDEN_PORT": str(port),
        "KUBEWARDEN_READINESS_PROBE_PORT": str(readiness),
        "KUBEWARDEN_POLICIES_DOWNLOAD_DIR": "/tmp",
        "KUBEWARDEN_POLICIES": "/config/policies.yml",
        "KUBEWARDEN_SIGSTORE_CACHE_DIR": "/tmp/sigstore-data",
        "KUBEWARDEN_CLIENT_CA_FILE": "/client-ca/client-ca.crt",
        "KUBEWARDEN_ALWAYS_ACCEPT_ADMISSION_REVIEWS_ON_NAMESPACE": DEPLOYMENTS_NAMESPACE,
        "KUBEWARDEN_LOG_LEVEL": "info",
        # A PolicyServer's spec.env, and what a shared test host needs: loopback, free ports.
        "KUBEWARDEN_WORKERS": "2",
        "KUBEWARDEN_BIND_ADDRESS": "127.0.0.1",
    }


def _chroot_command(rootfs: Path, pod: Path, env: dict[str, str], config: dict) -> list[str]:
    """The image's entrypoint as its user, in a mount namespace: the tree read-only, the pod's mounts bound in."""
    binds = [f"mount --bind {pod / name} {rootfs / name}" for name in (*POD_MOUNTS, "tmp")]
    steps = [*(f"mkdir -p {rootfs / name}" for name in POD_MOUNTS), f"mount --bind {rootfs} {rootfs}",
             f"mount -t proc proc {rootfs / 'proc'}", *binds, f"mount -o remount,bind,ro {rootfs}"]
    image_env = dict(item.split("=", 1) for item in config["Env"])
    command = [*config["Entrypoint"], *config["Cmd"]]
    user = config["User"]
    assignments = [f"{k}={v}" for k, v in {**image_env, **env}.items()]
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"
    return ["unshare", "-m", "sh", "-c", " && ".join(steps) + ' && exec "$@"', "sh",
            "env", "-i", *assignments, chroot, f"--userspec={user}", str(rootfs), *command]


@dataclass
class Running:
    pod: Pod
    how: str


@pytest.fixture(scope="module")
def container(image: Image) -> Iterator[Running]:
    root = Path(tempfile.mkdtemp(prefix="kwserver-image-pod-"))
    root.chmod(0o755)
    process = name = None
    conf = root / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    try:
        work = root / "test-side"
        work.mkdir()
        for mount in POD_MOUNTS:
            (root / mount).mkdir()
        (root / "config" / "policies.yml").write_text(json.dumps(POD_POLICIES))
        ca = make_ca(work, "kubewarden-ca")
        server = make_cert(work, "policy-server", ca)
        shutil.copy(server.cert, root / "pki" / "tls.crt")
        shutil.copy(server.key, root / "pki" / "tls.key")
        client_ca = make_ca(work, "client-ca")
        client = make_cert(work, "api-server", client_ca)
        shutil.copy(client_ca.cert, root / "client-ca" / "client-ca.crt")
        for mount in POD_MOUNTS:
            read_only(root / mount)
        (root / "tmp").mkdir()
        (root / "tmp").chmod(0o1777)  # the emptyDir

        port, readiness = free_port(), free_port()
        env = _controller_env(port, readiness)
        runtime = _podman_runtime(image, conf)
        log = work / "server.log"
        if runtime is not None:
            how = "podman run"
            name = f"kwserver-test-{port}"
            command = [*_podman(image), *runtime, "run", "--rm", "--name", name, "--network", "host",
                       "--read-only", "--cap-drop", "all", "--security-opt", "no-new-privileges",
                       *(f"--volume={root / m}:/{m}:ro" for m in POD_MOUNTS), f"--volume={root / 'tmp'}:/tmp",
                       *(f"--env={k}={v}" for k, v in env.items()), image.record["IMAGE"]]
        else:
            if os.getuid() != 0 or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
                pytest.skip("podman cannot run containers here, and running the unpacked image needs root "
                            "with mount namespaces (unshare -m)")
            how = "chroot into the unpacked layer"
            rootfs = work / "rootfs"
            _unpack(image, rootfs)
            command = _chroot_command(rootfs, root, env, image.config()["config"])
        with open(log, "wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                       env={**os.environ, "CONTAINERS_CONF": str(conf)})
        pod = Pod(root, process, port, readiness, (str(client.cert), str(client.key)), str(ca.cert), log)
        pod.wait_ready()
        yield Running(pod, how)
    finally:
        stop_process(process, timeout=30)
        if name:
            subprocess.run([*_podman(image), "rm", "--force", "--ignore", name], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_the_image_config_is_the_controllers_policy_server_shape(image):
    config = image.config()
    assert config["os"] == "linux" and config["architecture"] == "amd64"
    assert config["config"]["User"] == "65532:65532"
    assert config["config"]["Entrypoint"] == ["/usr/bin/kwserver"] and config["config"]["Cmd"] == ["serve"]
    assert set(config["config"]["ExposedPorts"]) == {"3000/tcp", "8081/tcp"}
    env = dict(item.split("=", 1) for item in config["config"]["Env"])
    assert env["KUBEWARDEN_POLICIES_DOWNLOAD_DIR"] == "/tmp"
    assert config["config"]["Labels"]["org.opencontainers.image.version"]
    assert len(image.manifest()["layers"]) == 1


def test_the_tree_needs_no_writable_path_but_tmp_and_holds_no_tools(image):
    with image.layer() as layer:
        members = {m.name.removeprefix("./").rstrip("/"): m for m in layer.getmembers()}
    writable_by_others = sorted(name for name, m in members.items()
                                if not m.issym() and m.mode & 0o022 and name != "tmp")
    assert writable_by_others == []
    assert members["tmp"].mode & 0o1777 == 0o1777
    assert sorted(name for name, m in members.items() if m.uid != 0) == ["home/kwserver"]
    assert not [name for name, m in members.items() if m.mode & 0o6000]  # no setuid or setgid programs
    for absent in ("bin/sh", "usr/bin/sh", "usr/bin/bash", "usr/bin/apt-get", "usr/bin/dpkg", "usr/bin/gcc",
                   "usr/bin/pip", "usr/bin/pip3"):
        assert absent not in members, absent
    assert "usr/lib/python3/dist-packages/kwserver/commands/__pycache__/cli.cpython-311.pyc" in members
    cached = {name: m for name, m in members.items()
              if name.startswith("var/cache/kwserver/") and name.endswith(".cwasm")}
    # one unique module and its pre-initialised copy, warmed at build time
    assert len(cached) == 2 and len([name for name in cached if "-preinit" in name]) == 1
    assert all(m.mode & 0o777 == 0o644 for m in cached.values())


def test_the_build_is_reproducible(image, tmp_path):
    try:
        again = _build(tmp_path / "again", "localhost/kwserver-test:again")
    finally:
        shutil.rmtree(tmp_path / "again", ignore_errors=True)
    assert again["DIGEST"] == image.record["DIGEST"]
    assert again["UNCOMPRESSED_BYTES"] == image.record["UNCOMPRESSED_BYTES"]


def test_a_privileged_pod_is_rejected(container):
    response = container.pod.post("/validate/clusterwide-privileged", privileged_review())
    assert response.status_code == 200, container.pod.log()
    assert response.json()["response"]["allowed"] is False
    assert response.json()["response"]["status"]["message"] == "Privileged container is not allowed"
    group = container.pod.post("/validate/clusterwide-group", privileged_review()).json()["response"]
    assert group["allowed"] is False and group["status"]["message"] == "The group policy rejected your request"


def test_the_deployments_namespace_is_always_accepted(container):
    review = privileged_review()
    review["request"]["namespace"] = DEPLOYMENTS_NAMESPACE
    assert container.pod.post("/validate/clusterwide-privileged", review).json()["response"]["allowed"] is True


def test_start_up_compiles_nothing_and_writes_only_the_emptydir(container):
    log = container.pod.log()
    assert "compile cache 1 hit / 0 miss" in log, log
    assert "Traceback" not in log
    assert not list((container.pod.root / "tmp").rglob("*.cwasm"))
    print(f"ran by {container.how}")
