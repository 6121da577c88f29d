"""Per-execution-mode costs of the conformance policies: instance creation and one evaluation.

    python -m bench.mode_costs [--rounds N]

Medians in µs, one process, epoch interruption on (as when any timeout is configured). "create" is
what a fresh instance costs (waPC: instantiate + `_start`/`wapc_init`; OPA: store + memory + link +
instantiate); "evaluate" is one evaluation on a reused instance (waPC, OPA, Gatekeeper) or one whole
command run (WASI, whose every evaluation is a fresh instance). A second table compares the ways of
instantiating an OPA module, whose memory is imported so that no InstancePre can be built.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import wasmtime

from kwserver.runtime import InstanceLimits
from kwserver.runtime.engine import EngineOptions, EpochTicker, make_engine
from kwserver.runtime.opa import OpaModule
from kwserver.runtime.wapc import WapcModule
from kwserver.runtime.wasi_command import WasiCommandModule

REPO = Path(__file__).resolve().parent.parent
CONFORMANCE = REPO.parent / "shared" / "conformance"
LIMITS = InstanceLimits(memory_bytes=256 << 20, timeout_seconds=2)


def median_us(func: Callable[[], object], rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        func()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e6


def request(relative: str) -> dict:
    doc = json.loads((CONFORMANCE / relative).read_text())
    return doc.get("request", doc) if "request" in doc and "uid" not in doc else doc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2000)
    rounds = parser.parse_args().rounds
    engine = make_engine(EngineOptions(epoch_interruption=True))
    ticker = EpochTicker(engine)
    ticker.start()
    rows = []

    def module(path: Path) -> wasmtime.Module:
        return wasmtime.Module(engine, path.read_bytes())

    # waPC: the TinyGo go-policy-template (needs _start before every fresh instance)
    wapc = WapcModule(engine, module(CONFORMANCE / "wasm/kubewarden-wapc/go-policy-template-tinygo-2022.wasm"),
                      epoch_interruption=True)
    pod = request("fixtures/go-policy-template/pod.json")
    payload = orjson.dumps({"request": pod, "settings": {"denied_names": ["foo"]}})
    instance = wapc.instantiate(LIMITS)
    rows.append(("kubewarden-wapc", "go-policy-template-tinygo-2022",
                 median_us(lambda: wapc.instantiate(LIMITS).close(), max(rounds // 10, 50)),
                 median_us(lambda: instance.call("validate", payload), rounds)))

    # WASI: no conformance binary; kwserver's wasi-testbed (Rust, serde_json)
    wasi = WasiCommandModule(engine, module(REPO / "tests/policies/wasi-testbed.wasm"), epoch_interruption=True)
    command = wasi.instantiate(LIMITS)
    payload = orjson.dumps({"request": request("fixtures/kwctl/privileged-pod.json"), "settings": {}})
    run = median_us(lambda: command.call("validate", payload), max(rounds // 4, 50))
    rows.append(("wasi", "wasi-testbed (tests/policies)", run, run))

    # OPA and Gatekeeper
    privileged = request("fixtures/kubewarden-policy-server/pod_with_privileged_containers.json")
    rego = [
        ("opa", "kwctl-no-default-namespace-rego", "wasm/opa/kwctl-no-default-namespace-rego.wasm",
         orjson.dumps({"request": privileged})),
        ("gatekeeper", "gatekeeper_always_happy_policy", "wasm/gatekeeper/gatekeeper_always_happy_policy.wasm",
         orjson.dumps({"parameters": {}, "review": privileged})),
        ("gatekeeper", "gatekeeper_always_unhappy_policy", "wasm/gatekeeper/gatekeeper_always_unhappy_policy.wasm",
         orjson.dumps({"parameters": {}, "review": privileged})),
        ("opa (raw)", "burrego-k8s-basic (2 sprintf calls)", "wasm/opa-generic/burrego-k8s-basic.wasm",
         (CONFORMANCE / "fixtures/burrego-opa-input/k8s-basic-input.json").read_bytes()),
    ]
    for mode, name, path, input_json in rego:
        opa = OpaModule(engine, module(CONFORMANCE / path), epoch_interruption=True)
        instance = opa.instantiate(LIMITS)
        abi = "{}.{}".format(*opa.info.abi_version)
        create = median_us(lambda opa=opa: opa.instantiate(LIMITS).close(), rounds // 4)
        evaluate = median_us(lambda i=instance, j=input_json: i.evaluate(0, j, b"{}"), rounds)
        rows.append((mode, f"{name} (ABI {abi})", create, evaluate))
    print(f"{'mode':<16} {'policy':<46} {'create µs':>10} {'evaluate µs':>12}")
    for mode, name, create, evaluate in rows:
        print(f"{mode:<16} {name:<46} {create:>10.0f} {evaluate:>12.0f}")
    print("(WASI: every evaluation is a fresh store + instance + run, so both columns are one run)")

    print()
    print("Instantiating an OPA module (memory imported, no InstancePre), kwctl-no-default-namespace-rego:")
    compiled = module(CONFORMANCE / "wasm/opa/kwctl-no-default-namespace-rego.wasm")
    funcs = {i.name: i.type for i in compiled.imports if isinstance(i.type, wasmtime.FuncType)}
    memory_type = wasmtime.MemoryType(wasmtime.Limits(5, None))

    def host(*_: int) -> int:
        return 0

    def new_linker() -> None:
        store = wasmtime.Store(engine)
        store.set_epoch_deadline(1 << 30)
        linker = wasmtime.Linker(engine)
        linker.define(store, "env", "memory", wasmtime.Memory(store, memory_type))
        for import_name, functype in funcs.items():
            linker.define_func("env", import_name, functype, host)
        linker.instantiate(store, compiled)
        store.close()

    shared = wasmtime.Linker(engine)
    shared.allow_shadowing = True
    for import_name, functype in funcs.items():
        shared.define_func("env", import_name, functype, host)

    def shared_linker() -> None:
        store = wasmtime.Store(engine)
        store.set_epoch_deadline(1 << 30)
        shared.define(store, "env", "memory", wasmtime.Memory(store, memory_type))
        shared.instantiate(store, compiled)
        store.close()

    order = [i.name for i in compiled.imports]

    def import_list() -> None:
        store = wasmtime.Store(engine)
        store.set_epoch_deadline(1 << 30)
        imports = [wasmtime.Memory(store, memory_type) if n == "memory" else wasmtime.Func(store, funcs[n], host)
                   for n in order]
        wasmtime.Instance(store, compiled, imports)
        store.close()

    for label, func in (("new Linker per instance", new_linker),
                        ("one Linker, memory redefined per store (kwserver)", shared_linker),
                        ("Instance(store, module, imports) with per-store Funcs", import_list)):
        func()
        print(f"  {label:<56} {median_us(func, rounds // 2):>6.0f} µs")
    ticker.stop()


if __name__ == "__main__":
    main()
