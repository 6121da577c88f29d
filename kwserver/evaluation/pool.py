"""Per-worker instance pools: linked modules and idle instances, bounded by a memory budget.

Each worker links modules and creates instances lazily, keeps them for reuse within its memory
budget, and throws away any instance that trapped, timed out or grew too large. Policies on one
module share its instances (one evaluation at a time): before each evaluation the instance is bound
to the calling policy, its limits, host capabilities and name, so host calls, allow-lists and logs
always name that policy. A policy with `ownInstance: true` keeps instances of its own.

The pool counts what it does in plain integers; the metrics read them once a second (`report`), so an
evaluation pays for no metric update.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from kwserver.evaluation.modes import mode_named
from kwserver.evaluation.registry import LoadedPolicy, PolicyRegistry, instance_labels
from kwserver.runtime import InstantiationFailure, LinkedModule, PolicyInstance, pooling
from kwserver.runtime.engine import CompiledModule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolReport:
    """What the metrics publish of a pool: its events so far, and per instance label (the policies using
    the instances, `instance_labels`) the idle instances and their linear memory."""

    events: dict[str, int]  # hit, miss, eviction, discard: totals since the pool was made
    idle: dict[str, tuple[int, int]]  # label: (instances, bytes), for every label that has had idle ones


class InstancePool:
    """Per-process cache of linked modules and idle instances.

    Idle instances are kept per instance key (a module, or a policy with an instance of its own) and
    bounded by a byte budget over their linear memories; the least recently used go first.
    """

    def __init__(self, registry: PolicyRegistry, *, reuse: bool | None, keep_bytes: int, budget_bytes: int):
        self.registry = registry
        self.reuse = reuse
        self.keep_bytes = keep_bytes
        self.budget_bytes = budget_bytes
        self._linked: dict[str, LinkedModule] = {}
        # id(instance): (instance key, instance, linear memory bytes, the policy it is bound to)
        self._idle: OrderedDict[int, tuple[str, PolicyInstance, int, LoadedPolicy]] = OrderedDict()
        self._by_key: dict[str, list[int]] = {}
        self._idle_bytes = 0
        self._labels = instance_labels(registry.policies.values())
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = self.discards = 0
        # Instances closed after an evaluation when every evaluation gets a new one: not reported.
        self._routine_discards = 0

    def linked(self, module: CompiledModule) -> LinkedModule:
        linked = self._linked.get(module.digest)
        if linked is None:
            linked = mode_named(module.execution_mode).link(
                self.registry.engine, module.module, epoch_interruption=self.registry.engine_options.epoch_interruption)
            self._linked[module.digest] = linked
        return linked

    def link_all(self) -> None:
        """Link every module now. In the master before the fork this is shared by the workers: it measured
        0.4 MiB less per worker than linking in each one (docs/operations.md, "Memory")."""
        for module in self.registry.modules.values():
            try:
                self.linked(module)
            except Exception:
                log.debug("module %s is linked at its first use", module.digest, exc_info=True)

    def new_instance(self, policy: LoadedPolicy) -> PolicyInstance:
        linked = self.linked(policy.module)
        while True:
            try:
                return linked.instantiate(policy.limits, policy.capabilities, label=policy.name)
            except InstantiationFailure as exc:
                # Every slot of the worker's instance pool is taken: idle instances make room.
                if not (pooling.is_exhausted(exc) and self._evict_oldest()):
                    raise

    def _evict_oldest(self) -> bool:
        with self._lock:
            if not self._idle:
                return False
            ident, (key, instance, size, _) = self._idle.popitem(last=False)
            self._by_key[key].remove(ident)
            self._idle_bytes -= size
            self.evictions += 1
        instance.close()
        return True

    def acquire(self, policy: LoadedPolicy) -> PolicyInstance:
        """An instance for one evaluation, bound to `policy`: one kept from earlier evaluations, else a new
        one (raises InstantiationFailure). Give it back with `release`."""
        key = policy.instance_key
        with self._lock:
            ids = self._by_key.get(key)
            if ids:
                _, instance, size, bound = self._idle.pop(ids.pop())
                self._idle_bytes -= size
            else:
                instance = None
        if instance is not None:
            if size <= policy.limits.memory_bytes:
                self.hits += 1
                if bound is not policy:
                    instance.bind(policy.limits, policy.capabilities, policy.name)
                return instance
            # Grown by another policy of the module past what this one may use: not for this policy.
            self.discards += 1
            instance.close()
        self.misses += 1
        return self.new_instance(policy)

    def release(self, policy: LoadedPolicy, instance: PolicyInstance, reusable: bool) -> None:
        """Take back an instance after its evaluation: kept for the next one when it may serve again
        (`reusable`: the evaluation ended normally), else closed."""
        size = instance.memory_size
        if reusable and not instance.broken and size <= self.keep_bytes and self._keeps(instance):
            self._put_idle(policy, instance, size)
            return
        self.discards += 1
        if self.reuse is False:
            self._routine_discards += 1
        instance.close()

    @contextmanager
    def instance(self, policy: LoadedPolicy) -> Iterator[PolicyInstance]:
        """An instance for one evaluation: one kept from earlier evaluations (reusing), or one in the state of
        a new instance (fresh: new, or put back into that state after its last evaluation). `reuse` None
        is fresh for the instances that can be put back (kwserver/runtime/pristine.py), reuse for others."""
        instance = self.acquire(policy)
        reusable = False
        try:
            yield instance
            reusable = True
        finally:
            self.release(policy, instance, reusable)

    def _put_idle(self, policy: LoadedPolicy, instance: PolicyInstance, size: int) -> None:
        key = policy.instance_key
        evicted = []
        with self._lock:
            ident = id(instance)
            self._idle[ident] = (key, instance, size, policy)
            ids = self._by_key.get(key)
            if ids is None:
                ids = self._by_key[key] = []
            ids.append(ident)
            self._idle_bytes += size
            while self._idle_bytes > self.budget_bytes and self._idle:
                old_ident, (old_key, old_instance, old_size, _) = self._idle.popitem(last=False)
                self._by_key[old_key].remove(old_ident)
                self._idle_bytes -= old_size
                evicted.append(old_instance)
            self.evictions += len(evicted)
        for old in evicted:
            old.close()

    def _keeps(self, instance: PolicyInstance) -> bool:
        """Whether an instance may serve another evaluation: reused as it is, or fresh once put back."""
        if self.reuse:
            return True
        restorable = getattr(instance, "restorable", False)
        if self.reuse is None and not restorable:
            return True
        return restorable and instance.restore()

    def report(self) -> PoolReport:
        with self._lock:
            idle = {self._labels.get(key, key): (len(ids), sum(self._idle[ident][2] for ident in ids))
                    for key, ids in self._by_key.items()}
        return PoolReport({"hit": self.hits, "miss": self.misses, "eviction": self.evictions,
                           "discard": self.discards - self._routine_discards}, idle)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            per_key = {key: len(ids) for key, ids in self._by_key.items() if ids}
            return {
                "idle_instances": len(self._idle), "idle_bytes": self._idle_bytes, "per_key": per_key,
                "hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                "discards": self.discards, "linked_modules": len(self._linked),
            }

    def clear(self) -> None:
        with self._lock:
            idle = [instance for _, instance, _, _ in self._idle.values()]
            self._idle.clear()
            self._by_key.clear()
            self._idle_bytes = 0
        for instance in idle:
            instance.close()
        self._linked.clear()
