"""gunicorn settings for kwserver: `gunicorn -c gunicorn.conf.py` runs what `kwserver serve` runs.

The values come from kwserver's own settings, the KUBEWARDEN_* / KWSERVER_* environment variables
(`kwserver serve --help` lists them), through kwserver/server/gunicorn_config.py, where every gunicorn
setting kwserver uses is declared once with the reason for its value:

- bind: KUBEWARDEN_BIND_ADDRESS and KUBEWARDEN_PORT (the admission API). Readiness
  (KUBEWARDEN_READINESS_PROBE_PORT) and metrics (there too, or KWSERVER_METRICS_PORT) are served by the master.
- workers: KUBEWARDEN_WORKERS (default: the CPUs the process may use: cgroup quota, affinity);
  KWSERVER_MIN_WORKERS / KWSERVER_MAX_WORKERS let the pool follow the load. Compiled policies are shared,
  so an extra worker costs little memory (bench/results/workers); more workers than CPUs costs CPU per request.
- worker_class: kwserver's event-loop worker (kwserver/server/worker.py, uvloop + httptools): each request
  is read whole before it is evaluated, so stalled clients never hold an evaluation. Its limits:
  KWSERVER_HEADER_TIMEOUT_SECONDS (10), KWSERVER_BODY_TIMEOUT_SECONDS (30),
  KWSERVER_TLS_HANDSHAKE_TIMEOUT_SECONDS (10), KWSERVER_SEND_TIMEOUT_SECONDS (30),
  KWSERVER_MAX_CONNECTIONS_PER_WORKER (1024, lowered to fit the open-files limit).
- keepalive: KWSERVER_KEEPALIVE_TIMEOUT_SECONDS (75): idle keep-alive connections (the API server
  reuses its TLS connections to webhooks) are closed after this.
- graceful_timeout: retired workers (reload, shrink, recycling, shutdown) finish in-flight requests.
- max_requests (+10% jitter): KWSERVER_WORKER_MAX_REQUESTS recycles workers (0: never).
- certfile, keyfile, ssl_context: KUBEWARDEN_CERT_FILE / KUBEWARDEN_KEY_FILE, and
  KUBEWARDEN_CLIENT_CA_FILE for mandatory client certificates; files are re-read when they rotate.
- loglevel: KUBEWARDEN_LOG_LEVEL; preload_app: the master compiles every policy before forking;
  hooks (when_ready, pre_fork, post_fork, child_exit, on_reload, on_exit) call into kwserver.server.daemon.

To tune gunicorn directly, set a value below the import; it wins over kwserver's.
"""

from kwserver.server.gunicorn_config import *  # noqa: F403
