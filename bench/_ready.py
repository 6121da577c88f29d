"""Readiness marker of the bench's own gunicorn apps (no dependencies: imported by every worker)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def mark_worker_ready() -> None:
    """Touch `$BENCH_READY_DIR/<pid>` once this worker has loaded its app (see servers.start_gunicorn_app)."""
    directory = os.environ.get("BENCH_READY_DIR")
    if directory:
        with contextlib.suppress(OSError):
            Path(directory, str(os.getpid())).touch()
