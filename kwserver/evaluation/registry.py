"""The policy registry: everything loaded at boot, read-only once the workers are forked."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property

import wasmtime

from kwserver.capabilities import Capabilities
from kwserver.config import PolicyGroupSpec, PolicySpec
from kwserver.runtime import InstanceLimits
from kwserver.runtime.engine import CompiledModule, EngineOptions


class UnknownPolicy(KeyError):
    """No policy or group of that name (HTTP 404)."""

    def __str__(self) -> str:
        return f"unknown policy: {self.args[0]}"


@dataclass(frozen=True)
class LoadedPolicy:
    """A policy (or group member) bound to its compiled module, settings and limits."""

    spec: PolicySpec
    module: CompiledModule
    settings_json: bytes
    limits: InstanceLimits
    capabilities: Capabilities
    # Its mode lists the `contextAwareResources` into its documents (a Rego policy's inventory).
    lists_inventory: bool = False

    @property
    def name(self) -> str:
        return self.spec.name

    @cached_property
    def instance_key(self) -> str:
        """Which idle instances this policy may take: its module's, or (`ownInstance`) its own."""
        return f"policy:{self.name}" if self.spec.own_instance else f"module:{self.module.digest}"

    @property
    def reads_cluster(self) -> bool:
        """Serving this policy needs the cluster: its host calls may reach it, or the host lists its inventory."""
        return self.capabilities.reads_cluster or (self.lists_inventory and bool(self.spec.context_aware_resources))

    @property
    def entrypoint(self) -> str | None:
        """OPA/Gatekeeper: the entrypoint chosen by name (policies.yml, then metadata); None: id 0."""
        return self.spec.entrypoint or self.module.metadata.entrypoint


def instance_labels(policies: Iterable[LoadedPolicy]) -> dict[str, str]:
    """What users read for each instance key (`kwserver top`, the `instance` metric label): the names of
    the policies that use its instances, the first two and a count of the others."""
    users: dict[str, list[str]] = {}
    for policy in policies:
        users.setdefault(policy.instance_key, []).append(policy.name)
    labels = {}
    for key, names in users.items():
        more = f" +{len(names) - 2} more" if len(names) > 2 else ""
        labels[key] = ", ".join(names[:2]) + more
    return labels


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
