"""Policy evaluation: the registry built at boot, per-worker instance pools, policies and groups.

The registry is built once in the gunicorn master and is read-only afterwards; forked workers share
it copy-on-write. Each worker links modules and creates instances lazily, keeps them for reuse within
its memory budget, and throws away any instance that trapped, timed out or grew too large.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
import wasmtime

from kwserver import admission
from kwserver.admission import EvaluationRequest
from kwserver.capabilities import Capabilities
from kwserver.config import PolicyGroupSpec, PolicySpec
from kwserver.expressions import ExpressionError, evaluate
from kwserver.runtime import GuestCallFailure, GuestTimeout, InstanceLimits, InstantiationFailure
from kwserver.runtime.engine import CompiledModule, EngineOptions
from kwserver.runtime.modes import REGO_MODES, LinkedModule, PolicyInstance, link
from kwserver.runtime.opa import OpaInstance, OpaModule
from kwserver.runtime.wasi_command import WasiCommandFailure, WasiCommandPolicy, WasiCommandTimeout

log = logging.getLogger(__name__)

GROUP_MUTATION_MESSAGE = "mutation is not allowed inside of policy group"


class UnknownPolicy(KeyError):
    """No policy or group of that name (HTTP 404)."""

    def __str__(self) -> str:
        return f"unknown policy: {self.args[0]}"


class EvaluationError(Exception):
    """The evaluation could not run at all (HTTP 500 "Something went wrong"); logged, never shown."""


@dataclass(frozen=True)
class LoadedPolicy:
    """A policy (or group member) bound to its compiled module, settings and limits."""

    spec: PolicySpec
    module: CompiledModule
    settings_json: bytes
    limits: InstanceLimits
    capabilities: Capabilities

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def entrypoint(self) -> str | None:
        """OPA/Gatekeeper: the entrypoint chosen by name (policies.yml, then metadata); None: id 0."""
        return self.spec.entrypoint or self.module.metadata.entrypoint


@dataclass
class PolicyRegistry:
    """Everything loaded at boot. Immutable once the workers are forked."""

    engine: wasmtime.Engine
    engine_options: EngineOptions
    policies: dict[str, LoadedPolicy] = field(default_factory=dict)  # policies and `<group>/<member>`s
    groups: dict[str, PolicyGroupSpec] = field(default_factory=dict)
    specs: dict[str, PolicySpec] = field(default_factory=dict)  # top-level policies, loaded or not
    init_errors: dict[str, str] = field(default_factory=dict)
    modules: dict[str, CompiledModule] = field(default_factory=dict)  # by digest

    def policy_mode(self, policy_id: str) -> str:
        """The mode of a top-level policy or group; raises UnknownPolicy for anything else."""
        if policy_id in self.groups:
            return self.groups[policy_id].policy_mode
        if policy_id in self.specs:
            return self.specs[policy_id].policy_mode
        raise UnknownPolicy(policy_id)

    @property
    def top_level_names(self) -> list[str]:
        return [*self.specs, *self.groups]


class PoolObserver:
    """Where an InstancePool reports what it does (metrics); the default ignores it."""

    def event(self, name: str, count: int = 1) -> None:
        pass

    def idle(self, policy_name: str, count: int, memory_bytes: int) -> None:
        pass


class InstancePool:
    """Per-process cache of linked modules and idle instances.

    Instances are kept per policy (never shared between policies, even on one module: settings and
    host-call identity stay per policy). Idle instances are bounded by a byte budget over their linear
    memories; the least recently used go first.
    """

    def __init__(self, registry: PolicyRegistry, *, reuse: bool, keep_bytes: int, budget_bytes: int,
                 observer: PoolObserver | None = None):
        self.registry = registry
        self.observer = observer or PoolObserver()
        self.reuse = reuse
        self.keep_bytes = keep_bytes
        self.budget_bytes = budget_bytes
        self._linked: dict[str, LinkedModule] = {}
        self._idle: OrderedDict[int, tuple[str, PolicyInstance, int]] = OrderedDict()
        self._by_policy: dict[str, list[int]] = {}
        self._idle_bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = self.discards = 0

    def linked(self, module: CompiledModule) -> LinkedModule:
        linked = self._linked.get(module.digest)
        if linked is None:
            linked = link(self.registry.engine, module,
                          epoch_interruption=self.registry.engine_options.epoch_interruption)
            self._linked[module.digest] = linked
        return linked

    def _take_idle(self, policy_name: str) -> PolicyInstance | None:
        with self._lock:
            keys = self._by_policy.get(policy_name)
            if not keys:
                return None
            _, instance, size = self._idle.pop(keys.pop())
            self._idle_bytes -= size
            self._idle_changed(policy_name)
            return instance

    def _put_idle(self, policy_name: str, instance: PolicyInstance, size: int) -> None:
        evicted = []
        with self._lock:
            key = id(instance)
            self._idle[key] = (policy_name, instance, size)
            self._by_policy.setdefault(policy_name, []).append(key)
            self._idle_bytes += size
            changed = {policy_name}
            while self._idle_bytes > self.budget_bytes and self._idle:
                old_key, (old_policy, old_instance, old_size) = self._idle.popitem(last=False)
                self._by_policy[old_policy].remove(old_key)
                self._idle_bytes -= old_size
                evicted.append(old_instance)
                changed.add(old_policy)
            self.evictions += len(evicted)
            for name in changed:
                self._idle_changed(name)
        if evicted:
            self.observer.event("eviction", len(evicted))
        for old in evicted:
            old.close()

    def _idle_changed(self, policy_name: str) -> None:
        keys = self._by_policy.get(policy_name, [])
        self.observer.idle(policy_name, len(keys), sum(self._idle[key][2] for key in keys))

    def new_instance(self, policy: LoadedPolicy) -> PolicyInstance:
        return self.linked(policy.module).instantiate(policy.limits, policy.capabilities, label=policy.name)

    @contextmanager
    def instance(self, policy: LoadedPolicy) -> Iterator[PolicyInstance]:
        instance = self._take_idle(policy.name) if self.reuse else None
        if instance is None:
            self.misses += 1
            self.observer.event("miss")
            instance = self.new_instance(policy)
        else:
            self.hits += 1
            self.observer.event("hit")
        reusable = False
        try:
            yield instance
            reusable = True
        finally:
            size = instance.memory_size
            if self.reuse and reusable and not instance.broken and size <= self.keep_bytes:
                self._put_idle(policy.name, instance, size)
            else:
                self.discards += 1
                if self.reuse:
                    self.observer.event("discard")
                instance.close()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            per_policy = {name: len(keys) for name, keys in self._by_policy.items() if keys}
            return {
                "idle_instances": len(self._idle), "idle_bytes": self._idle_bytes, "per_policy": per_policy,
                "hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                "discards": self.discards, "linked_modules": len(self._linked),
            }

    def clear(self) -> None:
        with self._lock:
            idle = [instance for _, instance, _ in self._idle.values()]
            self._idle.clear()
            self._by_policy.clear()
            self._idle_bytes = 0
        for instance in idle:
            instance.close()
        self._linked.clear()


def rust_debug_string(text: str) -> str:
    """`format!("{:?}", s)` of a Rust string: the reference embeds guest errors this way."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return '"' + escaped.replace("\t", "\\t") + '"'


def settings_error(instance: PolicyInstance, settings_json: bytes) -> str | None:
    """Run the policy's `validate_settings`; the error text, or None when the settings are valid."""
    if isinstance(instance, OpaInstance):
        return None  # OPA and Gatekeeper policies have no settings validation: always valid (spec §5.4)
    if isinstance(instance, WasiCommandPolicy):
        return _wasi_settings_error(instance, settings_json)
    try:
        raw = instance.call("validate_settings", settings_json)
    except (GuestTimeout, GuestCallFailure) as exc:
        return f"Error invoking settings validation callback: GuestCallFailure({rust_debug_string(str(exc))})"
    try:
        answer = orjson.loads(raw)
        valid = answer["valid"]
        if not isinstance(valid, bool):
            raise TypeError("invalid type for `valid`, expected a boolean")
    except (ValueError, KeyError, TypeError) as exc:
        return f"error: {exc!r}"
    if valid:
        return None
    return answer.get("message") or "no message"


def _wasi_settings_error(instance: WasiCommandPolicy, settings_json: bytes) -> str | None:
    """`validate-settings` run of a WASI policy: a failed run is invalid settings, with its stderr."""
    try:
        stdout = instance.call("validate_settings", settings_json)
    except WasiCommandTimeout as exc:
        return admission.wasi_interrupted_message(exc.stderr)
    except WasiCommandFailure as exc:
        return exc.message
    return admission.wasi_settings_error(stdout)


class Evaluator:
    """Computes the vanilla response of a policy or group for one request (before post-processing)."""

    def __init__(self, registry: PolicyRegistry, pool: InstancePool):
        self.registry = registry
        self.pool = pool

    def evaluate_policy(self, policy: LoadedPolicy, request: EvaluationRequest) -> dict[str, Any]:
        mode = policy.module.execution_mode
        if mode == "wasi":
            return self._evaluate_wasi(policy, request)
        if mode in REGO_MODES:
            return self._evaluate_rego(policy, request, mode)
        payload = admission.validation_payload(request, policy.settings_json)
        try:
            with self.pool.instance(policy) as instance:
                raw = instance.call("validate", payload)
        except GuestTimeout:
            log.warning("policy %s: evaluation interrupted, execution deadline exceeded", policy.name)
            return admission.interrupted(request.uid)
        except GuestCallFailure as exc:
            return admission.internal_error(request.uid, f"Guest call failure: {exc}")
        except InstantiationFailure as exc:
            raise EvaluationError(f"policy {policy.name}: {exc}") from exc
        return admission.response_from_validation(request, raw)

    def _evaluate_wasi(self, policy: LoadedPolicy, request: EvaluationRequest) -> dict[str, Any]:
        """A WASI command run: stdout is the ValidationResponse; a failed run rejects with code 500."""
        payload = admission.validation_payload(request, policy.settings_json)
        try:
            with self.pool.instance(policy) as instance:
                stdout = instance.call("validate", payload)
        except WasiCommandTimeout as exc:
            log.warning("policy %s: evaluation interrupted, execution deadline exceeded", policy.name)
            return admission.reject(request.uid, admission.wasi_interrupted_message(exc.stderr), 500)
        except WasiCommandFailure as exc:
            return admission.reject(request.uid, exc.message, 500)
        except InstantiationFailure as exc:
            raise EvaluationError(f"policy {policy.name}: {exc}") from exc
        return admission.response_from_wasi(request, stdout)

    def _evaluate_rego(self, policy: LoadedPolicy, request: EvaluationRequest, mode: str) -> dict[str, Any]:
        """OPA and Gatekeeper: build input and data, evaluate the entrypoint, map the result set."""
        uid = request.uid
        if mode == "gatekeeper" and request.raw:
            return admission.internal_error(uid, admission.GATEKEEPER_RAW_UNSUPPORTED)
        if policy.spec.context_aware_resources:
            return admission.internal_error(uid, admission.REGO_CONTEXT_AWARE_UNSUPPORTED)
        documents = admission.gatekeeper_documents if mode == "gatekeeper" else admission.opa_documents
        input_json, data_json = documents(request, policy.settings_json)
        try:
            linked = self.pool.linked(policy.module)
            entrypoint = linked.entrypoint_id(policy.entrypoint) if isinstance(linked, OpaModule) else 0
            with self.pool.instance(policy) as instance:
                result = instance.evaluate(entrypoint, input_json, data_json)
        except GuestTimeout as exc:
            log.warning("policy %s: evaluation interrupted, execution deadline exceeded", policy.name)
            return admission.internal_error(uid, str(exc))
        except GuestCallFailure as exc:
            return admission.internal_error(uid, str(exc))
        except InstantiationFailure as exc:
            raise EvaluationError(f"policy {policy.name}: {exc}") from exc
        if mode == "gatekeeper":
            return admission.response_from_gatekeeper(request, result)
        return admission.response_from_opa(request, result)

    def evaluate_group(self, group: PolicyGroupSpec, request: EvaluationRequest) -> dict[str, Any]:
        results: dict[str, dict[str, Any]] = {}

        def run_member(member: str) -> bool:
            member_id = f"{group.name}/{member}"
            error = self.registry.init_errors.get(member_id)
            if error is not None:
                response = admission.reject(request.uid, error, 500)
            else:
                try:
                    response = self.evaluate_policy(self.registry.policies[member_id], request)
                except EvaluationError as exc:
                    raise ExpressionError(str(exc)) from exc
            if "patch" in response:
                response = admission.reject(request.uid, GROUP_MUTATION_MESSAGE)
            results[member] = response  # no memoisation: a second call re-evaluates, the last one wins
            return response["allowed"]

        try:
            allowed = evaluate(group.tree, run_member)
        except ExpressionError as exc:
            return admission.reject(request.uid, f"error evaluating policy group expression: {exc}", 500)
        if allowed:
            return admission.admission_response(request.uid, True)
        causes = [
            admission.cause((response.get("status") or {}).get("message"), f"spec.policies.{member}")
            for member, response in results.items()
            if not response["allowed"]
        ]
        return admission.admission_response(
            request.uid, False, status=admission.status(group.message, causes=causes)
        )

    def evaluate(self, policy_id: str, request: EvaluationRequest) -> dict[str, Any]:
        group = self.registry.groups.get(policy_id)
        if group is not None:
            return self.evaluate_group(group, request)
        policy = self.registry.policies.get(policy_id)
        if policy is None:
            raise UnknownPolicy(policy_id)
        return self.evaluate_policy(policy, request)
