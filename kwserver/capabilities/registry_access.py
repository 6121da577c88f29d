"""How host callbacks reach registries: the settings of policy downloads (sources.yml, docker config,
fetch options), the files read on first use, and the answers of this process, kept 60 s as the
reference keeps them (successes only; bounded, kwserver/bounded_cache.py).

It is built in the master for every policy, but the registry client and its libraries (requests,
cryptography) are only imported when a policy first calls a registry: a server whose policies never do
keeps them out of its processes (about 13 MiB, see docs/operations.md "Memory").
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from kwserver.bounded_cache import BoundedCache
from kwserver.capabilities.waiting import time_left
from kwserver.config import MIB, ServerSettings
from kwserver.sources.options import FetchOptions

ANSWER_TTL_SECONDS = 60.0
DEFAULT_ANSWER_ENTRIES = 1_000
DEFAULT_ANSWER_BYTES = 16 * 1024 * 1024


def answer_cache(max_entries: int = DEFAULT_ANSWER_ENTRIES, max_bytes: int = DEFAULT_ANSWER_BYTES) -> BoundedCache:
    return BoundedCache("registry_answers", max_entries=max_entries, max_bytes=max_bytes, ttl=ANSWER_TTL_SECONDS)


if TYPE_CHECKING:
    from kwserver.sources.oci import OciClient
    from kwserver.sources.references import ImageReference


@dataclass(frozen=True, eq=False)
class RegistryAccess:
    sources_path: str | None = None
    docker_config_json_path: str | None = None
    options: FetchOptions = field(default_factory=FetchOptions.defaults)
    sigstore_trust_config: str | None = None  # keyless checks: this trust root, else the shipped one
    # Manifests, configs and verification results, by operation and parameters.
    answers: BoundedCache = field(default_factory=answer_cache, compare=False, repr=False)
    _loaded: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    def _settings(self) -> tuple[Any, Any, Any]:
        with self._lock:
            if "sources" not in self._loaded:
                from kwserver.sources.credentials import load_credentials
                from kwserver.sources.trust import load_sources

                self._loaded.update(sources=load_sources(self.sources_path),
                                    credentials=load_credentials(self.docker_config_json_path))
            return self._loaded["sources"], self._loaded["credentials"], self.options

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> RegistryAccess:
        return cls(settings.sources_path, settings.docker_config_json_path, FetchOptions.from_settings(settings),
                   settings.sigstore_trust_config,
                   answer_cache(settings.registry_answer_cache_entries, settings.registry_answer_cache_mib * MIB))

    def trust_root(self) -> Any:
        """The Sigstore trust root (`kwserver.sources.sigstore_trust.TrustRoot`), read on first use; a bad
        one is every keyless request's error."""
        from kwserver.sources.sigstore_trust import LazyTrustRoot

        with self._lock:
            lazy = self._loaded.setdefault("trust_root", LazyTrustRoot(self.sigstore_trust_config))
        return lazy()

    def client(self, reference: ImageReference, deadline: float | None) -> OciClient:
        """A client whose every request gives up when the evaluation's deadline passes."""
        from kwserver.sources.oci import OciClient

        sources, credentials, options = self._settings()
        options = replace(options, timeout_seconds=time_left(deadline, options.timeout_seconds))
        return OciClient(reference.registry, sources, credentials, options)
