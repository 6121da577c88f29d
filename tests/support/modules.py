"""Small hand-written modules for the WASI/OPA/Gatekeeper tests, and helpers to place them on disk.

No Rego compiler is available offline, so misbehaving OPA modules are written in WAT against the
OPA Wasm ABI: "values" are NUL-terminated JSON strings, `opa_json_parse` keeps the text and
`opa_json_dump` returns it, which is all the host ever observes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import wasmtime

from kwserver.evaluation.modes import annotate
from tests.support.paths import CONFORMANCE, REPO

WASI_TESTBED = REPO / "tests" / "policies" / "wasi-testbed.wasm"
OPA_NO_DEFAULT_NS = CONFORMANCE / "wasm/opa/kwctl-no-default-namespace-rego.wasm"
GATEKEEPER_HAPPY = CONFORMANCE / "wasm/gatekeeper/gatekeeper_always_happy_policy.wasm"
GATEKEEPER_UNHAPPY = CONFORMANCE / "wasm/gatekeeper/gatekeeper_always_unhappy_policy.wasm"

# What `eval` does in a fake OPA module.
EVAL_BODIES = {
    "constant": "(global.set $result (i32.const 4096))",  # the result is RESULT below
    "echo-input": "(global.set $result (global.get $input))",  # the result is the input document
    "abort": "(call $abort (i32.const 128))",
    "trap": "unreachable",
    "loop": "(loop $forever (br $forever))",
    "builtin": "(global.set $result (call $builtin1 (i32.const 0) (i32.const 0) (global.get $input)))",
}


def wat_string(text: str) -> str:
    """`text` as the bytes of a WAT string literal."""
    return "".join(f"\\{b:02x}" for b in text.encode())


def opa_module_wat(eval_body: str, *, entrypoints: dict[str, int], builtins: dict[str, int] | None = None,
                   imports: str = "", definitions: str = "", heap: int = 8192, abi_minor: int = 1) -> str:
    """A module of the OPA Wasm ABI whose `eval` runs `eval_body`, which sets `$result` and may read
    `$input` and `$data`. Its builtins are at 1024, its entrypoints at 2048; `opa_malloc` allocates from
    `heap` upwards, growing the memory as needed. `imports` and `definitions` add WAT of the caller's."""
    return f"""(module
  (import "env" "memory" (memory 2))
{imports}
  (global $heap (mut i32) (i32.const {heap}))
  (global $input (mut i32) (i32.const 0))
  (global $data (mut i32) (i32.const 0))
  (global $result (mut i32) (i32.const 0))
  (data (i32.const 1024) "{wat_string(json.dumps(builtins or {}))}\\00")
  (data (i32.const 2048) "{wat_string(json.dumps(entrypoints))}\\00")
{definitions}
  (func $malloc (export "opa_malloc") (param $size i32) (result i32) (local $at i32) (local $end i32) (local $have i32)
    (local.set $at (global.get $heap))
    (local.set $end (i32.add (local.get $at) (i32.add (local.get $size) (i32.const 1))))
    (local.set $have (i32.mul (memory.size) (i32.const 65536)))
    (if (i32.gt_u (local.get $end) (local.get $have))
      (then (drop (memory.grow (i32.add (i32.const 1)
                                        (i32.div_u (i32.sub (local.get $end) (local.get $have)) (i32.const 65536)))))))
    (global.set $heap (local.get $end))
    (local.get $at))
  (func (export "opa_json_parse") (param $at i32) (param $size i32) (result i32)
    (i32.store8 (i32.add (local.get $at) (local.get $size)) (i32.const 0))
    (local.get $at))
  (func (export "opa_json_dump") (param $value i32) (result i32) (local.get $value))
  (func (export "opa_heap_ptr_get") (result i32) (global.get $heap))
  (func (export "opa_heap_ptr_set") (param i32) (global.set $heap (local.get 0)))
  (func (export "opa_eval_ctx_new") (result i32) (i32.const 8))
  (func (export "opa_eval_ctx_set_input") (param i32 i32) (global.set $input (local.get 1)))
  (func (export "opa_eval_ctx_set_data") (param i32 i32) (global.set $data (local.get 1)))
  (func (export "opa_eval_ctx_set_entrypoint") (param i32 i32))
  (func (export "opa_eval_ctx_get_result") (param i32) (result i32) (global.get $result))
  (func (export "eval") (param i32) (result i32) {eval_body} (i32.const 0))
  (func (export "builtins") (result i32) (i32.const 1024))
  (func (export "entrypoints") (result i32) (i32.const 2048))
  (global (export "opa_wasm_abi_version") i32 (i32.const 1))
  (global (export "opa_wasm_abi_minor_version") i32 (i32.const {abi_minor}))
)"""


_ABORT_AND_BUILTIN = """  (import "env" "opa_abort" (func $abort (param i32)))
  (import "env" "opa_builtin1" (func $builtin1 (param i32 i32 i32) (result i32)))"""


def fake_opa_wat(behaviour: str, *, builtins: dict[str, int] | None = None,
                 entrypoints: dict[str, int] | None = None, result: Any = None, abi_minor: int = 1) -> str:
    """An OPA module whose `eval` does `behaviour` (EVAL_BODIES); `result` is its constant result."""
    result_json = json.dumps(result if result is not None else [{"result": []}])
    definitions = (f'  (data (i32.const 128) "aborting on purpose\\00")\n'
                   f'  (data (i32.const 4096) "{wat_string(result_json)}\\00")')
    return opa_module_wat(EVAL_BODIES[behaviour], entrypoints=entrypoints or {"policy/violation": 0},
                          builtins=builtins, imports=_ABORT_AND_BUILTIN, definitions=definitions,
                          abi_minor=abi_minor)


def fake_opa_wasm(behaviour: str, **kwargs: Any) -> bytes:
    return bytes(wasmtime.wat2wasm(fake_opa_wat(behaviour, **kwargs)))


def javy_host_call_wat() -> str:
    """A WASI command importing `kubewarden:javy/host`.`call`: it drains stdin, asks the host to
    list namespaces, drains stdin again for the answer and rejects with the status and answer."""
    # `valid` too: the same output answers validate-settings (it ignores argv)
    prefix = '{"valid":true,"accepted":false,"message":"javy host call returned '
    parts = {0: "kubewarden", 16: "kubernetes", 32: "list_resources_all",
             64: '{"api_version":"v1","kind":"Namespace"}', 128: prefix, 256: ": ", 272: '"}'}
    data = "\n".join(f'  (data (i32.const {at}) "{wat_string(text)}")' for at, text in parts.items())
    return f"""(module
  (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (import "kubewarden:javy/host" "call" (func $call (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
{data}
  (func $drain (param $buf i32) (result i32) (local $total i32)
    (loop $more
      (i32.store (i32.const 1024) (i32.add (local.get $buf) (local.get $total)))
      (i32.store (i32.const 1028) (i32.const 8192))
      (drop (call $read (i32.const 0) (i32.const 1024) (i32.const 1) (i32.const 1040)))
      (local.set $total (i32.add (local.get $total) (i32.load (i32.const 1040))))
      (br_if $more (i32.load (i32.const 1040))))
    (local.get $total))
  (func $iovec (param $slot i32) (param $at i32) (param $len i32)
    (i32.store (i32.add (i32.const 2048) (i32.mul (local.get $slot) (i32.const 8))) (local.get $at))
    (i32.store (i32.add (i32.const 2052) (i32.mul (local.get $slot) (i32.const 8))) (local.get $len)))
  (func (export "_start") (local $status i32) (local $size i32)
    (drop (call $drain (i32.const 8192)))
    (local.set $status (call $call (i32.const 0) (i32.const 10) (i32.const 16) (i32.const 10)
                                   (i32.const 32) (i32.const 18) (i32.const 64) (i32.const {len(parts[64])})))
    (local.set $size (call $drain (i32.const 32768)))
    (i32.store8 (i32.const 300) (i32.add (i32.const 48) (local.get $status)))
    (call $iovec (i32.const 0) (i32.const 128) (i32.const {len(prefix)}))
    (call $iovec (i32.const 1) (i32.const 300) (i32.const 1))
    (call $iovec (i32.const 2) (i32.const 256) (i32.const 2))
    (call $iovec (i32.const 3) (i32.const 32768) (local.get $size))
    (call $iovec (i32.const 4) (i32.const 272) (i32.const 2))
    (drop (call $write (i32.const 1) (i32.const 2048) (i32.const 5) (i32.const 1040))))
)"""


def metadata(mode: str, **extra: Any) -> dict[str, Any]:
    return {"rules": [], "mutating": False, "executionMode": mode, **extra}


def annotated(directory: Path, name: str, wasm: bytes, mode: str, **extra: Any) -> str:
    """Write `wasm` with Kubewarden metadata for `mode` (what `kwctl annotate` does); its path."""
    path = directory / f"{name}.wasm"
    path.write_bytes(annotate(wasm, metadata(mode, **extra)))
    return str(path)


def request_fixture(relative: str, namespace: str | None = None) -> dict[str, Any]:
    """A conformance request fixture as a bare AdmissionRequest.

    runnable-cases.json names `fixtures/js-demo-policy/privileged-pod-*.json`, which the conformance
    folder does not contain; those fall back to kwctl's privileged-pod request (namespace `default`),
    with the namespace changed when the case needs another one.
    """
    path = CONFORMANCE / relative
    if not path.exists() and "js-demo-policy/privileged-pod-" in relative:
        path = CONFORMANCE / "fixtures/kwctl/privileged-pod.json"
        namespace = namespace or relative.rsplit("privileged-pod-", 1)[1].removesuffix(".json")
    doc = json.loads(path.read_text())
    request = doc.get("request", doc) if isinstance(doc, dict) and "request" in doc else doc
    if namespace is not None:
        request = json.loads(json.dumps(request))
        request["namespace"] = namespace
        request.setdefault("object", {}).setdefault("metadata", {})["namespace"] = namespace
    return request


@contextmanager
def in_process_evaluator(directory: Path, policies: dict[str, Any], **settings: Any) -> Iterator[tuple[Any, Any, Any]]:
    """What one worker runs, without HTTP: the registry built as at boot, a reusing InstancePool, an
    Evaluator and the epoch ticker. Yields (evaluator, registry, pool); on exit the ticker stops and
    the pool is emptied."""
    import yaml

    from kwserver.config import ServerSettings
    from kwserver.evaluation import Evaluator, InstancePool
    from kwserver.evaluation.bootstrap import build_registry
    from kwserver.runtime.engine import EpochTicker

    config = directory / "policies.yml"
    config.write_text(yaml.safe_dump(policies))
    cache = directory / "cache"
    cache.mkdir(mode=0o700, exist_ok=True)
    registry, _ = build_registry(ServerSettings(policies=str(config), compile_cache_dir=str(cache), **settings))
    pool = InstancePool(registry, reuse=True, keep_bytes=32 << 20, budget_bytes=512 << 20)
    ticker = EpochTicker(registry.engine)
    ticker.start()
    try:
        yield Evaluator(registry, pool), registry, pool
    finally:
        ticker.stop()
        pool.clear()


def uss_growth(run: Any, *, warmup: int = 1_000, count: int = 10_000) -> int:
    """USS growth (bytes) of this process over `count` calls of `run`, after `warmup` calls."""
    import gc

    import psutil

    for _ in range(warmup):
        run()
    gc.collect()
    before = psutil.Process().memory_full_info().uss
    for _ in range(count):
        run()
    gc.collect()
    return psutil.Process().memory_full_info().uss - before


_WORKER_SCRIPT = """
import json, sys
from pathlib import Path
from kwserver.admission import parse_admission_review, parse_raw_review
from tests.support.modules import in_process_evaluator, uss_growth

args = json.loads(sys.argv[1])
parse = parse_raw_review if args["raw"] else parse_admission_review
request = parse(args["review"])
with in_process_evaluator(Path(args["directory"]), args["policies"]) as (evaluator, registry, pool):
    first = evaluator.evaluate(args["policy"], request)
    size = pool.stats()["idle_bytes"]
    growth = uss_growth(lambda: evaluator.evaluate(args["policy"], request), count=args["count"])
    stats = pool.stats()
print(json.dumps({"first": first, "growth": growth, "idle_bytes_before": size, "stats": stats}))
"""


def worker_memory(directory: Path, policies: dict[str, Any], policy: str, review: dict[str, Any], *,
                  raw: bool = False, count: int = 10_000) -> dict[str, Any]:
    """Run `count` evaluations in a fresh process (one worker's workload, nothing else in it) and
    report its USS growth, the first response and the instance pool's statistics."""
    import subprocess
    import sys

    args = {"directory": str(directory), "policies": policies, "policy": policy, "review": review, "raw": raw,
            "count": count}
    done = subprocess.run([sys.executable, "-c", _WORKER_SCRIPT, json.dumps(args)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- a waPC policy that makes one host call and answers with what the host said --------------------

PREFIX = '{"accepted":false,"message":"'
PAYLOAD_AT = 262144  # up to 256 KiB of payload (certificate chains are JSON arrays of bytes)


def host_call_wat(binding: str, namespace: str, operation: str, payload: bytes) -> str:
    """A raw waPC policy: validate makes the host call and rejects with `ok:<answer>` or `error:<text>`
    (JSON-escaped into the message); validate_settings accepts."""
    texts = {0: binding, 64: namespace, 128: operation, 4096: '{"valid":true}', 4128: PREFIX,
             4200: "ok:", 4208: "error:", 4220: '"}'}
    data = "\n".join(f'  (data (i32.const {at}) "{wat_string(text)}")' for at, text in texts.items())
    lengths = {at: len(text.encode()) for at, text in texts.items()}
    assert len(payload) < 262144
    return f"""(module
  (import "wapc" "__guest_response" (func $respond (param i32 i32)))
  (import "wapc" "__host_call" (func $host_call (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "wapc" "__host_response_len" (func $response_len (result i32)))
  (import "wapc" "__host_response" (func $response (param i32)))
  (import "wapc" "__host_error_len" (func $error_len (result i32)))
  (import "wapc" "__host_error" (func $error (param i32)))
  (memory (export "memory") 8)
{data}
  (data (i32.const {PAYLOAD_AT}) "{wat_string(payload.decode())}")
  (func $copy (param $dst i32) (param $src i32) (param $len i32) (result i32)
    (memory.copy (local.get $dst) (local.get $src) (local.get $len))
    (i32.add (local.get $dst) (local.get $len)))
  (func $escape (param $dst i32) (param $src i32) (param $len i32) (result i32) (local $end i32) (local $c i32)
    (local.set $end (i32.add (local.get $src) (local.get $len)))
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $src) (local.get $end)))
      (local.set $c (i32.load8_u (local.get $src)))
      (if (i32.or (i32.eq (local.get $c) (i32.const 34)) (i32.eq (local.get $c) (i32.const 92)))
        (then (i32.store8 (local.get $dst) (i32.const 92)) (local.set $dst (i32.add (local.get $dst) (i32.const 1)))))
      (if (i32.lt_u (local.get $c) (i32.const 32)) (then (local.set $c (i32.const 32))))
      (i32.store8 (local.get $dst) (local.get $c))
      (local.set $dst (i32.add (local.get $dst) (i32.const 1)))
      (local.set $src (i32.add (local.get $src) (i32.const 1)))
      (br $next)))
    (local.get $dst))
  (func (export "__guest_call") (param $op_len i32) (param $msg_len i32) (result i32) (local $len i32) (local $at i32)
    (if (i32.eq (local.get $op_len) (i32.const 17))
      (then (call $respond (i32.const 4096) (i32.const {lengths[4096]})) (return (i32.const 1))))
    (local.set $at (call $copy (i32.const 131072) (i32.const 4128) (i32.const {lengths[4128]})))
    (if (call $host_call (i32.const 0) (i32.const {lengths[0]}) (i32.const 64) (i32.const {lengths[64]})
                         (i32.const 128) (i32.const {lengths[128]}) (i32.const {PAYLOAD_AT}) (i32.const {len(payload)}))
      (then (local.set $len (call $response_len)) (call $response (i32.const 8192))
            (local.set $at (call $copy (local.get $at) (i32.const 4200) (i32.const 3))))
      (else (local.set $len (call $error_len)) (call $error (i32.const 8192))
            (local.set $at (call $copy (local.get $at) (i32.const 4208) (i32.const 6)))))
    (local.set $at (call $escape (local.get $at) (i32.const 8192) (local.get $len)))
    (local.set $at (call $copy (local.get $at) (i32.const 4220) (i32.const 2)))
    (call $respond (i32.const 131072) (i32.sub (local.get $at) (i32.const 131072)))
    (i32.const 1)))"""


def host_policy(directory: Path, name: str, operation: str, payload: dict[str, Any] | str, *,
                binding: str = "kubewarden", namespace: str = "kubernetes", **policy: Any) -> dict[str, Any]:
    """The policies.yml entry of a policy making one host call; it is granted that call's host capability
    unless `hostCapabilities` is given."""
    from kwserver.host_capabilities import CAPABILITIES

    wasm = wasmtime.wat2wasm(host_call_wat(binding, namespace, operation, json.dumps(payload).encode()))
    module = annotated(directory, name, wasm, "kubewarden-wapc", policyType="raw", protocolVersion="v1")
    if f"{namespace}/{operation}" in CAPABILITIES:
        policy.setdefault("hostCapabilities", [f"{namespace}/{operation}"])
    return {"module": module, **policy}


def answer(server: Any, policy: str) -> tuple[str, Any]:
    """("ok", decoded answer) or ("error", text) of the guest's host call."""
    response = server.post(f"/validate_raw/{policy}", {"request": {"uid": "u"}}).json()["response"]
    outcome, _, text = response["status"]["message"].partition(":")
    return outcome, json.loads(text) if outcome == "ok" else text
