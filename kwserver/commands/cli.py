"""The `kwserver` command: serve, check, annotate, inspect, top, reload, run."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import orjson
import yaml

from kwserver import KUBEWARDEN_COMPAT_VERSION, __version__
from kwserver.commands import manifests, offline
from kwserver.config import ConfigError, ServerSettings, add_setting_arguments, settings_from_args
from kwserver.evaluation.modes import annotate, read_metadata
from kwserver.metadata import MetadataError, WasmFormatError


def _version_text() -> str:
    from kwserver.runtime.engine import WASMTIME_VERSION
    from kwserver.runtime.opa_builtins import implemented_names

    builtins = "\n".join(f"  - {name}" for name in implemented_names())
    return (f"kwserver {__version__} (Kubewarden policy-server {KUBEWARDEN_COMPAT_VERSION} compatible, "
            f"wasmtime {WASMTIME_VERSION})\n\nOpen Policy Agent/Gatekeeper implemented builtins:\n{builtins}")


def cmd_serve(args: argparse.Namespace) -> int:
    from kwserver.server.daemon import serve

    serve(settings_from_args(args), gunicorn_config=args.gunicorn_config)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Load, compile and validate a configuration exactly as `serve` would, then report."""
    from kwserver.evaluation.bootstrap import BootError, build_registry
    from kwserver.logs import configure_logging

    settings = settings_from_args(args)
    configure_logging("warn")
    # What the boot finds is printed below, once; its log lines would say it twice.
    logging.getLogger("kwserver.evaluation.bootstrap").setLevel(logging.CRITICAL)
    try:
        registry, report = build_registry(ServerSettings(**{**settings.__dict__, "continue_on_errors": True}))
    except (ConfigError, BootError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name in registry.top_level_names:
        status = "ok"
        if name in registry.init_errors:
            status = f"ERROR: {report.describe(name, registry.init_errors[name])}"
        elif name in registry.groups:
            member_errors = [report.describe(m, e) for m, e in registry.init_errors.items()
                             if m.startswith(f"{name}/")]
            status = "ERROR: " + "; ".join(member_errors) if member_errors else "ok (group)"
        print(f"{name}: {status}")
    for warning in report.warnings:
        print(f"warning: {warning}")
    print(f"{len(registry.top_level_names)} entries, {report.unique_modules} unique modules, "
          f"{len(registry.init_errors)} error(s), {report.seconds:.2f}s")
    return 1 if registry.init_errors else 0


def cmd_annotate(args: argparse.Namespace) -> int:
    try:
        metadata = yaml.safe_load(Path(args.metadata).read_text())
        wasm = Path(args.module).read_bytes()
        annotated = annotate(wasm, metadata)
    except (OSError, yaml.YAMLError, MetadataError, WasmFormatError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    Path(args.output).write_bytes(annotated)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    try:
        metadata = read_metadata(Path(args.module).read_bytes())
    except (OSError, MetadataError, WasmFormatError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if metadata is None:
        print(f"error: {args.module} has no io.kubewarden.metadata section", file=sys.stderr)
        return 1
    print(orjson.dumps(metadata.to_json(), option=orjson.OPT_INDENT_2).decode())
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from kwserver.commands.pull_push import pull
    from kwserver.sources import SourceError

    try:
        fetched = pull(settings_from_args(args), args.reference)
    except SourceError as exc:
        print(f"error: Error while downloading policy from {args.reference}: {exc}", file=sys.stderr)
        return 1
    print(f"{fetched.path}\nsha256:{fetched.digest}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from kwserver.commands.pull_push import push
    from kwserver.sources import SourceError

    try:
        reference, digest = push(settings_from_args(args), Path(args.module), args.destination)
    except SourceError as exc:
        print(f"error: cannot push {args.module} to {args.destination}: {exc}", file=sys.stderr)
        return 1
    print(f"{reference.registry}/{reference.repository}@{digest}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from kwserver.sources import SourceError
    from kwserver.sources.fetcher import ModuleFetcher
    from kwserver.sources.references import parse_reference

    settings = settings_from_args(args)
    if not settings.verification_path:
        print("error: kwserver verify needs --verification-path", file=sys.stderr)
        return 2
    fetcher = ModuleFetcher.from_settings(settings, Path.cwd())
    try:
        digest = fetcher.verify(parse_reference(args.reference, Path.cwd()))
    except SourceError as exc:
        print(f"error: Policy '{args.reference}' cannot be verified: {exc}", file=sys.stderr)
        return 1
    print(f"verified {args.reference}: {digest}")
    return 0


def cmd_sigstore_trust_root(args: argparse.Namespace) -> int:
    from kwserver.sources import sigstore_trust

    try:
        if args.refresh:
            root = sigstore_trust.refresh(args.tuf_url or sigstore_trust.PUBLIC_GOOD_TUF_URL,
                                          Path(args.tuf_root or sigstore_trust.SHIPPED_TUF_ROOT),
                                          Path(args.output or sigstore_trust.SHIPPED_TRUSTED_ROOT))
        else:
            root = sigstore_trust.load_trust_root(settings_from_args(args).sigstore_trust_config)
    except sigstore_trust.TrustRootError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(sigstore_trust.describe(root))
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    from kwserver.observability.discovery import DiscoveryError, choose, master_with_pid, running_masters
    from kwserver.observability.top import run

    url = args.url
    if url is None:
        try:
            master = master_with_pid(args.pid) if args.pid else choose(running_masters())
        except DiscoveryError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        url = master.state.metrics_url if master.state else None
        if url is None:
            print(f"error: cannot read kwserver master {master.describe()}; top reads the master's metrics "
                  "port: give --url", file=sys.stderr)
            return 1
    return run(url, once=args.once or args.json, as_json=args.json, interval=args.interval)


def _reload_target(args: argparse.Namespace) -> int:
    """The pid of the master to signal: named by --pid, --pid-file or --url, or the only one running.
    A pid must be a running kwserver master: SIGHUP stops most other programs."""
    from kwserver.observability.discovery import DiscoveryError, choose, master_with_pid, running_masters

    if args.pid:
        return master_with_pid(args.pid).pid
    if args.pid_file:
        try:
            pid = int(Path(args.pid_file).read_text().strip())
        except (OSError, ValueError) as exc:
            raise DiscoveryError(f"cannot read pid file {args.pid_file}: {exc}") from exc
        return master_with_pid(pid).pid
    if args.url:
        from kwserver.observability.top import fetch_status

        try:
            processes = fetch_status(args.url)["processes"]
        except (OSError, ValueError, KeyError) as exc:
            raise DiscoveryError(f"cannot read {args.url}/status: {exc}") from exc
        masters = [p["pid"] for p in processes if p.get("role") == "master"]
        if len(masters) != 1:
            raise DiscoveryError(f"{args.url}/status names {len(masters)} masters")
        return master_with_pid(masters[0]).pid
    return choose(running_masters()).pid


def cmd_reload(args: argparse.Namespace) -> int:
    """Ask a running server to reload policies.yml (SIGHUP to its master)."""
    import os
    import signal

    from kwserver.observability.discovery import DiscoveryError

    try:
        pid = _reload_target(args)
    except DiscoveryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        print(f"error: cannot signal process {pid}: {exc}", file=sys.stderr)
        return 1
    print(f"asked kwserver master {pid} to reload; the outcome is in its log")
    return 0


def cmd_docs(args: argparse.Namespace) -> int:
    """The command-line reference as markdown (the reference's `policy-server docs -o FILE`)."""
    from kwserver.commands.cli_docs import markdown

    try:
        Path(args.output).write_text(markdown(build_parser()))
    except OSError as exc:
        print(f"error: cannot create file {args.output}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kwserver", description="Kubewarden-compatible admission policy server",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=_version_text())
    commands = parser.add_subparsers(dest="command", required=True)

    # Commands that take the server's settings list them by topic; their usage line would be 40 lines long.
    serve = commands.add_parser("serve", help="run the policy server", usage="%(prog)s [options]",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setting_arguments(serve)
    serve.add_argument("--version", action="version", version=_version_text())
    serve.add_argument("--gunicorn-config", metavar="FILE",
                       help="a gunicorn config file whose settings override kwserver's defaults")
    serve.set_defaults(func=cmd_serve)

    check = commands.add_parser("check", help="validate a configuration: parse, load, compile, validate settings",
                                usage="%(prog)s [options]")
    add_setting_arguments(check)
    check.set_defaults(func=cmd_check)

    annotate_cmd = commands.add_parser("annotate", help="embed Kubewarden metadata into a policy module")
    annotate_cmd.add_argument("module")
    annotate_cmd.add_argument("--metadata", "-m", required=True, help="metadata file (YAML or JSON)")
    annotate_cmd.add_argument("--output", "-o", required=True)
    annotate_cmd.set_defaults(func=cmd_annotate)

    inspect_cmd = commands.add_parser("inspect", help="print the Kubewarden metadata of a policy module")
    inspect_cmd.add_argument("module")
    inspect_cmd.set_defaults(func=cmd_inspect)

    pull_cmd = commands.add_parser("pull", help="download a policy into the download directory; prints its digest",
                                   usage="%(prog)s [options] reference")
    pull_cmd.add_argument("reference", help="registry://, https:// or http:// reference")
    add_setting_arguments(pull_cmd)
    pull_cmd.set_defaults(func=cmd_pull)

    push_cmd = commands.add_parser("push", help="push a policy module to an OCI registry in Kubewarden's format",
                                   usage="%(prog)s [options] module destination")
    push_cmd.add_argument("module", help="the (annotated) policy module")
    push_cmd.add_argument("destination", help="registry://host[:port]/repository:tag")
    add_setting_arguments(push_cmd)
    push_cmd.set_defaults(func=cmd_push)

    verify_cmd = commands.add_parser("verify", help="check a registry policy's signatures against verification.yml",
                                     usage="%(prog)s [options] reference")
    verify_cmd.add_argument("reference", help="registry:// reference")
    add_setting_arguments(verify_cmd)
    verify_cmd.set_defaults(func=cmd_verify)

    trust = commands.add_parser(
        "sigstore-trust-root", help="show the Sigstore trust root keyless signatures are checked against; "
                                    "--refresh updates the shipped one from Sigstore's TUF repository")
    trust.add_argument("--sigstore-trust-config", help="the trust root to show (default: "
                       "$KUBEWARDEN_SIGSTORE_TRUST_CONFIG_PATH, else the public-good root shipped with kwserver)")
    trust.add_argument("--refresh", action="store_true",
                       help="download trusted_root.json through TUF (network) and write it to --output")
    trust.add_argument("--tuf-url", help="TUF repository (default: Sigstore's public-good one)")
    trust.add_argument("--tuf-root", help="TUF root.json to start from, rotated forward in place (default: the "
                                          "shipped one)")
    trust.add_argument("--output", help="where --refresh writes the trusted root (default: the shipped file)")
    trust.set_defaults(func=cmd_sigstore_trust_root)

    top = commands.add_parser("top", help="live memory and activity of a running server's processes")
    top.add_argument("--url", help="the server's metrics endpoint (default: found from the running server's "
                                   "state file)")
    top.add_argument("--pid", type=int, help="pid of the master, when several servers run")
    top.add_argument("--once", action="store_true", help="print one snapshot and exit")
    top.add_argument("--json", action="store_true", help="print one snapshot as JSON and exit")
    top.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    top.set_defaults(func=cmd_top)

    reload_cmd = commands.add_parser("reload", help="reload policies.yml in a running server (SIGHUP)")
    reload_cmd.add_argument("--pid", type=int, help="pid of the master")
    reload_cmd.add_argument("--pid-file", help="pid file written with --pid-file by `kwserver serve`")
    reload_cmd.add_argument("--url", help="the server's metrics endpoint; its master is signalled")
    reload_cmd.set_defaults(func=cmd_reload)

    offline.add_parser(commands)
    manifests.add_parser(commands)

    docs = commands.add_parser("docs", help="write the command-line reference of every command as markdown")
    docs.add_argument("--output", "-o", required=True, metavar="FILE", help="where the markdown is written")
    docs.set_defaults(func=cmd_docs)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)  # --help and --version write to stdout too
        logging.basicConfig(level=logging.WARNING)
        status = args.func(args)
        sys.stdout.flush()  # here, where a closed pipe can still be answered quietly
        return status
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return _reader_gone()


def _reader_gone() -> int:
    """The reader of stdout went away (`kwserver manifests | head`): stop quietly, as coreutils do
    (they die of SIGPIPE), with the shell's status for that. Output still buffered would fail again at
    exit, so stdout now goes nowhere."""
    import os
    import signal

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
