"""Configuration: server settings (flags and environment) and the `policies.yml` schema.

Everything here turns text into plain, validated, immutable objects. It knows nothing of wasmtime,
falcon or gunicorn.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import orjson
import yaml

from kwserver.expressions import ExpressionError, Node, compile_expression
from kwserver.host_capabilities import PatternError, parse
from kwserver.logs import LEVELS


class ConfigError(ValueError):
    """A configuration that cannot be used; the message is meant for the operator."""


# The Kubernetes API server sends at most 3 MiB: a larger body is no admission request. Not a setting:
# the worker stops reading such a body and the API answers 413 (kwserver/server/worker.py, api.py).
MAX_REQUEST_BODY_BYTES = 3 * 1024 * 1024
# The worker pool grows while the workers' mean utilisation stays above this, and shrinks while it stays
# below the other (kwserver/server/autoscaler.py; the scaling settings below say how long).
GROW_ABOVE = 0.75
SHRINK_BELOW = 0.25


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
    """One server setting: its flag, environment variable, parser, check, default and help.

    Declared once, as a field of `ServerSettings` (see `setting()`); `SETTINGS` lists them all.
    """

    name: str
    env: str
    default: Any
    help: str
    parse: Callable[[str], Any] = str
    check: Callable[[Any], str | None] | None = None  # the problem with a value, or None when it is fine
    hidden: bool = False
    group: str | None = None  # its section of `--help`: a key of SETTING_GROUPS

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def is_bool(self) -> bool:
        return self.parse in (parse_bool, parse_present)

    def problem(self, value: Any) -> str | None:
        if value is None or self.check is None:
            return None
        problem = self.check(value)
        return f"{self.flag.lstrip('-')}: {problem}" if problem else None


# The sections of `--help`, in order; every setting names one (`setting(..., group=...)`).
SETTING_GROUPS = {
    "listeners": "listeners and TLS",
    "policies": "policies",
    "sources": "module sources and signatures",
    "evaluation": "evaluation limits and instances",
    "workers": "worker pool",
    "connections": "client connections",
    "kubernetes": "Kubernetes",
    "telemetry": "logs, metrics and traces",
    "process": "process",
}


def setting(default: Any, env: str, help: str, *, parse: Callable[[str], Any] = str,
            check: Callable[[Any], str | None] | None = None, hidden: bool = False, group: str | None = None) -> Any:
    """A `ServerSettings` field that is also a flag and an environment variable."""
    return field(default=default, metadata={"setting": (env, help, parse, check, hidden, group)})


def at_least(minimum: int) -> Callable[[int], str | None]:
    return lambda value: None if value >= minimum else f"must be at least {minimum}, got {value}"


def above(minimum: float) -> Callable[[float], str | None]:
    return lambda value: None if value > minimum else f"must be above {minimum}, got {value}"


def port_number(value: int) -> str | None:
    return None if 0 <= value <= 65535 else f"{value} is not a TCP port number"


def one_of(*choices: str) -> Callable[[str], str | None]:
    return lambda value: None if value in choices else f"invalid value {value!r}, expected one of {', '.join(choices)}"


def split_patterns(text: str) -> list[str]:
    """The patterns of a comma-separated list (the server setting's form); empty text is no pattern."""
    return [item.strip() for item in text.split(",")] if text.strip() else []


def _host_capability_problem(patterns: list[str]) -> str | None:
    try:
        parse(patterns)
    except PatternError as exc:
        return str(exc)
    return None


MIB = 1024 * 1024
LOG_LEVELS = tuple(LEVELS)


@dataclass(frozen=True)
class ServerSettings:
    # Names, variables and defaults of the reference server, so existing deployments carry over.
    addr: str = setting("0.0.0.0", "KUBEWARDEN_BIND_ADDRESS", "Bind address of the API and readiness listeners",
                        group="listeners")
    port: int = setting(3000, "KUBEWARDEN_PORT", "Port of the admission API", parse=int, check=port_number,
                        group="listeners")
    readiness_probe_port: int = setting(8081, "KUBEWARDEN_READINESS_PROBE_PORT",
                                        "Port of the readiness probe (always plain HTTP)",
                                        parse=int, check=port_number, group="listeners")
    workers: int | None = setting(
        None, "KUBEWARDEN_WORKERS",
        "Worker processes (default: the CPUs this process may use: cgroup CPU quota rounded up, CPU affinity)",
        parse=int, check=at_least(1), group="workers")
    policies: str = setting("policies.yml", "KUBEWARDEN_POLICIES", "YAML file holding the policies", group="policies")
    policies_download_dir: str = setting(".", "KUBEWARDEN_POLICIES_DOWNLOAD_DIR",
                                         "Download directory for remote policy modules", group="policies")
    policy_timeout: int = setting(2, "KUBEWARDEN_POLICY_TIMEOUT",
                                  "Interrupt a policy evaluation after this many seconds",
                                  parse=int, check=at_least(1), group="evaluation")
    disable_timeout_protection: bool = setting(
        False, "KUBEWARDEN_DISABLE_TIMEOUT_PROTECTION",
        "Disable policy timeout protection: no evaluation is interrupted, per-policy timeoutEvalSeconds included",
        parse=parse_bool, group="evaluation")
    always_accept_admission_reviews_on_namespace: str | None = setting(
        None, "KUBEWARDEN_ALWAYS_ACCEPT_ADMISSION_REVIEWS_ON_NAMESPACE",
        "Accept every AdmissionReview for this namespace without evaluating it", group="policies")
    continue_on_errors: bool = setting(False, "KUBEWARDEN_CONTINUE_ON_ERRORS",
                                       "Start even if some policies fail to load; they reject every request",
                                       parse=parse_bool, group="policies")
    cert_file: str | None = setting(None, "KUBEWARDEN_CERT_FILE", "TLS certificate (PEM) of the API listener",
                                    group="listeners")
    key_file: str | None = setting(None, "KUBEWARDEN_KEY_FILE", "TLS private key (PEM) of the API listener",
                                   group="listeners")
    client_ca_file: str | None = setting(
        None, "KUBEWARDEN_CLIENT_CA_FILE", "Comma-separated PEM files of CAs for mandatory client certificates (mTLS)",
        group="listeners")
    ignore_kubernetes_connection_failure: bool = setting(
        False, "KUBEWARDEN_IGNORE_KUBERNETES_CONNECTION_FAILURE",
        "Start even when the Kubernetes API cannot be reached", parse=parse_bool, group="kubernetes")
    cluster_max_reflectors: int = setting(
        100, "KWSERVER_CLUSTER_MAX_REFLECTORS",
        "Most lists (list+watch reflectors) the cluster cache keeps for the Kubernetes callbacks",
        parse=int, check=at_least(1), group="kubernetes")
    cluster_max_objects: int = setting(
        100_000, "KWSERVER_CLUSTER_MAX_OBJECTS", "Most Kubernetes objects the cluster cache holds over all its lists",
        parse=int, check=at_least(1), group="kubernetes")
    # What policies may make the server remember (kwserver/bounded_cache.py): entries and bytes of each cache.
    cluster_answer_cache_entries: int = setting(
        10_000, "KWSERVER_CLUSTER_ANSWER_CACHE_ENTRIES",
        "Most get_resource and can_i answers the cluster cache keeps (each for 5 s)", parse=int, check=at_least(0),
        group="kubernetes")
    cluster_answer_cache_mib: int = setting(
        64, "KWSERVER_CLUSTER_ANSWER_CACHE_MIB", "Most memory of the get_resource and can_i answers kept",
        parse=int, check=at_least(0), group="kubernetes")
    registry_answer_cache_entries: int = setting(
        1_000, "KWSERVER_REGISTRY_ANSWER_CACHE_ENTRIES",
        "Most OCI manifest and signature-verification answers one worker keeps (each for 60 s)",
        parse=int, check=at_least(0), group="sources")
    registry_answer_cache_mib: int = setting(
        16, "KWSERVER_REGISTRY_ANSWER_CACHE_MIB", "Most memory of the OCI and signature answers one worker keeps",
        parse=int, check=at_least(0), group="sources")
    kept_lists_mib: int = setting(
        32, "KWSERVER_KEPT_LISTS_MIB",
        "Most memory of the Kubernetes list answers one worker keeps to skip unchanged transfers",
        parse=int, check=at_least(0), group="kubernetes")
    default_host_capabilities: str = setting(
        "", "KWSERVER_DEFAULT_HOST_CAPABILITIES",
        "hostCapabilities of policies whose entry has none (written by controllers before 1.35): comma-separated "
        "patterns, e.g. '*'; empty: no host capability but logging, as the reference",
        check=lambda value: _host_capability_problem(split_patterns(value)), group="policies")
    log_level: str = setting("info", "KUBEWARDEN_LOG_LEVEL", f"Log level: {', '.join(LOG_LEVELS)}",
                             check=one_of(*LOG_LEVELS), group="telemetry")
    # `otlp` is what the Kubewarden controller sets when tracing is on: spans over OTLP, and text logs as
    # the reference also writes (kwserver/observability/otlp_traces.py).
    log_fmt: str = setting("text", "KUBEWARDEN_LOG_FMT",
                           "Log format: text, json or otlp (text logs, and spans exported over OTLP: OTEL_* variables)",
                           check=one_of("text", "json", "otlp"), group="telemetry")
    # kwserver's own settings.
    compile_cache_dir: str | None = setting(
        None, "KWSERVER_COMPILE_CACHE_DIR",
        "Directory of compiled modules (default: $XDG_CACHE_HOME/kwserver or ~/.cache/kwserver)", group="policies")
    policy_memory_limit_mib: int = setting(256, "KWSERVER_POLICY_MEMORY_LIMIT_MIB",
                                           "Maximum linear memory of one policy instance during an evaluation",
                                           parse=int, check=at_least(1), group="evaluation")
    instance_keep_memory_mib: int = setting(32, "KWSERVER_INSTANCE_KEEP_MEMORY_MIB",
                                            "Discard an instance after use when its memory grew beyond this",
                                            parse=int, check=at_least(0), group="evaluation")
    worker_instance_budget_mib: int = setting(
        512, "KWSERVER_WORKER_INSTANCE_BUDGET_MIB",
        "Memory of all idle instances kept by one worker; least recently used ones go first",
        parse=int, check=at_least(0), group="evaluation")
    # Unset: every evaluation starts from a new instance's state where that is as cheap as reusing one
    # (pre-initialised waPC modules, put back into that state after each evaluation); other instances are
    # reused. True: fresh for every module; false: reuse everywhere (docs/operations.md, "Instances").
    fresh_instance_per_request: bool | None = setting(
        None, "KWSERVER_FRESH_INSTANCE_PER_REQUEST",
        "Every evaluation starts from a new instance, for every module (default: where it is as cheap as reuse; "
        "false: reuse instances everywhere)", parse=parse_bool, group="evaluation")
    disable_preinitialisation: bool = setting(
        False, "KWSERVER_DISABLE_PREINITIALISATION",
        "Run every new instance's start-up (wapc_init, _start) instead of starting from a snapshot taken at boot",
        parse=parse_bool, group="evaluation")
    # What one client may cost a worker (kwserver/server/worker.py); none of it delays another client.
    header_timeout_seconds: float = setting(
        10.0, "KWSERVER_HEADER_TIMEOUT_SECONDS", "Answer 408 and close when request headers take longer than this",
        parse=float, check=above(0), group="connections")
    body_timeout_seconds: float = setting(
        30.0, "KWSERVER_BODY_TIMEOUT_SECONDS", "Answer 408 and close when a request body takes longer than this",
        parse=float, check=above(0), group="connections")
    keepalive_timeout_seconds: int = setting(
        75, "KWSERVER_KEEPALIVE_TIMEOUT_SECONDS",
        "Close a keep-alive connection idle for this long (the API server reuses its connections)",
        parse=int, check=at_least(1), group="connections")
    tls_handshake_timeout_seconds: float = setting(
        10.0, "KWSERVER_TLS_HANDSHAKE_TIMEOUT_SECONDS", "Close a connection whose TLS handshake takes longer than this",
        parse=float, check=above(0), group="connections")
    send_timeout_seconds: float = setting(
        30.0, "KWSERVER_SEND_TIMEOUT_SECONDS",
        "Close a connection whose client reads none of an answer for this long (its next requests wait unread)",
        parse=float, check=above(0), group="connections")
    max_connections_per_worker: int = setting(
        1024, "KWSERVER_MAX_CONNECTIONS_PER_WORKER",
        "Open connections one worker keeps (lowered to fit the open-files limit); beyond, the longest idle one "
        "is closed, or the new one gets 503 when none is idle",
        parse=int, check=at_least(1), group="connections")
    # The reference binds only the webhook and readiness ports; under hostNetwork a third one would be a
    # port of the node. So metrics go on the readiness listener unless a port of their own is asked for.
    metrics_port: int = setting(
        0, "KWSERVER_METRICS_PORT",
        "Port of a listener of their own for Prometheus /metrics and JSON /status (0: on the readiness listener)",
        parse=int, check=port_number, group="listeners")
    metric_series_limit: int = setting(
        2000, "KWSERVER_METRIC_SERIES_LIMIT",
        "Series per evaluation metric a worker keeps (labels come from requests); more are counted in one "
        "overflow series, otel_metric_overflow=\"true\"", parse=int, check=at_least(2), group="telemetry")
    min_workers: int | None = setting(None, "KWSERVER_MIN_WORKERS",
                                      "Fewest workers when the pool shrinks (default: --workers or its default)",
                                      parse=int, check=at_least(1), group="workers")
    max_workers: int | None = setting(
        None, "KWSERVER_MAX_WORKERS",
        "Most workers when the pool grows (default: --workers or its default); above min, the pool follows the load",
        parse=int, check=at_least(1), group="workers")
    scale_up_after_seconds: int = setting(
        3, "KWSERVER_SCALE_UP_AFTER_SECONDS",
        f"Add a worker after the workers were this long busier than {GROW_ABOVE:.0%}", parse=int, check=at_least(0),
        group="workers")
    scale_down_after_seconds: int = setting(
        30, "KWSERVER_SCALE_DOWN_AFTER_SECONDS",
        f"Remove a worker after the workers were this long less than {SHRINK_BELOW:.0%} busy",
        parse=int, check=at_least(0), group="workers")
    worker_max_uss_mib: int = setting(0, "KWSERVER_WORKER_MAX_USS_MIB",
                                      "Recycle a worker gracefully once its own memory (USS) exceeds this (0: never)",
                                      parse=int, check=at_least(0), group="workers")
    worker_max_requests: int = setting(
        0, "KWSERVER_WORKER_MAX_REQUESTS",
        "Recycle a worker gracefully after this many requests, with 10% jitter (0: never)",
        parse=int, check=at_least(0), group="workers")
    pid_file: str | None = setting(None, "KWSERVER_PID_FILE", "Write the master's pid here (used by `kwserver reload`)",
                                   group="process")
    # Where remote modules come from (kwserver/sources/).
    sources_path: str | None = setting(
        None, "KUBEWARDEN_SOURCES_PATH", "sources.yml: insecure_sources and per-host CAs (source_authorities)",
        group="sources")
    docker_config_json_path: str | None = setting(
        None, "KUBEWARDEN_DOCKER_CONFIG_JSON_PATH",
        "Directory of Docker's config.json with registry credentials (default: $DOCKER_CONFIG, ~/.docker)",
        group="sources")
    verification_path: str | None = setting(
        None, "KUBEWARDEN_VERIFICATION_CONFIG_PATH",
        "verification.yml: cosign signatures every registry module must carry (pubKey, keyless entries)",
        group="sources")
    download_timeout_seconds: float = setting(
        30.0, "KWSERVER_DOWNLOAD_TIMEOUT_SECONDS", "Give up on a registry or web server silent for this long",
        parse=float, check=above(0), group="sources")
    download_retries: int = setting(2, "KWSERVER_DOWNLOAD_RETRIES",
                                    "Retries of a download request after a transient failure (connection, 5xx)",
                                    parse=int, check=at_least(0), group="sources")
    max_module_size_mib: int = setting(128, "KWSERVER_MAX_MODULE_SIZE_MIB",
                                       "Refuse to download a module larger than this", parse=int, check=at_least(1),
                                       group="sources")
    # Accepted so that existing policy-server deployments start unchanged; see ServerSettings.ignored().
    sigstore_cache_dir: str | None = setting(None, "KUBEWARDEN_SIGSTORE_CACHE_DIR",
                                             "Sigstore TUF cache; unused: no Sigstore data is fetched at start",
                                             group="sources")
    sigstore_trust_config: str | None = setting(
        None, "KUBEWARDEN_SIGSTORE_TRUST_CONFIG_PATH",
        "Sigstore ClientTrustConfig or TrustedRoot JSON for keyless signatures (default: the public-good "
        "root shipped with kwserver)", group="sources")
    enable_metrics: bool = setting(
        False, "KUBEWARDEN_ENABLE_METRICS",
        "Also push the metrics over OTLP (OTEL_* variables); Prometheus /metrics serves them as well",
        parse=parse_bool, group="telemetry")
    enable_pprof: bool = setting(False, "KUBEWARDEN_ENABLE_PPROF", "Go-style profiling endpoints; not available",
                                 parse=parse_bool, group="telemetry")
    log_no_color: bool = setting(False, "NO_COLOR", "No colours in text logs (kwserver never colours them)",
                                 parse=parse_present, group="telemetry")
    # The reference's daemon mode (kwserver/server/detach.py).
    daemon: bool = setting(False, "KUBEWARDEN_DAEMON",
                           "Detach from the terminal and run in the background (see --daemon-pid-file)",
                           parse=parse_bool, group="process")
    daemon_pid_file: str = setting("policy-server.pid", "KUBEWARDEN_DAEMON_PID_FILE",
                                   "PID file of the detached master, used only with --daemon",
                                   group="process")
    daemon_stdout_file: str | None = setting(None, "KUBEWARDEN_DAEMON_STDOUT_FILE",
                                             "File the detached server's stdout goes to (default: /dev/null)",
                                             group="process")
    daemon_stderr_file: str | None = setting(None, "KUBEWARDEN_DAEMON_STDERR_FILE",
                                             "File the detached server's stderr (its log) goes to (default: /dev/null)",
                                             group="process")

    def __post_init__(self) -> None:
        for item in SETTINGS:
            problem = item.problem(getattr(self, item.name))
            if problem:
                raise ConfigError(problem)
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError("both certificate and key must be provided together")
        if self.client_ca_file and not self.cert_file:
            raise ConfigError("client CA certificate requires server certificate and key to be specified")
        if self.min_workers and self.max_workers and self.min_workers > self.max_workers:
            raise ConfigError(f"min_workers ({self.min_workers}) is above max_workers ({self.max_workers})")

    def ignored(self) -> list[str]:
        """Reference-server settings that are set but have no effect here, for a startup warning each."""
        notes = {
            "sigstore_cache_dir": "no Sigstore data is fetched at start (the trust root is --sigstore-trust-config "
                                  "or the one shipped with kwserver)",
            "enable_pprof": "profiling endpoints are not available",
        }
        return [f"{name.replace('_', '-')}: {note}" for name, note in notes.items() if getattr(self, name)]

    @property
    def metrics_listener_port(self) -> int:
        """Where /metrics and /status are served: their own port, or the readiness listener's."""
        return self.metrics_port or self.readiness_probe_port

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
        return self.cache_dirs[0]

    @property
    def cache_dirs(self) -> list[Path]:
        """Where compiled modules may go, best first. Under a read-only root filesystem (the Kubewarden
        controller's default) the home directory cannot be written, so the temporary directory follows."""
        if self.compile_cache_dir:
            return [Path(self.compile_cache_dir)]
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return [Path(base) / "kwserver", Path(tempfile.gettempdir()) / "kwserver-cache"]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ServerSettings:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            if setting.env in environ:
                try:
                    values[setting.name] = setting.parse(environ[setting.env])
                except ValueError as exc:
                    raise ConfigError(f"invalid value for {setting.env}: {exc}") from exc
        values.update(overrides)
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The environment that makes `from_env` rebuild these settings (for child processes)."""
        env = {}
        for setting in SETTINGS:
            value = getattr(self, setting.name)
            if setting.parse is parse_present and not value:
                continue  # for NO_COLOR, being set at all means yes
            if value is not None:
                env[setting.env] = ("true" if value else "false") if isinstance(value, bool) else str(value)
        return env

SETTINGS: tuple[Setting, ...] = tuple(
    Setting(f.name, f.metadata["setting"][0], f.default, *f.metadata["setting"][1:]) for f in fields(ServerSettings)
)


def help_text(setting: Setting) -> str:
    """`--help` line of a setting: what it does, its variable and its default."""
    shown = []
    if setting.default is not None and not setting.is_bool:
        shown.append(f"default: {setting.default}")
    shown.append(f"env: {setting.env}")
    return f"{setting.help} [{', '.join(shown)}]".replace("%", "%%")


def add_setting_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare every setting as a flag, in the `--help` section its group names. Unset flags stay None, so
    environment and defaults apply."""
    sections = {key: parser.add_argument_group(title) for key, title in SETTING_GROUPS.items()}
    for setting in SETTINGS:
        if setting.group not in sections:  # a setting that names no group still gets a flag
            sections[setting.group] = parser.add_argument_group("other settings")
        section = sections[setting.group]
        text = argparse.SUPPRESS if setting.hidden else help_text(setting)
        if setting.is_bool:
            section.add_argument(setting.flag, dest=setting.name, action="store_true", default=None, help=text)
        else:
            section.add_argument(setting.flag, dest=setting.name, type=setting.parse, default=None, help=text)


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
    # An extension: instances of its own instead of sharing them with policies on the same module.
    own_instance: bool = False
    # The host calls it may make (patterns, kwserver.host_capabilities); None: the entry has no
    # `hostCapabilities` key, so the server's --default-host-capabilities apply.
    host_capabilities: tuple[str, ...] | None = None
    warnings: tuple[str, ...] = field(default=(), compare=False)  # unknown keys, ignored


@dataclass(frozen=True)
class PolicyGroupSpec:
    name: str
    expression: str
    message: str
    members: dict[str, PolicySpec]
    tree: Node | None  # None when the expression is invalid (then `expression_error` says why)
    policy_mode: str = "protect"
    expression_error: str | None = None
    warnings: tuple[str, ...] = field(default=(), compare=False)  # unknown keys, ignored


PolicyEntry = PolicySpec | PolicyGroupSpec

_CONTROLLER_KEYS = {"namespacedName"}  # written by the Kubewarden controller, read by no server
_POLICY_KEYS = {"module", "policyMode", "allowedToMutate", "settings", "contextAwareResources", "message",
                "timeoutEvalSeconds", "entrypoint", "ownInstance", "hostCapabilities", *_CONTROLLER_KEYS}
_GROUP_KEYS = {"policies", "expression", "message", "policyMode", *_CONTROLLER_KEYS}
_MEMBER_KEYS = {"module", "settings", "contextAwareResources", "timeoutEvalSeconds", "entrypoint", "ownInstance",
                "hostCapabilities"}


# Policy keys that mean nothing in a group member, and why.
_GROUP_LEVEL_KEYS = {
    "policyMode": "a member has no mode of its own: the group's `policyMode` applies",
    "allowedToMutate": "group members never mutate",
    "message": "the group's `message` applies",
}


def _unknown_keys(doc: dict[str, Any], known: set[str], where: str,
                  misplaced: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """A warning for each key of `doc` that is not in `known`, naming the closest known key (or, for a key
    in `misplaced`, why it does not belong here).

    Unknown keys are ignored, never refused: the reference ignores them in policies, and a newer
    controller may write keys this server does not know yet. A misspelt `policyMode` silently means
    protect mode, so the user is told which key was probably meant."""
    by_lower = {key.lower(): key for key in known}
    warnings = []
    for key in sorted(str(key) for key in doc if key not in known):
        if misplaced and key in misplaced:
            hint = f": {misplaced[key]}"
        else:
            close = difflib.get_close_matches(key.lower(), by_lower, n=1, cutoff=0.6)
            hint = f"; did you mean `{by_lower[close[0]]}`?" if close else ""
        warnings.append(f"{where}: unknown key `{key}` is ignored{hint}")
    return tuple(warnings)


def entry_warnings(entries: Mapping[str, PolicyEntry]) -> list[str]:
    """What parsing noticed but did not refuse, for every entry and group member."""
    warnings: list[str] = []
    for entry in entries.values():
        warnings.extend(entry.warnings)
        if isinstance(entry, PolicyGroupSpec):
            for member in entry.members.values():
                warnings.extend(member.warnings)
    return warnings


def _settings(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"invalid type: settings must be a map, found {type(value).__name__}")
    try:  # handed to the policy as JSON: YAML's integer keys, sets or binary have no JSON form
        orjson.dumps(value)
    except TypeError as exc:
        raise ConfigError(f"invalid settings: not representable as JSON ({exc})") from exc
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


def _own_instance(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: `ownInstance` must be a boolean")
    return value


def _host_capabilities(doc: dict[str, Any], where: str) -> tuple[str, ...] | None:
    """The patterns as written (checked when the policy loads); None when the key is absent."""
    if "hostCapabilities" not in doc:
        return None
    value = doc["hostCapabilities"]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(f"{where}: `hostCapabilities` must be a list of strings, found {value!r:.80}")
    return tuple(value)


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
        own_instance=_own_instance(doc.get("ownInstance", False), f"policy '{name}'"),
        host_capabilities=_host_capabilities(doc, f"policy '{name}'"),
        warnings=_unknown_keys(doc, _POLICY_KEYS, f"policy '{name}'"),
    )


def _parse_group(name: str, doc: dict[str, Any], tolerate_invalid_expression: bool) -> PolicyGroupSpec:
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
        member_id = f"{name}/{member}"
        members[member] = PolicySpec(
            name=member_id,
            module=_module(member_doc.get("module"), f"policy group '{name}' member '{member}'"),
            settings=_settings(member_doc.get("settings")),
            context_aware_resources=_resources(member_doc.get("contextAwareResources")),
            timeout_eval_seconds=_timeout(member_doc.get("timeoutEvalSeconds")),
            entrypoint=_entrypoint(member_doc.get("entrypoint"), f"policy group '{name}' member '{member}'"),
            own_instance=_own_instance(member_doc.get("ownInstance", False),
                                       f"policy group '{name}' member '{member}'"),
            host_capabilities=_host_capabilities(member_doc, f"policy group '{name}' member '{member}'"),
            warnings=_unknown_keys(member_doc, _MEMBER_KEYS, f"policy group '{name}' member '{member}'",
                                   _GROUP_LEVEL_KEYS),
        )
    expression, message = doc["expression"], doc["message"]
    if not isinstance(expression, str) or not isinstance(message, str):
        raise ConfigError(f"policy group '{name}': `expression` and `message` must be strings")
    tree, expression_error = None, None
    try:
        tree = compile_expression(expression, members)
    except ExpressionError as exc:
        expression_error = f"policy group '{name}': invalid expression {expression!r}: {exc}"
        if not tolerate_invalid_expression:
            raise ConfigError(expression_error) from exc
    return PolicyGroupSpec(
        name=name, expression=expression, message=message, members=members, tree=tree,
        policy_mode=_policy_mode(doc.get("policyMode")), expression_error=expression_error,
        warnings=_unknown_keys(doc, _GROUP_KEYS, f"policy group '{name}'"),
    )


def parse_policies(doc: Any, *, tolerate_invalid_expressions: bool = False) -> dict[str, PolicyEntry]:
    """Validate a parsed policies.yml document into policies and policy groups.

    An invalid group expression is a configuration error, unless `tolerate_invalid_expressions`
    (`--continue-on-errors`): then the group carries the error and becomes an initialisation error.
    """
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
        entries[name] = (_parse_policy(name, entry) if "module" in entry
                         else _parse_group(name, entry, tolerate_invalid_expressions))
    return entries


NO_POLICIES = ("it holds no policy (an empty or truncated file would answer 404 to every request); "
               "a server needs at least one")


def load_policies(path: str | os.PathLike[str], *,
                  tolerate_invalid_expressions: bool = False) -> dict[str, PolicyEntry]:
    """The policies of a policies.yml file; ConfigError when it cannot be used, an empty one included."""
    try:
        with open(path, encoding="utf-8") as stream:
            doc = yaml.safe_load(stream)
        entries = parse_policies(doc, tolerate_invalid_expressions=tolerate_invalid_expressions)
        if not entries:
            raise ConfigError(NO_POLICIES)
        return entries
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ConfigError) as exc:
        raise ConfigError(f'error while loading policies from "{path}": {exc}') from exc
