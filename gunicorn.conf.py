"""gunicorn settings for kwserver: `gunicorn -c gunicorn.conf.py`.

kwserver's own settings come from the same KUBEWARDEN_* / KWSERVER_* environment variables as the
flags of `kwserver serve` (see `kwserver serve --help`). The values below are what `kwserver serve`
uses too; change them here to tune gunicorn directly.
"""

from kwserver import daemon as kwserver

kw = kwserver.get_daemon()

# Listener of the admission API (KUBEWARDEN_BIND_ADDRESS, KUBEWARDEN_PORT). Readiness is served by the
# master on KUBEWARDEN_READINESS_PROBE_PORT, always plain HTTP.
bind = kw.bind

# Worker processes (KUBEWARDEN_WORKERS, default: CPUs; KWSERVER_MIN_WORKERS / KWSERVER_MAX_WORKERS let
# the pool follow the load). Compiled policies are shared; an extra worker costs about 11 MiB of PSS
# with the ten-policy example (bench/results/workers). More workers than CPUs costs CPU per request.
workers = kw.settings.initial_workers

# gthread keeps client connections alive (the API server reuses TLS connections to webhooks); one
# thread per worker measured best: concurrency comes from processes. kwserver's variant stops a busy
# worker from taking every new connection. See kwserver/daemon.py and kwserver/worker.py.
worker_class = kwserver.WORKER_CLASS
threads = kw.settings.threads
keepalive = kwserver.KEEPALIVE_SECONDS

# Retired workers (reload, pool shrink, recycling, shutdown) finish their in-flight requests first.
graceful_timeout = kwserver.GRACEFUL_TIMEOUT_SECONDS
# Recycle workers after N requests, with jitter so they don't all restart at once (KWSERVER_WORKER_MAX_REQUESTS).
max_requests = kw.settings.worker_max_requests
max_requests_jitter = kw.settings.worker_max_requests // 10
pidfile = kw.settings.pid_file
# kwserver's own control surface is the metrics port (`kwserver top`) and `kwserver reload`.
control_socket_disable = True

# Required: the master downloads, validates and compiles every policy before forking.
preload_app = True
wsgi_app = "kwserver.daemon:wsgi_app()"
proc_name = "kwserver"

# TLS (KUBEWARDEN_CERT_FILE, KUBEWARDEN_KEY_FILE, KUBEWARDEN_CLIENT_CA_FILE for mandatory mTLS).
if kw.settings.tls:
    certfile = kw.settings.cert_file
    keyfile = kw.settings.key_file
    ssl_context = kwserver.ssl_context

# Hooks: thin, kwserver.daemon owns the lifecycle (readiness, metrics, pool control, reload on SIGHUP).
when_ready = kwserver.when_ready
pre_fork = kwserver.pre_fork
post_fork = kwserver.post_fork
child_exit = kwserver.child_exit
on_reload = kwserver.on_reload
on_exit = kwserver.on_exit
