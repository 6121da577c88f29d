"""Plain WASI policies (`kwserver.runtime.wasi_command`) with kwserver's wasi-testbed policy."""

import json

import pytest
import wasmtime

from kwserver.admission import parse_raw_review
from kwserver.capabilities import Capabilities
from kwserver.evaluation import MODES
from kwserver.evaluation.modes import wasi as wasi_mode
from kwserver.host_capabilities import ALLOW_ALL, parse
from kwserver.runtime import InstanceLimits, InstantiationFailure
from kwserver.runtime.wasi_command import WasiCommandFailure, WasiCommandModule, WasiCommandTimeout
from tests.support.modules import WASI_TESTBED, javy_host_call_wat, worker_memory

settings_error = MODES["wasi"].settings_error


@pytest.fixture(scope="module")
def testbed(engine):
    return WasiCommandModule(engine, wasmtime.Module.from_file(engine, str(WASI_TESTBED)), epoch_interruption=True)


def policy(module, timeout=1):
    return module.instantiate(InstanceLimits(memory_bytes=64 << 20, timeout_seconds=timeout),
                              Capabilities("wasi-test", host_capabilities=ALLOW_ALL), "wasi-test")


def validate(instance, request, settings=None):
    return json.loads(instance.call("validate", json.dumps({"request": request, "settings": settings or {}}).encode()))


def test_command_run_reads_stdin_and_writes_stdout(testbed):
    instance = policy(testbed)
    settings = {"validUsers": ["wanda"], "validActions": ["eats"], "validResources": ["hay"]}
    assert validate(instance, {"user": "wanda", "action": "eats", "resource": "hay"}, settings) == {"accepted": True}
    assert validate(instance, {"user": "tonio", "action": "eats", "resource": "spinach"}, settings) == \
        {"accepted": False, "message": "this request is not accepted"}
    pod = {"uid": "u", "object": {"metadata": {"name": "test-pod"}}}
    assert validate(instance, pod, {"deniedNames": ["test-pod"]})["message"] == \
        "The 'test-pod' name is on the deny list"


def test_validate_settings_uses_its_own_argv(testbed):
    instance = policy(testbed)
    assert settings_error(instance, b'{"validUsers": ["a"]}') is None
    assert settings_error(instance, b'{"validUsers": []}') == "validUsers must be a non-empty list of strings"


def test_settings_validation_failures_report_stderr(testbed):
    instance = policy(testbed)
    assert settings_error(instance, b'{"settingsBehaviour": "exit"}') == "exiting with code 3 on purpose"
    assert settings_error(instance, b'{"settingsBehaviour": "garbage"}').startswith(
        "Cannot deserialize settings validation response: ")
    message = settings_error(instance, b'{"settingsBehaviour": "busy-loop"}')
    assert message == ("Policy execution interrupted because it exceeded the allowed execution time; "
                       "policy stderr: looping forever")


def test_proc_exit_zero_is_success(testbed):
    answer = validate(policy(testbed), {"behaviour": "exit-zero-early"})
    assert answer == {"accepted": True, "warnings": ["answered, then proc_exit(0)"]}


@pytest.mark.parametrize(("behaviour", "message", "stderr"), [
    ("exit", "exiting with code 3 on purpose", "exiting with code 3 on purpose\n"),
    ("silent-exit", "the policy exited with code 4", ""),
    ("panic", "panicked at 'boom: the policy panicked on purpose'", "panicked"),
    ("silent-trap", "the policy trapped: wasm trap: wasm `unreachable` instruction executed", ""),
    ("invalid-utf8", "stdout pipe conversion error", ""),
])
def test_failed_runs_carry_stderr_or_say_what_happened(testbed, behaviour, message, stderr):
    instance = policy(testbed)
    with pytest.raises(WasiCommandFailure) as failure:
        validate(instance, {"behaviour": behaviour})
    assert message in failure.value.message
    assert stderr in failure.value.stderr
    assert not instance.broken
    assert validate(instance, {"user": "x"}) == {"accepted": True}  # the next run is a fresh instance


@pytest.mark.parametrize(("behaviour", "stderr"), [("busy-loop", "looping forever"),
                                                   ("sleep", "sleeping for an hour")])
def test_timeouts_are_reported_with_stderr(testbed, behaviour, stderr):
    instance = policy(testbed)
    with pytest.raises(WasiCommandTimeout) as timeout:
        validate(instance, {"behaviour": behaviour})
    assert timeout.value.stderr.strip() == stderr
    assert wasi_mode.wasi_interrupted_message(timeout.value.stderr) == (
        f"Policy execution interrupted because it exceeded the allowed execution time; policy stderr: {stderr}")


def test_host_call_reversed_status_and_answer_appended_to_stdin(testbed):
    answer = validate(policy(testbed), {"behaviour": "host-call"})
    # tracing/log succeeds (0, empty answer); the Kubernetes call fails (1, error text on stdin)
    assert answer["message"] == ('log: 0 ""; list_resources_all: 1 Policy has not been granted access to Kubernetes '
                                 'v1/Namespace resources. The violation has been reported.')


def test_javy_host_call_import(engine):
    module = WasiCommandModule(engine, wasmtime.Module(engine, wasmtime.wat2wasm(javy_host_call_wat())),
                               epoch_interruption=True)
    answer = json.loads(policy(module).call("validate", b'{"request": {}, "settings": {}}'))
    assert answer == {"valid": True, "accepted": False,
                      "message": "javy host call returned 1: Policy has not been granted access to Kubernetes "
                                 "v1/Namespace resources. The violation has been reported."}


def test_host_calls_pass_the_policys_grant(testbed):
    instance = testbed.instantiate(InstanceLimits(memory_bytes=64 << 20, timeout_seconds=1),
                                   Capabilities("wasi-test", host_capabilities=parse(["oci/*"])), "wasi-test")
    answer = validate(instance, {"behaviour": "host-call"})
    assert answer["message"] == ('log: 0 ""; list_resources_all: 1 Policy has not been granted access to the '
                                 "'kubernetes/list_resources_all' host capability. The violation has been reported.")


def test_without_host_capabilities_host_calls_fail(testbed):
    instance = testbed.instantiate(InstanceLimits(memory_bytes=64 << 20, timeout_seconds=1))
    answer = validate(instance, {"behaviour": "host-call"})
    assert "callback channel not provided" in answer["message"]


def test_module_without_start_is_refused(engine):
    wasm = wasmtime.wat2wasm('(module (memory (export "memory") 1) (func (export "main")))')
    with pytest.raises(InstantiationFailure, match="cannot find `_start` function inside of module"):
        WasiCommandModule(engine, wasmtime.Module(engine, wasm), epoch_interruption=True)


def test_wasi_results_mapping():
    request = parse_raw_review({"request": {"uid": "u1", "resource": "x"}})
    assert wasi_mode.response_from_wasi(request, b'{"accepted": true}\n') == \
        {"uid": "u1", "allowed": True, "auditAnnotations": None, "warnings": None}
    for stdout, problem in ((b"this is not JSON", "Cannot deserialize policy validation response: "),
                            (b'{"message": "x"}', "Cannot deserialize policy validation response: missing field "
                                                  "`accepted`")):
        response = wasi_mode.response_from_wasi(request, stdout)
        assert response["status"]["code"] == 500
        assert response["status"]["message"].startswith(f"internal server error: {problem}")
    mutated = wasi_mode.response_from_wasi(request, b'{"accepted": true, "mutated_object": {"uid": "u1"}}')
    assert mutated["patchType"] == "JSONPatch"


def test_memory_10000_evaluations_in_one_worker(tmp_path):
    """Every WASI evaluation is a fresh store: 10,000 of them, in a process of their own, leave its
    USS flat (bound 1 MiB: < 105 bytes per run; a leaked store or instance would cost tens of KiB)."""
    policies = {"p": {"module": str(WASI_TESTBED), "settings": {"validUsers": ["wanda"]}}}
    review = {"request": {"user": "wanda", "action": "eats", "resource": "hay"}}
    result = worker_memory(tmp_path, policies, "p", review, raw=True)
    assert result["first"]["allowed"] is True
    assert result["growth"] < 1 << 20, f"USS grew by {result['growth']} bytes over 10,000 evaluations"
