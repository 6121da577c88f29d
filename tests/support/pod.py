"""The pod the Kubewarden controller lays out for a policy server, as seen by its client (the API server).

Shared by tests/test_controller_contract.py (kwserver run from the tree) and tests/test_image.py (the
container image): the mounts are made read-only as the kubelet makes them, and the client talks mTLS.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import requests

from tests.support.paths import SERVER_FIXTURES, as_review, load_json
from tests.support.server import wait_ready_on

# KUBEWARDEN_ALWAYS_ACCEPT_ADMISSION_REVIEWS_ON_NAMESPACE: the controller's own namespace.
DEPLOYMENTS_NAMESPACE = "kubewarden"


def read_only(path: Path) -> None:
    """chmod a mount read-only, as the kubelet mounts secrets and config maps (readOnly: true)."""
    for item in sorted(path.rglob("*"), reverse=True):
        item.chmod(0o555 if item.is_dir() else 0o444)
    path.chmod(0o555)


class Pod:
    def __init__(self, root: Path, process: subprocess.Popen, port: int, readiness: int, client: tuple[str, str],
                 ca: str, log: Path):
        self.root, self.process, self.port, self.readiness = root, process, port, readiness
        self.client, self.ca = client, ca
        self.session = requests.Session()
        self.log_path = log
        self.before: Any = None  # what the read-only mounts held before the server started
        self.limited = False  # inside a cgroup with the pod's CPU and memory limits
        self.non_root = False  # as the image's user (runAsNonRoot), not the tests' root

    def post(self, path: str, body: object) -> requests.Response:
        # Per request: a session's verify loses to REQUESTS_CA_BUNDLE from the environment.
        return self.session.post(f"https://127.0.0.1:{self.port}{path}", json=body, cert=self.client,
                                 verify=self.ca, timeout=30)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self) -> None:
        wait_ready_on(self.readiness, self.process, self.log, timeout=90)


def privileged_review() -> dict:
    return as_review(load_json(SERVER_FIXTURES / "pod_with_privileged_containers.json"))
