"""Small hand-written modules for the WASI/OPA/Gatekeeper tests, and helpers to place them on disk.

No Rego compiler is available offline, so misbehaving OPA modules are written in WAT against the
OPA Wasm ABI: "values" are NUL-terminated JSON strings, `opa_json_parse` keeps the text and
`opa_json_dump` returns it, which is all the host ever observes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import wasmtime

from kwserver.metadata import annotate
from tests.conftest import CONFORMANCE, REPO

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


def _wat_string(text: str) -> str:
    return "".join(f"\\{b:02x}" for b in text.encode())


def fake_opa_wat(behaviour: str, *, builtins: dict[str, int] | None = None,
                 entrypoints: dict[str, int] | None = None, result: Any = None, abi_minor: int = 1) -> str:
    builtins_json = json.dumps(builtins or {})
    entrypoints_json = json.dumps(entrypoints or {"policy/violation": 0})
    result_json = json.dumps(result if result is not None else [{"result": []}])
    return f"""(module
  (import "env" "memory" (memory 2))
  (import "env" "opa_abort" (func $abort (param i32)))
  (import "env" "opa_builtin1" (func $builtin1 (param i32 i32 i32) (result i32)))
  (global $heap (mut i32) (i32.const 8192))
  (global $input (mut i32) (i32.const 0))
  (global $result (mut i32) (i32.const 0))
  (data (i32.const 1024) "{_wat_string(builtins_json)}\\00")
  (data (i32.const 2048) "{_wat_string(entrypoints_json)}\\00")
  (data (i32.const 128) "aborting on purpose\\00")
  (data (i32.const 4096) "{_wat_string(result_json)}\\00")
  (func (export "opa_malloc") (param $size i32) (result i32) (local $at i32)
    (local.set $at (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (i32.add (local.get $size) (i32.const 1))))
    (local.get $at))
  (func (export "opa_json_parse") (param $at i32) (param $size i32) (result i32)
    (i32.store8 (i32.add (local.get $at) (local.get $size)) (i32.const 0))
    (local.get $at))
  (func (export "opa_json_dump") (param $value i32) (result i32) (local.get $value))
  (func (export "opa_heap_ptr_get") (result i32) (global.get $heap))
  (func (export "opa_heap_ptr_set") (param i32) (global.set $heap (local.get 0)))
  (func (export "opa_eval_ctx_new") (result i32) (i32.const 8))
  (func (export "opa_eval_ctx_set_input") (param i32 i32) (global.set $input (local.get 1)))
  (func (export "opa_eval_ctx_set_data") (param i32 i32))
  (func (export "opa_eval_ctx_set_entrypoint") (param i32 i32))
  (func (export "opa_eval_ctx_get_result") (param i32) (result i32) (global.get $result))
  (func (export "eval") (param i32) (result i32) {EVAL_BODIES[behaviour]} (i32.const 0))
  (func (export "builtins") (result i32) (i32.const 1024))
  (func (export "entrypoints") (result i32) (i32.const 2048))
  (global (export "opa_wasm_abi_version") i32 (i32.const 1))
  (global (export "opa_wasm_abi_minor_version") i32 (i32.const {abi_minor}))
)"""


def fake_opa_wasm(behaviour: str, **kwargs: Any) -> bytes:
    return bytes(wasmtime.wat2wasm(fake_opa_wat(behaviour, **kwargs)))


def javy_host_call_wat() -> str:
    """A WASI command importing `kubewarden:javy/host`.`call`: it drains stdin, asks the host to
    list namespaces, drains stdin again for the answer and rejects with the status and answer."""
    # `valid` too: the same output answers validate-settings (it ignores argv)
    prefix = '{"valid":true,"accepted":false,"message":"javy host call returned '
    parts = {0: "kubewarden", 16: "kubernetes", 32: "list_resources_all",
             64: '{"api_version":"v1","kind":"Namespace"}', 128: prefix, 256: ": ", 272: '"}'}
    data = "\n".join(f'  (data (i32.const {at}) "{_wat_string(text)}")' for at, text in parts.items())
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


def in_process_evaluator(directory: Path, policies: dict[str, Any], **settings: Any) -> Any:
    """What one worker runs, without HTTP: the registry built as at boot, a reusing InstancePool and
    an Evaluator. Returns (evaluator, registry, pool); start an EpochTicker on registry.engine."""
    import yaml

    from kwserver.bootstrap import build_registry
    from kwserver.config import ServerSettings
    from kwserver.evaluation import Evaluator, InstancePool

    config = directory / "policies.yml"
    config.write_text(yaml.safe_dump(policies))
    cache = directory / "cache"
    cache.mkdir(mode=0o700, exist_ok=True)
    registry, _ = build_registry(ServerSettings(policies=str(config), compile_cache_dir=str(cache), **settings))
    pool = InstancePool(registry, reuse=True, keep_bytes=32 << 20, budget_bytes=512 << 20)
    return Evaluator(registry, pool), registry, pool


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
from kwserver.runtime.engine import EpochTicker
from tests.mode_fixtures import in_process_evaluator, uss_growth

args = json.loads(sys.argv[1])
evaluator, registry, pool = in_process_evaluator(Path(args["directory"]), args["policies"])
parse = parse_raw_review if args["raw"] else parse_admission_review
request = parse(args["review"])
ticker = EpochTicker(registry.engine)
ticker.start()
first = evaluator.evaluate(args["policy"], request)
size = pool.stats()["idle_bytes"]
growth = uss_growth(lambda: evaluator.evaluate(args["policy"], request), count=args["count"])
ticker.stop()
print(json.dumps({"first": first, "growth": growth, "idle_bytes_before": size, "stats": pool.stats()}))
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
