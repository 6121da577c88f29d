"""The OPA runtime (`kwserver.runtime.opa`) through its public Python API, and the OPA/Gatekeeper
result mapping of `kwserver.admission`."""

import json
from types import SimpleNamespace

import orjson
import pytest
import wasmtime

from kwserver.admission import parse_admission_review, parse_raw_review
from kwserver.evaluation.modes import MODES
from kwserver.evaluation.modes import gatekeeper as gatekeeper_mode
from kwserver.evaluation.modes import opa as opa_mode
from kwserver.runtime import GuestTimeout, InstanceLimits, InstantiationFailure
from kwserver.runtime.opa import OpaModule, RegoEvaluationError
from tests.support.modules import (
    GATEKEEPER_HAPPY,
    GATEKEEPER_UNHAPPY,
    OPA_NO_DEFAULT_NS,
    annotated,
    fake_opa_wasm,
    uss_growth,
    worker_memory,
)
from tests.support.paths import CONFORMANCE, as_review, load_json

CASES = [c for c in load_json(CONFORMANCE / "expectations/runnable-cases.json")["cases"] if c["mode"] == "opa-raw"]
LIMITS = InstanceLimits(memory_bytes=64 << 20, timeout_seconds=1)


def opa_module(engine, source) -> OpaModule:
    wasm = bytes(source) if isinstance(source, (bytes, bytearray)) else source.read_bytes()
    return OpaModule(engine, wasmtime.Module(engine, wasm), epoch_interruption=True)


def _unordered(value):
    """Rego sets come out as arrays whose order is not significant."""
    if isinstance(value, list):
        return sorted((_unordered(v) for v in value), key=json.dumps)
    if isinstance(value, dict):
        return {k: _unordered(v) for k, v in value.items()}
    return value


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_conformance_case(engine, case):
    module = opa_module(engine, CONFORMANCE / case["policy"])
    instance = module.instantiate(LIMITS)
    input_value = case["input"] if "input" in case else load_json(CONFORMANCE / case["input_file"])
    result = instance.evaluate_value(case["entrypoint"], input_value, case["data"])
    assert _unordered(result) == _unordered(case["expect"]["result"])


def test_one_instance_serves_many_evaluations_with_changing_data(engine):
    module = opa_module(engine, CONFORMANCE / "wasm/opa-generic/burrego-example-with-data.wasm")
    instance = module.instantiate(LIMITS)
    for i in range(50):
        world = f"world-{i % 3}"
        assert instance.evaluate_value(0, {"message": world}, {"world": world}) == [{"result": True}]
        assert instance.evaluate_value(0, {"message": "nope"}, {"world": world}) == [{"result": False}]


def test_module_information_and_abi_paths(engine):
    opa = opa_module(engine, OPA_NO_DEFAULT_NS)
    assert opa.info.abi_version == (1, 1) and not opa.fast_path  # eval-context exports
    assert opa.info.entrypoints == {"policy/main": 0}
    gatekeeper = opa_module(engine, GATEKEEPER_HAPPY)
    assert gatekeeper.info.abi_version == (1, 2) and gatekeeper.fast_path  # one `opa_eval` call
    sdk = opa_module(engine, CONFORMANCE / "wasm/opa-generic/burrego-example-builtin-provided-by-sdk.wasm")
    assert sdk.info.builtins == {"sprintf": 0}


def test_heap_is_reset_between_evaluations_so_memory_stays_flat(engine):
    """OPA's repeated-evaluation case on one instance, with host builtins allocating in the guest heap
    (k8s-basic calls sprintf twice per evaluation): guest memory and process USS stay flat."""
    module = opa_module(engine, CONFORMANCE / "wasm/opa-generic/burrego-k8s-basic.wasm")
    instance = module.instantiate(LIMITS)
    input_json = orjson.dumps(load_json(CONFORMANCE / "fixtures/burrego-opa-input/k8s-basic-input.json"))
    instance.evaluate(0, input_json, b"{}")
    size = instance.memory_size
    growth = uss_growth(lambda: instance.evaluate(0, input_json, b"{}"), warmup=200, count=2_000)
    assert instance.memory_size == size
    assert growth < 1 << 20, f"USS grew by {growth} bytes"


@pytest.mark.parametrize(("mode", "path", "review"), [
    ("opa", OPA_NO_DEFAULT_NS, "fixtures/kwctl/privileged-pod.json"),
    ("gatekeeper", GATEKEEPER_UNHAPPY, "fixtures/kubewarden-policy-server/pod_with_privileged_containers.json"),
])
def test_memory_per_mode_10000_evaluations_in_one_worker(tmp_path, mode, path, review):
    """10,000 evaluations through a worker's evaluator and instance pool, in a process of their own:
    one instance serves them all, its guest memory and the process USS stay flat (bound: 1 MiB, i.e.
    < 105 bytes per evaluation; the allocator's own noise is a few hundred KiB at most)."""
    module = annotated(tmp_path, mode, path.read_bytes(), mode)
    result = worker_memory(tmp_path, {"p": {"module": module}}, "p", as_review(load_json(CONFORMANCE / review)))
    assert result["first"]["allowed"] is False
    assert result["stats"]["misses"] == 1 and result["stats"]["discards"] == 0
    assert result["stats"]["idle_bytes"] == result["idle_bytes_before"]
    assert result["growth"] < 1 << 20, f"USS grew by {result['growth']} bytes over 10,000 evaluations"


def test_a_big_input_grows_memory_from_the_host_on_the_fast_path(engine):
    instance = opa_module(engine, GATEKEEPER_UNHAPPY).instantiate(LIMITS)
    big = {"parameters": {}, "review": {"object": {"data": "x" * (2 << 20)}}}
    assert instance.evaluate_value(0, big) == [{"result": [{"msg": "failing as expected"}]}]
    small = instance.evaluate_value(0, {"parameters": {}, "review": {}})
    assert small == [{"result": [{"msg": "failing as expected"}]}]


def test_memory_limit_applies_to_the_host_created_memory(engine):
    instance = opa_module(engine, GATEKEEPER_UNHAPPY).instantiate(InstanceLimits(memory_bytes=1 << 20,
                                                                                 timeout_seconds=1))
    with pytest.raises(RegoEvaluationError, match="does not fit"):
        instance.evaluate_value(0, {"parameters": {}, "review": {"object": "x" * (2 << 20)}})
    assert instance.broken


def test_opa_abort_really_aborts(engine):
    instance = opa_module(engine, fake_opa_wasm("abort")).instantiate(LIMITS)
    with pytest.raises(RegoEvaluationError, match="opa_abort: aborting on purpose"):
        instance.evaluate(0, b"{}")
    assert instance.broken
    with pytest.raises(RegoEvaluationError, match="unusable"):
        instance.evaluate(0, b"{}")


def test_trap_is_an_evaluation_error(engine):
    instance = opa_module(engine, fake_opa_wasm("trap")).instantiate(LIMITS)
    with pytest.raises(RegoEvaluationError, match="unreachable"):
        instance.evaluate(0, b"{}")
    assert instance.broken


def test_endless_evaluation_is_interrupted(engine):
    instance = opa_module(engine, fake_opa_wasm("loop")).instantiate(LIMITS)
    with pytest.raises(GuestTimeout, match="guest code interrupted, execution deadline exceeded"):
        instance.evaluate(0, b"{}")
    assert instance.broken


def test_builtins_dispatch_and_errors(engine):
    module = opa_module(engine, fake_opa_wasm("builtin", builtins={"hex.decode": 0}))
    instance = module.instantiate(LIMITS)
    assert instance.evaluate(0, b'"6869"') == b'"hi"'
    assert instance.evaluate(0, b'"6f6b"') == b'"ok"'
    with pytest.raises(RegoEvaluationError, match=r"builtin error: hex\.decode"):
        instance.evaluate(0, b'"zz"')
    unknown = opa_module(engine, fake_opa_wasm("builtin", builtins={"hex.decode": 3})).instantiate(LIMITS)
    with pytest.raises(RegoEvaluationError, match="cannot find builtin 0"):
        unknown.evaluate(0, b'"6869"')


def test_missing_builtins_are_refused_when_linking(engine):
    with pytest.raises(InstantiationFailure, match=r"Missing Rego builtins: http\.send, io\.jwt\.decode"):
        opa_module(engine, fake_opa_wasm("constant", builtins={"io.jwt.decode": 1, "http.send": 0, "sprintf": 2}))


def test_modules_built_against_the_reference_names_load(engine):
    module = opa_module(engine, fake_opa_wasm("builtin", builtins={"parse_rfc3339_ns": 0}))
    assert module.instantiate(LIMITS).evaluate(0, b'"1970-01-01T00:00:01Z"') == b"1000000000"


def test_not_an_opa_module(engine):
    with pytest.raises(InstantiationFailure, match="not an OPA Wasm module"):
        opa_module(engine, wasmtime.wat2wasm('(module (memory (export "memory") 1))'))


def test_entrypoint_selection_and_gatekeeper_warning(engine):
    module = opa_module(engine, fake_opa_wasm("constant", entrypoints={"policy/violation": 0, "policy/other": 1}))
    assert module.entrypoint_id(None) == 0
    assert module.entrypoint_id("policy/other") == 1
    with pytest.raises(InstantiationFailure, match="entrypoint `nope` not found"):
        module.entrypoint_id("nope")
    assert gatekeeper_mode.entrypoint_warning(module, None) is None
    warning = gatekeeper_mode.entrypoint_warning(module, "policy/other")
    assert "`policy/other`, not a `violation` rule" in warning
    assert MODES["opa"].boot_warning(module, SimpleNamespace(entrypoint="policy/other")) is None
    deny_first = opa_module(engine, fake_opa_wasm("constant", entrypoints={"kubernetes/admission/deny": 0}))
    assert "not a `violation` rule" in gatekeeper_mode.entrypoint_warning(deny_first, None)


def test_settings_of_rego_policies_are_always_valid(engine):
    instance = opa_module(engine, GATEKEEPER_HAPPY).instantiate(LIMITS)
    assert json.loads(instance.call("validate_settings", b'{"anything": 1}')) == {"valid": True}


# --- result mapping (kwserver.admission) --------------------------------------------------------------------------

REQUEST = parse_admission_review(as_review(load_json(
    CONFORMANCE / "fixtures/kubewarden-policy-server/pod_with_privileged_containers.json")))


def test_opa_and_gatekeeper_documents():
    settings = b'{"k":1}'
    input_json, data_json = opa_mode.opa_documents(REQUEST, settings)
    assert orjson.loads(input_json) == {"request": orjson.loads(REQUEST.json)}
    assert data_json is settings
    input_json, data_json = gatekeeper_mode.gatekeeper_documents(REQUEST, settings)
    assert orjson.loads(input_json) == {"parameters": {"k": 1}, "review": orjson.loads(REQUEST.json)}
    assert data_json == b"{}"


def test_opa_response_passes_through_with_the_request_uid():
    result = orjson.dumps([{"result": {"response": {
        "uid": "from-policy", "allowed": False, "status": {"message": "no", "code": 403, "bogus": 1},
        "warnings": ["w"], "auditAnnotations": {"a": "b"}, "patch": "W10=", "patchType": "JSONPatch",
    }}}])
    response = opa_mode.response_from_opa(REQUEST, result)
    assert response == {"uid": REQUEST.uid, "allowed": False, "patchType": "JSONPatch", "patch": "W10=",
                        "status": {"message": "no", "code": 403}, "auditAnnotations": {"a": "b"},
                        "warnings": ["w"]}


@pytest.mark.parametrize(("result", "message"), [
    ([], "internal server error: cannot interpret OPA policy result"),
    ([{"result": True}], "internal server error: cannot interpret OPA policy result"),
    ([{"result": {"response": {"allowed": True}}}], "internal server error: missing field `uid`"),
    ([{"result": {"response": {"uid": "x"}}}], "internal server error: missing field `allowed`"),
    ([{"result": {"response": {"uid": "x", "allowed": "yes"}}}],
     'internal server error: invalid type: string "yes", expected a boolean'),
])
def test_uninterpretable_opa_results_are_rejections_with_code_500(result, message):
    response = opa_mode.response_from_opa(REQUEST, orjson.dumps(result))
    assert response["allowed"] is False
    assert response["status"] == {"message": message, "code": 500}


def test_gatekeeper_violations():
    accepted = gatekeeper_mode.response_from_gatekeeper(REQUEST, b'[{"result":[]}]')
    assert accepted["allowed"] is True and "status" not in accepted
    rejected = gatekeeper_mode.response_from_gatekeeper(
        REQUEST, orjson.dumps([{"result": [{"msg": "one"}, {"details": {}}, {"msg": "two"}]}]))
    assert rejected["allowed"] is False
    assert rejected["status"] == {"message": "one, two"}  # no code, as the reference


@pytest.mark.parametrize("result", [
    b"[]", b'[{"result": true}]', b'[{"result": {"msg": "x"}}]', b'[{"result": ["x"]}]',
    b'[{"result": [{"msg": 1}]}]', b'{"result": []}', b"not json",
])
def test_uninterpretable_gatekeeper_results_fail_closed(result):
    response = gatekeeper_mode.response_from_gatekeeper(REQUEST, result)
    assert response["allowed"] is False
    assert response["status"]["code"] == 500
    assert response["status"]["message"].startswith("internal server error: cannot interpret Gatekeeper policy result")


def test_raw_request_documents_use_the_raw_value():
    raw = parse_raw_review({"request": {"uid": "u1", "user": "x"}})
    input_json, _ = opa_mode.opa_documents(raw, b"{}")
    assert orjson.loads(input_json) == {"request": {"uid": "u1", "user": "x"}}
