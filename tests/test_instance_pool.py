"""A worker's instance pool stays within its byte budget, and an instance that outgrows its memory
limit fails only its own evaluation."""

from __future__ import annotations

import psutil
import pytest
import requests
import wasmtime
from hypothesis import given, settings
from hypothesis import strategies as st

from kwserver.admission import parse_admission_review
from kwserver.evaluation.registry import instance_labels
from tests.support.modules import annotated, in_process_evaluator
from tests.support.paths import SERVER_FIXTURES, load_json, policy_path
from tests.support.server import published_metrics, sample

PRIVILEGED = load_json(SERVER_FIXTURES / "pod_with_privileged_containers.json")
MIB = 1 << 20
COPIES = 6  # policies on one module, each with instances of its own (`ownInstance`)


@pytest.mark.integration
def test_idle_instances_stay_within_the_worker_budget(run_server):
    """Six policies of about 1.1 MiB each and a 3 MiB budget: the least recently used are evicted."""
    policies = {f"p{i}": {"module": policy_path("pod-privileged"), "ownInstance": True} for i in range(COPIES)}
    server = run_server(policies, env={"KUBEWARDEN_WORKERS": "1", "KWSERVER_WORKER_INSTANCE_BUDGET_MIB": "3"})
    for _ in range(2):
        for name in policies:
            assert server.post(f"/validate/{name}", PRIVILEGED).json()["response"]["allowed"] is False
    text = published_metrics(server, served=2 * COPIES)
    idle = sum(sample(text, "kwserver_policy_instances", instance=name) for name in policies)
    idle_bytes = sum(sample(text, "kwserver_policy_instance_memory_bytes", instance=name) for name in policies)
    misses, evictions = (sample(text, "kwserver_instance_cache_events_total", event=e) for e in ("miss", "eviction"))
    assert 0 < idle_bytes <= 3 * MIB and 1 <= idle < COPIES, (idle, idle_bytes)
    # Every instance made was kept, taken back (a hit) or evicted; the cyclic order hits nothing.
    assert sample(text, "kwserver_instance_cache_events_total", event="hit") == 0
    assert evictions == misses - idle and evictions >= COPIES
    # The most recently used policy is still kept.
    server.post(f"/validate/p{COPIES - 1}", PRIVILEGED)
    assert sample(published_metrics(server, served=2 * COPIES + 1), "kwserver_instance_cache_events_total",
                  event="hit") == 1


# A waPC guest that grows its memory by 4 MiB on every `validate` and traps when the grow is refused,
# as a Rust guest's allocator does when it runs out of memory.
GREEDY_WAT = """(module
  (import "wapc" "__guest_response" (func $respond (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "{\\22accepted\\22:true}")
  (data (i32.const 32) "{\\22valid\\22:true}")
  (func (export "__guest_call") (param $op_len i32) (param $msg_len i32) (result i32)
    (if (i32.eq (local.get $op_len) (i32.const 17))  ;; validate_settings
      (then (call $respond (i32.const 32) (i32.const 14)) (return (i32.const 1))))
    (if (i32.eq (memory.grow (i32.const 64)) (i32.const -1)) (then unreachable))
    (call $respond (i32.const 0) (i32.const 17))
    (i32.const 1)))"""


@pytest.mark.integration
def test_growing_past_the_memory_limit_fails_that_evaluation_and_the_worker_keeps_serving(run_server, tmp_path):
    module = annotated(tmp_path, "greedy", wasmtime.wat2wasm(GREEDY_WAT), "kubewarden-wapc", policyType="raw",
                       protocolVersion="v1")
    server = run_server({"greedy": {"module": module}}, env={  # reused: its memory grows from one call to the next
        "KUBEWARDEN_WORKERS": "1", "KWSERVER_POLICY_MEMORY_LIMIT_MIB": "10", "KWSERVER_INSTANCE_KEEP_MEMORY_MIB": "64",
        "KWSERVER_FRESH_INSTANCE_PER_REQUEST": "false"})
    worker = psutil.Process(server.process.pid).children()[0].pid
    raw = {"request": {"uid": "u"}}
    answers = [server.post("/validate_raw/greedy", raw).json()["response"] for _ in range(4)]
    # 64 KiB + 4 MiB, + 8 MiB: within 10 MiB; the third grow would pass it and is refused: the guest traps.
    assert [a["allowed"] for a in answers] == [True, True, False, True]
    assert answers[2]["status"]["code"] == 500
    assert answers[2]["status"]["message"].startswith("internal server error: Guest call failure:")
    # The broken instance was discarded: the fourth evaluation ran on a new one, in the same worker.
    assert [p.pid for p in psutil.Process(server.process.pid).children()] == [worker]
    text = published_metrics(server, served=4)
    assert sample(text, "kwserver_instance_cache_events_total", event="discard") == 1
    assert requests.get(f"http://127.0.0.1:{server.readiness_port}/readiness", timeout=5).status_code == 200


@pytest.fixture(scope="module")
def evaluator_parts(tmp_path_factory):
    policies = {
        "a": {"module": policy_path("pod-privileged")},
        "b": {"module": policy_path("pod-privileged")},
        "c": {"module": policy_path("sleeping"), "settings": {"sleepMilliseconds": 0}},
    }
    with in_process_evaluator(tmp_path_factory.mktemp("pool"), policies) as (evaluator, registry, _):
        yield evaluator, registry


REQUEST = parse_admission_review(PRIVILEGED)


@settings(max_examples=40, deadline=None)
@given(budget=st.integers(0, 4 * MIB), order=st.lists(st.sampled_from("abc"), min_size=1, max_size=12))
def test_pool_bookkeeping_under_any_sequence_of_evaluations(evaluator_parts, budget, order):
    from kwserver.evaluation import Evaluator, InstancePool

    _, registry = evaluator_parts
    # The metrics name instances after their policies: a and b share one.
    assert {registry.policies[name].instance_key: label for name, label in (("a", "a, b"), ("c", "c"))} == \
        instance_labels(registry.policies.values())
    labels = instance_labels(registry.policies.values())
    pool = InstancePool(registry, reuse=True, keep_bytes=32 * MIB, budget_bytes=budget)
    evaluator = Evaluator(registry, pool)
    sizes: dict[str, int] = {}  # memory of each module's instance, as last reported while idle alone
    try:
        for name in order:
            key = registry.policies[name].instance_key  # a and b share pod-privileged's instances
            before = pool.stats()
            assert "allowed" in evaluator.evaluate(name, REQUEST)
            stats = pool.stats()
            # An idle instance of the policy's module is reused; otherwise a new one is made.
            reused = key in before["per_key"]
            assert (stats["hits"] - before["hits"], stats["misses"] - before["misses"]) == (
                (1, 0) if reused else (0, 1))
            assert stats["idle_bytes"] <= budget
            assert stats["idle_instances"] == sum(stats["per_key"].values())
            # Least recently used first: if the instance just returned was evicted, so was every other.
            assert key in stats["per_key"] or stats["idle_instances"] == 0
            # ... and it is evicted only when it alone is over the budget.
            report = pool.report()  # what the metrics publish
            count, memory = report.idle[labels[key]]
            if count:
                sizes[key] = memory
            elif key in sizes:
                assert sizes[key] > budget
            # One evaluation at a time: never more than one idle instance per module.
            assert set(stats["per_key"].values()) <= {1}
            # Every instance made is idle or was evicted (none trapped or grew too large here).
            assert stats["discards"] == 0
            assert stats["evictions"] == stats["misses"] - stats["idle_instances"]
            # The metrics see the same: per policy, the idle count and memory; the events, counted.
            reported = {label: entry for label, entry in report.idle.items() if entry[0]}
            assert {label: entry[0] for label, entry in reported.items()} == {
                labels[key]: count for key, count in stats["per_key"].items()}
            assert sum(entry[1] for entry in reported.values()) == stats["idle_bytes"]
            assert {event: report.events[event] for event in ("hit", "miss", "eviction")} == {
                "hit": stats["hits"], "miss": stats["misses"], "eviction": stats["evictions"]}
        assert stats["linked_modules"] == len({registry.policies[name].module.digest for name in set(order)})
    finally:
        pool.clear()
    assert pool.stats()["idle_instances"] == pool.stats()["idle_bytes"] == 0
