"""Upstream waPC policy binaries give their expected results through the HTTP API."""

import pytest

from tests.support.paths import CONFORMANCE, FIXTURES, as_review, load_json

pytestmark = pytest.mark.integration

CASES = [c for c in load_json(CONFORMANCE / "expectations/runnable-cases.json")["cases"]
         if c["mode"] == "kubewarden-wapc"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, compile_cache):
    from tests.support.server import start_server, stop_server

    policies = {f"case{i}": {"module": str(CONFORMANCE / c["policy"]), "settings": c["settings"]}
                for i, c in enumerate(CASES)}
    server = start_server(tmp_path_factory.mktemp("wapc"), policies, compile_cache)
    yield server
    stop_server(server)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c["id"] for c in CASES])
def test_case(server, index):
    case = CASES[index]
    reply = server.post(f"/validate/case{index}", as_review(load_json(FIXTURES.parent / case["request"])))
    assert reply.status_code == 200
    response = reply.json()["response"]
    assert response["allowed"] is case["expect"]["allowed"]
    if "message" in case["expect"]:
        assert response["status"]["message"] == case["expect"]["message"]
