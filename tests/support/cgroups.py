"""A cgroup of the test's own, below the test's current one, with a CPU quota and a memory limit.

Made where the machine lets the tests make one (root with writable cgroup hierarchies, v1 or v2);
`Cgroup.make()` is None elsewhere and the tests that need it skip. A server runs in it through
`wrap(command)`, which moves the process into the cgroup before it starts.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import time
import uuid
from pathlib import Path

from kwserver.server.sizing import locate_cgroup

CONTROLLERS = ("cpu", "memory")


class Cgroup:
    def __init__(self, directories: dict[str, tuple[int, Path]]):
        self.directories = directories  # controller -> (cgroup version, directory)

    @classmethod
    def make(cls) -> Cgroup | None:
        proc_cgroup, mountinfo = (Path("/proc/self", name).read_text() for name in ("cgroup", "mountinfo"))
        name = f"kwserver-test-{uuid.uuid4().hex[:8]}"
        made: dict[str, tuple[int, Path]] = {}
        try:
            for controller in CONTROLLERS:
                location = locate_cgroup(proc_cgroup, mountinfo, controller)
                if location is None:
                    return None
                version, parent = location
                directory = Path(parent) / name
                if version == 2 and any(v == 2 for v, _ in made.values()):
                    made[controller] = (version, directory)
                    continue
                if version == 2:
                    (Path(parent) / "cgroup.subtree_control").write_text("+cpu +memory")
                directory.mkdir()
                made[controller] = (version, directory)
            group = cls(made)
            group.set_cpu(None)  # fails unless the controller's files are there
            return group
        except OSError:
            cls(made).remove()
            return None

    def _file(self, controller: str, v1: str, v2: str) -> Path:
        version, directory = self.directories[controller]
        return directory / (v2 if version == 2 else v1)

    def set_cpu(self, quota_us: int | None, period_us: int = 100_000) -> None:
        """A CPU quota of `quota_us` per `period_us` (None: no quota)."""
        version, _ = self.directories["cpu"]
        if version == 2:
            self._file("cpu", "", "cpu.max").write_text(f"{quota_us or 'max'} {period_us}")
        else:
            self._file("cpu", "cpu.cfs_period_us", "").write_text(str(period_us))
            self._file("cpu", "cpu.cfs_quota_us", "").write_text(str(quota_us or -1))

    def set_memory(self, limit: int | None) -> None:
        """A memory limit of `limit` bytes (None: no limit)."""
        version, _ = self.directories["memory"]
        text = str(limit) if limit else ("max" if version == 2 else "-1")
        self._file("memory", "memory.limit_in_bytes", "memory.max").write_text(text)

    def wrap(self, command: list[str]) -> list[str]:
        """`command`, run inside this cgroup."""
        procs = sorted({str(directory / "cgroup.procs") for _, directory in self.directories.values()})
        moves = " && ".join(f'echo $$ > {shlex.quote(path)}' for path in procs)
        return ["sh", "-c", f'{moves} && exec "$@"', "sh", *command]

    def remove(self) -> None:
        for _, directory in self.directories.values():
            for _ in range(50):
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    with contextlib.suppress(OSError):  # a process still leaving it
                        for pid in (directory / "cgroup.procs").read_text().split():
                            os.kill(int(pid), 9)
                    time.sleep(0.1)
