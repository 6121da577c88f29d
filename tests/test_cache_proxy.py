"""A worker's cluster cache proxy against a real cache server (its socket and frames, in-process): lists
are kept with their versions, and a list asked again travels only when it changed."""

from __future__ import annotations

import threading

import pytest

from kwserver.cluster.cache_proxy import CacheProxy, KeptLists
from kwserver.cluster.cache_server import CacheServer

KEY = ("v1", "Namespace", None, None, None)


class VersionedLists:
    """A cluster client whose list answers and versions the test sets."""

    def __init__(self):
        self.version, self.body = "a:1", b'{"items":[1]}'

    def list_version(self, api_version, kind, namespace, label_selector, field_selector, timeout):
        return self.version, self.body


@pytest.fixture
def cache(tmp_path):
    lists = VersionedLists()
    server = CacheServer(str(tmp_path / "cache.sock"), lists)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    proxy = CacheProxy(str(tmp_path / "cache.sock"))
    yield lists, proxy
    proxy.close()
    server.shutdown()
    server.server_close()


def test_an_unchanged_list_is_not_sent_again(cache):
    lists, proxy = cache
    assert proxy.list(*KEY, timeout=5) == b'{"items":[1]}'
    lists.body = b"not sent: the version is the one the worker holds"
    assert proxy.list(*KEY, timeout=5) == b'{"items":[1]}'


def test_a_changed_list_is_sent_and_kept_in_its_place(cache):
    lists, proxy = cache
    proxy.list(*KEY, timeout=5)
    lists.version, lists.body = "a:2", b'{"items":[1,2]}'
    assert proxy.list(*KEY, timeout=5) == b'{"items":[1,2]}'
    # A restarted cache starts its generations again, under another incarnation.
    lists.version, lists.body = "b:1", b'{"items":[]}'
    assert proxy.list(*KEY, timeout=5) == b'{"items":[]}'
    assert proxy.kept.size == len(b'{"items":[]}')


def test_a_list_dropped_from_the_kept_ones_is_asked_in_full(cache):
    _, proxy = cache
    proxy.list(*KEY, timeout=5)
    proxy.kept.put(KEY, "a:1", b"x" * (proxy.kept.limit + 1))  # too large to keep: the old copy is gone too
    assert proxy.kept.version(KEY) is None
    assert proxy.list(*KEY, timeout=5) == b'{"items":[1]}'


def test_kept_lists_are_bounded_least_recently_used_first():
    kept = KeptLists(limit=10)
    kept.put(("a",) * 5, "1", b"aaaa")
    kept.put(("b",) * 5, "1", b"bbbb")
    assert kept.get(("a",) * 5, "1") == b"aaaa"  # a is now the most recently used
    kept.put(("c",) * 5, "1", b"cccc")
    assert kept.version(("b",) * 5) is None and kept.size == 8
    assert kept.get(("a",) * 5, "2") is None  # another version is not this one
    kept.put(("d",) * 5, "1", b"d" * 11)
    assert kept.version(("d",) * 5) is None and kept.size == 8
