"""A worker's cluster cache proxy against a real cache server (its socket and frames, in-process): lists
are kept with their versions, and a list asked again travels only when it changed."""

from __future__ import annotations

import threading

import pytest

from kwserver.cluster.cache_proxy import CacheProxy
from kwserver.cluster.cache_server import CacheServer
from kwserver.cluster.limits import CacheLimits

KEY = ("v1", "Namespace", None, None, None)


class VersionedLists:
    """A cluster client whose list answers and versions the test sets; it records the masks asked."""

    def __init__(self):
        self.version, self.body = "a:1", b'{"items":[1]}'
        self.masks = []

    def list_version(self, api_version, kind, namespace, label_selector, field_selector, timeout, masks=None):
        self.masks.append(masks)
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
    assert proxy.kept.stats().entries == 1


def test_a_list_dropped_from_the_kept_ones_is_asked_in_full(tmp_path):
    lists = VersionedLists()
    server = CacheServer(str(tmp_path / "cache.sock"), lists)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    # Room for one list: a second one pushes the first out, which then travels again in full.
    proxy = CacheProxy(str(tmp_path / "cache.sock"), CacheLimits(max_reflectors=1))
    try:
        assert proxy.list(*KEY, timeout=5) == b'{"items":[1]}'
        proxy.list("v1", "Service", None, None, None, timeout=5)
        assert proxy.kept.get((*KEY, None)) is None
        lists.body = b'{"items":[2]}'  # same version, another body: only a full answer carries it
        assert proxy.list(*KEY, timeout=5) == b'{"items":[2]}'
        assert proxy.kept.stats().evictions["full"] == 2
    finally:
        proxy.close()
        server.shutdown()
        server.server_close()


def test_masks_are_part_of_what_a_list_is(cache):
    lists, proxy = cache
    proxy.list(*KEY, timeout=5, masks=["spec.b", "spec.a", "spec.a"])
    proxy.list(*KEY, timeout=5)
    assert lists.masks == [["spec.a", "spec.b"], None]
    assert proxy.kept.stats().entries == 2
