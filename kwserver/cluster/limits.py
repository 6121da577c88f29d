"""What the server's cluster cache may hold, and the errors the callbacks read.

Apart from the client so that the master and the workers, which only talk to the cache process, never
import the HTTP and Kubernetes client libraries (lightkube, httpx: about 5 MiB in every process)."""

from __future__ import annotations

from dataclasses import dataclass

from kwserver.config import MIB, ServerSettings

DEFAULT_MAX_REFLECTORS = 100
DEFAULT_MAX_OBJECTS = 100_000


@dataclass(frozen=True)
class CacheLimits:
    """Lists and objects of the cache process; the get_resource / can_i answers it keeps; and, in each
    worker, the bytes of the lists kept to skip unchanged transfers (kwserver/cluster/cache_proxy.py)."""

    max_reflectors: int = DEFAULT_MAX_REFLECTORS
    max_objects: int = DEFAULT_MAX_OBJECTS
    max_answers: int = 10_000
    max_answer_bytes: int = 64 * MIB
    kept_list_bytes: int = 32 * MIB

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> CacheLimits:
        return cls(settings.cluster_max_reflectors, settings.cluster_max_objects, settings.cluster_answer_cache_entries,
                   settings.cluster_answer_cache_mib * MIB, settings.kept_lists_mib * MIB)


class ClusterError(Exception):
    """A request the API server refused or that could not reach it; the text is what the guest reads."""


class NotFound(ClusterError):
    pass


def describe(exc: Exception) -> str:
    return str(exc) or type(exc).__name__
