"""The two HTTP 500 paths: an evaluation that cannot run at all, and anything unexpected. Either way the
client gets `{"message": "Something went wrong", "status": 500}`, the cause is only logged, and the
worker keeps serving."""

from __future__ import annotations

import time

import psutil
import pytest
import wasmtime

from tests.support.modules import annotated
from tests.support.paths import SERVER_FIXTURES, load_json, policy_path
from tests.support.server import start_server, stop_server

pytestmark = pytest.mark.integration

PRIVILEGED = load_json(SERVER_FIXTURES / "pod_with_privileged_containers.json")
SOMETHING_WENT_WRONG = {"message": "Something went wrong", "status": 500}
RESPONSES = {"accepted": '{"accepted":true}', "valid": '{"valid":true}'}


def _wapc_wat(init: str, accepted: str = RESPONSES["accepted"]) -> str:
    """A waPC guest answering `accepted` to every validate, whose `wapc_init` runs `init`."""
    escaped = accepted.replace('"', '\\22')
    return f"""(module
  (import "wapc" "__guest_response" (func $respond (param i32 i32)))
  (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 32) "{{\\22valid\\22:true}}")
  (data (i32.const 1024) "{escaped}")
  (func (export "wapc_init") {init})
  (func (export "__guest_call") (param $op_len i32) (param $msg_len i32) (result i32)
    (if (i32.eq (local.get $op_len) (i32.const 17))  ;; validate_settings
      (then (call $respond (i32.const 32) (i32.const 14)) (return (i32.const 1))))
    (call $respond (i32.const 1024) (i32.const {len(accepted.encode())}))
    (i32.const 1)))"""


def _module(tmp_path, name: str, wat: str) -> str:
    return annotated(tmp_path, name, wasmtime.wat2wasm(wat), "kubewarden-wapc", protocolVersion="v1")


# `breaks-later` traps in `wapc_init` once the wall clock passes a moment after boot: the boot check (in
# the master) initialises it fine, the worker's first instance cannot be made. `too-deep` answers with
# warnings nested deeper than the JSON encoder goes: its answer cannot be written.
BOOT_SECONDS = 5


@pytest.fixture(scope="module")
def server(tmp_path_factory, compile_cache):
    tmp_path = tmp_path_factory.mktemp("server-errors")
    broken_after_ns = time.time_ns() + BOOT_SECONDS * 10**9
    trap_later = (f"(drop (call $clock (i32.const 0) (i64.const 1) (i32.const 64)))"
                  f"(if (i64.gt_u (i64.load (i32.const 64)) (i64.const {broken_after_ns})) (then unreachable))")
    too_deep = '{"accepted":true,"warnings":' + "[" * 300 + "]" * 300 + "}"
    server = start_server(tmp_path, {
        "breaks-later": {"module": _module(tmp_path, "breaks-later", _wapc_wat(trap_later))},
        "too-deep": {"module": _module(tmp_path, "too-deep", _wapc_wat("", too_deep))},
        "pod-privileged": {"module": policy_path("pod-privileged")},
    }, compile_cache, env={"KUBEWARDEN_WORKERS": "1",
                           # breaks-later's start-up must run in every new instance, not once at boot
                           "KWSERVER_DISABLE_PREINITIALISATION": "true"})
    assert time.time_ns() < broken_after_ns, "the server took too long to boot for this test"
    server.broken_after_ns = broken_after_ns
    yield server
    stop_server(server)


def _still_serving(server, worker: int) -> None:
    assert server.post("/validate/pod-privileged", PRIVILEGED).json()["response"]["allowed"] is False
    assert [p.pid for p in psutil.Process(server.process.pid).children()] == [worker]


def test_an_unexpected_failure_is_a_500_and_the_worker_keeps_serving(server):
    worker = psutil.Process(server.process.pid).children()[0].pid
    for route in ("validate", "audit"):
        reply = server.post(f"/{route}/too-deep", PRIVILEGED)
        assert (reply.status_code, reply.json()) == (500, SOMETHING_WENT_WRONG)
    assert "unexpected error while serving POST /validate/too-deep" in server.log()
    _still_serving(server, worker)


def test_an_evaluation_that_cannot_run_is_a_500_and_the_worker_keeps_serving(server):
    worker = psutil.Process(server.process.pid).children()[0].pid
    time.sleep(max(0.0, (server.broken_after_ns - time.time_ns()) / 1e9) + 0.2)
    for route in ("validate", "audit"):
        reply = server.post(f"/{route}/breaks-later", PRIVILEGED)
        assert (reply.status_code, reply.json()) == (500, SOMETHING_WENT_WRONG)
    assert "Evaluation error: policy breaks-later: " in server.log()
    assert "wasm `unreachable` instruction executed" in server.log()
    _still_serving(server, worker)
