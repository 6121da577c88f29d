"""A worker's view of the cluster cache process: the ClusterClient interface (`list`, `get`, `can_i`,
answering JSON bytes or raising ClusterError), asked over the cache's Unix socket.

One connection per thread, kept open and reused. The caller's timeout bounds everything: connecting
(retried while the cache restarts), sending and reading the answer. A request is a read, so one that found
its connection broken is sent again on a new one while time is left.

Lists are kept by the worker with their version (a BoundedCache: at most `CacheLimits.kept_list_bytes`, one
entry per list the cache may hold, least recently used first out, dropped after KEPT_LIST_SECONDS unused).
A list asked again names the version it holds, and the cache answers "unchanged" instead of sending the
whole list again: a 10,000-object list is a few bytes on the socket until it changes.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from kwserver.bounded_cache import BoundedCache
from kwserver.cluster import wire
from kwserver.cluster.field_masks import normalized
from kwserver.cluster.limits import CacheLimits, ClusterError

# Of the caller's time, this much is kept to carry the answer back; the cache gets the rest.
TRANSFER_MARGIN_SECONDS = 0.1
CONNECT_RETRY_SECONDS = 0.05
KEPT_LIST_SECONDS = 300.0

# (api_version, kind, namespace, label_selector, field_selector, field masks)
ListKey = tuple[str, str, str | None, str | None, str | None, tuple[str, ...] | None]


def kept_lists(limits: CacheLimits) -> BoundedCache[tuple[str, bytes]]:
    """A worker's lists, by key: (version, body)."""
    return BoundedCache("kept_lists", max_entries=limits.max_reflectors, max_bytes=limits.kept_list_bytes,
                        ttl=KEPT_LIST_SECONDS, size=lambda kept: len(kept[1]), renew_on_use=True)


class CacheProxy:
    def __init__(self, path: str, limits: CacheLimits | None = None):
        self.path = path
        self.local = threading.local()
        self.kept = kept_lists(limits or CacheLimits())

    def list(self, api_version: str, kind: str, namespace: str | None, label_selector: str | None,
             field_selector: str | None, timeout: float, masks: list[str] | None = None) -> bytes:
        key: ListKey = (api_version, kind, namespace, label_selector, field_selector, normalized(masks))
        what = f"cannot list {api_version}/{kind}"
        kept = self.kept.get(key)
        answer = wire.read_versioned(self._ask(what, "list_since", [*key, kept[0] if kept else None], timeout))
        if answer is None:  # the version this worker holds
            if kept is None:
                raise ClusterError(f"{what}: the cluster cache answered 'unchanged' to a first request")
            return kept[1]
        self.kept.put(key, answer)
        return answer[1]

    def get(self, api_version: str, kind: str, name: str, namespace: str | None, disable_cache: bool,
            timeout: float, masks: list[str] | None = None) -> bytes:
        return self._ask(f"cannot get {api_version}/{kind} {name}", "get",
                         [api_version, kind, name, namespace, disable_cache, normalized(masks)], timeout)

    def can_i(self, review: dict[str, Any], disable_cache: bool, timeout: float) -> bytes:
        return self._ask("cannot create a SubjectAccessReview", "can_i", [review, disable_cache], timeout)

    def plural(self, api_version: str, kind: str, timeout: float) -> bytes:
        return self._ask(f"error finding resource {api_version} / {kind}", "plural", [api_version, kind], timeout)

    def close(self) -> None:
        sock = getattr(self.local, "sock", None)
        if sock is not None:
            sock.close()
            self.local.sock = None

    def _ask(self, what: str, op: str, args: list[Any], timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        frame = wire.request_frame(op, args, max(timeout - TRANSFER_MARGIN_SECONDS, timeout / 2))
        problem = "no answer"
        for _attempt in range(2):
            sock = self._connection(what, deadline)
            try:
                wire.send(sock, frame)
                answer = wire.receive(sock, deadline)
            except wire.Timeout:
                self.close()  # an answer may still come: this connection cannot be reused
                raise ClusterError(f"{what}: the cluster cache did not answer in time") from None
            except wire.ConnectionLost as exc:
                self.close()
                problem = str(exc)
                continue
            if answer[:1] == wire.OK:
                return answer[1:]
            raise ClusterError(answer[1:].decode(errors="replace"))
        raise ClusterError(f"{what}: the cluster cache went away: {problem}")

    def _connection(self, what: str, deadline: float) -> socket.socket:
        sock = getattr(self.local, "sock", None)
        if sock is not None:
            return sock
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                sock.connect(self.path)
            except OSError as exc:
                sock.close()
                # Absent or refusing: the cache is (re)starting. Try again until the caller's time is up.
                if time.monotonic() + CONNECT_RETRY_SECONDS >= deadline:
                    raise ClusterError(f"{what}: the cluster cache is not reachable: "
                                       f"{exc.strerror or exc}") from None
                time.sleep(CONNECT_RETRY_SECONDS)
                continue
            self.local.sock = sock
            return sock

