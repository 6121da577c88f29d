"""The cluster cache process: the server's one ClusterClient (reflectors, get/can_i caches), asked by every
worker over a Unix socket (frames: kwserver/cluster/wire.py).

The master starts it (kwserver/cluster/supervisor.py) as `python -m kwserver.cluster.cache_server`, a fresh
interpreter: it inherits neither the master's compiled policies nor its threads. It serves each connection
(one per worker thread) in a thread of its own; the client is thread-safe. It leaves when its parent does.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socketserver
import sys
import threading
from typing import Any

import orjson

from kwserver.cluster import wire
from kwserver.cluster.client import CacheLimits, ClusterClient, ClusterError

log = logging.getLogger(__name__)

PROCESS_TITLE = "kwserver: cluster cache"
PARENT_CHECK_SECONDS = 1.0
TITLE_EVERY_SECONDS = 5.0


def dispatch(client: ClusterClient, request: dict[str, Any]) -> bytes:
    """One request's answer frame."""
    op, args, timeout = request.get("op"), request.get("args") or [], float(request.get("timeout") or 1.0)
    try:
        if op == "list_since":
            *list_args, masks, known = args
            version, answer = client.list_version(*list_args, timeout=timeout, masks=masks)
            return wire.answer_frame(True, wire.versioned(version, None if version == known else answer))
        if op == "get":
            *get_args, masks = args
            return wire.answer_frame(True, client.get(*get_args, timeout=timeout, masks=masks))
        if op == "can_i":
            return wire.answer_frame(True, client.can_i(*args, timeout=timeout))
        if op == "plural":
            return wire.answer_frame(True, client.plural(*args, timeout=timeout))
        return wire.answer_frame(False, f"unknown cluster cache operation: {op}".encode())
    except ClusterError as exc:
        return wire.answer_frame(False, str(exc).encode())
    except Exception as exc:  # a bug must reach the caller as an error, not leave it waiting
        log.exception("cluster cache request %s failed", op)
        return wire.answer_frame(False, f"the cluster cache failed: {exc}".encode())


class _Connection(socketserver.BaseRequestHandler):
    server: CacheServer

    def handle(self) -> None:
        while True:
            try:
                request = orjson.loads(wire.receive(self.request, limit=wire.MAX_REQUEST_BYTES))
                wire.send(self.request, dispatch(self.server.client, request))
            except (wire.ConnectionLost, wire.Timeout, orjson.JSONDecodeError):
                return  # the worker went away (or timed out and dropped the connection)


class CacheServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, client: ClusterClient):
        self.client = client
        super().__init__(path, _Connection)
        os.chmod(path, 0o600)


def _leave_with_parent(server: CacheServer) -> None:
    """Orphaned (the master was killed): stop serving."""
    parent = os.getppid()
    while os.getppid() == parent:
        threading.Event().wait(PARENT_CHECK_SECONDS)
    log.warning("the kwserver master is gone; the cluster cache stops")
    server.shutdown()


def _retitle(server: CacheServer) -> None:
    """The process title, and (under `kwserver serve`, which gives a metrics directory) the metrics."""
    import setproctitle

    metrics = None
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from kwserver.observability.cache_metrics import CacheMetrics

        metrics = CacheMetrics()
    while True:
        lists, objects = server.client.sizes()
        setproctitle.setproctitle(f"{PROCESS_TITLE} [{lists} lists, {objects} objects]")
        if metrics is not None:
            metrics.reflectors(lists, objects)
            metrics.publish()
        threading.Event().wait(TITLE_EVERY_SECONDS)


def serve(path: str, limits: CacheLimits) -> None:
    from kwserver.cluster.connection import load_config, open_http

    client = ClusterClient(open_http(load_config()), limits)
    if os.path.exists(path):
        os.unlink(path)  # left by a cache process that died
    server = CacheServer(path, client)
    signal.signal(signal.SIGTERM, lambda signum, frame: threading.Thread(target=server.shutdown).start())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the master stops us
    for target in (_leave_with_parent, _retitle):
        threading.Thread(target=target, args=(server,), daemon=True, name=target.__name__).start()
    log.info("cluster cache serving on %s (at most %d lists, %d objects)", path, limits.max_reflectors,
             limits.max_objects)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        client.close()


def main(argv: list[str] | None = None) -> int:
    from kwserver.logs import configure_logging

    parser = argparse.ArgumentParser(prog="kwserver.cluster.cache_server")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--max-reflectors", type=int, required=True)
    parser.add_argument("--max-objects", type=int, required=True)
    parser.add_argument("--max-answers", type=int, required=True)
    parser.add_argument("--max-answer-bytes", type=int, required=True)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-fmt", default="text")
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_fmt)
    try:
        serve(args.socket, CacheLimits(args.max_reflectors, args.max_objects, args.max_answers,
                                       args.max_answer_bytes))
    except Exception as exc:
        log.error("the cluster cache cannot run: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
