"""`hostCapabilities`: the patterns as policy-server 1.35+ reads them, the dispatcher's gate (deny unless
granted, tracing always), and what `serve`, `check` and `run` do with them."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kwserver.admission import parse_raw_review
from kwserver.capabilities import DENIALS, Capabilities, HostCallError
from kwserver.config import ConfigError, ServerSettings, parse_policies
from kwserver.evaluation.bootstrap import BootError, build_registry
from kwserver.host_capabilities import ALLOW_ALL, CAPABILITIES, DENY_ALL, PatternError, parse
from tests.support.modules import host_policy, in_process_evaluator
from tests.support.server import wait_for

DENIED = "Policy has not been granted access to the '{}' host capability. The violation has been reported."
OCI_V1 = {"oci/v1/verify", "oci/v1/manifest_digest", "oci/v1/oci_manifest", "oci/v1/oci_manifest_config"}
KUBERNETES = {"kubernetes/list_resources_by_namespace", "kubernetes/list_resources_all", "kubernetes/get_resource",
              "kubernetes/can_i"}


def test_the_capability_tree_is_the_references():
    assert OCI_V1 | KUBERNETES | {"oci/v2/verify", "net/v1/dns_lookup_host",
                                                  "crypto/v1/is_certificate_trusted"} == CAPABILITIES


@pytest.mark.parametrize("patterns,granted", [
    ([], set()),
    (["*"], CAPABILITIES),
    (["oci/*"], OCI_V1 | {"oci/v2/verify"}),
    (["oci/v1/*"], OCI_V1),
    (["oci/v2/*"], {"oci/v2/verify"}),
    (["kubernetes/*"], KUBERNETES),
    (["net/*"], {"net/v1/dns_lookup_host"}),
    (["crypto/v1/*"], {"crypto/v1/is_certificate_trusted"}),
    (["oci/v1/verify"], {"oci/v1/verify"}),
    (["kubernetes/can_i"], {"kubernetes/can_i"}),
    (["net/v1/dns_lookup_host", " crypto/v1/is_certificate_trusted "], {"net/v1/dns_lookup_host",
                                                                       "crypto/v1/is_certificate_trusted"}),
    (["oci/*", "kubernetes/can_i"], OCI_V1 | {"oci/v2/verify", "kubernetes/can_i"}),
    (["oci/v1/verify", "*"], CAPABILITIES),
    (["*", "not/a/capability"], CAPABILITIES),  # nothing after `*` is read, as in the reference
])
def test_each_pattern_grants_exactly_what_it_names(patterns, granted):
    allowed = parse(patterns)
    assert {path for path in CAPABILITIES if allowed.allows(path)} == granted


@pytest.mark.parametrize("pattern,message", [
    ("", "invalid pattern: pattern must not be empty"),
    ("   ", "invalid pattern: pattern must not be empty"),
    ("oci*", "invalid pattern \"oci*\": wildcard '*' must be the entire last path segment (e.g. 'oci/*'), "
             "not a partial match"),
    ("oci/v1/oci_*", "invalid pattern \"oci/v1/oci_*\": wildcard '*' must be the entire last path segment"),
    ("*/oci", "invalid pattern \"*/oci\": wildcard '*' must be the entire last path segment"),
    ("unknown/v1/op", 'invalid pattern "unknown/v1/op": unknown segment "unknown", valid options at this level '
                      "are: crypto, kubernetes, net, oci"),
    ("oci/v99/verify", 'invalid pattern "oci/v99/verify": unknown segment "v99", valid options at this level '
                       "are: v1, v2"),
    ("oci/v1/nonexistent", 'unknown segment "nonexistent", valid options at this level are: manifest_digest, '
                           "oci_manifest, oci_manifest_config, verify"),
    ("kubernetes/nonexistent", 'unknown segment "nonexistent"'),
    ("unknown/*", 'invalid pattern "unknown/*": unknown segment "unknown"'),
    ("oci/v99/*", 'unknown segment "v99"'),
    ("oci/v1/verify/extra", 'invalid pattern "oci/v1/verify/extra": unknown segment "extra", valid options at '
                            "this level are: "),
    ("oci", 'invalid pattern "oci": not a complete capability path; use "oci/*" to allow all capabilities under it'),
    ("oci/v1", 'invalid pattern "oci/v1": not a complete capability path; use "oci/v1/*"'),
    ("net", 'use "net/*"'),
    ("kubernetes", 'use "kubernetes/*"'),
])
def test_invalid_patterns_are_refused_with_the_references_messages(pattern, message):
    with pytest.raises(PatternError) as refused:
        parse(["oci/*", pattern])
    assert message in str(refused.value) and str(refused.value).startswith("invalid pattern")


def test_grants_print_as_the_reference_prints_them():
    assert str(DENY_ALL) == "[]" and str(ALLOW_ALL) == "[*]"
    assert str(parse(["kubernetes/can_i", "oci/*"])) == "[oci/*, kubernetes/can_i]"


# --- the dispatcher ---------------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(CAPABILITIES))
def test_a_policy_without_a_grant_reaches_no_capability(path, caplog):
    namespace, _, operation = path.partition("/")
    DENIALS.clear()
    with caplog.at_level(logging.ERROR), pytest.raises(HostCallError) as refused:
        Capabilities("team-a-policy")("kubewarden", namespace, operation, b"")  # checked before the payload
    assert str(refused.value) == DENIED.format(path)
    assert f"policy team-a-policy tried to use the host capability {path} it has not been granted" in caplog.text
    assert {("team-a-policy", path): 1} == DENIALS


def test_logging_is_never_gated():
    assert Capabilities("p")("kubewarden", "tracing", "log", b'{"level":"info","message":"hi"}') == b""


def test_a_grant_lets_through_what_it_names_only():
    capabilities = Capabilities("p", host_capabilities=parse(["net/*"]))
    answer = json.loads(capabilities("kubewarden", "net", "v1/dns_lookup_host", b'"localhost"'))
    assert "127.0.0.1" in answer["ips"] or "::1" in answer["ips"]
    with pytest.raises(HostCallError, match="the 'kubernetes/can_i' host capability"):
        capabilities("kubewarden", "kubernetes", "can_i", b"{}")


def test_names_outside_the_tree_are_refused_before_they_are_looked_up():
    DENIALS.clear()
    with pytest.raises(HostCallError, match=r"^Policy has not been granted access to the 'gadgets/v1/x' host"):
        Capabilities("p", host_capabilities=parse(["oci/*"]))("kubewarden", "gadgets", "v1/x", b"")
    assert DENIALS == {("p", "unknown"): 1}  # made-up names do not become metric labels
    with pytest.raises(HostCallError, match=r"^unknown namespace: gadgets$"):
        Capabilities("p", host_capabilities=ALLOW_ALL)("kubewarden", "gadgets", "v1/x", b"")
    with pytest.raises(HostCallError, match=r"^unknown operation: v9/verify$"):
        Capabilities("p", host_capabilities=parse(["oci/*"]))("kubewarden", "oci", "v9/verify", b"")


@pytest.mark.parametrize("namespace", ["namespaces", "services", "ingresses"])
def test_the_legacy_kubernetes_binding_is_gone(namespace):
    with pytest.raises(HostCallError, match=r"^unknown binding: kubernetes$"):
        Capabilities("p", host_capabilities=ALLOW_ALL)("kubernetes", namespace, "list", b"")


def test_an_allowed_kubernetes_call_still_needs_its_context_aware_resources():
    with pytest.raises(HostCallError, match="granted access to Kubernetes v1/Pod resources"):
        Capabilities("p", host_capabilities=ALLOW_ALL)(
            "kubewarden", "kubernetes", "list_resources_all", b'{"api_version":"v1","kind":"Pod"}')


# --- policies.yml and the server ----------------------------------------------------------------------

@pytest.mark.parametrize("value", [None, "*", [1], {"a": 1}, ["oci/*", None]])
def test_host_capabilities_of_the_wrong_type_are_a_configuration_error(value):
    with pytest.raises(ConfigError, match="`hostCapabilities` must be a list of strings"):
        parse_policies({"p": {"module": "p.wasm", "hostCapabilities": value}})
    with pytest.raises(ConfigError, match="member 'm': `hostCapabilities` must be a list of strings"):
        parse_policies({"g": {"policies": {"m": {"module": "p.wasm", "hostCapabilities": value}},
                              "expression": "m()", "message": "no"}})


def test_a_missing_key_and_an_empty_list_are_told_apart():
    entries = parse_policies({"absent": {"module": "p.wasm"}, "empty": {"module": "p.wasm", "hostCapabilities": []}})
    assert entries["absent"].host_capabilities is None and entries["empty"].host_capabilities == ()


def test_the_default_grant_is_checked_with_the_settings():
    assert ServerSettings(default_host_capabilities=" oci/* , kubernetes/can_i").default_host_capabilities
    with pytest.raises(ConfigError, match="default-host-capabilities: invalid pattern \"oci\": not a complete"):
        ServerSettings(default_host_capabilities="oci")


def dns_policy(directory: Path, name: str, **entry: Any) -> dict[str, Any]:
    return host_policy(directory, name, "v1/dns_lookup_host", "localhost", namespace="net", **entry)


def outcome(evaluator: Any, name: str) -> str:
    response = evaluator.evaluate(name, parse_raw_review({"request": {"uid": "u"}}))
    return response["status"]["message"]


def test_grants_of_policies_and_group_members(tmp_path):
    member = {k: v for k, v in dns_policy(tmp_path, "member").items() if k != "hostCapabilities"}
    policies = {
        "granted": dns_policy(tmp_path, "granted"),
        "absent": {k: v for k, v in dns_policy(tmp_path, "absent").items() if k != "hostCapabilities"},
        "other": dns_policy(tmp_path, "other", hostCapabilities=["oci/*", "kubernetes/*"]),
        "group": {"expression": "allowed() || refused()", "message": "group says no", "policies": {
            "allowed": {**member, "hostCapabilities": ["net/v1/dns_lookup_host"]},
            "refused": member}},
    }
    with in_process_evaluator(tmp_path, policies) as (evaluator, _, _):
        assert outcome(evaluator, "granted").startswith("ok:")
        assert outcome(evaluator, "absent") == "error:" + DENIED.format("net/v1/dns_lookup_host")
        assert outcome(evaluator, "other") == "error:" + DENIED.format("net/v1/dns_lookup_host")
        causes = evaluator.evaluate("group", parse_raw_review({"request": {"uid": "u"}}))["status"]["details"]
        messages = {c["field"]: c["message"] for c in causes["causes"]}
        assert messages["spec.policies.allowed"].startswith("ok:")
        assert messages["spec.policies.refused"] == "error:" + DENIED.format("net/v1/dns_lookup_host")


def test_the_default_grant_applies_to_entries_without_the_key_only(tmp_path, caplog):
    policies = {"absent": {k: v for k, v in dns_policy(tmp_path, "absent").items() if k != "hostCapabilities"},
                "empty": dns_policy(tmp_path, "empty", hostCapabilities=[])}
    with caplog.at_level(logging.INFO), \
            in_process_evaluator(tmp_path, policies, default_host_capabilities="*") as (evaluator, _, _):
        assert outcome(evaluator, "absent").startswith("ok:")
        assert outcome(evaluator, "empty") == "error:" + DENIED.format("net/v1/dns_lookup_host")
    assert "1 of 2 policies have no hostCapabilities key and get the default host capabilities [*]" in caplog.text


def test_invalid_patterns_are_the_policys_initialization_error(tmp_path):
    config = tmp_path / "policies.yml"
    config.write_text(yaml.safe_dump({
        "good": dns_policy(tmp_path, "good"),
        "bad": dns_policy(tmp_path, "bad", hostCapabilities=["net/v1/dns_lookup_host", "oci*"]),
        "group": {"expression": "m()", "message": "no", "policies": {
            "m": dns_policy(tmp_path, "m", hostCapabilities=["kubernetes"])}}}))
    settings = {"policies": str(config), "compile_cache_dir": str(tmp_path / "cache")}
    with pytest.raises(BootError) as refused:
        build_registry(ServerSettings(**settings))
    assert set(refused.value.errors) == {"bad", "group/m"}
    registry, _ = build_registry(ServerSettings(**settings, continue_on_errors=True))
    assert registry.init_errors["bad"] == (
        "bootstrap failure: invalid hostCapabilities pattern for policy bad: invalid pattern \"oci*\": wildcard "
        "'*' must be the entire last path segment (e.g. 'oci/*'), not a partial match")
    assert registry.init_errors["group/m"].startswith(
        'bootstrap failure: invalid hostCapabilities pattern for policy group/m: invalid pattern "kubernetes"')
    assert "good" in registry.policies

    check = subprocess.run([sys.executable, "-m", "kwserver", "check", "--policies", str(config)],
                           capture_output=True, text=True, timeout=120,
                           env={"KWSERVER_COMPILE_CACHE_DIR": settings["compile_cache_dir"], "PATH": "/usr/bin"})
    assert check.returncode == 1
    assert "bad: ERROR: bootstrap failure: invalid hostCapabilities pattern for policy bad" in check.stdout
    assert "good: ok" in check.stdout


def kwserver_run(tmp_path: Path, module: str, *flags: str) -> subprocess.CompletedProcess:
    request = tmp_path / "request.json"
    request.write_text('{"uid": "u"}')
    # As with kwctl, the module comes first: the patterns' list takes every word after the flag.
    return subprocess.run([sys.executable, "-m", "kwserver", "run", module, "--raw", "-r", str(request), *flags],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)


def test_kwserver_run_grants_what_allowed_host_capabilities_says(tmp_path):
    module = dns_policy(tmp_path, "dns")["module"]

    def message(*flags: str) -> str:
        result = kwserver_run(tmp_path, module, *flags)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)["status"]["message"]

    assert message().startswith("ok:")  # kwctl's default: *
    assert message("--allowed-host-capabilities", "oci/*", "--allowed-host-capabilities", "net/*").startswith("ok:")
    assert message("--allowed-host-capabilities", "oci/*") == "error:" + DENIED.format("net/v1/dns_lookup_host")
    assert message("--allowed-host-capabilities") == "error:" + DENIED.format("net/v1/dns_lookup_host")
    refused = kwserver_run(tmp_path, module, "--allowed-host-capabilities", "net")
    assert refused.returncode == 1
    assert refused.stderr.strip().endswith('Error: Invalid host capabilities pattern: invalid pattern "net": not a '
                                           'complete capability path; use "net/*" to allow all capabilities under it')


@pytest.mark.integration
def test_a_reload_applies_grants_and_refuses_invalid_patterns(run_server, tmp_path):
    granted = dns_policy(tmp_path, "dns")
    server = run_server({"dns": granted}, env={"KUBEWARDEN_WORKERS": "1"})
    config = Path(server.log_path).parent / "policies.yml"

    def message() -> str:
        return server.post("/validate_raw/dns", {"request": {"uid": "u"}}).json()["response"]["status"]["message"]

    def reload(entry: dict[str, Any]) -> None:
        config.write_text(yaml.safe_dump({"dns": entry}))
        done = subprocess.run([sys.executable, "-m", "kwserver", "reload", "--pid", str(server.process.pid)],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr

    assert message().startswith("ok:")
    reload({**granted, "hostCapabilities": ["kubernetes/*"]})
    wait_for(lambda: message() == "error:" + DENIED.format("net/v1/dns_lookup_host"))
    reload({**granted, "hostCapabilities": ["net/v1/dns_lookup_host/*"]})
    wait_for(lambda: "reload refused" in server.log())
    assert 'invalid hostCapabilities pattern for policy dns: invalid pattern "net/v1/dns_lookup_host/*"' \
        in server.log()
    assert message() == "error:" + DENIED.format("net/v1/dns_lookup_host")  # the running grant stays
