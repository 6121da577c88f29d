"""`kwserver top`: a live view of the server's processes, from the master's `/status` endpoint."""

from __future__ import annotations

import shutil
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import orjson

MIB = 1024 * 1024


def fetch_status(url: str, timeout: float = 5.0) -> dict[str, Any]:
    with urllib.request.urlopen(url.rstrip("/") + "/status", timeout=timeout) as reply:
        return orjson.loads(reply.read())


def _mib(value: float) -> str:
    return f"{value / MIB:8.1f}"


def render(status: dict[str, Any], width: int | None = None) -> str:
    """A plain-text table: one row per process, then the totals that matter for a pod memory limit.
    With `width` (a terminal's), process rows are cut to it, as `ps` cuts them."""
    header = f"{'PID':>8} {'ROLE':<7} {'RSS MiB':>8} {'USS MiB':>8} {'PSS MiB':>8} {'SHR MiB':>8} {'SWAP':>8} " \
             f"{'CPU s':>8} {'REQUESTS':>9} {'INST':>5} {'INST MiB':>8}  POLICIES WITH INSTANCES"
    lines = [
        f"kwserver {status['version']}: {status['workers']} workers, {status['policies']} policies over "
        f"{status['modules']} modules, {status['compiled_module_bytes'] / MIB:.1f} MiB compiled code shared "
        f"(loaded in {status['boot_seconds']:.2f}s, compile cache {status['compile_cache_hits']} hit / "
        f"{status['compile_cache_misses']} miss)",
        "",
        header,
    ]
    for process in status["processes"]:
        instances = process.get("instances", {})
        held = "; ".join(f"{label} ({count})" for label, count in sorted(instances.items()))
        row = (
            f"{process['pid']:>8} {process['role']:<7} {_mib(process['rss'])} {_mib(process['uss'])} "
            f"{_mib(process['pss'])} {_mib(process['shared'])} {_mib(process['swap'])} "
            f"{process['cpu_seconds']:8.1f} {process.get('requests', 0):>9} {sum(instances.values()):>5} "
            f"{_mib(process.get('instance_bytes', 0))}  {held}"
        )
        lines.append(row if width is None or len(row) <= width else row[:width - 1] + "…")
    totals = status["totals"]
    lines += [
        "",
        f"total PSS {totals['pss'] / MIB:.1f} MiB (the server's real footprint; compare with the pod's memory "
        f"limit) · sum of USS {totals['uss'] / MIB:.1f} MiB · sum of RSS {totals['rss'] / MIB:.1f} MiB "
        "(counts shared pages once per process)",
    ]
    return "\n".join(lines)


def run(url: str, *, once: bool, as_json: bool, interval: float) -> int:
    while True:
        try:
            status = fetch_status(url)
        except (urllib.error.URLError, OSError) as exc:
            print(f"error: cannot read {url}/status: {exc}", file=sys.stderr)
            return 1
        if as_json:
            print(orjson.dumps(status, option=orjson.OPT_INDENT_2).decode())
        else:
            if not once:
                print("\x1b[H\x1b[2J", end="")
            print(render(status, shutil.get_terminal_size().columns if sys.stdout.isatty() else None))
        if once:
            return 0
        try:
            time.sleep(interval)
        except KeyboardInterrupt:
            return 0
