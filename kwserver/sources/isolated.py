"""Fetching modules in a short-lived child process.

Downloads and signature checks need an HTTP client, a TLS client stack and signature libraries (requests,
urllib3, cryptography: about 13 MiB of code and heap). The master keeps everything it imported for as long as
it serves and every worker maps it, so the master fetches remote modules in a child that exits when they are
on disk and hands back only the results. Local files are read in the master: they need none of it.
"""

from __future__ import annotations

import logging
import pickle
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from kwserver.config import ConfigError, ServerSettings
from kwserver.sources.errors import SourceError
from kwserver.sources.file import FetchedModule, read_module
from kwserver.sources.references import LocalReference, parse_reference

log = logging.getLogger(__name__)


@dataclass
class FetchOutcome:
    modules: dict[str, FetchedModule | SourceError]  # per reference, in the order asked
    downloaded: int  # modules that came over the network (not from the download directory)


def needs_child(settings: ServerSettings, base_dir: Path, references: Iterable[str]) -> bool:
    """Whether fetching these references needs the network libraries (or their configuration files)."""
    if (settings.verification_path or settings.sources_path or settings.docker_config_json_path
            or settings.sigstore_trust_config):
        return True
    for reference in references:
        try:
            if not isinstance(parse_reference(reference, base_dir), LocalReference):
                return True
        except SourceError:
            continue
    return False


def fetch_modules(settings: ServerSettings, base_dir: Path, references: Iterable[str]) -> FetchOutcome:
    """Every reference fetched once; failures are returned per reference. A bad sources.yml, docker config
    or verification.yml raises ConfigError."""
    unique = list(dict.fromkeys(references))
    if not needs_child(settings, base_dir, unique):
        return FetchOutcome({reference: _read_local(reference, base_dir) for reference in unique}, 0)
    request = pickle.dumps((settings, base_dir, unique))
    done = subprocess.run([sys.executable, "-m", __name__], input=request, stdout=subprocess.PIPE, check=False)
    if done.returncode != 0 or not done.stdout:
        raise ConfigError(f"fetching the policy modules failed (the fetch process exited with {done.returncode})")
    kind, payload = pickle.loads(done.stdout)
    if kind == "config-error":
        raise ConfigError(payload)
    return payload


def _read_local(reference: str, base_dir: Path) -> FetchedModule | SourceError:
    try:
        parsed = parse_reference(reference, base_dir)
        assert isinstance(parsed, LocalReference)
        return read_module(reference, parsed.path)
    except SourceError as exc:
        return exc


def _fetch_here(settings: ServerSettings, base_dir: Path, references: list[str]) -> FetchOutcome:
    from kwserver.sources.fetcher import ModuleFetcher

    fetcher = ModuleFetcher.from_settings(settings, base_dir)
    if settings.sigstore_trust_config:  # read at start, as the reference reads it, so that a bad one is seen
        from kwserver.sources.sigstore_trust import TrustRootError

        try:
            fetcher.trust_root()
        except TrustRootError as exc:
            log.warning("%s: keyless signatures cannot be verified", exc)
    return FetchOutcome(fetcher.fetch_all(references), fetcher.downloaded)


def main() -> None:
    settings, base_dir, references = pickle.loads(sys.stdin.buffer.read())
    from kwserver.logs import configure_logging

    configure_logging(settings.log_level, settings.log_fmt)
    try:
        answer: tuple[str, object] = ("ok", _fetch_here(settings, base_dir, references))
    except ConfigError as exc:
        answer = ("config-error", str(exc))
    sys.stdout.buffer.write(pickle.dumps(answer))


if __name__ == "__main__":
    # Run as the importable module, so that what it pickles names `kwserver.sources.isolated`, not `__main__`.
    from kwserver.sources import isolated

    isolated.main()
