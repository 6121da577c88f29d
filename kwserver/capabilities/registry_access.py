"""How host callbacks reach registries: the settings of policy downloads (sources.yml, docker config,
fetch options), the files read on first use.

It is built in the master for every policy, but the registry client and its libraries (requests,
cryptography) are only imported when a policy first calls a registry: a server whose policies never do
keeps them out of its processes (about 13 MiB, see docs/operations.md "Memory").
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from kwserver.capabilities.waiting import time_left
from kwserver.config import ServerSettings
from kwserver.sources.options import FetchOptions

if TYPE_CHECKING:
    from kwserver.sources.oci import OciClient
    from kwserver.sources.references import ImageReference


@dataclass(frozen=True, eq=False)
class RegistryAccess:
    sources_path: str | None = None
    docker_config_json_path: str | None = None
    options: FetchOptions = field(default_factory=FetchOptions.defaults)
    _loaded: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    def _settings(self) -> tuple[Any, Any, Any]:
        with self._lock:
            if not self._loaded:
                from kwserver.sources.credentials import load_credentials
                from kwserver.sources.trust import load_sources

                self._loaded.update(sources=load_sources(self.sources_path),
                                    credentials=load_credentials(self.docker_config_json_path))
            return self._loaded["sources"], self._loaded["credentials"], self.options

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> RegistryAccess:
        return cls(settings.sources_path, settings.docker_config_json_path, FetchOptions.from_settings(settings))

    def client(self, reference: ImageReference, deadline: float | None) -> OciClient:
        """A client whose every request gives up when the evaluation's deadline passes."""
        from kwserver.sources.oci import OciClient

        sources, credentials, options = self._settings()
        options = replace(options, timeout_seconds=time_left(deadline, options.timeout_seconds))
        return OciClient(reference.registry, sources, credentials, options)
