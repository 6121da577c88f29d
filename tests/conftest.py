"""Shared fixtures: a wasmtime engine, one compile cache per run, and real kwservers on loopback ports.

The helpers behind them, shared with the bench, are in tests/support/.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.server import Server, start_server, stop_server


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    """A wasmtime engine with epoch interruption and its ticker running, for in-process runtime tests."""
    from kwserver.runtime.engine import EngineOptions, EpochTicker, make_engine

    engine = make_engine(EngineOptions(epoch_interruption=True))
    ticker = EpochTicker(engine)
    ticker.start()
    yield engine
    ticker.stop()


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One compile cache for the whole run: servers after the first start warm."""
    path = tmp_path_factory.mktemp("compile-cache")
    path.chmod(0o700)
    return path


@pytest.fixture
def run_server(tmp_path: Path, compile_cache: Path) -> Iterator[Any]:
    """Start kwservers for one test; all are stopped at its end."""
    servers: list[Server] = []

    def run(policies: dict[str, Any], **kwargs: Any) -> Server:
        index = len(servers)
        directory = tmp_path / f"server{index}"
        directory.mkdir()
        server = start_server(directory, policies, compile_cache, **kwargs)
        servers.append(server)
        return server

    yield run
    for server in servers:
        stop_server(server)


@pytest.fixture
def kube_api(tmp_path: Path) -> Iterator[Any]:
    """A local Kubernetes API server with two namespaces and a service in each."""
    from tests.support.kube_api import KubeApi

    api = KubeApi(tmp_path).start()
    api.put("v1", "Namespace", "default")
    api.put("v1", "Namespace", "team-a", metadata={"labels": {"team": "a"}, "annotations": {
        "kubectl.kubernetes.io/last-applied-configuration": "{...}", "owner": "alice"}})
    api.put("v1", "Service", "web", "team-a", spec={"ports": [{"port": 80}]})
    api.put("v1", "Service", "db", "default", spec={"ports": [{"port": 5432}]})
    yield api
    api.stop()
