"""One policy evaluated the way a worker does (in-process): refusals, traps and timeouts become the
mode's answers, with the request's uid."""

from __future__ import annotations

import pytest
import wasmtime

from kwserver.admission import parse_admission_review, parse_raw_review
from tests.support.modules import GATEKEEPER_HAPPY, annotated, in_process_evaluator
from tests.support.paths import SERVER_FIXTURES, load_json, policy_path

TRAPPING = """(module
  (import "wapc" "__guest_response" (func $respond (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 32) "{\\22valid\\22:true}")
  (func (export "__guest_call") (param $op_len i32) (param $msg_len i32) (result i32)
    (if (i32.eq (local.get $op_len) (i32.const 17))
      (then (call $respond (i32.const 32) (i32.const 14)) (return (i32.const 1))))
    unreachable))"""
SLEEP_4S = parse_admission_review(load_json(SERVER_FIXTURES / "pod_sleep_4s.json"))


@pytest.fixture(scope="module")
def evaluator(tmp_path_factory):
    directory = tmp_path_factory.mktemp("evaluator")
    trapping = annotated(directory, "trapping", wasmtime.wat2wasm(TRAPPING), "kubewarden-wapc", protocolVersion="v1")
    with in_process_evaluator(directory, {
        "trapping": {"module": trapping},
        "sleep": {"module": policy_path("sleeping"), "settings": {"sleepMilliseconds": 1}, "timeoutEvalSeconds": 1},
        "gatekeeper": {"module": str(GATEKEEPER_HAPPY)},
    }) as (evaluator, _, _):
        yield evaluator


def test_a_trap_is_the_modes_failure_answer(evaluator):
    response = evaluator.evaluate("trapping", parse_raw_review({"request": {"uid": "t1"}}))
    assert response["uid"] == "t1" and response["allowed"] is False and response["status"]["code"] == 500
    assert response["status"]["message"].startswith("internal server error: Guest call failure: ")
    assert "unreachable" in response["status"]["message"]


def test_a_timeout_is_the_modes_interruption_answer(evaluator, caplog):
    response = evaluator.evaluate("sleep", SLEEP_4S)
    assert response["uid"] == SLEEP_4S.uid
    assert response["status"] == {
        "message": "Policy execution interrupted because it exceeded the allowed execution time", "code": 500}
    assert "policy sleep: evaluation interrupted, execution deadline exceeded" in caplog.text


def test_a_request_the_mode_refuses_is_not_evaluated(evaluator):
    response = evaluator.evaluate("gatekeeper", parse_raw_review({"request": {"uid": "g1"}}))
    assert response["uid"] == "g1" and response["status"] == {
        "message": "internal server error: Gatekeeper does not support raw validation requests", "code": 500}
