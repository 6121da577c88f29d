"""Memory of the server's processes, as psutil reads it from /proc/<pid>/smaps.

RSS counts shared pages in every process that maps them; PSS divides them among the sharers, so the
sum of PSS over the master and its workers is the server's real footprint (what a pod's memory limit
sees). USS is what a process alone holds: what its exit would free.
"""

from __future__ import annotations

from typing import Any

import psutil

FIELDS = ("rss", "uss", "pss", "shared", "swap")


def describe(process: psutil.Process, role: str) -> dict[str, Any] | None:
    try:
        with process.oneshot():
            info = process.memory_full_info()
            cpu = process.cpu_times()
            title = " ".join(process.cmdline()) or process.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    return {
        "role": role, "pid": process.pid, "title": title,
        "rss": info.rss, "uss": info.uss, "pss": getattr(info, "pss", 0), "shared": info.shared,
        "swap": getattr(info, "swap", 0), "cpu_seconds": cpu.user + cpu.system,
    }


def server_processes(master_pid: int) -> list[dict[str, Any]]:
    """The master and its direct children (the workers)."""
    try:
        master = psutil.Process(master_pid)
        children = master.children()
    except psutil.NoSuchProcess:
        return []
    described = [describe(master, "master"), *(describe(child, _role(child)) for child in children)]
    return [d for d in described if d is not None]


def _role(child: psutil.Process) -> str:
    try:
        command = " ".join(child.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "worker"
    return "cluster-cache" if "cluster cache" in command or "cluster.cache_server" in command else "worker"


def totals(processes: list[dict[str, Any]]) -> dict[str, int]:
    return {field: sum(p[field] for p in processes) for field in FIELDS}
