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

import orjson
import wasmtime

from kwserver.capabilities import AllowList, Capabilities, RegistryAccess
from kwserver.config import PolicyGroupSpec, PolicySpec, ServerSettings, entry_warnings, load_policies, split_patterns
from kwserver.evaluation.evaluator import GROUP_EXPRESSION_ERROR
from kwserver.evaluation.modes import check_metadata, infer_metadata, metadata_for_mode, mode_named, read_metadata
from kwserver.evaluation.pool import InstancePool
from kwserver.evaluation.registry import LoadedPolicy, PolicyRegistry
from kwserver.evaluation.settings_location import settings_path
from kwserver.host_capabilities import PatternError, parse
from kwserver.metadata import MetadataError
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
from kwserver.sources.errors import ChecksumError, LocalModuleError, SourceError, TransportError, VerificationError
from kwserver.sources.isolated import fetch_modules
from kwserver.truncation import bounded

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


def engine_options_for(settings: ServerSettings, specs: list[PolicySpec]) -> EngineOptions:
    """Epoch interruption costs a little on every call, so it is on only when timeouts are: never with
    `--disable-timeout-protection`, which turns off the per-policy ones too (as the reference does
    since its PR #1982).
    When every evaluation of every module gets a new instance, instances come from a pool of slots sized
    for the policies (kwserver/runtime/pooling.py): it makes them ~20 µs faster, for ~1 MiB more per
    process, which is not worth it where instances are made rarely (docs/operations.md, "Instances")."""
    pool = None
    if settings.fresh_instance_per_request:
        pool = PoolSize.for_policies(len(specs), settings.policy_memory_limit_mib * 1024 * 1024)
    return EngineOptions(epoch_interruption=settings.global_timeout is not None, pool=pool)


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
                   source: str, report: BootReport, execution_mode: str | None = None,
                   preinitialise_bytes: int | None = None, scratch: wasmtime.Engine | None = None) -> CompiledModule:
    """`execution_mode`: the mode the caller requires (kwctl's `--execution-mode`); None: the metadata's.
    `preinitialise_bytes`: run the module's start-up once here, under that memory limit, and serve the
    pre-initialised module (kwserver/runtime/preinit.py), running it on `scratch` (default: `engine`);
    None: serve the module as it is."""
    metadata = read_metadata(wasm)
    module, compiled_size = cache.load(engine, wasm, digest)
    exports = {e.name for e in module.exports}
    if execution_mode is not None:
        metadata = metadata_for_mode(metadata, execution_mode, exports)
    elif metadata is None:
        metadata = infer_metadata(exports, {i.module for i in module.imports})
        warning = (f"module {source} has no io.kubewarden.metadata section; assuming execution mode "
                   f"`{metadata.execution_mode}` (embed metadata with `kwserver annotate`)")
        log.warning("%s", warning)
        report.warnings.append(warning)
    check_metadata(metadata)
    startup = mode_named(metadata.execution_mode).startup
    if preinitialise_bytes is not None and startup is not None:
        module, compiled_size = preinit.load(engine, cache, wasm, digest, startup, preinitialise_bytes,
                                             scratch or engine) or (module, compiled_size)
    return CompiledModule(digest=digest, module=module, metadata=metadata, size=len(wasm),
                          compiled_size=compiled_size, source=source)


def _previous_modules(previous: PolicyRegistry) -> dict[str, CompiledModule]:
    return {policy.spec.module: policy.module for policy in previous.policies.values()}


@dataclass
class Reuse:
    """What a reload takes over from the running registry: its engine and compiled modules, when the
    engine options did not change (a module compiled for other options cannot run on this engine)."""

    engine: wasmtime.Engine | None = None
    by_digest: dict[str, CompiledModule] = field(default_factory=dict)
    by_reference: dict[str, CompiledModule] = field(default_factory=dict)  # what each policies.yml string runs

    @classmethod
    def of(cls, previous: PolicyRegistry | None, options: EngineOptions) -> Reuse:
        if previous is None or previous.engine_options != options:
            return cls()
        return cls(previous.engine, previous.modules, _previous_modules(previous))


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
    reuse = Reuse.of(previous, options)
    registry = PolicyRegistry(engine=reuse.engine or make_engine(options), engine_options=options)
    # The master runs guests at boot (start-ups to snapshot, settings checks) on an engine of its own, so
    # the instance pool of the serving engine is still cold when the workers inherit it: a slot used here
    # would stay resident in the master and be copied into every worker that reuses it.
    scratch = registry.engine if options.pool is None else make_engine(replace(options, pool=None))
    registry.groups = {n: e for n, e in entries.items() if isinstance(e, PolicyGroupSpec)}
    registry.specs = {n: e for n, e in entries.items() if isinstance(e, PolicySpec)}
    report = BootReport()
    for warning in entry_warnings(entries):
        log.warning("%s", warning)
        report.warnings.append(warning)
    _ignored_timeouts(settings, specs, report)

    modules = load_modules(registry, reuse, settings, base_dir, [spec.module for spec in specs], report,
                           execution_mode, scratch)
    registries = RegistryAccess.from_settings(settings)  # for the OCI and sigstore callbacks
    grants = host_capabilities(specs, settings, report)
    for spec in specs:
        loaded, granted = modules[spec.module], grants[spec.name]
        if isinstance(granted, str):
            registry.init_errors[spec.name] = f"bootstrap failure: {granted}"
        elif isinstance(loaded, Exception):
            registry.init_errors[spec.name] = f"bootstrap failure: {spec.name}: {load_error(spec, loaded)}"
        else:
            policy = registry.policies[spec.name] = bind_policy(spec, loaded, settings, registries, granted)
            if spec.host_capabilities is None and spec.context_aware_resources and not policy.reads_cluster:
                warning = (f"policy {spec.name} has contextAwareResources but no hostCapabilities key, and the "
                           f"default host capabilities {granted} grant no Kubernetes call: its cluster reads are "
                           "refused (set hostCapabilities, or --default-host-capabilities under a controller "
                           "before 1.35)")
                log.warning("%s", warning)
                report.warnings.append(warning)

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
        log.error("policy %s failed to initialise and will reject every request: %s", name,
                  report.describe(name, error))
    return registry, report


def load_modules(registry: PolicyRegistry, reuse: Reuse, settings: ServerSettings, base_dir: Path,
                 references: list[str], report: BootReport, execution_mode: str | None = None,
                 scratch: wasmtime.Engine | None = None) -> dict[str, CompiledModule | Exception]:
    """Every module reference fetched once (remote ones concurrently) and compiled once per unique digest
    into `registry.modules`, reusing what `reuse` holds; what each reference loaded, or why it did not.
    Start-ups run for pre-initialisation on `scratch` (default: the registry's engine)."""
    cache = CompileCache(settings.cache_dirs, registry.engine_options)
    preinitialise_bytes = None if settings.disable_preinitialisation else settings.policy_memory_limit_mib * 1024 * 1024
    fetched_modules = fetch_modules(settings, base_dir, references)
    by_reference: dict[str, CompiledModule | Exception] = {}
    for reference, fetched in fetched_modules.modules.items():
        running = reuse.by_reference.get(reference)
        if isinstance(fetched, TransportError) and running is not None:
            # A registry that is down during a reload does not take running policies with it.
            log.warning("cannot download %s (%s); keeping the module in service", reference, fetched)
            report.warnings.append(f"{reference}: download failed, the running module is kept: {fetched}")
            registry.modules[running.digest] = by_reference[reference] = running
            report.reused_modules += 1
            continue
        if isinstance(fetched, SourceError):
            by_reference[reference] = fetched
            continue
        compiled = registry.modules.get(fetched.digest)
        if compiled is None and fetched.digest in reuse.by_digest:
            compiled = reuse.by_digest[fetched.digest]
            report.reused_modules += 1
        if compiled is None:
            try:
                compiled = compile_module(registry.engine, cache, fetched.wasm, fetched.digest, str(fetched.path),
                                          report, execution_mode, preinitialise_bytes, scratch)
            except (MetadataError, wasmtime.WasmtimeError) as exc:
                by_reference[reference] = exc
                continue
        registry.modules[fetched.digest] = by_reference[reference] = compiled
    report.unique_modules = len(registry.modules)
    for mode in dict.fromkeys(mode_named(m.execution_mode) for m in registry.modules.values()):
        mode.preload()
    report.downloaded_modules = fetched_modules.downloaded
    report.cache_hits, report.cache_misses = cache.hits, cache.misses
    malloc_trim()
    return by_reference


def load_error(spec: PolicySpec, error: Exception) -> str:
    """Why `spec`'s module could not be loaded, in the reference's words."""
    if isinstance(error, VerificationError):
        return f"Policy '{spec.name}' cannot be verified: {error}"
    if isinstance(error, ChecksumError):
        return f"Verification of policy {spec.name} failed: {error}"
    if isinstance(error, SourceError) and not isinstance(error, LocalModuleError):
        return f"Error while downloading policy '{_download_name(spec)}' from {spec.module}: {error}"
    return str(error)


def bind_policy(spec: PolicySpec, module: CompiledModule, settings: ServerSettings,
                registries: RegistryAccess, granted: AllowList) -> LoadedPolicy:
    """A policy (or group member) bound to its module, settings, limits and host capabilities."""
    return LoadedPolicy(
        spec=spec, module=module, settings_json=orjson.dumps(spec.settings),
        limits=InstanceLimits(memory_bytes=settings.policy_memory_limit_mib * 1024 * 1024,
                              timeout_seconds=policy_timeout(settings, spec)),
        capabilities=Capabilities(spec.name, spec.context_aware_resources, registries=registries,
                                  host_capabilities=granted),
        lists_inventory=mode_named(module.execution_mode).lists_inventory,
    )


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
                mode = mode_named(policy.module.execution_mode)
                warning = mode.boot_warning(pool.linked(policy.module), policy)
                with pool.instance(policy) as instance:
                    error = mode.settings_error(instance, policy.settings_json)
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
