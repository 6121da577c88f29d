"""Where the test data lives, and reading it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
CONFORMANCE = SHARED / "conformance"
FIXTURES = CONFORMANCE / "fixtures"
SERVER_FIXTURES = FIXTURES / "kubewarden-policy-server"
UPSTREAM_POLICIES = FIXTURES / "kubewarden-policies"
TEST_POLICIES = REPO / "tests" / "policies"


def policy_path(name: str) -> str:
    return str(TEST_POLICIES / f"{name}.wasm")


def load_json(path: Path | str) -> Any:
    return json.loads(Path(path).read_text())


def as_review(request: dict[str, Any]) -> dict[str, Any]:
    """Wrap a bare AdmissionRequest fixture in an AdmissionReview envelope."""
    if "request" in request:
        return request
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}


def upstream_request(path: str) -> dict[str, Any]:
    """A bare AdmissionRequest from an upstream policy's test data."""
    data = load_json(UPSTREAM_POLICIES / path)
    return data["request"] if isinstance(data.get("request"), dict) and "uid" in data["request"] else data
