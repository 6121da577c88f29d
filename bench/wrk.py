"""The load generator: wrk (Debian package `wrk`) with bench/admission.lua.

wrk runs as its own process on the same cores as the server, so its CPU time is measured too (exact
totals from the kernel's rusage of the finished child; psutil samples it while it runs).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

LUA_SCRIPT = Path(__file__).resolve().parent / "admission.lua"
RESULT_MARKER = "BENCH_WRK_RESULT "
INSTALL_HINT = "wrk is not installed: run `apt-get install -y wrk` (Debian/Ubuntu), or put a wrk 4.x on PATH"


class WrkMissing(RuntimeError):
    pass


class WrkFailed(RuntimeError):
    pass


def find_wrk() -> str:
    """Path of the wrk binary; raises WrkMissing with the install command when absent."""
    path = os.environ.get("BENCH_WRK") or shutil.which("wrk")
    if not path or not os.access(path, os.X_OK):
        raise WrkMissing(INSTALL_HINT)
    return path


@dataclass
class WrkResult:
    """One wrk run. Latencies in microseconds, as wrk reports them."""

    duration_s: float
    requests: int
    bytes: int
    errors: dict[str, int]
    latency_us: dict[str, float]
    non_2xx: int = 0
    wrk_cpu_s: float = 0.0  # user + system CPU of the wrk process
    wall_s: float = 0.0  # wall time of the wrk process, start to exit
    entries: int = 1
    text: str = ""

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.pop("text")
        doc["rps"] = self.rps
        return doc


_DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """A wrk duration (`2.41ms`, `523.00us`, `1.20s`, `2m`) in seconds."""
    match = re.fullmatch(r"([0-9.]+)(us|ms|s|m|h)", text.strip())
    if not match:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_output(text: str) -> WrkResult:
    """Parse wrk's stdout: the JSON line printed by admission.lua's `done`, cross-checked with the text."""
    doc = None
    for line in text.splitlines():
        if line.startswith(RESULT_MARKER):
            doc = json.loads(line[len(RESULT_MARKER):])
    if doc is None:
        raise WrkFailed(f"wrk printed no {RESULT_MARKER.strip()} line:\n{text[-2000:]}")
    non_2xx = 0
    match = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    if match:
        non_2xx = int(match.group(1))
    text_requests = re.search(r"(\d+) requests in ([0-9.]+\w+)", text)
    if text_requests and int(text_requests.group(1)) != doc["requests"]:
        raise WrkFailed(f"wrk text and JSON summary disagree: {text_requests.group(0)} vs {doc['requests']}")
    return WrkResult(
        duration_s=doc["duration_us"] / 1e6,
        requests=doc["requests"],
        bytes=doc["bytes"],
        errors=dict(doc["errors"]),
        latency_us={k: float(v) for k, v in doc["latency_us"].items()},
        non_2xx=non_2xx,
        entries=doc.get("entries", 1),
        text=text,
    )


def write_manifest(path: Path, requests: Sequence[tuple[str, Path]]) -> Path:
    """Write the manifest that admission.lua reads: `<url path>\\t<body file>` per line."""
    if not requests:
        raise ValueError("a load point needs at least one request")
    lines = []
    for url_path, body in requests:
        if not url_path.startswith("/") or any(c.isspace() for c in url_path):
            raise ValueError(f"bad url path {url_path!r}")
        lines.append(f"{url_path}\t{Path(body).resolve()}")
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class WrkCommand:
    url: str  # scheme://127.0.0.1:port (the path comes from the manifest)
    manifest: Path
    duration_s: float
    connections: int
    threads: int = 1
    timeout_s: float = 10.0
    extra_env: dict[str, str] = field(default_factory=dict)

    def argv(self, wrk: str) -> list[str]:
        if not (self.url.startswith("http://127.0.0.1:") or self.url.startswith("https://127.0.0.1:")):
            raise ValueError(f"load targets 127.0.0.1 only, not {self.url}")
        seconds = max(1, round(self.duration_s))
        return [
            wrk, f"-t{self.threads}", f"-c{max(self.connections, self.threads)}", f"-d{seconds}s",
            f"--timeout={max(1, round(self.timeout_s))}s", "-s", str(LUA_SCRIPT), "--latency", self.url + "/",
        ]


class WrkAborted(RuntimeError):
    """The probe rejected the run (e.g. the connections landed unevenly on the workers)."""


def run_wrk(command: WrkCommand, *, on_start: Callable[[int], None] | None = None,
            on_exit: Callable[[int], None] | None = None,
            probe: tuple[float, Callable[[], bool]] | None = None) -> WrkResult:
    """Run wrk to completion (bounded: its duration plus a grace period) and return its figures.

    `probe` = (seconds, check): once, that many seconds after the start, call `check()`; when it
    answers False, wrk is killed and WrkAborted raised.
    """
    wrk = find_wrk()
    env = {**os.environ, "BENCH_MANIFEST": str(command.manifest), **command.extra_env}
    argv = command.argv(wrk)
    started = time.monotonic()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    if on_start:
        on_start(process.pid)
    deadline = started + command.duration_s + command.timeout_s + 30
    rusage = None
    try:
        # wait4 gives the exact CPU time of the finished child; poll it so the run stays bounded.
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid == process.pid:
                process.returncode = os.waitstatus_to_exitcode(status)
                rusage = usage
                break
            if probe is not None and time.monotonic() - started >= probe[0]:
                check, probe = probe[1], None
                if not check():
                    process.kill()
                    os.wait4(process.pid, 0)
                    process.returncode = -9
                    raise WrkAborted("probe rejected the run")
            if time.monotonic() > deadline:
                process.kill()
                _, status, rusage = os.wait4(process.pid, 0)
                process.returncode = os.waitstatus_to_exitcode(status)
                raise WrkFailed(f"wrk did not finish within {deadline - started:.0f}s: {' '.join(argv)}")
            time.sleep(0.02)
    finally:
        wall = time.monotonic() - started
        if on_exit:
            on_exit(process.pid)
        out = process.stdout.read().decode("utf-8", "replace") if process.stdout else ""
        if process.stdout:
            process.stdout.close()
    if process.returncode != 0:
        raise WrkFailed(f"wrk exited with {process.returncode}: {' '.join(argv)}\n{out[-2000:]}")
    result = parse_output(out)
    result.wall_s = wall
    if rusage is not None:
        result.wrk_cpu_s = rusage.ru_utime + rusage.ru_stime
    return result
