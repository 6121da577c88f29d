"""What `kwserver top` and the memory gauges show: every server process, and what the workers hold."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kwserver import __version__
from kwserver.observability import memory, metrics


@dataclass(frozen=True)
class LoadedFacts:
    """The facts of the configuration being served, as the status view shows them."""

    policies: int = 0
    modules: int = 0
    compiled_module_bytes: int = 0
    boot_seconds: float = 0.0
    compile_cache_hits: int = 0
    compile_cache_misses: int = 0


class StatusView:
    """A snapshot of the server, read in the master at request time (`/status`, `/metrics`)."""

    def __init__(self, metrics_dir: str, loaded: Callable[[], LoadedFacts]):
        self.metrics_dir = metrics_dir
        self.loaded = loaded

    def snapshot(self) -> dict[str, Any]:
        processes = memory.server_processes(os.getpid())
        requests = metrics.per_process_values(self.metrics_dir, "kwserver_worker_requests")
        instances = metrics.per_process_values(self.metrics_dir, "kwserver_policy_instances")
        instance_bytes = metrics.per_process_values(self.metrics_dir, "kwserver_policy_instance_memory_bytes")
        for process in processes:
            pid = process["pid"]
            process["requests"] = int(sum(requests.get(pid, {}).values()))
            process["instances"] = {dict(labels)["instance"]: int(count)
                                    for labels, count in instances.get(pid, {}).items() if count}
            process["instance_bytes"] = int(sum(instance_bytes.get(pid, {}).values()))
        facts = self.loaded()
        return {
            "version": __version__,
            "processes": processes,
            "totals": memory.totals(processes),
            "workers": sum(1 for p in processes if p["role"] == "worker"),
            "policies": facts.policies,
            "modules": facts.modules,
            "compiled_module_bytes": facts.compiled_module_bytes,
            "boot_seconds": facts.boot_seconds,
            "compile_cache_hits": facts.compile_cache_hits,
            "compile_cache_misses": facts.compile_cache_misses,
        }
