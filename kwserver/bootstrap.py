"""Boot: from policies.yml to a PolicyRegistry, in the master, before any worker exists.

For every unique module reference: fetch it, read and check its metadata, compile it (or load it
from the compile cache), deduplicated by the digest of its bytes. Then bind each policy and group
member to its module and validate its settings. Failures are collected into one report: fatal by
default, stored per policy with `--continue-on-errors`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
import wasmtime

from kwserver.capabilities import Capabilities, RegistryAccess
from kwserver.config import PolicyGroupSpec, PolicySpec, ServerSettings, load_policies
from kwserver.evaluation import GROUP_EXPRESSION_ERROR, InstancePool, LoadedPolicy, PolicyRegistry
from kwserver.metadata import (
    MetadataError,
    check_metadata,
    infer_metadata,
    is_rego_module,
    metadata_for_mode,
    parse_metadata,
)
from kwserver.runtime import InstanceLimits, RuntimeFailure, preinit
from kwserver.runtime.engine import (
    CompileCache,
    CompiledModule,
    EngineOptions,
    EpochTicker,
    make_engine,
    malloc_trim,
)
from kwserver.runtime.pooling import PoolSize
from kwserver.sources.errors import ChecksumError, SourceError, TransportError, VerificationError
from kwserver.sources.isolated import fetch_modules
from kwserver.truncation import bounded

if TYPE_CHECKING:
    from kwserver.sources.fetcher import ModuleFetcher

log = logging.getLogger(__name__)


class BootError(Exception):
    """Some policies could not be loaded and `--continue-on-errors` is off."""

    def __init__(self, errors: dict[str, str], report: BootReport | None = None):
        self.errors = errors
        self.report = report or BootReport()
        lines = "\n".join(f"  - {name}: {error}" for name, error in errors.items())
        super().__init__(f"{len(errors)} policy initialization error(s):\n{lines}")


@dataclass
class BootReport:
    seconds: float = 0.0
    unique_modules: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    reused_modules: int = 0  # on a reload: unchanged modules kept from the running configuration
    downloaded_modules: int = 0  # fetched over the network (not from the download directory)
    warnings: list[str] = field(default_factory=list)
    invalid_settings: dict[str, str] = field(default_factory=dict)  # policy -> what its validation said


def engine_options_for(settings: ServerSettings, specs: list[PolicySpec]) -> EngineOptions:
    """Epoch interruption costs a little on every call, so it is on only when some timeout exists.
    When every evaluation of every module gets a new instance, instances come from a pool of slots sized
    for the policies (kwserver/runtime/pooling.py): it makes them ~20 µs faster, for ~1 MiB more per
    process, which is not worth it where instances are made rarely (docs/operations.md, "Instances")."""
    any_timeout = settings.global_timeout is not None or any(s.timeout_eval_seconds for s in specs)
    pool = None
    if settings.fresh_instance_per_request:
        pool = PoolSize.for_policies(len(specs), settings.policy_memory_limit_mib * 1024 * 1024)
    return EngineOptions(epoch_interruption=any_timeout, pool=pool)


def _all_specs(entries: dict[str, PolicySpec | PolicyGroupSpec]) -> list[PolicySpec]:
    specs: list[PolicySpec] = []
    for entry in entries.values():
        specs.extend(entry.members.values() if isinstance(entry, PolicyGroupSpec) else [entry])
    return specs


def _download_name(spec: PolicySpec) -> str:
    # The reference names group members `<group>/#<member>` in download errors.
    group, sep, member = spec.name.partition("/")
    return f"{group}/#{member}" if sep else spec.name


def compile_module(engine: wasmtime.Engine, cache: CompileCache, wasm: bytes, digest: str,
                   source: str, report: BootReport, execution_mode: str | None = None,
                   preinitialise_bytes: int | None = None, scratch: wasmtime.Engine | None = None) -> CompiledModule:
    """`execution_mode`: the mode the caller requires (kwctl's `--execution-mode`); None: the metadata's.
    `preinitialise_bytes`: run the module's start-up once here, under that memory limit, and serve the
    pre-initialised module (kwserver/runtime/preinit.py), running it on `scratch` (default: `engine`);
    None: serve the module as it is."""
    metadata = parse_metadata(wasm)
    module, compiled_size = cache.load(engine, wasm, digest)
    if execution_mode is not None:
        metadata = metadata_for_mode(metadata, execution_mode, is_rego_module({e.name for e in module.exports}))
    elif metadata is None:
        metadata = infer_metadata({e.name for e in module.exports}, {i.module for i in module.imports})
        warning = (f"module {source} has no io.kubewarden.metadata section; assuming execution mode "
                   f"`{metadata.execution_mode}` (embed metadata with `kwserver annotate`)")
        log.warning("%s", warning)
        report.warnings.append(warning)
    check_metadata(metadata)
    if preinitialise_bytes is not None:
        module, compiled_size = preinit.load(engine, cache, wasm, digest, metadata.execution_mode,
                                             preinitialise_bytes, scratch or engine) or (module, compiled_size)
    return CompiledModule(digest=digest, module=module, metadata=metadata, size=len(wasm),
                          compiled_size=compiled_size, source=source)


def make_fetcher(settings: ServerSettings, base_dir: Path) -> ModuleFetcher:
    """The module fetcher `settings` describe; raises ConfigError for a bad sources.yml or docker config."""
    from kwserver.sources.credentials import load_credentials
    from kwserver.sources.fetcher import ModuleFetcher
    from kwserver.sources.transport import FetchOptions
    from kwserver.sources.trust import load_sources
    from kwserver.sources.verification import load_verification

    options = FetchOptions(timeout_seconds=settings.download_timeout_seconds, retries=settings.download_retries,
                           max_bytes=settings.max_module_size_mib * 1024 * 1024)
    return ModuleFetcher(base_dir=base_dir, download_dir=Path(settings.policies_download_dir),
                         sources=load_sources(settings.sources_path),
                         credentials=load_credentials(settings.docker_config_json_path), options=options,
                         verification=load_verification(settings.verification_path))


def _previous_modules(previous: PolicyRegistry | None) -> dict[str, CompiledModule]:
    if previous is None:
        return {}
    return {policy.spec.module: policy.module for policy in previous.policies.values()}


def build_registry(settings: ServerSettings,
                   previous: PolicyRegistry | None = None) -> tuple[PolicyRegistry, BootReport]:
    """Load everything `settings` names. On a reload, modules of `previous` are reused when unchanged."""
    entries = load_policies(settings.policies, tolerate_invalid_expressions=settings.continue_on_errors)
    return assemble_registry(entries, Path(settings.policies).resolve().parent, settings, previous)


def assemble_registry(entries: dict[str, PolicySpec | PolicyGroupSpec], base_dir: Path, settings: ServerSettings,
                      previous: PolicyRegistry | None = None, *,
                      execution_mode: str | None = None) -> tuple[PolicyRegistry, BootReport]:
    """Load `entries` (relative module paths are resolved against `base_dir`); see `build_registry`."""
    started = time.monotonic()
    specs = _all_specs(entries)
    options = engine_options_for(settings, specs)
    reuse = previous is not None and previous.engine_options == options
    engine = previous.engine if reuse else make_engine(options)
    # The master runs guests at boot (start-ups to snapshot, settings checks) on an engine of its own, so
    # the instance pool of the serving engine is still cold when the workers inherit it: a slot used here
    # would stay resident in the master and be copied into every worker that reuses it.
    scratch = engine if options.pool is None else make_engine(replace(options, pool=None))
    known_modules = previous.modules if reuse else {}
    cache = CompileCache(settings.cache_dirs, options)
    memory_limit = settings.policy_memory_limit_mib * 1024 * 1024
    preinitialise_bytes = None if settings.disable_preinitialisation else memory_limit
    registry = PolicyRegistry(engine=engine, engine_options=options)
    report = BootReport()
    registry.groups = {n: e for n, e in entries.items() if isinstance(e, PolicyGroupSpec)}
    registry.specs = {n: e for n, e in entries.items() if isinstance(e, PolicySpec)}

    # One fetch per module string (remote ones concurrently), one compile per unique digest.
    fetched_modules = fetch_modules(settings, base_dir, (spec.module for spec in specs))
    running = _previous_modules(previous) if reuse else {}
    by_reference: dict[str, CompiledModule | Exception] = {}
    for reference, fetched in fetched_modules.modules.items():
        if isinstance(fetched, TransportError) and reference in running:
            # A registry that is down during a reload does not take running policies with it.
            log.warning("cannot download %s (%s); keeping the module in service", reference, fetched)
            report.warnings.append(f"{reference}: download failed, the running module is kept: {fetched}")
            registry.modules[running[reference].digest] = by_reference[reference] = running[reference]
            report.reused_modules += 1
            continue
        if isinstance(fetched, SourceError):
            by_reference[reference] = fetched
            continue
        compiled = registry.modules.get(fetched.digest)
        if compiled is None and fetched.digest in known_modules:
            compiled = known_modules[fetched.digest]
            report.reused_modules += 1
        if compiled is None:
            try:
                compiled = compile_module(engine, cache, fetched.wasm, fetched.digest, str(fetched.path), report,
                                          execution_mode, preinitialise_bytes, scratch)
            except (MetadataError, wasmtime.WasmtimeError) as exc:
                by_reference[reference] = exc
                continue
        registry.modules[fetched.digest] = compiled
        by_reference[reference] = compiled
    report.unique_modules = len(registry.modules)
    if any(m.metadata.execution_mode in ("opa", "gatekeeper") for m in registry.modules.values()):
        from kwserver.runtime.opa_builtins import text

        text.preload()
    report.downloaded_modules = fetched_modules.downloaded
    report.cache_hits, report.cache_misses = cache.hits, cache.misses
    malloc_trim()

    registries = RegistryAccess(  # for the OCI callbacks
        sources_path=settings.sources_path, docker_config_json_path=settings.docker_config_json_path,
        timeout_seconds=settings.download_timeout_seconds, retries=settings.download_retries,
        max_bytes=settings.max_module_size_mib * 1024 * 1024)
    for spec in specs:
        loaded = by_reference[spec.module]
        if isinstance(loaded, Exception):
            message = str(loaded)
            if isinstance(loaded, VerificationError):
                message = f"Policy '{spec.name}' cannot be verified: {message}"
            elif isinstance(loaded, ChecksumError):
                message = f"Verification of policy {spec.name} failed: {message}"
            elif isinstance(loaded, SourceError):
                message = f"Error while downloading policy '{_download_name(spec)}' from {spec.module}: {message}"
            registry.init_errors[spec.name] = f"bootstrap failure: {spec.name}: {message}"
            continue
        timeout = spec.timeout_eval_seconds if spec.timeout_eval_seconds is not None else settings.global_timeout
        registry.policies[spec.name] = LoadedPolicy(
            spec=spec, module=loaded, settings_json=orjson.dumps(spec.settings),
            limits=InstanceLimits(memory_bytes=memory_limit, timeout_seconds=timeout),
            capabilities=Capabilities(spec.name, spec.context_aware_resources, registries=registries),
        )

    _check_all_policies(registry, options, report, scratch)
    del scratch
    malloc_trim()  # what the boot-time guests and their engine used, before the workers inherit it
    for name, group in registry.groups.items():
        if group.expression_error is not None:
            registry.init_errors[name] = f"{GROUP_EXPRESSION_ERROR}: {group.expression_error}"
    report.seconds = time.monotonic() - started
    # Stored, answered, logged and used as a metric label: what a guest said there must stay small.
    registry.init_errors = {name: bounded(error) for name, error in registry.init_errors.items()}
    if registry.init_errors and not settings.continue_on_errors:
        raise BootError(registry.init_errors, report)
    for name, error in registry.init_errors.items():
        log.error("policy %s failed to initialise and will reject every request: %s", name, error)
    return registry, report


def _on_engine(registry: PolicyRegistry, engine: wasmtime.Engine) -> PolicyRegistry:
    """The policies of `registry` with their modules loaded into `engine` (same code, another engine)."""
    if engine is registry.engine:
        return registry
    modules = {digest: replace(m, module=wasmtime.Module.deserialize(engine, m.module.serialize()))
               for digest, m in registry.modules.items()}
    moved = PolicyRegistry(engine=engine, engine_options=registry.engine_options, modules=modules)
    moved.policies = {name: replace(p, module=modules[p.module.digest]) for name, p in registry.policies.items()}
    return moved


def _check_all_policies(registry: PolicyRegistry, options: EngineOptions, report: BootReport,
                        engine: wasmtime.Engine) -> None:
    """Check every policy once, here, so no request ever pays for it: its mode's boot checks, then
    its settings, on an instance made for the purpose (on `engine`). A policy that fails is an init error."""
    checked = _on_engine(registry, engine)
    pool = InstancePool(checked, reuse=False, keep_bytes=0, budget_bytes=0)
    ticker = EpochTicker(engine)
    if options.epoch_interruption:
        ticker.start()
    try:
        for name in list(registry.policies):
            policy = checked.policies[name]
            try:
                warning = policy.mode.boot_warning(pool.linked(policy.module), policy)
                with pool.instance(policy) as instance:
                    error = policy.mode.settings_error(instance, policy.settings_json)
            except RuntimeFailure as exc:
                registry.init_errors[name] = f"bootstrap failure: {name}: {exc}"
                del registry.policies[name]
                continue
            if warning:
                log.warning("policy %s: %s", name, warning)
                report.warnings.append(f"policy {name}: {warning}")
            if error is not None:
                report.invalid_settings[name] = error
                registry.init_errors[name] = f"Policy settings are invalid: {error}"
                del registry.policies[name]
    finally:
        ticker.stop()  # no thread may outlive the boot: the master forks next
        pool.clear()
