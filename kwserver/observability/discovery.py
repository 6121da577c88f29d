"""Finding running servers: while it runs, each master keeps a small state file (its pid, ports and
policies file) in a runtime directory; `kwserver top` and `kwserver reload` read them.

The runtime directory is `$KWSERVER_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/kwserver`, else
`<tmp>/kwserver-<uid>`. It must belong to the user and be private (0700): a state file names a
process to signal and a URL to read, so nothing another user could have written is trusted. A master
that was killed leaves its file behind; a file whose process is gone (or is another process that
reuses the pid) is ignored.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from kwserver import __version__
from kwserver.config import ServerSettings

log = logging.getLogger(__name__)

RUNTIME_DIR_VARIABLE = "KWSERVER_RUNTIME_DIR"
MASTER_TITLE = "kwserver: master"
_SUFFIX = ".json"


class DiscoveryError(Exception):
    """No server, or several and no way to choose: the message says what was found."""


@dataclass(frozen=True)
class MasterState:
    """What a master publishes about itself."""

    pid: int
    started: float  # the process's create time: tells the master from a process that reuses its pid
    addr: str
    port: int
    readiness_port: int
    metrics_port: int  # 0: metrics disabled
    policies: str
    version: str = __version__

    @property
    def metrics_url(self) -> str | None:
        if not self.metrics_port:
            return None
        return f"http://{_connectable(self.addr)}:{self.metrics_port}"

    def describe(self) -> str:
        metrics = self.metrics_url or "no metrics (--metrics-port 0)"
        return (f"pid {self.pid}: API {_connectable(self.addr)}:{self.port}, metrics {metrics}, "
                f"policies {self.policies}")


@dataclass(frozen=True)
class Master:
    """A running master: from its state file, or only from its process title (then `state` is None)."""

    pid: int
    state: MasterState | None

    def describe(self) -> str:
        return self.state.describe() if self.state else f"pid {self.pid}: no state file (ports unknown)"


def _connectable(addr: str) -> str:
    """Where a client reaches a listener bound to `addr` on this machine."""
    host = addr.strip("[]")
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def runtime_dir(environ: Mapping[str, str] = os.environ) -> Path:
    if environ.get(RUNTIME_DIR_VARIABLE):
        return Path(environ[RUNTIME_DIR_VARIABLE])
    if environ.get("XDG_RUNTIME_DIR"):
        return Path(environ["XDG_RUNTIME_DIR"]) / "kwserver"
    return Path(tempfile.gettempdir()) / f"kwserver-{os.getuid()}"


def _private_dir(path: Path, create: bool) -> bool:
    """True when `path` is a directory of ours that nobody else can write (made so when `create`)."""
    if create:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        info = path.lstat()
    except FileNotFoundError:
        return False
    return (stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()
            and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _state_path(directory: Path, pid: int) -> Path:
    return directory / f"{pid}{_SUFFIX}"


def announce(settings: ServerSettings) -> None:
    """Publish this master's state (gunicorn's when_ready). A failure is logged, never fatal."""
    directory = runtime_dir()
    pid = os.getpid()
    state = MasterState(
        pid=pid, started=psutil.Process(pid).create_time(), addr=settings.addr, port=settings.port,
        readiness_port=settings.readiness_probe_port, metrics_port=settings.metrics_listener_port,
        policies=str(Path(settings.policies).resolve()),
    )
    try:
        if not _private_dir(directory, create=True):
            log.warning("not writing a state file: %s is not a private directory of this user "
                        "(set %s); kwserver top and reload will need --url or --pid", directory,
                        RUNTIME_DIR_VARIABLE)
            return
        scratch = directory / f".{pid}.tmp"
        scratch.write_text(json.dumps(asdict(state)))
        scratch.replace(_state_path(directory, pid))  # atomic: readers never see half a file
    except OSError as exc:
        log.warning("cannot write the state file in %s: %s; kwserver top and reload will need --url or --pid",
                    directory, exc)


def withdraw() -> None:
    """Remove this master's state file (gunicorn's on_exit)."""
    try:
        _state_path(runtime_dir(), os.getpid()).unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove the state file: %s", exc)


def _is_alive(state: MasterState) -> bool:
    try:
        return abs(psutil.Process(state.pid).create_time() - state.started) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _read_state(path: Path) -> MasterState | None:
    try:
        return MasterState(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None  # half-written by a master of another version, or not ours: not a server to use


def published_masters(directory: Path | None = None) -> list[MasterState]:
    directory = directory or runtime_dir()
    if not _private_dir(directory, create=False):
        return []
    states = (_read_state(path) for path in sorted(directory.glob(f"*{_SUFFIX}")))
    return sorted((s for s in states if s is not None and _is_alive(s)), key=lambda s: s.pid)


def titled_masters() -> list[int]:
    """Pids of this user's processes titled as kwserver masters."""
    pids = []
    for process in psutil.process_iter(["cmdline", "uids"]):
        title = " ".join(process.info["cmdline"] or [])
        uids = process.info["uids"]
        if title.startswith(MASTER_TITLE) and uids is not None and uids.real == os.getuid():
            pids.append(process.pid)
    return pids


def running_masters() -> list[Master]:
    """Masters that published their state; when there is none, masters found by process title."""
    published = published_masters()
    if published:
        return [Master(state.pid, state) for state in published]
    return [Master(pid, None) for pid in titled_masters()]


def master_with_pid(pid: int) -> Master:
    """The running master `pid`, published or titled; DiscoveryError for any other process."""
    masters = [Master(state.pid, state) for state in published_masters()]
    masters += [Master(titled, None) for titled in titled_masters() if titled not in {m.pid for m in masters}]
    return choose(masters, pid)


def choose(masters: list[Master], pid: int | None = None) -> Master:
    """The one master to act on: the one with `pid`, or the only one running."""
    if pid is not None:
        for master in masters:
            if master.pid == pid:
                return master
        found = f"running:{_listing(masters)}" if masters else "none is running"
        raise DiscoveryError(f"no running kwserver master has pid {pid}; {found}")
    if len(masters) == 1:
        return masters[0]
    if not masters:
        raise DiscoveryError(
            f"no running kwserver found (no state file in {runtime_dir()}, no process titled "
            f"'{MASTER_TITLE}'); give --url or --pid, or set {RUNTIME_DIR_VARIABLE} as the server has it")
    raise DiscoveryError(f"found {len(masters)} running kwserver masters, choose one with --pid or --url:"
                         f"{_listing(masters)}")


def _listing(masters: list[Master]) -> str:
    return "".join(f"\n  {master.describe()}" for master in masters)
