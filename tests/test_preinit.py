"""Pre-initialised modules (kwserver/runtime/preinit.py): same answers, no start-up per instance, and
plain instantiation for what cannot be snapshot safely."""

import json

import orjson
import pytest
import wasmtime

from kwserver.evaluation.modes import mode_named
from kwserver.runtime import InstanceLimits, preinit, wapc
from kwserver.runtime.engine import CompileCache, EngineOptions
from kwserver.runtime.wapc import WapcModule
from tests.support.paths import CONFORMANCE, REPO

LIMITS = InstanceLimits(memory_bytes=64 << 20, timeout_seconds=2)
LIBRARY = REPO / "policies" / "dist"


def _snapshot(engine, wasm: bytes) -> bytes:
    return preinit.preinitialise(wasm, wapc.startup(engine, True, LIMITS.memory_bytes))


def _linked(engine, wasm: bytes) -> WapcModule:
    return WapcModule(engine, wasmtime.Module(engine, wasm), epoch_interruption=True)


def _answer(linked: WapcModule, operation: str, payload: bytes) -> bytes:
    instance = linked.instantiate(LIMITS)
    try:
        return instance.call(operation, payload)
    except Exception as exc:  # the same failure, as text, is the same answer
        return f"{type(exc).__name__}: {exc}".encode()
    finally:
        instance.close()


def _request(relative: str) -> dict:
    doc = json.loads((CONFORMANCE / relative).read_text())
    return doc.get("request", doc)


PRIVILEGED = _request("fixtures/kwctl/privileged-pod.json")
TEMPLATE_POD = _request("fixtures/go-policy-template/pod.json")
TEMPLATE_POD_NAME = TEMPLATE_POD["object"]["metadata"]["name"]


@pytest.mark.parametrize("path, calls", [
    (LIBRARY / "pod-privileged.wasm", [
        ("validate", {"request": PRIVILEGED, "settings": {}}),
        ("validate_settings", {}),
        ("validate", {"request": {"uid": "x"}, "settings": {}}),  # refused by the guest
    ]),
    (LIBRARY / "capabilities-psp.wasm", [
        ("validate", {"request": PRIVILEGED, "settings": {"required_drop_capabilities": ["ALL"]}}),
        ("validate_settings", {"allowed_capabilities": ["*"], "required_drop_capabilities": ["NET_ADMIN"]}),
    ]),
    (CONFORMANCE / "wasm/kubewarden-wapc/go-policy-template-tinygo-2022.wasm", [
        ("validate", {"request": TEMPLATE_POD, "settings": {"denied_names": ["foo"]}}),
        ("validate", {"request": TEMPLATE_POD, "settings": {"denied_names": [TEMPLATE_POD_NAME]}}),
        ("validate_settings", {"denied_names": "not a list"}),
    ]),
], ids=["rust-pod-privileged", "rust-capabilities-psp", "tinygo-go-policy-template"])
def test_preinitialised_module_answers_as_the_original(engine, path, calls):
    wasm = path.read_bytes()
    plain, snapshot = _linked(engine, wasm), _linked(engine, _snapshot(engine, wasm))
    assert plain.initialisers and not snapshot.initialisers  # the start-up no longer runs per instance
    for operation, payload in calls:
        body = orjson.dumps(payload)
        assert _answer(snapshot, operation, body) == _answer(plain, operation, body)


COUNTER = """(module
  (import "wapc" "__guest_response" (func $respond (param i32 i32)))
  (memory (export "memory") 1)
  (global $inits (mut i32) (i32.const 0))
  (global $seed (mut i64) (i64.const 0))
  (func (export "wapc_init")
    (global.set $inits (i32.add (global.get $inits) (i32.const 1)))
    (global.set $seed (i64.const -7))
    (drop (memory.grow (i32.const 1)))
    (i32.store8 (i32.const 70000) (i32.const 42)))
  (func (export "__guest_call") (param i32 i32) (result i32)
    ;; answers three bytes: init runs seen, the byte the init wrote, seed == -7
    (i32.store8 (i32.const 16) (i32.add (global.get $inits) (i32.const 48)))
    (i32.store8 (i32.const 17) (i32.load8_u (i32.const 70000)))
    (i32.store8 (i32.const 18) (i32.add (i64.eq (global.get $seed) (i64.const -7)) (i32.const 48)))
    (global.set $inits (i32.add (global.get $inits) (i32.const 10)))
    (call $respond (i32.const 16) (i32.const 3))
    (i32.const 1)))
"""


def test_snapshot_holds_memory_and_globals_and_the_start_up_never_runs_again(engine):
    wasm = wasmtime.wat2wasm(COUNTER)
    snapshot = _linked(engine, _snapshot(engine, wasm))
    exports = {e.name for e in wasmtime.Module(engine, _snapshot(engine, wasm)).exports}
    assert preinit.PREINITIALISED_EXPORT in exports and "wapc_init" in exports
    # The init ran once (at snapshot time); the memory it grew into (page 2) and wrote is there.
    assert _answer(snapshot, "x", b"") == b"1*1"
    # A second fresh instance starts from the snapshot again, not from the first instance's state.
    assert _answer(snapshot, "x", b"") == b"1*1"


@pytest.mark.parametrize("body, reason", [
    ('(import "wapc" "__host_call" (func $host (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))'
     '(memory (export "memory") 1)'
     '(func (export "wapc_init") (drop (call $host (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)'
     ' (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0))))', "calls the host"),
    ('(memory (export "memory") 1) (table 2 funcref) (func $f)'
     '(func (export "wapc_init") (table.set (i32.const 0) (ref.func $f)))', "writes to tables"),
    ('(memory (export "memory") 1) (data "passive")', "passive data"),
    ('(memory (export "memory") 1) (func (export "wapc_init") unreachable)', "start-up failed"),
    ('(memory (export "memory") 1) (memory 1)', "2 memories"),
    ('(memory (export "memory") 1) (global (mut externref) (ref.null extern))', "not a number"),
])
def test_what_cannot_be_snapshot_is_refused(engine, body, reason):
    wasm = wasmtime.wat2wasm(f"(module {body} (func (export \"__guest_call\") (param i32 i32) (result i32) "
                             "(i32.const 0)))")
    with pytest.raises(preinit.NotPreinitialisable, match=reason):
        _snapshot(engine, wasm)


def test_snapshot_is_cached_beside_the_compiled_module(engine, tmp_path, monkeypatch):
    cache = CompileCache(tmp_path, EngineOptions(epoch_interruption=True))
    wasm = (LIBRARY / "echo.wasm").read_bytes()
    first = preinit.load(engine, cache, wasm, "digest", wapc.startup, LIMITS.memory_bytes, engine)
    assert first is not None and list(tmp_path.glob("digest-preinit*.cwasm"))

    def no_start_up(*_args):
        raise AssertionError("the start-up ran again on a warm cache")

    monkeypatch.setattr(preinit, "preinitialise", no_start_up)
    module, _ = preinit.load(engine, cache, wasm, "digest", wapc.startup, LIMITS.memory_bytes, engine)
    assert preinit.PREINITIALISED_EXPORT in {e.name for e in module.exports}
    assert (cache.hits, cache.misses) == (0, 0)  # counted apart from the policies' own modules
    # Modes without a start-up to skip are served as they are.
    assert mode_named("wasi").startup is None and mode_named("kubewarden-wapc").startup is wapc.startup
