"""Configuration: server settings (flags and environment) and the `policies.yml` schema.

Everything here turns text into plain, validated, immutable objects. It knows nothing of wasmtime,
falcon or gunicorn.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from kwserver.expressions import ExpressionError, Node, compile_expression


class ConfigError(ValueError):
    """A configuration that cannot be used; the message is meant for the operator."""


# --- server settings -----------------------------------------------------------------------------

_TRUE = {"1", "true", "t", "yes", "y", "on"}
_FALSE = {"0", "false", "f", "no", "n", "off", ""}


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"invalid boolean value {text!r}")


def parse_present(text: str) -> bool:
    """NO_COLOR convention: set to anything non-empty means yes."""
    return bool(text)


@dataclass(frozen=True)
class Setting:
    """One server setting, declared once: its flag, its environment variable, its default and its doc."""

    name: str
    env: str
    default: Any
    help: str
    kind: Callable[[str], Any] = str
    hidden: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def is_bool(self) -> bool:
        return self.kind in (parse_bool, parse_present)


MIB = 1024 * 1024

SETTINGS: tuple[Setting, ...] = (
    # Names, variables and defaults of the reference server, so existing deployments carry over.
    Setting("addr", "KUBEWARDEN_BIND_ADDRESS", "0.0.0.0", "Bind address of the API and readiness listeners"),
    Setting("port", "KUBEWARDEN_PORT", 3000, "Port of the admission API", int),
    Setting("readiness_probe_port", "KUBEWARDEN_READINESS_PROBE_PORT", 8081,
            "Port of the readiness probe (always plain HTTP)", int),
    Setting("workers", "KUBEWARDEN_WORKERS", None, "Worker processes (default: number of CPUs)", int),
    Setting("policies", "KUBEWARDEN_POLICIES", "policies.yml", "YAML file holding the policies"),
    Setting("policies_download_dir", "KUBEWARDEN_POLICIES_DOWNLOAD_DIR", ".",
            "Download directory for remote policy modules"),
    Setting("policy_timeout", "KUBEWARDEN_POLICY_TIMEOUT", 2,
            "Interrupt a policy evaluation after this many seconds", int),
    Setting("disable_timeout_protection", "KUBEWARDEN_DISABLE_TIMEOUT_PROTECTION", False,
            "Disable the global evaluation timeout (per-policy timeoutEvalSeconds still apply)", parse_bool),
    Setting("always_accept_admission_reviews_on_namespace",
            "KUBEWARDEN_ALWAYS_ACCEPT_ADMISSION_REVIEWS_ON_NAMESPACE", None,
            "Accept every AdmissionReview for this namespace without evaluating it"),
    Setting("continue_on_errors", "KUBEWARDEN_CONTINUE_ON_ERRORS", False,
            "Start even if some policies fail to load; they reject every request", parse_bool),
    Setting("cert_file", "KUBEWARDEN_CERT_FILE", None, "TLS certificate (PEM) of the API listener"),
    Setting("key_file", "KUBEWARDEN_KEY_FILE", None, "TLS private key (PEM) of the API listener"),
    Setting("client_ca_file", "KUBEWARDEN_CLIENT_CA_FILE", None,
            "Comma-separated PEM files of CAs for mandatory client certificates (mTLS)"),
    Setting("ignore_kubernetes_connection_failure", "KUBEWARDEN_IGNORE_KUBERNETES_CONNECTION_FAILURE", False,
            "Start even when the Kubernetes API cannot be reached", parse_bool),
    Setting("log_level", "KUBEWARDEN_LOG_LEVEL", "info", "trace, debug, info, warn or error"),
    Setting("log_fmt", "KUBEWARDEN_LOG_FMT", "text", "Log format: text or json"),
    # kwserver's own settings.
    Setting("compile_cache_dir", "KWSERVER_COMPILE_CACHE_DIR", None,
            "Directory of compiled modules (default: $XDG_CACHE_HOME/kwserver or ~/.cache/kwserver)"),
    Setting("policy_memory_limit_mib", "KWSERVER_POLICY_MEMORY_LIMIT_MIB", 256,
            "Maximum linear memory of one policy instance during an evaluation", int),
    Setting("instance_keep_memory_mib", "KWSERVER_INSTANCE_KEEP_MEMORY_MIB", 32,
            "Discard an instance after use when its memory grew beyond this", int),
    Setting("worker_instance_budget_mib", "KWSERVER_WORKER_INSTANCE_BUDGET_MIB", 512,
            "Memory of all idle instances kept by one worker; least recently used ones go first", int),
    Setting("fresh_instance_per_request", "KWSERVER_FRESH_INSTANCE_PER_REQUEST", False,
            "Never reuse instances: every evaluation gets a new one (strict isolation)", parse_bool),
    Setting("threads", "KWSERVER_THREADS", 1, "Request threads per worker process", int),
    Setting("metrics_port", "KWSERVER_METRICS_PORT", 9090,
            "Port of the Prometheus /metrics and JSON /status endpoints (0: disabled)", int),
    Setting("min_workers", "KWSERVER_MIN_WORKERS", None,
            "Fewest workers when the pool shrinks (default: --workers)", int),
    Setting("max_workers", "KWSERVER_MAX_WORKERS", None,
            "Most workers when the pool grows (default: --workers); above min, the pool follows the load", int),
    Setting("scale_up_after_seconds", "KWSERVER_SCALE_UP_AFTER_SECONDS", 3,
            "Add a worker after the workers were this long busier than 75%%", int),
    Setting("scale_down_after_seconds", "KWSERVER_SCALE_DOWN_AFTER_SECONDS", 30,
            "Remove a worker after the workers were this long less than 25%% busy", int),
    Setting("worker_max_uss_mib", "KWSERVER_WORKER_MAX_USS_MIB", 0,
            "Recycle a worker gracefully once its own memory (USS) exceeds this (0: never)", int),
    Setting("worker_max_requests", "KWSERVER_WORKER_MAX_REQUESTS", 0,
            "Recycle a worker gracefully after this many requests, with 10%% jitter (0: never)", int),
    Setting("pid_file", "KWSERVER_PID_FILE", None, "Write the master's pid here (used by `kwserver reload`)"),
    # Accepted so that existing policy-server deployments start unchanged; see ServerSettings.ignored().
    Setting("sources_path", "KUBEWARDEN_SOURCES_PATH", None,
            "Registry sources (sources.yml); unused: this build loads local modules only"),
    Setting("verification_path", "KUBEWARDEN_VERIFICATION_CONFIG_PATH", None,
            "Signature verification config; not supported by this build: refuses to start when set"),
    Setting("docker_config_json_path", "KUBEWARDEN_DOCKER_CONFIG_JSON_PATH", None,
            "Registry credentials; unused: this build loads local modules only"),
    Setting("sigstore_cache_dir", "KUBEWARDEN_SIGSTORE_CACHE_DIR", None, "Sigstore cache; unused by this build"),
    Setting("enable_metrics", "KUBEWARDEN_ENABLE_METRICS", False,
            "OTLP metrics push; kwserver serves Prometheus metrics on --metrics-port instead", parse_bool),
    Setting("enable_pprof", "KUBEWARDEN_ENABLE_PPROF", False, "Go-style profiling endpoints; not available",
            parse_bool),
    Setting("log_no_color", "NO_COLOR", False, "No colours in text logs (kwserver never colours them)",
            parse_present),
    Setting("daemon", "KUBEWARDEN_DAEMON", False,
            "Detach from the terminal; not supported: run in the foreground (container, systemd)", parse_bool),
)

LOG_LEVELS = ("trace", "debug", "info", "warn", "error")


@dataclass(frozen=True)
class ServerSettings:
    addr: str = "0.0.0.0"
    port: int = 3000
    readiness_probe_port: int = 8081
    workers: int | None = None
    policies: str = "policies.yml"
    policies_download_dir: str = "."
    policy_timeout: int = 2
    disable_timeout_protection: bool = False
    always_accept_admission_reviews_on_namespace: str | None = None
    continue_on_errors: bool = False
    cert_file: str | None = None
    key_file: str | None = None
    client_ca_file: str | None = None
    ignore_kubernetes_connection_failure: bool = False
    log_level: str = "info"
    log_fmt: str = "text"
    compile_cache_dir: str | None = None
    policy_memory_limit_mib: int = 256
    instance_keep_memory_mib: int = 32
    worker_instance_budget_mib: int = 512
    fresh_instance_per_request: bool = False
    threads: int = 1
    metrics_port: int = 9090
    min_workers: int | None = None
    max_workers: int | None = None
    scale_up_after_seconds: int = 3
    scale_down_after_seconds: int = 30
    worker_max_uss_mib: int = 0
    worker_max_requests: int = 0
    pid_file: str | None = None
    sources_path: str | None = None
    verification_path: str | None = None
    docker_config_json_path: str | None = None
    sigstore_cache_dir: str | None = None
    enable_metrics: bool = False
    enable_pprof: bool = False
    log_no_color: bool = False
    daemon: bool = False

    def __post_init__(self) -> None:
        if self.verification_path:
            # Starting without the requested verification would silently accept unverified policies.
            raise ConfigError("policy signature verification (--verification-path) is not supported by this build")
        if self.daemon:
            raise ConfigError("--daemon is not supported: run kwserver in the foreground (container, systemd)")
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError("both certificate and key must be provided together")
        if self.client_ca_file and not self.cert_file:
            raise ConfigError("client CA certificate requires server certificate and key to be specified")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"invalid log level {self.log_level!r}, expected one of {', '.join(LOG_LEVELS)}")
        if self.log_fmt not in ("text", "json"):
            raise ConfigError(f"invalid log format {self.log_fmt!r}, expected text or json")
        for name in ("policy_memory_limit_mib", "threads", "policy_timeout"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        for name in ("workers", "min_workers", "max_workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.pool_min > self.pool_max:
            raise ConfigError(f"min_workers ({self.pool_min}) is above max_workers ({self.pool_max})")

    @property
    def worker_count(self) -> int:
        return self.workers or os.cpu_count() or 1

    def ignored(self) -> list[str]:
        """Reference-server settings that are set but have no effect here, for a startup warning each."""
        notes = {
            "sources_path": "registry sources are not used: this build loads local modules only",
            "docker_config_json_path": "registry credentials are not used: this build loads local modules only",
            "sigstore_cache_dir": "there is no sigstore support in this build",
            "enable_metrics": f"metrics are not pushed over OTLP; Prometheus serves them on port {self.metrics_port}",
            "enable_pprof": "profiling endpoints are not available",
        }
        return [f"{name.replace('_', '-')}: {note}" for name, note in notes.items() if getattr(self, name)]

    @property
    def pool_min(self) -> int:
        return self.min_workers or min(self.worker_count, self.max_workers or self.worker_count)

    @property
    def pool_max(self) -> int:
        return self.max_workers or max(self.worker_count, self.min_workers or self.worker_count)

    @property
    def initial_workers(self) -> int:
        return max(self.pool_min, min(self.worker_count, self.pool_max))

    @property
    def autoscaling(self) -> bool:
        return self.pool_max > self.pool_min

    @property
    def global_timeout(self) -> int | None:
        return None if self.disable_timeout_protection else self.policy_timeout

    @property
    def tls(self) -> bool:
        return bool(self.cert_file)

    @property
    def client_ca_files(self) -> list[str]:
        return [p.strip() for p in (self.client_ca_file or "").split(",") if p.strip()]

    @property
    def cache_dir(self) -> Path:
        if self.compile_cache_dir:
            return Path(self.compile_cache_dir)
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return Path(base) / "kwserver"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ServerSettings:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            if setting.env in environ:
                try:
                    values[setting.name] = setting.kind(environ[setting.env])
                except ValueError as exc:
                    raise ConfigError(f"invalid value for {setting.env}: {exc}") from exc
        values.update(overrides)
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The environment that makes `from_env` rebuild these settings (for child processes)."""
        env = {}
        for setting in SETTINGS:
            value = getattr(self, setting.name)
            if setting.kind is parse_present and not value:
                continue  # for NO_COLOR, being set at all means yes
            if value is not None:
                env[setting.env] = ("true" if value else "false") if isinstance(value, bool) else str(value)
        return env


def add_setting_arguments(parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None) -> None:
    """Declare every setting as a flag whose default comes from its environment variable."""
    environ = os.environ if environ is None else environ
    for setting in SETTINGS:
        help_text = argparse.SUPPRESS if setting.hidden else f"{setting.help} [env: {setting.env}]"
        if setting.is_bool:
            parser.add_argument(setting.flag, dest=setting.name, action="store_true", default=None, help=help_text)
        else:
            parser.add_argument(setting.flag, dest=setting.name, type=setting.kind, default=None, help=help_text)


def settings_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ServerSettings:
    """Flags win over environment variables, which win over defaults."""
    known = {f.name for f in fields(ServerSettings)}
    overrides = {k: v for k, v in vars(args).items() if k in known and v is not None}
    return ServerSettings.from_env(environ, **overrides)


# --- policies.yml ----------------------------------------------------------------------------------

POLICY_MODES = ("protect", "monitor")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class ContextAwareResource:
    api_version: str
    kind: str


@dataclass(frozen=True)
class PolicySpec:
    """A policy, or a member of a policy group (then `name` is `<group>/<member>`)."""

    name: str
    module: str
    settings: dict[str, Any] = field(default_factory=dict)
    policy_mode: str = "protect"
    allowed_to_mutate: bool = False
    context_aware_resources: tuple[ContextAwareResource, ...] = ()
    message: str | None = None
    timeout_eval_seconds: int | None = None
    entrypoint: str | None = None  # OPA/Gatekeeper: the entrypoint to evaluate, by name (an extension)


@dataclass(frozen=True)
class PolicyGroupSpec:
    name: str
    expression: str
    message: str
    members: dict[str, PolicySpec]
    tree: Node
    policy_mode: str = "protect"


PolicyEntry = PolicySpec | PolicyGroupSpec

_POLICY_KEYS = {"module", "policyMode", "allowedToMutate", "settings", "contextAwareResources", "message",
                "timeoutEvalSeconds", "entrypoint"}
_MEMBER_KEYS = {"module", "settings", "contextAwareResources", "timeoutEvalSeconds", "entrypoint"}


def _settings(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"invalid type: settings must be a map, found {type(value).__name__}")
    return value


def _policy_mode(value: Any) -> str:
    if value is None:
        return "protect"
    if value not in POLICY_MODES:
        raise ConfigError(f"unknown variant `{value}`, expected `protect` or `monitor`")
    return value


def _timeout(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"invalid value: timeoutEvalSeconds must be an unsigned integer, found {value!r}")
    return value


def _resources(value: Any) -> tuple[ContextAwareResource, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError("invalid type: contextAwareResources must be a list")
    resources = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("apiVersion"), str) or not isinstance(
            item.get("kind"), str
        ):
            raise ConfigError("each contextAwareResources entry needs string `apiVersion` and `kind`")
        resources.append(ContextAwareResource(item["apiVersion"], item["kind"]))
    return tuple(resources)


def _entrypoint(value: Any, where: str) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError(f"{where}: `entrypoint` must be a non-empty string (an OPA entrypoint name)")
    return value


def _module(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: `module` must be a non-empty string")
    return value


def _parse_policy(name: str, doc: dict[str, Any]) -> PolicySpec:
    allowed = doc.get("allowedToMutate", False)
    if not isinstance(allowed, bool):
        raise ConfigError(f"policy '{name}': allowedToMutate must be a boolean")
    message = doc.get("message")
    if message is not None and not isinstance(message, str):
        raise ConfigError(f"policy '{name}': message must be a string")
    return PolicySpec(
        name=name,
        module=_module(doc.get("module"), f"policy '{name}'"),
        settings=_settings(doc.get("settings")),
        policy_mode=_policy_mode(doc.get("policyMode")),
        allowed_to_mutate=allowed,
        context_aware_resources=_resources(doc.get("contextAwareResources")),
        message=message,
        timeout_eval_seconds=_timeout(doc.get("timeoutEvalSeconds")),
        entrypoint=_entrypoint(doc.get("entrypoint"), f"policy '{name}'"),
    )


def _parse_group(name: str, doc: dict[str, Any]) -> PolicyGroupSpec:
    for key in ("policies", "expression", "message"):
        if key not in doc:
            raise ConfigError(f"policy '{name}': missing field `module` (policy) or `{key}` (policy group)")
    members_doc = doc["policies"]
    if not isinstance(members_doc, dict) or not members_doc:
        raise ConfigError(f"policy group '{name}': `policies` must be a non-empty map")
    invalid = sorted(m for m in members_doc if "/" in str(m))
    if invalid:
        raise ConfigError(f"policy group '{name}' contains policies with invalid names: {invalid}")
    members = {}
    for member, member_doc in members_doc.items():
        member = str(member)
        if not _IDENTIFIER.match(member):
            raise ConfigError(
                f"policy group '{name}': member name '{member}' must be an identifier "
                "(letters, digits and '_', not starting with a digit) to be callable in the expression"
            )
        if not isinstance(member_doc, dict):
            raise ConfigError(f"policy group '{name}': member '{member}' must be a map")
        unknown = sorted(set(member_doc) - _MEMBER_KEYS)
        if unknown:
            raise ConfigError(f"policy group '{name}': member '{member}' has unknown field(s) {unknown}")
        member_id = f"{name}/{member}"
        members[member] = PolicySpec(
            name=member_id,
            module=_module(member_doc.get("module"), f"policy group '{name}' member '{member}'"),
            settings=_settings(member_doc.get("settings")),
            context_aware_resources=_resources(member_doc.get("contextAwareResources")),
            timeout_eval_seconds=_timeout(member_doc.get("timeoutEvalSeconds")),
            entrypoint=_entrypoint(member_doc.get("entrypoint"), f"policy group '{name}' member '{member}'"),
        )
    expression, message = doc["expression"], doc["message"]
    if not isinstance(expression, str) or not isinstance(message, str):
        raise ConfigError(f"policy group '{name}': `expression` and `message` must be strings")
    try:
        tree = compile_expression(expression, members)
    except ExpressionError as exc:
        raise ConfigError(f"policy group '{name}': invalid expression {expression!r}: {exc}") from exc
    return PolicyGroupSpec(
        name=name, expression=expression, message=message, members=members, tree=tree,
        policy_mode=_policy_mode(doc.get("policyMode")),
    )


def parse_policies(doc: Any) -> dict[str, PolicyEntry]:
    """Validate a parsed policies.yml document into policies and policy groups."""
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError("the top level must be a map from policy name to policy")
    entries: dict[str, PolicyEntry] = {}
    for raw_name, entry in doc.items():
        name = str(raw_name)
        if "/" in name:
            raise ConfigError(f"policy name '{name}' contains a '/' character")
        if not isinstance(entry, dict):
            raise ConfigError(f"policy '{name}' must be a map")
        # Untagged like the reference: a policy if it has a module, otherwise a group.
        entries[name] = _parse_policy(name, entry) if "module" in entry else _parse_group(name, entry)
    return entries


def load_policies(path: str | os.PathLike[str]) -> dict[str, PolicyEntry]:
    try:
        with open(path, encoding="utf-8") as stream:
            doc = yaml.safe_load(stream)
        return parse_policies(doc)
    except (OSError, yaml.YAMLError, ConfigError) as exc:
        raise ConfigError(f'error while loading policies from "{path}": {exc}') from exc
