"""How many workers the pod holds: the CPUs this process may use, and its memory limit.

CPUs are counted as the reference counts them (Rust's `num_cpus` crate, 1.17): the CPU quota of the
process's cgroup (v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`) divided by its period and
rounded up, never more than the CPUs of the affinity set (`sched_getaffinity`); without a quota, the
affinity set. A pod limited to 1.5 CPUs on a 64-core node runs 2 workers, not 64.

Memory: the limit of the process's cgroup (v2 `memory.max`, v1 `memory.limit_in_bytes`). A worker is
added only if the memory in use (the PSS of the server's processes), one more worker's own memory
(the largest USS of the running workers) and a headroom stay within the limit: see
docs/operations.md, "Worker pool".

The functions that decide are pure (file texts in, numbers and reasons out); `read_cgroup_files`,
`available_cpus` and `memory_limit` read the files.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from kwserver.config import ServerSettings

MIB = 1024 * 1024
# The cgroup files that bound each controller, by cgroup version.
CPU_FILES = {2: ("cpu.max",), 1: ("cpu.cfs_quota_us", "cpu.cfs_period_us")}
MEMORY_FILES = {2: ("memory.max",), 1: ("memory.limit_in_bytes",)}
# cgroup v1 writes "no limit" as the largest page-aligned counter value (about 2^63).
_V1_UNLIMITED = 1 << 62
# What a worker is assumed to hold of its own before one has been measured: an idle worker holds
# about 4 MiB, one that served the ten-policy example 9 MiB (docs/operations.md, "Memory").
WORKER_ESTIMATE_BYTES = 16 * MIB
HEADROOM_FRACTION = 0.10
HEADROOM_MIN_BYTES = 32 * MIB


@dataclass(frozen=True)
class CpuCount:
    count: int
    reason: str

    def describe(self) -> str:
        return f"{count_text(self.count)}: {self.reason}"


def count_text(count: int) -> str:
    return f"{count} worker{'' if count == 1 else 's'}"


@dataclass(frozen=True)
class WorkerPlan:
    """The pool the settings ask for: `--workers` (default: the CPUs) between `--min-workers` and
    `--max-workers` (each defaulting to that figure)."""

    initial: int
    minimum: int
    maximum: int
    reason: str  # why `initial`: `--workers`, or how the CPUs were counted

    @property
    def autoscaling(self) -> bool:
        return self.maximum > self.minimum

    def describe(self) -> str:
        """How many workers start, and why (`2 workers: cgroup CPU quota 1.5 CPUs`)."""
        return f"{count_text(self.initial)}: {self.reason}"


def plan_workers(settings: ServerSettings, cpus: CpuCount) -> WorkerPlan:
    count = settings.workers or cpus.count
    minimum = settings.min_workers or min(count, settings.max_workers or count)
    maximum = settings.max_workers or max(count, settings.min_workers or count)
    initial = max(minimum, min(count, maximum))
    reason = "--workers" if settings.workers is not None else cpus.reason
    if initial != count:
        reason += " (--min-workers/--max-workers)"
    return WorkerPlan(initial, minimum, maximum, reason)


# --- pure: from file texts to numbers -----------------------------------------------------------

def locate_cgroup(proc_cgroup: str | None, mountinfo: str | None, controller: str) -> tuple[int, str] | None:
    """The version and directory of the cgroup of `controller` ("cpu", "memory") for this process.

    As `num_cpus` finds it: the /proc/self/cgroup line of a v1 hierarchy with the controller wins over
    the v2 line (`0::<path>`); the directory is the hierarchy's mount point joined with the cgroup's
    path below the mount's root. None when either file is missing or the cgroup is not mounted here.
    """
    if not proc_cgroup or not mountinfo:
        return None
    found: tuple[int, str] | None = None
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[1] == "":
            found = found or (2, parts[2])
        elif controller in parts[1].split(","):
            found = (1, parts[2])
    if found is None:
        return None
    version, path = found
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if "-" not in fields[5:] or len(fields) < 5:
            continue
        after = fields[fields.index("-", 5) + 1:]
        kind = {"cgroup": 1, "cgroup2": 2}.get(after[0] if after else "")
        if kind != version:
            continue
        if kind == 1 and (len(after) < 3 or controller not in after[2].split(",")):
            continue
        root, mount_point = fields[3], fields[4]
        try:
            below = PurePosixPath(path).relative_to(root)
        except ValueError:
            return None  # the process's cgroup is outside what is mounted (num_cpus gives up too)
        return version, str(PurePosixPath(mount_point) / below)
    return None


def _integers(text: str | None, count: int) -> list[int] | None:
    if text is None:
        return None
    fields = text.split()[:count]
    try:
        return [int(field) for field in fields] if len(fields) == count else None
    except ValueError:
        return None


def cpu_quota(files: Mapping[str, str | None]) -> tuple[float | None, str]:
    """The cgroup CPU quota in CPUs, or None and why there is none.

    `files` maps the names of CPU_FILES found for this process to their text (None: missing or
    unreadable); an empty mapping means no cgroup CPU controller was found.
    """
    if "cpu.max" in files:
        text = files["cpu.max"]
        if text is None:
            return None, "cgroup cpu.max missing or unreadable"
        if text.split()[:1] == ["max"]:
            return None, "no cgroup CPU quota (cpu.max is max)"
        values = _integers(text, 2)
        if values is None:
            return None, f"cgroup cpu.max unparsable ({text.strip()!r})"
    elif "cpu.cfs_quota_us" in files:
        quota, period = (_integers(files.get(name), 1) for name in CPU_FILES[1])
        if quota is None or period is None:
            return None, "cgroup cpu.cfs_quota_us or cpu.cfs_period_us missing, unreadable or unparsable"
        if quota[0] < 0:
            return None, "no cgroup CPU quota (cpu.cfs_quota_us is -1)"
        values = quota + period
    else:
        return None, "no cgroup CPU controller"
    quota_us, period_us = values
    if quota_us <= 0 or period_us <= 0:
        return None, f"cgroup CPU quota {quota_us}/{period_us} unusable"
    return quota_us / period_us, ""


def count_cpus(files: Mapping[str, str | None], affinity: int) -> CpuCount:
    """The CPUs this process may use: the quota rounded up (as `num_cpus` does), at most the affinity set."""
    affinity = max(1, affinity)
    quota, why_not = cpu_quota(files)
    in_set = f"{affinity} CPU{'' if affinity == 1 else 's'} in the affinity set"
    if quota is None:
        return CpuCount(affinity, f"{in_set}, {why_not}")
    if affinity < math.ceil(quota):
        return CpuCount(affinity, f"{in_set}, fewer than the cgroup CPU quota {quota:g} CPUs")
    return CpuCount(math.ceil(quota), f"cgroup CPU quota {quota:g} CPUs")


def parse_memory_limit(files: Mapping[str, str | None]) -> int | None:
    """The cgroup memory limit in bytes; None when there is none (or it cannot be read)."""
    for name in ("memory.max", "memory.limit_in_bytes"):
        if name in files:
            value = _integers(files[name], 1)  # "max" (v2 without a limit) does not parse
            if value is None or value[0] <= 0 or value[0] >= _V1_UNLIMITED:
                return None
            return value[0]
    return None


def headroom(limit: int) -> int:
    """What stays free under the memory limit: page cache, the kernel's share, a worker's growth."""
    return max(int(limit * HEADROOM_FRACTION), HEADROOM_MIN_BYTES)


def workers_that_fit(limit: int, used: int, per_worker: int) -> int:
    """How many more workers of `per_worker` bytes fit beside `used` bytes, keeping the headroom."""
    return max(0, (limit - headroom(limit) - used) // max(1, per_worker))


def describe_room(limit: int, used: int, per_worker: int) -> str:
    return (f"{used / MIB:.0f} MiB in use + {per_worker / MIB:.0f} MiB per worker + "
            f"{headroom(limit) / MIB:.0f} MiB headroom, memory limit {limit / MIB:.0f} MiB")


# --- I/O: the files of this process -------------------------------------------------------------

def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def read_cgroup_files(controller: str, names: Mapping[int, tuple[str, ...]], proc: Path = Path("/proc/self"),
                      root: Path = Path("/")) -> dict[str, str | None]:
    """The text of `controller`'s files for this process (None: missing or unreadable); {} without
    such a cgroup. `root` is where the cgroup mount points are (tests give a directory of their own)."""
    location = locate_cgroup(_read(proc / "cgroup"), _read(proc / "mountinfo"), controller)
    if location is None:
        return {}
    version, directory = location
    base = root / directory.lstrip("/")
    return {name: _read(base / name) for name in names[version]}


def affinity_size() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


@functools.cache
def available_cpus() -> CpuCount:
    """The CPUs this process may use (read once: the default worker count)."""
    return count_cpus(read_cgroup_files("cpu", CPU_FILES), affinity_size())


def worker_plan(settings: ServerSettings) -> WorkerPlan:
    """The pool for `settings` on this machine (the CPUs read once)."""
    return plan_workers(settings, available_cpus() if settings.workers is None else CpuCount(settings.workers, ""))


def memory_limit() -> int | None:
    """The memory limit of this process's cgroup, read each time (a pod's limit can be resized in place)."""
    return parse_memory_limit(read_cgroup_files("memory", MEMORY_FILES))
