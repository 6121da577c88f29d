"""Where the cluster is, and the client the callbacks of this process use.

The configuration is found as kubectl finds it: `KUBECONFIG`, then the in-cluster service account, then
`~/.kube/config` (lightkube reads each). The master only checks at startup that the API server answers,
with a client it closes again, when (at start or on a reload) some policy starts reading the cluster.
Under `kwserver serve` the one client of the server lives in the cluster cache process and `use_cache`
points this process (and the workers forked from it) at its socket; without it (tools, tests) a process
builds its own client on its first Kubernetes callback.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Any, Protocol

from kwserver.cluster.cache_proxy import CacheProxy
from kwserver.cluster.limits import CacheLimits, ClusterError, describe

# lightkube and httpx are imported where a client is made: the master imports them only to check the
# cluster when some policy reads it, the workers never (they ask the cache process).
if TYPE_CHECKING:
    import httpx2 as httpx
    from lightkube.config.kubeconfig import SingleConfig

    from kwserver.cluster.client import ClusterClient

log = logging.getLogger(__name__)

CONNECT_FAILURE = "Cannot connect to Kubernetes, context aware policies would not work properly"
REQUEST_TIMEOUT_SECONDS = 10.0
STARTUP_TIMEOUT_SECONDS = 5.0


class ConnectionFailure(Exception):
    pass


def load_config() -> SingleConfig:
    """The cluster and credentials to use; ConnectionFailure when there is no configuration."""
    from lightkube.config.kubeconfig import KubeConfig
    from lightkube.core.exceptions import ConfigError

    try:
        if os.environ.get("KUBECONFIG"):
            config = KubeConfig.from_file(os.environ["KUBECONFIG"].split(os.pathsep)[0])
        else:
            config = KubeConfig.from_env()
        single = config.get()
    except (ConfigError, OSError, KeyError, ValueError) as exc:
        raise ConnectionFailure(f"no Kubernetes configuration: {describe(exc)}") from exc
    if single is None:
        raise ConnectionFailure("no Kubernetes configuration: the kubeconfig has no current context")
    return single


def open_http(config: SingleConfig, timeout: float = REQUEST_TIMEOUT_SECONDS) -> httpx.Client:
    import httpx2 as httpx
    from lightkube.config.client_adapter import Client as http_client
    from lightkube.config.client_adapter import ConnectionParams

    return http_client(config, ConnectionParams(timeout=httpx.Timeout(timeout), trust_env=True))


def check_connection(timeout: float = STARTUP_TIMEOUT_SECONDS) -> str:
    """The API server's version (`v1.31.0`); ConnectionFailure when it cannot be reached."""
    import httpx2 as httpx

    from kwserver.cluster.client import request_json

    config = load_config()
    try:
        with open_http(config, timeout) as http:
            version = request_json(http, "GET", "/version")
    except (ClusterError, httpx.HTTPError, ValueError, OSError) as exc:
        raise ConnectionFailure(f"{config.cluster.server}: {describe(exc)}") from exc
    return f"{config.cluster.server} ({version.get('gitVersion', 'unknown version')})"


class Cluster(Protocol):
    def list(self, api_version: str, kind: str, namespace: str | None, label_selector: str | None,
             field_selector: str | None, timeout: float, masks: list[str] | None = None) -> bytes: ...

    def get(self, api_version: str, kind: str, name: str, namespace: str | None, disable_cache: bool,
            timeout: float, masks: list[str] | None = None) -> bytes: ...

    def can_i(self, review: dict[str, Any], disable_cache: bool, timeout: float) -> bytes: ...

    def plural(self, api_version: str, kind: str, timeout: float) -> bytes: ...


class _ProcessClient:
    """The client of the current process, built on first use; None when there is no connection."""

    def __init__(self) -> None:
        self.enabled = True
        self.pid: int | None = None
        self.client: ClusterClient | None = None
        self.lock = threading.Lock()
        self.cache: CacheProxy | None = None

    def get(self) -> Cluster | None:
        if not self.enabled:
            return None
        if self.cache is not None:
            return self.cache
        with self.lock:
            if self.pid != os.getpid():
                self.pid, self.client = os.getpid(), None
                from kwserver.cluster.client import ClusterClient

                try:
                    self.client = ClusterClient(open_http(load_config()))
                except (ConnectionFailure, OSError, ValueError) as exc:
                    log.error("no Kubernetes client in this process: %s", exc)
            return self.client


_process = _ProcessClient()


def cluster() -> Cluster | None:
    return _process.get()


def use_cache(path: str, limits: CacheLimits) -> None:
    """Ask the cluster cache process listening on `path` instead of a client of this process."""
    _process.enabled = True
    _process.cache = CacheProxy(path, limits)


def disable() -> None:
    """Serve without a cluster: every Kubernetes callback fails as the reference's do without a client."""
    _process.enabled = False
    _process.cache = None


def connect(*, ignore_failure: bool) -> bool:
    """Check that the cluster answers, before serving policies that read it. A failure is fatal
    (ConnectionFailure) unless told to ignore it: then it is logged and False is returned."""
    try:
        log.info("connected to Kubernetes at %s", check_connection())
        return True
    except ConnectionFailure as exc:
        if not ignore_failure:
            raise ConnectionFailure(f"{CONNECT_FAILURE}: {exc}") from exc
        log.warning("%s: %s; Kubernetes callbacks will fail", CONNECT_FAILURE, exc)
        return False
