"""The naive baseline: an admission server built the obvious way, to measure what kwserver's design buys.

- no preload: gunicorn forks first, then every worker imports this app and compiles every module
  itself (one `wasmtime.Module` per module file, per worker; no compile cache, nothing shared);
- one `Linker` per module, but a new Store and `Linker.instantiate` per request (no `InstancePre`),
  `_start`/`wapc_init`, one waPC call, then the instance is dropped;
- waPC host functions over wasmtime-py's public API (`Caller`, `Memory.read/write`), WASI from
  wasmtime's own `define_wasi`.

The HTTP and AdmissionReview handling (parsing, payload, response, mutation post-processing) is
kwserver's own (kwserver.admission), so the comparison isolates the wasm execution design.
Configuration: `BENCH_NAIVE_POLICIES` = a policies.yml; plain policies only (groups answer 404).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import falcon
import orjson
import wasmtime

from bench._ready import mark_worker_ready
from kwserver import admission
from kwserver.config import PolicySpec, load_policies
from kwserver.evaluation.modes.wapc import response_from_validation
from kwserver.sources import resolve_local_path

log = logging.getLogger("bench.naive")

_I32 = wasmtime.ValType.i32()


class _Call(threading.local):
    """The waPC call in progress on this thread (host functions are defined once per linker)."""

    op: bytes = b""
    payload: bytes = b""
    response: bytes | None = None
    error: str | None = None


_call = _Call()


def _memory(caller: wasmtime.Caller) -> wasmtime.Memory:
    memory = caller.get("memory")
    if not isinstance(memory, wasmtime.Memory):
        raise RuntimeError("guest exports no memory")
    return memory


def _guest_request(caller: wasmtime.Caller, op_ptr: int, ptr: int) -> None:
    memory = _memory(caller)
    memory.write(caller, _call.op, op_ptr)
    memory.write(caller, _call.payload, ptr)


def _guest_response(caller: wasmtime.Caller, ptr: int, length: int) -> None:
    _call.response = bytes(_memory(caller).read(caller, ptr, ptr + length))


def _guest_error(caller: wasmtime.Caller, ptr: int, length: int) -> None:
    _call.error = bytes(_memory(caller).read(caller, ptr, ptr + length)).decode("utf-8", "replace")


def _host_call(caller: wasmtime.Caller, *args: int) -> int:
    _call.error = None
    return 0  # no host capabilities in the naive server


def _zero(caller: wasmtime.Caller, *args: int) -> int:
    return 0


def _nothing(caller: wasmtime.Caller, *args: int) -> None:
    return None


def _console_log(caller: wasmtime.Caller, ptr: int, length: int) -> None:
    log.info("guest: %s", bytes(_memory(caller).read(caller, ptr, ptr + length)).decode("utf-8", "replace"))


def _ty(params: int, results: int) -> wasmtime.FuncType:
    return wasmtime.FuncType([_I32] * params, [_I32] * results)


HOST_FUNCTIONS = {
    "__guest_request": (_guest_request, _ty(2, 0)),
    "__guest_response": (_guest_response, _ty(2, 0)),
    "__guest_error": (_guest_error, _ty(2, 0)),
    "__host_call": (_host_call, _ty(8, 1)),
    "__host_response_len": (_zero, _ty(0, 1)),
    "__host_response": (_nothing, _ty(1, 0)),
    "__host_error_len": (_zero, _ty(0, 1)),
    "__host_error": (_nothing, _ty(1, 0)),
    "__console_log": (_console_log, _ty(2, 0)),
}


class NaivePolicy:
    def __init__(self, spec: PolicySpec, engine: wasmtime.Engine, module: wasmtime.Module,
                 linker: wasmtime.Linker):
        self.spec = spec
        self.engine = engine
        self.module = module
        self.linker = linker
        self.settings_json = orjson.dumps(spec.settings)

    def call(self, operation: str, payload: bytes) -> bytes:
        store = wasmtime.Store(self.engine)
        store.set_wasi(wasmtime.WasiConfig())
        instance = self.linker.instantiate(store, self.module)
        exports = instance.exports(store)
        for init in ("_start", "wapc_init"):
            func = exports.get(init)
            if isinstance(func, wasmtime.Func):
                try:
                    func(store)
                except wasmtime.ExitTrap as exc:
                    if exc.code != 0:
                        raise
        _call.op, _call.payload = operation.encode(), payload
        _call.response = _call.error = None
        ok = exports["__guest_call"](store, len(_call.op), len(payload))
        if ok == 1 and _call.response is not None:
            return _call.response
        raise RuntimeError(_call.error or "guest call failed")


def load(config: str) -> dict[str, NaivePolicy]:
    """Compile every module of the config in this process (this runs in each worker)."""
    engine = wasmtime.Engine()
    base_dir = Path(config).resolve().parent
    compiled: dict[Path, tuple[wasmtime.Module, wasmtime.Linker]] = {}
    policies = {}
    for name, entry in load_policies(config).items():
        if not isinstance(entry, PolicySpec):
            continue
        path = resolve_local_path(entry.module, base_dir)
        if path not in compiled:
            module = wasmtime.Module.from_file(engine, str(path))
            linker = wasmtime.Linker(engine)
            linker.define_wasi()
            for func_name, (func, functype) in HOST_FUNCTIONS.items():
                linker.define_func("wapc", func_name, functype, func, access_caller=True)
            compiled[path] = (module, linker)
        module, linker = compiled[path]
        policies[name] = NaivePolicy(entry, engine, module, linker)
    return policies


class Validate:
    def __init__(self, policies: dict[str, NaivePolicy], raw: bool):
        self.policies = policies
        self.raw = raw

    def on_post(self, req: falcon.Request, resp: falcon.Response, policy_id: str) -> None:
        policy = self.policies.get(policy_id)
        if policy is None:
            raise falcon.HTTPNotFound()
        doc = orjson.loads(req.bounded_stream.read())
        request = admission.parse_raw_review(doc) if self.raw else admission.parse_admission_review(doc)
        try:
            raw = policy.call("validate", admission.validation_payload(request, policy.settings_json))
            response: dict[str, Any] = response_from_validation(request, raw)
        except (RuntimeError, wasmtime.WasmtimeError, wasmtime.Trap) as exc:
            response = admission.internal_error(request.uid, f"Guest call failure: {exc}")
        response = admission.post_process(
            response, policy_id=policy_id, policy_mode=policy.spec.policy_mode,
            allowed_to_mutate=policy.spec.allowed_to_mutate, custom_message=policy.spec.message,
        )
        envelope = admission.raw_envelope if self.raw else admission.review_envelope
        resp.content_type = falcon.MEDIA_JSON
        resp.data = orjson.dumps(envelope(response))


def create_app(config: str) -> falcon.App:
    policies = load(config)
    app = falcon.App()
    app.add_route("/validate/{policy_id}", Validate(policies, raw=False))
    app.add_route("/validate_raw/{policy_id}", Validate(policies, raw=True))
    return app


app = create_app(os.environ["BENCH_NAIVE_POLICIES"]) if os.environ.get("BENCH_NAIVE_POLICIES") else None
if app is not None:
    mark_worker_ready()
