"""Per-worker instance pools: linked modules and idle instances, bounded by a memory budget.

Each worker links modules and creates instances lazily, keeps them for reuse within its memory
budget, and throws away any instance that trapped, timed out or grew too large. Policies on one
module share its instances (one evaluation at a time): before each evaluation the instance is bound
to the calling policy, its limits, host capabilities and name, so host calls, allow-lists and logs
always name that policy. A policy with `ownInstance: true` keeps instances of its own.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kwserver.evaluation.modes import mode_named
from kwserver.evaluation.registry import LoadedPolicy, PolicyRegistry, instance_labels
from kwserver.runtime import InstantiationFailure, LinkedModule, PolicyInstance, pooling
from kwserver.runtime.engine import CompiledModule

log = logging.getLogger(__name__)


class PoolObserver:
    """Where an InstancePool reports what it does (metrics); the default ignores it."""

    def event(self, name: str, count: int = 1) -> None:
        pass

    def idle(self, label: str, count: int, memory_bytes: int) -> None:
        """`label`: the policies using the instances (`instance_labels`)."""


class InstancePool:
    """Per-process cache of linked modules and idle instances.

    Idle instances are kept per instance key (a module, or a policy with an instance of its own) and
    bounded by a byte budget over their linear memories; the least recently used go first.
    """

    def __init__(self, registry: PolicyRegistry, *, reuse: bool | None, keep_bytes: int, budget_bytes: int,
                 observer: PoolObserver | None = None):
        self.registry = registry
        self.observer = observer or PoolObserver()
        self.reuse = reuse
        self.keep_bytes = keep_bytes
        self.budget_bytes = budget_bytes
        self._linked: dict[str, LinkedModule] = {}
        self._idle: OrderedDict[int, tuple[str, PolicyInstance, int]] = OrderedDict()
        self._by_key: dict[str, list[int]] = {}
        self._idle_bytes = 0
        self._labels = instance_labels(registry.policies.values())
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = self.discards = 0

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

    def _take_idle(self, instance_key: str) -> PolicyInstance | None:
        with self._lock:
            ids = self._by_key.get(instance_key)
            if not ids:
                return None
            _, instance, size = self._idle.pop(ids.pop())
            self._idle_bytes -= size
            self._idle_changed(instance_key)
            return instance

    def _put_idle(self, instance_key: str, instance: PolicyInstance, size: int) -> None:
        evicted = []
        with self._lock:
            ident = id(instance)
            self._idle[ident] = (instance_key, instance, size)
            self._by_key.setdefault(instance_key, []).append(ident)
            self._idle_bytes += size
            changed = {instance_key}
            while self._idle_bytes > self.budget_bytes and self._idle:
                old_ident, (old_key, old_instance, old_size) = self._idle.popitem(last=False)
                self._by_key[old_key].remove(old_ident)
                self._idle_bytes -= old_size
                evicted.append(old_instance)
                changed.add(old_key)
            self.evictions += len(evicted)
            for name in changed:
                self._idle_changed(name)
        if evicted:
            self.observer.event("eviction", len(evicted))
        for old in evicted:
            old.close()

    def _idle_changed(self, instance_key: str) -> None:
        ids = self._by_key.get(instance_key, [])
        self.observer.idle(self._labels.get(instance_key, instance_key), len(ids),
                           sum(self._idle[ident][2] for ident in ids))

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
            ident, (key, instance, size) = self._idle.popitem(last=False)
            self._by_key[key].remove(ident)
            self._idle_bytes -= size
            self.evictions += 1
            self._idle_changed(key)
        self.observer.event("eviction")
        instance.close()
        return True

    @contextmanager
    def instance(self, policy: LoadedPolicy) -> Iterator[PolicyInstance]:
        """An instance for one evaluation: one kept from earlier evaluations (reusing), or one in the state of
        a new instance (fresh: new, or put back into that state after its last evaluation). `reuse` None
        is fresh for the instances that can be put back (kwserver/runtime/pristine.py), reuse for others."""
        key = policy.instance_key
        instance = self._take_idle(key)
        if instance is not None and instance.memory_size > policy.limits.memory_bytes:
            # Grown by another policy of the module past what this one may use: not for this policy.
            self.discards += 1
            self.observer.event("discard")
            instance.close()
            instance = None
        if instance is None:
            self.misses += 1
            self.observer.event("miss")
            instance = self.new_instance(policy)
        else:
            self.hits += 1
            self.observer.event("hit")
            instance.bind(policy.limits, policy.capabilities, policy.name)
        reusable = False
        try:
            yield instance
            reusable = True
        finally:
            size = instance.memory_size
            if reusable and not instance.broken and size <= self.keep_bytes and self._keeps(instance):
                self._put_idle(key, instance, size)
            else:
                self.discards += 1
                if self.reuse is not False:
                    self.observer.event("discard")
                instance.close()

    def _keeps(self, instance: PolicyInstance) -> bool:
        """Whether an instance may serve another evaluation: reused as it is, or fresh once put back."""
        restorable = getattr(instance, "restorable", False)
        if self.reuse or (self.reuse is None and not restorable):
            return True
        return restorable and instance.restore()

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
            idle = [instance for _, instance, _ in self._idle.values()]
            self._idle.clear()
            self._by_key.clear()
            self._idle_bytes = 0
        for instance in idle:
            instance.close()
        self._linked.clear()
