"""gunicorn's settings and hooks for kwserver, declared once.

`kwserver serve` loads this module (then the user's `--gunicorn-config`), and the repository's
`gunicorn.conf.py` imports it for `gunicorn -c gunicorn.conf.py`, so both run with the same
settings. Values come from kwserver's settings (flags and KUBEWARDEN_* / KWSERVER_* variables) of
the daemon of this process. The hooks are thin: `kwserver.server.daemon.Daemon` owns the lifecycle.
"""

from __future__ import annotations

import ssl as _ssl
from collections.abc import Callable as _Callable
from typing import Any as _Any

from kwserver.logs import gunicorn_log_level
from kwserver.observability import discovery
from kwserver.server.daemon import GRACEFUL_TIMEOUT_SECONDS, get_daemon
from kwserver.server.sizing import worker_plan

_settings = get_daemon().settings

# The admission API listener. Readiness and metrics are served by the master on their own ports.
bind = get_daemon().bind
# Compiled policies are shared by all workers; the pool may grow and shrink between
# --min-workers and --max-workers.
workers = worker_plan(_settings).initial
# An event loop reads whole requests (limits and timeouts per connection), then evaluates them one at
# a time: see kwserver/server/worker.py. The class carries this server's limits.
worker_class = get_daemon().worker_class
keepalive = _settings.keepalive_timeout_seconds
# Retired workers (reload, pool shrink, recycling, shutdown) finish their in-flight requests first.
graceful_timeout = GRACEFUL_TIMEOUT_SECONDS
max_requests = _settings.worker_max_requests
max_requests_jitter = _settings.worker_max_requests // 10
pidfile = _settings.pid_file
# kwserver's control surface is its metrics port (`kwserver top`) and `kwserver reload`; gunicorn's
# control socket sits at one path per user and would collide between servers.
control_socket_disable = True
# Required: the master fetches, validates and compiles every policy before forking.
preload_app = True
wsgi_app = "kwserver.server.gunicorn_config:load_app()"
proc_name = "kwserver"
loglevel = gunicorn_log_level(_settings.log_level)

if _settings.tls:
    certfile = _settings.cert_file
    keyfile = _settings.key_file


# --- hooks: they find this process's daemon and delegate ---------------------------------------------

def load_app() -> _Callable:
    """The WSGI app, built by the master (preload) before it forks."""
    return get_daemon().load()


def when_ready(server: _Any) -> None:
    get_daemon().on_ready(server)
    discovery.announce(get_daemon().settings)  # so `kwserver top` and `reload` find this server


def pre_fork(server: _Any, worker: _Any) -> None:
    get_daemon().before_fork()


def post_fork(server: _Any, worker: _Any) -> None:
    get_daemon().after_fork(worker)


def worker_exit(server: _Any, worker: _Any) -> None:
    get_daemon().worker_exiting()


def child_exit(server: _Any, worker: _Any) -> None:
    get_daemon().worker_exited(worker.pid)


def on_reload(server: _Any) -> None:
    get_daemon().reload()


def on_exit(server: _Any) -> None:
    get_daemon().on_exit()
    discovery.withdraw()


if _settings.tls:
    def ssl_context(config: _Any, default_ssl_context_factory: _Any) -> _ssl.SSLContext:
        """Asked for every new connection: the daemon's cache rebuilds it when the files rotate."""
        return get_daemon().make_ssl_context()
