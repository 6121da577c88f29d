"""docs/openapi.yaml against a started server, with schemathesis: generated requests (valid and not) get the
documented answers, never a 500, and every answer carries its own request's uid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings

from tests.support.paths import policy_path
from tests.support.server import start_server, stop_server

schemathesis = pytest.importorskip("schemathesis")

pytestmark = pytest.mark.integration

DESCRIPTION = Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml"
POD_PRIVILEGED = {"module": policy_path("pod-privileged")}
RAW_VALIDATION = {"module": policy_path("raw-validation"),
                  "settings": {"validUsers": ["tonio"], "validActions": ["eats"], "validResources": ["banana"]}}
POLICIES = {
    "pod-privileged": POD_PRIVILEGED,
    "monitor": {**POD_PRIVILEGED, "policyMode": "monitor", "message": "custom"},
    "raw-validation": RAW_VALIDATION,
    "group": {"expression": "a() || b()", "message": "rejected by the group",
              "policies": {"a": POD_PRIVILEGED, "b": RAW_VALIDATION}},
}
EXAMPLES_PER_OPERATION = 80


@pytest.fixture(scope="module")
def server(tmp_path_factory, compile_cache):
    server = start_server(tmp_path_factory.mktemp("openapi"), POLICIES, compile_cache,
                          env={"KUBEWARDEN_WORKERS": "1"})
    yield server
    stop_server(server)


def _schema():
    doc = yaml.safe_load(DESCRIPTION.read_text())
    # The policies of this server, and one it does not have.
    doc["components"]["parameters"]["policy_id"]["schema"] = {"type": "string", "enum": [*POLICIES, "nope"]}
    return schemathesis.openapi.from_dict(doc)


def _requested_uid(case, raw: bool) -> str | None:
    request = case.body.get("request") if isinstance(case.body, dict) else None
    uid = request.get("uid") if isinstance(request, dict) else None
    return uid if isinstance(uid, str) else ("" if raw else None)


@pytest.mark.parametrize("mode", ["positive", "negative"])
@pytest.mark.parametrize("operation_id", ["validate", "audit", "validate_raw"])
def test_generated_requests_get_documented_answers_never_a_500(server, operation_id, mode):
    operation = _schema().find_operation_by_id(operation_id)
    strategy = operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode))
    statuses: dict[int, int] = {}

    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def answered(case) -> None:
        response = case.call(base_url=server.url, timeout=30)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code != 500, response.text[:500]
        if mode == "positive":
            case.validate_response(response)
        if response.status_code == 200:
            answer = response.json()["response"]
            assert answer["uid"] == _requested_uid(case, operation_id == "validate_raw"), json.dumps(case.body)[:500]

    answered()
    assert server.process.poll() is None
    if mode == "positive":
        assert statuses.get(200, 0) > 0, statuses  # evaluations were reached, not only refusals
