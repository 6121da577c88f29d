"""The pooling instance allocator (kwserver/runtime/pooling.py): sizing, fork, exhaustion, fallback."""

import os
import subprocess
import sys

import pytest
import wasmtime

from kwserver.runtime import InstanceLimits, InstantiationFailure
from kwserver.runtime.engine import EngineOptions, make_engine
from kwserver.runtime.pooling import LIVE_INSTANCES, MAX_MEMORY_BYTES, MIN_SLOTS, PoolSize, is_exhausted
from kwserver.runtime.wapc import WapcModule
from tests.support.paths import REPO

MIB = 1 << 20
LIMITS = InstanceLimits(memory_bytes=64 * MIB, timeout_seconds=None)
ECHO = REPO / "policies" / "dist" / "echo.wasm"


def test_slots_cover_an_idle_instance_and_a_template_per_policy_and_the_live_ones():
    assert PoolSize.for_policies(61, 256 * MIB) == PoolSize(2 * 61 + LIVE_INSTANCES, 256 * MIB)
    assert PoolSize.for_policies(1, 256 * MIB).slots == MIN_SLOTS
    assert PoolSize.for_policies(1, 1 << 40).max_memory_bytes == MAX_MEMORY_BYTES


def _echo(engine) -> WapcModule:
    return WapcModule(engine, wasmtime.Module(engine, ECHO.read_bytes()), epoch_interruption=False)


def test_a_full_pool_says_so_and_frees_slots_as_instances_close():
    linked = _echo(make_engine(EngineOptions(epoch_interruption=False, pool=PoolSize(2, 64 * MIB))))
    live = [linked.instantiate(LIMITS), linked.instantiate(LIMITS)]
    with pytest.raises(InstantiationFailure) as failure:
        linked.instantiate(LIMITS)
    assert is_exhausted(failure.value)
    live.pop().close()
    linked.instantiate(LIMITS).close()


def test_the_pool_evicts_idle_instances_when_its_slots_run_out(tmp_path):
    from tests.support.modules import in_process_evaluator

    policies = {name: {"module": str(REPO / "policies" / "dist" / f"{name}.wasm")}
                for name in ("echo", "pod-privileged", "apparmor-psp")}
    with in_process_evaluator(tmp_path, policies) as (_, registry, pool):
        evict_when_slots_run_out(registry, pool)


def evict_when_slots_run_out(registry, pool):
    real = {name: pool.linked(policy.module) for name, policy in registry.policies.items()}
    free_slots = [1]  # what is left once echo's instance is idle: room for one more instance

    class Slot:
        def __init__(self, instance):
            self.instance = instance

        def __getattr__(self, name):
            return getattr(self.instance, name)

        def close(self):
            free_slots[0] += 1
            self.instance.close()

    class Slots:
        def __init__(self, linked):
            self.linked = linked

        def instantiate(self, *args, **kwargs):
            if not free_slots[0]:
                raise InstantiationFailure("maximum concurrent limit of 2 for core instances reached")
            free_slots[0] -= 1
            return Slot(self.linked.instantiate(*args, **kwargs))

    for name, policy in registry.policies.items():
        pool._linked[policy.module.digest] = Slots(real[name])
    with pool.instance(registry.policies["echo"]):
        pass
    free_slots[0] = 1
    with pool.instance(registry.policies["pod-privileged"]):
        pass
    with pool.instance(registry.policies["apparmor-psp"]):  # no slot left: the oldest idle one goes
        pass
    assert pool.evictions == 1 and set(pool.stats()["per_key"]) == {
        registry.policies[n].instance_key for n in ("pod-privileged", "apparmor-psp")}


def test_each_forked_worker_has_the_pool_of_its_own():
    engine = make_engine(EngineOptions(epoch_interruption=False, pool=PoolSize(2, 64 * MIB)))
    linked = _echo(engine)  # compiled here, before the fork, as the master does
    children = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:  # both slots are free in each child, whatever the other one does
            code = 1
            try:
                kept = [linked.instantiate(LIMITS) for _ in range(2)]
                code = 0 if kept[1].call("validate_settings", b"{}") == b'{"valid":true}' else 2
            finally:
                os._exit(code)
        children.append(pid)
    assert [os.waitpid(pid, 0)[1] for pid in children] == [0, 0]
    linked.instantiate(LIMITS).close()


def test_without_the_address_space_for_the_slots_instances_come_from_the_on_demand_allocator():
    script = (
        "import resource, sys, wasmtime\n"
        "resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30))\n"
        "from kwserver.runtime import InstanceLimits\n"
        "from kwserver.runtime.engine import EngineOptions, make_engine\n"
        "from kwserver.runtime.pooling import PoolSize\n"
        "from kwserver.runtime.wapc import WapcModule\n"
        "engine = make_engine(EngineOptions(epoch_interruption=False, pool=PoolSize(64, 64 << 20)))\n"
        f"module = wasmtime.Module(engine, open({str(ECHO)!r}, 'rb').read())\n"
        "linked = WapcModule(engine, module, epoch_interruption=False)\n"
        "instances = [linked.instantiate(InstanceLimits(64 << 20, None)) for _ in range(2)]\n"
        "print(instances[-1].call('validate_settings', b'{}').decode())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == '{"valid":true}'
    assert "on-demand allocator" in done.stderr
