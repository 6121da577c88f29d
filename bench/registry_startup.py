"""Startup points with modules pulled from an OCI registry (the `startup` scenario calls in here).

A local docker-registry (plain HTTP, an insecure source) on a free loopback port holds the
configs' modules, pushed in Kubewarden's artifact format. Each config is rewritten with registry://
references; `cold` starts with an empty download directory and an empty compile cache (every module
pulled and compiled), `warm` with both left by the cold start (nothing pulled, nothing compiled).
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from bench.harness import ScenarioRun
from bench.stats import fmt_ratio, spread
from kwserver.sources.credentials import Credentials
from kwserver.sources.oci import OciClient
from kwserver.sources.options import FetchOptions
from kwserver.sources.references import parse_image_reference, parse_reference
from kwserver.sources.trust import Sources
from tests.support.server import free_port

DOCKER_REGISTRY = "docker-registry"
Start = Callable[..., None]


class LocalRegistry:
    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.host = f"127.0.0.1:{free_port()}"
        config = {"version": 0.1, "log": {"level": "error", "accesslog": {"disabled": True}},
                  "storage": {"filesystem": {"rootdirectory": str(directory / "data")}},
                  "http": {"addr": self.host, "secret": uuid.uuid4().hex}}
        (directory / "config.yml").write_text(yaml.safe_dump(config))
        self.log = open(directory / "registry.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen([DOCKER_REGISTRY, "serve", str(directory / "config.yml")],
                                        stdout=self.log, stderr=subprocess.STDOUT)
        self.client = OciClient(self.host, Sources(frozenset([self.host])), Credentials(), FetchOptions.defaults())
        deadline = time.monotonic() + 20
        while True:
            try:
                self.client.manifest_or_none(parse_image_reference(f"{self.host}/probe/probe:v0"))
                return
            except Exception as exc:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    log = (directory / "registry.log").read_text()
                    raise RuntimeError(f"docker-registry did not start: {log}") from exc
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.log.close()


def registry_config(registry: LocalRegistry, config: Path, out: Path) -> Path:
    """`config` with each module pushed to `registry` and referred to by registry:// reference."""
    entries = yaml.safe_load(config.read_text())
    pushed: dict[Path, str] = {}

    def reference_for(module: str) -> str:
        path = parse_reference(module, config.parent).path  # type: ignore[union-attr]
        if path not in pushed:
            ref = parse_image_reference(f"{registry.host}/bench/{path.stem}:v1")
            registry.client.push(path.read_bytes(), ref)
            pushed[path] = f"registry://{ref}"
        return pushed[path]

    for entry in entries.values():
        members = entry["policies"].values() if "policies" in entry else [entry]
        for member in members:
            member["module"] = reference_for(member["module"])
    out.write_text(yaml.safe_dump(entries, sort_keys=False))
    return out


class RegistryPoints:
    """Set up once per scenario, then `measure` once per repeat (interleaved with the file points)."""

    def __init__(self, run: ScenarioRun, choices: list[Any]):
        self.run = run
        self.registry: LocalRegistry | None = None
        self.configs: dict[int, Path] = {}
        if shutil.which(DOCKER_REGISTRY) is None:
            run.notes.append("registry startup points skipped: docker-registry is not installed")
            return
        self.registry = LocalRegistry(run.work / "registry")
        self.sources = run.work / "registry-sources.yml"
        self.sources.write_text(yaml.safe_dump({"insecure_sources": [self.registry.host]}))
        for choice in choices:
            self.configs[choice.policies] = registry_config(
                self.registry, choice.path, run.work / f"policies-{choice.policies}-registry.yml")

    def measure(self, start: Start, repeat: int) -> None:
        for policies, config in self.configs.items():
            downloads = self.run.work / f"downloads-{policies}-{repeat}"
            cache = self.run.work / f"cache-{policies}-registry-{repeat}"
            env = {"KUBEWARDEN_SOURCES_PATH": str(self.sources), "KUBEWARDEN_POLICIES_DOWNLOAD_DIR": str(downloads)}
            start(f"{policies} policies, registry", config, cache, "cold", extra_env=env)
            start(f"{policies} policies, registry", config, cache, "warm", extra_env=env)

    def finish(self, measurements: dict[str, dict[str, list[dict[str, float]]]]) -> None:
        if self.registry is not None:
            self.registry.stop()
        for policies in self.configs:
            files, registry = measurements[f"{policies} policies"], measurements[f"{policies} policies, registry"]
            pairs = {kind: spread([r["ready_s"] / f["ready_s"] for r, f in zip(registry[kind], files[kind],
                                                                                strict=True)])
                     for kind in ("cold", "warm")}
            warm_gain = spread([c["ready_s"] / w["ready_s"] for c, w in zip(registry["cold"], registry["warm"],
                                                                             strict=True)])
            self.run.headline(
                f"startup, {policies} policies from a registry vs from files (time ratio)",
                f"cold {fmt_ratio(pairs['cold'])}, warm {fmt_ratio(pairs['warm'])}",
                f"registry cold (empty download dir and compile cache) is {fmt_ratio(warm_gain)} the registry warm "
                "start (download dir and compile cache hit: nothing pulled, nothing compiled)",
                cold_ratio=pairs["cold"].median, warm_ratio=pairs["warm"].median,
                registry_cold_over_warm=warm_gain.median, policies=policies)
