"""How downloads and registry calls behave: timeouts, retries, the largest module accepted.

Built from the server's settings, the one place they are declared (kwserver/config.py). A module of
its own, without the HTTP libraries, so that host callbacks can hold the options without importing
those until a policy first calls a registry (kwserver/capabilities/registry_access.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from kwserver.config import ServerSettings

MIB = 1024 * 1024


@dataclass(frozen=True)
class FetchOptions:
    timeout_seconds: float  # a registry or web server silent for this long is given up on
    retries: int  # extra tries of one request after a transient failure
    max_bytes: int  # the largest module or manifest accepted

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> FetchOptions:
        return cls(timeout_seconds=settings.download_timeout_seconds, retries=settings.download_retries,
                   max_bytes=settings.max_module_size_mib * MIB)

    @classmethod
    def defaults(cls) -> FetchOptions:
        """The settings' defaults (for clients made outside a server: tools, tests)."""
        return cls.from_settings(ServerSettings())
