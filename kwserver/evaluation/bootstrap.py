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

import orjson
import wasmtime

from kwserver.capabilities import Capabilities, RegistryAccess
from kwserver.config import PolicyGroupSpec, PolicySpec, ServerSettings, load_policies
from kwserver.evaluation.evaluator import GROUP_EXPRESSION_ERROR
from kwserver.evaluation.modes import check_metadata, infer_metadata, metadata_for_mode, mode_named, read_metadata
from kwserver.evaluation.pool import InstancePool
from kwserver.evaluation.registry import LoadedPolicy, PolicyRegistry
from kwserver.metadata import MetadataError
from kwserver.runtime import InstanceLimits, RuntimeFailure
from kwserver.runtime.engine import (
    CompileCache,
    CompiledModule,
    EngineOptions,
    EpochTicker,
    make_engine,
    malloc_trim,
)
from kwserver.sources.errors import ChecksumError, SourceError, TransportError, VerificationError
from kwserver.sources.isolated import fetch_modules
from kwserver.truncation import bounded

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
    """Epoch interruption costs a little on every call, so it is on only when some timeout exists."""
    any_timeout = settings.global_timeout is not None or any(s.timeout_eval_seconds for s in specs)
    return EngineOptions(epoch_interruption=any_timeout)


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
                   source: str, report: BootReport, execution_mode: str | None = None) -> CompiledModule:
    """`execution_mode`: the mode the caller requires (kwctl's `--execution-mode`); None: the metadata's."""
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
    registry.groups = {n: e for n, e in entries.items() if isinstance(e, PolicyGroupSpec)}
    registry.specs = {n: e for n, e in entries.items() if isinstance(e, PolicySpec)}
    report = BootReport()

    modules = load_modules(registry, reuse, settings, base_dir, [spec.module for spec in specs], report,
                           execution_mode)
    registries = RegistryAccess.from_settings(settings)  # for the OCI and sigstore callbacks
    for spec in specs:
        loaded = modules[spec.module]
        if isinstance(loaded, Exception):
            registry.init_errors[spec.name] = f"bootstrap failure: {spec.name}: {load_error(spec, loaded)}"
        else:
            registry.policies[spec.name] = bind_policy(spec, loaded, settings, registries)

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
        log.error("policy %s failed to initialise and will reject every request: %s", name, error)
    return registry, report


def load_modules(registry: PolicyRegistry, reuse: Reuse, settings: ServerSettings, base_dir: Path,
                 references: list[str], report: BootReport,
                 execution_mode: str | None = None) -> dict[str, CompiledModule | Exception]:
    """Every module reference fetched once (remote ones concurrently) and compiled once per unique digest
    into `registry.modules`, reusing what `reuse` holds; what each reference loaded, or why it did not."""
    cache = CompileCache(settings.cache_dirs, registry.engine_options)
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
                                          report, execution_mode)
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
    if isinstance(error, SourceError):
        return f"Error while downloading policy '{_download_name(spec)}' from {spec.module}: {error}"
    return str(error)


def bind_policy(spec: PolicySpec, module: CompiledModule, settings: ServerSettings,
                registries: RegistryAccess) -> LoadedPolicy:
    """A policy (or group member) bound to its module, settings, limits and host capabilities."""
    timeout = spec.timeout_eval_seconds if spec.timeout_eval_seconds is not None else settings.global_timeout
    return LoadedPolicy(
        spec=spec, module=module, settings_json=orjson.dumps(spec.settings),
        limits=InstanceLimits(memory_bytes=settings.policy_memory_limit_mib * 1024 * 1024, timeout_seconds=timeout),
        capabilities=Capabilities(spec.name, spec.context_aware_resources, registries=registries),
    )


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
                registry.init_errors[name] = f"Policy settings are invalid: {error}"
                del registry.policies[name]
    finally:
        ticker.stop()  # no thread may outlive the boot: the master forks next
        pool.clear()
