"""Registry credentials from Docker's config.json, as `docker login` writes it.

Found as the reference finds it: `$DOCKER_CONFIG/config.json` (`--docker-config-json-path` sets
DOCKER_CONFIG; a path to the file itself is accepted too), else `~/.docker/config.json`. Entries:
`auths.<host>.auth` (base64 `user:password`) or `username`/`password`; `credHelpers.<host>` and
`credsStore` name a `docker-credential-<helper>` program, asked with `get`.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kwserver.config import ConfigError

log = logging.getLogger(__name__)
DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io")


@dataclass(frozen=True)
class Credential:
    username: str
    password: str


@dataclass(frozen=True)
class Credentials:
    config: dict[str, Any] = field(default_factory=dict)
    path: str | None = None  # where they were read from, for messages

    def _keys(self, registry: str) -> list[str]:
        if registry in ("docker.io", "registry-1.docker.io", "index.docker.io"):
            return list(DOCKER_HUB_KEYS)
        return [registry, f"https://{registry}", f"http://{registry}", f"https://{registry}/v1/",
                f"https://{registry}/v2/"]

    def for_registry(self, registry: str) -> Credential | None:
        auths = self.config.get("auths") or {}
        for key in self._keys(registry):
            entry = auths.get(key)
            if isinstance(entry, dict):
                credential = _from_entry(key, entry)
                if credential is not None:
                    return credential
        helper = (self.config.get("credHelpers") or {}).get(registry) or self.config.get("credsStore")
        return _from_helper(helper, registry) if helper else None


def _from_entry(key: str, entry: dict[str, Any]) -> Credential | None:
    if entry.get("auth"):
        try:
            user, sep, password = base64.b64decode(entry["auth"], validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            log.warning("docker config: the `auth` of %s is not base64 of user:password; ignored", key)
            return None
        if not sep:
            log.warning("docker config: the `auth` of %s has no `:` between user and password; ignored", key)
            return None
        return Credential(user, password)
    if entry.get("username") and entry.get("password"):
        return Credential(str(entry["username"]), str(entry["password"]))
    if entry.get("identitytoken"):
        log.warning("docker config: identity tokens (%s) are not supported; pulling anonymously", key)
    return None


def _from_helper(helper: str, registry: str) -> Credential | None:
    program = f"docker-credential-{helper}"
    try:
        result = subprocess.run([program, "get"], input=registry, capture_output=True, text=True, timeout=30,
                                check=True)
        answer = json.loads(result.stdout)
        return Credential(answer["Username"], answer["Secret"])
    except (OSError, subprocess.SubprocessError, ValueError, KeyError) as exc:
        log.warning("docker config: credential helper %s gave no credentials for %s: %s", program, registry, exc)
        return None


def config_path(docker_config: str | None = None) -> Path:
    location = docker_config or os.environ.get("DOCKER_CONFIG")
    if location:
        path = Path(location)
        return path if path.is_file() else path / "config.json"
    return Path.home() / ".docker" / "config.json"


def load_credentials(docker_config: str | None = None) -> Credentials:
    """Credentials from the config file; none when there is no file and none was asked for."""
    path = config_path(docker_config)
    try:
        text = path.read_text()
    except FileNotFoundError:
        if docker_config:
            raise ConfigError(f"docker config {path} does not exist") from None
        return Credentials()
    except OSError as exc:
        raise ConfigError(f"cannot read docker config {path}: {exc.strerror or exc}") from exc
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"docker config {path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"docker config {path} must hold a JSON object")
    return Credentials(config, str(path))
