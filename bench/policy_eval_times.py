"""Module size and median in-process `validate` time of each policy of the library on a ~5 KB Pod.

Uses kwserver's runtime directly (no HTTP, no gunicorn): one engine with epoch interruption, one
reused instance per policy, `instance.call("validate", payload)` in a loop. The payload is built the
way the server builds it: `{"request": <AdmissionRequest>, "settings": <settings>}`.

    python bench/policy_eval_times.py [--iterations 2000] [--json out.json]

Each policy gets the settings of its entry in deploy/examples/policies.yml (the production
configuration; safe-labels and deprecated-api-versions, not part of it, get representative settings),
and the Pod is the unprivileged nginx Pod of the reference policy-server's test data, grown to ~5 KB
with annotations and environment variables. Every policy decodes the whole request and walks the Pod
to the end; the outcome (accept / reject / mutate) is reported next to the timing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import wasmtime
import yaml

from kwserver.runtime import InstanceLimits
from kwserver.runtime.engine import EngineOptions, make_engine
from kwserver.runtime.wapc import WapcModule

REPO = Path(__file__).resolve().parent.parent
DIST = REPO / "policies" / "dist"
EXAMPLE = REPO / "deploy" / "examples" / "policies.yml"
POD_FIXTURE = REPO.parent / "shared" / "conformance" / "fixtures" / "kubewarden-policy-server" / \
    "pod_without_privileged_containers.json"

EXTRA_SETTINGS: dict[str, dict[str, Any]] = {
    "safe-labels": {"denied_labels": ["forbidden"], "mandatory_labels": ["app"],
                    "constrained_labels": {"app": "^[a-z]+$"}},
    "deprecated-api-versions": {"kubernetes_version": "1.30.0"},
}


def pod_request(target_bytes: int = 5 * 1024) -> dict[str, Any]:
    """An AdmissionRequest for a Pod of about `target_bytes` of JSON."""
    if POD_FIXTURE.exists():
        request = json.loads(POD_FIXTURE.read_text())["request"]
    else:  # outside the lab: a minimal Pod
        request = {
            "uid": "bench", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"}, "operation": "CREATE",
            "namespace": "default", "userInfo": {"username": "bench"},
            "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "nginx", "namespace": "default"},
                       "spec": {"containers": [{"name": "nginx", "image": "nginx"}]}},
        }
    obj = request["object"]
    obj["metadata"].setdefault("labels", {})["app"] = "nginx"
    annotations = obj["metadata"].setdefault("annotations", {})
    containers = obj["spec"]["containers"]
    i = 0
    while len(orjson.dumps(request)) < target_bytes:
        if i % 2:
            annotations[f"example.com/note-{i}"] = "x" * 40
        else:
            containers[i // 2 % len(containers)].setdefault("env", []).append(
                {"name": f"VARIABLE_{i}", "value": "some configuration value"})
        i += 1
    return request


def policy_settings() -> dict[str, dict[str, Any]]:
    """Settings per module name, from the production example."""
    settings: dict[str, dict[str, Any]] = dict(EXTRA_SETTINGS)
    for entry in yaml.safe_load(EXAMPLE.read_text()).values():
        name = Path(entry["module"]).stem
        settings.setdefault(name, entry.get("settings") or {})
    return settings


def measure(engine: wasmtime.Engine, path: Path, payload: bytes, iterations: int) -> tuple[float, dict[str, Any]]:
    module = WapcModule(engine, wasmtime.Module.from_file(engine, str(path)), epoch_interruption=True)
    instance = module.instantiate(InstanceLimits(memory_bytes=256 << 20, timeout_seconds=2))
    try:
        answer = orjson.loads(instance.call("validate", payload))
        for _ in range(min(200, iterations)):  # warm-up
            instance.call("validate", payload)
        samples = []
        for _ in range(iterations):
            start = time.perf_counter_ns()
            instance.call("validate", payload)
            samples.append(time.perf_counter_ns() - start)
        return statistics.median(samples) / 1000.0, answer
    finally:
        instance.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    engine = make_engine(EngineOptions(epoch_interruption=True))
    request = pod_request()
    request_json = orjson.dumps(request)
    settings = policy_settings()
    rows = []
    for path in sorted(DIST.glob("*.wasm")):
        name = path.stem
        payload = b'{"request":' + request_json + b',"settings":' + orjson.dumps(settings.get(name, {})) + b"}"
        median_us, answer = measure(engine, path, payload, args.iterations)
        outcome = "accept" if answer.get("accepted") else "reject"
        if answer.get("mutated_object") is not None:
            outcome = "mutate"
        rows.append({
            "policy": name, "size": path.stat().st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:12],
            "median_us": round(median_us, 1), "outcome": outcome,
        })
    print(f"request: {len(request_json)} bytes of AdmissionRequest JSON; {args.iterations} calls per policy")
    print(f"{'policy':34} {'size (B)':>9} {'median (us)':>12}  outcome")
    for row in rows:
        print(f"{row['policy']:34} {row['size']:>9} {row['median_us']:>12.1f}  {row['outcome']}")
    if args.json:
        args.json.write_text(json.dumps({"request_bytes": len(request_json), "iterations": args.iterations,
                                         "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
