"""Boot: from policies.yml to a PolicyRegistry, in the master, before any worker exists.

For every unique module reference: fetch it, read and check its metadata, compile it (or load it
from the compile cache), deduplicated by the digest of its bytes. Then bind each policy and group
member to its module and validate its settings. Failures are collected into one report: fatal by
default, stored per policy with `--continue-on-errors`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
import wasmtime

from kwserver.capabilities import AllowList, Capabilities, RegistryAccess
from kwserver.capabilities.allow_list import PatternError, parse
from kwserver.capabilities.registry_access import answer_cache
from kwserver.config import (
    MIB,
    PolicyGroupSpec,
    PolicySpec,
    ServerSettings,
    entry_warnings,
    load_policies,
    split_patterns,
)
from kwserver.evaluation import GROUP_EXPRESSION_ERROR, InstancePool, LoadedPolicy, PolicyRegistry
from kwserver.evaluation.settings_location import settings_path
from kwserver.metadata import (
    MetadataError,
    check_metadata,
    infer_metadata,
    is_rego_module,
    metadata_for_mode,
    parse_metadata,
)
from kwserver.runtime import InstanceLimits, RuntimeFailure
from kwserver.runtime.engine import (
    CompileCache,
    CompiledModule,
    EngineOptions,
    EpochTicker,
    make_engine,
    malloc_trim,
)
from kwserver.sources.errors import ChecksumError, LocalModuleError, SourceError, TransportError, VerificationError
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
        lines = "\n".join(f"  - {name}: {self.report.describe(name, error)}" for name, error in errors.items())
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
    # policy -> the setting its validation error points at (`settings.<path>`), when it names a place
    settings_locations: dict[str, str] = field(default_factory=dict)
    default_host_capabilities: int = 0  # policies without a `hostCapabilities` key (given the server's default)

    def describe(self, name: str, error: str) -> str:
        """An initialisation error as the operator reads it: with the policies.yml key it is about.
        (Answers and metrics keep the error as the reference words it.)"""
        location = self.settings_locations.get(name)
        if location is None:
            return error
        group, member_sep, member = name.partition("/")
        owner = f"policy group '{group}' member '{member}'" if member_sep else f"policy '{name}'"
        return f"{error} (in policies.yml: {owner}, {location})"


def engine_options_for(settings: ServerSettings) -> EngineOptions:
    """Epoch interruption costs a little on every call, so it is on only when timeouts are: never with
    `--disable-timeout-protection`, which turns off the per-policy ones too (as the reference does
    since its PR #1982)."""
    return EngineOptions(epoch_interruption=settings.global_timeout is not None)


def policy_timeout(settings: ServerSettings, spec: PolicySpec) -> int | None:
    """A policy's `timeoutEvalSeconds` overrides the global limit; without timeout protection, neither applies."""
    if settings.global_timeout is None:
        return None
    return spec.timeout_eval_seconds if spec.timeout_eval_seconds is not None else settings.global_timeout


def _ignored_timeouts(settings: ServerSettings, specs: list[PolicySpec], report: BootReport) -> None:
    ignored = [spec.name for spec in specs if spec.timeout_eval_seconds is not None]
    if settings.global_timeout is None and ignored:
        warning = (f"timeout protection is disabled (--disable-timeout-protection): the timeoutEvalSeconds of "
                   f"{', '.join(ignored)} are ignored")
        log.warning("%s", warning)
        report.warnings.append(warning)


def _all_specs(entries: dict[str, PolicySpec | PolicyGroupSpec]) -> list[PolicySpec]:
    specs: list[PolicySpec] = []
    for entry in entries.values():
        specs.extend(entry.members.values() if isinstance(entry, PolicyGroupSpec) else [entry])
    return specs


def host_capabilities(specs: list[PolicySpec], settings: ServerSettings,
                      report: BootReport) -> dict[str, AllowList | str]:
    """Each policy's grant, or why its patterns are invalid (the reference's message). Entries without the
    key get `--default-host-capabilities` (older controllers write no key): counted and logged."""
    grants: dict[str, AllowList | str] = {}
    default = parse(split_patterns(settings.default_host_capabilities))  # checked with the settings
    for spec in specs:
        if spec.host_capabilities is None:
            report.default_host_capabilities += 1
            grants[spec.name] = default
            continue
        try:
            grants[spec.name] = parse(spec.host_capabilities)
        except PatternError as exc:
            grants[spec.name] = f"invalid hostCapabilities pattern for policy {spec.name}: {exc}"
    if report.default_host_capabilities:
        log.info("%d of %d policies have no hostCapabilities key and get the default host capabilities %s "
                 "(--default-host-capabilities)", report.default_host_capabilities, len(specs), default)
    return grants


def _download_name(spec: PolicySpec) -> str:
    # The reference names group members `<group>/#<member>` in download errors.
    group, sep, member = spec.name.partition("/")
    return f"{group}/#{member}" if sep else spec.name


def compile_module(engine: wasmtime.Engine, cache: CompileCache, wasm: bytes, digest: str,
                   source: str, report: BootReport, execution_mode: str | None = None) -> CompiledModule:
    """`execution_mode`: the mode the caller requires (kwctl's `--execution-mode`); None: the metadata's."""
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
                         verification=load_verification(settings.verification_path),
                         sigstore_trust_config=settings.sigstore_trust_config)


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
    options = engine_options_for(settings)
    reuse = previous is not None and previous.engine_options == options
    engine = previous.engine if reuse else make_engine(options)
    known_modules = previous.modules if reuse else {}
    cache = CompileCache(settings.cache_dirs, options)
    registry = PolicyRegistry(engine=engine, engine_options=options)
    report = BootReport()
    for warning in entry_warnings(entries):
        log.warning("%s", warning)
        report.warnings.append(warning)
    _ignored_timeouts(settings, specs, report)
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
                                          execution_mode)
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

    memory_limit = settings.policy_memory_limit_mib * 1024 * 1024
    registries = RegistryAccess(  # for the OCI callbacks
        sources_path=settings.sources_path, docker_config_json_path=settings.docker_config_json_path,
        timeout_seconds=settings.download_timeout_seconds, retries=settings.download_retries,
        max_bytes=settings.max_module_size_mib * 1024 * 1024, sigstore_trust_config=settings.sigstore_trust_config,
        answers=answer_cache(settings.registry_answer_cache_entries, settings.registry_answer_cache_mib * MIB))
    grants = host_capabilities(specs, settings, report)
    for spec in specs:
        loaded, granted = by_reference[spec.module], grants[spec.name]
        if isinstance(granted, str):
            registry.init_errors[spec.name] = f"bootstrap failure: {granted}"
            continue
        if isinstance(loaded, Exception):
            message = str(loaded)
            if isinstance(loaded, VerificationError):
                message = f"Policy '{spec.name}' cannot be verified: {message}"
            elif isinstance(loaded, ChecksumError):
                message = f"Verification of policy {spec.name} failed: {message}"
            elif isinstance(loaded, SourceError) and not isinstance(loaded, LocalModuleError):
                message = f"Error while downloading policy '{_download_name(spec)}' from {spec.module}: {message}"
            registry.init_errors[spec.name] = f"bootstrap failure: {spec.name}: {message}"
            continue
        timeout = policy_timeout(settings, spec)
        registry.policies[spec.name] = LoadedPolicy(
            spec=spec, module=loaded, settings_json=orjson.dumps(spec.settings),
            limits=InstanceLimits(memory_bytes=memory_limit, timeout_seconds=timeout),
            capabilities=Capabilities(spec.name, spec.context_aware_resources, registries=registries,
                                      host_capabilities=granted),
        )
        if spec.host_capabilities is None and spec.context_aware_resources \
                and not registry.policies[spec.name].reads_cluster:
            warning = (f"policy {spec.name} has contextAwareResources but no hostCapabilities key, and the default "
                       f"host capabilities {granted} grant no Kubernetes call: its cluster reads are refused "
                       "(set hostCapabilities, or --default-host-capabilities under a controller before 1.35)")
            log.warning("%s", warning)
            report.warnings.append(warning)

    _check_all_policies(registry, options, report)
    for name, group in registry.groups.items():
        if group.expression_error is not None:
            registry.init_errors[name] = f"{GROUP_EXPRESSION_ERROR}: {group.expression_error}"
    report.seconds = time.monotonic() - started
    # Stored, answered, logged and used as a metric label: what a guest said there must stay small.
    registry.init_errors = {name: bounded(error) for name, error in registry.init_errors.items()}
    if registry.init_errors and not settings.continue_on_errors:
        raise BootError(registry.init_errors, report)
    for name, error in registry.init_errors.items():
        log.error("policy %s failed to initialise and will reject every request: %s", name,
                  report.describe(name, error))
    return registry, report


def _check_all_policies(registry: PolicyRegistry, options: EngineOptions, report: BootReport) -> None:
    """Check every policy once, here, so no request ever pays for it: its mode's boot checks, then
    its settings, on an instance made for the purpose. A policy that fails is an init error."""
    pool = InstancePool(registry, reuse=False, keep_bytes=0, budget_bytes=0)
    ticker = EpochTicker(registry.engine)
    if options.epoch_interruption:
        ticker.start()
    try:
        for name, policy in list(registry.policies.items()):
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
                location = settings_path(policy.settings_json, error)
                if location is not None:
                    report.settings_locations[name] = location
                registry.init_errors[name] = f"Policy settings are invalid: {error}"
                del registry.policies[name]
    finally:
        ticker.stop()  # no thread may outlive the boot: the master forks next
        pool.clear()
