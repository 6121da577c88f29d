"""From module references to module bytes: local files, downloads, the download directory.

Runs in the master before the fork. Remote modules are fetched concurrently (a thread each, up to
`MAX_PARALLEL_DOWNLOADS`): 61 policies cost about one round trip, not 61. Every thread has ended
when `fetch_all` returns, so nothing is left running when the master forks.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from kwserver.config import ServerSettings
from kwserver.sources import https, oci, verification
from kwserver.sources.credentials import Credentials, load_credentials
from kwserver.sources.errors import SourceError
from kwserver.sources.file import FetchedModule, check_wasm, read_module
from kwserver.sources.options import FetchOptions
from kwserver.sources.references import ImageReference, LocalReference, UrlReference, parse_reference
from kwserver.sources.sigstore_trust import LazyTrustRoot
from kwserver.sources.store import DownloadStore
from kwserver.sources.trust import Sources, load_sources

log = logging.getLogger(__name__)
MAX_PARALLEL_DOWNLOADS = 16


@dataclass
class ModuleFetcher:
    base_dir: Path  # relative paths in policies.yml are relative to this
    download_dir: Path
    sources: Sources = field(default_factory=Sources)
    credentials: Credentials = field(default_factory=Credentials)
    options: FetchOptions = field(default_factory=FetchOptions.defaults)
    verification: verification.VerificationConfig | None = None  # verify registry modules before use
    sigstore_trust_config: str | None = None  # keyless entries: this trust root, else the shipped one
    trust_root: LazyTrustRoot = field(init=False, repr=False)
    downloaded: int = 0  # modules that came over the network (not from the download directory)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.trust_root = LazyTrustRoot(self.sigstore_trust_config)

    @classmethod
    def from_settings(cls, settings: ServerSettings, base_dir: Path) -> ModuleFetcher:
        """The fetcher `settings` describe; raises ConfigError for a bad sources.yml, docker config or
        verification.yml."""
        return cls(base_dir=base_dir, download_dir=Path(settings.policies_download_dir),
                   sources=load_sources(settings.sources_path),
                   credentials=load_credentials(settings.docker_config_json_path),
                   options=FetchOptions.from_settings(settings),
                   verification=verification.load_verification(settings.verification_path),
                   sigstore_trust_config=settings.sigstore_trust_config)

    @property
    def store(self) -> DownloadStore:
        return DownloadStore(self.download_dir)

    def fetch(self, reference: str) -> FetchedModule:
        parsed = parse_reference(reference, self.base_dir)
        signed = self.verify(parsed) if self.verification is not None else None
        if isinstance(parsed, LocalReference):
            return read_module(reference, parsed.path)
        store = self.store
        wasm = store.cached(parsed)
        path = store.path_for(parsed)
        if wasm is None:
            wasm = self.download(parsed)
            path = store.save(parsed, wasm)
            with self._lock:
                self.downloaded += 1
        if signed is not None:
            verification.check_checksum(self.client(parsed), parsed, signed, wasm)
        return FetchedModule(reference, path, wasm, hashlib.sha256(wasm).hexdigest())

    def client(self, reference: ImageReference) -> oci.OciClient:
        return oci.OciClient(reference.registry, self.sources, self.credentials, self.options)

    def verify(self, reference: LocalReference | ImageReference | UrlReference) -> str:
        """The verified manifest digest of a registry module; anything else cannot be verified."""
        if not isinstance(reference, ImageReference):
            where = reference.path if isinstance(reference, LocalReference) else reference.url
            raise verification.VerificationError(
                f"Verification only works with OCI images: Not a valid oci image: {where}")
        assert self.verification is not None
        return verification.verify(self.client(reference), reference, self.verification, self.trust_root)

    def download(self, reference: ImageReference | UrlReference) -> bytes:
        if isinstance(reference, UrlReference):
            wasm = https.download(reference, self.sources, self.options)
        else:
            wasm = self.client(reference).pull(reference)
        check_wasm(wasm, "the downloaded file")
        return wasm

    def fetch_all(self, references: Iterable[str]) -> dict[str, FetchedModule | SourceError]:
        """Every reference fetched once; failures are returned, never raised."""
        unique = list(dict.fromkeys(references))
        results: dict[str, FetchedModule | SourceError] = {}

        def one(reference: str) -> None:
            try:
                results[reference] = self.fetch(reference)
            except SourceError as exc:
                results[reference] = exc
            except Exception as exc:  # a bug, or a library's surprise: that policy's error, never a crash
                log.exception("fetching %s failed unexpectedly", reference)
                results[reference] = SourceError(f"unexpected error: {exc!r}")

        remote = [r for r in unique if not isinstance(self._parsed_or_none(r), LocalReference)]
        for reference in unique:
            if reference not in remote:
                one(reference)
        if remote:
            with ThreadPoolExecutor(min(MAX_PARALLEL_DOWNLOADS, len(remote)), "kwserver-fetch") as pool:
                list(pool.map(one, remote))
        return {reference: results[reference] for reference in unique}

    def _parsed_or_none(self, reference: str) -> object:
        try:
            return parse_reference(reference, self.base_dir)
        except SourceError:
            return None
