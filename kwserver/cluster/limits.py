"""What the server's cluster cache may hold, and the errors the callbacks read.

Apart from the client so that the master and the workers, which only talk to the cache process, never
import the HTTP and Kubernetes client libraries (lightkube, httpx: about 5 MiB in every process)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_REFLECTORS = 100
DEFAULT_MAX_OBJECTS = 100_000


@dataclass(frozen=True)
class CacheLimits:
    max_reflectors: int = DEFAULT_MAX_REFLECTORS
    max_objects: int = DEFAULT_MAX_OBJECTS


class ClusterError(Exception):
    """A request the API server refused or that could not reach it; the text is what the guest reads."""


class NotFound(ClusterError):
    pass


def describe(exc: Exception) -> str:
    return str(exc) or type(exc).__name__
