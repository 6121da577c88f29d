"""Per-execution-mode costs of the conformance policies: a fresh instance stage by stage, one evaluation.

    python -m bench.mode_costs [--rounds N]

Medians in µs, one process, epoch interruption on (as when any timeout is configured), two engines
measured side by side:
- `before`: wasmtime's on-demand allocator and the module as compiled (kwserver before issue 26);
- `after`: the pooling allocator with copy-on-write memory images (kwserver/runtime/pooling.py, as with
  `--fresh-instance-per-request`) and, for waPC, the pre-initialised module (kwserver/runtime/preinit.py).
  By default the server gives a pre-initialised module's evaluations a fresh instance by `restore`.

Stages of a fresh waPC instance, each the difference of two medians: `store` (a new store with its
limits, then closed), `instantiate` (from the InstancePre, with the teardown of an untouched instance),
`init` (`_start`/`wapc_init` and the instance's Python objects), `first call` (the first `validate`
on the new instance minus one on a reused instance: page faults), `teardown` (closing the store after a
call). `new instance` is the whole of it (new instance, one call, close) and `reused` one call on a
reused instance. `restore` puts an instance of a pre-initialised module back into the state of a new
one after a call (kwserver/runtime/pristine.py), which is how the server gives such modules a fresh
instance: `fresh - reused` is what a fresh instance adds to an evaluation, the cheaper of the two ways
(`-`: no way). WASI runs a fresh instance
per evaluation by design (one figure); OPA's `create` is store + memory + instantiate. A last table
compares the ways of instantiating an OPA module, whose memory is imported so that no InstancePre can
be built. Last, the evaluation path as a worker runs it without HTTP (the registry and instance pool the
server builds for deploy/examples/policies.yml, pod-privileged's 5 KB pod): CPU µs per evaluation,
reused and fresh, medians of 10 interleaved batches. Writes bench/results/mode_costs/{results.json,report.md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import orjson
import wasmtime

from kwserver.runtime import InstanceLimits, fastcall, new_store, preinit, wapc
from kwserver.runtime.engine import EngineOptions, EpochTicker, make_engine
from kwserver.runtime.opa import OpaModule
from kwserver.runtime.pooling import PoolSize
from kwserver.runtime.wapc import WapcModule
from kwserver.runtime.wasi_command import WasiCommandModule

REPO = Path(__file__).resolve().parent.parent
CONFORMANCE = REPO.parent / "shared" / "conformance"
RESULTS = REPO / "bench" / "results" / "mode_costs"
LIMITS = InstanceLimits(memory_bytes=256 << 20, timeout_seconds=2)
AFTER = EngineOptions(epoch_interruption=True, pool=PoolSize.for_policies(10, LIMITS.memory_bytes))
BEFORE = replace(AFTER, pool=None)
STAGES = ("store", "instantiate", "init", "first call", "teardown", "new instance", "restore", "reused",
          "fresh - reused")


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


def wapc_stages(engine: wasmtime.Engine, wasm: bytes, payload: bytes, rounds: int) -> dict[str, float]:
    linked = WapcModule(engine, wasmtime.Module(engine, wasm), epoch_interruption=True)

    def store_only() -> None:
        new_store(engine, LIMITS).close()

    def instantiate() -> None:
        store = new_store(engine, LIMITS)
        store.set_epoch_deadline(1 << 20)
        fastcall.instantiate(linked.pre, store)
        store.close()

    def create() -> None:
        linked.instantiate(LIMITS).close()

    def fresh() -> None:
        instance = linked.instantiate(LIMITS)
        instance.call("validate", payload)
        instance.close()

    def teardown(called: bool = True) -> float:
        instance = linked.instantiate(LIMITS)
        if called:
            instance.call("validate", payload)
        started = time.perf_counter()
        instance.close()
        return time.perf_counter() - started

    reused_instance = linked.instantiate(LIMITS)
    reused = median_us(lambda: reused_instance.call("validate", payload), rounds)
    restored = None
    if reused_instance.restorable:
        def restoring() -> float:
            reused_instance.call("validate", payload)
            started = time.perf_counter()
            assert reused_instance.restore()
            return time.perf_counter() - started
        restored = statistics.median(restoring() for _ in range(rounds)) * 1e6
    reused_instance.close()
    store, inst, made, whole = (median_us(f, rounds) for f in (store_only, instantiate, create, fresh))
    closing = statistics.median(teardown() for _ in range(rounds)) * 1e6
    # `create` closes an instance that never ran: what a call adds to closing is counted once, in teardown.
    untouched_closing = statistics.median(teardown(called=False) for _ in range(rounds)) * 1e6
    return {"store": store, "instantiate": inst - store, "init": made - inst,
            "first call": whole - made - reused - (closing - untouched_closing), "teardown": closing,
            "new instance": whole,
            "restore": restored, "reused": reused,
            "fresh - reused": min(whole - reused, restored if restored is not None else whole)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2000)
    rounds = parser.parse_args().rounds
    results: dict[str, dict] = {"rounds": rounds, "wapc": {}, "modes": {}}
    engines = {"before": make_engine(BEFORE), "after": make_engine(AFTER)}
    tickers = [EpochTicker(engine) for engine in engines.values()]
    for ticker in tickers:
        ticker.start()

    pod = orjson.dumps({"request": request("fixtures/kwctl/privileged-pod.json"), "settings": {}})
    template = orjson.dumps({"request": request("fixtures/go-policy-template/pod.json"),
                             "settings": {"denied_names": ["foo"]}})
    guests = [("pod-privileged (Rust, policies/dist)", REPO / "policies/dist/pod-privileged.wasm", pod, rounds),
              ("go-policy-template (TinyGo 2022)",
               CONFORMANCE / "wasm/kubewarden-wapc/go-policy-template-tinygo-2022.wasm", template,
               max(rounds // 4, 50))]
    for name, path, payload, count in guests:
        wasm = path.read_bytes()
        for label, engine in engines.items():
            module = wasm if label == "before" else preinit.preinitialise(
                wasm, wapc.startup(engine, True, LIMITS.memory_bytes))
            results["wapc"].setdefault(name, {})[label] = wapc_stages(engine, module, payload, count)

    wasi_payload = orjson.dumps({"request": request("fixtures/kwctl/privileged-pod.json"), "settings": {}})
    privileged = request("fixtures/kubewarden-policy-server/pod_with_privileged_containers.json")
    rego = [
        ("opa", "kwctl-no-default-namespace-rego", "wasm/opa/kwctl-no-default-namespace-rego.wasm",
         orjson.dumps({"request": privileged})),
        ("gatekeeper", "gatekeeper_always_happy_policy", "wasm/gatekeeper/gatekeeper_always_happy_policy.wasm",
         orjson.dumps({"parameters": {}, "review": privileged})),
        ("opa (raw)", "burrego-k8s-basic (2 sprintf calls)", "wasm/opa-generic/burrego-k8s-basic.wasm",
         (CONFORMANCE / "fixtures/burrego-opa-input/k8s-basic-input.json").read_bytes()),
    ]
    for label, engine in engines.items():
        def module(path: Path, engine: wasmtime.Engine = engine) -> wasmtime.Module:
            return wasmtime.Module(engine, path.read_bytes())

        # WASI: no conformance binary; kwserver's wasi-testbed (Rust, serde_json); every run is fresh
        wasi = WasiCommandModule(engine, module(REPO / "tests/policies/wasi-testbed.wasm"), epoch_interruption=True)
        command = wasi.instantiate(LIMITS)
        run = median_us(lambda command=command: command.call("validate", wasi_payload), max(rounds // 4, 50))
        rows = [("wasi", "wasi-testbed (tests/policies), one run", run, run)]
        for mode, name, path, input_json in rego:
            opa = OpaModule(engine, module(CONFORMANCE / path), epoch_interruption=True)
            instance = opa.instantiate(LIMITS)
            abi = "{}.{}".format(*opa.info.abi_version)
            create = median_us(lambda opa=opa: opa.instantiate(LIMITS).close(), rounds // 4)
            evaluate = median_us(lambda i=instance, j=input_json: i.evaluate(0, j, b"{}"), rounds)
            rows.append((mode, f"{name} (ABI {abi})", create, evaluate))
        results["modes"][label] = [{"mode": m, "policy": n, "create": c, "evaluate": e} for m, n, c, e in rows]

    results["evaluation_path"] = evaluation_path(max(rounds // 2, 100))
    report = render(results)
    print(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "report.md").write_text(report)
    engine = engines["after"]
    print()
    print("Instantiating an OPA module (memory imported, no InstancePre), kwctl-no-default-namespace-rego:")
    compiled = wasmtime.Module(engine, (CONFORMANCE / "wasm/opa/kwctl-no-default-namespace-rego.wasm").read_bytes())
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
    for ticker in tickers:
        ticker.stop()


def evaluation_path(rounds: int) -> dict[str, float]:
    """CPU µs of one evaluation through the Evaluator and InstancePool, reused and fresh, interleaved."""
    import tempfile

    from kwserver.admission import parse_admission_review
    from kwserver.config import ServerSettings
    from kwserver.evaluation import Evaluator, InstancePool
    from kwserver.evaluation.bootstrap import build_registry

    with tempfile.TemporaryDirectory() as cache:
        settings = ServerSettings(policies=str(REPO / "deploy/examples/policies.yml"), compile_cache_dir=cache)
        registry, _ = build_registry(settings)
    ticker = EpochTicker(registry.engine)
    ticker.start()
    review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
              "request": request("fixtures/kwctl/privileged-pod.json")}
    evaluation = parse_admission_review(review)
    evaluators = {mode: Evaluator(registry, InstancePool(registry, reuse=mode == "reused", keep_bytes=32 << 20,
                                                         budget_bytes=512 << 20)) for mode in ("reused", "fresh")}
    samples: dict[str, list[float]] = {mode: [] for mode in evaluators}
    for _ in range(11):
        for mode, evaluator in evaluators.items():
            started = time.process_time()
            for _ in range(rounds):
                evaluator.evaluate("clusterwide-no-privileged-pod", evaluation)
            samples[mode].append((time.process_time() - started) / rounds * 1e6)
    ticker.stop()
    return {mode: statistics.median(values[1:]) for mode, values in samples.items()}  # the first: warm-up


def render(results: dict) -> str:
    lines = ["# bench `mode_costs`: a fresh instance stage by stage, before and after (µs, medians)", "",
             f"{results['rounds']} rounds; `before`: on-demand allocator, module as compiled; `after`: pooling "
             "allocator with copy-on-write images and the pre-initialised module; `restore`: an instance put back "
             "into a new one's state after a call (the default for pre-initialised modules). See "
             "bench/mode_costs.py.", "",
             "| waPC policy | engine | " + " | ".join(STAGES) + " |", "|---|---|" + "---|" * len(STAGES)]
    for name, by_engine in results["wapc"].items():
        for label, stages in by_engine.items():
            lines.append(f"| {name} | {label} | " + " | ".join(
                "-" if stages[s] is None else f"{stages[s]:.0f}" for s in STAGES) + " |")
    lines += ["", "| mode | policy | engine | create µs | evaluate µs |", "|---|---|---|---|---|"]
    for label, rows in results["modes"].items():
        for row in rows:
            lines.append(f"| {row['mode']} | {row['policy']} | {label} | {row['create']:.0f} | {row['evaluate']:.0f} |")
    path = results.get("evaluation_path")
    if path:
        lines += ["", "Evaluation path without HTTP (pod-privileged, CPU µs per evaluation): "
                  f"reused {path['reused']:.0f}, fresh {path['fresh']:.0f}, "
                  f"fresh - reused {path['fresh'] - path['reused']:.0f}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
