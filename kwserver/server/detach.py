"""`--daemon`: the server detaches from the terminal and runs in the background, as the reference's does.

Before anything is loaded, while the command's caller still sees the errors: the output files are
opened (appended to) and the pid file is created. Then the classic double fork (a session of its
own, no controlling terminal); the daemon reads /dev/null, writes to `--daemon-stdout-file` and
`--daemon-stderr-file` (else /dev/null) and puts its pid in `--daemon-pid-file`, which it removes
when it exits. The command returns once the daemon is detached and its pid written; whether the
server then starts is in its log. The working directory is kept, so relative paths mean what they
meant on the command line.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys

log = logging.getLogger(__name__)


class DetachError(Exception):
    """The daemon cannot be set up; the message is for the operator."""


def _open_output(path: str | None, stream: str) -> int | None:
    if path is None:
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as exc:
        raise DetachError(f"Cannot create file for daemon {stream}: {path}: {exc.strerror}") from None


def _remove_pid_file(path: str, pid: int) -> None:
    """At the daemon's exit (not a worker's: they inherit this hook), if the file still names it."""
    if os.getpid() != pid:
        return
    with contextlib.suppress(OSError, ValueError), open(path) as stream:
        if int(stream.read().strip() or 0) == pid:
            os.unlink(path)


def detach(pid_file: str, stdout_file: str | None, stderr_file: str | None) -> None:
    """Returns in the daemon; the calling process exits (0 once the daemon has written its pid)."""
    outputs = [_open_output(stdout_file, "stdout"), _open_output(stderr_file, "stderr")]
    pid_path = os.path.abspath(pid_file)
    try:
        pid_fd = os.open(pid_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as exc:
        raise DetachError(f"Cannot daemonize: cannot write the pid file {pid_path}: {exc.strerror}") from None
    log.info("running as a daemon: pid file %s, stdout to %s, stderr to %s", pid_path,
             stdout_file or os.devnull, stderr_file or os.devnull)
    sys.stdout.flush()
    sys.stderr.flush()
    told, tell = os.pipe()
    if os.fork():
        os.close(tell)
        os.wait()  # the first child, gone as soon as it has forked the daemon
        pid = os.read(told, 32).decode()
        if pid:
            log.info("detached from the terminal: the daemon's pid is %s", pid)
        sys.stderr.flush()
        os._exit(0 if pid else 1)
    os.close(told)
    os.setsid()
    if os.fork():
        os._exit(0)
    pid = os.getpid()
    os.write(pid_fd, f"{pid}\n".encode())
    os.close(pid_fd)
    atexit.register(_remove_pid_file, pid_path, pid)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    for fd, output in zip((1, 2), outputs, strict=True):
        os.dup2(null if output is None else output, fd)
    for fd in {null, *outputs} - {None, 0, 1, 2}:
        os.close(fd)
    os.write(tell, str(pid).encode())
    os.close(tell)
