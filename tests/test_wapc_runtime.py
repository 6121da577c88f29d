"""The waPC host against upstream waPC guests, through the runtime's public Python API."""

import pytest
import wasmtime

from kwserver.runtime import GuestCallFailure, GuestTimeout, InstanceLimits, InstantiationFailure
from kwserver.runtime.engine import EngineOptions, make_engine
from kwserver.runtime.wapc import WapcModule
from tests.support.paths import CONFORMANCE, load_json

CASES = [c for c in load_json(CONFORMANCE / "expectations/runnable-cases.json")["cases"] if c["mode"] == "wapc-raw"]


def _payload(case):
    return bytes.fromhex(case["payload_hex"]) if "payload_hex" in case else case["payload_utf8"].encode()


def _instance(engine, path, host=None, timeout=2):
    module = WapcModule(engine, wasmtime.Module.from_file(engine, str(path)), epoch_interruption=True)
    return module.instantiate(InstanceLimits(memory_bytes=64 << 20, timeout_seconds=timeout), host)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_conformance_case(engine, case):
    calls = []

    def host(binding, namespace, operation, payload):
        calls.append({"binding": binding, "namespace": namespace, "operation": operation,
                      "payload_utf8": payload.decode()})
        return b""

    expect = case["expect"]
    instance = _instance(engine, CONFORMANCE / case["policy"], host, expect.get("deadline_seconds", 2))
    if "error" in expect:
        with pytest.raises(GuestTimeout, match=expect["error"]):
            instance.call(case["op"], _payload(case))
        assert instance.broken
        return
    result = instance.call(case["op"], _payload(case))
    if "result_utf8" in expect:
        assert result.decode() == expect["result_utf8"]
    if "result_hex" in expect:
        assert result.hex() == expect["result_hex"]
    if "host_calls" in expect:
        assert calls == expect["host_calls"]


def test_instance_is_reusable(engine):
    instance = _instance(engine, CONFORMANCE / "wasm/wapc-test-guests/wapc_guest_test.wasm")
    for i in range(50):
        text = f"message {i}".encode()
        msgpack_str = bytes([0xA0 | len(text)]) + text  # the guest echoes a msgpack fixstr
        assert instance.call("echo", msgpack_str) == msgpack_str


def test_unknown_operation_is_a_guest_failure(engine):
    instance = _instance(engine, CONFORMANCE / "wasm/wapc-test-guests/wasm_basic.wasm")
    with pytest.raises(GuestCallFailure):
        instance.call("no-such-operation", b"")
    assert not instance.broken


def test_failed_host_call_is_reported_to_the_guest_not_trapped(engine):
    def host(*_):
        raise RuntimeError("unknown binding: binding")

    instance = _instance(engine, CONFORMANCE / "wasm/wapc-test-guests/wasm_basic.wasm", host)
    with pytest.raises(GuestCallFailure):
        instance.call("ping", b"x")


def test_memory_limit_below_module_minimum_fails_instantiation(engine):
    module = WapcModule(engine, wasmtime.Module.from_file(
        engine, str(CONFORMANCE / "wasm/kubewarden-wapc/go-policy-template-tinygo-2022.wasm")), epoch_interruption=True)
    with pytest.raises(InstantiationFailure):
        module.instantiate(InstanceLimits(memory_bytes=64 * 1024, timeout_seconds=2))


def test_module_without_guest_call_is_refused(engine):
    wasm = wasmtime.wat2wasm('(module (memory (export "memory") 1))')
    module = WapcModule(engine, wasmtime.Module(engine, wasm), epoch_interruption=True)
    with pytest.raises(InstantiationFailure, match=r"Guest call function \(__guest_call\) not exported"):
        module.instantiate(InstanceLimits(memory_bytes=1 << 20, timeout_seconds=1))


def test_endless_guest_call_is_interrupted(engine):
    wasm = wasmtime.wat2wasm("""(module (memory (export "memory") 1) (func (export "wapc_init"))
        (func (export "__guest_call") (param i32 i32) (result i32) (loop $l (br $l)) (i32.const 0)))""")
    module = WapcModule(engine, wasmtime.Module(engine, wasm), epoch_interruption=True)
    instance = module.instantiate(InstanceLimits(memory_bytes=1 << 20, timeout_seconds=1))
    with pytest.raises(GuestTimeout, match="guest code interrupted, execution deadline exceeded"):
        instance.call("validate", b"{}")


def test_endless_init_is_an_initialization_failure(engine):
    wasm = wasmtime.wat2wasm("""(module (memory (export "memory") 1) (func (export "wapc_init") (loop $l (br $l)))
        (func (export "__guest_call") (param i32 i32) (result i32) (i32.const 0)))""")
    module = WapcModule(engine, wasmtime.Module(engine, wasm), epoch_interruption=True)
    with pytest.raises(InstantiationFailure,
                       match="Initialization failed: wapc_init init interrupted, execution deadline exceeded"):
        module.instantiate(InstanceLimits(memory_bytes=1 << 20, timeout_seconds=1))


def test_modules_on_two_engines_in_one_process():
    # A reload with different engine options builds a second engine next to the first.
    path = CONFORMANCE / "wasm/wapc-test-guests/wasm_basic.wasm"
    for _ in range(2):
        engine = make_engine(EngineOptions(epoch_interruption=False))
        module = WapcModule(engine, wasmtime.Module.from_file(engine, str(path)), epoch_interruption=False)
        instance = module.instantiate(InstanceLimits(memory_bytes=64 << 20, timeout_seconds=None), lambda *a: b"")
        assert instance.call("ping", b"hi") == b"hi"


def test_wrong_import_signature_is_refused_at_link_time(engine):
    wasm = wasmtime.wat2wasm("""(module (import "wapc" "__guest_response" (func (param i32)))
        (memory (export "memory") 1) (func (export "__guest_call") (param i32 i32) (result i32) (i32.const 0)))""")
    with pytest.raises(InstantiationFailure):
        WapcModule(engine, wasmtime.Module(engine, wasm), epoch_interruption=True)


@pytest.mark.parametrize("policy,review", [
    ("pod-privileged", "fixtures/kubewarden-policy-server/pod_with_privileged_containers.json"),
    (str(CONFORMANCE / "wasm/kubewarden-wapc/go-policy-template-tinygo-2022.wasm"),
     "fixtures/kubewarden-policy-server/pod_with_privileged_containers.json"),
])
def test_memory_10000_evaluations_in_one_worker(tmp_path, policy, review):
    """waPC, Rust and TinyGo: one reused instance serves 10,000 evaluations; its memory and the process
    USS stay flat (bound 1 MiB, about 100 bytes per evaluation: far below any per-request leak)."""
    from tests.support.modules import worker_memory
    from tests.support.paths import as_review, policy_path

    module = policy if policy.endswith(".wasm") else policy_path(policy)
    result = worker_memory(tmp_path, {"p": {"module": module}}, "p", as_review(load_json(CONFORMANCE / review)))
    assert "allowed" in result["first"]
    assert result["stats"]["misses"] == 1 and result["stats"]["discards"] == 0
    assert result["stats"]["idle_bytes"] == result["idle_bytes_before"]
    assert result["growth"] < 1 << 20, f"USS grew by {result['growth']} bytes over 10,000 evaluations"
