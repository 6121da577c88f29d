"""`kwserver run`: evaluate one request offline, as `kwctl run` does.

The module is loaded as `serve` loads it (`kwserver.sources` through `kwserver.evaluation.bootstrap`, settings
validated the same way) and the request goes through the server's own pipeline (`AdmissionService`: evaluation,
then the post-processing of /validate, or of /validate_raw for raw policies) on one fresh instance. Flags,
output and exit codes are kwctl's: the AdmissionResponse as one JSON line on stdout, logs on stderr, exit 0
whenever the evaluation ran (accepted or rejected), 1 with `Error: <why>` on stderr when it could not.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import yaml

from kwserver.config import ConfigError, ContextAwareResource, PolicyEntry, PolicySpec, ServerSettings, parse_policies
from kwserver.evaluation.modes import CLI_NAMES

log = logging.getLogger(__name__)

POLICY_FROM_CLI = "policy-from-cli"  # kwctl's id for the policy named on the command line
CRD_API_VERSION = "policies.kubewarden.io/v1"
CRD_KINDS = ("AdmissionPolicy", "ClusterAdmissionPolicy", "AdmissionPolicyGroup", "ClusterAdmissionPolicyGroup")
_HAS_SCHEME = re.compile(r"^\w+://")

REQUEST_SHAPE = (
    'expected an AdmissionReview ({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", '
    '"request": {...}}) or its bare request (an AdmissionRequest: uid, kind, resource, operation, userInfo, '
    "object, ...)")
POLICY_SHAPES = (
    "a Wasm module (path, file://, registry:// or https:// URL), a YAML file of Kubewarden policy resources "
    f"(apiVersion {CRD_API_VERSION}, kind {', '.join(CRD_KINDS)}) or a policies.yml")

DESCRIPTION = """\
Evaluate one request with a Kubewarden policy, offline, and print the AdmissionResponse (kwctl run).

The policy is given as
  - a path or a file:// URL of a Wasm module (relative to the current directory),
  - a registry:// or https:// URL, fetched as `kwserver serve` fetches modules,
  - a YAML file (.yml, .yaml) of Kubewarden policy resources (AdmissionPolicy, ClusterAdmissionPolicy and
    their groups): each is evaluated with the same request, with its settings, mode, mutating flag, message
    and (cluster-wide kinds) contextAwareResources; --settings-* are ignored and --raw is refused,
  - a policies.yml, as `kwserver serve` reads it (an extension): each of its policies and groups is
    evaluated with the same request, in the file's order.

The request (-r) is an AdmissionReview as the API server sends it, or its bare `request`, in JSON:
  {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
   "request": {"uid": "...", "kind": {...}, "resource": {...}, "operation": "CREATE", "userInfo": {...},
               "object": {...}, ...}}
With --raw (or a raw policy), any JSON document.

A policy named on the command line may mutate and runs in protect mode, as in kwctl.
Exit status: 0 when the request was evaluated (accepted or not), 1 when it could not be.
"""


class RunError(Exception):
    """Why the evaluation could not run; printed as kwctl prints its errors."""


def add_parser(commands: Any) -> None:
    """Register `run` on the `kwserver` subcommands."""
    run = commands.add_parser("run", help="evaluate one request offline, as `kwctl run` does",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--allow-context-aware", action="store_true",
                     help="Grant the Kubernetes resources listed in the policy's contextAwareResources metadata")
    run.add_argument("--allowed-host-capabilities", metavar="PATTERN", nargs="*", action="extend",
                     help="Host capabilities the policy (every policy of a YAML file) may use; repeatable. "
                          "Examples: 'oci/*', 'net/v1/dns_lookup_host'; none given: none but logging "
                          "[default: *]")
    run.add_argument("--cert-email", metavar="VALUE", help="Expected email in Fulcio certificate")
    run.add_argument("--cert-oidc-issuer", metavar="VALUE",
                     help="Expected OIDC issuer in Fulcio certificates")
    run.add_argument("--disable-wasmtime-cache", action="store_true",
                     help="Compile the module afresh instead of using the compiled-module cache")
    run.add_argument("--docker-config-json-path", metavar="DOCKER_CONFIG",
                     help="Directory of a Docker config.json with registry credentials")
    run.add_argument("-e", "--execution-mode", metavar="MODE", choices=sorted(CLI_NAMES),
                     help=f"The runtime of a module without metadata: {', '.join(CLI_NAMES)} "
                          "(must agree with the metadata when there is some)")
    run.add_argument("--github-owner", metavar="VALUE",
                     help="GitHub owner expected in the certificates")
    run.add_argument("--github-repo", metavar="VALUE",
                     help="GitHub repository expected in the certificates")
    run.add_argument("--raw", action="store_true", help="Validate a raw request (any JSON document)")
    host = run.add_mutually_exclusive_group()
    host.add_argument("--record-host-capabilities-interactions", metavar="FILE",
                      help="Record the policy's host-capability calls and their answers to FILE")
    host.add_argument("--replay-host-capabilities-interactions", metavar="FILE",
                      help="Answer the policy's host-capability calls from FILE (recorded by kwctl or kwserver); "
                           "nothing is asked of DNS, registries or Kubernetes")
    run.add_argument("-r", "--request-path", metavar="PATH", required=True,
                     help="File of the AdmissionReview (or its bare AdmissionRequest) in JSON; - for stdin")
    run.add_argument("--settings-json", metavar="VALUE", help="JSON string containing the settings for this policy")
    run.add_argument("-s", "--settings-path", metavar="PATH",
                     help="File (YAML or JSON) containing the settings for this policy")
    run.add_argument("--sigstore-trust-config", metavar="PATH",
                     help="Sigstore ClientTrustConfig or TrustedRoot JSON for keyless signatures (default: the "
                          "public-good root shipped with kwserver)")
    run.add_argument("--sources-path", metavar="PATH",
                     help="YAML file holding source information (https, registry insecure hosts, custom CAs...)")
    run.add_argument("--verification-config-path", "--verification-path", dest="verification_config_path",
                     metavar="PATH", help="verification.yml: signatures the policy must carry (keys, keyless)")
    run.add_argument("-a", "--verification-annotation", metavar="KEY=VALUE", action="append",
                     help="Annotation the signatures must carry")
    run.add_argument("-k", "--verification-key", metavar="PATH", action="append",
                     help="Public key (PEM file) the policy must be signed with")
    # kwserver's own.
    run.add_argument("--timeout", metavar="SECONDS", type=int,
                     help="Interrupt the evaluation after this many seconds (default: never, as kwctl)")
    run.add_argument("--policies-download-dir", metavar="DIR",
                     help="Download directory for remote modules, as `serve` uses it "
                          "[env: KUBEWARDEN_POLICIES_DOWNLOAD_DIR]")
    # kwctl's global flags, accepted here so `kwctl -v run ...` maps onto `kwserver run -v ...`.
    run.add_argument("-v", "--verbose", action="store_true", help="Debug logs")
    run.add_argument("--no-color", action="store_true", help="No colours in logs (kwserver never colours them)")
    run.add_argument("module", metavar="uri_or_yaml_file",
                     help="Policy module (path, file://, registry://, https://), YAML file of policy resources, "
                          "or a policies.yml")
    run.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from kwserver.logs import configure_logging

    configure_logging("debug" if args.verbose else "info")
    try:
        for response in evaluate(args):
            print(orjson.dumps(response).decode(), flush=True)
    except RunError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    return 0


# --- reading the inputs ----------------------------------------------------------------------------

def _os_error(exc: OSError) -> str:
    """Rust's text of an I/O error, which kwctl shows."""
    return f"{exc.strerror} (os error {exc.errno})" if exc.errno else str(exc)


def read_request(path: str) -> Any:
    if path == "-":
        try:
            text = sys.stdin.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise RunError(f"Error reading request from stdin: {exc}") from exc
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise RunError(f"Error opening request file {path}; {_os_error(exc)}") from exc
        except UnicodeDecodeError as exc:
            raise RunError(f"Error opening request file {path}; {exc}") from exc
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise RunError(str(exc)) from exc


def settings_object(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RunError("Invalid settings in CRD, not an object")
    return value


def parse_settings_file(text: str, path: str) -> Any:
    """JSON or YAML. JSON first: PyYAML refuses the tab indentation that JSON files (and kwctl) allow."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RunError(f"Cannot parse settings file {path}: {exc}") from exc


def read_settings(args: argparse.Namespace) -> dict[str, Any]:
    if args.settings_path:
        try:
            text = Path(args.settings_path).read_text(encoding="utf-8")
        except OSError as exc:
            raise RunError(f"Cannot open settings file {args.settings_path}: {_os_error(exc)}") from exc
        value = parse_settings_file(text, args.settings_path)
    elif args.settings_json is not None:
        try:
            value = orjson.loads(args.settings_json)
        except orjson.JSONDecodeError as exc:
            raise RunError(f"Cannot parse settings JSON: {exc}") from exc
    else:
        value = None
    return settings_object(value)


def module_reference(uri: str) -> str:
    """kwctl's lookup: a URL as it is, else an existing path (made absolute), else nothing."""
    if _HAS_SCHEME.match(uri):
        return uri
    path = Path(uri)
    if path.exists():
        return str(path.resolve())
    raise RunError(f"Cannot find policy with uri: {uri}")


def is_yaml_file(uri: str) -> bool:
    return uri.endswith((".yaml", ".yml"))


def _rust_option(value: Any) -> str:
    return "None" if value is None else f'Some("{value}")'


def _crd_member(member: str, doc: Any, cluster: bool) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise RunError(f"policy group member {member} must be a map")
    entry = {"module": doc.get("module"), "settings": settings_object(doc.get("settings"))}
    if cluster and doc.get("contextAwareResources"):
        entry["contextAwareResources"] = doc["contextAwareResources"]
    return entry


def crd_entry(doc: Any) -> tuple[str, dict[str, Any]]:
    """One Kubewarden policy resource as a policies.yml entry (the fields kwctl evaluates)."""
    if not isinstance(doc, dict):
        raise RunError(f"cannot extract ObjectReference: expected a map; the policy is {POLICY_SHAPES}")
    if doc.get("apiVersion") != CRD_API_VERSION:
        raise RunError(f"invalid apiVersion {_rust_option(doc.get('apiVersion'))}: the policy is {POLICY_SHAPES}")
    kind = doc.get("kind")
    if kind not in CRD_KINDS:
        raise RunError(f"unknown kind {_rust_option(kind)}, not a Kubewarden policy; the policy is {POLICY_SHAPES}")
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        raise RunError(f"CRD does not have spec, but it is required for {kind}")
    name = str((doc.get("metadata") or {}).get("name") or "crd-without-name")
    cluster = kind.startswith("Cluster")
    entry: dict[str, Any] = {"policyMode": spec.get("mode") or "protect"}
    if kind.endswith("Group"):
        members = spec.get("policies")
        if not isinstance(members, dict):
            raise RunError(f"{kind} {name}: `spec.policies` must be a map")
        entry["policies"] = {str(m): _crd_member(str(m), d, cluster) for m, d in members.items()}
        entry["expression"] = spec.get("expression")
        entry["message"] = spec.get("message")
    else:
        entry.update(module=spec.get("module"), settings=settings_object(spec.get("settings")),
                     allowedToMutate=bool(spec.get("mutating", False)))
        if spec.get("message") is not None:
            entry["message"] = spec["message"]
        if cluster and spec.get("contextAwareResources"):
            entry["contextAwareResources"] = spec["contextAwareResources"]
    return name, entry


def is_policies_yml(documents: list[Any]) -> bool:
    """A policies.yml rather than policy resources: one map of names to entries, none a resource."""
    return (len(documents) == 1 and isinstance(documents[0], dict) and "apiVersion" not in documents[0]
            and all(isinstance(entry, dict) and ("module" in entry or "policies" in entry)
                    for entry in documents[0].values()))


def yaml_entries(path: str) -> tuple[dict[str, PolicyEntry], Path]:
    """The policies of a YAML file of policy resources or of a policies.yml, and the directory their relative
    module paths are resolved against (kwctl's: the current one; a policies.yml's: its own, as `serve`)."""
    try:
        documents = [doc for doc in yaml.safe_load_all(Path(path).read_text(encoding="utf-8")) if doc is not None]
    except OSError as exc:
        raise RunError(f'Cannot open YAML file "{path}": {_os_error(exc)}') from exc
    except yaml.YAMLError as exc:
        raise RunError(f'Cannot parse YAML file "{path}": {exc}') from exc
    if is_policies_yml(documents):
        try:
            entries, base_dir = parse_policies(documents[0]), Path(path).resolve().parent
        except ConfigError as exc:
            raise RunError(f"{path}: {exc}") from exc
    else:
        entries, base_dir = crd_entries(path, documents), Path.cwd()
    if not entries:
        raise RunError(f"{path} holds no policy: the policy is {POLICY_SHAPES}")
    return entries, base_dir


def crd_entries(path: str, documents: list[Any]) -> dict[str, PolicyEntry]:
    config: dict[str, Any] = {}
    for document in documents:
        name, entry = crd_entry(document)
        if name in config:
            raise RunError(f"{path} declares two policies named {name}")
        config[name] = entry
    try:
        return parse_policies(config)
    except ConfigError as exc:
        raise RunError(f"{path}: {exc}") from exc


def policy_entries(args: argparse.Namespace) -> tuple[dict[str, PolicyEntry], Path]:
    """The policies to evaluate and the directory their relative module paths are resolved against."""
    if is_yaml_file(args.module):
        if args.raw:
            raise RunError(f"The --raw option cannot be used with a YAML file: {args.module}")
        if args.settings_json is not None or args.settings_path:
            log.info("The --settings-json and --settings-path options are ignored when using a YAML file")
        return yaml_entries(args.module)
    spec = PolicySpec(name=POLICY_FROM_CLI, module=module_reference(args.module), settings=read_settings(args),
                      allowed_to_mutate=True)
    return {spec.name: spec}, Path.cwd()


def run_settings(args: argparse.Namespace, compile_cache_dir: str | None,
                 verification_path: str | None = None) -> ServerSettings:
    """Server settings for one run: `serve`'s environment and defaults, kwctl's flags over them."""
    overrides: dict[str, Any] = {"disable_timeout_protection": args.timeout is None}
    if args.timeout is not None:
        overrides["policy_timeout"] = args.timeout
    for name in ("sources_path", "docker_config_json_path", "policies_download_dir"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if verification_path or args.verification_config_path:
        overrides["verification_path"] = verification_path or args.verification_config_path
    if args.sigstore_trust_config:
        overrides["sigstore_trust_config"] = args.sigstore_trust_config
    if compile_cache_dir:
        overrides["compile_cache_dir"] = compile_cache_dir
    try:
        return ServerSettings.from_env(**overrides)
    except ConfigError as exc:
        raise RunError(str(exc)) from exc


def flags_verification(args: argparse.Namespace) -> dict[str, Any] | None:
    """kwctl's verification flags as a verification.yml document, with kwctl's rules and messages."""
    keys, items = args.verification_key or [], args.verification_annotation or []
    if not (keys or items or args.cert_email or args.cert_oidc_issuer or args.github_owner or args.github_repo):
        return None
    if args.verification_config_path:
        raise RunError("verification-config-path cannot be used in conjunction with other verification flags")
    annotations = dict(item.split("=", 1) for item in items if "=" in item) or None
    if annotations and not (keys or args.cert_email or args.cert_oidc_issuer or args.github_owner):
        raise RunError("Intending to verify annotations, but no verification keys, OIDC issuer or GitHub owner "
                       "were passed")
    if args.github_repo and not args.github_owner:
        raise RunError("Intending to verify GitHub actions signature, but the repository owner is missing.")
    if bool(args.cert_email) != bool(args.cert_oidc_issuer):
        raise RunError("Intending to verify OIDC issuer, but no email or issuer were provided. You must pass the "
                       "email and OIDC issuer to be validated together ")
    signatures: list[dict[str, Any]] = []
    if args.cert_email:
        signatures.append({"kind": "genericIssuer", "issuer": args.cert_oidc_issuer,
                           "subject": {"equal": args.cert_email}, "annotations": annotations})
    if args.github_owner:
        signatures.append({"kind": "githubAction", "owner": args.github_owner, "repo": args.github_repo,
                           "annotations": annotations})
    for path in keys:
        try:
            signatures.append({"kind": "pubKey", "key": Path(path).read_text(), "annotations": annotations})
        except OSError as exc:
            raise RunError(f"could not read file {path}: {exc.strerror or exc}") from None
    return {"apiVersion": "v1", "allOf": signatures}


# --- evaluating ------------------------------------------------------------------------------------

def boot_error_text(errors: dict[str, str], invalid_settings: dict[str, str]) -> str:
    """Loading problems first (kwctl pulls every module before validating settings), then settings."""
    others = [error for name, error in errors.items() if name not in invalid_settings]
    if others:
        return "\n".join(others)
    return "Provided settings are not valid: " + "; ".join(invalid_settings.values())


def evaluation_request(doc: Any, raw: bool) -> Any:
    """What kwctl accepts: for raw policies any JSON document; otherwise an AdmissionRequest, bare or in an
    AdmissionReview."""
    from kwserver import admission

    if raw:
        return admission.parse_raw_review({"request": doc})
    if not isinstance(doc, dict):
        raise RunError(f"Invalid request object: {REQUEST_SHAPE}")
    if doc.get("kind") == "AdmissionReview":
        if "request" not in doc:
            raise RunError(f"invalid AdmissionReview object: it has no `request`; {REQUEST_SHAPE}")
        doc = doc["request"]
    try:
        return admission.parse_admission_review({"request": doc})
    except admission.RequestShapeError as exc:
        hint = REQUEST_SHAPE
        if "request" in doc and "uid" not in doc:
            hint = ("a document is read as an AdmissionReview only when its `kind` is AdmissionReview, and "
                    f"otherwise as a bare request; {REQUEST_SHAPE}")
        raise RunError(f"cannot build AdmissionRequest object from given input: {exc}; {hint}") from exc


def granted_resources(policy: Any, args: argparse.Namespace, from_cli: bool) -> tuple[ContextAwareResource, ...]:
    """kwctl's allow-list: a resource's own list, or for a policy named on the command line its metadata's
    list with --allow-context-aware and nothing without."""
    if not from_cli:
        return policy.spec.context_aware_resources
    metadata = policy.module.metadata
    wanted = tuple(ContextAwareResource(str(r.get("apiVersion")), str(r.get("kind")))
                   for r in metadata.context_aware_resources if isinstance(r, dict))
    if args.allow_context_aware:
        if metadata.inferred:
            log.info("Policy is not annotated, access to Kubernetes resources is not allowed")
        return wanted
    if wanted:
        log.warning("Policy requires access to Kubernetes resources at evaluation time. During this execution the "
                    "access to Kubernetes resources is denied. This can cause the policy to not behave properly")
        log.warning("Carefully review which types of Kubernetes resources the policy needs via the `inspect` "
                    "command, then run the policy using the `--allow-context-aware` flag.")
    return ()


def host_handler(args: argparse.Namespace, replayed: list[Any] | None) -> Any:
    from kwserver.capabilities import DirectHandler
    from kwserver.commands.host_sessions import RecordSession, ReplaySession

    if replayed is not None:
        return ReplaySession(replayed)
    if args.record_host_capabilities_interactions:
        return RecordSession(args.record_host_capabilities_interactions)
    return DirectHandler()


def allowed_host_capabilities(args: argparse.Namespace) -> Any:
    """kwctl's grant for every policy of a run: `--allowed-host-capabilities`, everything when not given."""
    from kwserver.host_capabilities import PatternError, parse

    try:
        return parse(["*"] if args.allowed_host_capabilities is None else args.allowed_host_capabilities)
    except PatternError as exc:
        raise RunError(f"Invalid host capabilities pattern: {exc}") from exc


def bind_host_handler(registry: Any, name: str, handler: Any, args: argparse.Namespace) -> None:
    """Give the policy (or every member of the group) `name` its allow-lists and this run's host handler."""
    from kwserver.capabilities import Capabilities

    members = [name] if name in registry.policies else [f"{name}/{m}" for m in registry.groups[name].members]
    for member in members:
        policy = registry.policies[member]
        granted = granted_resources(policy, args, from_cli=name == POLICY_FROM_CLI)
        if granted and args.replay_host_capabilities_interactions is None:
            listed = ", ".join(f"{r.api_version}/{r.kind}" for r in granted)
            raise RunError(f"policy {member} is granted access to Kubernetes resources ({listed}), but this build "
                           "has no Kubernetes client: replay recorded answers with "
                           "--replay-host-capabilities-interactions FILE")
        registry.policies[member] = replace(
            policy, spec=replace(policy.spec, context_aware_resources=granted),
            capabilities=Capabilities(member, granted, handler, policy.capabilities.registries,
                                      allowed_host_capabilities(args)))


def evaluate(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """The AdmissionResponse of every policy named by `args`, in order; RunError when one cannot run."""
    from kwserver.commands.host_sessions import SessionError, load_session
    from kwserver.evaluation import EvaluationError, Evaluator, InstancePool
    from kwserver.evaluation.bootstrap import BootError, assemble_registry
    from kwserver.runtime.engine import EpochTicker
    from kwserver.server.service import VALIDATE, VALIDATE_RAW, AdmissionService

    verification = flags_verification(args)
    allowed_host_capabilities(args)  # a bad pattern is refused before anything is read or fetched
    request_doc = read_request(args.request_path)
    replayed = None
    if args.replay_host_capabilities_interactions:
        try:
            replayed = load_session(args.replay_host_capabilities_interactions)
        except SessionError as exc:
            raise RunError(str(exc)) from exc
    entries, base_dir = policy_entries(args)
    execution_mode = CLI_NAMES[args.execution_mode].name if args.execution_mode else None
    with tempfile.TemporaryDirectory(prefix="kwserver-run-") as scratch:
        verification_path = None
        if verification is not None:
            verification_path = str(Path(scratch) / "verification.yml")
            Path(verification_path).write_text(yaml.safe_dump(verification, sort_keys=False))
        settings = run_settings(args, scratch if args.disable_wasmtime_cache else None, verification_path)
        try:
            registry, _ = assemble_registry(entries, base_dir, settings, execution_mode=execution_mode)
        except BootError as exc:
            raise RunError(boot_error_text(exc.errors, exc.report.invalid_settings)) from exc
        except ConfigError as exc:
            raise RunError(str(exc)) from exc
        # One request, one instance: nothing is kept for a next evaluation.
        service = AdmissionService(registry, Evaluator(registry, InstancePool(
            registry, reuse=False, keep_bytes=0, budget_bytes=0)))
        ticker = EpochTicker(registry.engine)
        if registry.engine_options.epoch_interruption:
            ticker.start()
        try:
            for name in registry.top_level_names:
                policy = registry.policies.get(name)
                raw = policy is not None and (args.raw or policy.module.metadata.policy_type == "raw")
                request = evaluation_request(request_doc, raw)
                if len(registry.top_level_names) > 1:
                    log.info("%s:", name)  # which policy the next line of stdout answers
                if policy is not None:
                    log.debug("evaluating %s: module %s (sha256 %s), execution mode %s%s", name, policy.module.source,
                              policy.module.digest, policy.module.execution_mode, ", raw request" if raw else "")
                handler = host_handler(args, replayed)
                bind_host_handler(registry, name, handler, args)
                try:
                    response = service.review(name, request, VALIDATE_RAW if raw else VALIDATE)
                except EvaluationError as exc:
                    raise RunError(str(exc)) from exc
                finally:
                    handler.finish()
                yield response
        finally:
            ticker.stop()
